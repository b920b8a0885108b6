"""The standalone GPU scripts still run here (CPU paths), so a GPU session does not find them broken.

benchmarks/info_nce_table.py --cpu-smoke: its correctness checks and a block-size sweep through the
Triton interpreter. benchmarks/onnx_gpu_table.py --cpu-only --quick: export + the CPU rows of its table.
benchmarks/profile_step.py --tiny --device cpu: a profiled training run of a 2-layer BERT.
benchmarks/run_gpu_checks.sh (GPU only): its parts and the suite rows it names, read from the script.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 600) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=dict(os.environ), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_info_nce_table_checks_and_sweep():
    pytest.importorskip("triton")
    out = _run("benchmarks/info_nce_table.py", "--cpu-smoke", "--sweep", "7,40,float16", "--sweep", "5,24,float32",
               "--sweep", "6,16,bfloat16")
    assert "PASS" in out and "FAIL" not in out, out
    assert out.count("  fwd (") >= 6 + 10 and out.count("  bwd (") >= 9 + 10, out
    assert ", 3):" in out, "the sweep should include configs with several backward chunks per program"
    assert ", 'fold'):" in out, "16-bit sweeps time each backward candidate folded too (KernelConfig.bwd_fold)"
    assert "fold bwd vs fp64" in out, "the checks cover the folded backward"
    assert "split vs fp64" in out, "the checks cover the split column blocks"
    assert "stripes vs fp64" in out, "the checks cover the backward through stripes"
    assert out.count("'split', ") >= 2 * (11 + 2 * 14), \
        "small 16-bit sweeps (two here) time the 11 forward and 14 backward split candidates (backward plain and folded)"
    assert ") tf32x3:" in out and ") ieee:" in out, "fp32 sweeps time both dot precisions"
    assert " programs x " in out and "MiB loaded" in out, "sweep lines count each kernel's programs and loads"


def test_onnx_table_cpu_rows():
    out = _run("benchmarks/onnx_gpu_table.py", "--cpu-only", "--quick", "--cpu-iters", "3", "--cpu-seconds", "5")
    for row in ("PyTorch fp32 (CPU)", "onnxruntime CPU EP fp32 model.onnx", "onnxruntime CPU EP int8 model_int8.onnx"):
        assert row in out, out
    assert "GPU rows (PyTorch CUDA, onnxruntime CUDA EP): skipped (--cpu-only)" in out, out


def test_onnx_table_kernel_profile_adds_up():
    """onnx_gpu_table.kernel_profile, the fp16 export's GPU kernels on a GPU (here, without one, the CPU's
    torch operators): rows from the most time to the least, one per operator, shares adding up to 100 %."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import torch
        from onnx_gpu_table import kernel_profile
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    if torch.cuda.is_available():
        pytest.skip("on a GPU it profiles CUDA kernels: the GPU run of the table exercises it")
    a = torch.randn(300, 300, dtype=torch.float64)
    runs = 4
    text = kernel_profile(lambda: torch.tanh(a @ a).sum(), runs, top=50)  # every operator shown
    rows = [line.split("|")[1:-1] for line in text.splitlines()[3:]]
    assert rows[-1][0].strip() == "0 other kernels", text
    ms = [float(r[1]) for r in rows[:-1]]
    assert ms == sorted(ms, reverse=True) and ms[-1] >= 0, text
    shares = [float(r[2].strip(" %")) for r in rows]
    assert abs(sum(shares) - 100.0) <= 0.05 * len(shares) + 0.01, text  # each share rounded to 0.1 %
    assert float(text.split(" ms per run")[0].split()[-1]) >= sum(ms) - 0.0005 * len(ms), text  # 3 decimals each
    launches = {r[0].strip(): float(r[3]) for r in rows[:-1]}
    assert launches.get("`aten::mm`") == 1 and launches.get("`aten::tanh`") == 1, text  # one of each per run
    cut = kernel_profile(lambda: torch.tanh(a @ a).sum(), runs, top=1)  # the rest folded into one row
    cut_rows = [line.split("|")[1:-1] for line in cut.splitlines()[3:]]
    assert len(cut_rows) == 2 and cut_rows[1][0].strip() == f"{len(rows) - 2} other kernels", (cut, text)


def test_profile_step_cpu():
    data = ROOT.parent / "shared" / "data"
    if not data.is_dir() and not os.environ.get("MIRRORFAST_DATA"):
        pytest.skip(f"the paper's corpus is not under {data} (see ../shared/data/README)")
    out = _run("benchmarks/profile_step.py", "--tiny", "--device", "cpu", "--epochs", "1", "--rows", "5",
               "--half-model")
    assert "CPU: tiny-bert, bf16, cuda_graphs=False, half_model=True; 3 steps" in out, out
    assert "ms per step" in out and "aten::" in out, out


def test_onnx_table_attention_variants(tiny_bert_dir, tmp_path):
    """The attention experiments the GPU table runs on the fp16 file: without its mask input the graph gives
    the same vectors on an unpadded batch (what the table feeds) and others on a padded one (the mask was
    really removed); packing mode puts RemovePadding / PackedAttention in (CUDA-only ops: not run here)."""
    import numpy as np
    import onnx

    from mirrorfast.export.onnx import export_model
    from mirrorfast.export.runtime import open_session

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from onnx_gpu_table import packing_mode, without_attention_mask
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    fp16 = export_model(tiny_bert_dir, tmp_path / "export", fp16=True, max_length=16).out_dir / "model_fp16.onnx"
    unmasked, packed = tmp_path / "unmasked.onnx", tmp_path / "packed.onnx"
    without_attention_mask(fp16, unmasked)
    packing_mode(fp16, packed)
    ops = [node.op_type for node in onnx.load(str(packed)).graph.node]
    assert {"RemovePadding", "PackedAttention", "RestorePadding"} <= set(ops) and "Attention" not in ops, ops

    rng = np.random.default_rng()
    ids = rng.integers(1000, 2000, size=(3, 9)).astype(np.int64)
    full = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    padded = dict(full, attention_mask=(np.arange(9) < np.array([[9], [4], [6]])).astype(np.int64))
    run = {path.name: open_session(path, ["CPUExecutionProvider"], outputs=("sentence_embedding",))
           for path in (fp16, unmasked)}
    out = {name: [s.run(None, feeds)[0] for feeds in (full, padded)] for name, s in run.items()}
    np.testing.assert_allclose(out["unmasked.onnx"][0], out["model_fp16.onnx"][0], atol=1e-5)
    assert np.abs(out["unmasked.onnx"][1][1:] - out["model_fp16.onnx"][1][1:]).max() > 1e-3


def test_run_gpu_checks_parts_and_rows_exist():
    """run_gpu_checks.sh (which needs a GPU to run at all): every part its usage line names has a branch, and
    the training-suite rows it asks for by name exist, so a GPU session does not lose a call to a stale name."""
    import re

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_suite import ALL_ROWS
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    script = (ROOT / "benchmarks" / "run_gpu_checks.sh").read_text()
    usage = re.search(r"PART: ((?:[\w-]+\s|#\s+)+)", script).group(1)
    parts = [w for w in usage.split() if w != "#"]
    branches = re.findall(r"^\s+([\w-]+)\)\s", script, flags=re.M)
    assert parts and sorted(parts) == sorted(branches), (parts, branches)
    asked = [row for spec in re.findall(r"--rows ([\w:,-]+)", script) for row in spec.split(",")]
    assert asked and set(asked) <= set(ALL_ROWS), set(asked) - set(ALL_ROWS)

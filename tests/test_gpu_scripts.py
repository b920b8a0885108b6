"""The standalone GPU scripts still run here (CPU paths), so a GPU session does not find them broken.

benchmarks/info_nce_table.py --cpu-smoke: its correctness checks and a block-size sweep through the
Triton interpreter. benchmarks/onnx_gpu_table.py --cpu-only --quick: export + the CPU rows of its table.
benchmarks/profile_step.py --tiny --device cpu: a profiled training run of a 2-layer BERT.
benchmarks/run_gpu_checks.sh (GPU only): its parts and the suite rows it names, read from the script.
Bad input, and a GPU script started on a CPU, end at once with one line and a non-zero exit, no traceback.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 600, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env or dict(os.environ), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _refused(*args: str, code: int, says: str, timeout: int = 120) -> None:
    """python ARGS exits `code` at once with `says` in its last line on stderr and no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # kernel_registers.py refuses it
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == code and "Traceback" not in proc.stderr, (args, proc.returncode, proc.stderr[-3000:])
    assert says in proc.stderr.strip().splitlines()[-1], (args, proc.stderr[-3000:])


def _cpu_only() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks what the GPU scripts say on a machine without a GPU")


def test_gpu_scripts_on_a_cpu_say_they_need_a_gpu():
    _cpu_only()
    _refused("benchmarks/onnx_gpu_table.py", "--gpu-only", code=1, says="--gpu-only needs a CUDA GPU")
    _refused("benchmarks/profile_step.py", code=1,
             says="needs a CUDA GPU (none here); to try it on a CPU: --tiny --device cpu")
    _refused("benchmarks/profile_step.py", "--device", "cuda", "--tiny", code=1, says="needs a CUDA GPU")


def test_bad_arguments_are_one_line():
    _refused("benchmarks/profile_step.py", "--tiny", "--device", "cpu", "--sentences", "0", code=2,
             says="--sentences must be at least 1")
    _refused("benchmarks/gpu_suite.py", "--tiny", "--corpus", "/nonexistent", code=2,
             says="gpu_suite: error: --corpus /nonexistent: no such file")
    _refused("benchmarks/profile_step.py", "--tiny", "--device", "cpu", "--corpus", "/nonexistent", code=2,
             says="profile_step: error: --corpus /nonexistent: no such file")  # its own name, not gpu_suite's
    for n in ("0", "-3"):  # 0 fell back to the default size, -3 cut the last three strings off
        _refused("benchmarks/gpu_suite.py", "--tiny", "--sentences", n, code=2, says="--sentences must be >= 1")
    for spec in ("200", "200,768,float8", "x,768", "0,768"):
        _refused("benchmarks/info_nce_table.py", "--sweep", spec, code=2, says="expected N,D[,dtype]")


def test_kernel_registers_refuses_a_bad_sweep_or_arch():
    pytest.importorskip("triton")
    for spec in ("200", "200,768,float8"):  # a ValueError and an AttributeError before
        _refused("benchmarks/kernel_registers.py", "--sweep", spec, code=2, says="expected N,D[,dtype]")
    for arch in ("12", "88"):  # both aborted inside LLVM (rc 134)
        _refused("benchmarks/kernel_registers.py", "--arch", arch, code=2, says=f"--arch {arch}: not one this script")


def test_serve_load_bad_input(tmp_path):
    pytest.importorskip("onnxruntime")
    _refused("benchmarks/serve_load.py", "/nonexistent", code=2, says="error: export directory /nonexistent not found")
    _refused("benchmarks/serve_load.py", str(tmp_path), code=2, says="is not an export directory")
    for levels in ("0", "1,x", "8,-1"):
        _refused("benchmarks/serve_load.py", str(tmp_path), "--levels", levels, code=2,
                 says="expected positive integers separated by commas")


def test_serve_load_counts_calls_not_sentences():
    """The direct 32-per-call row: 10 calls of 32 sentences are 10 calls (the column said 320 requests)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import serve_load
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    row = serve_load._summary("direct encode, 32/call", 1, [0.1] * 10, 1.0, per_call=32)
    assert (row.requests, row.rps) == (10, 320.0), row
    assert "| calls |" in serve_load.table([row]), serve_load.table([row])


def test_help_texts():
    assert "Where a training step's time goes" in _run("benchmarks/profile_step.py", "--help")
    assert "InfoNCE (NT-Xent) forward+backward on a GPU" in _run("benchmarks/info_nce_table.py", "--help")
    assert "so the gain of the server's dynamic batching is visible" in " ".join(
        _run("benchmarks/serve_load.py", "--help").split())
    for module in ("reference_recipe.py", "st_recipe.py", "from_checkout.py"):  # imported by the scripts
        assert "a module, not a script" in _run(f"benchmarks/{module}", "--help"), module
    _refused("benchmarks/from_checkout.py", code=2, says="a module, not a script")  # run without --help


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


def test_profile_step_cpu(tmp_path):
    data = ROOT.parent / "shared" / "data"
    if not data.is_dir() and not os.environ.get("MIRRORFAST_DATA"):
        pytest.skip(f"the paper's corpus is not under {data} (see ../shared/data/README)")
    out = _run("benchmarks/profile_step.py", "--tiny", "--device", "cpu", "--epochs", "1", "--rows", "5",
               "--half-model", env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert "CPU: tiny-bert, bf16, cuda_graphs=False, half_model=True; 3 steps" in out, out
    assert "ms per step" in out and "aten::" in out, out
    assert not list(tmp_path.glob("mirrorfast-profile-*")), "its temporary folder (model, corpus) is left behind"


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
    known = re.search(r'^known="([^"]*)"', script, flags=re.M).group(1).split()  # checked before any work
    assert sorted(known) == sorted(branches), (known, branches)
    asked = [row for spec in re.findall(r"--rows ([\w:,-]+)", script) for row in spec.split(",")]
    assert asked and set(asked) <= set(ALL_ROWS), set(asked) - set(ALL_ROWS)


def test_run_gpu_checks_refuses_before_any_work(tmp_path):
    """--help is the usage (exit 0); an unknown part is refused, and a machine without a GPU too, before
    ./gpu-out is created or anything installed (on a GPU those came after nvidia-smi and pip install -e .)."""
    script = str(ROOT / "benchmarks" / "run_gpu_checks.sh")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # its python3: this one

    def run(*parts: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", script, *parts], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)

    for flag in ("--help", "-h"):
        proc = run(flag)
        assert proc.returncode == 0 and "PART: suite restart onnx" in proc.stdout, proc
    proc = run("suite", "bogus")
    assert proc.returncode == 2 and "unknown part 'bogus'" in proc.stderr, proc
    import torch

    if not torch.cuda.is_available():
        proc = run()
        assert proc.returncode == 1 and proc.stderr.strip() == "run_gpu_checks: error: no CUDA GPU here", proc
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())

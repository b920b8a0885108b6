"""benchmarks/kernel_registers.py --check: the default launch configurations of the attention, residual
LayerNorm and (training-sized, 16-bit) InfoNCE kernels compile for an H100/H200 (sm_90a) without register
spills. Triton compiles them ahead of time with its bundled ptxas: no GPU needed, and the Triton interpreter
is off in that subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _without_interpreter(argv: list[str], timeout: int) -> subprocess.CompletedProcess:
    """python ARGV from the repository root, without the Triton interpreter (Triton compiles there, with its
    bundled ptxas; skipped where this Triton has none)."""
    triton = pytest.importorskip("triton")
    try:  # how benchmarks/kernel_registers.py specializes arguments as the JIT does
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
    except ImportError:
        pytest.skip(f"Triton {triton.__version__} has no native_specialize_impl (3.6 and newer have it)")
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not any((bin_dir / name).is_file() for name in ("ptxas-blackwell", "ptxas")):
        pytest.skip(f"this Triton has no bundled ptxas under {bin_dir}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _kernel_registers(*args: str) -> subprocess.CompletedProcess:
    """benchmarks/kernel_registers.py ARGS."""
    return _without_interpreter([str(ROOT / "benchmarks" / "kernel_registers.py"), *args], timeout=900)


def _compiled_output(script: str, timeout: int) -> str:
    """stdout of `python -c script`, which must succeed."""
    proc = _without_interpreter(["-c", script], timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_default_kernel_configurations_compile_without_spills():
    proc = _kernel_registers("--check")
    out = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0, out
    for kernel in ("attention 16-token views", "attention 64-token views", "residual LayerNorm H=768", "InfoNCE N=200 D=768 bfloat16 backward",
                   "InfoNCE N=16384", "InfoNCE N=200 D=768 float16 split merge", "InfoNCE N=200 D=768 bfloat16 split finalize"):
        assert kernel in out, out


def test_kernels_are_compiled_with_the_jit_argument_specialization():
    # A launch on the GPU specializes D=768, the row strides and every pointer as divisible by 16, so the row
    # loads are 16-byte vector loads; a compile without those hints (scalar loads, more registers) would
    # report registers and spills that no launch has. Checked on the PTX of the InfoNCE norm kernel.
    script = (
        "import sys, re, torch; sys.path.insert(0, 'benchmarks'); import kernel_registers as kr;"
        "from mirrorfast.kernels import infonce_triton as nce; bf = torch.bfloat16;"
        "k = kr.compile_kernel(nce._row_norm_kernel, 90, dict(a_ptr=bf, b_ptr=bf, norm_ptr=torch.float32, N=200,"
        " D=768, stride_a=768, stride_b=768), nce.norm_meta(200, 768));"
        "print(sorted(set(re.findall(r'ld\\.global[.\\w]*', k.asm['ptx']))))"
    )
    loads = _compiled_output(script, timeout=300).strip().splitlines()[-1]
    assert ".v4" in loads and "ld.global.b16" not in loads, loads


def test_infonce_kernels_compile_without_fp_contraction():
    # The backward recomputes the forward's logits and must round them as the forward did; a compiler free to
    # fuse mul + add into fma in one kernel and not the other moved the gradients by 1e-3 at T=1e-4 on an H100
    # (kernels/infonce_triton.py, _NO_FP_CONTRACTION). With 16-bit inputs the dots go to the tensor cores, so
    # any fp32 fma left in the PTX is a contraction: there must be none, in any of the loss's launches
    # (default, split and stripes configurations).
    script = (
        "import sys, re, torch; sys.path.insert(0, 'benchmarks'); import kernel_registers as kr;"
        "from mirrorfast.kernels import infonce_triton as nce; from dataclasses import replace;"
        "cfg = nce.pick_config(400, 768, torch.bfloat16);"
        "cases = [*kr.infonce_cases(400, 768, torch.bfloat16, cfg, 'default', True),"
        " *kr.infonce_cases(400, 768, torch.float16, replace(cfg, fwd_split=2, bwd_split=2, bwd_fold=True), 'split', True),"
        " *kr.infonce_cases(400, 768, torch.float16, replace(cfg, bwd_fold=True, stripe_rows=64, stripe_cols=128),"
        " 'stripes', True)];"
        "[print(name, len(re.findall(r'fma\\.rn\\.f32', kr.compile_kernel(fn, 90, rt, meta).asm['ptx'])))"
        " for name, fn, rt, meta, _ in cases]"
    )
    counts = dict(line.rsplit(" ", 1) for line in _compiled_output(script, timeout=600).strip().splitlines())
    assert {"default norms", "default forward", "default backward", "split merge", "split finalize",
            "stripes stripe weights", "stripes stripe product", "stripes stripe finalize"} <= set(counts), counts
    assert all(c == "0" for c in counts.values()), f"fp32 fma instructions (contractions) per kernel: {counts}"


def test_sweep_candidates_compile():
    # `--sweep N,D`: every InfoNCE candidate that info_nce_table.py --sweep would time, compiled statically.
    proc = _kernel_registers("--sweep", "200,768,bfloat16")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.strip().startswith("InfoNCE (")]
    assert any(r.split(")")[1].strip().startswith("forward") for r in rows)
    assert any(", 3) backward" in r for r in rows)  # several gradient chunks per program
    assert any("'split', 8) merge" in r for r in rows) and any("'split', 4) finalize" in r for r in rows)
    assert len(rows) >= 15 and all(" regs " in r for r in rows)


def test_stripes_sweep_candidates_compile():
    # The large-problem sweep's candidates for the backward through stripes, each of its three kernels
    # compiled at the size they are for (N=16384 D=768 fp16), statically: the next GPU sweep cannot fail on
    # a candidate that does not compile.
    script = (
        "import sys, torch; sys.path.insert(0, 'benchmarks'); import kernel_registers as kr;"
        "from info_nce_table import SWEEP_BWD_STRIPES, sweep_candidates;"
        "stripes = [c for c in sweep_candidates(16384, 768, torch.float16) if c[3].stripe_rows];"
        "assert len(stripes) == len(SWEEP_BWD_STRIPES), stripes;"
        "[print(name, *kr.registers_and_spills(kr.compile_kernel(fn, 90, rt, meta), 90))"
        " for _, candidate, _, cfg in stripes for name, fn, rt, meta, _ in"
        " kr.infonce_cases(32768, 768, torch.float16, cfg, str(candidate), False) if 'stripe ' in name]"
    )
    rows = _compiled_output(script, timeout=900).strip().splitlines()
    assert len(rows) == 3 * 9 and all(int(r.split()[-2]) > 0 for r in rows), rows

"""benchmarks/kernel_registers.py --check: the default launch configurations of the attention and residual
LayerNorm kernels compile for an H100/H200 (sm_90a) without register spills. Triton compiles them ahead of
time with its bundled ptxas: no GPU needed, and the Triton interpreter is off in that subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_default_kernel_configurations_compile_without_spills():
    triton = pytest.importorskip("triton")
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not any((bin_dir / name).is_file() for name in ("ptxas-blackwell", "ptxas")):
        pytest.skip(f"this Triton has no bundled ptxas under {bin_dir}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_registers.py"), "--check"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0, out
    for kernel in ("attention 16-token views", "attention 64-token views", "residual LayerNorm H=768", "InfoNCE N=16384"):
        assert kernel in out, out

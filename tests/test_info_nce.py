"""info_nce, PyTorch reference path: gradients by central differences of a float64 loop definition, N=1,
and the package without triton. (Forward vs float64, validation, zero rows: tests/test_kernels_info_nce.py.)"""

import math

import pytest
import torch

from mirrorfast.kernels import info_nce


def nt_xent_float64(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row loss written from the definition with explicit loops (2N rows), in float64."""
    z = torch.cat([a, b]).double()
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n2 = z.shape[0]
    losses = []
    for i in range(n2):
        logits = [float(z[i] @ z[j]) / temperature for j in range(n2) if j != i]
        m = max(logits)
        lse = m + math.log(sum(math.exp(x - m) for x in logits))
        positive = float(z[i] @ z[(i + n2 // 2) % n2]) / temperature
        losses.append(lse - positive)
    return torch.tensor(losses, dtype=torch.float64)


def test_n1_has_only_the_positive():
    a, b = torch.randn(1, 8), torch.randn(1, 8)
    # With N=1 each row's only other row is its positive: loss is exactly 0.
    torch.testing.assert_close(info_nce(a, b, 0.1, "none", backend="torch"), torch.zeros(2))


@pytest.mark.parametrize("n,d", [(1, 3), (4, 7), (9, 20)])
def test_gradients_match_definition(n, d):
    torch.manual_seed(n + d)
    a = (torch.randn(n, d) * torch.logspace(-2, 2, n)[:, None]).double().requires_grad_()
    b = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2 * n, dtype=torch.float64)
    # Reference gradient by central differences of the loop definition.
    def f(x, y):
        return (nt_xent_float64(x, y, 0.2) * weights).sum()

    (info_nce(a, b, 0.2, "none", backend="torch").double() * weights).sum().backward()
    eps = 1e-6
    for tensor, grad in ((a, a.grad), (b, b.grad)):
        numeric = torch.zeros_like(tensor)
        flat = tensor.detach().clone()
        for idx in range(flat.numel()):
            plus, minus = flat.clone().view(-1), flat.clone().view(-1)
            plus[idx] += eps
            minus[idx] -= eps
            args_p = (plus.view_as(flat), b.detach()) if tensor is a else (a.detach(), plus.view_as(flat))
            args_m = (minus.view_as(flat), b.detach()) if tensor is a else (a.detach(), minus.view_as(flat))
            numeric.view(-1)[idx] = (f(*args_p) - f(*args_m)) / (2 * eps)
        torch.testing.assert_close(grad, numeric, rtol=1e-4, atol=1e-6)


def test_package_works_without_triton():
    """With triton not importable, mirrorfast.kernels imports, "auto" uses the reference (even for CUDA
    tensors), and backend="triton" is one clear error. Run in a fresh interpreter with triton blocked."""
    import os
    import subprocess
    import sys

    code = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError
import torch
from mirrorfast.errors import MirrorfastError
from mirrorfast.kernels import info_nce, info_nce_reference, resolve_backend
assert resolve_backend("auto", torch.device("cuda")) == "torch"
a, b = torch.randn(4, 8), torch.randn(4, 8)
assert torch.equal(info_nce(a, b, 0.1), info_nce_reference(a, b, 0.1, "mean"))
try:
    info_nce(a, b, 0.1, backend="triton")
except MirrorfastError as exc:
    print("error:", exc)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MIRRORFAST_KERNELS": ""})
    assert run.returncode == 0, run.stderr
    assert "error: info_nce: backend='triton' asked for, but triton is not installed" in run.stdout

"""info_nce (PyTorch reference path) against an independent float64 definition, plus validation."""

import math

import pytest
import torch

from mirrorfast.errors import MirrorfastError
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


@pytest.mark.parametrize("n,d", [(1, 4), (2, 3), (5, 16), (17, 33)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_forward_matches_definition(n, d, reduction):
    gen = torch.Generator().manual_seed(n * 100 + d)
    a, b = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    temperature = float(torch.empty(1).uniform_(0.03, 1.0, generator=gen))
    expected = nt_xent_float64(a, b, temperature)
    expected = {"mean": expected.mean(), "sum": expected.sum(), "none": expected}[reduction]
    got = info_nce(a, b, temperature, reduction, backend="torch")
    assert got.dtype == torch.float32
    assert got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


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


def test_zero_row_is_finite():
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    a[1] = 0
    a.requires_grad_()
    loss = info_nce(a, b, 0.05, backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()


@pytest.mark.parametrize(
    "a,b,kwargs,message",
    [
        (torch.randn(3, 4), torch.randn(2, 4), {}, "same shape"),
        (torch.randn(0, 4), torch.randn(0, 4), {}, "N >= 1"),
        (torch.ones(2, 4, dtype=torch.int64), torch.ones(2, 4, dtype=torch.int64), {}, "floating point"),
        (torch.randn(2, 4), torch.randn(2, 4), {"temperature": 0.0}, "temperature must be"),
        (torch.randn(2, 4), torch.randn(2, 4), {"temperature": -1.0}, "temperature must be"),
        (torch.randn(2, 4), torch.randn(2, 4), {"reduction": "max"}, "reduction must be"),
        (torch.randn(2, 4), torch.randn(2, 4), {"backend": "cuda"}, "backend must be"),
        (torch.randn(4), torch.randn(4), {}, "2-D"),
    ],
)
def test_validation(a, b, kwargs, message):
    with pytest.raises(MirrorfastError, match=message):
        info_nce(a, b, **kwargs)


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

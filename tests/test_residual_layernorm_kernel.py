"""mirrorfast.kernels.residual_layernorm_triton (dropout + residual add + LayerNorm, fused) against an
independent float64 definition; dropout checked through the kernel's own mask (`keep_mask`).

Without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py)."""

import pytest
import torch

triton = pytest.importorskip("triton")
from mirrorfast.kernels.residual_layernorm_triton import MAX_HIDDEN, dropout_add_layer_norm, keep_mask  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.triton_cpu if torch.device(DEVICE).type == "cpu" else []  # CPU tensors: the interpreter
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _definition(h, res, w, b, eps, keep=None, p=0.0):
    """float64: LayerNorm(res + h * keep / (1 - p)) * w + b, from the formulas."""
    h = h.double() if keep is None else h.double() * keep.double() / (1 - p)
    s = res.double() + h
    mean = s.mean(-1, keepdim=True)
    var = ((s - mean) ** 2).mean(-1, keepdim=True)
    return (s - mean) / torch.sqrt(var + eps) * w.double() + b.double()


def _inputs(rows, h_dim, h_dtype, res_dtype, w_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, h_dim, generator=g) * 2
    res = torch.randn(rows, h_dim, generator=g) + 0.5
    w = 1 + 0.3 * torch.randn(h_dim, generator=g)
    b = 0.2 * torch.randn(h_dim, generator=g)
    dy = torch.randn(rows, h_dim, generator=g)
    return (h.to(DEVICE, h_dtype), res.to(DEVICE, res_dtype), w.to(DEVICE, w_dtype), b.to(DEVICE, w_dtype),
            dy.to(DEVICE))


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("rows,h_dim,h_dtype,res_dtype,w_dtype,p", [
    (1, 8, torch.float32, torch.float32, torch.float32, 0.0),  # one row
    (7, 30, torch.float32, torch.float32, torch.float32, 0.25),  # ragged hidden size (a 32-wide tile)
    (33, 64, torch.bfloat16, torch.float32, torch.float32, 0.1),  # autocast: bf16 sublayer, fp32 residual stream
    (9, 96, torch.bfloat16, torch.bfloat16, torch.bfloat16, 0.1),  # --half-model: all bf16
    (5, 768, torch.float16, torch.float16, torch.float16, 0.1),  # BERT-base width
])
def test_matches_definition(rows, h_dim, h_dtype, res_dtype, w_dtype, p):
    h, res, w, b, dy = _inputs(rows, h_dim, h_dtype, res_dtype, w_dtype, seed=rows * 1000 + h_dim)
    eps = 1e-12 if h_dim != 30 else 1e-5
    seed = torch.tensor([rows + h_dim], dtype=torch.int64, device=DEVICE)
    keep = keep_mask(seed, rows, h_dim, p) if p > 0 else None

    leaves = [t.detach().clone().requires_grad_(True) for t in (h, res, w, b)]
    y = dropout_add_layer_norm(*leaves, eps, p, training=True, seed=seed)
    out_dtype = torch.promote_types(torch.promote_types(h_dtype, res_dtype), w_dtype)
    assert y.dtype == out_dtype and y.shape == h.shape
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))

    ref_leaves = [t.detach().double().requires_grad_(True) for t in (h, res, w, b)]
    ref = _definition(*ref_leaves, eps, keep, p)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy.to(y.dtype).double())

    tol = TOL[out_dtype]
    assert _rel(y, ref) <= tol, _rel(y, ref)
    for name, got, want, leaf in zip(("h", "residual", "weight", "bias"), grads, ref_grads, leaves):
        assert got.dtype == leaf.dtype, name
        assert _rel(got, want) <= max(tol, TOL[leaf.dtype]), (name, _rel(got, want))


def _rounded_as_triton(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 x cast to dtype as a Triton kernel's `.to(dtype)` casts it here: compiled Triton rounds to
    nearest even, as torch does, but the interpreter (CPU tensors) truncates fp32 to bf16."""
    if x.device.type == "cpu" and dtype == torch.bfloat16:
        return (x.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)  # exact: low bits are zero
    return x.to(dtype)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_half_sum_is_normalized_as_stored(dtype):
    """In a half dtype, s = residual + h is stored rounded (as the unfused add gives it) and the backward
    recomputes x from it: the forward's mean and rstd must be those of the rounded s, or the two passes
    disagree (a residual stream of mean 50 and std 1 in bf16: d weight 14 % off). The definition: the
    float64 LayerNorm of s rounded to the dtype, its gradient passed straight through the rounding."""
    g = torch.Generator().manual_seed(11)
    rows, h_dim = 9, 96
    h = torch.randn(rows, h_dim, generator=g).to(DEVICE, dtype)
    res = (torch.randn(rows, h_dim, generator=g) + 50).to(DEVICE, dtype)
    w = (1 + 0.3 * torch.randn(h_dim, generator=g)).to(DEVICE, dtype)
    b = (0.2 * torch.randn(h_dim, generator=g)).to(DEVICE, dtype)
    dy = torch.randn(rows, h_dim, generator=g).to(DEVICE, dtype)
    leaves = [t.detach().clone().requires_grad_(True) for t in (h, res, w, b)]
    y = dropout_add_layer_norm(*leaves, 1e-12, 0.0, training=True)
    grads = torch.autograd.grad(y, leaves, dy)

    s_rounded = _rounded_as_triton((res.float() + h.float()), dtype).double().requires_grad_(True)
    ref_w, ref_b = (t.detach().double().requires_grad_(True) for t in (w, b))
    ref = _definition(torch.zeros_like(s_rounded), s_rounded, ref_w, ref_b, 1e-12)
    ds, dw, db = torch.autograd.grad(ref, (s_rounded, ref_w, ref_b), dy.double())
    assert _rel(y, ref) <= TOL[dtype]
    for name, got, want in zip(("h", "residual", "weight", "bias"), grads, (ds, ds, dw, db)):
        assert _rel(got, want) <= TOL[dtype], (name, _rel(got, want))


def test_second_derivative_is_an_error_not_zero():
    h, res, w, b, _ = _inputs(4, 16, torch.float32, torch.float32, torch.float32, seed=3)
    h.requires_grad_(True)
    y = dropout_add_layer_norm(h, res, w, b, 1e-12, 0.0, training=True)
    (gh,) = torch.autograd.grad((y * y).sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(gh.square().sum(), h, allow_unused=True)


def test_dropout_mask_rate_seed_and_determinism():
    h, res, w, b, dy = _inputs(64, 256, torch.float32, torch.float32, torch.float32, seed=11)
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE)
    keep = keep_mask(seed, 64, 256, 0.3)
    assert abs(keep.float().mean().item() - 0.7) < 0.02
    assert not torch.equal(keep, keep_mask(seed + 1, 64, 256, 0.3))

    def run(s):
        leaves = [t.detach().clone().requires_grad_(True) for t in (h, res, w, b)]
        y = dropout_add_layer_norm(*leaves, 1e-12, 0.3, seed=s)
        return (y, *torch.autograd.grad(y, leaves, dy))

    first, again, other = run(seed), run(seed.clone()), run(seed + 1)
    assert all(torch.equal(x, y) for x, y in zip(first, again)), "not bit-identical run to run"
    assert not torch.equal(first[0], other[0])
    # Without a seed each call draws a fresh one: two calls differ; in eval mode there is no dropout at all.
    assert not torch.equal(dropout_add_layer_norm(h, res, w, b, 1e-12, 0.3), dropout_add_layer_norm(h, res, w, b, 1e-12, 0.3))
    plain = dropout_add_layer_norm(h, res, w, b, 1e-12, 0.0)
    assert torch.equal(dropout_add_layer_norm(h, res, w, b, 1e-12, 0.3, training=False), plain)


def test_leading_dimensions_and_errors():
    h, res, w, b, _ = _inputs(6, 16, torch.float32, torch.float32, torch.float32, seed=5)
    y = dropout_add_layer_norm(h.view(2, 3, 16), res.view(2, 3, 16), w, b, 1e-12)
    assert y.shape == (2, 3, 16)
    torch.testing.assert_close(y.view(6, 16), dropout_add_layer_norm(h, res, w, b, 1e-12))
    with pytest.raises(ValueError, match="do not fit"):
        dropout_add_layer_norm(h, res[:, :8], w, b, 1e-12)
    with pytest.raises(ValueError, match="p must be in"):
        dropout_add_layer_norm(h, res, w, b, 1e-12, 1.0)
    with pytest.raises(ValueError, match=r"seed must be a \(1,\) int64 tensor on .*, got torch.int64 \(2,\)"):
        dropout_add_layer_norm(h, res, w, b, 1e-12, 0.1, seed=torch.zeros(2, dtype=torch.int64, device=DEVICE))
    wide = torch.zeros(1, MAX_HIDDEN + 1, device=DEVICE)
    with pytest.raises(ValueError, match="hidden size"):
        dropout_add_layer_norm(wide, wide, wide[0], wide[0], 1e-12)


def test_warm_up_runs_without_drawing_random_numbers():
    """Warm-ups run during a seeded run's setup (or not, MIRRORFAST_KERNEL_WARMUP=0): drawing the dropout
    seed from torch's generator would shift that run's dropout masks."""
    from mirrorfast.kernels.residual_layernorm_triton import warm_up

    rng_state = torch.cuda.get_rng_state if DEVICE.type == "cuda" else torch.get_rng_state
    before = rng_state()
    warm_up(20, 48, torch.float32, torch.float32, torch.float32, 0.1, DEVICE)
    assert torch.equal(rng_state(), before), "warm_up drew random numbers"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: Triton's JIT compiles only there")
@pytest.mark.parametrize("mix", ["autocast", "half"])
def test_warm_up_compiles_what_a_training_step_launches(mix):
    """After warm_up, a sublayer output as a training step calls it (a bucketed batch of 1,024 tokens: the
    dense output in bf16; the residual stream and LayerNorm parameters in fp32 under autocast, bf16 in a
    --half-model model) compiles nothing more."""
    from mirrorfast.kernels import residual_layernorm_triton as rln
    from mirrorfast.warmup import compiled_kernels

    res_dtype = torch.float32 if mix == "autocast" else torch.bfloat16
    rln.warm_up(512, 768, torch.bfloat16, res_dtype, res_dtype, 0.1, DEVICE)
    compiled = len(compiled_kernels(rln._fwd_kernel, rln._bwd_kernel))
    assert compiled >= 2
    h = torch.randn(1, 1024, 768, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    res = torch.randn(1, 1024, 768, device=DEVICE, dtype=res_dtype, requires_grad=True)
    w = torch.ones(768, device=DEVICE, dtype=res_dtype, requires_grad=True)
    b = torch.zeros(768, device=DEVICE, dtype=res_dtype, requires_grad=True)
    y = dropout_add_layer_norm(h, res, w, b, 1e-12, 0.1)
    y.backward(torch.randn_like(y))
    torch.cuda.synchronize()
    assert len(compiled_kernels(rln._fwd_kernel, rln._bwd_kernel)) == compiled

"""mirrorfast.kernels.packed_attention_triton (attention over packed short views, one tile per view and head)
against an independent float64 definition; dropout checked through its own mask.

Without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py)."""

import math

import pytest
import torch

triton = pytest.importorskip("triton")
from mirrorfast.kernels.packed_attention_triton import packed_attention_triton  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.triton_cpu if torch.device(DEVICE).type == "cpu" else []  # CPU tensors: the interpreter
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _views(lengths, heads, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, dim, generator=g).to(DEVICE, dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return q, k, v, cu


def _definition(q, k, v, cu, scale, keep=None, p=0.0):
    """float64, view by view: softmax(q k^T scale) (dropped and rescaled where keep is given) v."""
    out = []
    for s in range(cu.shape[0] - 1):
        a, b = int(cu[s]), int(cu[s + 1])
        qs, ks, vs = (t[a:b].double().transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        probs = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        if keep is not None:
            probs = probs * keep[s][:, : b - a, : b - a].double() / (1 - p)
        out.append((probs @ vs).transpose(0, 1))
    return torch.cat(out)


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out.detach(), grads


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("lengths,dim,dtype", [
    ([1, 5, 17, 3], 64, torch.float32),
    ([7, 1, 30, 12, 2], 24, torch.bfloat16),  # ragged head dim (24 -> a 32-wide tile), one-token views
    ([50, 33, 14], 64, torch.float16),
    ([64, 9], 16, torch.float32),  # a view exactly filling its tile
    ([100, 3], 32, torch.float32),  # 128-token tiles
    ([16, 32, 17, 33, 65, 128, 64], 16, torch.float32),  # every length-class boundary, each side
])
def test_matches_definition_without_dropout(lengths, dim, dtype):
    heads = 3
    q, k, v, cu = _views(lengths, heads, dim, dtype, seed=sum(lengths) + dim)
    scale = 1 / math.sqrt(dim)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    out, grads = _grads(lambda a, b, c: packed_attention_triton(a, b, c, cu, max(lengths)), (q, k, v), grad_out)
    ref, ref_grads = _grads(lambda a, b, c: _definition(a, b, c, cu, scale), (q.double(), k.double(), v.double()),
                            grad_out)
    assert out.dtype == dtype and out.shape == q.shape
    assert _rel(out, ref) <= TOL[dtype]
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype and _rel(got, want) <= TOL[dtype] * 2


def test_second_derivative_is_an_error_not_zero():
    q, k, v, cu = _views([3, 5], 2, 16, torch.float32, seed=5)
    q.requires_grad_(True)
    (gq,) = torch.autograd.grad(packed_attention_triton(q, k, v, cu, 5).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(gq.square().sum(), q, allow_unused=True)


def _keep_mask(cu, heads, max_len, p, seed):
    """The kernel's own keep mask, read back through attention with uniform weights over one-hot values:
    q = k = 0 gives P = 1/n, and v = I makes O[i, j] = keep_ij / ((1 - p) n)."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    dim = max(16, max_len)
    q = torch.zeros(int(cu[-1]), heads, dim, device=DEVICE)
    v = torch.cat([torch.eye(n, dim, device=DEVICE)[:, None, :].expand(n, heads, dim) for n in lengths])
    torch.manual_seed(seed)
    out = packed_attention_triton(q, q, v, cu, max_len, p)
    keep = []
    for s, n in enumerate(lengths):
        a = int(cu[s])
        block = out[a : a + n, :, :n].transpose(0, 1) * (1 - p) * n  # (H, n, n): 1 kept, 0 dropped
        assert torch.allclose(block, block.round(), atol=1e-4)
        keep.append(block.round())
    return keep


def test_dropout_matches_definition_with_its_mask():
    """Forward and backward use one mask: the definition with that mask gives the same output and gradients."""
    lengths, heads, dim, p, seed = [9, 1, 20, 6], 2, 32, 0.3, 1234
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    keep = _keep_mask(cu, heads, max(lengths), p, seed)
    kept = torch.cat([m.flatten() for m in keep])
    assert 0.5 < kept.mean().item() < 0.9  # about 1 - p of the entries kept
    q, k, v, _ = _views(lengths, heads, dim, torch.float32, seed=5)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)

    def dropped(a, b, c):
        torch.manual_seed(seed)  # the same seed draw as when the mask was read
        return packed_attention_triton(a, b, c, cu, max(lengths), p)

    out, grads = _grads(dropped, (q, k, v), grad_out)
    ref, ref_grads = _grads(lambda a, b, c: _definition(a, b, c, cu, dim ** -0.5, keep, p),
                            (q.double(), k.double(), v.double()), grad_out)
    assert _rel(out, ref) <= 1e-5
    for got, want in zip(grads, ref_grads):
        assert _rel(got, want) <= 1e-5
    torch.manual_seed(seed + 1)  # another draw, another mask
    assert not torch.equal(packed_attention_triton(q, k, v, cu, max(lengths), p), out)


def test_deterministic_and_validated():
    q, k, v, cu = _views([4, 11, 2], 2, 16, torch.float32, seed=3)
    grad_out = torch.randn(q.shape).to(DEVICE)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(_grads(lambda a, b, c: packed_attention_triton(a, b, c, cu, 11, 0.1), (q, k, v), grad_out))
    assert torch.equal(runs[0][0], runs[1][0]) and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    with pytest.raises(ValueError, match="max_len must be 1..128"):
        packed_attention_triton(q, k, v, cu, 129)
    with pytest.raises(ValueError, match="dropout_p"):
        packed_attention_triton(q, k, v, cu, 11, 1.0)
    with pytest.raises(ValueError, match=r"seed must be a \(1,\) int64 tensor on .*, got torch.float32"):
        packed_attention_triton(q, k, v, cu, 11, 0.1, seed=torch.ones(1, device=DEVICE))


def test_one_launch_per_length_class_up_to_the_longest_view():
    from mirrorfast.kernels.packed_attention_triton import _class_launches

    q = torch.zeros(4, 2, 64, device=DEVICE)
    blocks = lambda max_len: [(a["LOW"], a["BLOCK_L"]) for a in _class_launches(q, max_len, 0.1)]  # noqa: E731
    assert blocks(1) == blocks(16) == [(0, 16)]
    assert blocks(17) == [(0, 16), (16, 32)]
    assert blocks(50) == [(0, 16), (16, 32), (32, 64)]
    assert blocks(128) == [(0, 16), (16, 32), (32, 64), (64, 128)]


def test_warm_up_runs_every_class_without_drawing_random_numbers():
    """As the loss's warm-up: it runs during a seeded run's setup and must not shift its dropout masks."""
    from mirrorfast.kernels.packed_attention_triton import warm_up

    rng_state = torch.cuda.get_rng_state if DEVICE.type == "cuda" else torch.get_rng_state
    before = rng_state()
    warm_up(2, 16, torch.bfloat16 if DEVICE.type == "cuda" else torch.float32, DEVICE, 40, 0.1)  # classes 16..64
    assert torch.equal(rng_state(), before), "warm_up drew random numbers"


@pytest.mark.parametrize("max_len", [10, 16, 33])
def test_a_view_longer_than_max_len_comes_out_nan_not_unwritten(max_len):
    """max_len is the caller's promise (checking it would need a device sync): a view longer than the last
    launched class's tile gets NaN in its first rows, forward and backward, so the loss turns NaN instead
    of those rows keeping whatever the allocation held. Views that fit are exact, as always."""
    lengths = [3, 70 if max_len == 33 else 17, 5]  # the middle view is longer than max_len's class
    q, k, v, cu = _views(lengths, 2, 16, torch.float32, seed=max_len)
    grad_out = torch.randn(q.shape).to(DEVICE)
    out, grads = _grads(lambda a, b, c: packed_attention_triton(a, b, c, cu, max_len), (q, k, v), grad_out)
    tile = 16 if max_len <= 16 else 64
    long_rows = slice(3, 3 + tile)  # the long view's first `tile` rows
    for t in (out, *grads):
        assert t[long_rows].isnan().all()
    ref_out, ref_grads = _grads(lambda a, b, c: _definition(a, b, c, cu, 16**-0.5), (q, k, v), grad_out)
    fits = torch.cat([torch.arange(0, 3), torch.arange(3 + lengths[1], sum(lengths))])
    for t, ref in zip((out, *grads), (ref_out, *ref_grads)):
        assert _rel(t[fits], ref[fits]) < TOL[torch.float32]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: Triton's JIT compiles only there")
def test_compile_in_parallel_compiles_without_launching_where_triton_can():
    """The warm-up's parallel compilation is a capability (Triton's AsyncCompileMode: 3.6 and 3.9 have it), not a silent fallback:
    where Triton has it, compile_in_parallel reports so and every launch given is compiled, none run."""
    import importlib.util

    from mirrorfast.kernels import packed_attention_triton as attn
    from mirrorfast.kernels.functional import compile_in_parallel
    from mirrorfast.warmup import compiled_kernels

    kernels = (attn._packed_attention_fwd_kernel, attn._packed_attention_bwd_kernel)
    before = len(compiled_kernels(*kernels))
    # A shape no other test uses (3 heads of 24: strides not multiples of 16, so specializations of their own).
    q = torch.ones((40, 3, 24), dtype=torch.float16, device=DEVICE)
    out = torch.full_like(q, 7.0)
    cu = torch.tensor([0, 40], dtype=torch.int32, device=DEVICE)
    seed = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    launches = attn._forward_launches(q, q, q, out, cu, seed, 40, 0.1, 0.2)  # classes 16, 32 and 64
    parallel = compile_in_parallel(launches)
    assert parallel == (importlib.util.find_spec("triton.runtime._async_compile") is not None)
    torch.cuda.synchronize()
    assert len(compiled_kernels(*kernels)) == before + (len(launches) if parallel else 0)
    assert (out == 7.0).all(), "compiling launched a kernel"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: Triton's JIT compiles only there")
@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_warm_up_compiles_what_a_training_step_launches(dropout):
    """After warm_up, attention as a BERT layer calls it in training (q, k, v: (T, heads, d) views of each
    projection's (T, heads * d) output, views of mixed lengths, bucketed max_len 64) compiles nothing more."""
    from mirrorfast.kernels import packed_attention_triton as attn
    from mirrorfast.warmup import compiled_kernels

    attn.warm_up(12, 64, torch.bfloat16, DEVICE, 64, dropout)
    kernels = (attn._packed_attention_fwd_kernel, attn._packed_attention_bwd_kernel)
    compiled = len(compiled_kernels(*kernels))
    assert compiled >= 6  # forward and backward of the 16-, 32- and 64-token classes
    lengths = [14, 9, 33, 50, 3, 64, 21]
    total = sum(lengths)
    q, k, v = (torch.randn(total, 12 * 64, device=DEVICE, dtype=torch.bfloat16).view(total, 12, 64).requires_grad_()
               for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    out = attn.packed_attention_triton(q, k, v, cu, 64, dropout, 0.125)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    assert len(compiled_kernels(*kernels)) == compiled

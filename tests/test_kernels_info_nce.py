"""mirrorfast.kernels.info_nce: both backends against an independent float64 NT-Xent, plus dispatch,
validation, determinism, strides and autocast.

Without a GPU the Triton kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py
before anything imports triton); on a CUDA machine the same tests run the compiled kernels.
"""

import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mirrorfast.errors import MirrorfastError
from mirrorfast.kernels import info_nce, info_nce_reference, resolve_backend

try:
    import triton  # noqa: F401

    from mirrorfast.kernels.infonce_triton import KernelConfig, info_nce_triton, pick_config

    _TRITON_ERR = None
except ImportError as exc:  # pragma: no cover - depends on the environment
    _TRITON_ERR = f"triton is not importable: {exc}"

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(_TRITON_ERR is not None, reason=_TRITON_ERR or "")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    needs_triton = pytest.mark.skip(reason="CPU run without TRITON_INTERPRET=1 (set by conftest.py unless overridden)")

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
EPS = 1e-12


# ------------------------------------------------------------------------------------------------
# The definition, written out in float64 (independent of kernels/reference.py)
# ------------------------------------------------------------------------------------------------


def nt_xent_f64(a, b, temperature, reduction):
    """NT-Xent from the definition, float64, one row at a time. a, b: (N, D) float64 leaves."""
    x = torch.cat([a, b], dim=0)  # (2N, D)
    n2 = x.shape[0]
    n = n2 // 2
    sq = (x * x).sum(dim=1)  # (2N,)
    big = sq > EPS * EPS
    # norm = max(||x||, eps), written so that a zero row has a finite (zero) derivative through it
    norm = torch.where(big, torch.sqrt(torch.where(big, sq, torch.ones_like(sq))), torch.full_like(sq, EPS))
    z = x / norm[:, None]
    losses = []
    for i in range(n2):
        logits = (z @ z[i]) / temperature  # (2N,) logits of row i
        others = torch.cat([logits[:i], logits[i + 1 :]])  # j != i
        m = others.max().detach()
        lse = m + torch.log(torch.exp(others - m).sum())
        losses.append(lse - logits[(i + n) % n2])
    losses = torch.stack(losses)
    if reduction == "mean":
        return losses.sum() / n2
    if reduction == "sum":
        return losses.sum()
    return losses


def rel_err(x, ref, floor=1e-6):
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return ((x - ref).norm() / max(ref.norm().item(), floor)).item()


def make_inputs(n, d, dtype, seed, *, scale_rows=True, zero_row=False, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    # positives correlate (cosine ~0.45): losses of order 1, not vanishing ones whose relative error
    # would only measure fp32 cancellation in lse - positive
    b = a + 2.0 * torch.randn(n, d, generator=g, dtype=torch.float64)
    if scale_rows:  # norms from 1e-3 to 1e3
        a = a * 10 ** (6 * torch.rand(n, 1, generator=g, dtype=torch.float64) - 3)
        b = b * 10 ** (6 * torch.rand(n, 1, generator=g, dtype=torch.float64) - 3)
    if zero_row:
        b[n // 2] = 0.0
    return a.to(dtype).to(device), b.to(dtype).to(device)


def loss_and_grads(fn, a, b, grad_out):
    a = a.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    loss = fn(a, b)
    loss.backward(grad_out.to(loss.device) if grad_out is not None else None)
    return loss.detach(), a.grad, b.grad


def check_against_definition(backend, n, d, dtype, reduction, seed, *, zero_row=False, config=None,
                             temperature=None):
    errors = definition_errors(backend, n, d, dtype, reduction, seed, zero_row=zero_row, config=config,
                               temperature=temperature)
    for what, err in errors.items():
        assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g}"


def definition_errors(backend, n, d, dtype, reduction, seed, *, zero_row=False, config=None, temperature=None):
    """Relative errors of loss and both gradients of `backend` against `nt_xent_f64` (at a random
    temperature in [0.05, 1) unless one is given)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    drawn = float(0.05 + 0.95 * torch.rand((), generator=g))
    temperature = drawn if temperature is None else temperature
    a, b = make_inputs(n, d, dtype, seed, zero_row=zero_row)
    grad_out = torch.randn(2 * n, generator=g, dtype=torch.float64) if reduction == "none" else None

    ref_loss, ref_ga, ref_gb = loss_and_grads(
        lambda x, y: nt_xent_f64(x, y, temperature, reduction),
        a.double().cpu(), b.double().cpu(), grad_out,
    )
    if config is None:
        fn = lambda x, y: info_nce(x, y, temperature, reduction, backend=backend)  # noqa: E731
    else:
        fn = lambda x, y: info_nce_triton(x, y, temperature, reduction, config=config)  # noqa: E731
    loss, ga, gb = loss_and_grads(fn, a, b, grad_out.float() if grad_out is not None else None)

    assert loss.dtype == torch.float32
    assert loss.shape == ((2 * n,) if reduction == "none" else ())
    assert ga.dtype == dtype and gb.dtype == dtype
    for t in (loss, ga, gb):
        assert torch.isfinite(t).all(), "non-finite loss or gradient"
    loss_floor, grad_floor = error_floors(a, b, temperature, reduction, grad_out)
    return {
        "loss": rel_err(loss, ref_loss, loss_floor),
        "grad a": rel_err(ga, ref_ga, grad_floor),
        "grad b": rel_err(gb, ref_gb, grad_floor),
    }


def error_floors(a, b, temperature, reduction, grad_out):
    """Smallest denominators of the relative errors. When the positive dominates a row by many logits,
    its loss and gradients vanish (N = 1: exactly zero) while fp32 rounding of the logits does not, so
    relative errors would measure cancellation, not the kernel. Rows are judged against the size they
    would have with an order-1 loss: 1e-2 per row for losses, 1e-2 |w_i| / (T ||x_i||) for gradients
    (all-zero rows left out)."""
    n2 = 2 * a.shape[0]
    x = torch.cat([a, b]).double().cpu()
    norms = x.norm(dim=1)
    if reduction == "none":
        w = grad_out.double().abs()
    else:
        w = torch.full((n2,), 1.0 / n2 if reduction == "mean" else 1.0, dtype=torch.float64)
    typical = torch.where(norms > 0, w / (temperature * norms.clamp_min(1e-300)), torch.zeros_like(norms))
    loss_floor = 1e-2 * (math.sqrt(n2) if reduction == "none" else (1.0 if reduction == "mean" else n2))
    return loss_floor, 1e-2 * typical.norm().item() / math.sqrt(2)


NS = (1, 2, 3, 17, 70)
DS = (8, 33, 130)
REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float32, torch.bfloat16)
# Every (N, D, dtype) once, the reduction cycling, an all-zero row in every fourth case.
CASES = [
    (n, d, dtype, REDUCTIONS[i % 3], i % 4 == 3 and n > 1)
    for i, (n, d, dtype) in enumerate((n, d, dt) for n in NS for d in DS for dt in DTYPES)
]


def _case_id(case):
    n, d, dtype, reduction, zero = case
    return f"N{n}-D{d}-{str(dtype).split('.')[-1]}-{reduction}{'-zero_row' if zero else ''}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_torch_backend_matches_definition(case):
    n, d, dtype, reduction, zero = case
    check_against_definition("torch", n, d, dtype, reduction, seed=CASES.index(case), zero_row=zero)


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_backend_matches_definition(case):
    n, d, dtype, reduction, zero = case
    check_against_definition("triton", n, d, dtype, reduction, seed=CASES.index(case), zero_row=zero)


@needs_triton
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triton_all_reductions_fp32_odd_shape(reduction):
    check_against_definition("triton", 17, 33, torch.float32, reduction, seed=500 + REDUCTIONS.index(reduction))


@needs_triton
@pytest.mark.parametrize(
    "fused_norm,big", [(True, None), (False, None), (False, "stripes"), (False, "fused")],
    ids=["tiny-fused", "tiny-normkernel", "large", "large-fused"]
)
def test_triton_block_configs(fused_norm, big):
    """Force many ragged blocks (16-wide tiles: several row, column, D and gradient-column blocks), the
    separate norm kernel, and the large-problem configuration: its backward through stripes (the default for
    16-bit inputs) and its fused backward, block sizes clamped to the shape."""
    if big:
        config = pick_config(1 << 20, 1024, torch.float16, stripes=big == "stripes")  # the large-problem entry
        assert bool(config.stripe_rows) == (big == "stripes")
        n, d = 70, 130
    else:
        config = KernelConfig(16, 16, 16, 4, 2, fused_norm, 16, 16, 16, 16, 4, 2)
        n, d = 23, 37
    for i, dtype in enumerate((torch.float32, torch.bfloat16)):
        check_against_definition("triton", n, d, dtype, REDUCTIONS[i + fused_norm], seed=600 + i, config=config)


@needs_triton
@pytest.mark.parametrize("chunks,d", [(2, 37), (3, 37), (4, 70), (3, 130)])
def test_triton_backward_chunks_per_program(chunks, d):
    """Several chunks of gradient columns per backward program (one logit tile serves them all): ragged D,
    chunks partly or wholly past D (D=37 with 2 x 16 columns: the second program's second chunk is empty)."""
    config = KernelConfig(16, 16, 16, 4, 2, False, 16, 16, 16, 16, 4, 2, chunks)
    for i, (dtype, reduction) in enumerate(((torch.float32, "none"), (torch.bfloat16, "mean"))):
        check_against_definition("triton", 19, d, dtype, reduction, seed=640 + 10 * chunks + i, config=config)


def test_backward_chunks_out_of_range():
    if _TRITON_ERR is not None:
        pytest.skip(f"triton unavailable: {_TRITON_ERR}")
    for chunks in (0, 5):
        with pytest.raises(MirrorfastError, match="bwd_chunks must be 1 to 4"):
            KernelConfig(16, 16, 16, 4, 2, False, 16, 16, 16, 16, 4, 2, chunks)
    with pytest.raises(MirrorfastError, match="fp32_dot must be"):
        KernelConfig(16, 16, 16, 4, 2, False, 16, 16, 16, 16, 4, 2, fp32_dot="tf32")


@needs_triton
def test_triton_fp32_tf32x3_dots():
    """fp32 inputs through three-tf32 dots still meet the fp32 tolerance (1e-4). The interpreter computes
    every dot in fp32, so here this checks the plumbing; compiled on a GPU it checks the precision."""
    from mirrorfast.kernels.infonce_triton import _dot_precision

    config = KernelConfig(16, 16, 16, 4, 2, False, 16, 16, 16, 16, 4, 2, 2, fp32_dot="tf32x3")
    assert _dot_precision(torch.float32, config) == "tf32x3"  # what both kernels are launched with
    assert _dot_precision(torch.bfloat16, config) == "tf32"  # (ignored by 16-bit dots)
    check_against_definition("triton", 19, 37, torch.float32, "mean", seed=660, config=config)


@needs_triton
@pytest.mark.parametrize("n,d,dtype,chunks", [(5, 4096, torch.bfloat16, 1), (520, 130, torch.float16, 2)],
                         ids=["D4096", "N520"])
def test_triton_large_d_and_the_large_problem_branch(n, d, dtype, chunks):
    """D = 4096 (16 gradient-column programs per row block, a 32-step Gram loop) and 2N = 1040 > 1024,
    where pick_config takes its large-problem branch for real (not forced as in test_triton_block_configs),
    with several gradient-column chunks per backward program (the second one ragged) and, there, the backward's
    rinv folded into its gradient tile (the large 16-bit default since the H100 sweep of 2026-11-27). N is kept
    just past the branch: the interpreter's time grows like N^2."""
    cfg = pick_config(2 * n, d, dtype)
    assert (cfg.bwd_chunks, cfg.bwd_fold) == (chunks, 2 * n > 1024)  # the configuration this case is meant to cover
    check_against_definition("triton", n, d, dtype, "mean", seed=650 + n)


def _thinned_on_gpu(cases: list) -> list:
    """All cases under the interpreter; every other one compiled on a GPU, where each case compiles kernels of
    its own (the GPU plan caps its test part's time) and info_nce_table.py checks the same variants compiled
    at real sizes against fp64."""
    return cases if DEVICE.type == "cpu" else cases[::2]


# The backward with rinv folded into its gradient tile (KernelConfig.bwd_fold): every dtype, ragged blocks,
# 1 and 3 gradient-column chunks per program, norms over six decades (make_inputs), all-zero rows.
FOLD_CASES = [
    (n, d, dtype, chunks, REDUCTIONS[i % 3], i % 2 == 1 and n > 1 and dtype != torch.float16)
    for i, (n, d, dtype, chunks) in enumerate(
        (n, d, dt, c) for n, d in ((1, 8), (3, 33), (19, 37), (40, 70)) for dt in (torch.float32, torch.bfloat16,
                                                                                   torch.float16) for c in (1, 3))
]


@needs_triton
@pytest.mark.parametrize("case", _thinned_on_gpu(FOLD_CASES), ids=lambda c: f"N{c[0]}-D{c[1]}-{str(c[2])[6:]}-x{c[3]}-{c[4]}"
                                                           f"{'-zero_row' if c[5] else ''}")
def test_triton_folded_backward_matches_definition(case):
    n, d, dtype, chunks, reduction, zero = case
    config = KernelConfig(16, 16, 16, 4, 2, False, 16, 16, 16, 16, 4, 2, chunks, bwd_fold=True)
    check_against_definition("triton", n, d, dtype, reduction, seed=1700 + FOLD_CASES.index(case), zero_row=zero,
                             config=config)


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the zero row's own inf, expected
def test_triton_folded_backward_fp16_zero_row():
    """fp16 with an all-zero row: that row's own gradient is dz / eps, beyond fp16 (inf, as the PyTorch
    reference gives too), but it must not reach the other rows: the folded fp16 tile clamps its factor
    (rinv = 1/eps) instead of overflowing, so every other row matches the definition."""
    n, d = 19, 37
    a, b = make_inputs(n, d, torch.float16, seed=1800, zero_row=True)
    config = KernelConfig(16, 16, 16, 4, 2, False, 16, 16, 16, 16, 4, 2, 3, bwd_fold=True)
    loss, ga, gb = loss_and_grads(lambda x, y: info_nce_triton(x, y, 0.1, "mean", config=config), a, b, None)
    ref_loss, ref_ga, ref_gb = loss_and_grads(lambda x, y: nt_xent_f64(x, y, 0.1, "mean"),
                                              a.double().cpu(), b.double().cpu(), None)
    assert torch.isfinite(loss) and rel_err(loss, ref_loss) <= TOL[torch.float16]
    keep = torch.arange(n) != n // 2  # make_inputs zeroes b[n // 2]
    assert torch.isfinite(ga).all() and torch.isfinite(gb[keep]).all()
    assert rel_err(ga, ref_ga) <= TOL[torch.float16]
    assert rel_err(gb[keep], ref_gb[keep]) <= TOL[torch.float16]


@needs_triton
def test_triton_folded_backward_deterministic():
    n, d = (40, 70) if DEVICE.type == "cuda" else (23, 37)
    a, b = make_inputs(n, d, torch.float16, seed=1900)
    g = torch.randn(2 * n)
    config = KernelConfig(16, 16, 16, 4, 2, False, 16, 16, 16, 16, 4, 2, 3, bwd_fold=True)
    fn = lambda x, y: info_nce_triton(x, y, 0.07, "none", config=config)  # noqa: E731
    runs = [loss_and_grads(fn, a, b, g) for _ in range(2)]
    for first, second in zip(runs[0], runs[1]):
        assert torch.equal(first, second)


def interpreter_gram_is_symmetric() -> bool:
    """Whether the Triton interpreter's tl.dot (numpy's float32 matmul) gives z_i . z_j and z_j . z_i the same
    bits on this CPU, as a GPU's fp32 dot does (FMAs in k order). OpenBLAS's AVX2 (Haswell) kernels do not:
    (A @ B.T)[i, j] != (B @ A.T)[j, i] in about a third of a 16 x 16 tile's elements (AMD EPYC, 2026-11-27)."""
    a, b = np.random.default_rng(0).standard_normal((2, 16, 16), dtype=np.float32)
    return np.array_equal(a @ b.T, (b @ a.T).T)


@needs_triton
# The interpreter evaluates exp2 on masked-out lanes too (the diagonal's logit exceeds lse2 by ~1/T): inf there,
# then discarded by tl.where, as on a GPU.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("temperature", (1e-4, 1e-6, 1e-9))
@pytest.mark.parametrize("split", (1, 3), ids=("unsplit", "split"))
def test_triton_fused_norms_at_tiny_temperatures(split, temperature):
    """With norms fused into the forward, a vector's norm is summed in two orders (as a row of its own
    tile, as a column of the others'); the backward must recompute each logit with the very norms the
    forward used, or exp2(s2 - lse2) is off by a factor that grows like 1/T (at T=1e-9: inf, then NaN).
    At T=1e-9 one ulp of a dot product moves a logit by ~60, so the backward's tiles must also repeat the
    forward's dot products to the bit, in either operand order: true of a GPU's fp32 dot, not of every CPU's
    BLAS under the interpreter (with a symmetric dot there the errors are 6e-8). Compiled, the kernels must
    also not contract mul + add into fma (H100, 2026-11-27: all six cases failed with contraction, errors up
    to 1.8e-3 at T=1e-4; at most 1.2e-7 at every T without; tests/test_kernel_registers.py checks the PTX)."""
    if temperature == 1e-9 and DEVICE.type == "cpu" and not interpreter_gram_is_symmetric():
        pytest.skip("T=1e-9 needs a bit-symmetric fp32 dot; this CPU's numpy matmul (the interpreter's tl.dot) "
                    "is not: (A @ B.T)[i, j] != (B @ A.T)[j, i]")
    config = KernelConfig(16, 16, 16, 4, 2, True, 16, 16, 16, 16, 4, 2, fwd_split=split, bwd_split=split)
    for i, (n, d) in enumerate(((9, 20), (23, 37))):
        check_against_definition("triton", n, d, torch.float32, REDUCTIONS[i], seed=700 + i, config=config,
                                 temperature=temperature)
    assert pick_config(2 * 9, 20, torch.float32).fused_norm  # the fp32 small-problem default is covered


# Split column blocks (KernelConfig.fwd_split / bwd_split: more programs for small problems, partial results
# merged by one more launch each): every dtype and reduction, 1 and 3 gradient-column chunks, folded or not,
# norms fused or not, splits that divide the column blocks, that do not, and more splits than blocks (empty
# splits).
SPLIT_CASES = [
    (n, d, dtype, REDUCTIONS[i % 3], fwd_split, bwd_split, 1 + 2 * (i % 2), i % 4 == 3, i % 5 == 2 and n > 1,
     i % 4 < 2)
    for i, (n, d, dtype, (fwd_split, bwd_split)) in enumerate(
        (n, d, dt, sp) for n, d in ((1, 8), (19, 37), (25, 70)) for dt in (torch.float32, torch.bfloat16, torch.float16)
        for sp in ((2, 3), (7, 2), (4, 9)))
]


def _split_id(case):
    n, d, dtype, reduction, fs, bs, chunks, fold, zero, fused_norm = case
    return (f"N{n}-D{d}-{str(dtype)[6:]}-{reduction}-split{fs}x{bs}-x{chunks}{'-fold' if fold else ''}"
            f"{'-zero_row' if zero else ''}{'-fused_norm' if fused_norm else ''}")


@needs_triton
@pytest.mark.parametrize("case", _thinned_on_gpu(SPLIT_CASES), ids=_split_id)
def test_triton_split_matches_definition(case):
    n, d, dtype, reduction, fwd_split, bwd_split, chunks, fold, zero, fused_norm = case
    config = KernelConfig(16, 16, 16, 4, 2, fused_norm, 16, 16, 16, 16, 4, 2, chunks, bwd_fold=fold,
                          fwd_split=fwd_split, bwd_split=bwd_split)
    check_against_definition("triton", n, d, dtype, reduction, seed=2100 + SPLIT_CASES.index(case),
                             zero_row=zero and dtype != torch.float16, config=config)


@needs_triton
def test_triton_split_equals_unsplit_forward_and_is_deterministic():
    """The split forward merges the same per-row online logsumexps: its loss matches the unsplit kernel's to
    fp32 rounding, and two runs of the split backward (partial sums added in a fixed order) are bit-identical."""
    a, b = make_inputs(21, 40, torch.bfloat16, seed=2200)
    g = torch.randn(42)
    plain = KernelConfig(16, 16, 16, 4, 2, False, 16, 16, 16, 16, 4, 2, 2)
    split = dataclasses.replace(plain, fwd_split=3, bwd_split=4)
    runs = [loss_and_grads(lambda x, y, c=c: info_nce_triton(x, y, 0.07, "none", config=c), a, b, g)
            for c in (plain, split, split)]
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-6, atol=1e-6)
    for first, second in zip(runs[1], runs[2]):
        assert torch.equal(first, second)


def test_split_out_of_range():
    with pytest.raises(MirrorfastError, match="fwd_split and bwd_split must be 1 to 64"):
        KernelConfig(16, 16, 16, 4, 2, False, 16, 16, 16, 16, 4, 2, fwd_split=0)


# The backward through stripes (KernelConfig.stripe_rows: the folded (G + G^T) tiles of a stripe of rows
# written to a workspace, then multiplied by x_J in a separate product): every dtype and reduction, stripes
# and column blocks that divide N, that do not (ragged last ones), and that exceed it (one of each), norms
# fused or not in the forward, all-zero rows.
STRIPE_CASES = [
    (n, d, dtype, REDUCTIONS[i % 3], stripes, i % 2 == 1, i % 4 == 3 and n > 1 and dtype != torch.float16)
    for i, (n, d, dtype, stripes) in enumerate(
        (n, d, dt, sp) for n, d in ((1, 8), (19, 37), (40, 70)) for dt, sp in (
            (torch.float32, (16, 32)), (torch.bfloat16, (20, 48)), (torch.float16, (64, 16))))
]


def stripe_config(rows: int, cols: int, fused_norm: bool = False) -> "KernelConfig":
    return KernelConfig(16, 16, 16, 4, 2, fused_norm, 16, 16, 16, 16, 4, 2, bwd_fold=True, stripe_rows=rows,
                        stripe_cols=cols, mm_m=16, mm_dc=16, mm_k=16, mm_warps=4, mm_stages=2)


@needs_triton
@pytest.mark.parametrize("case", _thinned_on_gpu(STRIPE_CASES),
                         ids=lambda c: f"N{c[0]}-D{c[1]}-{str(c[2])[6:]}-{c[3]}-stripes{c[4][0]}x{c[4][1]}"
                                       f"{'-fused_norm' if c[5] else ''}{'-zero_row' if c[6] else ''}")
def test_triton_stripes_backward_matches_definition(case):
    n, d, dtype, reduction, (rows, cols), fused_norm, zero = case
    check_against_definition("triton", n, d, dtype, reduction, seed=2300 + STRIPE_CASES.index(case), zero_row=zero,
                             config=stripe_config(rows, cols, fused_norm))


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the zero row's own inf, expected
def test_triton_stripes_backward_fp16_zero_row_and_deterministic():
    """fp16 with an all-zero row (as test_triton_folded_backward_fp16_zero_row: its factor is clamped, so the
    other rows stay exact), and two runs bit-identical (column blocks summed in launch order)."""
    n, d = 19, 37
    a, b = make_inputs(n, d, torch.float16, seed=2400, zero_row=True)
    config = stripe_config(16, 16)
    fn = lambda x, y: info_nce_triton(x, y, 0.1, "mean", config=config)  # noqa: E731
    (loss, ga, gb), again = (loss_and_grads(fn, a, b, None) for _ in range(2))
    ref_loss, ref_ga, ref_gb = loss_and_grads(lambda x, y: nt_xent_f64(x, y, 0.1, "mean"),
                                              a.double().cpu(), b.double().cpu(), None)
    keep = torch.arange(n) != n // 2  # make_inputs zeroes b[n // 2]
    assert rel_err(loss, ref_loss) <= TOL[torch.float16]
    assert torch.isfinite(ga).all() and torch.isfinite(gb[keep]).all()
    assert rel_err(ga, ref_ga) <= TOL[torch.float16]
    assert rel_err(gb[keep], ref_gb[keep]) <= TOL[torch.float16]
    for first, second in zip((loss, ga, gb), again):
        assert torch.equal(first, second)


def test_stripes_config_errors():
    with pytest.raises(MirrorfastError, match="set bwd_fold=True and bwd_split=1"):
        KernelConfig(16, 16, 16, 4, 2, False, 16, 16, 16, 16, 4, 2, stripe_rows=16)
    with pytest.raises(MirrorfastError, match="set bwd_fold=True and bwd_split=1"):
        KernelConfig(16, 16, 16, 4, 2, False, 16, 16, 16, 16, 4, 2, bwd_fold=True, bwd_split=2, stripe_rows=16)
    with pytest.raises(MirrorfastError, match="stripe_rows must be >= 0 and stripe_cols >= 1"):
        KernelConfig(16, 16, 16, 4, 2, False, 16, 16, 16, 16, 4, 2, bwd_fold=True, stripe_rows=16, stripe_cols=0)


def _compiled_kernels() -> int:
    from mirrorfast.kernels import infonce_triton as nce
    from mirrorfast.warmup import compiled_kernels

    return len(compiled_kernels(nce._row_norm_kernel, nce._infonce_fwd_kernel, nce._infonce_merge_kernel,
                                nce._infonce_bwd_kernel, nce._infonce_bwd_finalize_kernel))


@needs_triton
def test_warm_up_runs_forward_and_backward():
    """warm_up launches the loss's kernels on scratch inputs without drawing random numbers (it runs during
    a seeded run's setup: it must not shift that run's dropout masks)."""
    from mirrorfast.kernels.infonce_triton import warm_up

    rng_state = torch.cuda.get_rng_state if DEVICE.type == "cuda" else torch.get_rng_state
    before = rng_state()
    for dtype in (torch.bfloat16, torch.float32):
        warm_up([3, 1, 3], 8, dtype, DEVICE)
    assert torch.equal(rng_state(), before), "warm_up drew random numbers"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: Triton's JIT compiles only there")
@pytest.mark.parametrize("n,d,dtype", [(200, 768, torch.bfloat16), (200, 384, torch.float16), (37, 768, torch.bfloat16),
                                       (5, 64, torch.float32)])
def test_warm_up_compiles_what_a_training_step_launches(n, d, dtype):
    """After warm_up for (N, D, dtype), the loss as the training step calls it (views of one (2N, D) tensor,
    a 0-dim fp32 grad_output: GradScaler's scale or 1) compiles nothing more."""
    from mirrorfast.kernels.infonce_triton import warm_up

    warm_up([n], d, dtype, DEVICE)
    compiled = _compiled_kernels()
    assert compiled >= 2  # forward and backward (and the norm kernel where it is separate)
    views = torch.randn(2 * n, d, device=DEVICE).to(dtype).requires_grad_(True)
    loss = info_nce(views[:n], views[n:], 0.04, backend="triton")
    (loss * 65536.0).backward()
    torch.cuda.synchronize()
    assert _compiled_kernels() == compiled, "the training-shaped call compiled a kernel warm_up did not"


@needs_triton
def test_triton_fp16():
    check_against_definition("triton", 17, 33, torch.float16, "mean", seed=700)


@needs_triton
def test_triton_all_zero_row_is_finite():
    a, b = make_inputs(5, 16, torch.float32, seed=800, scale_rows=False)
    a[2] = 0.0
    for backend in ("torch", "triton"):
        loss, ga, gb = loss_and_grads(lambda x, y: info_nce(x, y, 0.05, "none", backend=backend), a, b, torch.ones(10))
        assert torch.isfinite(loss).all() and torch.isfinite(ga).all() and torch.isfinite(gb).all()
    # the zero row's logits are all 0: its loss is log(2N - 1)
    assert math.isclose(loss[2].item(), math.log(9), rel_tol=1e-5)


@needs_triton
def test_triton_second_derivative_is_an_error_not_zero():
    """The kernels' gradients carry no graph of their own: asked for a second derivative (a gradient
    penalty), the Triton backend must refuse, not silently drop those terms."""
    refusal = "no second derivative: differentiate twice with backend='torch'"
    a, b = make_inputs(5, 12, torch.float32, seed=42, device=DEVICE)
    a.requires_grad_(True)
    (ga,) = torch.autograd.grad(info_nce(a, b, 0.1, backend="triton"), a, create_graph=True)
    with pytest.raises(RuntimeError, match=refusal):
        ga.square().sum().backward()
    (ga,) = torch.autograd.grad(info_nce(a, b, 0.1, backend="triton"), a, create_graph=True)
    with pytest.raises(RuntimeError, match=refusal):  # autograd.grad, as torch.autograd.functional.hvp calls it
        torch.autograd.grad(ga.square().sum(), a, allow_unused=True)
    # through a layer in front of the loss: a gradient penalty on its weight
    x, w = torch.randn(10, 12, device=DEVICE), torch.randn(12, 12, device=DEVICE, requires_grad=True)
    e = torch.tanh(x @ w)
    (gw,) = torch.autograd.grad(info_nce(e[:5], e[5:], 0.1, backend="triton"), w, create_graph=True)
    with pytest.raises(RuntimeError, match=refusal):
        torch.autograd.grad(gw.square().sum(), w)
    (ga,) = torch.autograd.grad(info_nce(a, b, 0.1, backend="torch"), a, create_graph=True)
    ga.square().sum().backward()  # the reference differentiates twice
    assert a.grad is not None and a.grad.abs().sum() > 0


@needs_triton
def test_triton_deterministic():
    n, d = (70, 130) if DEVICE.type == "cuda" else (23, 37)  # the interpreter is deterministic anyway: small
    a, b = make_inputs(n, d, torch.float32, seed=900)
    g = torch.randn(2 * n)
    runs = [loss_and_grads(lambda x, y: info_nce(x, y, 0.07, "none", backend="triton"), a, b, g) for _ in range(2)]
    for first, second in zip(runs[0], runs[1]):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_non_contiguous_inputs(backend):
    a, b = make_inputs(17, 33, torch.float32, seed=1000)
    fn = lambda x, y: info_nce(x, y, 0.1, "mean", backend=backend)  # noqa: E731
    expected = loss_and_grads(fn, a, b, None)
    a_t = a.T.contiguous().T  # column-major: stride (1, N)
    wide = torch.zeros(17, 50, device=DEVICE)
    wide[:, 5:38] = b
    b_rows = wide[:, 5:38]  # row stride 50, unit column stride
    assert not a_t.is_contiguous() and not b_rows.is_contiguous()
    got = loss_and_grads(fn, a_t, b_rows, None)
    tall = torch.zeros(34, 33, device=DEVICE)
    tall[::2] = a
    got2 = loss_and_grads(fn, tall[::2], b, None)  # row stride 2D
    for e, x, y in zip(expected, got, got2):
        assert torch.equal(x, e) and torch.equal(y, e)  # the same numbers in other strides: the same bits


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_mixed_input_dtypes(backend):
    """a in bf16, b in fp32: computed in the promoted dtype (fp32) against the float64 definition, and
    each gradient comes back in its own input's dtype."""
    a, b = make_inputs(19, 37, torch.float32, seed=1200)
    a = a.to(torch.bfloat16)
    ref = loss_and_grads(lambda x, y: nt_xent_f64(x, y, 0.1, "mean"), a.double().cpu(), b.double().cpu(), None)
    loss, ga, gb = loss_and_grads(lambda x, y: info_nce(x, y, 0.1, "mean", backend=backend), a, b, None)
    assert loss.dtype == torch.float32 and ga.dtype == torch.bfloat16 and gb.dtype == torch.float32
    assert rel_err(loss, ref[0]) <= TOL[torch.float32] and rel_err(gb, ref[2]) <= TOL[torch.float32]
    assert rel_err(ga, ref[1]) <= TOL[torch.bfloat16]  # the fp32 gradient, rounded to bf16


def test_reference_promotes_both_inputs():
    """fp64 in either argument: the reference computes (and returns) fp64, whatever the order."""
    a, b = make_inputs(5, 12, torch.float64, seed=1250, device="cpu")
    a, b = a.float().double(), b.float().double()  # exact in fp32 too
    want = nt_xent_f64(a, b, 0.1, "mean")
    for x, y in ((a, b.float()), (a.float(), b)):
        loss = info_nce(x, y, 0.1, backend="torch")
        assert loss.dtype == torch.float64 and rel_err(loss, want) < 1e-12


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_autocast(backend):
    a, b = make_inputs(17, 33, torch.float32, seed=1100, scale_rows=False)
    def under_autocast(x, y):  # the forward in an autocast region, the backward after it (as in training)
        with torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16):
            return info_nce(x, y, 0.1, "mean", backend=backend)

    plain = loss_and_grads(lambda x, y: info_nce(x, y, 0.1, "mean", backend=backend), a, b, None)
    auto = loss_and_grads(under_autocast, a, b, None)
    assert auto[0].dtype == torch.float32
    for p, q in zip(plain, auto):  # both backends compute in fp32 whatever the autocast: the same bits
        assert torch.equal(q, p)


def test_env_override_refuses_a_typo(monkeypatch):
    monkeypatch.setenv("MIRRORFAST_KERNELS", "Torch ")  # case and spaces are forgiven
    assert resolve_backend("triton", DEVICE) == "torch"  # without the override: the kernel (or an error)
    monkeypatch.setenv("MIRRORFAST_KERNELS", "reference")
    with pytest.raises(MirrorfastError, match="MIRRORFAST_KERNELS must be torch .* or auto, got 'reference'"):
        resolve_backend("auto", DEVICE)


def test_env_forces_torch(monkeypatch):
    monkeypatch.setenv("MIRRORFAST_KERNELS", "torch")
    assert resolve_backend("triton", DEVICE) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    import mirrorfast.kernels as kernels_pkg

    def boom(*args, **kwargs):  # pragma: no cover - must not be reached
        raise AssertionError("triton path used despite MIRRORFAST_KERNELS=torch")

    a, b = make_inputs(3, 8, torch.float32, seed=1200)
    if _TRITON_ERR is None:
        import mirrorfast.kernels.infonce_triton as mod

        monkeypatch.setattr(mod, "fused_info_nce", boom)  # what info_nce calls for the kernel
        monkeypatch.delenv("MIRRORFAST_KERNELS")
        with pytest.raises(AssertionError, match="triton path used"):  # the guard is where the kernel is called
            kernels_pkg.info_nce(a, b, 0.5, "sum", backend="triton")
        monkeypatch.setenv("MIRRORFAST_KERNELS", "torch")
    out = kernels_pkg.info_nce(a, b, 0.5, "sum", backend="triton")
    assert torch.equal(out, info_nce_reference(a, b, 0.5, "sum"))


def test_auto_uses_the_kernel_from_ampere_on(monkeypatch):
    """backend="auto" on CUDA tensors: the kernel on compute capability 8.0+ (tested compiled on Hopper),
    the reference on older GPUs (a T4 is 7.5); explicit "triton" still forces the kernel."""
    if _TRITON_ERR is not None:
        pytest.skip(f"triton unavailable: {_TRITON_ERR}")
    monkeypatch.delenv("MIRRORFAST_KERNELS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda")
    for capability, expected in (((7, 5), "torch"), ((8, 0), "triton"), ((9, 0), "triton")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_backend("auto", cuda) == expected, capability
        assert resolve_backend("auto", "cuda", torch.bfloat16) == expected, capability  # a device name too
        assert resolve_backend("auto", cuda, torch.float64) == "torch"  # exact fp64: the kernel computes in fp32
        assert resolve_backend("triton", cuda) == "triton"


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("MIRRORFAST_KERNELS", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    a, b = make_inputs(3, 8, torch.float32, seed=1300, device="cpu")
    assert torch.equal(info_nce(a, b, 0.3, "none"), info_nce_reference(a, b, 0.3, "none"))
    assert torch.equal(info_nce(a, b, np.float32(0.25), "none"), info_nce_reference(a, b, 0.25, "none"))  # numpy


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("MIRRORFAST_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a, b = make_inputs(3, 8, torch.float32, seed=1400, device="cpu")
    with pytest.raises(MirrorfastError, match="TRITON_INTERPRET=1"):
        info_nce(a, b, backend="triton")


@needs_triton
def test_triton_refuses_other_devices_even_under_the_interpreter():
    a = torch.empty(3, 8, device="meta")
    with pytest.raises(MirrorfastError, match="runs on CUDA tensors .* not on meta"):
        info_nce(a, a, backend="triton")


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((torch.randn(3, 4), torch.randn(3, 5)), {}, r"same shape, got \(3, 4\) and \(3, 5\)"),
        ((torch.randn(0, 4), torch.randn(0, 4)), {}, r"at least one pair \(N >= 1\), got N=0"),
        ((torch.ones(3, 4, dtype=torch.int64), torch.ones(3, 4, dtype=torch.int64)), {},
         "must be float16, bfloat16, float32 or float64, got torch.int64"),
        ((torch.ones(3, 4).to(torch.float8_e4m3fn), torch.ones(3, 4)), {}, "got torch.float8_e4m3fn and torch.float32"),
        ((torch.randn(3, 4), torch.randn(3, 4)), {"temperature": 0.0}, r"temperature must be a finite number > 0, got 0.0"),
        ((torch.randn(3, 4), torch.randn(3, 4)), {"temperature": -1.0}, r"temperature must be a finite number > 0"),
        ((torch.randn(3, 4), torch.randn(3, 4)), {"temperature": float("inf")}, r"finite number > 0, got inf"),
        ((torch.randn(3, 4), torch.randn(3, 4)), {"temperature": float("nan")}, r"finite number > 0, got nan"),
        ((torch.randn(3, 4), torch.randn(3, 4)), {"temperature": True}, r"finite number > 0, got True"),
        ((torch.randn(3, 4), torch.randn(3, 4)), {"temperature": torch.tensor(0.05, requires_grad=True)},
         r"temperature must be a Python number; a tensor \(a learned temperature\) is not supported"),
        ((torch.randn(3, 4), torch.randn(3, 4)), {"reduction": "avg"}, r"reduction must be one of .* got 'avg'"),
        ((torch.randn(3, 4), torch.randn(3, 4)), {"backend": "cuda"}, r"backend must be one of .* got 'cuda'"),
        ((torch.randn(3), torch.randn(3)), {}, r"must be 2-D \(N, D\)"),
        ((torch.randn(3, 4).to_sparse(), torch.randn(3, 4)), {}, r"must be dense \(strided\) tensors, got torch.sparse_coo"),
    ],
    ids=["shape-mismatch", "n-zero", "integer-dtype", "float8", "temperature-zero", "temperature-negative", "temperature-inf", "temperature-nan", "temperature-bool",
         "temperature-tensor",
         "bad-reduction", "bad-backend", "not-2d", "sparse"],
)
@pytest.mark.parametrize("entry", ["info_nce", "info_nce_triton"])
def test_validation_errors(args, kwargs, match, entry):
    """info_nce's checks; info_nce_triton, which the README offers for kernel configurations, makes the same
    ones (unchecked, a reduction typo returned the per-row losses with a wrong backward, a wider b was cut)."""
    if entry == "info_nce":
        with pytest.raises(MirrorfastError, match=match):
            info_nce(*args, **kwargs)
        return
    if _TRITON_ERR is not None:
        pytest.skip(_TRITON_ERR)
    if "backend" in kwargs:
        pytest.skip("info_nce_triton has no backend")
    with pytest.raises(MirrorfastError, match=match):
        info_nce_triton(*args, kwargs.get("temperature", 0.04), kwargs.get("reduction", "mean"))


@pytest.mark.parametrize("change,match", [
    ({"fwd_n": 0}, "fwd_n must be a power of two >= 16, got 0"),  # was a loss of -inf
    ({"fwd_m": 8}, "fwd_m must be a power of two >= 16, got 8"),
    ({"bwd_dc": 48}, "bwd_dc must be a power of two >= 16, got 48"),
    ({"mm_k": 0}, "mm_k must be a power of two >= 16, got 0"),
    ({"fwd_split": 2.5}, r"fwd_split must be an integer, got 2.5"),
    ({"fused_norm": 1}, r"fused_norm must be True or False, got 1"),
    ({"bwd_warps": 3}, r"bwd_warps must be 1, 2, 4, 8, 16 or 32, got 3"),
    ({"fwd_stages": 0}, r"fwd_stages must be >= 1, got 0"),
])
def test_kernel_config_refuses_what_the_kernels_cannot_take(change, match):
    if _TRITON_ERR is not None:
        pytest.skip(_TRITON_ERR)
    good = dict(fwd_m=16, fwd_n=16, fwd_d=16, fwd_warps=4, fwd_stages=2, fused_norm=False, bwd_m=16, bwd_n=16,
                bwd_d=16, bwd_dc=16, bwd_warps=4, bwd_stages=2)
    assert KernelConfig(**{**good, "fwd_m": np.int64(32)}).fwd_m == 32  # numpy integers are integers
    assert type(KernelConfig(**{**good, "fwd_m": np.int64(32)}).fwd_m) is int
    with pytest.raises(MirrorfastError, match=match):
        KernelConfig(**{**good, **change})


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_interpreter_asked_for_after_the_kernels_were_defined():
    """TRITON_INTERPRET=1 set after the kernels' module was imported: Triton had defined them for a GPU, and
    a CPU launch failed with Triton's own '0 active drivers'. One message saying what to do instead."""
    if _TRITON_ERR is not None:
        pytest.skip(_TRITON_ERR)
    script = (
        "import os, torch\n"
        "import mirrorfast.kernels.infonce_triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from mirrorfast.kernels import info_nce\n"
        "info_nce(torch.randn(3, 8), torch.randn(3, 8), backend='triton')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MIRRORFAST_KERNELS")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "MirrorfastError: info_nce: TRITON_INTERPRET=1 was set after mirrorfast's Triton kernels were imported" \
        in done.stderr, done.stderr[-2000:]


@needs_triton
def test_info_nce_triton_refuses_a_config_of_another_type():
    a, b = make_inputs(3, 8, torch.float32, seed=1410)
    with pytest.raises(MirrorfastError, match="config must be a KernelConfig, got dict"):
        info_nce_triton(a, b, 0.1, "mean", config={"fwd_m": 16})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA-graph capture")
@needs_triton
def test_cuda_graph_capture():  # pragma: no cover - GPU only
    a, b = make_inputs(200, 64, torch.float16, seed=1500, scale_rows=False)
    a.requires_grad_(True)
    b.requires_grad_(True)

    def step():
        loss = info_nce(a, b, 0.05, "mean", backend="triton")
        return (loss, *torch.autograd.grad(loss, (a, b)))

    from mirrorfast.graphs import capture, on_side_stream

    eager = on_side_stream(step)  # compiles the kernels outside the capture
    graph, static = capture(step)
    graph.replay()
    torch.cuda.synchronize()
    for e, s in zip(eager, static):
        assert torch.equal(e, s)

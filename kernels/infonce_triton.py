"""Fused Triton NT-Xent (InfoNCE): kernels, launch helpers, autograd.Function and `info_nce_triton`.

Definition (see `reference.py`): x = cat(a, b) (2N rows, a[i] and b[i] a positive pair),
z_i = x_i / max(||x_i||, eps), s_ij = z_i . z_j / T, loss_i = logsumexp_{j != i} s_ij - s_{i,p(i)} with
p(i) = (i + N) mod 2N. The 2N x 2N matrix s is never materialized: it is computed tile by tile.

Layout of the work
------------------
* Rows of x are read straight from `a` and `b` (no `torch.cat`). Row blocks never straddle the two:
  blocks [0, cdiv(N, BLOCK)) tile `a`, the next cdiv(N, BLOCK) tile `b` (`_block`), so every tile has one
  scalar base pointer, and its loads are provably contiguous: they vectorize and are pipelined.
  Rows may have any stride; the last dimension must be unit-stride (the wrapper makes it so).
* We never normalize into a buffer. A tile of logits is the raw Gram tile x_I x_J^T (`tl.dot`, fp32
  accumulation, inputs in their own dtype; fp32 inputs use input_precision="ieee" (or "tf32x3" if a
  KernelConfig asks), never plain tf32),
  rescaled by rinv_I rinv_J / T, with rinv = 1 / max(||x||, eps). Products of fp16/bf16 values are exact
  in fp32, so this is at least as accurate as normalizing first.
* Logits are handled in base 2 (s2 = s * log2(e)) so the softmax uses exp2.

Launches (forward + backward = 3 Triton launches + 1 torch reduction for "mean"/"sum"):
0. `_row_norm_kernel`, grid (2 cdiv(N, 64),): ||x_r|| for every row -> norm (2N,) fp32. (With
   `fused_norm` the forward sums the squares of the tiles its Gram loop loads anyway instead: no launch,
   no second pass over x, more arithmetic in its loop.)
1. forward `_infonce_fwd_kernel`, grid (2 cdiv(N, BLOCK_M),): each program owns BLOCK_M rows, loops over
   all 2 cdiv(N, BLOCK_N) column blocks (Gram tile over D in BLOCK_D steps) with an online (running max)
   logsumexp, and picks the positive logit on the way. Writes lse2 (2N,) and loss (2N,), fp32.
2. backward `_infonce_bwd_kernel`, grid (2 cdiv(N, BLOCK_M), cdiv(D, NUM_DC BLOCK_DC)): each program owns
   BLOCK_M rows and NUM_DC chunks of BLOCK_DC columns of the gradient (one register accumulator per
   chunk) and loops over all column blocks J, recomputing the logit tile from the saved lse. With G_ij = w_i (P_ij - [j = p(i)]) (w_i = d loss / d loss_i):
       dz_i = 1/T sum_j (G_ij + G_ji) z_j          (s is symmetric, so G_ji comes from the same tile)
       dx_i = rinv_i (dz_i - z_i (z_i . dz_i))      (no projection where the norm was clamped to eps)
   and z_i . dz_i = sum_j (G_ij + G_ji) s_ij is accumulated from the tiles, so a program never needs the
   whole of dz_i. The logit tiles are recomputed once per NUM_DC BLOCK_DC columns of D
   (cdiv(D, NUM_DC BLOCK_DC) times): the price of keeping the gradient accumulators in registers; more
   chunks per program mean fewer recomputes and more registers (a tuning choice, `KernelConfig.bwd_chunks`).
   The sum over j takes z_J = x_J rinv_J, normalized in registers per chunk (fp32, then 16-bit) — or, with
   `KernelConfig.bwd_fold`, rinv_J goes into the (G + G^T) tile and x_J enters the dot as loaded (fewer
   registers: sm_90a ptxas, N=16384 D=768 fp16, 352 -> 64 bytes spilled; H100: 26.2 vs 29.1 ms; the default for
   large 16-bit problems).
   Every gradient element is written by exactly one program: no atomics, bit-identical results run to
   run. No host synchronization anywhere (CUDA-graph capturable).
Small problems have few row blocks (N=200: 14 forward programs on a 132-multiprocessor GPU, each walking all
400 columns), so `KernelConfig.fwd_split` / `bwd_split` can split the column blocks of each row block over
several programs (grid dimension 1 of the forward, 2 of the backward), as split-K splits a reduction:
1b. forward splits write their online (max, sum, positive) per row; `_infonce_merge_kernel` (one program)
   merges them into lse2 and loss and reduces the loss ("mean"/"sum": no torch reduction launch).
2b. backward splits write their share of dz and of z . dz, fp32, to a (split, 2N, D) workspace;
   `_infonce_bwd_finalize_kernel` adds the shares in split order (bit-identical run to run) and projects.
Large 16-bit problems take the backward through stripes instead (`KernelConfig.stripe_rows`, pick_config's
default for them since an H200 timed it, 2026-11-27). The fused backward keeps its accumulators in registers, so at N=16384 D=768 it runs 512 row
blocks x 2 groups of gradient columns, each reading all of x for its logits: counted from the loops, ~100 GB
of loads and the Gram products done twice (3 products of the forward's size in all; the forward: ~20 GB).
Through stripes each logit is computed once (2 products in all) and the loads come to ~60 GB:
2c. `_infonce_bwd_weights_kernel`, grid (cdiv(R, BLOCK_M), cdiv(C, BLOCK_N)) per (stripe of R rows, block of
   C columns): the folded (G + G^T) tile (rinv_J multiplied in, as with `bwd_fold`) into an (R, C) workspace
   in x's dtype;
2d. `_infonce_bwd_stripe_mm_kernel`, grid (cdiv(R, BLOCK_M), cdiv(D, BLOCK_DC)): that workspace times x_J,
   added to the stripe's (R, D) fp32 sum in launch order (deterministic);
2e. `_infonce_bwd_stripe_finalize_kernel`, one launch per stripe: z_i . dz_i from the sum, the projection
   through the L2 normalization, dx in x's dtype.
Saved for backward: the inputs (kept alive by autograd anyway), norm (2N,) and lse2 (2N,) in fp32; with
`fused_norm` also the norms as the forward computed them for columns (2N,), which can differ from the rows'
in the last bit, and the backward recomputes every logit with the norms the forward used for it.
"""

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mirrorfast.errors import MirrorfastError, check_flag, check_integer
from mirrorfast.kernels.functional import check_triton_runs_on, first_derivative_only, validate_inputs

__all__ = ["info_nce_triton", "InfoNCEFunction", "KernelConfig", "pick_config", "warm_up"]
_NO_SECOND_DERIVATIVE = ("info_nce's Triton kernels have no second derivative: differentiate twice with "
                         "backend='torch'")

_EPS = 1e-12  # as F.normalize: z = x / max(||x||, eps)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# The backward's (G + G^T) tile enters a 16-bit tl.dot. It is divided by max|w| (so |entries| <= 2) and
# multiplied by this power of two, which keeps softmax probabilities far above fp16's subnormal range
# (P ~ 1/2N) while staying below its maximum (65504). The factor is undone exactly afterwards.
_G_SCALE = 8192.0


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _block(blk, N, a_ptr, b_ptr, stride_a, stride_b, BLOCK: tl.constexpr):
    # Row blocks never straddle a and b: blocks [0, cdiv(N, BLOCK)) tile a, the next as many tile b.
    # Returns the segment (0: a, 1: b), the (BLOCK,) row indices inside it, and its base pointer and row
    # stride. Selecting one scalar base pointer per block (not one per row) keeps the loads provably
    # contiguous and aligned, so they vectorize and Triton pipelines them (cp.async / TMA).
    nblk = tl.cdiv(N, BLOCK)
    seg = (blk >= nblk).to(tl.int32)
    local = (blk - seg * nblk) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    base = tl.where(seg == 1, b_ptr, a_ptr)
    stride = tl.where(seg == 1, stride_b, stride_a)
    return seg, local, base, stride


@triton.jit
def _split_range(split, n_blocks, NUM_SPLIT: tl.constexpr):
    # Column blocks [lo, hi) of split `split` out of NUM_SPLIT: contiguous ranges of equal length (the last
    # ones shorter or empty). NUM_SPLIT = 1: all of them.
    if NUM_SPLIT == 1:
        return 0, n_blocks
    per = tl.cdiv(n_blocks, NUM_SPLIT)
    lo = split * per
    return lo, tl.minimum(lo + per, n_blocks)


@triton.jit
def _dot(x, y, acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    # acc += x @ y with fp32 accumulation. DOT_UPCAST is set only under TRITON_INTERPRET=1, whose tl.dot
    # multiplies bf16 bit patterns as integers: x and y are already rounded to their dtype, so fp32 copies
    # give the same products (16-bit products are exact in fp32).
    if DOT_UPCAST:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(x, y, acc, input_precision=DOT_PRECISION)


@triton.jit
def _gram_tile(base_i, loc_i, stride_i, row_ok, base_j, loc_j, stride_j, col_ok, D,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, SQ_NORMS: tl.constexpr):
    # Raw Gram tile x_I x_J^T: (BLOCK_M, BLOCK_N) fp32, accumulated over D in BLOCK_D steps. SQ_NORMS: also
    # the squared norms of its rows, (BLOCK_M,), and columns, (BLOCK_N,), fp32, from the same loaded tiles
    # (no second pass over x); otherwise those two are zeros (dead code).
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    xi_ptrs = base_i + loc_i.to(tl.int64)[:, None] * stride_i + offs_d[None, :]  # (BLOCK_M, BLOCK_D)
    xjt_ptrs = base_j + loc_j.to(tl.int64)[None, :] * stride_j + offs_d[:, None]  # (BLOCK_D, BLOCK_N)
    gram = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sq_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sq_j = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d) < D
        xi = tl.load(xi_ptrs + d0, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        xjt = tl.load(xjt_ptrs + d0, mask=d_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        gram = _dot(xi, xjt, gram, DOT_PRECISION, DOT_UPCAST)
        if SQ_NORMS:
            xi32 = xi.to(tl.float32)
            xjt32 = xjt.to(tl.float32)
            sq_i += tl.sum(xi32 * xi32, axis=1)
            sq_j += tl.sum(xjt32 * xjt32, axis=0)
    return gram, sq_i, sq_j


@triton.jit
def _row_norm(base, loc, stride, ok, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    # ||x_r|| for the (BLOCK,) rows loc of one segment, fp32.
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    ptrs = base + loc.to(tl.int64)[:, None] * stride + offs_d[None, :]  # (BLOCK, BLOCK_D)
    sq = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = tl.load(ptrs + d0, mask=ok[:, None] & ((d0 + offs_d) < D)[None, :], other=0.0).to(tl.float32)
        sq += x * x
    return tl.sqrt(tl.sum(sq, axis=1))


@triton.jit
def _row_norm_kernel(
    a_ptr, b_ptr,  # a, b: (N, D), unit stride along D
    norm_ptr,  # norm: (2N,) fp32 out, ||x_r|| for x = cat(a, b)
    N, D, stride_a, stride_b,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seg, loc, base, stride = _block(tl.program_id(0), N, a_ptr, b_ptr, stride_a, stride_b, BLOCK_M)
    ok = loc < N
    tl.store(norm_ptr + seg * N + loc, _row_norm(base, loc, stride, ok, D, BLOCK_M, BLOCK_D), mask=ok)


@triton.jit
def _infonce_fwd_kernel(
    a_ptr, b_ptr,  # a, b: (N, D) fp16/bf16/fp32, unit stride along D
    norm_ptr,  # norm: (2N,) fp32; read if not FUSED_NORM, else computed from the Gram tiles' loads and written
    norm_col_ptr,  # FUSED_NORM: (2N,) fp32 out, the norms as this kernel computes them for columns (below)
    lse_ptr,  # lse2: (2N,) fp32 out, log2-sum-exp2 of row r's base-2 logits (diagonal excluded)
    loss_ptr,  # loss: (2N,) fp32 out, per-row NT-Xent loss (natural log)
    part_ptr,  # NUM_SPLIT > 1: (3, NUM_SPLIT, 2N) fp32 out, each split's running max, sum and positive
    N, D, stride_a, stride_b,
    scale2,  # log2(e) / T
    eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLIT: tl.constexpr,  # programs per row block, each over its own range of column blocks
    FUSED_NORM: tl.constexpr,  # compute the norms here instead of reading them
    DOT_PRECISION: tl.constexpr,  # fp32 inputs: "ieee" (default) or "tf32x3", never plain tf32; ignored for 16-bit
    DOT_UPCAST: tl.constexpr,  # interpreter only: feed tl.dot fp32 copies (its bf16 dot is broken)
):
    # This program: rows loc_i of segment seg_i (x row seg_i * N + loc_i); its positives are the same
    # loc in the other segment.
    seg_i, loc_i, base_i, stride_i = _block(tl.program_id(0), N, a_ptr, b_ptr, stride_a, stride_b, BLOCK_M)
    row_ok = loc_i < N  # (BLOCK_M,)
    rows = seg_i * N + loc_i  # (BLOCK_M,) index into x = cat(a, b)
    split = tl.program_id(1)
    if FUSED_NORM:
        norm_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # from each Gram tile's loads (below)
    else:
        norm_i = tl.load(norm_ptr + rows, mask=row_ok, other=1.0)
    rinv_i = 1.0 / tl.maximum(norm_i, eps)  # (BLOCK_M,)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max of base-2 logits
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp2(s2 - m_i)
    pos_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # base-2 logit of the positive
    j_lo, j_hi = _split_range(split, 2 * tl.cdiv(N, BLOCK_N), NUM_SPLIT)
    for jb in range(j_lo, j_hi):
        seg_j, loc_j, base_j, stride_j = _block(jb, N, a_ptr, b_ptr, stride_a, stride_b, BLOCK_N)
        col_ok = loc_j < N  # (BLOCK_N,)
        gram, sq_i, sq_j = _gram_tile(base_i, loc_i, stride_i, row_ok, base_j, loc_j, stride_j, col_ok, D,
                                      BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, DOT_UPCAST, FUSED_NORM)
        if FUSED_NORM:  # the same loads in the same order for every tile: the same norm_i every time
            norm_i = tl.sqrt(sq_i)
            rinv_i = 1.0 / tl.maximum(norm_i, eps)
            # A column's squares are summed across the tile, a row's along it: the two orders can differ
            # in the last bit, and the backward must use the norm each logit was made with (exp2 turns a
            # last-bit change of a logit of 1/T into a relative change of ~1e-7/T). Every program stores
            # the column norms it computed: the same bits from each (same loads, same code); letting only
            # row block 0 store them cost registers (sm_90a, Triton 3.9: 139 -> 128 and 12 bytes spilled).
            norm_j = tl.sqrt(sq_j)
            tl.store(norm_col_ptr + seg_j * N + loc_j, norm_j, mask=col_ok)
        else:
            norm_j = tl.load(norm_ptr + seg_j * N + loc_j, mask=col_ok, other=1.0)
        rinv_j = 1.0 / tl.maximum(norm_j, eps)  # (BLOCK_N,)
        # Base-2 logits; the backward repeats exactly this arithmetic (rinv_i * rinv_j is symmetric).
        s2 = gram * (rinv_i[:, None] * rinv_j[None, :]) * scale2  # (BLOCK_M, BLOCK_N)
        same = loc_i[:, None] == loc_j[None, :]  # (BLOCK_M, BLOCK_N): diagonal or positive
        valid = col_ok[None, :] & ~(same & (seg_i == seg_j))
        s2m = tl.where(valid, s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2m, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with nothing valid in a row
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s2m - m_safe[:, None]), axis=1)
        m_i = m_new
        pos_i += tl.sum(tl.where(same & (seg_i != seg_j), s2, 0.0), axis=1)

    if FUSED_NORM:
        if split == 0:  # every split computes the same norms; one stores them (split 0 has column blocks)
            tl.store(norm_ptr + rows, norm_i, mask=row_ok)
    if NUM_SPLIT == 1:
        lse2 = m_i + tl.log2(l_i)  # (BLOCK_M,)
        tl.store(lse_ptr + rows, lse2, mask=row_ok)
        tl.store(loss_ptr + rows, (lse2 - pos_i) * 0.6931471805599453, mask=row_ok)
    else:  # this split's share; _infonce_merge_kernel combines them
        n2 = 2 * N
        tl.store(part_ptr + split * n2 + rows, m_i, mask=row_ok)
        tl.store(part_ptr + (NUM_SPLIT + split) * n2 + rows, l_i, mask=row_ok)
        tl.store(part_ptr + (2 * NUM_SPLIT + split) * n2 + rows, pos_i, mask=row_ok)


@triton.jit
def _infonce_merge_kernel(
    part_ptr,  # (3, NUM_SPLIT, 2N) fp32: each split's running max, sum and positive (base 2)
    lse_ptr,  # lse2: (2N,) fp32 out
    loss_ptr,  # loss: (2N,) fp32 out, natural log
    total_ptr,  # 0-dim fp32 out: total_scale * sum_r loss_r (the "mean" or "sum" result)
    N2, total_scale,
    NUM_SPLIT: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program over all 2N rows (a split forward is for small problems): merges the splits' online
    # logsumexps as the forward's loop merges column blocks, and sums the loss in a fixed order.
    offs = tl.arange(0, BLOCK)  # (BLOCK,)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for r0 in range(0, N2, BLOCK):
        r = r0 + offs
        ok = r < N2
        m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        for s in tl.static_range(NUM_SPLIT):
            m = tl.maximum(m, tl.load(part_ptr + s * N2 + r, mask=ok, other=float("-inf")))
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # every row has its positive: only masked lanes
        l = tl.zeros((BLOCK,), dtype=tl.float32)
        pos = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(NUM_SPLIT):
            m_s = tl.load(part_ptr + s * N2 + r, mask=ok, other=float("-inf"))
            l += tl.load(part_ptr + (NUM_SPLIT + s) * N2 + r, mask=ok, other=0.0) * tl.exp2(m_s - m_safe)
            pos += tl.load(part_ptr + (2 * NUM_SPLIT + s) * N2 + r, mask=ok, other=0.0)
        lse2 = m_safe + tl.log2(tl.where(ok, l, 1.0))
        loss = (lse2 - pos) * 0.6931471805599453
        tl.store(lse_ptr + r, lse2, mask=ok)
        tl.store(loss_ptr + r, loss, mask=ok)
        total += tl.where(ok, loss, 0.0)
    tl.store(total_ptr, tl.sum(total, axis=0) * total_scale)


@triton.jit
def _load_wref(wref_ptr):
    # max |grad_output| as the backward divides by it (0-dim fp32; tiny or zero: 1e-30, finite quotients).
    return tl.maximum(tl.abs(tl.load(wref_ptr).to(tl.float32)), 1e-30)


@triton.jit
def _rinv_max(norm_ptr, N2, eps):
    # The largest rinv_r = 1 / ||x_r|| over the 2N rows that are not all zero (1.0 if none): fp16's scale
    # for the folded (G + G^T) tile.
    offs_r = tl.arange(0, 1024)  # (1024,)
    rmax_r = tl.zeros((1024,), dtype=tl.float32)
    for r0 in range(0, N2, 1024):
        norm_r = tl.load(norm_ptr + r0 + offs_r, mask=(r0 + offs_r) < N2, other=0.0)
        rmax_r = tl.maximum(rmax_r, tl.where(norm_r > eps, 1.0 / tl.maximum(norm_r, eps), 0.0))
    rmax = tl.max(rmax_r, axis=0)
    return tl.where(rmax > 0.0, rmax, 1.0)


@triton.jit
def _rinv_max_kernel(norm_ptr, out_ptr, N2, eps):
    # grid (1,): _rinv_max once per call into a 0-dim fp32, for the backward through stripes' many launches.
    tl.store(out_ptr, _rinv_max(norm_ptr, N2, eps))


@triton.jit
def _sym_grad_tile(s2, s2t, lse_i, lse_j, u_i, u_j, valid, pos):
    # The (G + G^T) / wref tile, (BLOCK_M, BLOCK_N) fp32, |entries| <= 2: s2 rows i's base-2 logits, s2t rows
    # j's (transposed; the same tile unless the forward fused its norms), lse_* their log2-sum-exp2, u_* the
    # rows' grad_output / wref; valid: off the diagonal and inside both ranges; pos: the positive pairs.
    p_ij = tl.where(valid, tl.exp2(s2 - lse_i[:, None]), 0.0)  # softmax of row i
    p_ji = tl.where(valid, tl.exp2(s2t - lse_j[None, :]), 0.0)  # softmax of row j, transposed
    is_pos = tl.where(pos, 1.0, 0.0)
    return u_i[:, None] * (p_ij - is_pos) + u_j[None, :] * (p_ji - is_pos)


@triton.jit
def _fold_rinv(g, rinv_j, rmax, G_SCALE: tl.constexpr, SCALE_FP16: tl.constexpr):
    # sum_j g_ij z_j = sum_j (g_ij rinv_j) x_j: the (G + G^T) tile with rinv_J multiplied in, so x_J enters
    # the product as loaded. fp16 cannot hold g_ij rinv_j for every norm, so with SCALE_FP16 the factor is
    # G_SCALE rinv_j / rmax <= G_SCALE (undone afterwards). An all-zero row (rinv_j = 1/eps > rmax) is
    # clamped to G_SCALE: finite, and its x_j = 0 (an fp16 row with norm <= eps has no nonzero element).
    # bf16 and fp32 have the range: no scaling.
    if SCALE_FP16:
        return g * tl.minimum(rinv_j * (G_SCALE / rmax), G_SCALE)[None, :]  # |result| <= 2 G_SCALE
    else:
        return g * rinv_j[None, :]


@triton.jit
def _gz_chunk(acc, gs, xj, rinv_j, DOT_PRECISION: tl.constexpr, MM_FP16: tl.constexpr):
    # acc (BLOCK_M, BLOCK_DC) += gs (BLOCK_M, BLOCK_N) @ z_J, z_J = x_J * rinv_J restricted to one chunk of
    # gradient columns (xj: (BLOCK_N, BLOCK_DC)). For 16-bit inputs both operands are rounded to fp16,
    # bf16 inputs included: |z| <= 1 and |gs| <= 2 * G_SCALE fit fp16's range, and its 11-bit mantissa makes
    # this product 8x more accurate than bf16 at the same speed.
    zj = xj.to(tl.float32) * rinv_j[:, None]
    if MM_FP16:
        return _dot(gs.to(tl.float16), zj.to(tl.float16), acc, DOT_PRECISION, False)
    else:
        return _dot(gs, zj, acc, DOT_PRECISION, False)


@triton.jit
def _chunk_product(acc, gs, xj, rinv_j, FOLD_RINV: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   DOT_UPCAST: tl.constexpr, MM_FP16: tl.constexpr):
    # acc (BLOCK_M, BLOCK_DC) += the (G + G^T) tile times z_J for one chunk of gradient columns. FOLD_RINV:
    # rinv_J is already in gs and x_J (xj: (BLOCK_N, BLOCK_DC)) enters the dot as loaded, in its own dtype
    # (no fp32 copy of the chunk in registers); otherwise x_J is normalized here (_gz_chunk).
    if FOLD_RINV:
        return _dot(gs.to(xj.dtype), xj, acc, DOT_PRECISION, DOT_UPCAST)
    else:
        return _gz_chunk(acc, gs, xj, rinv_j, DOT_PRECISION, MM_FP16)


@triton.jit
def _load_cols(base, loc, stride, ok, offs_c, D):
    # x rows `loc` of one segment, gradient columns offs_c: (rows, BLOCK_DC), zeros outside.
    ptrs = base + loc.to(tl.int64)[:, None] * stride + offs_c[None, :]
    return tl.load(ptrs, mask=ok[:, None] & (offs_c < D)[None, :], other=0.0)


@triton.jit
def _store_dx(acc, zdz, rinv_i, seg_i, loc_i, row_ok, base_i, stride_i, offs_c, D, da_ptr, db_ptr,
              stride_da, stride_db, dz_scale):
    # dx_i = rinv_i (dz_i - z_i (z_i . dz_i)) for one chunk of gradient columns, stored in x's dtype.
    xi = _load_cols(base_i, loc_i, stride_i, row_ok, offs_c, D)  # (BLOCK_M, BLOCK_DC)
    zi = xi.to(tl.float32) * rinv_i[:, None]
    dx = (acc * dz_scale - zi * zdz[:, None]) * rinv_i[:, None]
    out_base = tl.where(seg_i == 1, db_ptr, da_ptr)
    out_stride = tl.where(seg_i == 1, stride_db, stride_da)
    out_ptrs = out_base + loc_i.to(tl.int64)[:, None] * out_stride + offs_c[None, :]
    tl.store(out_ptrs, dx.to(xi.dtype), mask=row_ok[:, None] & (offs_c < D)[None, :])


@triton.jit
def _infonce_bwd_kernel(
    a_ptr, b_ptr,  # a, b: (N, D), unit stride along D
    norm_ptr,  # norm: (2N,) fp32, saved by the forward
    norm_col_ptr,  # TWO_NORMS: (2N,) fp32, the forward's column norms (see its FUSED_NORM)
    lse_ptr,  # lse2: (2N,) fp32, saved by the forward
    w_ptr,  # grad_output: (2N,) fp32 with stride w_stride ("none"), or a 0-dim fp32 with w_stride = 0
    wref_ptr,  # 0-dim fp32: max |grad_output| (for "mean"/"sum": grad_output itself)
    da_ptr, db_ptr,  # da, db: (N, D) out, dtype of a/b
    part_ptr,  # NUM_SPLIT > 1: (NUM_SPLIT, 2N, D) fp32 out, each split's share of dz (instead of da, db)
    zpart_ptr,  # NUM_SPLIT > 1: (NUM_SPLIT, 2N) fp32 out, each split's share of z . dz
    N, D, stride_a, stride_b, stride_da, stride_db, w_stride,
    scale2,  # log2(e) / T
    out_scale,  # w_scale / (T * G_SCALE), w_scale = 1/2N for "mean", 1 otherwise
    c_scale,  # w_scale * ln(2)
    eps,
    G_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
    NUM_DC: tl.constexpr,  # chunks of BLOCK_DC gradient columns per program (1 to 4), one accumulator each
    NUM_SPLIT: tl.constexpr,  # programs per (row block, column chunk), each over its own column blocks J
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    MM_FP16: tl.constexpr,  # 16-bit inputs: the (G + G^T) z product runs in fp16 (also for bf16 inputs)
    FOLD_RINV: tl.constexpr,  # multiply rinv_J into the (G + G^T) tile instead of normalizing x_J (see below)
    SCALE_FP16: tl.constexpr,  # FOLD_RINV with fp16 inputs: divide that tile by the largest rinv (see below)
    TWO_NORMS: tl.constexpr,  # the forward fused its norms: a vector's norm as a column may differ in the last bit
):
    seg_i, loc_i, base_i, stride_i = _block(tl.program_id(0), N, a_ptr, b_ptr, stride_a, stride_b, BLOCK_M)
    row_ok = loc_i < N  # (BLOCK_M,)
    rows = seg_i * N + loc_i  # (BLOCK_M,)
    # This program's gradient columns: NUM_DC chunks of BLOCK_DC, starting at offs_c0.
    offs_c0 = tl.program_id(1) * (NUM_DC * BLOCK_DC) + tl.arange(0, BLOCK_DC)  # (BLOCK_DC,)

    norm_i = tl.load(norm_ptr + rows, mask=row_ok, other=1.0)
    rinv_i = 1.0 / tl.maximum(norm_i, eps)  # (BLOCK_M,)
    if TWO_NORMS:  # rows i as the forward's other programs saw them, as columns
        rinv_ci = 1.0 / tl.maximum(tl.load(norm_col_ptr + rows, mask=row_ok, other=1.0), eps)  # (BLOCK_M,)
    lse_i = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)  # (BLOCK_M,)
    wref = _load_wref(wref_ptr)
    u_i = tl.load(w_ptr + rows * w_stride, mask=row_ok, other=0.0).to(tl.float32) / wref  # (BLOCK_M,) in [-1, 1]

    # sum_j g_ij z_j * G_SCALE, one (BLOCK_M, BLOCK_DC) accumulator per chunk (unused ones are dead code)
    acc0 = tl.zeros((BLOCK_M, BLOCK_DC), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_DC), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_DC), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_DC), dtype=tl.float32)
    zdz = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum_j g_ij s2_ij
    rmax = 1.0  # SCALE_FP16: the largest rinv_r over the rows that are not all zero (every program alike)
    if SCALE_FP16:
        rmax = _rinv_max(norm_ptr, 2 * N, eps)
    split = tl.program_id(2)
    j_lo, j_hi = _split_range(split, 2 * tl.cdiv(N, BLOCK_N), NUM_SPLIT)
    for jb in range(j_lo, j_hi):
        seg_j, loc_j, base_j, stride_j = _block(jb, N, a_ptr, b_ptr, stride_a, stride_b, BLOCK_N)
        col_ok = loc_j < N  # (BLOCK_N,)
        cols = seg_j * N + loc_j  # (BLOCK_N,)
        norm_j = tl.load(norm_ptr + cols, mask=col_ok, other=1.0)
        rinv_j = 1.0 / tl.maximum(norm_j, eps)  # (BLOCK_N,)
        lse_j = tl.load(lse_ptr + cols, mask=col_ok, other=0.0)
        u_j = tl.load(w_ptr + cols * w_stride, mask=col_ok, other=0.0).to(tl.float32) / wref
        # x_J in the first chunk's columns, (BLOCK_N, BLOCK_DC). Loaded first: it is used after the Gram
        # loop below, which hides the load's latency.
        xj0 = _load_cols(base_j, loc_j, stride_j, col_ok, offs_c0, D)

        # Recompute the logit tile (same arithmetic as the forward).
        gram, _, _ = _gram_tile(base_i, loc_i, stride_i, row_ok, base_j, loc_j, stride_j, col_ok, D,
                                BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, DOT_UPCAST, False)  # (BLOCK_M, BLOCK_N)
        if TWO_NORMS:  # each logit as the forward program of its row made it (x_I x_J^T is symmetric)
            rinv_cj = 1.0 / tl.maximum(tl.load(norm_col_ptr + cols, mask=col_ok, other=1.0), eps)  # (BLOCK_N,)
            s2 = gram * (rinv_i[:, None] * rinv_cj[None, :]) * scale2  # (BLOCK_M, BLOCK_N): rows i's logits
            s2t = gram * (rinv_ci[:, None] * rinv_j[None, :]) * scale2  # rows j's logits, transposed
        else:
            s2 = gram * (rinv_i[:, None] * rinv_j[None, :]) * scale2  # (BLOCK_M, BLOCK_N), as in the forward
            s2t = s2

        same = loc_i[:, None] == loc_j[None, :]
        valid = row_ok[:, None] & col_ok[None, :] & ~(same & (seg_i == seg_j))
        g = _sym_grad_tile(s2, s2t, lse_i, lse_j, u_i, u_j, valid, valid & same & (seg_i != seg_j))
        zdz += tl.sum(g * s2, axis=1)

        if FOLD_RINV:
            # The chunk products take x_J as loaded (fp16: scaled, undone in dz_scale). A scale per column
            # tile, with the accumulators rescaled as an online softmax rescales its sum, was tried: sm_90a
            # ptxas spilled 392 bytes, vs 64 for this one.
            gs = _fold_rinv(g, rinv_j, rmax, G_SCALE, SCALE_FP16)
        else:
            gs = g * G_SCALE  # (BLOCK_M, BLOCK_N)
        acc0 = _chunk_product(acc0, gs, xj0, rinv_j, FOLD_RINV, DOT_PRECISION, DOT_UPCAST, MM_FP16)
        # More chunks per program: the logit tile above serves NUM_DC chunks instead of one.
        if NUM_DC > 1:
            xj1 = _load_cols(base_j, loc_j, stride_j, col_ok, offs_c0 + BLOCK_DC, D)
            acc1 = _chunk_product(acc1, gs, xj1, rinv_j, FOLD_RINV, DOT_PRECISION, DOT_UPCAST, MM_FP16)
        if NUM_DC > 2:
            xj2 = _load_cols(base_j, loc_j, stride_j, col_ok, offs_c0 + 2 * BLOCK_DC, D)
            acc2 = _chunk_product(acc2, gs, xj2, rinv_j, FOLD_RINV, DOT_PRECISION, DOT_UPCAST, MM_FP16)
        if NUM_DC > 3:
            xj3 = _load_cols(base_j, loc_j, stride_j, col_ok, offs_c0 + 3 * BLOCK_DC, D)
            acc3 = _chunk_product(acc3, gs, xj3, rinv_j, FOLD_RINV, DOT_PRECISION, DOT_UPCAST, MM_FP16)

    # z_i . dz_i, then dx through the L2 normalization, chunk by chunk.
    zdz = zdz * (wref * c_scale)  # (BLOCK_M,)
    zdz = tl.where(norm_i > eps, zdz, 0.0)  # clamped norm: x / eps is linear, no projection
    dz_scale = wref * out_scale * rmax
    part = part_ptr + split.to(tl.int64) * (2 * N) * D  # NUM_SPLIT > 1: this split's (2N, D) share
    _finish_chunk(acc0, offs_c0, zdz, dz_scale, rinv_i, seg_i, loc_i, rows, row_ok, base_i, stride_i, D,
                  da_ptr, db_ptr, stride_da, stride_db, part, NUM_SPLIT)
    if NUM_DC > 1:
        _finish_chunk(acc1, offs_c0 + BLOCK_DC, zdz, dz_scale, rinv_i, seg_i, loc_i, rows, row_ok, base_i,
                      stride_i, D, da_ptr, db_ptr, stride_da, stride_db, part, NUM_SPLIT)
    if NUM_DC > 2:
        _finish_chunk(acc2, offs_c0 + 2 * BLOCK_DC, zdz, dz_scale, rinv_i, seg_i, loc_i, rows, row_ok, base_i,
                      stride_i, D, da_ptr, db_ptr, stride_da, stride_db, part, NUM_SPLIT)
    if NUM_DC > 3:
        _finish_chunk(acc3, offs_c0 + 3 * BLOCK_DC, zdz, dz_scale, rinv_i, seg_i, loc_i, rows, row_ok, base_i,
                      stride_i, D, da_ptr, db_ptr, stride_da, stride_db, part, NUM_SPLIT)
    if NUM_SPLIT > 1:  # z . dz is the same for every column chunk: the first chunk's programs store it
        if tl.program_id(1) == 0:
            tl.store(zpart_ptr + split * (2 * N) + rows, zdz, mask=row_ok)


@triton.jit
def _finish_chunk(acc, offs_c, zdz, dz_scale, rinv_i, seg_i, loc_i, rows, row_ok, base_i, stride_i, D,
                  da_ptr, db_ptr, stride_da, stride_db, part, NUM_SPLIT: tl.constexpr):
    # One chunk of gradient columns, acc (BLOCK_M, BLOCK_DC): dx stored, or (split) this split's share of dz,
    # which _infonce_bwd_finalize_kernel sums and projects.
    if NUM_SPLIT == 1:
        _store_dx(acc, zdz, rinv_i, seg_i, loc_i, row_ok, base_i, stride_i, offs_c, D, da_ptr, db_ptr,
                  stride_da, stride_db, dz_scale)
    else:
        _store_part(acc * dz_scale, part, rows, row_ok, offs_c, D)


@triton.jit
def _store_part(dz, part, rows, row_ok, offs_c, D):
    # dz (BLOCK_M, BLOCK_DC) fp32 into rows `rows`, columns offs_c of one split's (2N, D) share.
    ptrs = part + rows.to(tl.int64)[:, None] * D + offs_c[None, :]
    tl.store(ptrs, dz, mask=row_ok[:, None] & (offs_c < D)[None, :])


@triton.jit
def _infonce_bwd_finalize_kernel(
    a_ptr, b_ptr,  # a, b: (N, D), unit stride along D
    norm_ptr,  # norm: (2N,) fp32, saved by the forward
    part_ptr,  # (NUM_SPLIT, 2N, D) fp32: the splits' shares of dz
    zpart_ptr,  # (NUM_SPLIT, 2N) fp32: the splits' shares of z . dz
    da_ptr, db_ptr,  # da, db: (N, D) out, dtype of a/b
    N, D, stride_a, stride_b, stride_da, stride_db,
    eps,
    NUM_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DC: tl.constexpr,
):
    # grid (2 cdiv(N, BLOCK_M), cdiv(D, BLOCK_DC)): sums the splits in a fixed order (bit-identical run to
    # run), then dx_i = rinv_i (dz_i - z_i (z_i . dz_i)) as the unsplit backward stores it.
    seg_i, loc_i, base_i, stride_i = _block(tl.program_id(0), N, a_ptr, b_ptr, stride_a, stride_b, BLOCK_M)
    row_ok = loc_i < N  # (BLOCK_M,)
    rows = seg_i * N + loc_i  # (BLOCK_M,)
    offs_c = tl.program_id(1) * BLOCK_DC + tl.arange(0, BLOCK_DC)  # (BLOCK_DC,)
    rinv_i = 1.0 / tl.maximum(tl.load(norm_ptr + rows, mask=row_ok, other=1.0), eps)
    mask = row_ok[:, None] & (offs_c < D)[None, :]
    ptrs = part_ptr + rows.to(tl.int64)[:, None] * D + offs_c[None, :]  # (BLOCK_M, BLOCK_DC), split 0
    dz = tl.zeros((BLOCK_M, BLOCK_DC), dtype=tl.float32)
    zdz = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zptrs = zpart_ptr + rows  # (BLOCK_M,), split 0
    for s in tl.static_range(NUM_SPLIT):
        dz += tl.load(ptrs, mask=mask, other=0.0)
        zdz += tl.load(zptrs, mask=row_ok, other=0.0)
        ptrs += (2 * N) * D  # the next split's share (pointer steps: no int32 product of three sizes)
        zptrs += 2 * N
    _store_dx(dz, zdz, rinv_i, seg_i, loc_i, row_ok, base_i, stride_i, offs_c, D, da_ptr, db_ptr,
              stride_da, stride_db, 1.0)


# The backward through stripes (`KernelConfig.stripe_rows`; pick_config's default for large 16-bit problems). The
# fused backward above keeps its gradient accumulators in registers, so a program holds only NUM_DC * BLOCK_DC
# columns of D for its rows and every logit tile is recomputed cdiv(D, NUM_DC * BLOCK_DC) times, each time from a
# full-D Gram product over 64-row blocks. This one instead writes the folded (G + G^T) tile of a stripe of rows x a
# block of columns to a small 16-bit workspace (one Gram product per logit, in large tiles) and multiplies it by x_J
# in a separate matrix product that owns its output tile across the whole of D; the stripe's dz is summed in an fp32
# workspace over the column blocks, in a fixed order, then projected. Launches: 2 per (stripe, column block) and 1
# per stripe; the workspaces are (stripe_rows, stripe_cols) in x's dtype and (stripe_rows, D) fp32.


@triton.jit
def _infonce_bwd_weights_kernel(
    xi_ptr,  # x_I: (R, D) this stripe's rows (a view into a or b), unit stride along D
    xj_ptr,  # x_J: (C, D) this block's columns (a view into a or b), unit stride along D
    norm_ptr, norm_col_ptr, lse_ptr, w_ptr, wref_ptr,  # as _infonce_bwd_kernel's, indexed by x = cat(a, b) row
    rmax_ptr,  # SCALE_FP16: 0-dim fp32, the largest rinv of the batch (_rinv_max), computed once per call
    wt_ptr,  # out: (R, C) in x's dtype, row stride stride_wt: (G + G^T)_IJ / wref with rinv_J folded in
    R, C, N, D, stride_xi, stride_xj, stride_wt, w_stride,
    row0, col0,  # x = cat(a, b) index of x_I's first row and of x_J's first row
    scale2,  # log2(e) / T
    eps,
    G_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, SCALE_FP16: tl.constexpr, TWO_NORMS: tl.constexpr,
):
    # grid (cdiv(R, BLOCK_M), cdiv(C, BLOCK_N)): one tile each, its logits computed once.
    loc_i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    loc_j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = loc_i < R
    col_ok = loc_j < C
    rows = row0 + loc_i  # (BLOCK_M,) index into x
    cols = col0 + loc_j  # (BLOCK_N,)
    rinv_i = 1.0 / tl.maximum(tl.load(norm_ptr + rows, mask=row_ok, other=1.0), eps)
    rinv_j = 1.0 / tl.maximum(tl.load(norm_ptr + cols, mask=col_ok, other=1.0), eps)
    lse_i = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    lse_j = tl.load(lse_ptr + cols, mask=col_ok, other=0.0)
    wref = _load_wref(wref_ptr)
    u_i = tl.load(w_ptr + rows * w_stride, mask=row_ok, other=0.0).to(tl.float32) / wref
    u_j = tl.load(w_ptr + cols * w_stride, mask=col_ok, other=0.0).to(tl.float32) / wref

    gram, _, _ = _gram_tile(xi_ptr, loc_i, stride_xi, row_ok, xj_ptr, loc_j, stride_xj, col_ok, D,
                            BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, DOT_UPCAST, False)  # (BLOCK_M, BLOCK_N)
    if TWO_NORMS:  # as in _infonce_bwd_kernel: each logit as the forward program of its row made it
        rinv_ci = 1.0 / tl.maximum(tl.load(norm_col_ptr + rows, mask=row_ok, other=1.0), eps)
        rinv_cj = 1.0 / tl.maximum(tl.load(norm_col_ptr + cols, mask=col_ok, other=1.0), eps)
        s2 = gram * (rinv_i[:, None] * rinv_cj[None, :]) * scale2
        s2t = gram * (rinv_ci[:, None] * rinv_j[None, :]) * scale2
    else:
        s2 = gram * (rinv_i[:, None] * rinv_j[None, :]) * scale2  # (BLOCK_M, BLOCK_N), as in the forward
        s2t = s2
    gap = rows[:, None] - cols[None, :]  # (BLOCK_M, BLOCK_N): 0 on the diagonal, +-N at the positives
    valid = row_ok[:, None] & col_ok[None, :] & (gap != 0)
    g = _sym_grad_tile(s2, s2t, lse_i, lse_j, u_i, u_j, valid, valid & ((gap == N) | (gap == -N)))
    rmax = 1.0
    if SCALE_FP16:
        rmax = tl.load(rmax_ptr)
    gs = _fold_rinv(g, rinv_j, rmax, G_SCALE, SCALE_FP16)
    ptrs = wt_ptr + loc_i.to(tl.int64)[:, None] * stride_wt + loc_j[None, :]
    tl.store(ptrs, gs.to(wt_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _infonce_bwd_stripe_mm_kernel(
    wt_ptr,  # (R, C) in x's dtype: the weights kernel's tile block
    xj_ptr,  # x_J: (C, D), unit stride along D
    dz_ptr,  # (R, D) fp32, contiguous: the stripe's sum over column blocks so far (in/out)
    R, C, D, stride_wt, stride_xj,
    ACCUMULATE: tl.constexpr,  # add to dz (every column block but the stripe's first)
    BLOCK_M: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    # grid (cdiv(R, BLOCK_M), cdiv(D, BLOCK_DC)): dz[I, c] (+)= wt[I, :] @ x_J[:, c], fp32 accumulation; each
    # output tile belongs to one program, and the column blocks are added in launch order: deterministic.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_c = tl.program_id(1) * BLOCK_DC + tl.arange(0, BLOCK_DC)  # (BLOCK_DC,)
    offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    m_ok = offs_m < R
    c_ok = offs_c < D
    w_ptrs = wt_ptr + offs_m.to(tl.int64)[:, None] * stride_wt + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    x_ptrs = xj_ptr + offs_k.to(tl.int64)[:, None] * stride_xj + offs_c[None, :]  # (BLOCK_K, BLOCK_DC)
    acc = tl.zeros((BLOCK_M, BLOCK_DC), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k_ok = (k0 + offs_k) < C
        w = tl.load(w_ptrs + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptrs + k0 * stride_xj, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _dot(w, x, acc, DOT_PRECISION, DOT_UPCAST)
    out_ptrs = dz_ptr + offs_m.to(tl.int64)[:, None] * D + offs_c[None, :]
    out_mask = m_ok[:, None] & c_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0)
    tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _infonce_bwd_stripe_finalize_kernel(
    xi_ptr,  # x_I: (R, D) this stripe's rows, unit stride along D
    dz_ptr,  # (R, D) fp32, contiguous: sum over j of the folded (G + G^T)_ij x_j
    norm_ptr, wref_ptr, rmax_ptr,  # as the weights kernel's
    dx_ptr,  # out: (R, D) in x's dtype, row stride stride_dx (a view into da or db)
    R, D, stride_xi, stride_dx, row0,
    out_scale,  # w_scale / (T * G_SCALE)
    eps,
    BLOCK_M: tl.constexpr, BLOCK_DC: tl.constexpr, SCALE_FP16: tl.constexpr,
):
    # grid (cdiv(R, BLOCK_M),): dz_i = dz_scale * sum_j (...), then dx_i = rinv_i (dz_i - z_i (z_i . dz_i)), with
    # z_i . dz_i summed from dz itself (two passes over D).
    loc_i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = loc_i < R
    norm_i = tl.load(norm_ptr + row0 + loc_i, mask=row_ok, other=1.0)
    rinv_i = 1.0 / tl.maximum(norm_i, eps)  # (BLOCK_M,)
    dz_scale = _load_wref(wref_ptr) * out_scale
    if SCALE_FP16:
        dz_scale = dz_scale * tl.load(rmax_ptr)
    offs = tl.arange(0, BLOCK_DC)  # (BLOCK_DC,)
    dz_ptrs = dz_ptr + loc_i.to(tl.int64)[:, None] * D + offs[None, :]  # (BLOCK_M, BLOCK_DC)
    zdz = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, D, BLOCK_DC):
        mask = row_ok[:, None] & ((c0 + offs) < D)[None, :]
        zi = _load_cols(xi_ptr, loc_i, stride_xi, row_ok, c0 + offs, D).to(tl.float32) * rinv_i[:, None]
        zdz += tl.sum(zi * tl.load(dz_ptrs + c0, mask=mask, other=0.0), axis=1)
    zdz = tl.where(norm_i > eps, zdz * dz_scale, 0.0)  # clamped norm: x / eps is linear, no projection
    for c0 in range(0, D, BLOCK_DC):
        mask = row_ok[:, None] & ((c0 + offs) < D)[None, :]
        _store_dx(tl.load(dz_ptrs + c0, mask=mask, other=0.0), zdz, rinv_i, 0, loc_i, row_ok, xi_ptr, stride_xi,
                  c0 + offs, D, dx_ptr, dx_ptr, stride_dx, stride_dx, dz_scale)


# ----------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes and launch options (a fixed heuristic table, no autotuning: no first-call benchmarking)."""

    fwd_m: int  # forward: rows per program
    fwd_n: int  # forward: columns per tile
    fwd_d: int  # forward: D step of the Gram tile
    fwd_warps: int
    fwd_stages: int
    fused_norm: bool  # norms computed inside the forward kernel (no separate norm launch)
    bwd_m: int  # backward: rows per program
    bwd_n: int  # backward: columns per tile
    bwd_d: int  # backward: D step of the recomputed Gram tile
    bwd_dc: int  # backward: gradient columns per chunk (grid dimension 1 = cdiv(D, bwd_dc * bwd_chunks))
    bwd_warps: int
    bwd_stages: int
    bwd_chunks: int = 1  # backward: chunks of bwd_dc columns per program (1-4), sharing one logit tile
    # fp32 inputs: "ieee" (exact fp32 FMA, no tensor cores) or "tf32x3" (three tf32 tensor-core products
    # per dot, close to fp32 accuracy); 16-bit inputs ignore it. ieee until a GPU sweep says otherwise.
    fp32_dot: str = "ieee"
    # backward: multiply rinv_J into the (G + G^T) tile, so the chunk products read x_J as loaded instead of
    # a normalized fp32 copy of every chunk in registers (fewer registers; for fp16 inputs the tile is
    # divided by the largest rinv of the batch to stay in range). pick_config turns it on for large 16-bit
    # problems (H100 sweep, 2026-11-27).
    bwd_fold: bool = False
    # Split the column blocks J of each row block over this many programs (small problems have few row
    # blocks: 14 for N=200, on 132 multiprocessors). Forward: each split keeps its own online logsumexp and
    # one more launch (_infonce_merge_kernel) merges them, writes the loss and its mean or sum. Backward:
    # each split writes its share of dz in fp32 to a (split, 2N, D) workspace that one more launch
    # (_infonce_bwd_finalize_kernel) sums in a fixed order. 1 = no split (no workspace, no extra launch).
    fwd_split: int = 1
    bwd_split: int = 1
    # Backward through stripes instead of the fused backward (0: fused). Rows of x are taken stripe_rows at a
    # time; `_infonce_bwd_weights_kernel` writes their folded (G + G^T) tiles against stripe_cols columns to a
    # workspace (tiles bwd_m x bwd_n, D step bwd_d, bwd_warps, bwd_stages) and `_infonce_bwd_stripe_mm_kernel`
    # multiplies them by x_J (tiles mm_m rows x mm_dc columns of D, K step mm_k). Each logit is computed once
    # and in large tiles, at the price of a workspace of stripe_rows x (stripe_cols 16-bit + D fp32) and
    # 2 launches per (stripe, column block). Needs bwd_fold. pick_config's default for large 16-bit problems.
    stripe_rows: int = 0
    stripe_cols: int = 2048
    mm_m: int = 128
    mm_dc: int = 128
    mm_k: int = 64
    mm_warps: int = 8
    mm_stages: int = 3

    def __post_init__(self):
        for field in dataclasses.fields(self):  # numpy integers become Python ints, as Triton's launches take
            name, value = f"KernelConfig: {field.name}", getattr(self, field.name)
            if field.type is int:
                object.__setattr__(self, field.name, check_integer(name, value))
            elif field.type is bool:
                check_flag(name, value)
        for name in _DOT_BLOCKS:  # every block is a tl.dot operand's extent: a power of two, 16 at least
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise MirrorfastError(f"KernelConfig: {name} must be a power of two >= 16, got {value}")
        for name in ("fwd_warps", "bwd_warps", "mm_warps"):
            if getattr(self, name) not in (1, 2, 4, 8, 16, 32):
                raise MirrorfastError(f"KernelConfig: {name} must be 1, 2, 4, 8, 16 or 32, got {getattr(self, name)}")
        for name in ("fwd_stages", "bwd_stages", "mm_stages"):
            if getattr(self, name) < 1:
                raise MirrorfastError(f"KernelConfig: {name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.bwd_chunks <= 4:  # the kernel has four accumulators
            raise MirrorfastError(f"KernelConfig: bwd_chunks must be 1 to 4, got {self.bwd_chunks}")
        if self.stripe_rows < 0 or self.stripe_cols < 1:
            raise MirrorfastError(f"KernelConfig: stripe_rows must be >= 0 and stripe_cols >= 1, got "
                                  f"{self.stripe_rows}, {self.stripe_cols}")
        if self.stripe_rows and not (self.bwd_fold and self.bwd_split == 1):
            raise MirrorfastError("KernelConfig: the backward through stripes folds rinv into its tiles and has no "
                                  "split: set bwd_fold=True and bwd_split=1 with stripe_rows")
        if not (1 <= self.fwd_split <= 64 and 1 <= self.bwd_split <= 64):  # unrolled loops over the splits
            raise MirrorfastError(f"KernelConfig: fwd_split and bwd_split must be 1 to 64, got {self.fwd_split}, "
                                  f"{self.bwd_split}")
        if self.fp32_dot not in ("ieee", "tf32x3"):
            raise MirrorfastError(f"KernelConfig: fp32_dot must be 'ieee' or 'tf32x3', got {self.fp32_dot!r}")


# KernelConfig's block sizes; each is an extent of a tl.dot operand (16 at least) and a power of two.
_DOT_BLOCKS = ("fwd_m", "fwd_n", "fwd_d", "bwd_m", "bwd_n", "bwd_d", "bwd_dc", "mm_m", "mm_dc", "mm_k")


def _clamp_block(block: int, extent: int) -> int:
    # tl.dot needs every dimension >= 16; no point in a block much larger than the extent.
    return max(16, min(block, triton.next_power_of_2(extent)))


# Programs wanted in flight: an H100/H200 has 132 multiprocessors. Larger row blocks reuse each loaded
# column tile for more rows, but are only chosen while they still give about this many programs.
_MIN_PROGRAMS = 96


# The backward through stripes for large 16-bit problems: weights kernel (BLOCK_M, BLOCK_N, BLOCK_D, num_warps,
# num_stages), product kernel (BLOCK_M, BLOCK_DC, BLOCK_K, num_warps, num_stages), (stripe_rows, stripe_cols).
# H200, 2026-11-27, N=16384 D=768 fp16, the backward alone (`info_nce_table.py --sweep 16384,768`): 13.2 ms,
# the fastest of the stripes candidates whose workspaces (8 + 6 MiB) keep the call's peak extra memory under
# issue 3's 64 MiB (the gradients take 48 of them), against 26.9 ms for the folded fused backward, the best of
# its 40 candidates. 2048 x 8192 stripes took 11.4 ms but need a 38 MiB workspace.
STRIPES_DEFAULT = ((64, 128, 64, 4, 3), (64, 128, 64, 4, 4), (2048, 2048))
# From 2N > 8192 (at least four 2048-row stripes) on. Timed at N=16384 only (and checked against float64 up
# to N=32768); where between 1024 and 8192 rows the stripes start to win was not measured.
STRIPES_MIN_ROWS = 8192


def with_stripes(cfg: KernelConfig, n: int, d: int, weights: tuple, product: tuple, stripes: tuple) -> KernelConfig:
    """cfg with the backward through stripes: weights kernel (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages),
    product kernel (BLOCK_M, BLOCK_DC, BLOCK_K, num_warps, num_stages), (stripe_rows, stripe_cols), as the
    entries of STRIPES_DEFAULT; blocks clamped to N rows and D as pick_config's."""
    (wm, wn, wd, ww, ws), (mm, mdc, mk, mw, ms), (rows, cols) = weights, product, stripes
    return dataclasses.replace(
        cfg, bwd_fold=True, bwd_split=1, bwd_m=_clamp_block(wm, n), bwd_n=_clamp_block(wn, n),
        bwd_d=_clamp_block(wd, d), bwd_warps=ww, bwd_stages=ws, stripe_rows=rows, stripe_cols=cols,
        mm_m=_clamp_block(mm, n), mm_dc=_clamp_block(mdc, d), mm_k=_clamp_block(mk, n), mm_warps=mw, mm_stages=ms)


@functools.lru_cache(maxsize=256)
def pick_config(n2: int, d: int, dtype: torch.dtype, stripes: bool = True) -> KernelConfig:
    """Heuristic block sizes for 2N = n2 rows of dimension d (a fixed table: no autotuning); stripes=False
    keeps the fused backward at every size (what benchmarks/info_nce_table.py times next to the stripes).

    Small problems (2N <= 1024) are latency bound: small row blocks (more programs), wide D steps (short
    serial loops). Larger ones: the largest row block that still gives ~_MIN_PROGRAMS programs; each
    backward program keeps 3 fp32 gradient accumulators of BLOCK_M x 128 in registers that share one
    recomputed logit tile, so the tiles are recomputed cdiv(D, 384) times (2 at D=768, not 3).
    The entries were picked from `benchmarks/info_nce_table.py --sweep` runs (fp16, D=768, N=200 and
    N=16384; H200, 2026-11-26: backward 30.2 ms with 3 x 128 columns per program vs 43.5 ms with 1 x 256,
    32.8 ms with 3 x 256, benchmarks/RESULTS.md). Large 16-bit problems fold rinv_J into the backward's
    gradient tile (`bwd_fold`): H100, 2026-11-27, N=16384 D=768 fp16, backward alone 26.2 vs 29.1 ms, whole
    call 29.2 vs 32.1 ms. Past STRIPES_MIN_ROWS rows they take the backward through stripes instead
    (STRIPES_DEFAULT): H200, 2026-11-27, N=16384 D=768 fp16, the whole call 23.5 vs 29.7 ms with the first
    stripes candidate, and the backward alone 13.2 ms with STRIPES_DEFAULT's blocks vs 26.9 ms folded.
    fp32 inputs use ieee dots (no tensor cores): modest tiles.
    """
    if dtype == torch.float32:
        if n2 <= 1024:
            cfg = (32, 32, 32, 4, 2, True, 32, 32, 32, 64, 4, 2)
        else:
            cfg = (64, 64, 32, 4, 2, False, 64, 32, 32, 64, 4, 2)
    elif n2 <= 1024:
        cfg = (32, 128, 128, 4, 2, False, 16, 64, 128, 256, 4, 2)
    else:
        fwd_m = next((m for m in (128, 64) if triton.cdiv(n2, m) >= _MIN_PROGRAMS), 32)
        bwd_dc = 128
        chunks = min(3, triton.cdiv(d, bwd_dc))  # never a chunk wholly past D (its dots would be wasted)
        d_blocks = triton.cdiv(d, bwd_dc * chunks)
        bwd_m = 64 if triton.cdiv(n2, 64) * d_blocks >= _MIN_PROGRAMS else 32
        cfg = (
            fwd_m, 256 if fwd_m >= 64 else 128, 64, 8 if fwd_m >= 64 else 4, 3, False,
            bwd_m, 128 if bwd_m == 64 else 64, 64, bwd_dc, 8 if bwd_m == 64 else 4, 2, chunks,
        )
    fm, fn, fd, fw, fs, fused, bm, bn, bd, bdc, bw, bs, *chunks = cfg
    n = n2 // 2  # row blocks tile a and b separately
    cfg = KernelConfig(
        _clamp_block(fm, n), _clamp_block(fn, n), _clamp_block(fd, d), fw, fs, fused,
        _clamp_block(bm, n), _clamp_block(bn, n), _clamp_block(bd, d), _clamp_block(bdc, d), bw, bs, *chunks,
        bwd_fold=dtype != torch.float32 and n2 > 1024,
    )
    if stripes and dtype != torch.float32 and n2 > STRIPES_MIN_ROWS:
        cfg = with_stripes(cfg, n, d, *STRIPES_DEFAULT)
    return cfg


def _dot_precision(dtype: torch.dtype, cfg: KernelConfig) -> str:
    return cfg.fp32_dot if dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit inputs


def _dot_upcast(x: torch.Tensor) -> bool:
    # Only the Triton interpreter (CPU tensors) needs it, and only for bf16 (see `_dot`).
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


# Every launch of this file's kernels compiles without floating-point contraction (no mul + add -> fma). The
# backward recomputes each logit tile and must repeat the forward's rounding to the bit: with contraction the
# compiler may fuse `s2 * ... - lse2` into one fma in one kernel and not the other, and a logit of ~1/T then
# moves by up to half an ulp of 1/T (H100, Triton 3.6, fp32, 2026-11-27: gradient errors up to 1.8e-3 at
# T=1e-4, 0.22 at T=1e-6, non-finite at T=1e-9; at most 1.2e-7 at all three with contraction off). The
# interpreter never contracts.
# Timing cost measured in the same session (InfoNCE table, fp16, contraction off everywhere): none beyond noise.
_NO_FP_CONTRACTION = dict(enable_fp_fusion=False)


def norm_meta(n: int, d: int) -> dict:
    """`_row_norm_kernel`'s compile-time arguments and launch options (also read by
    benchmarks/kernel_registers.py, which compiles every launch configuration ahead of time)."""
    return dict(BLOCK_M=_clamp_block(64, n), BLOCK_D=_clamp_block(128, d), num_warps=4, **_NO_FP_CONTRACTION)


def fwd_meta(cfg: KernelConfig, dtype: torch.dtype, upcast: bool = False) -> dict:
    """`_infonce_fwd_kernel`'s compile-time arguments and launch options for `cfg` and the input dtype."""
    return dict(BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, BLOCK_D=cfg.fwd_d, NUM_SPLIT=cfg.fwd_split,
                FUSED_NORM=cfg.fused_norm,
                DOT_PRECISION=_dot_precision(dtype, cfg), DOT_UPCAST=upcast, num_warps=cfg.fwd_warps,
                num_stages=cfg.fwd_stages, **_NO_FP_CONTRACTION)


def _g_scale(cfg: KernelConfig, dtype: torch.dtype) -> float:
    # The factor on the backward's (G + G^T) tile before its 16-bit dot: the folded bf16/fp32 tiles need none.
    return 1.0 if cfg.bwd_fold and dtype != torch.float16 else _G_SCALE


def bwd_meta(cfg: KernelConfig, dtype: torch.dtype, upcast: bool = False) -> dict:
    """`_infonce_bwd_kernel`'s compile-time arguments and launch options for `cfg` and the input dtype."""
    return dict(G_SCALE=_g_scale(cfg, dtype), BLOCK_M=cfg.bwd_m, BLOCK_N=cfg.bwd_n, BLOCK_D=cfg.bwd_d,
                BLOCK_DC=cfg.bwd_dc, NUM_DC=cfg.bwd_chunks, NUM_SPLIT=cfg.bwd_split,
                DOT_PRECISION=_dot_precision(dtype, cfg),
                DOT_UPCAST=upcast, MM_FP16=dtype != torch.float32, FOLD_RINV=cfg.bwd_fold,
                SCALE_FP16=cfg.bwd_fold and dtype == torch.float16, TWO_NORMS=cfg.fused_norm,
                num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages, **_NO_FP_CONTRACTION)


def merge_meta(n: int) -> dict:
    """`_infonce_merge_kernel`'s compile-time arguments and launch options (one program over 2N rows)."""
    return dict(BLOCK=min(1024, triton.next_power_of_2(2 * n)), num_warps=4, **_NO_FP_CONTRACTION)


def finalize_meta(n: int, d: int) -> dict:
    """`_infonce_bwd_finalize_kernel`'s block sizes and launch options (its NUM_SPLIT is the config's)."""
    return dict(BLOCK_M=_clamp_block(16, n), BLOCK_DC=_clamp_block(256, d), num_warps=4, **_NO_FP_CONTRACTION)


def weights_meta(cfg: KernelConfig, dtype: torch.dtype, upcast: bool = False) -> dict:
    """`_infonce_bwd_weights_kernel`'s compile-time arguments and launch options (backward through stripes):
    the fused backward's for the same tiles, less what only that kernel takes (its gradient chunks and splits)."""
    meta = bwd_meta(cfg, dtype, upcast)
    return {k: meta[k] for k in ("G_SCALE", "BLOCK_M", "BLOCK_N", "BLOCK_D", "DOT_PRECISION", "DOT_UPCAST",
                                 "SCALE_FP16", "TWO_NORMS", "num_warps", "num_stages", *_NO_FP_CONTRACTION)}


def stripe_mm_meta(cfg: KernelConfig, dtype: torch.dtype, upcast: bool = False) -> dict:
    """`_infonce_bwd_stripe_mm_kernel`'s compile-time arguments and launch options (without ACCUMULATE)."""
    return dict(BLOCK_M=cfg.mm_m, BLOCK_DC=cfg.mm_dc, BLOCK_K=cfg.mm_k, DOT_PRECISION=_dot_precision(dtype, cfg),
                DOT_UPCAST=upcast, num_warps=cfg.mm_warps, num_stages=cfg.mm_stages, **_NO_FP_CONTRACTION)


def stripe_finalize_meta(rows: int, d: int, dtype: torch.dtype) -> dict:
    """`_infonce_bwd_stripe_finalize_kernel`'s compile-time arguments and launch options."""
    return dict(BLOCK_M=_clamp_block(16, rows), BLOCK_DC=_clamp_block(256, d), SCALE_FP16=dtype == torch.float16,
                num_warps=4, **_NO_FP_CONTRACTION)


def _forward(a, b, temperature: float, reduction: str, cfg: KernelConfig):
    # a, b: (N, D), same dtype/device, unit stride along D. Returns norms: (2, 2N) fp32, the norms of x as
    # rows and as columns (one tensor twice unless the norms are fused), lse2: (2N,) fp32 (both saved for
    # the backward) and the loss as `reduction` asks: 0-dim ("mean"/"sum") or (2N,) ("none"), fp32.
    n, d = a.shape
    n2 = 2 * n
    saved = torch.empty((3, n2), device=a.device, dtype=torch.float32)
    norms = saved[:2] if cfg.fused_norm else saved[0].expand(2, n2)
    norm, lse2 = saved[0], saved[2]
    loss = torch.empty(n2, device=a.device, dtype=torch.float32)  # its own storage: "none" returns it
    split = cfg.fwd_split
    part = torch.empty((3, split, n2), device=a.device, dtype=torch.float32) if split > 1 else lse2
    if not cfg.fused_norm:
        meta = norm_meta(n, d)
        _row_norm_kernel[(2 * triton.cdiv(n, meta["BLOCK_M"]),)](a, b, norm, n, d, a.stride(0), b.stride(0), **meta)
    _infonce_fwd_kernel[(2 * triton.cdiv(n, cfg.fwd_m), split)](
        a, b, norm, norms[1], lse2, loss, part, n, d, a.stride(0), b.stride(0), _LOG2E / temperature, _EPS,
        **fwd_meta(cfg, a.dtype, _dot_upcast(a)),
    )
    if split > 1:  # the merge launch writes lse2 and loss and reduces the loss itself
        total = torch.empty((), device=a.device, dtype=torch.float32)
        _infonce_merge_kernel[(1,)](part, lse2, loss, total, n2, 1.0 / n2 if reduction == "mean" else 1.0,
                                    NUM_SPLIT=split, **merge_meta(n))
        return norms, lse2, (loss if reduction == "none" else total)
    return norms, lse2, (loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss)


def _backward(a, b, norms, lse2, grad, temperature: float, reduction: str, cfg: KernelConfig):
    # norms, lse2: as _forward returned them. grad: 0-dim ("mean"/"sum") or (2N,) ("none") fp32.
    # Returns da, db: (N, D) contiguous, dtype of a.
    n, d = a.shape
    n2 = 2 * n
    grad = grad.to(torch.float32)
    if reduction == "none":
        w, w_stride = grad, grad.stride(0)
        wref = torch.linalg.vector_norm(grad, ord=math.inf)  # device scalar, no host sync
        w_scale = 1.0
    else:
        w, w_stride, wref = grad, 0, grad
        w_scale = 1.0 / n2 if reduction == "mean" else 1.0
    da = torch.empty((n, d), device=a.device, dtype=a.dtype)
    db = torch.empty((n, d), device=a.device, dtype=a.dtype)
    scale2, out_scale = _LOG2E / temperature, w_scale / (temperature * _g_scale(cfg, a.dtype))
    if cfg.stripe_rows:
        _backward_stripes(a, b, norms, lse2, w, w_stride, wref, scale2, out_scale, cfg, da, db)
        return da, db
    split = cfg.bwd_split
    if split > 1:  # the splits' shares of dz and z . dz, summed by the finalize launch
        part = torch.empty((split, n2, d), device=a.device, dtype=torch.float32)
        zpart = torch.empty((split, n2), device=a.device, dtype=torch.float32)
    else:
        part = zpart = lse2  # not read
    grid = (2 * triton.cdiv(n, cfg.bwd_m), triton.cdiv(d, cfg.bwd_dc * cfg.bwd_chunks), split)
    _infonce_bwd_kernel[grid](
        a, b, norms[0], norms[1], lse2, w, wref, da, db, part, zpart,
        n, d, a.stride(0), b.stride(0), da.stride(0), db.stride(0), w_stride,
        scale2, out_scale, w_scale * _LN2, _EPS, **bwd_meta(cfg, a.dtype, _dot_upcast(a)),
    )
    if split > 1:
        meta = finalize_meta(n, d)
        _infonce_bwd_finalize_kernel[(2 * triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_DC"]))](
            a, b, norms[0], part, zpart, da, db, n, d, a.stride(0), b.stride(0), da.stride(0), db.stride(0), _EPS,
            NUM_SPLIT=split, **meta,
        )
    return da, db


def _backward_stripes(a, b, norms, lse2, w, w_stride, wref, scale2: float, out_scale: float, cfg: KernelConfig,
                      da, db) -> None:
    # The backward through stripes (KernelConfig.stripe_rows): for each stripe of rows of a, then of b, the
    # weights and product launches over the column blocks of a, then of b (views: stripes and blocks never
    # straddle the two), then the stripe's finalize launch writes its rows of da or db. Views and grids are
    # made once: at N=16384 with 2048 x 2048 stripes this is 528 launches (529 in fp16: its
    # scale), and host time per launch counts.
    n, d = a.shape
    rows_max, cols_max = min(cfg.stripe_rows, n), min(cfg.stripe_cols, n)
    wt = torch.empty((rows_max, cols_max), device=a.device, dtype=a.dtype)  # the tile block, reused
    dz = torch.empty((rows_max, d), device=a.device, dtype=torch.float32)  # the stripe's sum, reused
    norm, norm_col = norms[0], norms[1]
    rmax = wref  # read by fp16 launches only
    if a.dtype == torch.float16:  # the folded tiles' scale, one device scalar: no host sync
        rmax = torch.empty((), device=a.device, dtype=torch.float32)
        _rinv_max_kernel[(1,)](norm, rmax, 2 * n, _EPS)
    upcast = _dot_upcast(a)
    w_meta, mm_meta = weights_meta(cfg, a.dtype, upcast), stripe_mm_meta(cfg, a.dtype, upcast)
    fin_meta = stripe_finalize_meta(rows_max, d, a.dtype)
    # (view of x, its first row's index in cat(a, b), rows) for the stripes and for the column blocks
    stripes = [(x[r0:], dx[r0:], seg * n + r0, min(rows_max, n - r0))
               for seg, (x, dx) in enumerate(((a, da), (b, db))) for r0 in range(0, n, rows_max)]
    blocks = [(x[c0:], seg * n + c0, min(cols_max, n - c0)) for seg, x in enumerate((a, b)) for c0 in range(0, n, cols_max)]
    for x_i, dx, row0, rows in stripes:
        w_rows, mm_grid = triton.cdiv(rows, cfg.bwd_m), (triton.cdiv(rows, cfg.mm_m), triton.cdiv(d, cfg.mm_dc))
        for k, (x_j, col0, cols) in enumerate(blocks):
            _infonce_bwd_weights_kernel[(w_rows, triton.cdiv(cols, cfg.bwd_n))](
                x_i, x_j, norm, norm_col, lse2, w, wref, rmax, wt, rows, cols, n, d, x_i.stride(0), x_j.stride(0),
                wt.stride(0), w_stride, row0, col0, scale2, _EPS, **w_meta,
            )
            _infonce_bwd_stripe_mm_kernel[mm_grid](
                wt, x_j, dz, rows, cols, d, wt.stride(0), x_j.stride(0), ACCUMULATE=k > 0, **mm_meta,
            )
        _infonce_bwd_stripe_finalize_kernel[(triton.cdiv(rows, fin_meta["BLOCK_M"]),)](
            x_i, dz, norm, wref, rmax, dx, rows, d, x_i.stride(0), dx.stride(0), row0, out_scale, _EPS, **fin_meta,
        )


def warm_up(n_values, d: int, dtype: torch.dtype, device) -> None:
    """Compile the kernels `info_nce` will launch for (N, D) inputs of `dtype` on `device`, N in `n_values`,
    by running forward and backward once on constant scratch inputs laid out as the training step's: one
    (2N, D) tensor split in two, a 0-dim fp32 grad_output. Triton compiles per specialization (dtypes,
    16-byte alignment, ints divisible by 16 or equal to 1), so a later call with the same layout finds its
    kernels compiled; any it does not find it compiles then, as without this. No random numbers drawn."""
    for n in sorted(set(n_values)):
        views = torch.ones((2 * n, d), device=device, dtype=dtype)  # (2N, D)
        a, b = views[:n], views[n:]
        cfg = pick_config(2 * n, d, dtype)
        with torch.cuda.device_of(views):
            norms, lse2, _ = _forward(a, b, 1.0, "mean", cfg)
            _backward(a, b, norms, lse2, torch.ones((), device=device), 1.0, "mean", cfg)


# ----------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------


class InfoNCEFunction(torch.autograd.Function):
    """NT-Xent with the fused kernels. Inputs are used in their own dtype (autocast does not recast them:
    the kernels accumulate in fp32 whatever the input dtype); the loss is fp32."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, a, b, temperature, reduction, cfg):
        with torch.cuda.device_of(a):  # Triton launches on the current device: make it the inputs'
            norms, lse2, loss = _forward(a, b, temperature, reduction, cfg)
        ctx.save_for_backward(a, b, norms, lse2)
        ctx.temperature, ctx.reduction, ctx.cfg = temperature, reduction, cfg
        return loss

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @first_derivative_only(_NO_SECOND_DERIVATIVE)  # the kernels' gradients carry no graph of their own
    def backward(ctx, grad):
        a, b, norms, lse2 = ctx.saved_tensors
        with torch.cuda.device_of(a):
            da, db = _backward(a, b, norms, lse2, grad, ctx.temperature, ctx.reduction, ctx.cfg)
        return (da if ctx.needs_input_grad[0] else None), (db if ctx.needs_input_grad[1] else None), None, None, None


def _prepare(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()  # rows may have any stride; elements within a row must be adjacent
    return x


def info_nce_triton(
    a: torch.Tensor, b: torch.Tensor, temperature: float, reduction: str, *, config: KernelConfig | None = None
) -> torch.Tensor:
    """Fused NT-Xent; same semantics and input checks as `info_nce(..., backend="triton")`, with the kernel's
    launch options at hand: `config` overrides the heuristic block sizes (tests, tuning).

    a, b: (N, D) fp16/bf16/fp32 (fp64 is computed in fp32), any strides. Returns fp32: a scalar
    ("mean", "sum") or (2N,) ("none").
    """
    validate_inputs(a, b, temperature, reduction)
    if config is not None and not isinstance(config, KernelConfig):
        raise MirrorfastError(f"info_nce_triton: config must be a KernelConfig, got {type(config).__name__}")
    check_triton_runs_on(a.device, "info_nce_triton")
    return fused_info_nce(a, b, float(temperature), reduction, config=config)


def fused_info_nce(
    a: torch.Tensor, b: torch.Tensor, temperature: float, reduction: str, *, config: KernelConfig | None = None
) -> torch.Tensor:
    """`info_nce_triton` for inputs `info_nce` has already checked."""
    if a.device.type == "cpu" and isinstance(_row_norm_kernel, triton.runtime.JITFunction):
        # Triton picks interpreter or compiler when a kernel is defined: these were defined without it.
        raise MirrorfastError("info_nce: TRITON_INTERPRET=1 was set after mirrorfast's Triton kernels were "
                              "imported; set it before importing mirrorfast (Triton reads it when a kernel is defined)")
    dtype = torch.promote_types(a.dtype, b.dtype)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dtype = torch.float32
    a, b = _prepare(a, dtype), _prepare(b, dtype)
    cfg = config if config is not None else pick_config(2 * a.shape[0], a.shape[1], dtype)
    return InfoNCEFunction.apply(a, b, float(temperature), reduction, cfg)

"""Dropout + residual add + LayerNorm in one kernel each way: kernels, launch helpers, autograd.Function and
`dropout_add_layer_norm`.

Why: every BERT sublayer ends with LayerNorm(dropout(h) + residual) (Hugging Face's BertSelfOutput and
BertOutput), which PyTorch runs as separate dropout, add and LayerNorm kernels each way (and, under
autocast, a cast of the gradient), each a full pass over a (tokens x hidden) tensor; 24 such sublayers a
BERT-base step. Here one program owns BLOCK_R rows, each held whole in registers (hidden <= MAX_HIDDEN).

Definition, per row (H features):
    s = residual + h * keep / (1 - p)        keep ~ Bernoulli(1 - p), Philox from a seed in a device tensor
    y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias      (biased variance, as nn.LayerNorm)
computed in fp32 whatever the input dtypes, with s rounded to and y stored in the promoted dtype of h,
residual and weight, as the unfused ops give them (fp32 under autocast, whose residual stream and LayerNorm
are fp32; the half dtype for a --half-model model). The keep mask is never stored: the backward redraws it.

Backward, with x = (s - mean) * rstd and g = dy * weight:
    ds = rstd * (g - mean(g) - x * mean(g * x));  d residual = ds;  dh = ds * keep / (1 - p)
    d weight = sum over rows of dy * x;  d bias = sum over rows of dy
The weight/bias gradients are summed per program into a (programs, H) fp32 buffer and then over programs by
torch (a fixed order: bit-identical reruns, no atomics). No host synchronization (CUDA-graph capturable).
"""

import torch
import triton
import triton.language as tl

from mirrorfast.kernels.functional import dropout_seed, first_derivative_only

__all__ = ["dropout_add_layer_norm", "DropoutAddLayerNormFunction", "keep_mask", "MAX_HIDDEN", "warm_up"]
_NO_SECOND_DERIVATIVE = ("the fused residual-LayerNorm kernels have no second derivative: differentiate twice "
                         "without MIRRORFAST_FUSED_LAYERNORM")

MAX_HIDDEN = 8192  # one row per register tile


@triton.jit
def _keep(seed_ptr, rows, cols, H, p_drop):
    # Dropout's keep decisions for rows x cols, (BLOCK_R, BLOCK_H) bool: one Philox element per (row, column),
    # the same numbers in the forward, the backward and `keep_mask`.
    return tl.rand(tl.load(seed_ptr), rows[:, None] * H + cols[None, :]) >= p_drop


@triton.jit
def _fwd_kernel(
    h_ptr, res_ptr,  # (T, H) each, row stride H
    w_ptr, b_ptr,  # (H,)
    y_ptr, s_ptr,  # (T, H) out: the normalized output, and s = residual + dropout(h) for the backward
    mean_ptr, rstd_ptr,  # (T,) fp32 out
    seed_ptr,  # (1,) int64 Philox seed (read only if DROPOUT)
    T, H, eps, p_drop,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, DROPOUT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = tl.arange(0, BLOCK_H)  # (BLOCK_H,)
    ok = (rows < T)[:, None] & (cols < H)[None, :]  # (BLOCK_R, BLOCK_H)
    offsets = rows.to(tl.int64)[:, None] * H + cols[None, :]
    h = tl.load(h_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    if DROPOUT:
        h = tl.where(_keep(seed_ptr, rows, cols, H, p_drop), h / (1.0 - p_drop), 0.0)
    s_stored = (tl.load(res_ptr + offsets, mask=ok, other=0.0).to(tl.float32) + h).to(s_ptr.dtype.element_ty)
    # Normalize s as it is stored (rounded to a half dtype, as the unfused add gives it): the backward
    # recomputes x from the stored s, so both passes must see the same numbers.
    s = s_stored.to(tl.float32)
    mean = tl.sum(s, axis=1) / H  # (BLOCK_R,)
    centered = tl.where(ok, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / H + eps)
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + offsets, s_stored, mask=ok)
    tl.store(mean_ptr + rows, mean, mask=rows < T)
    tl.store(rstd_ptr + rows, rstd, mask=rows < T)


@triton.jit
def _bwd_kernel(
    dy_ptr, s_ptr,  # (T, H): the output's gradient, and s saved by the forward
    w_ptr, mean_ptr, rstd_ptr,  # (H,), (T,), (T,)
    dh_ptr, dres_ptr,  # (T, H) out, in the dtypes of h and residual
    dw_part_ptr, db_part_ptr,  # (programs, H) fp32 out: this program's sums over its rows
    seed_ptr,
    T, H, p_drop,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    ok = (rows < T)[:, None] & (cols < H)[None, :]
    offsets = rows.to(tl.int64)[:, None] * H + cols[None, :]
    dy = tl.load(dy_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + rows, mask=rows < T, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rows < T, other=0.0)
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    x = tl.where(ok, (s - mean[:, None]) * rstd[:, None], 0.0)  # (BLOCK_R, BLOCK_H)
    g = dy * w[None, :]
    c_gx = tl.sum(g * x, axis=1) / H
    c_g = tl.sum(g, axis=1) / H
    ds = tl.where(ok, (g - x * c_gx[:, None] - c_g[:, None]) * rstd[:, None], 0.0)
    tl.store(dres_ptr + offsets, ds.to(dres_ptr.dtype.element_ty), mask=ok)
    if DROPOUT:
        ds = tl.where(_keep(seed_ptr, rows, cols, H, p_drop), ds / (1.0 - p_drop), 0.0)
    tl.store(dh_ptr + offsets, ds.to(dh_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_part_ptr + pid * H + cols, tl.sum(dy * x, axis=0), mask=cols < H)
    tl.store(db_part_ptr + pid * H + cols, tl.sum(dy, axis=0), mask=cols < H)


@triton.jit
def _keep_kernel(seed_ptr, out_ptr, T, H, p_drop, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    ok = (rows < T)[:, None] & (cols < H)[None, :]
    keep = _keep(seed_ptr, rows, cols, H, p_drop)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :], keep.to(tl.int8), mask=ok)


# ----------------------------------------------------------------------------------------------------
# Launch helpers and autograd
# ----------------------------------------------------------------------------------------------------


def _launch_args(h_dim: int) -> dict:
    block_h = triton.next_power_of_2(h_dim)
    # ~4K elements a program (4 rows of 768 -> 1024): registers for the row tiles, enough programs to fill a GPU.
    block_r = max(1, min(16, 4096 // block_h))
    return dict(BLOCK_R=block_r, BLOCK_H=block_h, num_warps=4 if block_h <= 1024 else 8)


def keep_mask(seed: torch.Tensor, rows: int, h_dim: int, p: float) -> torch.Tensor:
    """The keep decisions the kernels draw for `seed` (a (1,) int64 device tensor): (rows, h_dim) bool.
    For tests and debugging (the kernels never store it)."""
    out = torch.empty((rows, h_dim), dtype=torch.int8, device=seed.device)
    args = _launch_args(h_dim)
    with torch.cuda.device_of(seed):
        _keep_kernel[(triton.cdiv(rows, args["BLOCK_R"]),)](seed, out, rows, h_dim, float(p), **args)
    return out.bool()


class DropoutAddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, residual, weight, bias, eps: float, p: float, seed):
        # h, residual: (T, H) contiguous; weight, bias: (H,); seed: (1,) int64 on the device.
        n_rows, h_dim = h.shape
        out_dtype = torch.promote_types(torch.promote_types(h.dtype, residual.dtype), weight.dtype)
        y = torch.empty((n_rows, h_dim), dtype=out_dtype, device=h.device)
        s = torch.empty_like(y)
        mean, rstd = torch.empty((2, n_rows), dtype=torch.float32, device=h.device).unbind(0)
        args = _launch_args(h_dim)
        with torch.cuda.device_of(h):  # Triton launches on the current device: make it the inputs'
            _fwd_kernel[(triton.cdiv(n_rows, args["BLOCK_R"]),)](
                h, residual, weight, bias, y, s, mean, rstd, seed, n_rows, h_dim, float(eps), float(p),
                DROPOUT=p > 0, **args,
            )
        ctx.save_for_backward(s, weight, mean, rstd, seed)
        ctx.p, ctx.h_dtype, ctx.res_dtype, ctx.bias_dtype = p, h.dtype, residual.dtype, bias.dtype
        return y

    @staticmethod
    @first_derivative_only(_NO_SECOND_DERIVATIVE)  # the kernels' gradients carry no graph of their own
    def backward(ctx, dy):
        s, weight, mean, rstd, seed = ctx.saved_tensors
        dy = dy.contiguous()
        n_rows, h_dim = s.shape
        args = _launch_args(h_dim)
        programs = triton.cdiv(n_rows, args["BLOCK_R"])
        dh = torch.empty((n_rows, h_dim), dtype=ctx.h_dtype, device=s.device)
        dres = torch.empty((n_rows, h_dim), dtype=ctx.res_dtype, device=s.device)
        dw_part, db_part = torch.empty((2, programs, h_dim), dtype=torch.float32, device=s.device).unbind(0)
        with torch.cuda.device_of(s):
            _bwd_kernel[(programs,)](
                dy, s, weight, mean, rstd, dh, dres, dw_part, db_part, seed, n_rows, h_dim, float(ctx.p),
                DROPOUT=ctx.p > 0, **args,
            )
        dw = dw_part.sum(0).to(weight.dtype)
        db = db_part.sum(0).to(ctx.bias_dtype)
        return dh, dres, dw, db, None, None, None


def dropout_add_layer_norm(h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float, p: float = 0.0, training: bool = True,
                           seed: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm(dropout(h) + residual) over the last dimension, fused (see the module docstring).

    h, residual: (..., H) fp16/bf16/fp32 (any mix); weight, bias: (H,). Dropout only when training and p > 0,
    drawn from `seed` ((1,) int64 on the device) or a fresh one from torch's generator. Returns (..., H) in the
    promoted dtype of h, residual and weight."""
    if h.shape != residual.shape or h.shape[-1] != weight.shape[0] or bias.shape != weight.shape:
        raise ValueError(f"dropout_add_layer_norm: shapes {tuple(h.shape)}, {tuple(residual.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(bias.shape)} do not fit")
    h_dim = h.shape[-1]
    if h_dim > MAX_HIDDEN:
        raise ValueError(f"dropout_add_layer_norm: hidden size {h_dim} is over {MAX_HIDDEN}")
    p = float(p) if training else 0.0
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_add_layer_norm: p must be in [0, 1), got {p}")
    if h.numel() >= 2**31:
        raise ValueError("dropout_add_layer_norm: too many elements for 32-bit dropout offsets")
    seed = dropout_seed(seed, p, h.device, "dropout_add_layer_norm")
    lead = h.shape[:-1]
    y = DropoutAddLayerNormFunction.apply(h.reshape(-1, h_dim).contiguous(), residual.reshape(-1, h_dim).contiguous(),
                                          weight.contiguous(), bias.contiguous(), float(eps), p, seed)
    return y.view(*lead, h_dim)


def warm_up(rows: int, h_dim: int, h_dtype: torch.dtype, residual_dtype: torch.dtype, param_dtype: torch.dtype,
            p: float, device) -> None:
    """Compile the forward and backward kernels for `rows` x h_dim inputs of these dtypes (Triton specializes
    on whether `rows` is a multiple of 16), by running them once on constant inputs. Its dropout seed is fixed,
    not drawn from torch's generator: warming up (or not) leaves a seeded run's random stream as it was."""
    h = torch.ones((rows, h_dim), dtype=h_dtype, device=device, requires_grad=True)
    residual = torch.ones((rows, h_dim), dtype=residual_dtype, device=device, requires_grad=True)
    weight = torch.ones(h_dim, dtype=param_dtype, device=device, requires_grad=True)
    bias = torch.zeros(h_dim, dtype=param_dtype, device=device, requires_grad=True)
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    y = dropout_add_layer_norm(h, residual, weight, bias, 1e-12, p, seed=seed)
    y.backward(torch.ones_like(y))

"""Attention over packed short views in one tile each: kernels, launch helpers, autograd.Function and
`packed_attention_triton`.

Why: Mirror-BERT's views are short (the paper's sentences average 14 tokens, at most max_length 50), and
FlashAttention's variable-length kernels work in 128-token tiles: on an H200 they spent 555 µs per BERT-base
layer (forward + backward) on such views (benchmarks/RESULTS.md). Here one program owns one (view, head)
and holds the whole view in a single BLOCK_L x BLOCK_L tile: logits, softmax, dropout and the output in
registers, nothing written but the output. Tiles come in length classes (16, 32, 64, 128 tokens), one launch
per class up to the batch's longest view; a program whose view belongs to another class returns at once, so
a 14-token view gets a 16-token tile even when one view of the batch is 90 tokens long.

Definition, per view v (tokens cu_seqlens[v] .. cu_seqlens[v+1]) and head h:
    P = softmax(Q K^T * scale) over the view's own keys;  O = dropout(P) V
dropout(P) = P * keep / (1 - p) with keep ~ Bernoulli(1 - p), drawn with Philox from a seed held in a
device tensor (drawn by torch per forward: new masks on every CUDA-graph replay) and the element's
(view, head, row, column) index (laid out as if every tile were MAX_VIEW_TOKENS wide, whatever its class),
so the backward redraws the same mask instead of storing it.

Backward (recomputes P and the mask; no logsumexp saved): dPd = dO V^T, dP = dPd * keep / (1 - p),
dS = P (dP - rowsum(P dP)), dQ = dS K * scale, dK = dS^T Q * scale, dV = dropout(P)^T dO. Every gradient row
belongs to one view and is written by exactly one program: no atomics, bit-identical reruns. No host
synchronization (CUDA-graph capturable); max_len is a host int given by the caller.
"""

import torch
import triton
import triton.language as tl

from mirrorfast.kernels.functional import compile_in_parallel, dropout_seed, first_derivative_only

__all__ = ["packed_attention_triton", "PackedAttentionFunction", "MAX_VIEW_TOKENS", "MAX_VIEWS_X_HEADS", "unsupported",
           "warm_up"]
_NO_SECOND_DERIVATIVE = ("the packed-attention Triton kernels have no second derivative: differentiate twice with "
                         "MIRRORFAST_PACKED_ATTENTION=sdpa")

MAX_VIEW_TOKENS = 128  # one register tile per (view, head): longer views go to FlashAttention
# Dropout's Philox offsets are laid out as (view, head, row, column) in int32: views x heads per call at most.
MAX_VIEWS_X_HEADS = 2**31 // MAX_VIEW_TOKENS**2 - 1


@triton.jit
def _dot(x, y, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # fp32-accumulated x @ y. UPCAST under TRITON_INTERPRET=1 only (its 16-bit dot is not faithful); IEEE for
    # fp32 inputs (exact products, as the reference).
    if UPCAST or IEEE:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(x, y)


@triton.jit
def _view(cu_ptr):
    # This program's view (grid: views x heads): its index, first token and length.
    view = tl.program_id(0)
    start = tl.load(cu_ptr + view)
    return view, start, tl.load(cu_ptr + view + 1) - start


@triton.jit
def _view_tiles(q_ptr, k_ptr, v_ptr, start, n, stride_t, stride_h, D, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    # This program's head and the view's rows of Q, K, V: (BLOCK_L, BLOCK_D) each, zeros past the view and D.
    head = tl.program_id(1)
    offs_l = tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = offs_l < n
    mask = row_ok[:, None] & (offs_d < D)[None, :]
    offsets = (start + offs_l).to(tl.int64)[:, None] * stride_t + head * stride_h + offs_d[None, :]
    q = tl.load(q_ptr + offsets, mask=mask, other=0.0)
    k = tl.load(k_ptr + offsets, mask=mask, other=0.0)
    v = tl.load(v_ptr + offsets, mask=mask, other=0.0)
    return head, q, k, v, offsets, mask, row_ok


@triton.jit
def _probabilities(q, k, row_ok, scale, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # Softmax over the view's keys, (BLOCK_L, BLOCK_L) fp32; rows past the view are never stored.
    s = _dot(q, tl.trans(k), UPCAST, IEEE) * scale
    s = tl.where(row_ok[None, :], s, float("-inf"))  # keys past the view
    s = s - tl.max(s, axis=1)[:, None]
    p = tl.exp(s)
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _keep(seed_ptr, view, head, H, BLOCK_L: tl.constexpr, MAX_L: tl.constexpr):
    # Dropout's keep draws, (BLOCK_L, BLOCK_L) uniform [0, 1), one Philox stream element per
    # (view, head, row, column), indexed as in a MAX_L x MAX_L tile whatever BLOCK_L is: the forward and
    # the backward draw the same numbers, and so does any length class.
    offs_l = tl.arange(0, BLOCK_L)
    base = (view * H + head) * (MAX_L * MAX_L)
    return tl.rand(tl.load(seed_ptr), base + offs_l[:, None] * MAX_L + offs_l[None, :])


@triton.jit
def _in_class(n, LOW: tl.constexpr, BLOCK_L: tl.constexpr, top_l):
    # This launch's views: LOW < n <= BLOCK_L. The last launch also takes views longer than its tile, which
    # only a max_len below the batch's longest view lets through: their first BLOCK_L rows come out NaN
    # (a NaN loss, not rows left unwritten), since checking max_len on the host would need a device sync.
    return (n > LOW) & ((n <= BLOCK_L) | (BLOCK_L >= top_l))


@triton.jit
def _nan_if_longer(x, n, BLOCK_L: tl.constexpr):
    # x for a view that fits the tile; NaN for one longer than max_len (see _in_class): loud, not wrong.
    return tl.where(n > BLOCK_L, float("nan"), x)


@triton.jit
def _packed_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # (T, H, D), same strides, unit stride along D
    o_ptr,  # (T, H, D) out, same strides as q
    cu_ptr,  # (S + 1,) int32 view boundaries
    seed_ptr,  # (1,) int64 Philox seed (read only if DROPOUT)
    stride_t, stride_h, H, D,
    scale, p_drop,
    top_l,  # the tile size of the last launch's class (a runtime int: one compiled kernel per class)
    LOW: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, MAX_L: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    view, start, n = _view(cu_ptr)
    if _in_class(n, LOW, BLOCK_L, top_l):
        head, q, k, v, offsets, mask, row_ok = _view_tiles(q_ptr, k_ptr, v_ptr, start, n, stride_t, stride_h, D,
                                                           BLOCK_L, BLOCK_D)
        p = _probabilities(q, k, row_ok, scale, UPCAST, IEEE)  # (BLOCK_L, BLOCK_L)
        if DROPOUT:
            p = tl.where(_keep(seed_ptr, view, head, H, BLOCK_L, MAX_L) >= p_drop, p / (1.0 - p_drop), 0.0)
        o = _dot(p.to(v.dtype), v, UPCAST, IEEE)  # (BLOCK_L, BLOCK_D)
        o = _nan_if_longer(o, n, BLOCK_L)
        tl.store(o_ptr + offsets, o.to(q.dtype), mask=mask)


@triton.jit
def _packed_attention_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # (T, H, D), same strides
    dq_ptr, dk_ptr, dv_ptr,  # (T, H, D) out, same strides
    cu_ptr, seed_ptr,
    stride_t, stride_h, H, D,
    scale, p_drop,
    top_l,
    LOW: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, MAX_L: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    view, start, n = _view(cu_ptr)
    if _in_class(n, LOW, BLOCK_L, top_l):
        head, q, k, v, offsets, mask, row_ok = _view_tiles(q_ptr, k_ptr, v_ptr, start, n, stride_t, stride_h, D,
                                                           BLOCK_L, BLOCK_D)
        do = tl.load(do_ptr + offsets, mask=mask, other=0.0)  # (BLOCK_L, BLOCK_D), zero rows past the view
        p = _probabilities(q, k, row_ok, scale, UPCAST, IEEE)  # (BLOCK_L, BLOCK_L)
        dp = _dot(do, tl.trans(v), UPCAST, IEEE)  # d(dropped P), (BLOCK_L, BLOCK_L)
        if DROPOUT:
            keep = _keep(seed_ptr, view, head, H, BLOCK_L, MAX_L) >= p_drop
            pd = tl.where(keep, p / (1.0 - p_drop), 0.0)
            dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
        else:
            pd = p
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])  # softmax backward, (BLOCK_L, BLOCK_L)
        dq = _dot(ds.to(k.dtype), k, UPCAST, IEEE) * scale
        dk = _dot(tl.trans(ds).to(q.dtype), q, UPCAST, IEEE) * scale
        dv = _dot(tl.trans(pd).to(do.dtype), do, UPCAST, IEEE)
        dq, dk, dv = _nan_if_longer(dq, n, BLOCK_L), _nan_if_longer(dk, n, BLOCK_L), _nan_if_longer(dv, n, BLOCK_L)
        tl.store(dq_ptr + offsets, dq.to(q.dtype), mask=mask)
        tl.store(dk_ptr + offsets, dk.to(q.dtype), mask=mask)
        tl.store(dv_ptr + offsets, dv.to(q.dtype), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launch helpers and autograd
# ----------------------------------------------------------------------------------------------------


LENGTH_CLASSES = (16, 32, 64, MAX_VIEW_TOKENS)  # tile sizes (tl.dot needs every dimension >= 16)
# Warps per class, from registers and spills for bf16, head dim 64, dropout on (ptxas for sm_90a through
# Triton 3.9, `benchmarks/kernel_registers.py` with the JIT's argument specialization, 2026-11-26): up to 64
# tokens no count of 4/8/16 spills (the 64-token backward: 168 registers at 4 warps, 119 at 8); the 128-token
# class spills at every count, least at 8 (forward 36 bytes, backward 774; 986 at 16, 6,934 at 4). Not timed.
_CLASS_WARPS = {16: 4, 32: 4, 64: 8, MAX_VIEW_TOKENS: 8}


def _class_launches(q: torch.Tensor, max_len: int, dropout_p: float) -> list[dict]:
    """Launch arguments for each length class up to the one holding max_len: views of LOW < n <= BLOCK_L tokens."""
    common = dict(BLOCK_D=max(16, triton.next_power_of_2(q.shape[2])), MAX_L=MAX_VIEW_TOKENS, DROPOUT=dropout_p > 0,
                  UPCAST=q.device.type == "cpu" and q.dtype != torch.float32, IEEE=q.dtype == torch.float32)
    top = next(b for b in LENGTH_CLASSES if b >= max_len)
    lows = (0, *LENGTH_CLASSES[:-1])
    return [dict(common, top_l=top, LOW=low, BLOCK_L=block, num_warps=_CLASS_WARPS[block])
            for low, block in zip(lows, LENGTH_CLASSES) if block <= top]


def _forward_launches(q, k, v, out, cu_seqlens, seed, max_len: int, dropout_p: float, scale: float) -> list[tuple]:
    """(kernel, grid, arguments, compile-time arguments) of the forward's launch for each length class."""
    heads = q.shape[1]
    args = (q, k, v, out, cu_seqlens, seed, q.stride(0), q.stride(1), heads, q.shape[2], float(scale), float(dropout_p))
    return [(_packed_attention_fwd_kernel, (cu_seqlens.shape[0] - 1, heads), args, meta)
            for meta in _class_launches(q, max_len, dropout_p)]


def _backward_launches(q, k, v, grad_out, dq, dk, dv, cu_seqlens, seed, max_len: int, dropout_p: float,
                       scale: float) -> list[tuple]:
    """As _forward_launches, for the backward (grad_out, dq, dk, dv laid out as q)."""
    heads = q.shape[1]
    args = (q, k, v, grad_out, dq, dk, dv, cu_seqlens, seed, q.stride(0), q.stride(1), heads, q.shape[2],
            float(scale), float(dropout_p))
    return [(_packed_attention_bwd_kernel, (cu_seqlens.shape[0] - 1, heads), args, meta)
            for meta in _class_launches(q, max_len, dropout_p)]


def _launch(launches: list[tuple]) -> None:
    for kernel, grid, args, meta in launches:
        kernel[grid](*args, **meta)


class PackedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_len: int, dropout_p: float, scale: float, seed: torch.Tensor):
        out = torch.empty_like(q)
        with torch.cuda.device_of(q):  # Triton launches on the current device: make it the inputs'
            _launch(_forward_launches(q, k, v, out, cu_seqlens, seed, max_len, dropout_p, scale))
        ctx.save_for_backward(q, k, v, cu_seqlens, seed)
        ctx.max_len, ctx.dropout_p, ctx.scale = max_len, dropout_p, scale
        return out

    @staticmethod
    @first_derivative_only(_NO_SECOND_DERIVATIVE)  # the kernels' gradients carry no graph of their own
    def backward(ctx, grad_out):
        q, k, v, cu_seqlens, seed = ctx.saved_tensors
        grad_out = grad_out.to(q.dtype).contiguous()  # the kernels read it with q's (contiguous) strides
        dq, dk, dv = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)
        with torch.cuda.device_of(q):
            _launch(_backward_launches(q, k, v, grad_out, dq, dk, dv, cu_seqlens, seed, ctx.max_len, ctx.dropout_p,
                                       ctx.scale))
        return dq, dk, dv, None, None, None, None, None


def packed_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_len: int, dropout_p: float = 0.0, scale: float | None = None,
                            seed: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: (T, H, D) of the packed views (fp16/bf16/fp32); cu_seqlens: (S + 1,) int32 view boundaries;
    max_len: a host int >= the longest view, at most MAX_VIEW_TOKENS (a longer view's rows come out NaN);
    seed: dropout's (1,) int64 Philox seed on the device (default: drawn from torch's generator).
    Returns (T, H, D) in q's dtype. cu_seqlens must cover all T rows (cu_seqlens[-1] == T, as the trainer's
    packed batches do: their padding tokens form segments of their own): rows past cu_seqlens[-1] are left
    unwritten in the output and the gradients, as in FlashAttention's varlen functions (checking would need
    a device sync)."""
    if not 1 <= max_len <= MAX_VIEW_TOKENS:
        raise ValueError(f"packed_attention_triton: max_len must be 1..{MAX_VIEW_TOKENS}, got {max_len}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"packed_attention_triton: dropout_p must be in [0, 1), got {dropout_p}")
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"packed_attention_triton: q, k, v must be (T, H, D) alike, got {q.shape}, {k.shape}, {v.shape}")
    seed = dropout_seed(seed, dropout_p, q.device, "packed_attention_triton")
    # One layout for all (inputs, output, gradients): contiguous (T, H, D). Attention functions of Hugging Face
    # models hand over views that are contiguous in this order already (no copy then).
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if (cu_seqlens.shape[0] - 1) * q.shape[1] > MAX_VIEWS_X_HEADS:
        raise ValueError("packed_attention_triton: too many views x heads for 32-bit dropout offsets "
                         f"(at most {MAX_VIEWS_X_HEADS})")
    scale = q.shape[2] ** -0.5 if scale is None else scale
    return PackedAttentionFunction.apply(q, k, v, cu_seqlens.to(torch.int32), int(max_len), float(dropout_p),
                                         float(scale), seed)


def unsupported(max_len: int, views: int, heads: int) -> str | None:
    """Why this kernel cannot take a run whose batches have views of up to max_len tokens and up to `views`
    views (padding segments included) of `heads` heads; None if it can."""
    if max_len > MAX_VIEW_TOKENS:
        return f"takes views of up to {MAX_VIEW_TOKENS} tokens; this run's max length is {max_len}"
    if views * heads > MAX_VIEWS_X_HEADS:
        return (f"takes at most {MAX_VIEWS_X_HEADS} views x heads a batch (32-bit dropout offsets); this run's "
                f"batches have up to {views} views x {heads} heads")
    return None


def warm_up(heads: int, head_dim: int, dtype: torch.dtype, device, max_len: int, dropout_p: float) -> None:
    """Compile the forward and backward kernels of every length class up to max_len's, for (T, heads,
    head_dim) inputs of `dtype` laid out as a model's attention hands them over (contiguous), with the
    arguments the autograd function launches them with. All of them at once where Triton can
    (`compile_in_parallel`: three classes are six kernels, 0.3-1.2 s each to compile on a 2-core CPU,
    benchmarks/RESULTS.md); otherwise by launching each on one view of max_len tokens. Its dropout seed is
    fixed, not drawn from torch's generator: warming up (or not, MIRRORFAST_KERNEL_WARMUP=0) leaves a seeded
    run's random stream as it was."""
    q, k, v, out, grad_out, dq, dk, dv = (torch.ones((max_len, heads, head_dim), dtype=dtype, device=device)
                                          for _ in range(8))
    cu_seqlens = torch.tensor([0, max_len], dtype=torch.int32, device=device)
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    scale = head_dim**-0.5
    launches = [*_forward_launches(q, k, v, out, cu_seqlens, seed, max_len, dropout_p, scale),
                *_backward_launches(q, k, v, grad_out, dq, dk, dv, cu_seqlens, seed, max_len, dropout_p, scale)]
    with torch.cuda.device_of(q):
        if not compile_in_parallel(launches):
            _launch(launches)

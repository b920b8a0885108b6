"""Unpadded ("packed") encoder forward: all views of a batch in one (1, T) row, no padding tokens.

The sentences of the paper's corpus average 14 tokens while a batch's longest is 40-70, so padding
triples the work. Packed, each view attends only to itself: on CUDA through a variable-length kernel
(with attention dropout, as the padded model has; below), elsewhere through SDPA over the views gathered
into a padded batch (only attention sees padding there).
The model itself is the Hugging Face one: we only register an attention function for it.

The CUDA kernel ("auto", the default): mirrorfast's Triton kernel (one tile per (view, head),
mirrorfast.kernels.packed_attention_triton) where a run's views fit its tile (max_length <= 128) and its head
dimension is one it was timed with (<= 64), else FlashAttention's variable-length kernel, whose 128-token tiles
are mostly empty for views of ~14 tokens (on an H200 they spent 555 µs per BERT-base layer; the Triton kernel
took a BERT-base `--bf16` step from 21.9 to 16.8 ms there, 24.2 to 18.3 ms on an H100: benchmarks/RESULTS.md).
MIRRORFAST_PACKED_ATTENTION overrides the choice: "flash", "sdpa" (the gathered-SDPA path on CUDA too) or
"triton" (an error where it cannot run, not another kernel in its place).
"""

import contextlib
import importlib.util
import os

import torch
import torch.nn.functional as F

from mirrorfast.errors import MirrorfastError
from mirrorfast.last_layer import packed_first_token_outputs, without_last_layer

ATTENTION_NAME = "mirrorfast_packed"
# Model types whose attention goes through transformers' attention interface and whose position ids
# we know how to restart per view.
PACKED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")
ATTENTION_ENV = "MIRRORFAST_PACKED_ATTENTION"
CUDA_KERNELS = ("auto", "flash", "sdpa", "triton")
# `auto` takes the Triton kernel for head dimensions up to this: run in training with 32 (MiniLM; its rows'
# comparison with FlashAttention may be confounded by host waits, benchmarks/RESULTS.md) and 64 (BERT-base, the
# rows the default rests on); a 128-wide head in a 128-token tile spills more registers, and was not timed.
AUTO_TRITON_HEAD_DIM_MAX = 64


def _packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query/key/value: (1, heads, T, d). Returns ((1, T, heads, d), None) like HF's attention functions."""
    cu_seqlens = kwargs["cu_seq_lens_q"]  # (B + 1,) int32
    max_len = kwargs["max_length_q"]  # host int
    kernel = kwargs["packed_kernel"]  # decided once per forward by packed_hidden
    if kernel in ("flash", "triton"):  # both take the packed (T, heads, d) layout and cu_seqlens
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, d)
        if kernel == "flash":  # CUDA, half precision
            out = torch.ops.aten._flash_attention_forward(
                q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, dropout, False, False, scale=scaling
            )[0]
        else:
            from mirrorfast.kernels.packed_attention_triton import packed_attention_triton

            out = packed_attention_triton(q, k, v, cu_seqlens, max_len, dropout, scaling)
        return out.unsqueeze(0), None
    # Elsewhere (the CPU, or CUDA with MIRRORFAST_PACKED_ATTENTION=sdpa): gather the S views into a padded
    # (S, heads, max_len, d) batch, attend with a key-padding mask, and gather the real tokens back (index
    # from `padded_index`, once per forward).
    gather, key_ok, slot_of_token = kwargs["padded_index"]
    n_views, heads, head_dim = gather.shape[0], query.shape[1], query.shape[3]
    q, k, v = (t[0][:, gather].transpose(0, 1) for t in (query, key, value))  # (S, heads, L, d)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_ok[:, None, None, :], dropout_p=dropout, scale=scaling)
    out = out.transpose(1, 2).reshape(n_views * max_len, heads, head_dim)[slot_of_token]  # (T, heads, d)
    return out.unsqueeze(0), None


def _padded_index(cu_seqlens, segment_ids, max_len: int):
    """For the non-FlashAttention path: (S, L) token of each padded slot, (S, L) which slots are real,
    (T,) the slot of each token."""
    starts = cu_seqlens[:-1].long()  # (S,)
    total = segment_ids.shape[0]
    slots = torch.arange(max_len, device=segment_ids.device)  # (L,)
    key_ok = slots[None, :] < (cu_seqlens[1:].long() - starts)[:, None]
    gather = (starts[:, None] + slots[None, :]).clamp_(max=total - 1)
    slot_of_token = segment_ids * max_len + torch.arange(total, device=segment_ids.device) - starts[segment_ids]
    return gather, key_ok, slot_of_token


def cuda_kernel() -> str:
    """The packed-attention kernel asked for on CUDA: "auto" (default), "flash", "sdpa" or "triton"
    ($MIRRORFAST_PACKED_ATTENTION)."""
    choice = os.environ.get(ATTENTION_ENV, "auto").strip().lower() or "auto"
    if choice not in CUDA_KERNELS:
        raise MirrorfastError(f"{ATTENTION_ENV} must be one of {CUDA_KERNELS}, got {choice!r}")
    if choice == "triton" and importlib.util.find_spec("triton") is None:
        raise MirrorfastError(f"{ATTENTION_ENV}=triton needs triton, which is not installed")
    return choice


def flash_supported(device: torch.device) -> bool:
    """PyTorch's FlashAttention kernels run on this device: a CUDA build that has them and an Ampere or
    newer GPU (compute capability 8.0+; a T4 or V100 has not)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    built = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)()
    return bool(built) and torch.cuda.get_device_capability(device) >= (8, 0)


def packed_kernel(device: torch.device, max_len: int | None = None, *, views: int = 0, heads: int = 0,
                  head_dim: int = 0) -> str:
    """The attention packed batches use on `device`: "triton" (mirrorfast's one-tile kernel), "flash"
    (FlashAttention varlen) or "sdpa" (views gathered into a padded SDPA batch: the CPU, GPUs without
    FlashAttention, or asked for). max_len, views, heads, head_dim: the longest view a run's batches can have,
    their most views (padding segments included), the model's heads and head dimension; `auto` takes the
    Triton kernel on an sm80+ GPU only where all of them are given and fit it (else FlashAttention).
    The Triton kernel asked for where it cannot run (the CPU without TRITON_INTERPRET=1, the interpreter the
    tests use, or batches it cannot take) is an error rather than another kernel in its place: it is asked
    for to compare or debug that kernel."""
    choice = cuda_kernel()
    if choice == "triton":
        from mirrorfast.kernels.functional import triton_runs_on
        from mirrorfast.kernels.packed_attention_triton import unsupported  # triton is there (cuda_kernel)

        if not triton_runs_on(device):
            raise MirrorfastError(f"{ATTENTION_ENV}=triton runs on a CUDA GPU (or on the CPU under "
                                  f"TRITON_INTERPRET=1, slowly); this run is on {device.type}")
        reason = unsupported(max_len or 0, views, heads)
        if reason:
            raise MirrorfastError(f"{ATTENTION_ENV}=triton {reason}")
        return "triton"
    if choice == "sdpa" or not flash_supported(device):  # always "sdpa" off CUDA
        return "sdpa"
    if choice == "auto" and _triton_fits(max_len, views, heads, head_dim):
        return "triton"
    return "flash"


def attention_heads(config) -> dict:
    """packed_kernel's `heads` and `head_dim` for a Hugging Face model's config."""
    heads = config.num_attention_heads
    return dict(heads=heads, head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads)


def _triton_fits(max_len: int | None, views: int, heads: int, head_dim: int) -> bool:
    # `auto` on an sm80+ GPU: the Triton kernel where it is installed and the run's batches are known to fit it.
    if not (max_len and views and heads and 0 < head_dim <= AUTO_TRITON_HEAD_DIM_MAX):
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    from mirrorfast.kernels.packed_attention_triton import unsupported

    return unsupported(max_len, views, heads) is None


def _no_mask(*args, **kwargs):
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _packed_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


# Model types whose positions are numbered from pad_token_id + 1, as RoBERTa's are (transformers'
# create_position_ids_from_input_ids); the others (BERT, ELECTRA, DistilBERT, ALBERT, ...) number them from 0.
POSITIONS_AFTER_PAD = ("roberta", "xlm-roberta", "xlm-roberta-xl", "roberta-prelayernorm", "camembert", "mpnet",
                       "data2vec-text", "ibert", "longformer", "xmod", "luke", "lilt", "markuplm", "layoutlmv3")


def first_position_id(config) -> int:
    """The first position id of a model: pad_token_id + 1 for the RoBERTa way (RoBERTa, XLM-R, CamemBERT, MPNet,
    ...), else 0."""
    return (getattr(config, "pad_token_id", 0) or 0) + 1 if config.model_type in POSITIONS_AFTER_PAD else 0


def position_offset(model) -> int:
    """The first position id of a model packed attention supports (an error for the others)."""
    model_type = model.config.model_type
    if model_type not in PACKED_MODEL_TYPES:
        raise MirrorfastError(
            f"packed (unpadded) attention supports {sorted(PACKED_MODEL_TYPES)}, not {model_type!r}; "
            "use --attention padded"
        )
    return first_position_id(model.config)


def supports_packing(model) -> bool:
    return model.config.model_type in PACKED_MODEL_TYPES


@contextlib.contextmanager
def packed_attention(model, kernel: str | None = None):
    """Switch the model to packed attention for the duration (the saved model keeps its own).

    The kernel is decided here, once (`packed_kernel` for the model's device, unless the caller decided it
    for its longest views), not on every forward. Yields it."""
    _register()
    position_offset(model)  # validates the model type
    kernel = kernel or packed_kernel(next(model.parameters()).device)  # validates the override before any work
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    model._mirrorfast_packed_kernel = kernel  # a plain attribute, read by packed_hidden; never saved
    try:
        yield kernel
    finally:
        model.set_attn_implementation(previous)
        del model._mirrorfast_packed_kernel


def _kernel_of(model) -> str:
    kernel = getattr(model, "_mirrorfast_packed_kernel", None)
    if kernel is None:
        raise MirrorfastError("packed batches need the model inside mirrorfast.packing.packed_attention(model)")
    return kernel


def packed_hidden(model, input_ids, position_ids, cu_seqlens, segment_ids, max_len: int, padded_index=None):
    """input_ids, position_ids: (1, T); cu_seqlens: (S + 1,) int32; segment_ids: (T,) -> (T, H) last hidden state.
    Inside `packed_attention(model)`, whose kernel it uses. padded_index: `_padded_index`'s, if the caller
    made it already (the SDPA path's gather)."""
    offset = position_offset(model)
    kernel = _kernel_of(model)
    # FlashAttention and the Triton kernel take cu_seqlens; the SDPA path gathers views into a padded batch.
    if kernel != "sdpa":
        padded_index = None
    elif padded_index is None:
        padded_index = _padded_index(cu_seqlens, segment_ids, max_len)
    out = model(
        input_ids=input_ids,
        position_ids=position_ids + offset if offset else position_ids,
        token_type_ids=torch.zeros_like(input_ids),
        cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
        max_length_q=max_len, max_length_k=max_len,
        padded_index=padded_index, packed_kernel=kernel,
    )
    return out.last_hidden_state[0]


def packed_first_tokens(model, input_ids, position_ids, cu_seqlens, segment_ids, max_len: int):
    """packed_hidden's arguments -> (S, H): each view's first token through the last layer, the layers before
    it over every token (cls pooling with the last layer for the first token only, mirrorfast.last_layer)."""
    # The SDPA path's gather index, made once for every layer ("sdpa": the CPU, or asked for).
    padded_index = _padded_index(cu_seqlens, segment_ids, max_len) if _kernel_of(model) == "sdpa" else None
    with without_last_layer(model) as last:
        hidden = packed_hidden(model, input_ids, position_ids, cu_seqlens, segment_ids, max_len, padded_index)
    # The last layer on FlashAttention where the layers before ran on it or on the Triton kernel (which takes
    # one length for queries and keys), if it runs here; else through the gathered SDPA batch.
    flash = (padded_index is None and hidden.dtype in (torch.float16, torch.bfloat16)
             and flash_supported(hidden.device))
    if not flash and padded_index is None:
        padded_index = _padded_index(cu_seqlens, segment_ids, max_len)
    return packed_first_token_outputs(last, hidden, cu_seqlens, max_len, padded_index)  # (S, H)


def packed_pool(hidden, cu_seqlens, segment_ids, pooling: str):
    """hidden: (T, H) -> (B, H): the first token of each view (cls) or each view's mean (mean)."""
    if pooling == "cls":
        return hidden[cu_seqlens[:-1].long()]
    # Summed in fp32 at least (index_add_ accumulates in its output's dtype; a --half-model hidden state is
    # fp16/bf16).
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(dtype)
    sums = torch.zeros(lengths.shape[0], hidden.shape[1], dtype=dtype, device=hidden.device)
    return (sums.index_add_(0, segment_ids, hidden.to(dtype)) / lengths[:, None]).to(hidden.dtype)

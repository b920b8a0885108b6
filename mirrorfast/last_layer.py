"""The last encoder layer for each text's first token only: all a [CLS]-pooled embedding needs.

With cls pooling the embedding is the last layer's output at position 0. That output depends on the other
positions only through the last layer's keys and values, so the rest of that layer (its query, attention
output, feed-forward and layer norms) can run on position 0 alone: the same vector, its gradients the same
up to floating-point rounding, for about 10/12 of a layer less work per text (counted for views of 14
tokens: BERT-base ~7 % of a training step's products, all-MiniLM-L6-v2 ~13 %). Dropout is the layer's own,
applied where the full layer applies it.

Training uses it for cls pooling (`Encoder.first_token_last_layer_only`, entered by the trainer;
MIRRORFAST_FIRST_TOKEN_LAST_LAYER=0 keeps the full layer, to compare or debug); inference keeps the full layer,
and the ONNX export has its own branch (export/first_token.py) for the same reason.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

FIRST_TOKEN_ENV = "MIRRORFAST_FIRST_TOKEN_LAST_LAYER"
# Encoder layers that compute exactly BertLayer's forward (absolute positions, no cross-attention);
# tests/test_first_token.py and tests/test_last_layer.py check each against the model's own output.
BERT_LAYERS = {"BertLayer", "RobertaLayer", "XLMRobertaLayer", "CamembertLayer", "ElectraLayer", "Data2VecTextLayer",
               "ErnieLayer"}


def last_bert_layer(model: nn.Module) -> nn.Module | None:
    """The model's last encoder layer when it is one of `BERT_LAYERS` and used as an encoder; else None."""
    config = model.config
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not layers or type(layers[-1]).__name__ not in BERT_LAYERS:
        return None
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return None
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return None  # relative positions add distance terms to the attention scores (transformers < 5)
    return layers[-1]


@contextlib.contextmanager
def without_last_layer(model: nn.Module):
    """For the duration, the model's encoder runs all its layers but the last (the model's output is the
    last layer's input); yields that layer. The model's modules and parameters are unchanged afterwards."""
    encoder = model.encoder
    layers = encoder.layer
    encoder.layer = layers[:-1]  # a ModuleList of the same modules
    try:
        yield layers[-1]
    finally:
        encoder.layer = layers


def _projections(layer: nn.Module, first: torch.Tensor, hidden: torch.Tensor):
    """The query of the first tokens (B, heads, d) and the keys and values of every token (..., heads, d)."""
    attention = layer.attention.self
    heads, head_dim = attention.num_attention_heads, attention.attention_head_size
    query = attention.query(first).unflatten(-1, (heads, head_dim))
    key = attention.key(hidden).unflatten(-1, (heads, head_dim))
    value = attention.value(hidden).unflatten(-1, (heads, head_dim))
    return query, key, value, getattr(attention, "scaling", head_dim**-0.5)


def _dropout(layer: nn.Module) -> float:
    """The attention probabilities' dropout, as the layer's own attention applies it (training only)."""
    attention = layer.attention.self
    return float(attention.dropout.p) if attention.training else 0.0


def rest_of_layer(layer: nn.Module, context: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """The layer after its attention: output projection (+ dropout), residual + LayerNorm, feed-forward
    (+ dropout), residual + LayerNorm, through the layer's own modules (dropout is a no-op in eval mode, as
    the ONNX export runs it); context (the heads' weighted values, concatenated) and first: (..., H)."""
    return layer.feed_forward_chunk(layer.attention.output(context, first))


def first_token_outputs(layer: nn.Module, hidden: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Padded: hidden (B, L, H), the last layer's input; key_mask (B, L), true for tokens -> (B, H), the
    layer's output at position 0."""
    first = hidden[:, 0]  # (B, H)
    query, key, value, scale = _projections(layer, first, hidden)  # (B, h, d), (B, L, h, d) x 2
    context = F.scaled_dot_product_attention(
        query[:, :, None], key.transpose(1, 2), value.transpose(1, 2),  # (B, h, 1, d), (B, h, L, d)
        attn_mask=key_mask.bool()[:, None, None, :], dropout_p=_dropout(layer), scale=scale,
    )  # (B, h, 1, d)
    return rest_of_layer(layer, context[:, :, 0].flatten(1), first)


def packed_first_token_outputs(layer: nn.Module, hidden: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                               padded_index) -> torch.Tensor:
    """Packed: hidden (T, H), the last layer's input for all views one after another; cu_seqlens (S + 1,)
    int32 -> (S, H), the layer's output at each view's first token. FlashAttention's variable-length kernel
    on CUDA in half precision (one query per view); elsewhere the views' keys gathered into a padded batch
    (padded_index: mirrorfast.packing's gather, key_ok, slot_of_token)."""
    starts = cu_seqlens[:-1].long()
    first = hidden[starts]  # (S, H)
    query, key, value, scale = _projections(layer, first, hidden)  # (S, h, d), (T, h, d) x 2
    dropout = _dropout(layer)
    if padded_index is None:  # FlashAttention (mirrorfast.packing decided it runs here)
        one_each = torch.arange(first.shape[0] + 1, device=hidden.device, dtype=cu_seqlens.dtype)
        context = torch.ops.aten._flash_attention_forward(
            query, key, value, one_each, cu_seqlens, 1, max_len, dropout, False, False, scale=scale)[0]
    else:
        gather, key_ok, _ = padded_index  # (S, L) token of each slot, (S, L) real slots
        context = F.scaled_dot_product_attention(
            query[:, :, None], key[gather].transpose(1, 2), value[gather].transpose(1, 2),
            attn_mask=key_ok[:, None, None, :], dropout_p=dropout, scale=scale,
        )[:, :, 0]  # (S, h, d)
    return rest_of_layer(layer, context.flatten(1), first)

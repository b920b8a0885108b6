"""The last encoder layer computed for the first token only: all a [CLS]-pooled sentence embedding needs.

With cls pooling the sentence embedding is the last layer's output at position 0. That output depends on
the other positions only through the last layer's keys and values, so the rest of the layer (its query,
attention output, feed-forward and layer norms) can run on position 0 alone: the same vector for about
1/num_layers less work per sentence (all-MiniLM-L6-v2 on the CPU, fp32 and int8: 15 % less time,
benchmarks/RESULTS.md).

The export puts this branch next to the model's own full last layer: `sentence_embedding` comes from the
branch, `token_embeddings` from the full layer. Both share the key and value projections. onnxruntime runs
every node of a graph whatever outputs are fetched, so `mirrorfast.export.runtime.open_session` cuts the
graph down to `sentence_embedding` before loading it: the full last layer is gone.

Only layers whose forward is exactly BERT's (`_BERT_LAYERS`, checked by class, not by attribute names: a
RoFormer layer has the same submodules and different attention) get the branch; others export unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

# Node-name scope of the branch in the exported graph (export/onnx.py groups its MatMuls with the last layer).
SCOPE = "first_token"
# Encoder layers that compute exactly BertLayer's forward in eval mode (absolute positions, no cross-attention).
# (tests/test_first_token.py checks each against the model's own last hidden state.)
_BERT_LAYERS = {"BertLayer", "RobertaLayer", "XLMRobertaLayer", "CamembertLayer", "ElectraLayer", "Data2VecTextLayer",
                "ErnieLayer"}


def last_bert_layer(model: nn.Module) -> nn.Module | None:
    """The model's last encoder layer when it is one of `_BERT_LAYERS` and used as an encoder; else None."""
    config = model.config
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not layers or type(layers[-1]).__name__ not in _BERT_LAYERS:
        return None
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return None
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return None  # relative positions add distance terms to the attention scores (transformers < 5)
    return layers[-1]


class FirstTokenLayer(nn.Module):
    """BertLayer.forward in eval mode, for position 0 only: (hidden (B, S, H), mask (B, S)) -> (B, H).

    hidden is the input of the last layer (the model's hidden_states[-2]); mask is 1 for tokens, 0 for padding.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer  # shared with the model: the same parameters, no copy

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self_attention = self.layer.attention.self
        heads, head_dim = self_attention.num_attention_heads, self_attention.attention_head_size
        batch, seq, width = hidden.shape
        first = hidden[:, :1]  # (B, 1, H)
        query = self_attention.query(first).view(batch, 1, heads, head_dim).transpose(1, 2)  # (B, h, 1, d)
        # Two copies of the one query row: onnxruntime multiplies a single row (1 x S) @ (S x d) by a route
        # whose sum depends on S, so a text's vector would change with its batch's padding; from two rows
        # on it does not (README: fp32 vectors do not depend on the batch; tests check it bit for bit).
        query = query.expand(batch, heads, 2, head_dim)  # (B, h, 2, d)
        key = self_attention.key(hidden).view(batch, seq, heads, head_dim).transpose(1, 2)  # (B, h, S, d)
        value = self_attention.value(hidden).view(batch, seq, heads, head_dim).transpose(1, 2)  # (B, h, S, d)
        # The additive padding mask of transformers' eager attention: the dtype's minimum where masked.
        padding = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        scores = torch.matmul(query, key.transpose(2, 3)) * head_dim**-0.5 + padding  # (B, h, 2, S)
        context = torch.matmul(torch.softmax(scores, dim=-1), value)[:, :, 0]  # (B, h, d)
        context = context.reshape(batch, 1, width)  # (B, 1, H)
        out = self.layer.attention.output
        attended = out.LayerNorm(out.dense(context) + first)
        ffn = self.layer.intermediate
        out = self.layer.output
        return out.LayerNorm(out.dense(ffn.intermediate_act_fn(ffn.dense(attended))) + attended)[:, 0]

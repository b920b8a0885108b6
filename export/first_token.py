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

Only layers whose forward is exactly BERT's (`mirrorfast.last_layer.BERT_LAYERS`, checked by class, not by
attribute names: a RoFormer layer has the same submodules and different attention) get the branch; others
export unchanged.

Two forms of the branch, the same function:
- `FirstTokenLayer` (model.onnx, model_int8.onnx): shares the full layer's key and value products, and its
  fp32 vectors do not depend on the batch.
- `StandaloneFirstTokenLayer` (model_fp16.onnx with `export_model(..., fp16_first_token=True)`, opt-in: on an
  H200, 2026-11-27, it gained 0.7 % a run, 3.3 % replayed from a CUDA graph): what onnxruntime's
  transformer optimizer can take. The optimizer fuses a layer's attention only when the layer's input feeds
  exactly three MatMuls (its query, key and value), and fusing it takes those products away from a branch
  that shares them (a broken graph). This form computes keys and values
  with a product of its own, behind a no-op Mul, and uses no dynamic shape (no Reshape): onnxruntime can
  place shape arithmetic on the CPU, and a session with nodes on the CPU cannot run as a CUDA graph (the
  fastest fp16 variant measured; benchmarks/onnx_gpu_table.py's FP16_VARIANTS).
"""

from __future__ import annotations

import torch
from torch import nn

from mirrorfast.last_layer import rest_of_layer

# Node-name scope of the branch in the exported graph (export/onnx.py groups its MatMuls with the last layer).
SCOPE = "first_token"


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
        return rest_of_layer(self.layer, context.reshape(batch, 1, width), first)[:, 0]


class StandaloneFirstTokenLayer(nn.Module):
    """FirstTokenLayer's function for onnxruntime's transformer optimizer (module docstring): its own key/value
    product and static shapes only. (hidden (B, S, H), mask (B, S)) -> (B, H)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer  # shared with the model
        self_attention = layer.attention.self
        heads, head_dim = self_attention.num_attention_heads, self_attention.attention_head_size
        width = heads * head_dim
        # The key and value weights side by side: one (H -> 2H) product (a copy: the export's own module).
        self.key_value = nn.Linear(width, 2 * width)
        with torch.no_grad():
            self.key_value.weight.copy_(torch.cat([self_attention.key.weight, self_attention.value.weight]))
            self.key_value.bias.copy_(torch.cat([self_attention.key.bias, self_attention.value.bias]))
        # (H, h): 1 where feature j belongs to head i. Sums per head and spreads per head back over its
        # features as products with this matrix, where splitting heads would take a Reshape.
        self.register_buffer("head_of_feature", torch.eye(heads).repeat_interleave(head_dim, dim=0), persistent=False)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self_attention = self.layer.attention.self
        width = hidden.shape[-1]
        # 3-D throughout, (B, 1, H) for the first token: products of 3-D inputs export as MatMul + Add, which
        # the optimizer fuses with the layer norms and GELU (2-D ones export as Gemm, which it does not).
        first = hidden[:, :1]  # (B, 1, H)
        query = self_attention.query(first) * self_attention.attention_head_size**-0.5  # (B, 1, H)
        # `hidden * 1.0`: a Mul between the layer's input and this product, so that the input still feeds
        # three MatMuls (the full layer's) and the optimizer fuses the full layer's attention.
        key, value = self.key_value(hidden * 1.0).split(width, dim=-1)  # (B, S, H) each
        scores = (key * query) @ self.head_of_feature  # (B, S, h)
        padding = (1.0 - attention_mask[:, :, None].to(hidden.dtype)) * torch.finfo(hidden.dtype).min  # (B, S, 1)
        probs = torch.softmax(scores + padding, dim=1)  # (B, S, h): over the positions
        context = ((probs @ self.head_of_feature.T) * value).sum(dim=1, keepdim=True)  # (B, 1, H)
        return rest_of_layer(self.layer, context, first)[:, 0]

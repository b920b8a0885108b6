"""Packed (unpadded) attention gives the same embeddings and gradients as the padded model."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from mirrorfast.data import TokenizedTexts, packed_batch, padded_batch
from mirrorfast.model import Encoder
from mirrorfast.packing import packed_attention

TEXTS = ["hi", "a considerably longer sentence, with punctuation and more words", "mid sized text here",
         "naïve café 東京 😀", "x y"]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_packed_equals_padded(minilm_dir, pooling):
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertModel(config).double()
    encoder = Encoder(model, tok, pooling, 24, "tiny")
    tt = TokenizedTexts.build(tok, TEXTS, 24)
    rows = np.array([4, 0, 2, 1, 3])
    views = [(tt, rows), (tt, rows[::-1])]

    padded = encoder.embed_batch(padded_batch(views, tok.pad_token_id))
    grad_padded = torch.autograd.grad(padded.square().sum(), list(model.parameters()), allow_unused=True)
    with packed_attention(model):
        packed = encoder.embed_batch(packed_batch(views))
        grad_packed = torch.autograd.grad(packed.square().sum(), list(model.parameters()), allow_unused=True)
    assert model.config._attn_implementation != "mirrorfast_packed"  # restored afterwards
    torch.testing.assert_close(packed, padded, rtol=1e-9, atol=1e-9)
    for gp, gq in zip(grad_padded, grad_packed):
        if gp is not None:
            torch.testing.assert_close(gq, gp, rtol=1e-7, atol=1e-9)

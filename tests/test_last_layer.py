"""Training's last layer for the first token only (mirrorfast.last_layer) against the full layer: the same
[CLS] embeddings and gradients in float64, padded and packed, for BERT and RoBERTa; dropout where the layer
applies it; the trainer's switch."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, RobertaConfig, RobertaModel

from mirrorfast.config import TrainConfig
from mirrorfast.data import TokenizedTexts, packed_batch, padded_batch
from mirrorfast.errors import MirrorfastError
from mirrorfast.last_layer import last_bert_layer, without_last_layer
from mirrorfast.model import Encoder
from mirrorfast.packing import packed_attention
from mirrorfast.trainer import train

TEXTS = ["hi", "a considerably longer sentence, with punctuation and more words", "mid sized text here",
         "naïve café 東京 😀", "x y", "the last one"]


def tiny(minilm_tokenizer_dir, arch: str, dropout: float = 0.0, pooling: str = "cls"):
    """A float64 tiny BERT or RoBERTa (3 layers) with fresh random weights, and two views of TEXTS."""
    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    sizes = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                 hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if arch == "roberta":
        config = RobertaConfig(**sizes, pad_token_id=tok.pad_token_id, max_position_embeddings=24 + tok.pad_token_id + 2)
        model = RobertaModel(config).double()
    else:
        model = BertModel(BertConfig(**sizes)).double()
    tt = TokenizedTexts.build(tok, TEXTS, 24)
    rows = np.random.default_rng().permutation(len(TEXTS))
    return tok, model, Encoder(model, tok, pooling, 24, "tiny"), [(tt, rows), (tt, rows[::-1])]


def embed_and_grads(encoder, batch, first_token: bool):
    if first_token:
        with encoder.first_token_last_layer_only():
            out = encoder.embed_batch(batch)
    else:
        out = encoder.embed_batch(batch)
    weights = torch.randn(encoder.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(out)
    params = [p for p in encoder.model.parameters()]
    grads = torch.autograd.grad((out @ weights).square().sum(), params, allow_unused=True)
    return out, grads


def assert_same(full, first):
    (out_full, grads_full), (out_first, grads_first) = full, first
    torch.testing.assert_close(out_first, out_full, rtol=1e-10, atol=1e-12)
    used = 0
    for g_full, g_first in zip(grads_full, grads_first):
        assert (g_full is None) == (g_first is None)  # the same parameters get gradients (not the pooler)
        if g_full is not None:
            torch.testing.assert_close(g_first, g_full, rtol=1e-9, atol=1e-12)
            used += 1
    assert used > 0


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_padded_first_token_equals_the_full_layer(minilm_tokenizer_dir, arch):
    tok, model, encoder, views = tiny(minilm_tokenizer_dir, arch)
    encoder.train()  # gradients as in training (dropout 0: comparable)
    batch = padded_batch(views, tok.pad_token_id)
    assert_same(embed_and_grads(encoder, batch, False), embed_and_grads(encoder, batch, True))
    assert not encoder.first_token_last_layer and len(model.encoder.layer) == 3  # restored afterwards


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_packed_first_token_equals_the_full_layer(minilm_tokenizer_dir, arch):
    tok, model, encoder, views = tiny(minilm_tokenizer_dir, arch)
    encoder.train()
    with packed_attention(model):
        for batch in (packed_batch(views), packed_batch(views, tok.pad_token_id, bucket=64, pad_segment_max=9)):
            assert_same(embed_and_grads(encoder, batch, False), embed_and_grads(encoder, batch, True))


def test_dropout_applies_in_training_only(minilm_tokenizer_dir):
    tok, model, encoder, views = tiny(minilm_tokenizer_dir, "bert", dropout=0.3)
    batch = padded_batch(views, tok.pad_token_id)
    encoder.eval()
    with torch.no_grad():
        full = encoder.embed_batch(batch)
        with encoder.first_token_last_layer_only():
            first = encoder.embed_batch(batch)
            encoder.train()
            drawn = [encoder.embed_batch(batch) for _ in range(2)]
    torch.testing.assert_close(first, full, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(drawn[0], drawn[1]) and all(bool(torch.isfinite(d).all()) for d in drawn)
    # Only the last layer's dropout left on: the draws still differ (its own modules apply it)
    encoder.eval()
    last_bert_layer(model).train()
    with torch.no_grad(), encoder.first_token_last_layer_only():
        assert not torch.allclose(encoder.embed_batch(batch), encoder.embed_batch(batch))


def test_without_last_layer_restores_the_model(minilm_tokenizer_dir):
    _, model, _, _ = tiny(minilm_tokenizer_dir, "bert")
    layers = model.encoder.layer
    with pytest.raises(RuntimeError, match="boom"), without_last_layer(model) as last:
        assert last is layers[-1] and len(model.encoder.layer) == 2
        raise RuntimeError("boom")
    assert model.encoder.layer is layers and len(list(model.parameters())) == len(list(layers.parameters())) + len(
        list(model.embeddings.parameters())) + len(list(model.pooler.parameters()))


def test_needs_cls_pooling(minilm_tokenizer_dir):
    _, _, encoder, _ = tiny(minilm_tokenizer_dir, "bert", pooling="mean")
    with pytest.raises(MirrorfastError, match="cls pooling"), encoder.first_token_last_layer_only():
        pass


def test_the_trainer_uses_it_for_cls_pooling(tiny_bert_dir, tmp_path, monkeypatch):
    """Without dropout the losses of a few steps are those of the full layer (fp32 rounding); the switch and
    mean pooling keep the full layer; the choice is logged and recorded."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"sentence number {i} about {w}" for i, w in enumerate(["cats", "dogs", "rain"] * 4)))
    cfg = TrainConfig(model=str(tiny_bert_dir), corpus=str(corpus), batch_size=6, max_steps=3, dropout=0.0,
                      progress=False, device="cpu")
    logs = {}
    runs = {}
    for name, env, pooling in (("first", None, "cls"), ("full", "0", "cls"), ("mean", None, "mean")):
        if env is None:
            monkeypatch.delenv("MIRRORFAST_FIRST_TOKEN_LAST_LAYER", raising=False)
        else:
            monkeypatch.setenv("MIRRORFAST_FIRST_TOKEN_LAST_LAYER", env)
        logs[name] = []
        runs[name] = train(TrainConfig(**{**cfg.__dict__, "pooling": pooling}), log=logs[name].append, save=False)
    recipe = {name: next(line for line in lines if line.startswith("recipe:")) for name, lines in logs.items()}
    assert "last_layer=first-token" in recipe["first"]
    assert "last_layer=full" in recipe["full"] and "last_layer=full" in recipe["mean"]
    np.testing.assert_allclose(runs["first"].losses, runs["full"].losses, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: FlashAttention's varlen kernel, one query per view")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_flash_first_token_on_gpu(minilm_tokenizer_dir, dtype):
    """On CUDA in half precision the packed [CLS] path goes through FlashAttention (max_len 1 queries): the
    same embeddings and gradients as the full layer's within half-precision rounding."""
    from mirrorfast.packing import flash_supported

    if not flash_supported(torch.device("cuda")):
        pytest.skip("this GPU has no FlashAttention (sm80+)")
    tok, model, encoder, views = tiny(minilm_tokenizer_dir, "bert")
    model.to("cuda", dtype)
    encoder.train()
    with packed_attention(model) as kernel:
        assert kernel == "flash"
        batch = packed_batch(views).to("cuda")
        (full, grads_full), (first, grads_first) = (embed_and_grads(encoder, batch, f) for f in (False, True))
    scale = full.abs().max()
    assert (first - full).abs().max() <= 2e-2 * scale
    for g_full, g_first in zip(grads_full, grads_first):
        if g_full is not None:
            assert (g_first - g_full).abs().max() <= 5e-2 * g_full.abs().max().clamp_min(1e-6)

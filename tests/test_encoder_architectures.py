"""Encoder.forward on right-padded batches equals each text encoded alone, for the encoder families users
bring (BERT/MiniLM, RoBERTa, XLM-R, MPNet, DistilBERT, ELECTRA, ALBERT, DeBERTa-v2): the padding mask
reaches every attention implementation correctly (SDPA gets a ready 4-D mask where the model masks padding
alone; see Encoder._attention_bias); what else a model masks (ModernBERT's local window) is kept; dropout,
DropHead and the refusal of decoders."""

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoTokenizer

from mirrorfast.model import Encoder

TEXTS = ["hi", "a considerably longer sentence with several more words, naïve café 東京", "mid sized text"]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _config(name: str, vocab: int, pad_id: int):
    common = dict(SMALL, vocab_size=vocab)
    return {
        "bert": lambda: transformers.BertConfig(**common),
        "roberta": lambda: transformers.RobertaConfig(**common, pad_token_id=pad_id, max_position_embeddings=130),
        "xlm-roberta": lambda: transformers.XLMRobertaConfig(**common, pad_token_id=pad_id, max_position_embeddings=130),
        "mpnet": lambda: transformers.MPNetConfig(**common),
        "distilbert": lambda: transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=vocab,
                                                            dropout=0.0, attention_dropout=0.0),
        "electra": lambda: transformers.ElectraConfig(embedding_size=32, **common),
        "albert": lambda: transformers.AlbertConfig(embedding_size=16, **common),
        "deberta-v2": lambda: transformers.DebertaV2Config(**common),
    }[name]()


@pytest.mark.parametrize("name", ["bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "electra", "albert", "deberta-v2"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padded_batch_equals_texts_alone(minilm_dir, name, pooling):
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(_config(name, tok.vocab_size, tok.pad_token_id)).eval()
    encoder = Encoder(model, tok, pooling, 32, name)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1).tolist()
    assert min(lengths) < max(lengths)  # there is padding to mask
    with torch.no_grad():
        padded = encoder(batch["input_ids"], batch["attention_mask"])
        alone = torch.cat([encoder(batch["input_ids"][i:i + 1, :n], batch["attention_mask"][i:i + 1, :n])
                           for i, n in enumerate(lengths)])
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "electra", "albert", "deberta-v2"])
def test_training_without_the_pooler_changes_no_hidden_state(minilm_dir, name):
    """Training detaches the pooler (`without_pooler`): every family still runs, with the same last hidden
    state, and gets its pooler back afterwards."""
    from mirrorfast.model import without_pooler

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(_config(name, tok.vocab_size, tok.pad_token_id)).eval()
    pooler = getattr(model, "pooler", None)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
        with without_pooler(model):
            assert getattr(model, "pooler", None) is None
            assert not any("pooler" in n for n, _ in model.named_parameters())
            hidden = model(**batch).last_hidden_state
    assert getattr(model, "pooler", None) is pooler
    torch.testing.assert_close(hidden, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "electra", "albert",
                                  "data2vec-text", "ibert", "longformer"])
def test_the_longest_max_length_allowed_fits_the_positions(minilm_dir, tmp_path, name):
    """load_encoder takes a max length up to the model's positions and no further: a text as long as that
    limit encodes (MPNet numbers positions from pad + 1 as RoBERTa does: 514 positions hold 512 tokens)."""
    from mirrorfast.errors import MirrorfastError
    from mirrorfast.model import load_encoder, position_limit

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    extra = {"data2vec-text": transformers.Data2VecTextConfig, "ibert": transformers.IBertConfig,
             "longformer": lambda **kw: transformers.LongformerConfig(**kw, attention_window=8)}
    config = (extra[name](**SMALL, vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id) if name in extra
              else _config(name, tok.vocab_size, tok.pad_token_id))
    config.max_position_embeddings = 40
    transformers.AutoModel.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    limit = position_limit(config)
    encoder = load_encoder(tmp_path, max_length=limit)
    long_text = " ".join(["word"] * 100)
    vectors = encoder.encode([long_text, "short"])
    assert vectors.shape == (2, encoder.dim) and np.isfinite(vectors).all()
    with pytest.raises(MirrorfastError, match=f"exceeds the model's {limit} positions"):
        load_encoder(tmp_path, max_length=limit + 1)


def _save(model, tok, directory):
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def _modernbert_config(tok, **overrides):
    ids = dict(pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
               bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    return transformers.ModernBertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                                         **ids, **overrides)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_a_local_attention_window_is_kept(minilm_dir, tmp_path, pooling):
    """ModernBERT's local layers attend within a window: transformers adds it to the mask it builds from the
    2-D padding mask. A ready 4-D padding mask (what BERT-family models get under SDPA) would drop it, and
    texts longer than half the window encoded differently from the saved model in transformers (cosine
    0.986 at 162 tokens), with the export's parity check passing."""
    from mirrorfast.model import load_encoder

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(_modernbert_config(tok, local_attention=8,
                                                                  global_attn_every_n_layers=2))
    encoder = load_encoder(_save(model, tok, tmp_path), pooling=pooling)
    texts = [" ".join(f"word{i}" for i in range(40)), "short"]  # far past the window of 8
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.model(**batch).last_hidden_state  # transformers' own masks
        mask = batch["attention_mask"][..., None].float()
        expected = hidden[:, 0] if pooling == "cls" else (hidden * mask).sum(1) / mask.sum(1)
        got = encoder(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_dropout_reaches_every_layer_of_the_model(minilm_dir, tmp_path):
    """load_encoder(dropout=p) builds the model with p: ModernBERT keeps its attention dropout as a number and
    leaves its attention output dropout out where the config says 0, which setting nn.Dropout layers
    afterwards missed (--dropout 0 left 0.2 in place; --dropout 0.3 left 0)."""
    from mirrorfast.model import load_encoder, set_dropout

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    base = _save(transformers.AutoModel.from_config(_modernbert_config(tok, attention_dropout=0.2)), tok,
                 tmp_path / "with-0.2")
    encoder = load_encoder(base, dropout=0.0).train()
    batch = tok(["a sentence with some words in it", "another"], padding=True, return_tensors="pt")
    with torch.no_grad():
        first, second = (encoder(batch["input_ids"], batch["attention_mask"]) for _ in range(2))
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # no dropout left anywhere
    torch.manual_seed(0)
    zero = _save(transformers.AutoModel.from_config(_modernbert_config(tok, attention_dropout=0.0)), tok,
                 tmp_path / "with-0")
    model = load_encoder(zero, dropout=0.3).model
    assert model.config.attention_dropout == 0.3
    layers = [m for m in model.modules() if hasattr(m, "out_drop")]
    assert layers and all(isinstance(m.out_drop, torch.nn.Dropout) and m.out_drop.p == 0.3 for m in layers)
    assert all(m.attention_dropout == 0.3 for m in layers)
    set_dropout(model, 0.05)  # a built model: its layers and its numbers
    assert all(m.attention_dropout == 0.05 and m.out_drop.p == 0.05 for m in layers)


@pytest.mark.parametrize("kind", ["gpt2", "bert-decoder", "t5"])
def test_decoders_and_encoder_decoders_are_refused(minilm_dir, tmp_path, kind):
    """A causal model trained (or scored) as if bidirectional, and T5's traceback at the first step: one
    message at load instead."""
    from mirrorfast.errors import MirrorfastError
    from mirrorfast.model import load_encoder

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    config = {
        "gpt2": lambda: transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=4),
        "bert-decoder": lambda: transformers.BertConfig(**SMALL, vocab_size=tok.vocab_size, is_decoder=True),
        "t5": lambda: transformers.T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                            num_heads=4),
    }[kind]()
    directory = _save(transformers.AutoModel.from_config(config), tok, tmp_path)
    match = "is an encoder-decoder model" if kind == "t5" else "is a decoder with causal attention"
    with pytest.raises(MirrorfastError, match=match):
        load_encoder(directory)


@pytest.mark.parametrize("name", ["bert", "electra", "deberta-v2", "albert", "mpnet"])
def test_drophead_only_where_an_attention_output_is_per_head(minilm_dir, name):
    """DropHead zeroes heads of the attention context. ALBERT's attention module returns it after the output
    projection, residual and LayerNorm, MPNet's after the projection: a slice of those is not a head (ALBERT's
    losses doubled). They are refused; BERT-style modules are hooked."""
    from mirrorfast.errors import MirrorfastError
    from mirrorfast.model import enable_drophead

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    model = transformers.AutoModel.from_config(_config(name, tok.vocab_size, tok.pad_token_id))
    if name in ("albert", "mpnet"):
        with pytest.raises(MirrorfastError, match="--drophead is not supported"):
            enable_drophead(model, 0.1)
    else:
        assert enable_drophead(model, 0.1) == 2  # one per layer


@pytest.mark.parametrize("name", ["bert", "distilbert", "deberta-v2"])
def test_export_lists_the_inputs_its_graph_takes(minilm_dir, tmp_path, name):
    """export.json's inputs are the graph's: DeBERTa-v2 (type_vocab_size 0) ignores token_type_ids, which the
    tracer drops, and export.json listed it (the README's extract_model recipe, fed that list, failed)."""
    import json

    ort = pytest.importorskip("onnxruntime")
    from mirrorfast.export import export_model

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(_config(name, tok.vocab_size, tok.pad_token_id))
    export_model(_save(model, tok, tmp_path / "model"), tmp_path / "export", max_length=16)
    listed = json.loads((tmp_path / "export" / "export.json").read_text())["inputs"]
    session = ort.InferenceSession(str(tmp_path / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert listed == [i.name for i in session.get_inputs()]
    assert listed[:2] == ["input_ids", "attention_mask"]
    assert ("token_type_ids" in listed) is (name == "bert")

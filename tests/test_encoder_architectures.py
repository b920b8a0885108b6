"""Encoder.forward on right-padded batches equals each text encoded alone, for the encoder families users
bring (BERT/MiniLM, RoBERTa, XLM-R, MPNet, DistilBERT, ELECTRA, ALBERT, DeBERTa-v2): the padding mask
reaches every attention implementation correctly (SDPA gets a ready 4-D mask; see Encoder._attention_bias)."""

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

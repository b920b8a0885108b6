"""Encoder.forward on right-padded batches equals each text encoded alone, for the encoder families users
bring (BERT/MiniLM, RoBERTa, XLM-R, MPNet, DistilBERT, ELECTRA, ALBERT, DeBERTa-v2): the padding mask
reaches every attention implementation correctly (SDPA gets a ready 4-D mask; see Encoder._attention_bias)."""

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

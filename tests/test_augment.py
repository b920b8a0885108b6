"""Random span masking: span length, position range, the tokenizer's own mask token, edges."""

import random

import pytest

from mirrorfast.augment import MIN_LENGTH_TO_MASK, mask_span

TEXT = "The quick brown fox jumps over the lazy dog near the riverbank."


@pytest.mark.parametrize("k", [1, 5, 12])
def test_replaces_exactly_one_span_of_k(k):
    rng = random.Random(k)
    for _ in range(200):
        out = mask_span(TEXT, k, "<M>", rng)
        start = out.index("<M>")
        assert out.count("<M>") == 1
        assert out[:start] == TEXT[:start]
        assert out[start + 3 :] == TEXT[start + k :]
        assert len(out) == len(TEXT) - k + 3


def test_start_covers_whole_range():
    rng = random.Random(0)
    k = 5
    starts = {mask_span(TEXT, k, "#", rng).index("#") for _ in range(5000)}
    assert starts == set(range(len(TEXT) - k + 1))


def test_short_strings_and_k0_untouched():
    rng = random.Random(0)
    short = "x" * (MIN_LENGTH_TO_MASK - 1)
    assert mask_span(short, 5, "[MASK]", rng) == short
    assert mask_span(TEXT, 0, "[MASK]", rng) == TEXT
    assert mask_span("y" * MIN_LENGTH_TO_MASK, 5, "[MASK]", rng) != "y" * MIN_LENGTH_TO_MASK


def test_uses_each_tokenizers_mask_token(minilm_dir, tmp_path):
    from transformers import AutoTokenizer, RobertaTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    bert = AutoTokenizer.from_pretrained(minilm_dir)
    assert "[MASK]" in mask_span(TEXT, 5, bert.mask_token, random.Random(0))
    # A RoBERTa-style tokenizer built locally (no download) whose mask token is <mask>.
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", "the"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    roberta = RobertaTokenizerFast(tokenizer_object=backend, mask_token="<mask>")
    masked = mask_span(TEXT, 5, roberta.mask_token, random.Random(0))
    assert "<mask>" in masked and "[MASK]" not in masked

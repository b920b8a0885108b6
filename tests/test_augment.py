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


@pytest.mark.parametrize("extra", [-7, -1, 0, 1])
def test_a_span_as_long_as_the_text_leaves_it_whole(extra):
    """--mask-span larger than a string (of at least 30 characters) would erase it whole (and drew from an
    empty range, a traceback from the tokenizing thread): such strings stay unmasked; one char more masks."""
    rng = random.Random()
    text = "z" * (MIN_LENGTH_TO_MASK + 10)
    k = len(text) - extra
    out = mask_span(text, k, "#", rng)
    if k >= len(text):
        assert out == text
    else:
        assert out.count("#") == 1 and len(out) == len(text) - k + 1


def test_training_views_use_each_tokenizers_mask_token(tmp_path):
    """The trainer's second views carry the model's own mask token: <mask> (one token id) for a RoBERTa-style
    tokenizer, not BERT's [MASK] (which this vocabulary would split into pieces)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import RobertaTokenizerFast

    from mirrorfast.config import TrainConfig
    from mirrorfast.data import load_corpus
    from mirrorfast.trainer import ViewSource

    # A RoBERTa-style tokenizer built locally (no download) whose mask token is <mask>.
    words = TEXT.replace(",", " ").replace(".", " ").split()
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", *dict.fromkeys(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    roberta = RobertaTokenizerFast(tokenizer_object=backend, mask_token="<mask>")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(f"{TEXT}\n{TEXT} again\n", encoding="utf-8")
    cfg = TrainConfig(corpus=str(corpus), level="sentence").resolved()
    _, second = ViewSource(load_corpus(str(corpus)), roberta, cfg).epoch(0)
    for i in range(2):
        ids = second.ids[second.offsets[i] : second.offsets[i + 1]].tolist()
        assert ids.count(roberta.mask_token_id) == 1, roberta.convert_ids_to_tokens(ids)


def test_pairs_mask_their_second_side_every_epoch(tmp_path, minilm_tokenizer_dir):
    """--pairs with a span mask (the sentence preset's 5) masks the pair's second side, re-drawn each epoch,
    as the authors' code does in its pairwise mode; the first side is never masked; --mask-span 0 leaves
    both sides as written."""
    from transformers import AutoTokenizer

    from mirrorfast.config import TrainConfig
    from mirrorfast.data import load_pairs
    from mirrorfast.trainer import ViewSource

    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    lines = [f"{TEXT} number {i}||a paraphrase of sentence number {i}, long enough to be masked" for i in range(6)]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\n".join(lines), encoding="utf-8")
    corpus = load_pairs(str(pairs))

    def masks(views):
        return [views.ids[views.offsets[i]: views.offsets[i + 1]].tolist().count(tok.mask_token_id)
                for i in range(len(views.offsets) - 1)]

    source = ViewSource(corpus, tok, TrainConfig(pairs=str(pairs), level="sentence").resolved())
    (first0, second0), (_, second1) = source.epoch(0), source.epoch(1)
    assert masks(first0) == [0] * 6 and masks(second0) == [1] * 6 and masks(second1) == [1] * 6
    assert second0.ids.tolist() != second1.ids.tolist()  # re-drawn per epoch
    plain = ViewSource(corpus, tok, TrainConfig(pairs=str(pairs), level="sentence", mask_span=0).resolved())
    unmasked = [tok(t)["input_ids"][:50] for t in corpus.second]
    _, second = plain.epoch(0)
    assert [second.ids[second.offsets[i]: second.offsets[i + 1]].tolist() for i in range(6)] == unmasked



@pytest.mark.parametrize("side", ["right", "left"])
def test_a_huge_line_is_cut_before_tokenizing_with_the_same_views(tmp_path, minilm_tokenizer_dir, monkeypatch, side):
    """Only max_length x CHARS_PER_TOKEN_KEPT characters of a string are tokenized, on the tokenizer's
    truncation side (a file without newlines is one huge line), and a second cut, longer by a prime, that
    confirms it: a training view is the same tokens as the whole line's, cut to max_length. The cut lives in
    batch_encoder, so encode and serve --truncate get it."""
    from transformers import AutoTokenizer

    from mirrorfast import trainer, truncation
    from mirrorfast.config import TrainConfig
    from mirrorfast.data import Corpus

    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    tok.truncation_side = side
    monkeypatch.setattr(truncation, "CHARS_PER_TOKEN_KEPT", 20)  # 25 x 20 = 500 characters kept
    huge = " ".join(random.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(5000))
    corpus = Corpus([huge, "a short one"], None, "test")
    cfg = TrainConfig(corpus="x", level="word", max_length=25).resolved()
    seen = []
    real_cut = truncation.cut_for_tokenizing
    monkeypatch.setattr(truncation, "cut_for_tokenizing", lambda *a: seen.extend(out := real_cut(*a)) or out)
    first, second = trainer.ViewSource(corpus, tok, cfg).epoch(0)
    assert first.ids[: first.offsets[1]].tolist() == tok(huge, truncation=True, max_length=25)["input_ids"]
    assert sorted(set(map(len, seen)) - {len("a short one")}) == [500, 500 + 503]  # of ~27,000 characters


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "python"])
def test_the_cut_before_tokenizing_never_changes_the_tokens(minilm_tokenizer_dir, monkeypatch, side, fast):
    """A cut text is tokenized again, longer, wherever the cut may have changed the tokens kept: a run of
    characters without tokens (spaces, newlines, zero-width spaces, a form feed BERT deletes) filling the
    cut, and a word the cut falls in that reaches into the kept tokens. A Python tokenizer gets whole texts.
    Every text gets exactly the tokens its whole text is truncated to."""
    from transformers import AutoTokenizer
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    from mirrorfast import tokens, truncation

    tok = (AutoTokenizer if fast else BertTokenizerLegacy).from_pretrained(minilm_tokenizer_dir)
    tok.truncation_side = side
    monkeypatch.setattr(truncation, "CHARS_PER_TOKEN_KEPT", 4)  # 10 x 4 = 40 characters tried first
    sentence = "A man is playing a guitar on the stage tonight."
    texts = [
        " " * 90 + sentence, "\n" * 50 + sentence + "\u200b" * 70, "\u200b" * 45 + sentence,  # fillers
        sentence + " " * 120, sentence[:30] + "x" * 200 + " end",  # ends of no tokens; a word the cut falls in
        " " * 20 + "a b c d e super\x0c" + "x" * 200,  # BERT deletes the form feed: "superxxx..." is one word
        "a" * 300, "word " * 100, "", "short",
    ]
    encode = tokens.batch_encoder(tok, 10)
    want = [tok(t, truncation=True, max_length=10)["input_ids"] for t in texts]
    assert encode(texts) == want


def _byte_level_bpe():
    """A small RoBERTa-style tokenizer (byte-level BPE, trimmed offsets), trained here: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(["A man is playing a guitar on the stage.", "hello world  foo   bar", "naïve 東京"] * 20,
                             trainer)
    core.post_processor = processors.RobertaProcessing(("</s>", 1), ("<s>", 0), trim_offsets=True)
    return core


def _unigram_metaspace():
    """A small XLM-R/ALBERT-style tokenizer (Unigram, Metaspace pre-tokenizer), trained here: no download."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    core = Tokenizer(models.Unigram())
    core.normalizer = normalizers.NFKC()
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<s>", "</s>", "<pad>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    core.train_from_iterator(["A man is playing a guitar on the stage.", "hello world  foo   bar", "naïve 東京"] * 20,
                             trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    return core


def _with_stripping_tokens(core):
    """RoBERTa's <mask> takes the whitespace before it (lstrip); the others cover rstrip and single_word."""
    from tokenizers import AddedToken

    core.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    core.add_tokens([AddedToken("[sw]", single_word=True), AddedToken("<r>", rstrip=True),
                     AddedToken("<lr>", lstrip=True, rstrip=True)])
    return core


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_cut_before_tokenizing_never_splits_an_added_token(minilm_tokenizer_dir, monkeypatch, side):
    """A text may spell an added token ("[CLS]", "<mask>"): the whole text matches it as one token where a cut
    through it would leave pieces that tokenize otherwise, before the cut's word (so the word check alone
    misses it); an lstrip/rstrip token takes the whitespace next to it, a single_word one only matches
    between non-word characters. Random texts dense in such tokens, for WordPiece (BERT), byte-level BPE and
    Unigram (Metaspace), against the whole text truncated."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer

    from mirrorfast import tokens, truncation

    rng = random.Random()
    bert = Tokenizer.from_file(str(minilm_tokenizer_dir / "tokenizer.json"))
    stripping = ["<mask>", "[sw]", "<r>", "<lr>", "<s>"]
    for core, literals in ((bert, ["[CLS]", "[SEP]", "[MASK]", "[PAD]"]),
                           (_with_stripping_tokens(_byte_level_bpe()), stripping),
                           (_with_stripping_tokens(_unigram_metaspace()), stripping)):
        pieces = ["word", "the", " ", "   ", "\n", "xxxxxxx", "\x0c", "\u200b", "\xa0", "東京", "!"] + literals * 3
        for max_tokens, chars_per_token in ((2, 1), (3, 1), (5, 1), (3, 2), (5, 3)):
            monkeypatch.setattr(truncation, "CHARS_PER_TOKEN_KEPT", chars_per_token)
            encode = tokens.batch_encoder(SimpleNamespace(backend_tokenizer=core, truncation_side=side), max_tokens)
            whole = Tokenizer.from_str(core.to_str())
            whole.no_padding()
            whole.enable_truncation(max_tokens, direction=side)
            bodies = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(600)]
            fillers = [" " * rng.randint(0, 40) for _ in bodies]  # at either end
            texts = [b + f if rng.random() < 0.5 else f + b for b, f in zip(bodies, fillers)]
            # A cut at a single_word token's end (BPE, right, 3 x 1) or start (Unigram, left, 5 x 1) with a
            # word character beyond it, where the whole text does not match it (rare at random).
            texts += ["  [sw]the[sw]xxxxxxx東京東京東京", "xxxxxxx[sw]wordword東京[sw]\n\n[sw]"]
            assert encode(texts) == [e.ids for e in whole.encode_batch(texts)]


def _trained_bpe(pre_tokenizer, corpus, normalizer=None, post=True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    core = Tokenizer(models.BPE())
    if normalizer is not None:
        core.normalizer = normalizer
    core.pre_tokenizer = pre_tokenizer
    core.train_from_iterator(corpus * 50, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if post:
        core.post_processor = processors.RobertaProcessing(("</s>", 1), ("<s>", 0))
    return core


_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")


def _not_local_cases(minilm_tokenizer_dir):
    """(name, tokenizer, side, max tokens, characters per token kept, text): pipelines where a cut changes
    more than the word it falls in (found by an adversarial search; each gave other tokens before)."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    llama3 = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    prepend = Tokenizer(models.BPE(unk_token="<unk>"))
    prepend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    prepend.pre_tokenizer = pre_tokenizers.Whitespace()
    prepend.train_from_iterator(["word word words"] * 20, trainers.BpeTrainer(
        vocab_size=100, special_tokens=["<unk>"], show_progress=False))
    fixed = Tokenizer(models.WordLevel({"xab": 0, "abc": 1, "d": 2, "cd": 3, "[UNK]": 4}, unk_token="[UNK]"))
    fixed.pre_tokenizer = pre_tokenizers.FixedLength(length=3)
    bert = Tokenizer.from_file(str(minilm_tokenizer_dir / "tokenizer.json"))
    bert.no_padding()
    bert.add_tokens([AddedToken("new-word", normalized=True)])  # as transformers' add_tokens makes them
    stripped = Tokenizer(models.WordLevel({"\u2581": 0, "<unk>": 1}, unk_token="<unk>"))
    stripped.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()])
    stripped.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    stripped.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=True, special=True)])
    contraction_words = Tokenizer(models.WordLevel(
        {t: i for i, t in enumerate(["[UNK]", "we", "'", "l", "'ll", "'t", "he", "the", "x", "\u0120'", "\u0120"])},
        unk_token="[UNK]"))
    contraction_words.normalizer = normalizers.BertNormalizer(lowercase=False)  # deletes \x00
    contraction_words.pre_tokenizer = byte_level
    whitespace_tokens = _trained_bpe(byte_level, ["def f(x):\n    return x"], post=False)
    whitespace_tokens.add_tokens([AddedToken(" " * k, normalized=False) for k in range(2, 32)])  # CodeGen-style
    return [
        ("both cuts in a deleted run inside a contraction", contraction_words, "right", 2, 1, "we'l" + "\x00" * 9 + "l"),
        ("both cuts in a deleted run before a contraction", contraction_words, "left", 1, 1, "x " + "\x00" * 9 + "'the"),
        ("whitespace tokens over a long run", whitespace_tokens, "right", 8, 2, "x" + " " * 300 + "x"),
        ("whitespace tokens over a long run", whitespace_tokens, "left", 8, 2, "x" + " " * 300 + "x"),
        ("contraction cut, GPT-2 regex", _trained_bpe(byte_level, ["we'll they'll you'll they're we've"]),
         "right", 4, 1, "we'll"),
        ("digit groups of 3 realign", _trained_bpe(llama3, ["123 456 789 234 567 345 678 1234567"]),
         "left", 3, 1, "1234567"),
        ("contraction after a cut space", _trained_bpe(byte_level, ["the the 'the x"], post=False),
         "left", 1, 4, " 'the"),
        ("contraction, Llama-3 regex", _trained_bpe(llama3, ["the the 'the x"], post=False), "left", 1, 4, " 'the"),
        ("prefix space", _trained_bpe(pre_tokenizers.ByteLevel(add_prefix_space=True), ["it's he's she's"], post=False),
         "left", 1, 1, "g's"),
        ("fixed-length pieces", fixed, "left", 1, 2, "xabcd"),
        ("prepended \u2581", prepend, "left", 1, 1, "word"),
        ("NFC composes across the cut", _trained_bpe(byte_level, ["caf\xe9s r\xe9sum\xe9 \xe9clair"],
                                                      normalizer=normalizers.NFC(), post=False),
         "left", 1, 1, "cafe\u0301s"),
        ("normalized added token, case", bert, "right", 3, 1, "NEW-WORD"),
        ("normalized added token, case", bert, "left", 3, 1, "NEW-WORD"),
        ("normalized added token, deleted character", bert, "right", 3, 1, "new-wo\x00rd"),
        ("normalized added token at the default cut", bert, "right", 3, 1000, " " * 2996 + "NEW-WORD x"),
        ("lstrip over a deleted accent", stripped, "right", 1, 1, "\n \u0301<mask>"),
    ]


def test_the_cut_before_tokenizing_where_a_pipeline_is_not_local(minilm_tokenizer_dir, monkeypatch):
    """Each case once gave other tokens than the whole text (or, for the whitespace tokens, took quadratic
    time to get them): contractions and digit groups of GPT-2 / Llama-3 regexes, a prefix space, fixed-length
    pieces, a prepended "\u2581", NFC composing across the cut, an added token matched after normalization
    (case, a deleted character, an lstrip one over an accent), two cuts within one run of characters the
    normalizer deletes."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer

    from mirrorfast import tokens, truncation

    failed = []
    for name, core, side, max_tokens, chars_per_token, text in _not_local_cases(minilm_tokenizer_dir):
        monkeypatch.setattr(truncation, "CHARS_PER_TOKEN_KEPT", chars_per_token)
        encode = tokens.batch_encoder(SimpleNamespace(backend_tokenizer=core, truncation_side=side), max_tokens)
        whole = Tokenizer.from_str(core.to_str())
        whole.no_padding()
        whole.enable_truncation(max_tokens, direction=side)
        if encode([text]) != [whole.encode(text).ids]:
            failed.append(f"{name} ({side}): {encode([text])[0]} != {whole.encode(text).ids}")
    assert not failed, failed


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_cut_before_tokenizing_against_whole_texts_at_random(minilm_tokenizer_dir, monkeypatch, side):
    """Random texts of words, runs of spaces, characters tokenizers delete or split on, against the whole text
    truncated, for a WordPiece (BERT) and a byte-level BPE (RoBERTa) tokenizer, at tiny cuts."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer

    from mirrorfast import tokens, truncation

    pieces = ["word", "playing", "the", " ", "  ", "\n", "x" * 7, "\x0c", "\u200b", "\x1c", "\xa0", "\u3000", "東京",
              "!", "é", "\t"]
    rng = random.Random()
    bert = Tokenizer.from_file(str(minilm_tokenizer_dir / "tokenizer.json"))
    for core in (bert, _byte_level_bpe()):
        for max_tokens, chars_per_token in ((2, 1), (5, 1), (5, 3)):
            monkeypatch.setattr(truncation, "CHARS_PER_TOKEN_KEPT", chars_per_token)
            encode = tokens.batch_encoder(SimpleNamespace(backend_tokenizer=core, truncation_side=side), max_tokens)
            whole = Tokenizer.from_str(core.to_str())
            whole.no_padding()
            whole.enable_truncation(max_tokens, direction=side)
            texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) + " " * rng.randint(0, 60)
                     for _ in range(150)]
            texts = [t if rng.random() < 0.5 else t[::-1] for t in texts]  # fillers at either end
            assert encode(texts) == [e.ids for e in whole.encode_batch(texts)]

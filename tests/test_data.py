"""Corpus sources and their errors; tokenize-once arrays; padded and packed batches."""

import bz2
import gzip
import random
import sys

import numpy as np
import pytest

from mirrorfast.data import TokenizedTexts, epoch_batches, load_corpus, load_pairs, packed_batch, padded_batch
from mirrorfast.errors import MirrorfastError


def write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_file_corpus_skips_blanks_and_removes_duplicates(tmp_path):
    path = write(tmp_path, "c.txt", "\ufeffa cat\n\n  \nthe dog \na cat\nbirds\n".encode())
    corpus = load_corpus(path)
    assert corpus.first == ["a cat", "the dog", "birds"]
    assert corpus.duplicates_removed == 1 and corpus.second is None
    assert load_corpus(path, dedup=False).first == ["a cat", "the dog", "a cat", "birds"]


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "is empty"),
        (b"\n \n\n", "is empty"),
        (b"only one\n", "at least 2"),
        (b"same\nsame\n", r"has 1 usable string \(1 exact duplicate removed; --keep-duplicates keeps them\); "
                            "contrastive training needs at least 2"),
        (b"fine line\nsecond\n\xff\xfe broken\n", "line 3 is not valid UTF-8"),
        (gzip.compress(b"a gzipped corpus\nof two lines\n"), "c.txt is gzip-compressed, not text: decompress it"),
        (b"old Mac\rline endings\rthree lines\r", r"lines end in a carriage return alone \(CR, old Mac"),
        (b"a line with a stray\r CR\nanother line\nand one more\n", None),  # a few lone CRs: text
        (b"".join(b"line %d has\rtwo\rCRs inside\n" % i for i in range(3)), None),  # CRs inside \n-lines: text
        (bz2.compress(b"a bzip2 corpus\nof two lines\n"), "c.txt is bzip2-compressed, not text"),
        (b"BZh is how this line starts\nand this one has caf\xe9\n", r"line 2 is not valid UTF-8 \(byte 0xe9\)"),
    ],
)
def test_corpus_errors(tmp_path, content, message):
    if message is None:
        assert len(load_corpus(write(tmp_path, "c.txt", content)).first) == 3
        return
    with pytest.raises(MirrorfastError, match=message):
        load_corpus(write(tmp_path, "c.txt", content))


def test_lines_end_at_newlines_only(tmp_path):
    """A form feed, U+0085, U+2028 or a vertical tab inside a line does not split it (str.splitlines would);
    "\r\n" and a missing final newline are fine."""
    path = write(tmp_path, "c.txt", "page one\x0cpage two\r\nnext\u0085line\nsep\u2028arated\x0bx\nlast".encode())
    assert load_corpus(path).first == ["page one\x0cpage two", "next\u0085line", "sep\u2028arated\x0bx", "last"]
    pairs = write(tmp_path, "p.txt", "page one\x0cpage two||other side\nx||y\n".encode())
    assert load_pairs(pairs).first == ["page one\x0cpage two", "x"]


def test_missing_corpus(tmp_path, monkeypatch):
    with pytest.raises(MirrorfastError, match="corpus file .*nope.txt not found"):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(MirrorfastError, match="pairs file .*nope.txt not found"):
        load_pairs(str(tmp_path / "nope.txt"))
    with pytest.raises(MirrorfastError, match="pairs file .* is not a file"):
        load_pairs(str(tmp_path))
    with pytest.raises(MirrorfastError, match="corpus file '-': standard input is not read; save the text to a"):
        load_corpus("-")
    (tmp_path / "-").write_text("a file named -\nas some are\n")  # named ./- it is read
    assert load_corpus(str(tmp_path / "-")).first == ["a file named -", "as some are"]
    monkeypatch.chdir(tmp_path)
    assert len(load_corpus("./-").first) == 2


def test_identity_is_the_bytes_read(tmp_path, monkeypatch):
    """mirrorfast.json's SHA-256 is that of the bytes the strings came from, read once: a file rewritten
    after it was read does not change the recorded hash."""
    import hashlib
    from pathlib import Path as PathClass

    for load, content in [(load_corpus, b"one\ntwo\n"), (load_pairs, b"a||b\nc||d\n")]:
        path = write(tmp_path, "data.txt", content)
        real_read_bytes = PathClass.read_bytes

        def read_then_rewrite(self):
            data = real_read_bytes(self)
            self.write_bytes(b"rewritten\nmeanwhile\n")
            return data

        monkeypatch.setattr(PathClass, "read_bytes", read_then_rewrite)
        corpus = load(path)
        monkeypatch.undo()
        assert corpus.identity == {"path": str(PathClass(path).resolve()),
                                   "sha256": hashlib.sha256(content).hexdigest()}
        assert "rewritten" not in corpus.first


def test_wordfreq_corpus():
    corpus = load_corpus("wordfreq:en:50")
    assert len(corpus) == 50 and corpus.first[0] == "the"
    assert len(load_corpus("wordfreq:en")) == 10000
    for bad, message in [("wordfreq:zz", "no word list"), ("wordfreq:en:x", "integer"), ("wordfreq:", "expected"),
                         ("wordfreq:en: 5", "integer"), ("wordfreq:en:+5", "integer"),
                         ("wordfreq:en:\uff15", "integer")]:
        with pytest.raises(MirrorfastError, match=message):
            load_corpus(bad)
    # Persian's list holds "words" of zero-width non-joiners only (ranks 383 and 8,080): no text to train on
    persian = load_corpus("wordfreq:fa")
    assert all(word.strip("\u200c\u200b\u200d\ufeff") == word and word for word in persian.first)


def test_wordfreq_missing_or_broken(tmp_path, monkeypatch):
    # Not installed: how to install it. Installed but failing to import (wordfreq 3.0.x imports pkg_resources,
    # gone from setuptools 82): the import's own error, not "install it".
    monkeypatch.setitem(sys.modules, "wordfreq", None)
    with pytest.raises(MirrorfastError, match=r"needs the wordfreq package \(pip install wordfreq\)"):
        load_corpus("wordfreq:en:50")
    broken = tmp_path / "site" / "wordfreq"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("import pkg_resources_gone_for_this_test\n")
    monkeypatch.delitem(sys.modules, "wordfreq")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(MirrorfastError, match="failed to import .*pkg_resources_gone_for_this_test.*pip install -U"):
        load_corpus("wordfreq:en:50")


def test_pairs(tmp_path):
    path = write(tmp_path, "p.txt", "a dog || a puppy\ncar||automobile\n\na dog || a puppy\n".encode())
    corpus = load_pairs(path)
    assert corpus.first == ["a dog", "car"] and corpus.second == ["a puppy", "automobile"]
    with pytest.raises(MirrorfastError, match="line 2 has no '\\|\\|' separators, not one"):
        load_pairs(write(tmp_path, "bad.txt", b"a||b\nno separator here\n"))
    with pytest.raises(MirrorfastError, match="line 1 has 2 '\\|\\|' separators, not one"):  # was ("a", "b||c")
        load_pairs(write(tmp_path, "bad3.txt", b"a||b||c\nd||e\n"))
    with pytest.raises(MirrorfastError, match="line 1 has an empty side"):
        load_pairs(write(tmp_path, "bad2.txt", b"a||\nb||c\n"))
    with pytest.raises(MirrorfastError, match="line 2 has '\\|\\|\\|': which two bars separate the pair is ambig"):
        load_pairs(write(tmp_path, "bad4.txt", b"a||b\nx|||y\n"))  # was ("x", "|y")
    with pytest.raises(MirrorfastError, match="has 1 usable pair \\(1 exact duplicate removed"):
        load_pairs(write(tmp_path, "dup.txt", b"a||b\na||b\n"))


def test_epoch_batches_cover_every_row_once():
    batches = epoch_batches(1003, 200, random.Random(1))
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(1003)) and [len(b) for b in batches] == [200] * 5 + [3]
    # A trailing batch of one string has no negatives: it is dropped.
    assert sum(len(b) for b in epoch_batches(201, 200, random.Random(1))) == 200


def test_padded_and_packed_batches_hold_the_same_tokens(minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    texts = ["a", "a longer sentence with more words than the others", "mid length text", "naïve café 東京 😀"]
    tt = TokenizedTexts.build(tok, texts, max_length=9)
    assert (np.diff(tt.offsets) <= 9).all()
    rows = np.array([0, 1, 2, 3])
    views = [(tt, rows), (tt, rows[::-1])]
    padded = padded_batch(views, tok.pad_token_id, pad_to_multiple_of=4, views_per_chunk=3)
    packed = packed_batch(views)
    view_lengths = np.diff(packed.cu_seqlens.numpy())
    assert padded.tokens == packed.tokens == int(view_lengths.sum()) and padded.views == packed.views == 8
    assert padded.input_ids.shape == (8, 12) and packed.input_ids.shape == (1, view_lengths.sum())
    # Padded rows are sorted longest first; `restore` maps view i to its row.
    row_lengths = padded.attention_mask.sum(1).numpy()
    assert (np.diff(row_lengths) <= 0).all()
    for view in range(8):
        row = int(padded.restore[view])
        start, end = packed.cu_seqlens[view].item(), packed.cu_seqlens[view + 1].item()
        assert padded.input_ids[row, : row_lengths[row]].tolist() == packed.input_ids[0, start:end].tolist()
        assert packed.position_ids[0, start:end].tolist() == list(range(end - start))
        assert packed.segment_ids[start:end].tolist() == [view] * (end - start)
    assert packed.max_len == int(view_lengths.max())
    # Chunks cover every row once, each as wide as its longest row (rounded up to the multiple);
    # neighbours of the same width are one chunk (rows 3-4 and 5-7 both round to width 8).
    assert padded.chunks == ((0, 3, 12), (3, 8, 8))
    for start, end, width in padded.chunks:
        assert width % 4 == 0 and row_lengths[start] <= width < row_lengths[start] + 4
    # By default (the CPU trainer) no rounding: every chunk exactly as wide as its longest view.
    exact = padded_batch(views, tok.pad_token_id, views_per_chunk=3)
    assert exact.input_ids.shape == (8, row_lengths.max())
    for start, end, width in exact.chunks:
        assert width == row_lengths[start]
    # Rounding never goes past max_width (the run's max length: a width past a model's positions fails on
    # CUDA, which rounds to 8): the longest view (9 tokens) rounded to 12 would be, so it keeps 10.
    capped = padded_batch(views, tok.pad_token_id, pad_to_multiple_of=4, views_per_chunk=3, max_width=10)
    assert capped.input_ids.shape == (8, 10) and capped.chunks == ((0, 3, 10), (3, 8, 8))
    from mirrorfast.trainer import build_batches  # as the trainer builds them: capped at its max length

    (built,) = build_batches((tt, tt), [rows], False, tok.pad_token_id, None, width_multiple=4, max_length=10)
    assert built.input_ids.shape == (8, 10)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["fast", "slow"])
def test_tokenize_once_gives_the_tokenizers_own_ids(minilm_dir, tmp_path, kind, side, monkeypatch):
    """TokenizedTexts.build (the Rust core of a fast tokenizer, called directly; a slow one as it is; in
    chunks of texts) gives exactly what `tokenizer(texts, truncation=True, max_length=...)` gives, on either
    truncation side."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    if kind == "slow":
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

        vocab = sorted(tok.get_vocab().items(), key=lambda item: item[1])
        (tmp_path / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")
        tok = BertTokenizerLegacy(str(tmp_path / "vocab.txt"))
    tok.truncation_side = side
    rng = random.Random(7)
    words = "the a naïve café 東京 😀 Straße running quickly unbelievable x , .".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(60)] + ["y"]
    monkeypatch.setattr(TokenizedTexts, "CHUNK", 7)  # 61 texts: 8 full chunks and a partial one
    built = TokenizedTexts.build(tok, texts, max_length=16)
    expected = tok(texts, truncation=True, max_length=16, add_special_tokens=True)["input_ids"]
    assert max(map(len, expected)) == 16 and min(map(len, expected)) < 16  # some cut, some not
    assert [built.ids[built.offsets[i]:built.offsets[i + 1]].tolist() for i in range(len(texts))] == expected
    empty = TokenizedTexts.build(tok, [], max_length=16)
    assert empty.ids.shape == (0,) and empty.offsets.tolist() == [0]


def test_invisible_characters_around_a_line_are_stripped(tmp_path):
    """str.strip() keeps NUL, zero-width spaces and a BOM inside the file (two files concatenated): a line of
    only those trained as an empty string, and "\\ufeffword" was not a duplicate of "word"."""
    content = "\x00\x00\n\u200b \u200b\nreal one\n\ufeffreal one\nin\u200bside kept\n \x7fother\u2060 \n"
    corpus = load_corpus(write(tmp_path, "c.txt", content.encode()))
    assert corpus.first == ["real one", "in\u200bside kept", "other"] and corpus.duplicates_removed == 1
    pairs = load_pairs(write(tmp_path, "p.txt", "\ufeffleft \u200b||\x00right\n a || b \n".encode()))
    assert pairs.first == ["left", "a"] and pairs.second == ["right", "b"]

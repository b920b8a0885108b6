"""Truncating a long text to N tokens without tokenizing it whole, with the whole text's N tokens.

`truncated_encodings` cuts each text longer than N x CHARS_PER_TOKEN_KEPT characters on the truncation side
(never inside an added token the text spells), tokenizes the cut, and takes the tokens kept once a second,
longer cut agrees; else longer cuts, else the whole text. `mirrorfast.tokens.batch_encoder` calls it for
fast tokenizers.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

# Characters of a text first tried for tokenizing when a fast tokenizer truncates it to N tokens: N x this.
# The first N tokens of any real text lie far inside; a pathological text (a whole file without newlines)
# is not tokenized in full only to be cut to N tokens (a 23 MB training line took minutes and GBs, a 4 MB
# request 3 s). The cut never falls in an added token the text spells ("[CLS]", "<mask>"); the N tokens kept
# are taken once a second, longer cut keeps the same ones (`truncated_encodings`). What two adversarial
# searches over tokenizer pipelines still found: left truncation where the pre-tokenizer groups a long run
# from its start (FixedLength pieces; digit groups of 3 when the vocabulary splits a group into pieces), and
# two cuts' groupings end in the same pieces while the whole text's does not.
CHARS_PER_TOKEN_KEPT = 1000


@dataclass(frozen=True)
class AddedLiteral:
    """An added token as a text may spell it ("[CLS]", "<mask>"): the tokenizer matches it before anything
    else, and may absorb the whitespace on its left (lstrip) or right (rstrip)."""

    text: str
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False  # matched only between non-word characters
    normalized: bool = False  # matched in the normalized text: here, in any letter case

    @functools.cached_property
    def pattern(self) -> re.Pattern:
        """Matches where the literal starts (a lookahead: overlapping occurrences are all found)."""
        return re.compile(f"(?=({re.escape(self.text)}))", re.IGNORECASE if self.normalized else 0)

    @functools.cached_property
    def blank(self) -> bool:
        """Made of _RUN characters only (whitespace tokens such as "\\n\\n" or "    "): a cut inside a run of
        them moves to the run's edge at once, not a literal's length at a time."""
        return _RUN.fullmatch(self.text) is not None

    def starts_at(self, text: str, index: int, end: int | None = None) -> bool:
        """Whether the literal is written at text[index:], within text[:end]."""
        return index >= 0 and self.pattern.match(text, index, len(text) if end is None else end) is not None


def added_literals(core) -> tuple[AddedLiteral, ...]:
    """The added tokens of a `tokenizers.Tokenizer`, as a text spells them (a `normalized` one in any letter
    case; other spellings its normalizer would give, e.g. full-width, are left to `_agree`)."""
    return tuple(AddedLiteral(t.content, t.lstrip, t.rstrip, t.single_word, t.normalized)
                 for t in core.get_added_tokens_decoder().values() if t.content)


def _occurrences(text: str, lo: int, hi: int, literals):
    """(start, stop, literal) of each literal written inside text[lo:hi], overlapping ones included."""
    for literal in literals:
        for match in literal.pattern.finditer(text, lo, hi):
            yield match.start(), match.start() + len(match.group(1)), literal


# What an lstrip / rstrip token may take next to it: whitespace (str.isspace's, which includes the
# tokenizers' own), and for a normalized one also what its normalizer may delete in between (controls,
# zero-width and format characters, combining marks). More than a tokenizer takes only moves a cut further.
_RUN = re.compile("[\\s\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff"
                  "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]*")


def _run_before(text: str, index: int) -> int:
    """Where the run of _RUN characters ending at `index` starts."""
    span = 64
    while True:
        low = max(0, index - span)
        length = _RUN.match(text[low:index][::-1]).end()
        if length < index - low or low == 0:
            return index - length
        span *= 2


def _run_after(text: str, index: int) -> int:
    """Where the run of _RUN characters starting at `index` ends."""
    return _RUN.match(text, index).end()


# Moves of a cut off added tokens before it is left where it was asked: a chain of overlapping literals
# ("ab" and "ba" over "abab...") would be walked a few characters at a time.
_CLEARING_STEPS = 8


def _is_run_char(text: str, index: int) -> bool:
    return 0 <= index < len(text) and _RUN.match(text, index, index + 1).end() > index


def _end_clear_of_literals(text: str, end: int, literals, longest: int) -> int:
    """Right truncation tokenizes text[:end]: `end` moved back until no added token written in the text is
    split by it (or ends at it, for a single_word one), and no whitespace an lstrip token after it absorbs
    ends at it. The whole text matches such a token where the cut text would tokenize its pieces."""
    asked = end
    for _ in range(_CLEARING_STEPS):
        split = [(start, literal) for start, stop, literal in _occurrences(text, max(0, end - longest), end + longest,
                                                                           literals)
                 if start < end < stop or (literal.single_word and stop == end)]
        moved = min([end] + [start for start, _ in split])
        if any(literal.blank for _, literal in split):
            moved = min(moved, _run_before(text, end))
        if _is_run_char(text, moved - 1):
            after = _run_after(text, moved)
            if any(literal.lstrip and literal.starts_at(text, after) for literal in literals):
                moved = _run_before(text, moved)
        if moved == end:
            return end
        end = moved
    return asked  # left to the agreement of two cuts (`_agree`)


def _begin_clear_of_literals(text: str, begin: int, literals, longest: int) -> int:
    """Left truncation tokenizes text[begin:]: the mirror image of `_end_clear_of_literals` (rstrip tokens
    absorb the whitespace after them)."""
    asked = begin
    for _ in range(_CLEARING_STEPS):
        split = [(stop, literal) for start, stop, literal in _occurrences(text, max(0, begin - longest),
                                                                          begin + longest, literals)
                 if start < begin < stop or (literal.single_word and start == begin)]
        moved = max([begin] + [stop for stop, _ in split])
        if any(literal.blank for _, literal in split):
            moved = max(moved, _run_after(text, begin))
        if _is_run_char(text, moved):
            before = _run_before(text, moved)
            if any(literal.rstrip and literal.starts_at(text, before - len(literal.text), before)
                   for literal in literals):
                moved = _run_after(text, moved)
        if moved == begin:
            return begin
        begin = moved
    return asked  # left to the agreement of two cuts (`_agree`)


def cut_for_tokenizing(texts: list[str], keep: int, side: str, literals: tuple[AddedLiteral, ...] = ()) -> list[str]:
    """Each text cut to `keep` characters on the tokenizer's truncation side (the end it drops tokens from),
    or a little less where the cut would fall in one of the tokenizer's added tokens written in the text."""
    longest = max((len(literal.text) for literal in literals), default=0)
    cut = []
    for text in texts:
        if len(text) <= keep:
            cut.append(text)
        elif side == "left":
            cut.append(text[_begin_clear_of_literals(text, len(text) - keep, literals, longest):])
        else:
            cut.append(text[:_end_clear_of_literals(text, keep, literals, longest)])
    return cut


def _settled(encoding, side: str) -> bool:
    """Whether truncation dropped tokens of a word beyond every kept one (the last word of a cut text on the
    right, the first on the left, is the one the cut most often changes). A window not filled, e.g. by
    50,000 leading spaces, is not settled."""
    kept = [w for w in encoding.word_ids if w is not None]
    dropped = [w for extra in encoding.overflowing for w in extra.word_ids if w is not None]
    if not dropped:
        return False
    if not kept:  # the window holds special tokens only
        return True
    return min(kept) > min(dropped) if side == "left" else max(kept) < max(dropped)


@functools.lru_cache(maxsize=64)
def _prime_at_least(n: int) -> int:
    n = max(n, 2)
    while any(n % d == 0 for d in range(2, math.isqrt(n) + 1)):
        n += 1
    return n


def _longer_cut(length: int) -> int:
    """The next cut's length: at least twice as long (linear in the text overall), longer by a prime number
    of characters, so that no periodic pattern shorter than that (digits grouped by 3, fixed-length
    pieces) meets both cuts alike."""
    return length + _prime_at_least(length)


def _word_next_to(encoding, point: int, side: str) -> int:
    """In a cut's encoding (kept and dropped tokens), the word of the first token ending after `point`
    (right truncation) or of the last starting before it (left): the word an earlier cut at `point` fell in,
    or the nearest one across characters no token covers (whitespace, characters the normalizer deletes).
    -1: no such token (the cut does not reach past `point`)."""
    best, word = None, -1
    for piece in (encoding, *encoding.overflowing):
        for w, (start, stop) in zip(piece.word_ids, piece.offsets):
            if w is None:
                continue
            if side == "right" and stop > point and (best is None or start < best):
                best, word = start, w
            elif side == "left" and start < point and (best is None or stop > best):
                best, word = stop, w
    return word


def _agree(shorter, shorter_length: int, longer, longer_length: int, side: str) -> bool:
    """Whether two cuts of a text, both settled, keep the same tokens, and the longer one shows a word past
    the shorter's cut point that it does not keep (cuts within one long word, or both within a run of
    characters the normalizer deletes, can agree on the same wrong pieces)."""
    if not (_settled(shorter, side) and _settled(longer, side) and longer.ids == shorter.ids):
        return False
    point = shorter_length if side == "right" else longer_length - shorter_length  # in the longer cut
    word = _word_next_to(longer, point, side)
    return word != -1 and word not in {w for w in longer.word_ids if w is not None}


def _next_cut(text: str, asked: int, shorter_than: int, side: str, literals) -> tuple[str, int]:
    """(the next cut of `text`, the length it was asked for): longer than the last cut, or the whole text."""
    while True:
        asked = _longer_cut(asked)
        if len(text) <= asked:
            return text, asked
        cut = cut_for_tokenizing([text], asked, side, literals)[0]
        if len(cut) > shorter_than:  # (clearing an added token can take a cut back below the last one)
            return cut, asked


def truncated_encodings(texts: list[str], keep: int, side: str, literals, encode_batch) -> list:
    """Each text's encoding truncated, from cuts of growing length, the first `keep` characters long: for a
    longer text, the first two cuts that agree, else the whole text. A tokenizer's pipeline is not local in
    general (contractions, digit groups, normalizers that compose characters or prepend one, added tokens
    matched after normalization): a cut can change more than its own word, but not the same way from two
    places far apart. Each round's cuts are tokenized as one batch (on the tokenizer's threads).

    encode_batch(texts) -> their `tokenizers.Encoding`s, truncated to N tokens on `side` (`overflowing` holds
    what truncation dropped); `literals`: `added_literals` of the same tokenizer."""
    cuts = cut_for_tokenizing(texts, keep, side, literals)
    encodings = encode_batch(cuts)
    # (text index, encoding of its last cut, that cut's length, the length it was asked for)
    unconfirmed = [(i, encodings[i], len(cuts[i]), keep) for i, text in enumerate(texts) if len(text) > keep]
    while unconfirmed:
        asks = [(i, previous, length, *_next_cut(texts[i], asked, length, side, literals))
                for i, previous, length, asked in unconfirmed]
        unconfirmed = []
        for (i, previous, length, cut, asked), encoding in zip(asks, encode_batch([a[3] for a in asks])):
            if len(cut) == len(texts[i]) or _agree(previous, length, encoding, len(cut), side):
                encodings[i] = encoding
            else:
                unconfirmed.append((i, encoding, len(cut), asked))
    return encodings

"""Training data: corpus sources (file, pairs file, wordfreq), validation, tokenize-once, batching.

Every string is tokenized once per epoch at most (the masked view is re-drawn each epoch), then batches
are cut from flat token arrays, either padded (B, L) or packed (1, T) with cumulative lengths for
unpadded attention.
"""

import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from mirrorfast.envinfo import package_version
from mirrorfast.errors import MirrorfastError
from mirrorfast.textfile import read_utf8_and_sha256
from mirrorfast.tokens import TokenizedTexts

PAIR_SEPARATOR = "||"


@dataclass
class Corpus:
    """Positive pairs (first[i], second[i]); second is None for self-duplication (Mirror-BERT)."""

    first: list[str]
    second: list[str] | None
    description: str
    duplicates_removed: int = 0
    identity: dict = field(default_factory=dict)  # what exactly it was read from (recorded in mirrorfast.json)

    def __len__(self) -> int:
        return len(self.first)

    @property
    def unit(self) -> str:
        """What one item is called in messages: "pairs" (a --pairs file) or "strings"."""
        return "strings" if self.second is None else "pairs"


# Around a string: whitespace, and characters str.strip() keeps that tokenizers drop (a BOM where files were
# concatenated, zero-width spaces, NUL, DEL): a line of only those is blank, "\ufeffword" is "word" (a duplicate).
_INVISIBLE = r"\s\x00\x7f\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff"  # + LRM/RLM, bidi controls
_SURROUNDING = re.compile(f"^[{_INVISIBLE}]+|[{_INVISIBLE}]+$")


def _stripped(text: str) -> str:
    return _SURROUNDING.sub("", text)


def _read_lines(path: str, what: str) -> tuple[list[tuple[int, str]], dict]:
    """(line number, stripped text) for every non-blank line of a UTF-8 file, and the file's identity
    (resolved path, SHA-256 of the bytes read) for mirrorfast.json. Lines end at "\n" (and "\r\n") only,
    as in `encode` and the authors' code: str.splitlines would also split at form feeds, U+0085 or U+2028
    inside a line."""
    text, sha256 = read_utf8_and_sha256(path, what)
    lines = [(n, _stripped(line)) for n, line in enumerate(text.split("\n"), start=1)]
    return [(n, s) for n, s in lines if s], {"path": str(Path(path).resolve()), "sha256": sha256}


def _dedup(items: list, key=lambda x: x) -> tuple[list, int]:
    seen: set = set()
    kept = []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            kept.append(item)
    return kept, len(items) - len(kept)


def _require_two(count: int, source: str, removed: int = 0, unit: str = "string") -> None:
    if count == 0:
        raise MirrorfastError(f"{source} is empty (no non-blank lines)")
    if count < 2:
        dropped = f" ({removed} exact duplicate{'s' if removed > 1 else ''} removed; --keep-duplicates keeps them)" \
            if removed else ""
        raise MirrorfastError(f"{source} has {count} usable {unit}{dropped}; contrastive training needs at least 2")


def _wordfreq_corpus(spec: str) -> list[str]:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise MirrorfastError(f"--corpus {spec!r}: expected wordfreq:LANG or wordfreq:LANG:N")
    lang = parts[1]
    if len(parts) == 3 and not (parts[2].isascii() and parts[2].isdigit()):  # int() takes " 5", "+5", "５"
        raise MirrorfastError(f"--corpus {spec!r}: N must be an integer")
    n = int(parts[2]) if len(parts) == 3 else 10000
    if n < 2:
        raise MirrorfastError(f"--corpus {spec!r}: N must be at least 2")
    try:
        import wordfreq
    except ImportError as exc:
        if exc.name == "wordfreq":
            raise MirrorfastError("--corpus wordfreq:... needs the wordfreq package (pip install wordfreq)") from None
        # installed but broken (wordfreq 3.0 imports pkg_resources, which setuptools 82 no longer has)
        raise MirrorfastError(f"--corpus wordfreq:...: the wordfreq package failed to import ({exc}); "
                              "pip install -U wordfreq") from None
    if lang not in wordfreq.available_languages():
        raise MirrorfastError(f"--corpus {spec!r}: wordfreq has no word list for language {lang!r}")
    # Some lists hold "words" of invisible characters only (Persian's and Arabic's zero-width non-joiner):
    # stripped as file lines are, and dropped when nothing is left (the tokenizer would see no text).
    return [word for word in map(_stripped, wordfreq.top_n_list(lang, n)) if word]


def load_corpus(spec: str, dedup: bool = True) -> Corpus:
    """FILE (one string per line) or wordfreq:LANG[:N]; blank lines skipped, exact duplicates removed."""
    if spec.startswith("wordfreq:"):
        texts = _wordfreq_corpus(spec)
        description = f"{spec} ({len(texts)} most frequent words from wordfreq)"
        identity = {"wordfreq": package_version("wordfreq")}
    else:
        lines, identity = _read_lines(spec, "corpus file")
        texts = [s for _, s in lines]
        description = spec
    removed = 0
    if dedup:
        texts, removed = _dedup(texts)
    _require_two(len(texts), f"corpus {spec}", removed)
    return Corpus(texts, None, description, removed, identity)


def load_pairs(path: str, dedup: bool = True) -> Corpus:
    """`text1||text2` per line: the two sides are a positive pair."""
    first, second = [], []
    lines, identity = _read_lines(path, "pairs file")
    for number, line in lines:
        separators = line.count(PAIR_SEPARATOR)
        if PAIR_SEPARATOR + "|" in line:  # "x|||y": "x|" + "y" or "x" + "|y"?
            raise MirrorfastError(f"{path}: line {number} has '|||': which two bars separate the pair is ambiguous "
                                  "(expected text1||text2)")
        if separators != 1:
            what = "no" if separators == 0 else f"{separators}"
            raise MirrorfastError(f"{path}: line {number} has {what} '{PAIR_SEPARATOR}' separators, not one "
                                  "(expected text1||text2)")
        left, right = (_stripped(s) for s in line.split(PAIR_SEPARATOR))
        if not left or not right:
            raise MirrorfastError(f"{path}: line {number} has an empty side (expected text1||text2)")
        first.append(left)
        second.append(right)
    removed = 0
    if dedup:
        kept, removed = _dedup(list(zip(first, second)))
        first, second = [a for a, _ in kept], [b for _, b in kept]
    _require_two(len(first), f"pairs file {path}", removed, unit="pair")
    return Corpus(first, second, f"{path} (supervised pairs)", removed, identity)


@dataclass
class Batch:
    """2N views: rows 0..N-1 are the first views, N..2N-1 their positives.

    padded: input_ids / attention_mask are (2N, L), the views sorted by length and cut into `chunks`
    (start, end, width) that are encoded separately, each at its own width; `restore` (2N,) puts the
    pooled rows back in view order. packed: input_ids / position_ids are (1, T) and cu_seqlens (S + 1,)
    int32 marks where each of S segments starts: the 2N views, then (when the batch is padded to a
    bucketed T) a few segments of padding tokens; segment_ids (T,) is each token's segment (all built on
    the host, off the training step); max_len is a host int (no device sync).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    restore: torch.Tensor | None = None
    chunks: tuple[tuple[int, int, int], ...] = ()
    max_len: int = 0
    tokens: int = 0  # real (non-pad) tokens
    views: int = 0  # 2N

    TENSORS = ("input_ids", "attention_mask", "position_ids", "cu_seqlens", "segment_ids", "restore")

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, name) for name in self.TENSORS) if t is not None]

    def with_tensors(self, change) -> "Batch":
        """A copy with change(tensor) applied to every tensor field."""
        return replace(self, **{name: None if getattr(self, name) is None else change(getattr(self, name))
                                for name in self.TENSORS})

    def to(self, device, non_blocking: bool = False) -> "Batch":
        pin = non_blocking and torch.device(device).type == "cuda"
        return self.with_tensors(lambda t: (t.pin_memory() if pin else t).to(device, non_blocking=non_blocking))


def _gather(views: list[tuple[TokenizedTexts, np.ndarray]]) -> tuple[list[np.ndarray], np.ndarray]:
    pieces, lengths = [], []
    for tok, rows in views:
        for r in rows:
            pieces.append(tok.ids[tok.offsets[r] : tok.offsets[r + 1]])
        lengths.append(tok.lengths(rows))
    return pieces, np.concatenate(lengths)


# Padding to the longest view of a batch wastes most of the work on the paper's sentences (mean 14.4
# tokens, a batch's longest 40-70: ../shared/notes/gpu-measurements.md): padded batches are sorted by
# length and encoded in chunks of about this many views, each padded only to its own longest (2-core CPU,
# MiniLM, 400 views fwd+bwd, 2026-11-26: 10.45 s -> 3.93 s, benchmarks/RESULTS.md).
VIEWS_PER_CHUNK = 64
# On CUDA the trainer rounds chunk widths up to a multiple of 8 (tensor-core friendly, fewer distinct
# shapes). On the CPU rounding only adds work: the word preset's 3-5 token views padded to 8 made a
# step 2.2x slower, sentences 1.3x (2-core CPU, MiniLM, 400 views, 2026-11-26).
CUDA_WIDTH_MULTIPLE = 8


def padded_batch(views, pad_id: int, pad_to_multiple_of: int = 1, views_per_chunk: int = VIEWS_PER_CHUNK,
                 max_width: int | None = None) -> Batch:
    """Views sorted by length, right-padded per chunk to its longest (rounded up to a multiple, if asked, but
    never past max_width: the run's max length, which the model's positions allow; a width past them fails)."""
    pieces, lengths = _gather(views)
    order = np.argsort(-lengths, kind="stable")  # longest first: chunk 0 sets the array's width
    limit = max_width or np.iinfo(np.int64).max
    round_up = lambda n: max(int(n), min(-(-int(n) // pad_to_multiple_of) * pad_to_multiple_of, limit))  # noqa: E731
    width = round_up(lengths.max())
    ids = np.full((len(pieces), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(pieces), width), dtype=np.int64)
    for row, i in enumerate(order):
        ids[row, : lengths[i]] = pieces[i]
        mask[row, : lengths[i]] = 1
    n_chunks = max(1, round(len(pieces) / views_per_chunk))
    bounds = np.linspace(0, len(pieces), n_chunks + 1).round().astype(int)
    chunks: list[tuple[int, int, int]] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        chunk_width = round_up(lengths[order[a]])
        if chunks and chunks[-1][2] == chunk_width:  # same width as the previous chunk: one call, not two
            chunks[-1] = (chunks[-1][0], int(b), chunk_width)
        elif b > a:
            chunks.append((int(a), int(b), chunk_width))
    return Batch(torch.from_numpy(ids), torch.from_numpy(mask), restore=torch.from_numpy(np.argsort(order)),
                 chunks=tuple(chunks), tokens=int(lengths.sum()), views=len(pieces))


# Static shapes for CUDA graphs: T is rounded up to a multiple of PACK_BUCKET tokens, and the padding
# goes into a fixed number of segments of at most PAD_SEGMENT_MAX tokens each (never longer than the
# static max_len given to the attention kernel, never empty).
PACK_BUCKET = 512
PAD_SEGMENT_MAX = 128  # FlashAttention's tile
TILE_PAD_SEGMENT_MAX = 64  # the gathered-SDPA path and the Triton kernel pad every view to max_len: keep it short
MAX_LEN_MULTIPLE = 32


def pad_segments(bucket: int, segment_max: int) -> int:
    """Padding segments per bucketed batch: the padding (from k to bucket - 1 + k tokens for k segments)
    always fits k segments of at most segment_max tokens (5 for 512 / 128, 9 for 512 / 64)."""
    return -(-(bucket - 1) // (segment_max - 1))


def bucketed_max_len(longest: int, pad_segment_max: int) -> int:
    """A bucketed batch's max_len for its longest view: a multiple of MAX_LEN_MULTIPLE, at least the padding
    segments' length."""
    return max(-(-longest // MAX_LEN_MULTIPLE) * MAX_LEN_MULTIPLE, pad_segment_max)


def packed_batch(views, pad_id: int = 0, bucket: int | None = None, pad_segment_max: int = PAD_SEGMENT_MAX) -> Batch:
    """Views concatenated without padding; positions restart at 0 for each view.

    With `bucket`, T is rounded up to a multiple of it (with at least one padding token per padding
    segment) and the padding forms pad_segments(bucket, pad_segment_max) extra segments, so that every
    batch of an epoch has one of a few shapes; max_len is then at least pad_segment_max and a multiple of
    MAX_LEN_MULTIPLE (views longer than the padding segments give a few max_len values, not one per batch).
    """
    pieces, lengths = _gather(views)
    n_views, real_tokens, max_len = len(pieces), int(lengths.sum()), int(lengths.max())
    if bucket:
        segments = pad_segments(bucket, pad_segment_max)
        total = -(-(real_tokens + segments) // bucket) * bucket
        pad = total - real_tokens
        pad_lengths = np.full(segments, pad // segments, dtype=np.int64)
        pad_lengths[: pad % segments] += 1
        assert pad_lengths.max() <= pad_segment_max and pad_lengths.min() >= 1  # pad_segments guarantees it
        pieces = pieces + [np.full(n, pad_id, dtype=np.int64) for n in pad_lengths]
        lengths = np.concatenate([lengths, pad_lengths])
        max_len = bucketed_max_len(max_len, pad_segment_max)
    cu = np.zeros(len(pieces) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    ids = np.concatenate(pieces).astype(np.int64, copy=False)  # model inputs are int64, stored ids int32
    segments = np.repeat(np.arange(len(pieces), dtype=np.int64), lengths)  # (T,) segment of each token
    positions = np.arange(len(ids), dtype=np.int64) - cu[:-1].astype(np.int64)[segments]
    # Padding segments are isolated and never read: position 0, which every model has (a 128-token
    # padding segment would index past a model with fewer positions).
    positions[real_tokens:] = 0
    return Batch(torch.from_numpy(ids)[None], position_ids=torch.from_numpy(positions)[None],
                 cu_seqlens=torch.from_numpy(cu), segment_ids=torch.from_numpy(segments), max_len=max_len,
                 tokens=real_tokens, views=n_views)


def epoch_batches(n: int, batch_size: int, rng: random.Random) -> list[np.ndarray]:
    """Shuffled row indices cut into batches; a last batch of one string (no negatives) is dropped."""
    order = list(range(n))
    rng.shuffle(order)
    order = np.asarray(order, dtype=np.int64)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return [b for b in batches if len(b) >= 2]

"""STS and word-similarity evaluation for any encoder with `encode(texts) -> np.ndarray`.

Protocol (the paper's, and ../shared/data's README): embed each side, cosine similarity, Spearman
correlation with the gold scores over all pairs, x100.
"""

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from scipy.stats import spearmanr

from mirrorfast.errors import MirrorfastError, check_path
from mirrorfast.textfile import read_utf8


class TextEncoder(Protocol):
    def encode(self, texts: list[str], batch_size: int = ...) -> np.ndarray: ...


@dataclass
class PairSet:
    """Scored text pairs from one evaluation file."""

    path: Path
    kind: str  # "sts" or "words"
    left: list[str]
    right: list[str]
    scores: np.ndarray


def _rows(path: Path, **dialect) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line; a stray carriage return ends a line, as in a text
    editor (csv's own error for it named no line)."""
    text = read_utf8(path, "evaluation file")
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), **dialect))
    except csv.Error as exc:
        raise MirrorfastError(f"{path}: not a readable CSV/TSV file: {exc}") from None
    return [(number, row) for number, row in enumerate(rows, start=1)
            if row and not all(not cell.strip() for cell in row)]


def _pairs(path: Path, kind: str, rows: list[tuple[int, list[str]]]) -> PairSet:
    left, right, scores = [], [], []
    for number, row in rows:
        if len(row) != 3:  # more: a comma in an unquoted sentence would shift the score silently
            expected = ("text1,text2,score (quote a text that holds a comma)" if kind == "sts"
                        else "word1<TAB>word2<TAB>score")
            fields = f"{len(row)} field{'s' if len(row) != 1 else ''}"
            raise MirrorfastError(f"{path}: line {number} has {fields}, expected exactly 3: {expected}")
        try:
            scores.append(float(row[2]))
        except ValueError:
            header = " (a header line? STS files have none)" if kind == "sts" and number == 1 else ""
            raise MirrorfastError(f"{path}: line {number}: score {row[2]!r} is not a number{header}") from None
        if not math.isfinite(scores[-1]):
            raise MirrorfastError(f"{path}: line {number}: score {row[2]!r} is not a finite number")
        left.append(row[0])
        right.append(row[1])
    if len(scores) < 2:
        raise MirrorfastError(f"{path}: fewer than 2 scored pairs")
    if min(scores) == max(scores):
        raise MirrorfastError(f"{path}: all {len(scores)} scores are {scores[0]:g}: a rank correlation with them "
                              "is undefined")
    return PairSet(path, kind, left, right, np.asarray(scores, dtype=np.float64))


def read_sts(path: str | Path) -> PairSet:
    """`sentence1,sentence2,score` CSV (quoted as needed), no header."""
    check_path("an STS file", path)
    path = Path(path)
    return _pairs(path, "sts", _rows(path))


def read_words(path: str | Path) -> PairSet:
    """`word1<TAB>word2<TAB>score` with a header line; a first line whose score is a number (nan too) is a
    pair (a file without the header would otherwise lose its first pair without a word)."""
    check_path("a word file", path)
    path = Path(path)
    rows = _rows(path, delimiter="\t", quoting=csv.QUOTE_NONE)
    if rows and not _is_number(rows[0][1][2] if len(rows[0][1]) == 3 else ""):
        rows = rows[1:]  # the header
    return _pairs(path, "words", rows)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def cosine_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return (x * y).sum(1) / np.maximum(norms, 1e-12)


def spearman(encoder: TextEncoder, pairs: PairSet, batch_size: int = 128) -> float:
    """Spearman x100 between gold scores and the cosine of the two sides' embeddings; NaN when the encoder
    gives every pair the same cosine (a collapsed model: no ranking to correlate) or a non-finite one."""
    if not isinstance(pairs, PairSet):
        raise MirrorfastError(f"pairs must be a PairSet (read_sts / read_words), got {pairs!r}")
    if not len(pairs.left) == len(pairs.right) == len(pairs.scores):  # a PairSet built by hand
        raise MirrorfastError(f"{pairs.path}: {len(pairs.left)} left texts, {len(pairs.right)} right texts and "
                              f"{len(pairs.scores)} scores: one of each per pair")
    if len(pairs.scores) < 2:  # read_sts / read_words refuse such files; a PairSet built by hand may not
        raise MirrorfastError(f"{pairs.path}: a Spearman correlation needs at least 2 pairs, got {len(pairs.scores)}")
    unique = sorted(set(pairs.left) | set(pairs.right))
    vectors = encoder.encode(unique, batch_size=batch_size)
    index = {text: i for i, text in enumerate(unique)}
    a = vectors[[index[t] for t in pairs.left]]
    b = vectors[[index[t] for t in pairs.right]]
    cosines = cosine_rows(a, b)
    if not np.isfinite(cosines).all() or cosines.min() == cosines.max():  # a broken or collapsed model
        return math.nan
    return float(spearmanr(cosines, pairs.scores).correlation * 100.0)


def evaluate(encoder: TextEncoder, sets: list[PairSet], batch_size: int = 128) -> list[dict]:
    """One result dict per pair set (read_sts / read_words): {"file", "kind", "pairs", "spearman"}; spearman
    is None where it is undefined (JSON null, not NaN, which JSON does not have)."""
    if isinstance(sets, PairSet) or not isinstance(sets, (list, tuple)):
        raise MirrorfastError(f"evaluate takes a list of PairSets (read_sts / read_words), "
                              f"got a {type(sets).__name__}")
    results = []
    for s in sets:
        value = spearman(encoder, s, batch_size)
        results.append({"file": str(s.path), "kind": s.kind, "pairs": len(s.scores),
                        "spearman": None if math.isnan(value) else round(value, 4)})
    return results


def format_spearman(value: float | None) -> str:
    """For logs and tables: 2 decimals, or why there is no number."""
    return "n/a (the model's cosines are all equal, or not finite)" if value is None else f"{value:.2f}"

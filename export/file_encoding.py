"""`mirrorfast encode`: a UTF-8 text file streamed through an OnnxEncoder into a float32 .npy, written
atomically (a temporary sibling renamed when complete), in memory bounded whatever the file's size."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mirrorfast.errors import MirrorfastError
from mirrorfast.export.runtime import OnnxEncoder
from mirrorfast.output import atomic_file, probe_writable
from mirrorfast.progress import progress_bar
from mirrorfast.textfile import iter_lines
from mirrorfast.tokens import check_batch_size


@dataclass
class EncodeSummary:
    texts: int
    blank_lines: int
    truncated: int | None  # texts longer than max_length, cut to it (None: the tokenizer does not say)
    max_length: int
    output: Path
    shape: tuple[int, int]
    model_file: str
    provider: str
    seconds: float


def check_npy_output(output: str | os.PathLike) -> Path:
    """A .npy path that can be written (checked before any work is done; missing parent folders are
    created when it is written, and removed again if that fails)."""
    if os.fspath(output) == "":
        raise MirrorfastError("output is an empty string (an unset shell variable?): give a file name ending in .npy")
    if os.fspath(output).endswith(("/", os.sep)):  # Path() would drop the slash and write a file
        raise MirrorfastError(f"output {os.fspath(output)} names a directory; give a file name ending in .npy")
    output = Path(output)
    if output.name == ".npy":  # its suffix is "": "must end in .npy" would puzzle
        raise MirrorfastError(f"output file {output} has no name before .npy; give one, for example vectors.npy")
    if output.suffix != ".npy":
        raise MirrorfastError(f"output file {output} must end in .npy")
    if output.is_dir():
        raise MirrorfastError(f"output {output} is a directory")
    probe_writable(output)  # a directory we cannot write to fails now, not after the work
    return output


@contextlib.contextmanager
def npy_rows_writer(output: Path, rows: int, dim: int) -> Iterator[Callable[[np.ndarray], None]]:
    """-> write(block): appends (k, dim) float32 rows to a (rows, dim) .npy written atomically to `output`
    (from check_npy_output) once all `rows` are in; on any failure `output` is left as it was. Rows go to
    disk as they come: no array of the whole output."""
    written = 0
    with atomic_file(output) as handle:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                  "shape": (rows, dim)}
        np.lib.format.write_array_header_1_0(handle, header)  # what np.save writes

        def write(block: np.ndarray) -> None:
            nonlocal written
            handle.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
            written += len(block)

        yield write
        if written != rows:
            raise MirrorfastError(f"{rows} rows were due in {output}, {written} came (did the input change?)")


# Texts read, tokenized and length-sorted at a time by encode_file: memory stays bounded whatever the
# file's size (the vectors go straight to disk), and sorting within 50,000 texts leaves little padding.
ENCODE_CHUNK = 50_000


def _is_text(line: str) -> bool:
    return bool(line.strip())  # blank (or whitespace-only) lines are skipped, not encoded


def _non_blank(path: str | os.PathLike) -> Iterator[str]:
    return (line for line in iter_lines(path, "input file") if _is_text(line))


def encode_file(
    export_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    batch_size: int = 64,
    provider: str = "auto",
    int8: bool = False,
    progress: bool = False,
) -> EncodeSummary:
    """Embed every non-blank line of a UTF-8 text file (one text per line, \\n or \\r\\n, optional BOM);
    write a float32 (n, dim) .npy atomically. The file is read twice, streamed: once to check and count
    it, once to encode it ENCODE_CHUNK lines at a time."""
    lines = texts = 0
    for line in iter_lines(input_path, "input file"):  # (it refuses a CR-only file at the end)
        lines += 1
        texts += _is_text(line)
    if not texts:
        raise MirrorfastError(f"{input_path} has no non-blank lines to encode")
    batch_size = check_batch_size(batch_size)
    output = check_npy_output(output_path)
    encoder = OnnxEncoder(export_dir, provider=provider, int8=int8)
    start = time.perf_counter()
    with npy_rows_writer(output, texts, encoder.dim) as write, progress_bar(texts, "text", progress) as bar:
        lines_left = _non_blank(input_path)
        while chunk := list(itertools.islice(lines_left, ENCODE_CHUNK)):
            write(encoder._encode_by_length(chunk, batch_size, bar.update))
    seconds = time.perf_counter() - start
    return EncodeSummary(texts, lines - texts, encoder.truncated_texts, encoder.max_length, output,
                         (texts, encoder.dim), encoder.model_path.name, encoder.provider, seconds)

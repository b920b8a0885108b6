"""Reading users' text files: UTF-8 (a BOM is allowed), with the line number of the first invalid byte."""

import codecs
import hashlib
from pathlib import Path
from typing import Iterator

from mirrorfast.errors import MirrorfastError


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise MirrorfastError(f"{what} {path} not found")
    if not path.is_file():
        raise MirrorfastError(f"{what} {path} is not a file")


def _not_utf8(path: Path, line: int, byte: int) -> MirrorfastError:
    return MirrorfastError(f"{path}: line {line} is not valid UTF-8 (byte {byte:#04x})")


def read_utf8(path: str | Path, what: str) -> str:
    """The whole file as text; `what` names it in errors ("corpus file", "input file", ...)."""
    path = Path(path)
    _check_file(path, what)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, data[: exc.start].count(b"\n") + 1, data[exc.start]) from None


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256 (hex), read in blocks: which exact data a run trained on."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def iter_lines(path: str | Path, what: str) -> Iterator[str]:
    """The file's lines, streamed (any file size), without their ending (\\n or \\r\\n); a final newline
    ends the last line, it does not start a blank one."""
    path = Path(path)
    _check_file(path, what)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
                if not raw:  # a file that is only a BOM has no lines
                    return
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, number, raw[exc.start]) from None
            yield line.removesuffix("\n").removesuffix("\r")

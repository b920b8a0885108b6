"""Reading users' text files: UTF-8 (a BOM is allowed), with the line number of the first invalid byte."""

import codecs
import hashlib
from pathlib import Path
from typing import Iterator

from mirrorfast.errors import MirrorfastError


# The first bytes of compressed files people pass by mistake (a .gz corpus): named in the UTF-8 error.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
               b"\x28\xb5\x2f\xfd": "zstd"}


def _check_file(path: Path, what: str) -> None:
    if str(path) == "-":
        raise MirrorfastError(f"{what} '-': standard input is not read; save the text to a file and name it")
    if not path.exists():
        raise MirrorfastError(f"{what} {path} not found")
    if not path.is_file():
        raise MirrorfastError(f"{what} {path} is not a file (pipes and devices are not read: save the text to a file)")


def _not_utf8(path: Path, line: int, byte: int) -> MirrorfastError:
    try:
        with open(path, "rb") as handle:
            start = handle.read(8)
    except OSError:
        start = b""
    kind = next((name for magic, name in _COMPRESSED.items() if start.startswith(magic)), None)
    if kind is not None:
        return MirrorfastError(f"{path} is {kind}-compressed, not text: decompress it first")
    return MirrorfastError(f"{path}: line {line} is not valid UTF-8 (byte {byte:#04x})")


def _read_bytes(path: Path, what: str) -> bytes:
    _check_file(path, what)
    return path.read_bytes()


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, data[: exc.start].count(b"\n") + 1, data[exc.start]) from None


def read_utf8(path: str | Path, what: str) -> str:
    """The whole file as text; `what` names it in errors ("corpus file", "input file", ...)."""
    path = Path(path)
    return _decode(path, _read_bytes(path, what))


def read_utf8_and_sha256(path: str | Path, what: str) -> tuple[str, str]:
    """The whole file as text, and the SHA-256 (hex) of the very bytes decoded: which exact data a run
    trained on, even if the file is rewritten while the run starts."""
    path = Path(path)
    data = _read_bytes(path, what)
    return _decode(path, data), hashlib.sha256(data).hexdigest()


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

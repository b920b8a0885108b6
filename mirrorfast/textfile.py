"""Reading users' text files: UTF-8 (a BOM is allowed), with the line number of the first invalid byte."""

import codecs
import hashlib
from pathlib import Path
from typing import Iterator

from mirrorfast.errors import MirrorfastError


# The first bytes of compressed files people pass by mistake (a .gz corpus): named in the UTF-8 error.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _compression(start: bytes) -> str | None:
    """The compressed format a file's first 10 bytes announce, if any (bzip2's: "BZh", a block size 1-9
    and its first block's magic, so that a text that starts with "BZh" is not taken for one)."""
    if start[:3] == b"BZh" and start[3:4].isdigit() and start[3:4] != b"0" and start[4:10] == b"1AY&SY":
        return "bzip2"
    return next((name for magic, name in _COMPRESSED.items() if start.startswith(magic)), None)


def _path(path: str | Path, what: str) -> Path:
    """The argument as a Path; "-" as typed (not "./-", a file of that name) is standard input, not read."""
    if isinstance(path, str) and path == "-":
        raise MirrorfastError(f"{what} '-': standard input is not read; save the text to a file and name it")
    return Path(path)


def _check_line_endings(path: Path, newlines: int, lone_crs: int) -> None:
    """Refuse a file whose lines end in a carriage return alone (old Mac line endings): two or more CRs not
    followed by \\n, and at most one \\n in the whole file. Lines end at \\n here, so it would be one giant
    string; CRs inside lines that end in \\n are text."""
    if lone_crs >= 2 and newlines <= 1:
        raise MirrorfastError(f"{path}: its lines end in a carriage return alone (CR, old Mac line endings); lines "
                              f"end at \\n here: convert it first, for example tr '\\r' '\\n' < {path} > fixed.txt")


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise MirrorfastError(f"{what} {path} not found")
    if not path.is_file():
        raise MirrorfastError(f"{what} {path} is not a file (pipes and devices are not read: save the text to a file)")


def _not_utf8(path: Path, line: int, byte: int) -> MirrorfastError:
    try:
        with open(path, "rb") as handle:
            start = handle.read(10)
    except OSError:
        start = b""
    kind = _compression(start)
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
    path = _path(path, what)
    return _decode(path, _read_bytes(path, what))


def read_utf8_and_sha256(path: str | Path, what: str) -> tuple[str, str]:
    """The whole file as text, and the SHA-256 (hex) of the very bytes decoded: which exact data a run
    trained on, even if the file is rewritten while the run starts. A file of CR-only lines is refused."""
    path = _path(path, what)
    data = _read_bytes(path, what)
    text = _decode(path, data)
    _check_line_endings(path, text.count("\n"), text.count("\r") - text.count("\r\n"))
    return text, hashlib.sha256(data).hexdigest()


def iter_lines(path: str | Path, what: str) -> Iterator[str]:
    """The file's lines, streamed (any file size), without their ending (\\n or \\r\\n); a final newline
    ends the last line, it does not start a blank one. A file of CR-only lines is refused when the
    iteration reaches its end (after its single line)."""
    path = _path(path, what)
    _check_file(path, what)
    newlines = lone_crs = 0
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
            newlines += raw.endswith(b"\n")
            lone_crs += raw.count(b"\r") - raw.endswith(b"\r\n")
            yield line.removesuffix("\n").removesuffix("\r")
    _check_line_endings(path, newlines, lone_crs)

"""Reading users' text files: UTF-8 (a BOM is allowed), with the line number of the first invalid byte."""

from pathlib import Path

from mirrorfast.errors import MirrorfastError


def read_utf8(path: str | Path, what: str) -> str:
    """The whole file as text; `what` names it in errors ("corpus file", "input file", ...)."""
    path = Path(path)
    if not path.exists():
        raise MirrorfastError(f"{what} {path} not found")
    if not path.is_file():
        raise MirrorfastError(f"{what} {path} is not a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise MirrorfastError(f"{path}: line {line} is not valid UTF-8 (byte {data[exc.start]:#04x})") from None

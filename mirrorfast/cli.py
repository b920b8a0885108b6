"""The `mirrorfast` command: parse arguments, call the room that does the work, print. No logic here.

Every user-facing failure is a MirrorfastError: one line on stderr, exit code 2, no traceback
(pass --debug for one).
"""

import argparse
import sys

from mirrorfast.errors import MirrorfastError


# ---------------------------------------------------------------------------------------------- train
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="Mirror-BERT fine-tuning of a masked language model")
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args) -> int:
    raise MirrorfastError("train: not implemented yet")


# ----------------------------------------------------------------------------------------------- eval
def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="STS / word-similarity Spearman of a model or export directory")
    p.set_defaults(handler=_cmd_eval)


def _cmd_eval(args) -> int:
    raise MirrorfastError("eval: not implemented yet")


# --------------------------------------------------------------------------------------------- export
def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a trained model to ONNX (fp32, optional fp16 / int8)")
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args) -> int:
    raise MirrorfastError("export: not implemented yet")


# --------------------------------------------------------------------------------------------- encode
def _add_encode(sub) -> None:
    p = sub.add_parser("encode", help="embed a text file with an export directory, write .npy")
    p.set_defaults(handler=_cmd_encode)


def _cmd_encode(args) -> int:
    raise MirrorfastError("encode: not implemented yet")


# ---------------------------------------------------------------------------------------------- serve
def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve an export directory over HTTP (OpenAI-compatible embeddings)")
    p.set_defaults(handler=_cmd_serve)


def _cmd_serve(args) -> int:
    raise MirrorfastError("serve: not implemented yet")


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirrorfast", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_eval, _add_export, _add_encode, _add_serve):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except MirrorfastError as exc:
        if args.debug:
            raise
        print(f"mirrorfast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mirrorfast {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `mirrorfast` command: parse arguments, call the module that does the work, print. No logic here.

Every user-facing failure is a MirrorfastError: one line on stderr, exit code 2, no traceback
(pass --debug for one).
"""

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback

from mirrorfast import __version__
from mirrorfast.config import POOLINGS
from mirrorfast.errors import MirrorfastError, Terminated, sigterm_unwinds
from mirrorfast.output import completed_outputs, forget_completed_outputs


# ---------------------------------------------------------------------------------------------- train
def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="Mirror-BERT fine-tuning of a masked language model",
        description="Mirror-BERT self-supervised fine-tuning. With no arguments: the packaged all-MiniLM-L6-v2 "
        "on the 10k most frequent English words (wordfreq:en), word preset, into ./mirrorfast-out.",
        epilog="environment (for comparison and debugging; `mirrorfast env` shows what is set): "
        "MIRRORFAST_PACKED_ATTENTION=flash|sdpa|triton (packed attention's kernel on CUDA), "
        "MIRRORFAST_FUSED_LAYERNORM=1 (fused dropout + residual + LayerNorm, Triton), "
        "MIRRORFAST_KERNELS=torch (PyTorch's loss instead of the Triton kernel), "
        "MIRRORFAST_KERNEL_WARMUP=0 (compile Triton kernels at first launch, not in the background during setup), "
        "MIRRORFAST_FIRST_TOKEN_LAST_LAYER=0 (cls pooling: the full last layer, not [CLS] alone)",
    )
    p.add_argument("--model", help="model directory or Hugging Face id (default: packaged all-MiniLM-L6-v2)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--corpus", help="UTF-8 file, one string per line, or wordfreq:LANG[:N] (default: wordfreq:en)")
    src.add_argument("--pairs", help="UTF-8 file of `text1||text2` lines: supervised positive pairs")
    p.add_argument("--level", choices=["sentence", "word"], default=None,
                   help="preset: sentence (T=0.04, mask 5, len 50, 1 epoch) or word (T=0.2, no mask, len 25, "
                   "2 epochs); default: word for wordfreq corpora, else sentence")
    p.add_argument("--temperature", type=float, help="InfoNCE temperature (preset)")
    p.add_argument("--mask-span", type=int, help="characters replaced by the mask token in the second view; 0 = off")
    p.add_argument("--max-length", type=int, help="max tokens per string (preset)")
    p.add_argument("--epochs", type=int, help="epochs (preset)")
    p.add_argument("--batch-size", type=int, default=200, help="strings per batch; 2x views are encoded (200)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (2e-5)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (0.01)")
    p.add_argument("--dropout", type=float, default=0.1, help="encoder dropout probability (0.1)")
    p.add_argument("--drophead", type=float, default=0.0, help="probability of dropping whole attention heads (0)")
    p.add_argument("--pooling", choices=POOLINGS, default="cls", help="[CLS] (default) or masked mean")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="fp16 autocast + gradient scaling (GPU)")
    prec.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU; also on CPUs with native bf16, e.g. AVX-512 BF16 or AMX)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: a CUDA GPU where there is one, else the CPU; cuda insists (default: auto)")
    p.add_argument("--attention", choices=["auto", "padded", "packed"], default="auto",
                   help="packed = unpadded variable-length attention (default on CUDA with --fp16/--bf16)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the training step from CUDA graphs (default: on wherever it applies, i.e. CUDA with "
                   "--fp16/--bf16 and packed attention; --cuda-graphs insists, --no-cuda-graphs turns it off)")
    p.add_argument("--half-model", action="store_true",
                   help="with --fp16/--bf16: run the model itself in half precision and step fp32 master weights "
                   "(no casts inside the model) instead of autocast; the saved model is fp32")
    p.add_argument("--keep-duplicates", action="store_true", help="do not remove exact duplicate strings")
    p.add_argument("--seed", type=int, default=42, help="random seed: masks, batch order, dropout (default: 42)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps")
    p.add_argument("--eval-sts", action="append", default=[], metavar="FILE.csv",
                   help="score this STS file (as `mirrorfast eval --sts`) before and after training; repeatable")
    p.add_argument("--eval-words", action="append", default=[], metavar="FILE.tsv",
                   help="score this word-similarity file (as `mirrorfast eval --words`) before and after; repeatable")
    p.add_argument("--output", default="./mirrorfast-out", help="output directory (./mirrorfast-out)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory that is not ours")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args) -> int:
    from mirrorfast.config import TrainConfig
    from mirrorfast.trainer import train

    given = args.corpus is not None or args.pairs is not None  # `--pairs "$UNSET"` is an error, not the default
    corpus = args.corpus if given else "wordfreq:en"
    config = TrainConfig(
        model=args.model, corpus=None if args.pairs is not None else corpus, pairs=args.pairs, level=args.level,
        temperature=args.temperature, mask_span=args.mask_span, max_length=args.max_length, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, dropout=args.dropout,
        drophead=args.drophead, pooling=args.pooling,
        precision="fp16" if args.fp16 else "bf16" if args.bf16 else "fp32",
        device=args.device, attention=args.attention, cuda_graphs=args.cuda_graphs, half_model=args.half_model,
        dedup=not args.keep_duplicates, seed=args.seed,
        max_steps=args.max_steps, eval_sts=tuple(args.eval_sts), eval_words=tuple(args.eval_words),
        output=args.output, overwrite=args.overwrite, progress=not args.no_progress,
    )
    train(config, log=_log)
    return 0


def _log(message: str) -> None:
    print(f"mirrorfast: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- eval
def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="STS / word-similarity Spearman of a model or export directory")
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="mirrorfast / Hugging Face model dir, an export dir, or a hub id as train --model takes it")
    p.add_argument("--sts", action="append", default=[], metavar="FILE.csv",
                   help="sentence1,sentence2,score CSV without header (repeatable)")
    p.add_argument("--words", action="append", default=[], metavar="FILE.tsv",
                   help="word1<TAB>word2<TAB>score with a header (repeatable)")
    p.add_argument("--pooling", choices=POOLINGS, help="override the model's pooling (model dirs only)")
    p.add_argument("--max-length", type=int, default=None,
                   help="max tokens per text (model dirs only; default: the model's, capped at its positions)")
    p.add_argument("--batch-size", type=int, default=128, help="texts per encoder call (default: 128)")
    p.add_argument("--int8", action="store_true", help="evaluate the export's int8 model (export dirs only)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the encoder runs: auto = a CUDA GPU when there is one (PyTorch for model dirs, "
                   "onnxruntime-gpu for exports), else the CPU")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(handler=_cmd_eval)


def _cmd_eval(args) -> int:
    import json

    from mirrorfast.evaluate import evaluate, format_spearman, read_sts, read_words

    if not args.sts and not args.words:
        raise MirrorfastError("give at least one --sts FILE.csv or --words FILE.tsv")
    if args.batch_size < 1:
        raise MirrorfastError(f"--batch-size must be at least 1, got {args.batch_size}")
    # Read the files before loading a model: bad input fails fast.
    sets = [read_sts(path) for path in args.sts] + [read_words(path) for path in args.words]
    encoder, name, pooling = _load_any_encoder(args.model_dir, args.pooling, args.int8, args.device,
                                               args.max_length)
    results = evaluate(encoder, sets, args.batch_size)
    if args.json:
        print(json.dumps({"model": name, "pooling": pooling, "results": results}, allow_nan=False))
        return 0
    print(f"model: {name} (pooling: {pooling})")
    width = max(len(r["file"]) for r in results)
    print(f"{'file':<{width}}  {'kind':<5}  {'pairs':>6}  {'spearman':>8}")
    for r in results:
        print(f"{r['file']:<{width}}  {r['kind']:<5}  {r['pairs']:>6}  {format_spearman(r['spearman']):>8}")
    return 0


def _load_any_encoder(model: str, pooling, int8=False, device="auto", max_length=None):
    """An ONNX export directory (export.json), a PyTorch model directory or hub id -> (encoder, name,
    pooling), on `device` (auto: the GPU where there is one)."""
    from pathlib import Path

    from mirrorfast.model import load_encoder, pick_device
    from mirrorfast.st_format import sentence_transformers_note

    from mirrorfast.export.runtime import EXPORT_JSON, OnnxEncoder

    path = Path(model)
    if (path / EXPORT_JSON).is_file():
        if pooling:
            raise MirrorfastError("--pooling cannot change an ONNX export: its pooling is inside the graph")
        if max_length is not None:
            raise MirrorfastError("--max-length cannot change an ONNX export: export the model again with it")
        encoder = OnnxEncoder(path, provider=device, int8=int8)
        return encoder, f"{path} ({encoder.model_path.name})" if int8 else str(path), encoder.pooling
    if int8:
        raise MirrorfastError(f"--int8 needs an export directory (mirrorfast export --int8); {path} is not one")
    if path.exists() and not path.is_dir():
        raise MirrorfastError(f"{path} is a file, not a model or export directory")
    target = pick_device(device)  # before loading: a missing GPU fails fast
    # a directory, or a hub id as `train --model` takes it (the local cache; the packaged model's own id)
    encoder = load_encoder(model, pooling=pooling, max_length=max_length).to(target)
    if note := sentence_transformers_note(encoder.model.name_or_path, encoder.pooling, encoder.max_length):
        _log(note)
    return encoder, str(path), encoder.pooling


# --------------------------------------------------------------------------------------------- export
def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a trained model to ONNX (fp32, optional fp16 / int8)")
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="a mirrorfast or Hugging Face model directory, or a hub id as train --model takes it")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the export directory to write")
    p.add_argument("--fp16", action="store_true", help="also write model_fp16.onnx (fused, fp16, for the GPU)")
    p.add_argument("--int8", action="store_true", help="also write model_int8.onnx (dynamic int8, for the CPU)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset, 14 to 20 (default 17)")
    p.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="do not L2-normalize sentence_embedding inside the graph")
    p.add_argument("--max-length", type=int, default=None,
                   help="max tokens per text (default: the model's, capped at its positions)")
    p.add_argument("--pooling", choices=POOLINGS,
                   help="override the model's pooling (default: its mirrorfast.json's, else cls)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR even if it is not a previous export")
    p.add_argument("--triton-repo", metavar="DIR", default=None,
                   help="also write an NVIDIA Triton Inference Server model repository (onnxruntime backend) into DIR")
    p.add_argument("--triton-max-batch", type=int, default=64, help="Triton max_batch_size (default 64)")
    p.add_argument("--triton-sentence-only", action="store_true",
                   help="the Triton model serves sentence_embedding alone, from the graph cut down to it (faster "
                        "for [CLS] pooling: no full last layer)")
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args) -> int:
    from mirrorfast.export import export_model
    from mirrorfast.export.triton_repo import TritonModelSettings, check_triton_repo, write_triton_repo

    if args.triton_sentence_only and not args.triton_repo:
        raise MirrorfastError("--triton-sentence-only needs --triton-repo DIR")
    if args.triton_repo:  # its options and destination fail now, not after the export is written
        check_triton_repo(args.out_dir, args.triton_repo, TritonModelSettings(max_batch_size=args.triton_max_batch),
                          overwrite=args.overwrite)
    result = export_model(
        args.model_dir, args.out_dir, fp16=args.fp16, int8=args.int8, opset=args.opset,
        normalize=args.normalize, max_length=args.max_length, pooling=args.pooling, overwrite=args.overwrite, log=_log,
    )
    m = result.manifest
    print(
        f"exported {args.model_dir} -> {result.out_dir}: {', '.join(result.files.values())} "
        f"(dim {m['dim']}, {m['pooling']} pooling, {'normalized' if m['normalized'] else 'not normalized'}, "
        f"max length {m['max_length']}, opset {m['opset']})"
    )
    for name, p in result.parity.items():
        print(f"  parity {name}: min cosine {p['min_cosine']:.6f} (>= {p['threshold']}), "
              f"max abs diff {p['max_abs_diff']:.2e}, {p['rows']} rows on {p['provider']}")
    if m["first_token_last_layer"]:
        print(f"  sentence_embedding of {', '.join(m['first_token_last_layer'])}: the last layer for the first "
              "token alone (OnnxEncoder cuts the full one away)")
    if "int8" in m:
        from mirrorfast.export.onnx import fp32_parts

        int8, first = m["int8"], m["int8"]["tries"][0]
        print(f"  int8: fp32: {fp32_parts(int8['ffn_down_fp32'], int8['fp32_layers'])}"
              + ("" if len(int8["tries"]) == 1 else
                 f" (all in int8: min cosine {first['min_cosine']:.6f}, {first['worst']})"))
    if args.triton_repo:
        model_dir = write_triton_repo(result.out_dir, args.triton_repo, max_batch_size=args.triton_max_batch,
                                      precision="fp16" if args.fp16 else "fp32", overwrite=args.overwrite,
                                      outputs=("sentence_embedding",) if args.triton_sentence_only else None)
        print(f"  triton model: {model_dir} (config.pbtxt, 1/model.onnx)")
    return 0


# --------------------------------------------------------------------------------------------- encode
def _add_encode(sub) -> None:
    p = sub.add_parser("encode", help="embed a text file with an export directory, write .npy")
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="a directory written by `mirrorfast export`")
    p.add_argument("--input", required=True, metavar="FILE",
                   help="UTF-8 text, one text per line (blank or whitespace-only lines skipped)")
    p.add_argument("--output", required=True, metavar="FILE.npy", help="float32 (n, dim) array, written atomically")
    p.add_argument("--batch-size", type=int, default=64, help="texts per model call (default: 64)")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                   help="ONNX Runtime execution provider (default: auto: CUDA with onnxruntime-gpu and a GPU, "
                        "else CPU)")
    p.add_argument("--int8", action="store_true", help="use model_int8.onnx (CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_encode)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _cmd_encode(args) -> int:
    from mirrorfast.export.file_encoding import encode_file

    s = encode_file(args.export_dir, args.input, args.output, batch_size=args.batch_size,
                    provider=args.provider, int8=args.int8, progress=not args.no_progress)
    rate = s.texts / s.seconds if s.seconds > 0 else float("inf")
    print(
        f"encoded {_count(s.texts, 'text')} ({_count(s.blank_lines, 'blank line')} skipped) with {s.model_file} "
        f"on {s.provider} "
        f"-> {s.output} {s.shape[0]}x{s.shape[1]} float32 in {s.seconds:.2f}s ({rate:.0f} texts/s)"
    )
    if s.truncated:
        were = "was" if s.truncated == 1 else "were"
        _log(f"note: {s.truncated} of the {_count(s.texts, 'text')} {were} longer than the export's max length of "
             f"{s.max_length} tokens and cut to it (`mirrorfast export --max-length` sets it, up to the "
             "model's positions)")
    return 0


# ---------------------------------------------------------------------------------------------- serve
def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve an export directory over HTTP (OpenAI-compatible embeddings)")
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="an export directory (from `mirrorfast export`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on; 0 picks a free one (default: 8080)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on the embedding routes (default: $MIRRORFAST_API_KEY)")
    p.add_argument("--max-batch-tokens", type=int, default=16384,
                   help="padded tokens (inputs x longest input) per model call (default: 16384)")
    p.add_argument("--max-inputs", type=int, default=256, help="inputs per request (default: 256)")
    p.add_argument("--max-input-tokens", type=int, default=None,
                   help="tokens per input incl. special tokens (default: the model's max length)")
    p.add_argument("--truncate", action="store_true",
                   help="cut inputs longer than --max-input-tokens instead of refusing them (400 on "
                        "/v1/embeddings, 422 on /embed)")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                   help="ONNX Runtime execution provider (default: auto)")
    p.add_argument("--int8", action="store_true", help="serve the export's int8-quantized model")
    p.add_argument("--max-queue", type=int, default=4096,
                   help="inputs waiting for the model before requests get 503 + Retry-After; at least --max-inputs "
                        "(default: 4096)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="how long a batch's oldest text may wait for more requests; 0 takes what is queued when "
                   "the model is free (default: 0)")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="request body limit (default: derived from --max-inputs x --max-input-tokens)")
    p.add_argument("--graceful-timeout", type=float, default=60.0,
                   help="seconds requests in flight may take after SIGINT/SIGTERM (default: 60)")
    p.add_argument("--read-timeout", type=float, default=15.0,
                   help="seconds a request body may stall between pieces before a 408 (default: 15)")
    p.set_defaults(handler=_cmd_serve)


def _cmd_serve(args) -> int:
    import os

    from mirrorfast.export.server import ServeConfig, run

    config = ServeConfig(
        host=args.host, port=args.port,
        api_key=args.api_key if args.api_key is not None else os.environ.get("MIRRORFAST_API_KEY"),
        max_batch_tokens=args.max_batch_tokens, max_inputs=args.max_inputs,
        max_input_tokens=args.max_input_tokens, truncate=args.truncate, max_queue=args.max_queue,
        batch_wait_ms=args.batch_wait_ms, max_body_bytes=args.max_body_bytes,
        graceful_timeout_s=args.graceful_timeout, read_timeout_s=args.read_timeout,
    )
    return run(args.export_dir, config, provider=args.provider, int8=args.int8)


# ------------------------------------------------------------------------------------------------ env
def _add_env(sub) -> None:
    p = sub.add_parser("env", help="versions, GPU, optional pieces, and what train would use on this machine")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(handler=_cmd_env)


def _cmd_env(args) -> int:
    import json

    from mirrorfast.envinfo import render, report

    info = report()
    print(json.dumps(info) if args.json else render(info))
    return 0


# ----------------------------------------------------------------------------------------------- main
class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, as every other failure (the usage is --help's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mirrorfast",
        description="Fast Mirror-BERT: turn a masked language model into a sentence or word encoder without labels "
        "(train), score it (eval), export it to ONNX (export), embed files (encode) and serve it (serve).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"mirrorfast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_eval, _add_export, _add_encode, _add_serve, _add_env):
        add(sub)
    parser.commands = sub.choices  # name -> the command's parser
    for command in sub.choices.values():  # `mirrorfast train ... --debug` too (SUPPRESS: unset, it keeps main's)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks on errors")
    return parser


def _sigterm_unwinds(command: str):
    """SIGTERM raises Terminated for the command's duration (`errors.sigterm_unwinds`): only from the main
    thread, only where nobody installed a handler (a program that embeds main() keeps its own), and not for
    `serve`, which finishes the requests in flight on SIGTERM itself."""
    install = (command != "serve" and threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    return sigterm_unwinds() if install else contextlib.nullcontext()


def main(argv: list[str] | None = None) -> int:
    as_command = argv is None  # the `mirrorfast` command itself, not a program calling main([...])
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser: its --help is the one to read
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    forget_completed_outputs()
    try:
        with _sigterm_unwinds(args.command):
            return int(args.handler(args) or 0)
    except MirrorfastError as exc:
        if args.debug:
            traceback.print_exc()  # and the same exit code: a script's check does not change with --debug
        print(f"mirrorfast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mirrorfast {args.command}: interrupted; {_what_was_written()}", file=sys.stderr)
        if as_command and threading.current_thread() is threading.main_thread():
            # The interpreter still joins worker threads on its way out: a second Ctrl-C there printed a
            # traceback ("Exception ignored in: <module 'threading'>"); everything is cleaned up, so it exits.
            signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
        return 130
    except Terminated:
        print(f"mirrorfast {args.command}: terminated (SIGTERM); {_what_was_written()}", file=sys.stderr)
        return 128 + signal.SIGTERM


def _what_was_written() -> str:
    """After Ctrl-C / SIGTERM: the outputs already complete when it came (moved into place; the signal came
    while the previous output was being removed, or later), and that nothing else was left half-written."""
    done = completed_outputs()
    if not done:
        return "no partial output was left"
    return (f"{', '.join(map(str, done))} {'was' if len(done) == 1 else 'were'} already saved complete; "
            "no partial output was left")


if __name__ == "__main__":
    sys.exit(main())

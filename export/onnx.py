"""Export an encoder to ONNX: pooling + normalization inside the graph, optional fp16 / int8, parity.

One export directory holds:
  model.onnx        fp32; inputs input_ids, attention_mask (+ token_type_ids where the model takes them),
                    int64 with named dynamic axes ("batch", "sequence"); outputs sentence_embedding
                    (the model's pooling, L2-normalized unless normalize=False) and token_embeddings
                    (the last hidden state)
  model_fp16.onnx   (fp16=True) transformer-fused graph for the GPU, fp16 inside, fp32 inputs/outputs
  model_int8.onnx   (int8=True) dynamic int8 quantization for the CPU, as much of the graph as keeps parity
  tokenizer files, and export.json (settings, file list, parity results per file)

Every file is checked against the PyTorch model in eval mode before the directory is renamed into
place (`mirrorfast.output.atomic_directory`): a failed check leaves nothing behind.

The exporter is the TorchScript one (`torch.onnx.export(..., dynamo=False)`), traced with a right-padded
batch of 2 so the padding path of the attention mask is in the graph and no dynamic dim is frozen.
The copy that is traced uses eager attention: its MatMul/Softmax pattern is the one the onnxruntime
transformer optimizer fuses into its Attention op (the SDPA pattern is left unfused).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import inspect
import json
import logging
import numbers
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from mirrorfast import __version__
from mirrorfast.errors import MirrorfastError, check_flag, check_path, first_line
from mirrorfast.evaluate import cosine_rows
from mirrorfast.last_layer import last_bert_layer
from mirrorfast.model import Encoder, check_max_length, load_encoder, pool, position_limit, save_tokenizer
from mirrorfast.st_format import sentence_transformers_note
from mirrorfast.export.first_token import SCOPE as FIRST_TOKEN_SCOPE
from mirrorfast.export.first_token import FirstTokenLayer, StandaloneFirstTokenLayer
from mirrorfast.export.runtime import EXPORT_FORMAT, EXPORT_JSON, open_session, pad_right
from mirrorfast.output import atomic_directory, check_destination, recorded_files

EXPORT_FORMAT_VERSION = 1
FP32_FILE = "model.onnx"
FP16_FILE = "model_fp16.onnx"
INT8_FILE = "model_int8.onnx"
OUTPUT_NAMES = ("sentence_embedding", "token_embeddings")
MIN_OPSET = 14  # the onnxruntime transformer optimizer and per-channel int8 quantization need >= 13/14
MAX_OPSET = 20  # the TorchScript exporter's maximum
DEFAULT_OPSET = 17  # LayerNormalization as one op
PARITY_THRESHOLDS = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}
# Activation ops whose outputs feed the FFN down-projection: heavy-tailed inputs that per-tensor dynamic
# uint8 activation quantization handles worst. With per-tensor weights as well, MiniLM's worst row fell to
# cosine 0.966 (2026-11-26); with per-channel weights it passes all in int8 (0.9933), the quickstart's word
# encoder does not (0.9759): `_write_int8` keeps these in fp32 only when parity needs it.
_ACTIVATION_OPS = {"Erf", "Gelu", "FastGelu", "BiasGelu", "Tanh"}


# ------------------------------------------------------------------------------------------- wrapper
class SentenceEmbeddingGraph(nn.Module):
    """What goes into the graph: HF model -> (pooled [+ L2 normalized] sentence embedding, token states).

    first_token: a branch class of export/first_token.py (FirstTokenLayer or StandaloneFirstTokenLayer). With
    cls pooling and a BERT-shaped last layer, the sentence embedding comes from that layer run for position 0
    only, token states from the full layer; otherwise (and for the parity reference: None) both come from
    the model's last hidden state.
    """

    def __init__(self, model: nn.Module, pooling: str, normalize: bool, takes_token_type_ids: bool,
                 first_token: type[nn.Module] | None = None):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.normalize = normalize
        self.takes_token_type_ids = takes_token_type_ids
        layer = last_bert_layer(model) if first_token is not None and pooling == "cls" else None
        # The attribute's name is the branch's node scope in the graph (first_token.SCOPE).
        self.first_token = first_token(layer) if layer is not None else None

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.takes_token_type_ids and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.first_token is None:
            hidden = self.model(**kwargs).last_hidden_state
            pooled = pool(hidden, attention_mask, self.pooling)
        else:
            states = self.model(**kwargs, output_hidden_states=True)
            hidden = states.last_hidden_state
            pooled = self.first_token(states.hidden_states[-2], attention_mask)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2.0, dim=-1)
        return pooled, hidden


def _takes_token_type_ids(model: nn.Module, tokenizer) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "token_type_ids" in params and "token_type_ids" in getattr(tokenizer, "model_input_names", ())


def _export_copy(encoder: Encoder) -> nn.Module:
    """A float32 CPU copy of the HF model in eval mode with eager attention; the caller's model is untouched."""
    model = copy.deepcopy(encoder.model).float().cpu()
    with contextlib.suppress(Exception):  # models without a switchable attention keep theirs
        model.set_attn_implementation("eager")
    return model.eval()


# -------------------------------------------------------------------------------------------- result
@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, str]  # precision ("fp32", "fp16", "int8") -> file name in out_dir
    manifest: dict = field(repr=False)

    @property
    def parity(self) -> dict:
        return self.manifest["parity"]


# ------------------------------------------------------------------------------------------ checking
def _check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise MirrorfastError(f"unsupported ONNX opset {opset!r}: supported opsets are {MIN_OPSET} to {MAX_OPSET}")
    return int(opset)


def is_export_output(path: Path) -> bool:
    """A directory written by a previous export (the only kind `export` replaces without --overwrite)."""
    return (Path(path) / EXPORT_JSON).is_file()


def _resolve_max_length(encoder: Encoder, requested: int | None) -> int:
    """--max-length, checked against the model's positions; by default the model's, capped at them."""
    limit = position_limit(encoder.model.config)
    if requested is not None:
        return check_max_length(requested, limit)
    return min(int(encoder.max_length), limit) if limit is not None else int(encoder.max_length)


# ----------------------------------------------------------------------------------- export (fp32)
def _example_inputs(tokenizer, takes_tt: bool) -> dict[str, torch.Tensor]:
    """A right-padded batch of 2 of different, non-trivial lengths: padding path traced, no dim frozen."""
    batch = tokenizer(
        ["The exported graph must handle any batch size and any sequence length, padded on the right.",
         "A shorter second sentence."],
        padding=True, return_tensors="pt",
    )
    feeds = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if takes_tt:
        feeds["token_type_ids"] = batch.get("token_type_ids", torch.zeros_like(batch["input_ids"]))
    return {k: v.to(torch.int64) for k, v in feeds.items()}


def _torch_export(graph: SentenceEmbeddingGraph, example: dict, path: Path, opset: int) -> list[str]:
    """Trace `graph` to `path`; -> the inputs the written graph takes (the tracer drops one the model ignores:
    DeBERTa's token_type_ids when type_vocab_size is 0)."""
    input_names = list(example)
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    dynamic_axes[OUTPUT_NAMES[0]] = {0: "batch"}
    dynamic_axes[OUTPUT_NAMES[1]] = {0: "batch", 1: "sequence"}
    graph.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation + tracer warnings on constant checks
        try:
            torch.onnx.export(
                graph,
                tuple(example[name] for name in input_names),
                str(path),
                dynamo=False,
                input_names=input_names,
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                training=torch.onnx.TrainingMode.EVAL,
            )
        except Exception as exc:  # the exporter raises many types; the user needs one line
            raise MirrorfastError(f"ONNX export failed: {type(exc).__name__}: {first_line(exc)}") from exc
    graph.eval()  # the exporter restores the training flag it found; make sure it is eval
    return _tidy_graph(path, int(graph.model.config.hidden_size))


def _tidy_graph(path: Path, hidden: int) -> list[str]:
    """Name the dynamic output dims and pin the hidden dim (the tracer can leave generated names there);
    give weights used twice (the first-token branch shares the last layer's) to their MatMuls directly.
    -> the graph's input names, in order (initializers, which older opsets list as inputs, left out)."""
    import onnx

    model = onnx.load(str(path))
    wanted = {OUTPUT_NAMES[0]: ["batch", hidden], OUTPUT_NAMES[1]: ["batch", "sequence", hidden]}
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        for dim, value in zip(dims, wanted[output.name]):
            if isinstance(value, str):
                dim.dim_param = value
            else:
                dim.dim_value = value
    _bypass_weight_identities(model.graph)
    onnx.save(model, str(path))
    weights = {w.name for w in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in weights]


def _bypass_weight_identities(graph) -> None:
    """Drop the Identity nodes the exporter puts between a shared weight and its second user: int8
    quantization takes only MatMuls whose weight is an initializer itself (others stay fp32)."""
    initializers = {init.name for init in graph.initializer}
    outputs = {output.name for output in graph.output}
    renamed = {node.output[0]: node.input[0] for node in graph.node
               if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs}
    if not renamed:
        return
    kept = [node for node in graph.node if not (node.op_type == "Identity" and node.output[0] in renamed)]
    for node in kept:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(kept)


# ------------------------------------------------------------------------------------ fp16 and int8
@contextlib.contextmanager
def _quiet_logging():
    """onnxruntime's tools log advice through the root logger; keep the command's output to its summary."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _write_fp16(fp32_path: Path, out_path: Path, num_heads: int, hidden_size: int) -> dict:
    """Transformer-fused (Attention, SkipLayerNorm, BiasGelu, EmbedLayerNorm), fp16 inside, fp32 I/O."""
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        with _quiet_logging():
            optimized = optimize_model(
                str(fp32_path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                opt_level=0, use_gpu=True,  # python fusions only: the graph stays loadable by every EP
            )
            fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
            optimized.convert_float_to_float16(keep_io_types=True)
            optimized.save_model_to_file(str(out_path))
    except Exception as exc:
        raise MirrorfastError(f"fp16 optimization failed: {type(exc).__name__}: {first_line(exc)}") from exc
    return {"optimizer": "onnxruntime.transformers.optimizer (model_type=bert, use_gpu=True, opt_level=0)",
            "fused_operators": fused, "keep_io_types": True}


def _fed_by_activation(tensor: str, producers: dict, depth: int) -> bool:
    """Whether `tensor` comes from an activation op within `depth` producers, not crossing a MatMul."""
    node = producers.get(tensor)
    if node is None or depth == 0 or node.op_type in ("MatMul", "Gemm"):
        return False
    if node.op_type in _ACTIVATION_OPS:
        return True
    return any(_fed_by_activation(name, producers, depth - 1) for name in node.input)


def _post_activation_matmuls(model) -> list[str]:
    """MatMul nodes with a weight whose activation input comes (within a few ops) from a GELU/tanh."""
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {init.name for init in model.graph.initializer}
    return [
        node.name for node in model.graph.node
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in initializers
        and _fed_by_activation(node.input[0], producers, depth=5)
    ]


def _layer_matmuls(model) -> list[list[str]]:
    """Weight MatMuls grouped by encoder layer (exporter names `/.../layer.<i>/...`), in layer order; the
    first-token branch (`/first_token/...`) is a copy of the last layer and goes with it."""
    initializers = {init.name for init in model.graph.initializer}
    layers: dict[int, list[str]] = {}
    branch = []
    for node in model.graph.node:
        if not (node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in initializers):
            continue
        found = re.search(r"/layer\.(\d+)/", node.name)
        if node.name.startswith(f"/{FIRST_TOKEN_SCOPE}/"):
            branch.append(node.name)
        elif found:
            layers.setdefault(int(found.group(1)), []).append(node.name)
    if branch and layers:
        layers[max(layers)] += branch
    return [layers[i] for i in sorted(layers)]


def _fallback_order(n_layers: int) -> list[int]:
    """Layers to keep in fp32, one more per try, from the ends inwards (last, first, second to last, ...):
    the last layer's output is what is pooled, the first sees raw embeddings; at most half the layers."""
    ends = [i for pair in zip(range(n_layers - 1, -1, -1), range(n_layers)) for i in pair]
    return list(dict.fromkeys(ends))[: n_layers // 2]


def fp32_parts(ffn_down_fp32: bool, fp32_layers: list[int]) -> str:
    """What an int8 try keeps in fp32, in words (log lines, the failure, the CLI's summary)."""
    if not ffn_down_fp32:
        return "nothing (every weight MatMul in int8)"
    return "the FFN down-projections" + (f" and encoder layers {fp32_layers}" if fp32_layers else "")


def _low_space_hint(folders: list[Path], needed: int) -> str:
    """onnxruntime's quantizer reports a write cut short by a full disk as a protobuf DecodeError: name the
    folder (the output's, or the temporary one it writes intermediates to) with less room than the model."""
    for folder in folders:
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            continue
        if free < needed:
            return (f" ({folder} has {free / 2**20:.0f} MiB free, less than the fp32 model's {needed / 2**20:.0f} "
                    "MiB: a full disk?)")
    return ""


def _write_int8(fp32_path: Path, out_path: Path, measure: Callable[[Path], dict],
                log: Callable[[str], None] = lambda message: None) -> tuple[dict, dict]:
    """Dynamic int8 (QInt8 weights, per channel) of the plain fp32 graph, as much of it as keeps parity.

    The plain graph is quantized (onnxruntime fuses it at session load). Tries, fastest first, until
    `measure` (-> measure_parity's result) says every row is at the threshold: every weight MatMul in
    int8; then the FFN down-projections (fed by the GELU, the widest activation range) in fp32; then, in
    addition, whole encoder layers in fp32, one more per try (`_fallback_order`). If none passes, the last
    try's failure is raised. -> (int8 details for export.json, the passing parity result).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32_path), load_external_data=False)
    ffn_down = _post_activation_matmuls(model)
    layers = _layer_matmuls(model)
    order = _fallback_order(len(layers))
    plans = [(False, [])] + [(True, sorted(order[:n])) for n in range(len(order) + 1)]
    tries, parity = [], None  # parity: the last try's result
    for ffn_down_fp32, kept_layers in plans:
        kept = (ffn_down if ffn_down_fp32 else []) + [
            name for i in kept_layers for name in layers[i] if name not in ffn_down]
        log(f"{out_path.name}: fp32: {fp32_parts(ffn_down_fp32, kept_layers)}" + (
            f" (retry: the previous try's min cosine {parity['min_cosine']:.6f} < {parity['threshold']})"
            if tries else ""))
        try:
            with _quiet_logging():
                quantize_dynamic(
                    str(fp32_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True,
                    nodes_to_exclude=kept, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                )
        except Exception as exc:
            hint = _low_space_hint([out_path.parent, Path(tempfile.gettempdir())], fp32_path.stat().st_size)
            raise MirrorfastError(f"int8 quantization failed: {type(exc).__name__}: {first_line(exc)}{hint}") from exc
        parity = measure(out_path)
        tries.append({"ffn_down_fp32": ffn_down_fp32, "fp32_layers": kept_layers, "min_cosine": parity["min_cosine"],
                      "worst": parity["worst"]})
        if parity["min_cosine"] >= parity["threshold"]:
            details = {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8",
                       "per_channel": True, "kept_fp32": kept, "ffn_down_fp32": ffn_down_fp32,
                       "fp32_layers": kept_layers, "tries": tries}
            return details, parity
    first = tries[0]
    raise MirrorfastError(f"{parity_failure(out_path, parity)}, with {fp32_parts(True, kept_layers)} kept in fp32 "
                          f"(all in int8: min cosine {first['min_cosine']:.6f}, {first['worst']})")


# ------------------------------------------------------------------------------------------- parity
_PARITY_TEXTS = [
    "A man is playing a guitar.",
    "Ünïcödé – naïve café, Straße, 日本語のテキスト, Привет мир, مرحبا بالعالم 🙂",
    "",
    "x",
    "Two dogs run through a snowy field while their owner watches from the porch.",
    "What time is it?",
    "The stock market fell sharply on Monday after the central bank raised interest rates again.",
    "¿Dónde está la biblioteca? Ça va très bien, merci.",
    "A woman slices an onion.",
]
_LONG_TEXT = (
    "The quick brown fox jumps over the lazy dog near the riverbank, where children play and "
    "Ünïcödé signs say 欢迎 and добро пожаловать. "
)


@dataclass
class ParityCase:
    name: str
    feeds: dict[str, np.ndarray]


def parity_cases(tokenizer, max_length: int, input_names: list[str]) -> list[ParityCase]:
    """Batch 1 and several, right-padded, lengths from 1 to max_length, non-ASCII text."""
    long_text = _LONG_TEXT * (max_length // 8 + 2)
    texts = _PARITY_TEXTS + [long_text]
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    pad_id = tokenizer.pad_token_id
    body = tokenizer(long_text, add_special_tokens=False, verbose=False)["input_ids"]  # longer than max_length on purpose
    first, last = encoded[0][0], encoded[0][-1]  # [CLS] / [SEP] (or <s> / </s>)

    def rows_of(lengths) -> list[list[int]]:
        wanted = sorted(n for n in set(lengths) if 1 <= n <= max_length)
        return [[first] if n == 1 else [first, *body[: n - 2], last] for n in wanted]

    short = rows_of([1, 2, 3, 5, 8, 13, 21, 34, 64])
    long = rows_of([max_length // 2, max_length - 1, max_length])

    def case(name: str, rows: list[list[int]]) -> ParityCase:
        ids, mask = pad_right(rows, pad_id)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        return ParityCase(name, feeds)

    cases = [case(f"single-{i}", [encoded[i]]) for i in (0, 1, 2, len(texts) - 1)]
    cases.append(case(f"batch-{len(encoded) - 1}-texts", encoded[:-1]))
    cases.append(case(f"batch-lengths-{len(short[0])}-to-{len(short[-1])}", short))
    cases.append(case(f"batch-lengths-{len(long[0])}-to-{len(long[-1])}", long))
    cases.append(case("batch-3-equal-length", [encoded[0]] * 3))
    return cases


def _reference(graph: SentenceEmbeddingGraph, cases: list[ParityCase]) -> list[np.ndarray]:
    out = []
    with torch.inference_mode():
        for c in cases:
            pooled, _ = graph(**{k: torch.from_numpy(v) for k, v in c.feeds.items()})
            out.append(pooled.float().numpy())
    return out


def _parity_session(path: Path, prefer_cuda: bool):
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if prefer_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    session = open_session(path, providers, outputs=(OUTPUT_NAMES[0],))  # as OnnxEncoder runs it
    return session, session.get_providers()[0]


def measure_parity(path: Path, reference: list[np.ndarray], cases: list[ParityCase], threshold: float,
                   prefer_cuda: bool = False) -> dict:
    """Run one file on every case; -> {"min_cosine", "worst", "max_abs_diff", ...} (nothing raised)."""
    session, provider = _parity_session(path, prefer_cuda)
    names = {i.name for i in session.get_inputs()}
    worst = (2.0, "", -1)
    max_abs = 0.0
    rows = 0
    for c, ref in zip(cases, reference):
        got = session.run([OUTPUT_NAMES[0]], {k: v for k, v in c.feeds.items() if k in names})[0]
        if got.shape != ref.shape:
            raise MirrorfastError(
                f"parity check failed for {path.name}: output shape {got.shape}, expected {ref.shape}"
            )
        cos = cosine_rows(got, ref)
        if not np.all(np.isfinite(got)):
            cos = np.where(np.isfinite(got).all(1), cos, -1.0)
        i = int(np.argmin(cos))
        if cos[i] < worst[0]:
            worst = (float(cos[i]), c.name, i)
        max_abs = max(max_abs, float(np.nanmax(np.abs(got.astype(np.float64) - ref))))
        rows += len(ref)
    return {
        "provider": provider,
        "min_cosine": round(worst[0], 7),
        "worst": f"case {worst[1]}, row {worst[2]}",
        "max_abs_diff": float(f"{max_abs:.3e}"),
        "threshold": threshold,
        "rows": rows,
        "cases": [f"{c.name} {tuple(c.feeds['input_ids'].shape)}" for c in cases],
    }


def parity_failure(path: Path, result: dict) -> MirrorfastError:
    short = result["threshold"] - result["min_cosine"]
    return MirrorfastError(f"parity check failed for {path.name}: min cosine {result['min_cosine']:.6f} < "
                           f"{result['threshold']} ({result['worst']}; {short:.2e} short)")


def check_parity(path: Path, reference: list[np.ndarray], cases: list[ParityCase], threshold: float,
                 prefer_cuda: bool = False) -> dict:
    """measure_parity, raising when a row is below the threshold."""
    result = measure_parity(path, reference, cases, threshold, prefer_cuda)
    if result["min_cosine"] < threshold:
        raise parity_failure(path, result)
    return result


# --------------------------------------------------------------------------------------------- main
def export_model(
    model: str | os.PathLike | Encoder,
    out_dir: str | os.PathLike,
    *,
    fp16: bool = False,
    fp16_first_token: bool = False,
    int8: bool = False,
    opset: int | None = None,
    normalize: bool = True,
    max_length: int | None = None,
    pooling: str | None = None,
    overwrite: bool = False,
    parity_thresholds: dict[str, float] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> ExportResult:
    """Export a model directory (or a loaded Encoder, left exactly as it was) to an export directory.

    Writes model.onnx (+ model_fp16.onnx / model_int8.onnx), the tokenizer and export.json into a
    temporary sibling of out_dir, checks every file against PyTorch, then renames it into place.
    Raises MirrorfastError on any failure, leaving out_dir as it was.

    fp16_first_token: give model_fp16.onnx the first-token branch too (export/first_token.py's
    StandaloneFirstTokenLayer). Off by default until it is timed on a GPU against the file without it
    (benchmarks/onnx_gpu_table.py has both).
    """
    if not isinstance(model, Encoder):
        check_path("model", model)
    check_path("out_dir", out_dir)
    for name, flag in (("fp16", fp16), ("fp16_first_token", fp16_first_token), ("int8", int8),
                       ("normalize", normalize), ("overwrite", overwrite)):
        check_flag(name, flag)
    opset = _check_opset(DEFAULT_OPSET if opset is None else opset)
    out_dir = Path(out_dir)
    check_destination(out_dir, is_export_output, overwrite, "export (no export.json in it)",
                      inputs=[getattr(model.model, "name_or_path", None) if isinstance(model, Encoder) else model],
                      recorded=lambda previous: recorded_files(previous / EXPORT_JSON))
    thresholds = {**PARITY_THRESHOLDS, **(parity_thresholds or {})}
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise MirrorfastError(
            f"export needs onnx and onnxruntime ({exc.name} is missing): pip install 'mirrorfast[cpu]'"
        ) from None

    if isinstance(model, Encoder):
        if pooling is not None:
            raise MirrorfastError("pooling is for a model directory; a loaded Encoder keeps its own (load_encoder's "
                                  "pooling=)")
        encoder, source = model, model.source
    else:
        path = Path(model)
        if path.exists() and not path.is_dir():
            raise MirrorfastError(f"{path} is a file, not a model directory")
        encoder = load_encoder(model, pooling=pooling)  # a directory, or a hub id as `train --model` takes it
        loaded = Path(encoder.model.name_or_path)  # that directory, the packaged copy's, or a cached hub id
        source = str(loaded.resolve()) if loaded.is_dir() else str(model)
    max_length = _resolve_max_length(encoder, max_length)
    if not isinstance(model, Encoder) and (
            note := sentence_transformers_note(encoder.model.name_or_path, encoder.pooling, max_length)):
        log(note)
    hf_model = _export_copy(encoder)
    takes_tt = _takes_token_type_ids(hf_model, encoder.tokenizer)
    graph = SentenceEmbeddingGraph(hf_model, encoder.pooling, normalize, takes_tt, FirstTokenLayer).eval()
    plain = SentenceEmbeddingGraph(hf_model, encoder.pooling, normalize, takes_tt).eval()  # parity reference
    example = _example_inputs(encoder.tokenizer, takes_tt)
    config = hf_model.config

    with atomic_directory(out_dir) as tmp:
        files = {"fp32": FP32_FILE}
        log(f"{FP32_FILE}: tracing the model (opset {opset})")
        input_names = _torch_export(graph, example, tmp / FP32_FILE, opset)  # export.json lists what it takes
        details: dict[str, dict] = {}
        if fp16:
            heads = int(getattr(config, "num_attention_heads", 0) or 0)  # 0: the optimizer detects it
            fp16_source = tmp / FP32_FILE
            if graph.first_token is not None:
                # The optimizer's attention fusion takes the last layer's key/value products away from the
                # first-token branch that shares them (a broken graph): it gets the graph without the branch,
                # or with the branch's standalone form (export/first_token.py).
                fp16_source = tmp / ".fp16-source.onnx"
                fp16_graph = plain
                if fp16_first_token:
                    fp16_graph = SentenceEmbeddingGraph(hf_model, encoder.pooling, normalize, takes_tt,
                                                        StandaloneFirstTokenLayer).eval()
                with_branch = "with" if fp16_first_token else "without"
                log(f"{FP16_FILE}: tracing the model {with_branch} the first-token branch")
                _torch_export(fp16_graph, example, fp16_source, opset)
            log(f"{FP16_FILE}: transformer fusions, fp16")
            details["fp16"] = _write_fp16(fp16_source, tmp / FP16_FILE, heads, int(config.hidden_size))
            if fp16_source.name != FP32_FILE:
                fp16_source.unlink()
            files["fp16"] = FP16_FILE

        log(f"parity: checking {', '.join(files.values())} against the PyTorch model")
        cases = parity_cases(encoder.tokenizer, max_length, input_names)
        reference = _reference(plain, cases)
        parity = {
            name: check_parity(tmp / name, reference, cases, thresholds[precision], prefer_cuda=precision == "fp16")
            for precision, name in files.items()
        }
        if int8:
            details["int8"], parity[INT8_FILE] = _write_int8(
                tmp / FP32_FILE, tmp / INT8_FILE, lambda path: measure_parity(path, reference, cases, thresholds["int8"]),
                log)
            files["int8"] = INT8_FILE
        if fp16 and parity[FP16_FILE]["provider"] != "CUDAExecutionProvider":
            details["fp16"]["parity_note"] = (
                "checked on the CPU execution provider (no CUDA EP here); the CUDA kernels of the fused "
                "ops differ, so re-check on the GPU (OnnxEncoder(dir, provider='cuda'))"
            )

        save_tokenizer(encoder.tokenizer, tmp, max_length)
        manifest = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_FORMAT_VERSION,
            "source_model": source,
            "model_type": config.model_type,
            "pooling": encoder.pooling,
            "normalized": bool(normalize),
            "max_length": max_length,
            "opset": opset,
            "dim": int(config.hidden_size),
            "inputs": input_names,
            "input_dtype": "int64",
            "outputs": list(OUTPUT_NAMES),
            # Files whose sentence_embedding comes from the last layer run for the first token alone
            # (export/first_token.py); the others pool the full last layer.
            "first_token_last_layer": sorted(name for precision, name in files.items()
                                             if precision != "fp16" or fp16_first_token)
                                      if graph.first_token is not None else [],
            "dynamic_axes": {"batch": "dim 0 of every input and output",
                             "sequence": "dim 1 of every input and of token_embeddings"},
            "models": files,
            "files": sorted({p.name for p in tmp.iterdir()} | {EXPORT_JSON}),
            "parity": parity,
            "parity_reference": "PyTorch model in eval mode (float32, CPU)",
            **details,
            "exporter": f"torch.onnx.export TorchScript (dynamo=False), torch {torch.__version__}",
            "mirrorfast_version": __version__,
            "onnx_version": onnx.__version__,
            "onnxruntime_version": onnxruntime.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / EXPORT_JSON).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return ExportResult(out_dir, files, manifest)

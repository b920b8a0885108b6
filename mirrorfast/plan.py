"""How a training run computes on this machine, decided once before its first step: the precision (and
what the CPU's bf16 support means for it), padded or packed attention and the packed kernel, CUDA graphs,
the loss's backend, the last layer for [CLS] alone, and the MIRRORFAST_* switches a run reads."""

import platform
from dataclasses import dataclass
from typing import Callable

import torch

from mirrorfast.config import TrainConfig, env_switch
from mirrorfast.data import PACK_BUCKET, PAD_SEGMENT_MAX, TILE_PAD_SEGMENT_MAX, pad_segments
from mirrorfast.errors import MirrorfastError
from mirrorfast.fused_norm import FUSED_LAYERNORM_ENV, fused_layernorm_requested
from mirrorfast.kernels import resolve_backend
from mirrorfast.kernels.functional import reference_forced
from mirrorfast.last_layer import FIRST_TOKEN_ENV, last_bert_layer
from mirrorfast.model import Encoder
from mirrorfast.packing import cuda_kernel as packed_cuda_kernel
from mirrorfast.packing import attention_heads, flash_supported, packed_kernel, supports_packing
from mirrorfast.warmup import WARMUP_ENV

PRECISION_NAMES = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}  # autocast dtype -> name


def _cpu_flags(cpuinfo: str) -> list[str] | None:
    """The CPU's feature flags from Linux's /proc/cpuinfo; None where it cannot be read."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            return next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return None


def _has_bf16_dot(flags: list[str]) -> bool:
    return "avx512_bf16" in flags or "amx_bf16" in flags  # AVX-512 BF16 or AMX


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU advertises bf16 dot products (AVX-512 BF16 or AMX), from Linux's /proc/cpuinfo."""
    return _has_bf16_dot(_cpu_flags(cpuinfo) or [])


def cpu_bf16_emulated(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether bf16 matrix products are emulated here: an x86 CPU whose flags (read from /proc/cpuinfo) have
    neither AVX-512 BF16 nor AMX. False where that cannot be told (other architectures, no /proc)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = _cpu_flags(cpuinfo)
    return bool(flags) and not _has_bf16_dot(flags)


# What emulated bf16 cost, measured (benchmarks/RESULTS.md): quoted by autocast_dtype's warning.
CPU_BF16_EMULATED_COST = ("a MiniLM step of 100 views took 41.5 s with --bf16 vs 2.0-2.1 s in fp32 (20x slower) "
                          "on a 2-core AVX2 CPU, 2026-11-27")


def autocast_dtype(precision: str, device: torch.device, log: Callable[[str], None]) -> torch.dtype | None:
    """None means plain fp32. fp16 on the CPU falls back to fp32 (CPU fp16 autocast is slow and lossy)."""
    if device.type == "cpu" and precision != "bf16" and cpu_has_native_bf16():
        hint = ("this CPU has native bf16: --bf16 trained 1.5x to 1.6x faster than fp32, same STS-B score, on a 2-core "
                "AVX-512 BF16 CPU (benchmarks/RESULTS.md)")
    else:
        hint = ""
    if precision == "fp16" and device.type == "cpu":
        log("precision: --fp16 needs a GPU; training in fp32 on the CPU instead" + (f" ({hint})" if hint else ""))
        return None
    if hint:
        log(f"precision: fp32 ({hint})")
    if precision == "bf16" and device.type == "cpu" and cpu_bf16_emulated():
        log(f"precision: warning: this CPU has no bf16 instructions (no AVX-512 BF16 or AMX), so its bf16 matrix "
            f"products are emulated: {CPU_BF16_EMULATED_COST}. Leave out --bf16 to train in fp32.")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise MirrorfastError("--bf16: this GPU does not support bfloat16; use --fp16")
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def use_packing(cfg: TrainConfig, encoder: Encoder, device: torch.device, dtype: torch.dtype | None,
                log: Callable[[str], None] = lambda message: None) -> bool:
    """`auto` packs on CUDA with fp16/bf16, an sm80+ GPU (where FlashAttention runs: the last layer's
    first-token attention may need it) and a supported architecture; `run_packed_kernel` then picks the kernel
    (explicit `packed` also runs elsewhere, through the gathered-SDPA path). DropHead draws one mask per
    sequence, and a packed batch is one sequence of all views: it trains padded."""
    if cfg.attention == "padded":
        return False
    if cfg.attention == "packed":
        if not supports_packing(encoder.model):
            raise MirrorfastError(f"--attention packed does not support model type {encoder.model.config.model_type!r}")
        if device.type == "cuda" and dtype is None:
            raise MirrorfastError("--attention packed on CUDA needs --fp16 or --bf16 (FlashAttention)")
        if cfg.drophead > 0:
            raise MirrorfastError("--drophead needs padded batches (one mask per view): use --attention auto or padded")
        return True
    if not (device.type == "cuda" and dtype is not None and cfg.drophead == 0 and supports_packing(encoder.model)):
        return False
    if not flash_supported(device):
        log("attention: padded batches: FlashAttention needs an Ampere or newer GPU (sm80+); "
            "--attention packed runs unpadded through PyTorch SDPA instead")
        return False
    return True


def run_packed_kernel(cfg: TrainConfig, model_config, device: torch.device, batch_size: int) -> str:
    """The packed-attention kernel of a run (`packing.packed_kernel`), decided once: views never exceed
    max_length (bucketed batches round it up to a multiple of 32, at most 128 while max_length is), and a
    batch has two views a string plus its padding segments."""
    views = 2 * batch_size + pad_segments(PACK_BUCKET, TILE_PAD_SEGMENT_MAX)
    return packed_kernel(device, cfg.max_length, views=views, **attention_heads(model_config))


def use_cuda_graphs(cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None, packed: bool) -> bool:
    """CUDA graphs replay the whole step; on by default wherever they apply (measured faster on an H200,
    benchmarks/RESULTS.md). --cuda-graphs insists (an error where they cannot apply), --no-cuda-graphs
    turns them off."""
    if cfg.cuda_graphs is None:
        return device.type == "cuda" and dtype is not None and packed
    if cfg.cuda_graphs:
        check_graphable(device, dtype, packed)
    return cfg.cuda_graphs


def check_graphable(device: torch.device, dtype: torch.dtype | None, packed: bool) -> None:
    if device.type != "cuda":
        raise MirrorfastError("--cuda-graphs needs a CUDA GPU")
    if dtype is None:
        raise MirrorfastError("--cuda-graphs needs --bf16 or --fp16 (packed attention runs in half precision)")
    if not packed:
        raise MirrorfastError("--cuda-graphs needs packed attention (--attention auto or packed)")


def environment_errors() -> list[str]:
    """What is wrong with the MIRRORFAST_* switches a run reads: each one's message (`mirrorfast env` lists
    them all; a run stops at the first)."""
    checks = (reference_forced, packed_cuda_kernel, lambda: env_switch(FUSED_LAYERNORM_ENV, default=False),
              lambda: env_switch(WARMUP_ENV, default=True), lambda: env_switch(FIRST_TOKEN_ENV, default=True))
    errors = []
    for check in checks:
        try:
            check()
        except MirrorfastError as exc:
            errors.append(str(exc))
    return errors


def check_environment() -> None:
    """Parse every MIRRORFAST_* switch the run reads, before any work: a typo fails now, not after the
    model has loaded (each is read again where it is used)."""
    if errors := environment_errors():
        raise MirrorfastError(errors[0])


@dataclass(frozen=True)
class RunPlan:
    """How a run computes (logged in its recipe line, and recorded in mirrorfast.json as `paths`)."""

    dtype: torch.dtype | None  # autocast's (or --half-model's) dtype; None: fp32
    kernel: str | None  # packed batches' attention kernel ("triton", "flash", "sdpa"); None: padded batches
    graphs: bool  # the step replayed from CUDA graphs
    half_model: bool  # the model in fp16/bf16, fp32 master weights
    fused_norm: bool  # MIRRORFAST_FUSED_LAYERNORM=1
    loss_backend: str  # "triton" or "torch"
    first_token: bool  # the last layer for each view's [CLS] alone

    @property
    def packed(self) -> bool:
        return self.kernel is not None

    @property
    def bucket(self) -> int | None:
        """Packed batches' token count rounded up to a multiple of this under CUDA graphs (few shapes)."""
        return PACK_BUCKET if self.graphs else None

    @property
    def pad_segment_max(self) -> int:
        return TILE_PAD_SEGMENT_MAX if self.kernel in ("sdpa", "triton") else PAD_SEGMENT_MAX

    @property
    def paths(self) -> dict:
        attention = "padded" if self.kernel is None else "packed" if self.kernel == "flash" else f"packed-{self.kernel}"
        return {"precision": PRECISION_NAMES[self.dtype], "attention": attention, "loss": self.loss_backend,
                "cuda_graphs": self.graphs, "half_model": self.half_model, "fused_layernorm": self.fused_norm,
                "last_layer": "first-token" if self.first_token else "full"}


def plan_run(cfg: TrainConfig, encoder: Encoder, device: torch.device, dtype: torch.dtype | None, batch_size: int,
             log: Callable[[str], None]) -> RunPlan:
    packed = use_packing(cfg, encoder, device, dtype, log)
    graphs = use_cuda_graphs(cfg, device, dtype, packed)
    half_model = cfg.half_model and dtype is not None
    fused_norm = fused_layernorm_requested(device)
    if cfg.half_model and not half_model:
        log("half model: off (the CPU trains --fp16 in fp32)")
    loss_backend = resolve_backend("auto", device)
    kernel = run_packed_kernel(cfg, encoder.model.config, device, batch_size) if packed else None
    # cls pooling reads the last layer at the first token alone: the rest of that layer is skipped (DropHead's
    # hooks sit on the attention modules this path does not call; MIRRORFAST_FIRST_TOKEN_LAST_LAYER=0 keeps it).
    first_token = (encoder.pooling == "cls" and cfg.drophead == 0 and last_bert_layer(encoder.model) is not None
                   and env_switch(FIRST_TOKEN_ENV, default=True))
    return RunPlan(dtype=dtype, kernel=kernel, graphs=graphs, half_model=half_model,
                   fused_norm=fused_norm, loss_backend=loss_backend, first_token=first_token)

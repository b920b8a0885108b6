"""Compile a training run's Triton kernels in the background while it sets up.

Triton compiles a kernel the first time it is launched with a new specialization (dtypes, 16-byte alignment,
ints divisible by 16 or equal to 1). A cold run would compile its loss, attention and LayerNorm kernels in
its first step; here each kernel family is launched once on constant scratch inputs laid out as the
training step lays out its own, in threads that run while the main thread moves the model to the device and
tokenizes the corpus. Triton's compiler mostly runs without the GIL (twelve of our kernels: 3.9-5.0 s one
after another, 2.4-2.5 s in two threads; 2-core CPU, Triton 3.6, benchmarks/RESULTS.md); the attention family
compiles its own kernels all at once as well (`compile_in_parallel`). Whatever a scratch launch misses is compiled at
its first use, as without this; a warm-up that fails is logged and training goes on the same way. The
trainer waits for these threads at its first step, inside the timed first epoch.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from mirrorfast.data import bucketed_max_len
from mirrorfast.config import env_switch

WARMUP_ENV = "MIRRORFAST_KERNEL_WARMUP"


def kernel_warm_ups(*, loss_backend: str, attention_kernel: str | None, fused_norm: bool, config, device,
                    dtype: torch.dtype | None, half_model: bool, schedules: list[list[np.ndarray]],
                    max_length: int, dropout: float, bucket: int | None, pad_segment_max: int,
                    ) -> list[tuple[str, Callable, tuple]]:
    """(name, warm_up function, its arguments) for each Triton kernel family the run will launch; none when
    $MIRRORFAST_KERNEL_WARMUP is 0 (debugging: kernels then compile at their first launch).

    dtype: the autocast (or --half-model) dtype, None for fp32; config: the model's (hidden size, heads)."""
    if not env_switch(WARMUP_ENV, default=True):
        return []
    tasks = []
    compute = dtype or torch.float32  # what the views, the attention inputs and the sublayer outputs are in
    if loss_backend == "triton":
        from mirrorfast.kernels import infonce_triton

        sizes = sorted({len(rows) for schedule in schedules for rows in schedule})  # strings per batch
        tasks.append(("loss", infonce_triton.warm_up, (sizes, config.hidden_size, compute, device)))
    if attention_kernel == "triton":
        from mirrorfast.kernels import packed_attention_triton
        from mirrorfast.packing import attention_heads

        shape = attention_heads(config)
        longest = bucketed_max_len(max_length, pad_segment_max) if bucket else max_length
        max_len = min(longest, packed_attention_triton.MAX_VIEW_TOKENS)
        tasks.append(("attention", packed_attention_triton.warm_up,
                      (shape["heads"], shape["head_dim"], compute, device, max_len, dropout)))
    if fused_norm:
        from mirrorfast.kernels import residual_layernorm_triton

        # Under autocast a sublayer's dense output is in the autocast dtype while the residual stream and the
        # LayerNorm parameters stay fp32; a --half-model model has everything in its dtype. Bucketed batches
        # have a multiple of `bucket` tokens; others any number (this warms the multiple-of-16 case).
        residual = compute if half_model or dtype is None else torch.float32
        rows = bucket or 512
        tasks.append(("LayerNorm", residual_layernorm_triton.warm_up,
                      (rows, config.hidden_size, compute, residual, residual, dropout, device)))
    return tasks


class KernelWarmUp:
    """The tasks of `kernel_warm_ups`, started at construction: a coordinating thread first initializes
    Triton's GPU driver (its launcher module is built on a machine's first use: once, not by several threads
    at a time), then runs the tasks in one thread each. The Triton interpreter (TRITON_INTERPRET=1, the
    tests on a CPU) keeps global state: there the tasks run one after another."""

    def __init__(self, tasks: list[tuple[str, Callable, tuple]]):
        coordinator = ThreadPoolExecutor(1, thread_name_prefix="mirrorfast-kernels")
        self._result = coordinator.submit(_run_all, tasks, os.environ.get("TRITON_INTERPRET") == "1")
        coordinator.shutdown(wait=False)  # the thread ends with its work

    def wait(self) -> dict[str, float | BaseException]:
        """Once all tasks are done: the seconds each took, or the error it raised. A failed warm-up does not
        stop training: its kernels compile at their first launch instead, where a real fault surfaces
        with its own traceback (the caller logs the failure)."""
        try:
            return self._result.result()
        except Exception as exc:  # noqa: BLE001 - the coordinator itself failed (driver initialization)
            return {"driver": exc}


def _run_all(tasks: list[tuple[str, Callable, tuple]], interpreting: bool) -> dict[str, float | BaseException]:
    if interpreting:
        return {name: _timed(fn, args) for name, fn, args in tasks}
    from triton.runtime import driver

    driver.active.get_current_target()
    with ThreadPoolExecutor(len(tasks), thread_name_prefix="mirrorfast-kernels") as pool:
        futures = {name: pool.submit(_timed, fn, args) for name, fn, args in tasks}
        return {name: future.result() for name, future in futures.items()}


def _timed(fn: Callable, args: tuple) -> float | BaseException:
    start = time.perf_counter()
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported by wait(), not raised
        return exc
    return time.perf_counter() - start


def describe_warm_ups(results: dict[str, float | BaseException]) -> str:
    """One log line's worth: 'loss 1.21s, attention FAILED (RuntimeError: ...)'."""
    from mirrorfast.errors import first_line

    return ", ".join(f"{name} {value:.2f}s" if isinstance(value, float)
                     else f"{name} FAILED ({type(value).__name__}: {first_line(value)[:160]}; compiled at first use instead)"
                     for name, value in results.items())


def compiled_kernels(*kernels) -> list:
    """The compiled variants Triton's JIT holds for these @triton.jit kernels (none under the interpreter or
    with a Triton that keeps them elsewhere): the tests check with it that a training-shaped launch after a
    warm-up compiles nothing more; benchmarks/info_nce_table.py reads their registers."""
    try:  # JITFunction.device_caches: device -> (kernel_cache, ...), kernel_cache: key -> CompiledKernel
        return [k for kernel in kernels for cache in getattr(kernel, "device_caches", {}).values()
                for k in cache[0].values()]
    except Exception:  # noqa: BLE001 - another Triton's layout
        return []

"""`info_nce`: validates its inputs and dispatches to an implementation (the functional API).

Dispatch (explicit, visible): backend="torch" -> the PyTorch reference; backend="triton" -> the fused
Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); backend="auto" -> Triton for
CUDA tensors on an Ampere or newer GPU (compute capability 8.0+: the kernel is tested compiled on Hopper)
when Triton is importable, the reference otherwise. MIRRORFAST_KERNELS=torch forces the reference
everywhere (debugging).

Also what the three Triton ops (loss, packed attention, residual LayerNorm) share: `triton_runs_on`,
`dropout_seed`, `first_derivative_only` and `compile_in_parallel`.
"""

import functools
import math
import numbers
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from mirrorfast.errors import MirrorfastError
from mirrorfast.kernels.reference import info_nce_reference

__all__ = ["info_nce", "info_nce_reference", "resolve_backend"]

_REDUCTIONS = ("mean", "sum", "none")
_BACKENDS = ("auto", "torch", "triton")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton kernel computes natively
_INPUT_DTYPES = (*_KERNEL_DTYPES, torch.float64)  # float8 has no arithmetic in torch: cast it first
KERNELS_ENV = "MIRRORFAST_KERNELS"
_MIN_CAPABILITY = (8, 0)  # "auto" uses the kernel from Ampere on; backend="triton" may force it elsewhere


def reference_forced() -> bool:
    """Whether $MIRRORFAST_KERNELS=torch forces PyTorch's loss everywhere (unset, empty or "auto": no). Any
    other value is an error, so a typo never silently leaves the kernel on."""
    value = os.environ.get(KERNELS_ENV, "").strip().lower()
    if value not in ("", "auto", "torch"):
        raise MirrorfastError(f"{KERNELS_ENV} must be torch (PyTorch's loss everywhere) or auto, got {value!r}")
    return value == "torch"


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    try:
        import mirrorfast.kernels.infonce_triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runs_on(device: torch.device) -> bool:
    """Whether mirrorfast's Triton kernels can run on `device`'s tensors: CUDA, or the CPU under the Triton
    interpreter (TRITON_INTERPRET=1, slowly: how the tests run them)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def first_derivative_only(refusal: str):
    """Decorates an autograd.Function's backward whose kernels compute gradients with no graph of their
    own. Under create_graph=True (a gradient penalty, a Hessian-vector product) its gradients get a grad_fn
    that raises `refusal`, so a second derivative through them is an error, not silently zero. (torch's
    once_differentiable does so only when the incoming gradient requires grad: not for a scalar loss's.)"""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            single = isinstance(outputs, torch.Tensor)
            outputs = [outputs] if single else list(outputs)
            where = [i for i, g in enumerate(outputs) if isinstance(g, torch.Tensor)]
            # The refusing node also takes the Function's inputs and the incoming gradients that require
            # grad: without a path back to them, autograd.grad(penalty, inputs) would prune it, not run it.
            linked = [t for t in (*ctx.saved_tensors, *grads) if isinstance(t, torch.Tensor) and t.requires_grad]
            refuse = torch._C._functions.DelayedError(refusal.encode(), len(where) + len(linked))
            wrapped = refuse(*[outputs[i].detach().requires_grad_() for i in where], *linked)
            wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
            for i, grad in zip(where, wrapped):
                outputs[i] = grad
            return outputs[0] if single else tuple(outputs)

        return wrapper

    return decorate


def compile_in_parallel(launches: list[tuple]) -> bool:
    """Compile Triton launches, (kernel, grid, arguments, compile-time arguments) each, without running them
    and all at once: `kernel.warmup` (the JIT's specialization of a launch with these arguments) inside
    Triton's AsyncCompileMode, which hands each compilation to a thread pool. Triton's compiler releases the
    GIL for most of its work (twelve of our kernels: 3.9-5.0 s one after another, 2.4-2.5 s in two threads on a
    2-core CPU, benchmarks/RESULTS.md). Returns False, having done nothing, where that mode is missing (Triton
    3.6 and 3.9 have it, 3.2 not: an explicit check, the module is private) or under TRITON_INTERPRET=1 (nothing is
    compiled there): the caller then launches them, which compiles them one after another."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not launches:
        return False
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return False
    with (ThreadPoolExecutor(len(launches), thread_name_prefix="mirrorfast-compile") as pool,
          AsyncCompileMode(pool)):  # leaves (first) once every compilation is done and in the kernels' caches
        for kernel, grid, args, meta in launches:
            kernel.warmup(*args, grid=grid, **meta)
    return True


def dropout_seed(seed: torch.Tensor | None, p: float, device: torch.device, who: str) -> torch.Tensor:
    """The (1,) int64 Philox seed a Triton kernel reads on `device` (no host synchronization): `seed`,
    checked, or else a fresh one from torch's generator (on CUDA also inside a captured graph: each replay
    draws anew; zeros when p == 0, where it is not read)."""
    if seed is None:
        return (torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64) if p > 0
                else torch.zeros(1, device=device, dtype=torch.int64))
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or tuple(seed.shape) != (1,) \
            or seed.device != device:
        got = (f"{seed.dtype} {tuple(seed.shape)} on {seed.device}" if isinstance(seed, torch.Tensor)
               else type(seed).__name__)
        raise ValueError(f"{who}: seed must be a (1,) int64 tensor on {device}, got {got}")
    return seed


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The implementation `info_nce` will use for tensors on `device` of `dtype` (None: any the kernel takes):
    "torch" or "triton". "auto" runs the kernel on CUDA (sm80+) for fp16/bf16/fp32 and the reference for
    fp64 (exact there; the kernel computes in fp32)."""
    if backend not in _BACKENDS:
        raise MirrorfastError(f"info_nce: backend must be one of {_BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if reference_forced():
        return "torch"
    if backend == "auto":
        kernel_dtype = dtype is None or dtype in _KERNEL_DTYPES
        return ("triton" if kernel_dtype and device.type == "cuda" and _triton_available() and _capable(device)
                else "torch")
    if backend == "triton":
        if not _triton_available():
            raise MirrorfastError("info_nce: backend='triton' asked for, but triton is not installed")
        check_triton_runs_on(device, "info_nce: backend='triton'")
    return backend


def check_triton_runs_on(device: torch.device, who: str) -> None:
    """One message where the loss's kernel cannot run on `device`'s tensors (see `triton_runs_on`)."""
    if not triton_runs_on(device):
        raise MirrorfastError(
            f"{who} on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)" if device.type == "cpu" else
            f"{who} runs on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), not on {device.type}")


def _capable(device: torch.device) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= _MIN_CAPABILITY


def validate_inputs(a: torch.Tensor, b: torch.Tensor, temperature: float, reduction: str) -> None:
    """One MirrorfastError for anything `info_nce` (or `info_nce_triton` called directly) cannot take."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise MirrorfastError("info_nce: a and b must be torch tensors")
    if a.dim() != 2 or b.dim() != 2:
        raise MirrorfastError(f"info_nce: a and b must be 2-D (N, D), got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape != b.shape:
        raise MirrorfastError(f"info_nce: a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.layout != torch.strided or b.layout != torch.strided:
        raise MirrorfastError(f"info_nce: a and b must be dense (strided) tensors, got {a.layout} and {b.layout}")
    if a.shape[0] < 1:
        raise MirrorfastError("info_nce: need at least one pair (N >= 1), got N=0")
    if a.shape[1] < 1:
        raise MirrorfastError("info_nce: embedding dimension D must be >= 1, got D=0")
    if a.dtype not in _INPUT_DTYPES or b.dtype not in _INPUT_DTYPES:
        raise MirrorfastError(f"info_nce: inputs must be float16, bfloat16, float32 or float64, got {a.dtype} "
                              f"and {b.dtype}")
    if a.device != b.device:
        raise MirrorfastError(f"info_nce: a and b must be on the same device, got {a.device} and {b.device}")
    if isinstance(temperature, torch.Tensor):
        raise MirrorfastError("info_nce: temperature must be a Python number; a tensor (a learned temperature) is "
                              "not supported: both implementations take it as a constant")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 < temperature < math.inf:
        raise MirrorfastError(f"info_nce: temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in _REDUCTIONS:
        raise MirrorfastError(f"info_nce: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float = 0.04,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """NT-Xent over the 2N views cat(a, b); a[i] and b[i] are a positive pair, all other rows negatives.

    a, b: (N, D) floating tensors. Returns a scalar ("mean" over 2N rows, "sum") or (2N,) ("none"), fp32
    (fp64 for fp64 inputs, which "auto" gives the reference; a forced Triton kernel computes them in fp32).
    """
    validate_inputs(a, b, temperature, reduction)
    if resolve_backend(backend, a.device, torch.promote_types(a.dtype, b.dtype)) == "triton":
        from mirrorfast.kernels.infonce_triton import fused_info_nce

        return fused_info_nce(a, b, float(temperature), reduction)
    return info_nce_reference(a, b, float(temperature), reduction)

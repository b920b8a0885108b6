"""pytest-benchmark: InfoNCE forward+backward, fused Triton kernel vs PyTorch eager vs torch.compile.

    pytest benchmarks/test_bench_info_nce.py --benchmark-only

On a CUDA machine: fp16 inputs, (N=200, D=768) and (N=16384, D=768), the three implementations side by
side (one benchmark group per size), plus at N=16384 the kernel with the fused backward that large problems
took before their default became the backward through stripes (`KernelConfig.stripe_rows`), peak extra GPU
memory in `extra_info`. Without CUDA: the PyTorch
reference on CPU at a small and a medium size; the GPU cases skip with the reason.
`benchmarks/info_nce_table.py` prints the same comparison as one table (plus correctness checks).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # same rule as tests/conftest.py

from info_nce_table import fused_config, peak_extra_mib  # noqa: E402  (benchmarks/ is on sys.path)
from mirrorfast.errors import first_line  # noqa: E402
from mirrorfast.kernels import info_nce, info_nce_reference  # noqa: E402

CUDA = torch.cuda.is_available()
TEMPERATURE = 0.04
GPU_SIZES = [(200, 768), (16384, 768)]
CPU_SIZES = [(64, 128), (512, 384)]
IMPLS = ["triton", "triton-fused", "torch-eager", "torch-compile"]


def _inputs(n, d, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(n * 7 + d)
    a = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    b = (a.detach().float().cpu() + torch.randn(n, d, generator=g)).to(device=device, dtype=dtype).requires_grad_(True)
    return a, b


def _make_step(loss_fn, a, b):
    def step():
        loss = loss_fn(a, b)
        grads = torch.autograd.grad(loss, (a, b))
        if a.is_cuda:
            torch.cuda.synchronize()
        return loss, grads

    return step


def _stripes_by_default(n, d):
    from mirrorfast.kernels.infonce_triton import pick_config

    return bool(pick_config(2 * n, d, torch.float16).stripe_rows)


def _loss_fn(impl, n, d):
    if impl == "triton":
        return lambda a, b: info_nce(a, b, TEMPERATURE, "mean", backend="triton")
    if impl == "triton-fused":
        from mirrorfast.kernels.infonce_triton import info_nce_triton

        config = fused_config(2 * n, d, torch.float16)
        return lambda a, b: info_nce_triton(a, b, TEMPERATURE, "mean", config=config)
    if impl == "torch-eager":
        return lambda a, b: info_nce_reference(a, b, TEMPERATURE, "mean")
    compiled = torch.compile(lambda a, b: info_nce_reference(a, b, TEMPERATURE, "mean"), dynamic=False)
    return compiled


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d", GPU_SIZES, ids=[f"N{n}-D{d}" for n, d in GPU_SIZES])
def test_info_nce_fwd_bwd_gpu(benchmark, n, d, impl):
    if not CUDA:
        pytest.skip("needs a CUDA GPU: the Triton kernel, eager and compiled PyTorch are compared on fp16 CUDA tensors")
    if impl.startswith("triton"):
        pytest.importorskip("triton", reason="triton is not installed")
    if impl == "triton-fused" and not _stripes_by_default(n, d):
        pytest.skip("the default backward is the fused one at this size (stripes are for large problems)")
    a, b = _inputs(n, d, torch.float16, "cuda")
    step = _make_step(_loss_fn(impl, n, d), a, b)
    try:
        step()  # compile / autotune outside the timing
    except Exception as exc:  # noqa: BLE001
        if impl == "torch-compile":
            pytest.skip(f"torch.compile of the reference failed: {type(exc).__name__}: {first_line(exc)[:300]}")
        raise
    benchmark.group = f"info_nce fwd+bwd fp16 N={n} D={d}"
    benchmark.extra_info.update(
        impl=impl, n=n, d=d, dtype="float16", device=torch.cuda.get_device_name(),
        peak_extra_mib=round(peak_extra_mib(step), 2),
    )
    benchmark(step)


@pytest.mark.parametrize("n,d", CPU_SIZES, ids=[f"N{n}-D{d}" for n, d in CPU_SIZES])
def test_info_nce_reference_cpu(benchmark, n, d):
    a, b = _inputs(n, d, torch.float32, "cpu")
    step = _make_step(_loss_fn("torch-eager", n, d), a, b)
    step()
    benchmark.group = "info_nce fwd+bwd fp32 CPU reference"
    benchmark.extra_info.update(impl="torch-eager", n=n, d=d, dtype="float32", device="cpu")
    if n * d > 64 * 128:
        benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
    else:
        benchmark(step)

"""pytest-benchmark: attention over a packed batch of short views, forward + backward, per kernel.

    pytest benchmarks/test_bench_packed_attention.py --benchmark-only

One BERT-base attention layer's worth of a Mirror-BERT batch: 400 views with lengths drawn like the paper's
sentences (about 14 tokens on average, 3 to 50), 12 heads of 64, bf16, attention dropout 0.1; each kernel is
called the way training calls it (`mirrorfast.packing`'s attention function). On a CUDA machine the three
packed paths side by side (one benchmark group): FlashAttention's variable-length kernel (the default), the
views gathered into a padded SDPA batch, and the one-tile Triton kernel; peak extra GPU memory in
`extra_info`. Without CUDA: the gathered-SDPA path (the one the CPU trains with), fp32; the GPU cases skip with
the reason.
"""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # same rule as tests/conftest.py

from info_nce_table import peak_extra_mib  # noqa: E402  (benchmarks/ is on sys.path under pytest)
from mirrorfast.packing import _packed_attention, _padded_index  # noqa: E402

CUDA = torch.cuda.is_available()
VIEWS, HEADS, HEAD_DIM, DROPOUT = 400, 12, 64, 0.1
KERNELS = ["flash", "sdpa", "triton"]


def _batch(device, dtype):
    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(rng.lognormal(np.log(12.5), 0.5, VIEWS)), 3, 50).astype(np.int64)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)
    segments = torch.repeat_interleave(torch.arange(VIEWS), torch.from_numpy(lengths)).to(device)
    total, max_len = int(lengths.sum()), int(lengths.max())
    g = torch.Generator().manual_seed(1)
    # (1, T, heads, d) leaves, handed over as (1, heads, T, d) views: the layout a Hugging Face BERT gives
    qkv = [torch.randn(1, total, HEADS, HEAD_DIM, generator=g).to(device, dtype).requires_grad_(True) for _ in range(3)]
    return qkv, cu, segments, max_len


def _make_step(kernel, qkv, cu, segments, max_len):
    def step():
        padded_index = _padded_index(cu, segments, max_len) if kernel == "sdpa" else None
        out, _ = _packed_attention(None, *(t.transpose(1, 2) for t in qkv), None, dropout=DROPOUT, scaling=HEAD_DIM ** -0.5, cu_seq_lens_q=cu,
                                   max_length_q=max_len, packed_kernel=kernel, padded_index=padded_index)
        grads = torch.autograd.grad(out, qkv, torch.ones_like(out))
        if out.is_cuda:
            torch.cuda.synchronize()
        return grads

    return step


@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_attention_fwd_bwd_gpu(benchmark, kernel):
    if not CUDA:
        pytest.skip("needs a CUDA GPU: FlashAttention varlen, gathered SDPA and the Triton kernel on bf16 CUDA tensors")
    if kernel == "flash" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("FlashAttention needs an Ampere or newer GPU")
    qkv, cu, segments, max_len = _batch("cuda", torch.bfloat16)
    step = _make_step(kernel, qkv, cu, segments, max_len)
    step()  # compile / warm up
    benchmark.group = f"packed attention fwd+bwd, {VIEWS} views x {HEADS} heads x {HEAD_DIM}, bf16, CUDA"
    benchmark.extra_info["peak_extra_mib"] = peak_extra_mib(step)
    benchmark.extra_info["tokens"] = int(cu[-1])
    benchmark(step)


def test_packed_attention_fwd_bwd_cpu(benchmark):
    qkv, cu, segments, max_len = _batch("cpu", torch.float32)
    step = _make_step("sdpa", qkv, cu, segments, max_len)
    benchmark.group = f"packed attention fwd+bwd, {VIEWS} views x {HEADS} heads x {HEAD_DIM}, fp32, CPU"
    benchmark.extra_info["tokens"] = int(cu[-1])
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)

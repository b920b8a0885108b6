"""pytest-benchmark: a BERT sublayer's end, LayerNorm(dropout(h) + residual), forward + backward.

    pytest benchmarks/test_bench_residual_layernorm.py --benchmark-only

One BERT-base sublayer of a packed Mirror-BERT batch: 6,144 tokens x 768, dropout 0.1, in the two dtype
mixes training uses: autocast (h bf16 from the dense product, residual stream and LayerNorm fp32) and
--half-model (all bf16). On a CUDA machine, side by side in one benchmark group per mix: PyTorch's three ops
(what Hugging Face's BertOutput runs) and mirrorfast's fused Triton kernel; peak extra GPU memory in
`extra_info`. Without CUDA: the PyTorch ops only (the CPU trains with them); the GPU cases skip with the
reason.
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # same rule as tests/conftest.py

from info_nce_table import peak_extra_mib  # noqa: E402  (benchmarks/ is on sys.path under pytest)

CUDA = torch.cuda.is_available()
TOKENS, HIDDEN, DROPOUT, EPS = 6144, 768, 0.1, 1e-12
MIXES = {"autocast": (torch.bfloat16, torch.float32), "half-model": (torch.bfloat16, torch.bfloat16)}


def _inputs(device, h_dtype, res_dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(TOKENS, HIDDEN, generator=g).to(device, h_dtype).requires_grad_(True)
    res = torch.randn(TOKENS, HIDDEN, generator=g).to(device, res_dtype).requires_grad_(True)
    w = torch.ones(HIDDEN, device=device, dtype=res_dtype, requires_grad=True)
    b = torch.zeros(HIDDEN, device=device, dtype=res_dtype, requires_grad=True)
    return [h, res, w, b]


def _make_step(impl, leaves):
    def forward():
        h, res, w, b = leaves
        if impl == "fused":
            from mirrorfast.kernels.residual_layernorm_triton import dropout_add_layer_norm

            return dropout_add_layer_norm(h, res, w, b, EPS, DROPOUT)
        s = F.dropout(h, DROPOUT, training=True) + res  # promotes to the residual's dtype, as in the model
        return F.layer_norm(s, (HIDDEN,), w, b, EPS)

    def step():
        out = forward()
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        if out.is_cuda:
            torch.cuda.synchronize()
        return grads

    return step


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_residual_layernorm_fwd_bwd_gpu(benchmark, impl, mix):
    if not CUDA:
        pytest.skip("needs a CUDA GPU: the fused Triton kernel against PyTorch's ops on CUDA tensors")
    step = _make_step(impl, _inputs("cuda", *MIXES[mix]))
    step()  # compile / warm up
    benchmark.group = f"dropout + residual + LayerNorm fwd+bwd, {TOKENS} x {HIDDEN}, {mix}, CUDA"
    benchmark.extra_info["peak_extra_mib"] = peak_extra_mib(step)
    benchmark(step)


def test_residual_layernorm_fwd_bwd_cpu(benchmark):
    step = _make_step("torch", _inputs("cpu", torch.float32, torch.float32))
    benchmark.group = f"dropout + residual + LayerNorm fwd+bwd, {TOKENS} x {HIDDEN}, fp32, CPU"
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)

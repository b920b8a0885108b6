"""The training step never makes the host wait for the device.

A host synchronization (`.item()`, `bool(tensor)`, `nonzero`, a bool-mask index, `repeat_interleave`
without `output_size`, ...) stalls the CPU until the GPU catches up each step, and makes the step
impossible to capture in a CUDA graph (`--cuda-graphs`). Those operations reach the dispatcher on the
CPU exactly as they would on CUDA, so a TorchDispatchMode that records them finds them here, without a GPU.
"""

import contextlib
import traceback

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoTokenizer, BertConfig, BertModel, RobertaConfig, RobertaModel

from mirrorfast.data import PACK_BUCKET, TokenizedTexts, packed_batch, padded_batch
from mirrorfast.kernels import info_nce
from mirrorfast.model import Encoder
from mirrorfast.packing import packed_attention
from mirrorfast.trainer import training_step

aten = torch.ops.aten
# Operators whose result (or output shape) the host must read from the device.
_ALWAYS_SYNC = {
    aten._local_scalar_dense.default,  # .item(), bool(t), int(t), float(t), `x in t`
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
}
# Frames of the Triton interpreter (CPU stand-in for a kernel launch, which never syncs on CUDA).
_IGNORED_FRAMES = ("triton/runtime/interpreter",)


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _is_sync(func, args, kwargs) -> bool:
    if func in _ALWAYS_SYNC:
        return True
    packet = func.overloadpacket
    if packet is aten.repeat_interleave:  # the output size comes from the device unless given
        return kwargs.get("output_size") is None and (len(args) < 3 or args[-1] is None)
    if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        return _bool_index(args)
    return False


class HostSyncRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            stack = traceback.extract_stack()[:-1]
            if not any(marker in frame.filename for frame in stack for marker in _IGNORED_FRAMES):
                ours = [f for f in stack if "/mirrorfast/" in f.filename or "/site-packages/" in f.filename]
                where = ours[-1] if ours else stack[-1]
                self.found.append(f"{func} at {where.filename}:{where.lineno} ({where.line})")
        return func(*args, **kwargs)


def test_recorder_catches_a_sync():
    """The detector itself can fail: .item(), a bool-mask index and an unsized repeat_interleave are caught."""
    x = torch.randn(6)
    with HostSyncRecorder() as rec:
        x.sum().item()
        _ = x[x > 0]
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3]))
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3]), output_size=6)  # not a sync
    assert len(rec.found) == 3, rec.found


TEXTS = ["hi", "a considerably longer sentence, with punctuation and more words", "mid sized text here",
         "naïve café 東京 😀", "x y", "another one", "the last of the batch, a little longer"]


def _tiny_step_setup(minilm_dir, pooling, arch: str = "bert"):
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if arch == "roberta":  # the RoBERTa family (also XLM-R, CamemBERT) packs too, so it is graphed by default
        model = RobertaModel(RobertaConfig(**sizes, pad_token_id=tok.pad_token_id,
                                           max_position_embeddings=24 + tok.pad_token_id + 2)).train()
    else:
        model = BertModel(BertConfig(**sizes)).train()
    encoder = Encoder(model, tok, pooling, 24, "tiny")
    first = TokenizedTexts.build(tok, TEXTS, 24)
    second = TokenizedTexts.build(tok, [t.replace("a", tok.mask_token) for t in TEXTS], 24)
    rows = np.arange(len(TEXTS))
    return tok, encoder, [(first, rows), (second, rows)]


STEP_CASES = [
    *((layout, pooling, loss, "bert", "flash", False, False) for layout in ("packed", "packed-bucketed", "padded")
      for pooling in ("cls", "mean") for loss in ("torch", "triton")),
    ("packed-bucketed", "cls", "triton", "roberta", "flash", False, False),
    ("packed-bucketed", "mean", "triton", "bert", "triton", False, False),  # the one-tile Triton attention kernel
    ("packed-bucketed", "mean", "triton", "bert", "flash", True, False),  # --half-model: master weights
    ("padded", "cls", "torch", "bert", "flash", True, False),
    ("packed-bucketed", "cls", "triton", "bert", "triton", True, True),  # + the fused residual LayerNorm
]


@pytest.mark.parametrize("layout,pooling,loss_backend,arch,attention,half_model,fused_norm", [
    pytest.param(*case, marks=pytest.mark.triton_cpu) if "triton" in (case[2], case[4]) or case[6] else case
    for case in STEP_CASES])
def test_training_step_has_no_host_sync(minilm_dir, layout, pooling, loss_backend, arch, attention, half_model,
                                        fused_norm, monkeypatch):
    """Forward, loss, backward, GradScaler and fused AdamW, as the trainer runs them (two steps). The
    packed-attention override is "flash" (on the CPU: the gathered-SDPA path) or "triton"."""
    from mirrorfast.fused_norm import fused_residual_layernorm
    from mirrorfast.packing import ATTENTION_ENV
    from mirrorfast.trainer import trained_parameters

    monkeypatch.setenv(ATTENTION_ENV, attention)
    tok, encoder, views = _tiny_step_setup(minilm_dir, pooling, arch)
    if layout == "padded":
        batch = padded_batch(views, tok.pad_token_id, views_per_chunk=4)
    else:
        batch = packed_batch(views, tok.pad_token_id, bucket=PACK_BUCKET if layout == "packed-bucketed" else None)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # enabled: the fp16 route (device-side inf check)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=not half_model)
    before = [p.detach().clone() for p in encoder.parameters()]
    with (trained_parameters(encoder.model, torch.bfloat16, half_model) as (params, half),
          packed_attention(encoder.model) if batch.packed else contextlib.nullcontext(),
          fused_residual_layernorm(encoder.model) if fused_norm else contextlib.nullcontext()):
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
        with HostSyncRecorder() as rec:
            for _ in range(2):
                loss = training_step(encoder, batch, 0.05, optimizer, scaler, autocast, loss_backend, half)
    assert rec.found == [], "host synchronizations in the training step:\n" + "\n".join(rec.found)
    assert torch.isfinite(loss) and loss.shape == ()
    assert any(not torch.equal(b, p) for b, p in zip(before, encoder.parameters())), "the step changed nothing"


@pytest.mark.triton_cpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_info_nce_triton_wrapper_has_no_host_sync(reduction):
    a = torch.randn(5, 16, requires_grad=True)
    b = torch.randn(5, 16, requires_grad=True)
    with HostSyncRecorder() as rec:
        loss = info_nce(a, b, 0.1, reduction=reduction, backend="triton")
        loss.backward(torch.rand_like(loss))
    assert rec.found == [], "\n".join(rec.found)
    assert a.grad is not None and torch.isfinite(a.grad).all()


"""`--half-model`: the model itself in fp16/bf16, its fp32 master weights in the optimizer.

This is the "O2" form of mixed precision (Micikevicius et al. 2018; Apex O2, Megatron-LM's fp32 main
params). Under autocast (the default), every matrix product casts its fp32 weight, bias and activation input
to fp16/bf16 and the backward casts their gradients back: about 500 copy kernels in a BERT-base step, 15 % of
its GPU time on an H200 (benchmarks/RESULTS.md). With a half-precision model nothing is cast inside it. The
updates stay fp32: an AdamW step moves a weight by at most about lr (2e-5 in the paper's recipe), below half
of bf16's spacing (2^-8 of the weight) for any weight over 0.01, so AdamW runs on an fp32 master copy of every
trained parameter, held in one flat tensor (tests/test_halfmodel.py: at lr 1e-6 only the master keeps the
update):

    backward -> one half-precision gradient per parameter -> one multi-tensor cast -> master.grad  (P,) fp32
    fused AdamW on master  ->  one cast into the model's parameters (views of one flat half buffer)

What changes against autocast: the activations between operators (the residual stream, LayerNorm
outputs, the [CLS] rows) are rounded to fp16/bf16 too. What does not: the update arithmetic (fp32 AdamW
on fp32 weights), the loss (fp32 accumulation), the saved model (fp32, the master's values).
"""

import torch
from torch import nn

from mirrorfast.errors import MirrorfastError

HALF_DTYPES = (torch.float16, torch.bfloat16)


class HalfModel:
    """Put `model` in `dtype` with an fp32 master copy; `release()` puts it back in fp32 (the master's values).

    Every floating-point parameter of the model must be trained (mirrorfast trains them all; the unused
    pooler is detached beforehand, see `mirrorfast.model.without_pooler`).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        if dtype not in HALF_DTYPES:
            raise MirrorfastError(f"--half-model needs fp16 or bf16, got {dtype}")
        self.params = [p for p in model.parameters() if p.is_floating_point()]
        frozen = [name for name, p in model.named_parameters() if p.is_floating_point() and not p.requires_grad]
        if frozen:
            raise MirrorfastError(f"--half-model trains every parameter; these are frozen: {', '.join(frozen[:5])}")
        self.model, self.dtype = model, dtype
        self.numels = [p.numel() for p in self.params]
        with torch.no_grad():
            self.master = nn.Parameter(torch.cat([p.reshape(-1).float() for p in self.params]))  # (P,) fp32
            self._half = self.master.to(dtype)  # (P,) the model's parameters are views of it
        # master.grad's storage, kept across steps (a fixed address for CUDA graphs); a view per parameter
        self._grad = torch.zeros_like(self.master)
        self._grad_views = [g.view(p.shape) for p, g in zip(self.params, self._grad.split(self.numels))]
        for p, view in zip(self.params, self._half.split(self.numels)):
            p.data = view.view(p.shape)
        # Floating buffers (rare in encoders) go to the half dtype for the forward and come back unrounded.
        self._buffers = {name: b for name, b in model.named_buffers() if b.is_floating_point()}
        for name, buffer in self._buffers.items():
            _set_buffer(model, name, buffer.to(dtype))

    @torch.no_grad()
    def gather_grads(self) -> None:
        """The model's half-precision gradients -> master.grad (fp32, flat); the model's grads are cleared.
        A parameter the loss did not reach gets zeros (as a flat tensor needs), not a skipped update."""
        reached = [(view, p.grad) for view, p in zip(self._grad_views, self.params) if p.grad is not None]
        if reached:  # one multi-tensor kernel casts them all into their slices of the flat gradient
            torch._foreach_copy_([view for view, _ in reached], [grad for _, grad in reached])
        for view, p in zip(self._grad_views, self.params):
            if p.grad is None:
                view.zero_()
            p.grad = None
        self.master.grad = self._grad

    @torch.no_grad()
    def publish(self) -> None:
        """After the optimizer step: the master's new values, rounded, into the model's parameters."""
        self._half.copy_(self.master)

    @torch.no_grad()
    def release(self) -> None:
        """Back to fp32 with the master's (unrounded) values, each parameter in its own storage (for saving)."""
        for p, view in zip(self.params, self.master.split(self.numels)):
            p.data = view.view(p.shape).clone()
        for name, buffer in self._buffers.items():
            _set_buffer(self.model, name, buffer)


def _set_buffer(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, buffer_name = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._buffers[buffer_name] = value

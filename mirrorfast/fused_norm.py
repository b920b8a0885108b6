"""MIRRORFAST_FUSED_LAYERNORM=1: BERT-family sublayer outputs as one fused kernel each way (opt-in, CUDA).

Each BERT layer ends its attention and its feed-forward block with Hugging Face's `...SelfOutput` /
`...Output` module: dense -> dropout -> LayerNorm(. + residual). For the duration of training, those
modules' forward runs the dense product as before and the rest through
`mirrorfast.kernels.residual_layernorm_triton.dropout_add_layer_norm` (same arithmetic in fp32, output in
the dtype the unfused ops give; its own dropout draws). The saved model is untouched: only the forward of
the module instances is swapped, and swapped back afterwards.

Off by default until a GPU measurement shows it pays (benchmarks/RESULTS.md).
"""

import contextlib
import inspect
import types

import torch
from torch import nn

from mirrorfast.config import env_switch
from mirrorfast.errors import MirrorfastError

FUSED_LAYERNORM_ENV = "MIRRORFAST_FUSED_LAYERNORM"


def fused_layernorm_requested(device: torch.device) -> bool:
    """Whether $MIRRORFAST_FUSED_LAYERNORM asks for it ("1"); it needs Triton and a CUDA device (or the Triton
    interpreter, TRITON_INTERPRET=1, as the tests run it)."""
    if not env_switch(FUSED_LAYERNORM_ENV, default=False):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        raise MirrorfastError(f"{FUSED_LAYERNORM_ENV}=1 needs triton, which is not installed") from None
    from mirrorfast.kernels.functional import triton_runs_on

    if not triton_runs_on(device):
        raise MirrorfastError(f"{FUSED_LAYERNORM_ENV}=1 needs a CUDA GPU")
    return True


def _is_sublayer_output(module: nn.Module) -> bool:
    """A BERT-style `...Output` module: dense, dropout, LayerNorm, forward(hidden_states, input_tensor)."""
    if not type(module).__name__.endswith("Output"):
        return False
    parts = (getattr(module, "dense", None), getattr(module, "dropout", None), getattr(module, "LayerNorm", None))
    if not (isinstance(parts[0], nn.Linear) and isinstance(parts[1], nn.Dropout) and isinstance(parts[2], nn.LayerNorm)):
        return False
    if parts[2].weight is None or parts[2].bias is None:  # the kernel applies an affine LayerNorm
        return False
    return list(inspect.signature(type(module).forward).parameters)[1:] == ["hidden_states", "input_tensor"]


def _fused_forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    from mirrorfast.kernels.residual_layernorm_triton import dropout_add_layer_norm

    norm = self.LayerNorm
    return dropout_add_layer_norm(self.dense(hidden_states), input_tensor, norm.weight, norm.bias, norm.eps,
                                  self.dropout.p, self.training)


@contextlib.contextmanager
def fused_residual_layernorm(model: nn.Module):
    """Swap every sublayer output's forward for the fused one; yields how many were swapped."""
    modules = [m for m in model.modules() if _is_sublayer_output(m)]
    if not modules:
        raise MirrorfastError(f"{FUSED_LAYERNORM_ENV}=1: {type(model).__name__} has no BERT-style sublayer "
                              "outputs (dense, dropout, LayerNorm of the sum with the residual)")
    for module in modules:
        module.forward = types.MethodType(_fused_forward, module)
    try:
        yield len(modules)
    finally:
        for module in modules:
            del module.forward  # the class's own forward again

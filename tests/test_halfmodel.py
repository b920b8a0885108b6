"""--half-model: the model in bf16/fp16, fp32 master weights stepped by AdamW (mirrorfast.halfmodel).

The reference is written out by hand: a bf16 copy of the model made with `.to()`, its gradients cast to
fp32, and PyTorch's plain (for-loop) AdamW on an fp32 copy of the weights."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel

from mirrorfast.config import TrainConfig
from mirrorfast.data import TokenizedTexts, padded_batch
from mirrorfast.errors import MirrorfastError
from mirrorfast.halfmodel import HalfModel
from mirrorfast.kernels import info_nce_reference
from mirrorfast.model import Encoder, without_pooler
from mirrorfast.trainer import train, trained_parameters, training_step

TEXTS = ["a short one", "a considerably longer sentence, with punctuation and more words", "naïve café 東京",
         "mid sized text here", "x y", "the last of the batch"]


def _setup(minilm_dir, seed: int):
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # deterministic forward
    model = BertModel(config).train()
    rows = np.arange(len(TEXTS))
    first = TokenizedTexts.build(tok, TEXTS, 24)
    second = TokenizedTexts.build(tok, [t.replace("e", tok.mask_token) for t in TEXTS], 24)
    return tok, model, padded_batch([(first, rows), (second, rows)], tok.pad_token_id)


@pytest.mark.parametrize("lr", [1e-3, 1e-6])
def test_a_step_is_fp32_adamw_on_the_half_models_gradients(minilm_dir, lr):
    tok, model, batch = _setup(minilm_dir, seed=int(np.random.default_rng().integers(1 << 30)))
    n = len(TEXTS)
    with without_pooler(model):
        # The reference, by hand.
        fp32_weights = [p.detach().clone().requires_grad_() for p in model.parameters()]
        half_copy = copy.deepcopy(model).to(torch.bfloat16)
        views = Encoder(half_copy, tok, "cls", 24, "ref").embed_batch(batch)
        expected_loss = info_nce_reference(views[:n], views[n:], 0.04, "mean")
        expected_loss.backward()
        for w, p in zip(fp32_weights, half_copy.parameters()):
            w.grad = p.grad.float()
        reference = torch.optim.AdamW(fp32_weights, lr=lr, weight_decay=0.01, foreach=False, fused=False)
        reference.step()

        # mirrorfast's step.
        with trained_parameters(model, torch.bfloat16, half_model=True) as (params, half):
            assert all(p.dtype == torch.bfloat16 for p in model.parameters())
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)
            scaler = torch.amp.GradScaler("cpu", enabled=False)
            loss = training_step(Encoder(model, tok, "cls", 24, "t"), batch, 0.04, optimizer, scaler,
                                 torch.autocast("cpu", enabled=False), "torch", half)
            master = half.master.detach().clone()
            published = [p.detach().clone() for p in model.parameters()]
            assert all(p.grad is None for p in model.parameters()) and half.master.grad is None
        released = torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # pooler still detached

    assert loss.item() == expected_loss.item()
    expected_master = torch.cat([w.detach().reshape(-1) for w in fp32_weights])
    torch.testing.assert_close(master, expected_master, rtol=1e-6, atol=1e-9)
    # The model runs on the master's values, rounded (to the reference's too, but fused and for-loop AdamW
    # differ in the last fp32 bits, which can round a value at a bf16 boundary either way).
    assert torch.equal(torch.cat([p.reshape(-1) for p in published]), master.to(torch.bfloat16))
    # Released: fp32 again, with the master's unrounded values (at lr 1e-6 most updates are below bf16's
    # resolution: only the master keeps them).
    assert released.dtype == torch.float32 and torch.equal(released, master)
    if lr == 1e-6:
        assert not torch.equal(released.to(torch.bfloat16).float(), released)


def test_gradients_are_scaled_back_with_fp16_and_a_grad_scaler(minilm_dir):
    """fp16: the GradScaler's scale reaches the half-precision backward (where it keeps small gradients from
    flushing to zero) and the fp32 step takes it out: an SGD step of lr 1 moves the weights by minus the
    scaled fp16 gradient / scale."""
    tok, model, batch = _setup(minilm_dir, seed=3)
    n = len(TEXTS)
    with without_pooler(model):
        half_copy = copy.deepcopy(model).to(torch.float16)
        views = Encoder(half_copy, tok, "cls", 24, "ref").embed_batch(batch)
        (info_nce_reference(views[:n], views[n:], 0.04, "mean") * 256.0).backward()
        expected = torch.cat([p.grad.float().reshape(-1) for p in half_copy.parameters()]) / 256.0
        start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        with trained_parameters(model, torch.float16, half_model=True) as (params, half):
            optimizer = torch.optim.SGD(params, lr=1.0)
            scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
            training_step(Encoder(model, tok, "cls", 24, "t"), batch, 0.04, optimizer, scaler,
                          torch.autocast("cpu", enabled=False), "torch", half)
        update = start - torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert expected.abs().max() > 0
    # atol: one fp32 ulp of the weights near 1.0 (LayerNorm), lost in `start - after`.
    torch.testing.assert_close(update, expected, rtol=1e-6, atol=2.5e-7)


def test_unused_parameters_get_zero_gradients_and_buffers_come_back_unrounded():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)
            self.register_buffer("table", torch.randn(5))

    net = Net()
    table = net.table.clone()
    half = HalfModel(net, torch.bfloat16)
    assert net.table.dtype == torch.bfloat16
    net.used(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    half.gather_grads()
    grad = half.master.grad
    assert grad.dtype == torch.float32 and grad.shape == (2 * (12 + 3),)
    assert grad[:15].abs().sum() > 0 and torch.equal(grad[15:], torch.zeros(15))
    net.unused(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()  # now only the other one
    half.gather_grads()
    assert torch.equal(half.master.grad[:15], torch.zeros(15)) and half.master.grad[15:].abs().sum() > 0
    half.gather_grads()  # no backward since: nothing reached, all zeros
    assert torch.equal(half.master.grad, torch.zeros(30))
    half.release()
    assert net.table.dtype == torch.float32 and torch.equal(net.table, table)


def test_refuses_frozen_parameters_and_fp32():
    net = nn.Linear(3, 3)
    net.bias.requires_grad_(False)
    with pytest.raises(MirrorfastError, match="frozen: bias"):
        HalfModel(net, torch.bfloat16)
    with pytest.raises(MirrorfastError, match="needs fp16 or bf16"):
        HalfModel(nn.Linear(2, 2), torch.float32)
    with pytest.raises(MirrorfastError, match="--half-model needs --fp16 or --bf16"):
        TrainConfig(corpus="x", level="sentence", half_model=True).resolved()


def test_train_with_half_model_saves_fp32_and_keeps_the_pooler(tiny_bert_dir, tmp_path):
    from safetensors.torch import load_file

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"sentence {i} about {w} in some words" for i, w in enumerate(["cats", "dogs", "rain",
                                                                                               "bread"] * 4)))
    out = tmp_path / "out"
    logs = []
    cfg = TrainConfig(model=str(tiny_bert_dir), corpus=str(corpus), level="sentence", batch_size=8, epochs=2,
                      precision="bf16", half_model=True, device="cpu", output=str(out), progress=False)
    result = train(cfg, log=logs.append)
    assert any("half_model=True" in line for line in logs)
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))
    before, after = load_file(tiny_bert_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in after.values())
    pooler = [k for k in after if "pooler" in k]
    assert pooler and all(torch.equal(before[k], after[k]) for k in pooler)  # detached: untouched
    changed = [k for k in after if "pooler" not in k and not torch.equal(before[k], after[k])]
    assert len(changed) > len(after) // 2
    # Trained weights are the fp32 master's, not bf16-rounded values.
    weight = after["encoder.layer.0.attention.self.query.weight"]
    assert not torch.equal(weight.to(torch.bfloat16).float(), weight)
    meta = json.loads((out / "mirrorfast.json").read_text())
    assert meta["half_model"] is True and meta["precision"] == "bf16"


def test_half_model_is_off_where_fp16_falls_back_to_fp32(tiny_bert_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} with a few words" for i in range(10)))
    logs = []
    cfg = TrainConfig(model=str(tiny_bert_dir), corpus=str(corpus), level="sentence", batch_size=4, max_steps=1,
                      precision="fp16", half_model=True, device="cpu", progress=False)
    train(cfg, log=logs.append, save=False)
    assert any("half model: off" in line for line in logs) and any("half_model=False" in line for line in logs)


class _CastCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts operators that change a floating tensor's dtype (casts), as a GPU would launch them."""

    def __init__(self):
        super().__init__()
        self.casts = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        src = args[1] if name == "copy_" else args[0] if args else None
        if (name in ("_to_copy", "copy_") and isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)
                and src.is_floating_point() and src.dtype != out.dtype):
            self.casts.append((name, src.dtype, out.dtype, tuple(src.shape)))
        return out


@pytest.mark.parametrize("half_model", [False, True])
def test_no_casts_inside_a_half_model(minilm_dir, half_model):
    """Autocast casts every product's weight and input, and their gradients back (dozens per layer);
    a --half-model model casts nothing in its forward and backward."""
    tok, model, batch = _setup(minilm_dir, seed=4)
    encoder = Encoder(model, tok, "cls", 24, "t")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=not half_model)
    with trained_parameters(model, torch.bfloat16, half_model) as (params, half):
        with _CastCounter() as counter:
            with autocast:
                views = encoder.embed_batch(batch)
            views.float().square().sum().backward()  # a loss of our own: only the model is counted
    inside = [c for c in counter.casts if c[3] != tuple(views.shape)]  # not our loss's views.float() (and back)
    if half_model:
        assert inside == [], inside
    else:
        assert len(inside) >= 2 * 12, inside  # 2 layers: q, k, v, output, FFN in and out weights and biases

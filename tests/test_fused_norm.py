"""MIRRORFAST_FUSED_LAYERNORM=1 (mirrorfast.fused_norm): the sublayer outputs of a real BERT / RoBERTa run
through the fused dropout + residual + LayerNorm kernel (the Triton interpreter here) and give the unfused
model's hidden states and gradients; the trainer uses it when asked, and says so."""

import json

import pytest
import torch
import transformers
from transformers import AutoTokenizer

pytest.importorskip("triton")
from mirrorfast.config import TrainConfig  # noqa: E402
from mirrorfast.errors import MirrorfastError  # noqa: E402
from mirrorfast.fused_norm import FUSED_LAYERNORM_ENV, fused_layernorm_requested, fused_residual_layernorm  # noqa: E402
from mirrorfast.trainer import train  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: the Triton interpreter
pytestmark = pytest.mark.triton_cpu if torch.device(DEVICE).type == "cpu" else []  # CPU tensors: the interpreter
TEXTS = ["hi", "a considerably longer sentence with several more words, naïve café 東京", "mid sized text"]


def _model(arch: str, tok, dropout: float):
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0)
    if arch == "roberta":
        config = transformers.RobertaConfig(**sizes, vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id,
                                            max_position_embeddings=130)
    else:
        config = transformers.BertConfig(**sizes, vocab_size=tok.vocab_size)
    return transformers.AutoModel.from_config(config).to(DEVICE)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_fused_sublayers_match_the_model(minilm_tokenizer_dir, arch):
    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    torch.manual_seed(0)
    model = _model(arch, tok, dropout=0.0).train()  # no dropout: both paths compute the same function
    batch = tok(TEXTS, padding=True, return_tensors="pt").to(DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        hidden = model(**batch).last_hidden_state
        loss = (hidden * torch.linspace(-1, 1, hidden.shape[-1], device=DEVICE)).square().sum()
        return hidden.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    expected, expected_grads = run()
    with fused_residual_layernorm(model) as swapped:
        assert swapped == 4  # attention output + feed-forward output, 2 layers
        hidden, grads = run()
    assert all("forward" not in vars(m) for m in model.modules())  # the class forward again
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_dropout_in_training_only(minilm_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    torch.manual_seed(1)
    model = _model("bert", tok, dropout=0.3)
    batch = tok(TEXTS, padding=True, return_tensors="pt").to(DEVICE)
    with fused_residual_layernorm(model), torch.no_grad():
        model.train()
        first, second = (model(**batch).last_hidden_state for _ in range(2))
        model.eval()
        plain = model(**batch).last_hidden_state
    assert not torch.equal(first, second)  # fresh dropout draws each call
    with torch.no_grad():
        torch.testing.assert_close(plain, model(**batch).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_request_checks(monkeypatch):
    monkeypatch.delenv(FUSED_LAYERNORM_ENV, raising=False)
    assert not fused_layernorm_requested(torch.device("cpu"))
    monkeypatch.setenv(FUSED_LAYERNORM_ENV, "yes")
    with pytest.raises(MirrorfastError, match="must be 0 or 1"):
        fused_layernorm_requested(torch.device("cpu"))
    monkeypatch.setenv(FUSED_LAYERNORM_ENV, "1")
    assert fused_layernorm_requested(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused_layernorm_requested(torch.device("cpu"))  # the Triton interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(MirrorfastError, match="needs a CUDA GPU"):
        fused_layernorm_requested(torch.device("cpu"))
    with pytest.raises(MirrorfastError, match="no BERT-style sublayer"):
        with fused_residual_layernorm(torch.nn.Sequential(torch.nn.Linear(2, 2))):
            pass


def test_trainer_uses_it_when_asked(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(FUSED_LAYERNORM_ENV, "1")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} with a few words about {w}" for i, w in enumerate(["cats", "dogs"] * 6)))
    out = tmp_path / "out"
    logs = []
    cfg = TrainConfig(model=str(tiny_bert_dir), corpus=str(corpus), level="sentence", batch_size=6, max_steps=2,
                      device=DEVICE.type, output=str(out), progress=False)
    result = train(cfg, log=logs.append)
    assert any("fused_layernorm=True" in line for line in logs)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert json.loads((out / "mirrorfast.json").read_text())["fused_layernorm"] is True

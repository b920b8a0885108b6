"""`mirrorfast env`: the installation report, as text and as one JSON object."""

import json

import pytest
import torch

from mirrorfast.cli import main


def test_env_reports_versions_and_the_trainers_choices(capsys, monkeypatch):
    monkeypatch.setenv("MIRRORFAST_KERNELS", "torch")
    monkeypatch.setenv("MIRRORFAST_API_KEY", "secret-key")
    assert main(["env", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "secret-key" not in out  # one object; the API key never printed
    info = json.loads(out)
    assert info["torch"] == torch.__version__
    assert info["overrides"] == {"MIRRORFAST_KERNELS": "torch"}
    assert info["train_loss"] == "torch"  # the override, as the trainer resolves it
    assert info["train_device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert isinstance(info["cpu_native_bf16"], bool) and isinstance(info["cpu_bf16_emulated"], bool)
    assert not (info["cpu_native_bf16"] and info["cpu_bf16_emulated"])
    if not torch.cuda.is_available():
        assert info["train_flash_attention"] is False and info["train_packed_kernel"] == "sdpa"
    assert info["train_packed_kernel"] in ("flash", "sdpa", "triton")
    assert "CPUExecutionProvider" in info["onnxruntime_providers"]

    assert main(["env"]) == 0
    text = capsys.readouterr().out
    for key in info:
        assert any(line.startswith(key + " ") for line in text.splitlines()), key
    assert "MIRRORFAST_KERNELS=torch" in text and "secret-key" not in text


def test_env_shows_an_override_this_machine_cannot_honour(capsys, monkeypatch):
    """MIRRORFAST_PACKED_ATTENTION=triton on a CPU without the interpreter: training refuses it, and env says
    so in its row instead of failing (or naming a kernel training would not run)."""
    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine the override is honoured")
    monkeypatch.setenv("MIRRORFAST_PACKED_ATTENTION", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["env", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["train_packed_kernel"]
    assert row.startswith("error: MIRRORFAST_PACKED_ATTENTION=triton runs on a CUDA GPU"), row


def test_env_lists_every_mistyped_switch_and_still_reports(capsys, monkeypatch):
    """The bug-report command must not fail on what it is meant to report: MIRRORFAST_KERNELS mistyped made
    `env` exit 2 with nothing printed, and the 0/1 switches that `train` refuses were listed as if fine."""
    for name, value in [("MIRRORFAST_KERNELS", "bogus"), ("MIRRORFAST_FUSED_LAYERNORM", "yes"),
                        ("MIRRORFAST_FIRST_TOKEN_LAST_LAYER", "2"), ("MIRRORFAST_KERNEL_WARMUP", "abc")]:
        monkeypatch.setenv(name, value)
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["train_loss"].startswith("error: MIRRORFAST_KERNELS must be torch")
    errors = info["override_errors"]
    assert len(errors) == 4 and errors[0].startswith("MIRRORFAST_KERNELS must be torch")
    assert "MIRRORFAST_FUSED_LAYERNORM must be 0 or 1, got 'yes'" in errors
    assert "MIRRORFAST_FIRST_TOKEN_LAST_LAYER must be 0 or 1, got '2'" in errors
    assert "MIRRORFAST_KERNEL_WARMUP must be 0 or 1, got 'abc'" in errors
    assert main(["env"]) == 0
    assert "MIRRORFAST_KERNEL_WARMUP must be 0 or 1" in capsys.readouterr().out

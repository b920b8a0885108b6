"""`mirrorfast export` (export/onnx.py): real exports, real onnxruntime sessions (CPU EP), real tokenizers.

Fast tests use the tiny random BERT; the packaged MiniLM is exported once per session (slow).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import mirrorfast

from mirrorfast.errors import MirrorfastError

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from mirrorfast.export.onnx import MAX_OPSET, MIN_OPSET, export_model  # noqa: E402
from mirrorfast.model import load_encoder, pool  # noqa: E402

TEXTS = [
    "A man is playing a guitar.",
    "Ünïcödé – naïve café, 日本語のテキスト, Привет мир 🙂",
    "",
    "x",
    "Two dogs run through a snowy field while their owner watches from the porch.",
    "The stock market fell sharply on Monday after the central bank raised interest rates again. " * 8,
]


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _cos(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _torch_outputs(encoder, feeds: dict, normalize: bool = True):
    """The PyTorch model in eval mode on the same int64 feeds: (sentence embedding, last hidden state)."""
    encoder.eval()
    with torch.inference_mode():
        tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
        hidden = encoder.model(**tensors).last_hidden_state
        pooled = pool(hidden, tensors["attention_mask"], encoder.pooling)
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return pooled.numpy(), hidden.numpy()


def _random_feeds(batch: int, lengths: list[int], seed: int = 0) -> dict:
    """Right-padded random token ids ([CLS] first, [SEP] last) with the given lengths."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((batch, width), dtype=np.int64)
    mask = np.zeros((batch, width), dtype=np.int64)
    for i in range(batch):
        n = lengths[i % len(lengths)]
        ids[i, :n] = rng.integers(1000, 29000, size=n)
        ids[i, 0] = 101
        if n > 1:
            ids[i, n - 1] = 102
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


@pytest.fixture(scope="module")
def tiny_export(tiny_bert_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny"
    export_model(tiny_bert_dir, out, fp16=True, int8=True)
    return out


@pytest.fixture(scope="module")
def tiny_encoder(tiny_bert_dir):
    return load_encoder(tiny_bert_dir).eval()


@pytest.fixture(scope="module")
def tiny_mean_dir(tiny_bert_dir, tmp_path_factory) -> Path:
    """A copy of the tiny model with a mirrorfast.json asking for mean pooling."""
    out = tmp_path_factory.mktemp("tiny-mean") / "model"
    shutil.copytree(tiny_bert_dir, out)
    (out / "mirrorfast.json").write_text(json.dumps({"pooling": "mean", "max_length": 64}), encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------ directory/graph
def test_export_directory_contents(tiny_export):
    manifest = json.loads((tiny_export / "export.json").read_text(encoding="utf-8"))
    files = {p.name for p in tiny_export.iterdir()}
    assert {"model.onnx", "model_fp16.onnx", "model_int8.onnx", "export.json", "tokenizer.json"} <= files
    assert set(manifest["files"]) == files
    assert manifest["models"] == {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"}
    assert manifest["pooling"] == "cls" and manifest["normalized"] is True
    assert manifest["dim"] == 32 and manifest["max_length"] == 128  # capped at the model's 128 positions
    assert manifest["opset"] == 17
    assert manifest["mirrorfast_version"] == mirrorfast.__version__
    assert manifest["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest["outputs"] == ["sentence_embedding", "token_embeddings"]
    thresholds = {"model.onnx": 0.9999, "model_fp16.onnx": 0.999, "model_int8.onnx": 0.99}
    for name, threshold in thresholds.items():
        parity = manifest["parity"][name]
        assert parity["threshold"] == threshold  # (min_cosine itself: export_model raises below it)
        assert parity["rows"] >= 20 and len(parity["cases"]) >= 5
    # the fp16 graph is the transformer-fused one; the int8 one keeps the FFN down-projections in fp32
    assert manifest["fp16"]["fused_operators"].get("Attention", 0) == 2
    assert manifest["fp16"]["fused_operators"].get("SkipLayerNormalization", 0) >= 2
    int8 = manifest["int8"]
    assert int8["tries"][0]["ffn_down_fp32"] is False and int8["tries"][0]["fp32_layers"] == []  # all int8 first
    assert int8["tries"][-1]["min_cosine"] == manifest["parity"]["model_int8.onnx"]["min_cosine"] >= 0.99
    # 6 weight MatMuls a layer; a layer kept in fp32 adds the 5 that are not its FFN down-projection
    assert len(int8["kept_fp32"]) == 2 * int8["ffn_down_fp32"] + 5 * len(int8["fp32_layers"])


def test_graph_inputs_outputs_and_named_dynamic_axes(tiny_export):
    model = onnx.load(str(tiny_export / "model.onnx"))
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    for tensor in inputs.values():
        assert tensor.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in tensor.type.tensor_type.shape.dim] == ["batch", "sequence"]
    outputs = {o.name: o for o in model.graph.output}
    assert list(outputs) == ["sentence_embedding", "token_embeddings"]
    dims = lambda t: [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(outputs["sentence_embedding"]) == ["batch", 32]
    assert dims(outputs["token_embeddings"]) == ["batch", "sequence", 32]
    for name in ("model_fp16.onnx", "model_int8.onnx"):  # fp32 in and out for every file
        session = _session(tiny_export / name)
        assert [i.type for i in session.get_inputs()] == ["tensor(int64)"] * 3
        assert [o.type for o in session.get_outputs()] == ["tensor(float)"] * 2


@pytest.mark.parametrize("batch", [1, 7, 33])
def test_dynamic_shapes_match_pytorch(tiny_export, tiny_encoder, batch):
    """Exported with batch 2; runs with any batch and every length from 1 to the max, right-padded."""
    session = _session(tiny_export / "model.onnx")
    for lengths in ([1], [2], [17], [128], list(range(1, 129, 4)), [128, 1, 64]):
        feeds = _random_feeds(batch, lengths, seed=batch)
        sentence, tokens = session.run(None, feeds)
        ref_sentence, ref_tokens = _torch_outputs(tiny_encoder, feeds)
        assert sentence.shape == (batch, 32) and tokens.shape == (batch, feeds["input_ids"].shape[1], 32)
        assert _cos(sentence, ref_sentence).min() >= 0.99999
        np.testing.assert_allclose(sentence, ref_sentence, atol=1e-5)
        valid = feeds["attention_mask"].astype(bool)
        np.testing.assert_allclose(tokens[valid], ref_tokens[valid], atol=1e-4)


def test_padding_does_not_change_embeddings(tiny_export, tiny_encoder):
    """A text alone and the same text right-padded in a batch with a long one give the same vector."""
    session = _session(tiny_export / "model.onnx")
    tok = tiny_encoder.tokenizer
    alone = []
    for text in TEXTS[:5]:
        feeds = {k: v.astype(np.int64) for k, v in tok([text], return_tensors="np").items()}
        alone.append(session.run(["sentence_embedding"], feeds)[0][0])
    batch = tok(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="np")
    together = session.run(["sentence_embedding"], {k: v.astype(np.int64) for k, v in batch.items()})[0]
    np.testing.assert_allclose(np.stack(alone), together[:5], atol=1e-5)


@pytest.mark.parametrize("name, threshold", [("model_fp16.onnx", 0.999), ("model_int8.onnx", 0.99)])
def test_fp16_and_int8_files_match_pytorch(tiny_export, tiny_encoder, name, threshold):
    session = _session(tiny_export / name)
    feeds = _random_feeds(9, [1, 3, 16, 64, 128], seed=7)
    sentence, tokens = session.run(None, feeds)
    assert sentence.dtype == np.float32 and tokens.dtype == np.float32
    ref, _ = _torch_outputs(tiny_encoder, feeds)
    assert _cos(sentence, ref).min() >= threshold


@pytest.mark.parametrize("opset", [MIN_OPSET, MAX_OPSET])
def test_supported_opset_range_ends(tiny_bert_dir, tmp_path, opset):
    export_model(tiny_bert_dir, tmp_path / "out", opset=opset)
    assert onnx.load(str(tmp_path / "out" / "model.onnx")).opset_import[0].version == opset
    from mirrorfast.export import OnnxEncoder

    texts = ["a short one", "a rather longer sentence, with punctuation, to embed"]
    got = OnnxEncoder(tmp_path / "out", provider="cpu").encode(texts)
    assert _cos(got, load_encoder(tiny_bert_dir).encode(texts, normalize=True)).min() >= 0.9999


# ------------------------------------------------------------------------------------ pooling/normalize
def test_mean_pooling_from_mirrorfast_json(tiny_mean_dir, tmp_path):
    encoder = load_encoder(tiny_mean_dir).eval()
    assert encoder.pooling == "mean"
    result = export_model(tiny_mean_dir, tmp_path / "out")
    assert result.manifest["pooling"] == "mean" and result.manifest["max_length"] == 64
    feeds = _random_feeds(5, [1, 4, 30, 64], seed=3)
    sentence, _ = _session(tmp_path / "out" / "model.onnx").run(None, feeds)
    mean_ref, _ = _torch_outputs(encoder, feeds)
    np.testing.assert_allclose(sentence, mean_ref, atol=1e-5)
    encoder.pooling = "cls"  # and it is really not the cls vector
    cls_ref, _ = _torch_outputs(encoder, feeds)
    assert _cos(sentence, cls_ref).min() < 0.99


def test_no_normalize_keeps_raw_pooled_vectors(tiny_bert_dir, tiny_encoder, tmp_path):
    result = export_model(tiny_bert_dir, tmp_path / "out", normalize=False, max_length=40)
    assert result.manifest["normalized"] is False and result.manifest["max_length"] == 40
    feeds = _random_feeds(4, [1, 12, 40], seed=5)
    sentence, _ = _session(tmp_path / "out" / "model.onnx").run(None, feeds)
    raw, _ = _torch_outputs(tiny_encoder, feeds, normalize=False)
    np.testing.assert_allclose(sentence, raw, rtol=1e-4, atol=1e-5)
    assert np.abs(np.linalg.norm(sentence, axis=1) - 1.0).max() > 0.1


# ------------------------------------------------------------------------------------ training mode
def _modes(encoder) -> set[bool]:
    return {m.training for m in encoder.modules()}


def test_export_leaves_eval_mode_set(tiny_bert_dir, tmp_path):
    encoder = load_encoder(tiny_bert_dir).eval()
    export_model(encoder, tmp_path / "out")
    assert _modes(encoder) == {False}


def test_export_preserves_training_mode_and_exports_eval_behaviour(tiny_bert_dir, tmp_path):
    encoder = load_encoder(tiny_bert_dir, dropout=0.5).train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    export_model(encoder, tmp_path / "out")
    assert _modes(encoder) == {True}
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    # the graph has no dropout: two runs agree, and agree with the eval-mode model
    session = _session(tmp_path / "out" / "model.onnx")
    feeds = _random_feeds(3, [5, 20], seed=1)
    first, second = session.run(["sentence_embedding"], feeds)[0], session.run(["sentence_embedding"], feeds)[0]
    np.testing.assert_array_equal(first, second)
    ref, _ = _torch_outputs(encoder, feeds)  # (switches the encoder to eval for the reference)
    np.testing.assert_allclose(first, ref, atol=1e-5)


# ------------------------------------------------------------------------------------------- errors
def test_not_a_model_directory(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(MirrorfastError, match="not a model directory"):
        export_model(tmp_path / "notes", tmp_path / "out")
    with pytest.raises(MirrorfastError, match="model directory .*missing does not exist"):
        export_model(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unwritable_out_dir(tiny_bert_dir, tmp_path):
    """A parent that cannot be a directory (a regular file); chmod alone would not stop root."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(MirrorfastError, match="cannot create"):
        export_model(tiny_bert_dir, blocker / "sub" / "out")
    with pytest.raises(MirrorfastError, match="not a directory"):
        export_model(tiny_bert_dir, blocker)


def test_the_current_directory_is_refused_before_exporting(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MirrorfastError, match="is the current directory, which an output cannot replace"):
        export_model(tiny_bert_dir, ".")
    assert list(tmp_path.iterdir()) == [] and list(tmp_path.parent.glob(f".{tmp_path.name}.*")) == []


def test_export_model_argument_types(tiny_bert_dir, tmp_path):
    from mirrorfast.export.onnx import _check_opset

    for args, kwargs, message in [((None, tmp_path / "o"), {}, "model must be a path"),
                                  ((tiny_bert_dir, None), {}, "out_dir must be a path"),
                                  ((tiny_bert_dir, tmp_path / "o"), {"int8": "no"}, "int8 must be True or False"),
                                  ((tiny_bert_dir, tmp_path / "o"), {"opset": "17"}, "unsupported ONNX opset '17'"),
                                  ((tiny_bert_dir, tmp_path / "o"), {"opset": True}, "unsupported ONNX opset True")]:
        with pytest.raises(MirrorfastError, match=message):
            export_model(*args, **kwargs)
    assert _check_opset(np.int64(17)) == 17 and type(_check_opset(np.int64(17))) is int  # as batch sizes are taken
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("opset", [MIN_OPSET - 1, MAX_OPSET + 1, 9])
def test_unsupported_opset(tiny_bert_dir, tmp_path, opset):
    with pytest.raises(MirrorfastError, match=f"unsupported ONNX opset {opset}: supported opsets are 14 to 20"):
        export_model(tiny_bert_dir, tmp_path / "out", opset=opset)
    assert not (tmp_path / "out").exists()


def test_max_length_beyond_positions(tiny_bert_dir, tmp_path):
    with pytest.raises(MirrorfastError, match="exceeds the model's 128 positions"):
        export_model(tiny_bert_dir, tmp_path / "out", max_length=129)


def test_existing_directory_that_is_not_an_export(tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(MirrorfastError, match="not a previous export.*--overwrite"):
        export_model(tiny_bert_dir, out)
    assert (out / "precious.txt").read_text() == "keep me"
    export_model(tiny_bert_dir, out, overwrite=True)
    assert (out / "export.json").is_file() and not (out / "precious.txt").exists()


def test_an_output_that_is_or_holds_the_model_is_refused(tiny_bert_dir, tmp_path):
    """`export m m --overwrite` (or into m's parent) would replace the model with its export."""
    model = tmp_path / "models" / "m"
    shutil.copytree(tiny_bert_dir, model)
    files = sorted(p.name for p in model.iterdir())
    for out, holds in [(model, "is"), (model.parent, "holds")]:
        with pytest.raises(MirrorfastError, match=f"{holds} {model}, an input of this run: writing the output there"):
            export_model(model, out, overwrite=True)
    with pytest.raises(MirrorfastError, match=f"is {model}, an input"):  # a loaded encoder: its source
        export_model(load_encoder(model), model, overwrite=True)
    assert sorted(p.name for p in model.iterdir()) == files and list(model.parent.iterdir()) == [model]


def test_previous_export_is_replaced(tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    export_model(tiny_bert_dir, out, int8=True)
    assert (out / "model_int8.onnx").is_file()
    export_model(tiny_bert_dir, out)  # no --overwrite needed for a previous export
    assert not (out / "model_int8.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary siblings left
    (out / "client.py").write_text("a user's own file")  # ... unless it holds what that export did not write
    with pytest.raises(MirrorfastError, match="holds client.py, which the previous output there did not write"):
        export_model(tiny_bert_dir, out)
    export_model(tiny_bert_dir, out, overwrite=True)
    assert not (out / "client.py").exists()


def test_failed_parity_leaves_nothing(tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MirrorfastError, match=r"parity check failed for model_int8\.onnx: min cosine 0\.\d+ < 1\.5"):
        export_model(tiny_bert_dir, out, int8=True, parity_thresholds={"int8": 1.5})
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_parity_keeps_the_previous_export(tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    export_model(tiny_bert_dir, out)
    before = (out / "export.json").read_text()
    with pytest.raises(MirrorfastError, match="parity check failed for model.onnx"):
        export_model(tiny_bert_dir, out, parity_thresholds={"fp32": 1.5})
    assert (out / "export.json").read_text() == before


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_export_end_to_end(tiny_bert_dir, tmp_path, capsys):
    from mirrorfast.cli import main

    out = tmp_path / "cli-out"
    assert main(["export", str(tiny_bert_dir), str(out), "--int8", "--max-length", "32", "--opset", "17"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "model.onnx, model_int8.onnx" in printed and "parity model_int8.onnx: min cosine" in printed
    assert "int8: fp32: nothing (every weight MatMul in int8)" in printed
    assert "sentence_embedding of model.onnx, model_int8.onnx: the last layer for the first token alone" in printed
    steps = [line for line in captured.err.splitlines() if line.startswith("mirrorfast: ")]  # progress on stderr
    assert steps[0] == "mirrorfast: model.onnx: tracing the model (opset 17)"
    assert "mirrorfast: model_int8.onnx: fp32: nothing (every weight MatMul in int8)" in steps
    assert json.loads((out / "export.json").read_text())["max_length"] == 32
    # The tokenizer files declare it, for transformers and for the Rust tokenizer alone (MiniLM's say 128).
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    long_text = "word " * 200
    assert len(AutoTokenizer.from_pretrained(out)(long_text, truncation=True)["input_ids"]) == 32
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert len(raw.encode(long_text).ids) == 32 and len(raw.encode("hi").ids) == 3  # cut, and not padded

    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mirrorfast export: error:") and err.count("\n") == 1
    assert main(["export", str(tiny_bert_dir), str(tmp_path / "o3"), "--opset", "99"]) == 2
    assert "supported opsets are 14 to 20" in capsys.readouterr().err
    (tmp_path / "o4").mkdir()
    (tmp_path / "o4" / "x").write_text("x")
    assert main(["export", str(tiny_bert_dir), str(tmp_path / "o4")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(tiny_bert_dir), str(tmp_path / "o4"), "--overwrite", "--no-normalize"]) == 0
    assert json.loads((tmp_path / "o4" / "export.json").read_text())["normalized"] is False


# -------------------------------------------------------------------------------------- MiniLM (slow)
@pytest.mark.slow
def test_minilm_export_parity(minilm_export, minilm_dir):
    manifest = json.loads((minilm_export / "export.json").read_text())
    assert manifest["dim"] == 384 and manifest["pooling"] == "cls" and manifest["max_length"] == 512
    assert manifest["fp16"]["fused_operators"]["Attention"] == 6
    encoder = load_encoder(minilm_dir).eval()
    feeds = {k: v.astype(np.int64) for k, v in
             encoder.tokenizer(TEXTS, padding=True, truncation=True, max_length=512, return_tensors="np").items()}
    ref, _ = _torch_outputs(encoder, feeds)
    for name, threshold in [("model.onnx", 0.9999), ("model_fp16.onnx", 0.999), ("model_int8.onnx", 0.99)]:
        sentence = _session(minilm_export / name).run(["sentence_embedding"], feeds)[0]
        assert _cos(sentence, ref).min() >= threshold, name


# ------------------------------------------------------------------------------- int8 fallback
def test_int8_fallback_order_goes_from_the_ends_inwards_up_to_half_the_layers():
    from mirrorfast.export.onnx import _fallback_order

    assert _fallback_order(6) == [5, 0, 4]
    assert _fallback_order(12) == [11, 0, 10, 1, 9, 2]
    assert _fallback_order(3) == [2]
    assert _fallback_order(1) == [] and _fallback_order(0) == []


def _int8_layers(path: Path) -> set[int | str]:
    """Encoder layers that hold an integer MatMul in a quantized graph ("first_token": the branch that
    recomputes the last layer for the [CLS] token, export/first_token.py)."""
    import re

    model = onnx.load(str(path))
    integer = [node.name for node in model.graph.node if node.op_type == "MatMulInteger"]
    return {int(m.group(1)) for name in integer for m in [re.search(r"/layer\.(\d+)/", name)] if m} | {
        "first_token" for name in integer if name.startswith("/first_token/")}


def test_an_int8_write_cut_short_by_a_full_disk_says_so(tiny_export, tmp_path, monkeypatch):
    """onnxruntime's quantizer reports a full disk as 'DecodeError: ... Wire format was corrupt' (its
    intermediate file cut short); the error names the folder without room. With room: the error alone."""
    import collections

    import onnxruntime.quantization

    from mirrorfast.export import onnx as export_onnx

    def corrupt(*args, **kwargs):
        raise ValueError("Error parsing message with type 'onnx.ModelProto': Wire format was corrupt")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", corrupt)
    usage = collections.namedtuple("usage", "total used free")
    for free, hint in [(1 << 20, f" ({tmp_path} has 1 MiB free, less than the fp32 model's"), (1 << 40, "")]:
        monkeypatch.setattr(export_onnx.shutil, "disk_usage", lambda folder: usage(0, 0, free))
        with pytest.raises(MirrorfastError) as info:
            export_onnx._write_int8(tiny_export / "model.onnx", tmp_path / "model_int8.onnx", measure=None)
        assert str(info.value).startswith("int8 quantization failed: ValueError: Error parsing message")
        assert (hint in str(info.value)) if hint else str(info.value).endswith("Wire format was corrupt")


def test_int8_keeps_encoder_layers_in_fp32_until_parity_holds(tiny_bert_dir, tmp_path):
    """_write_int8 with the real quantizer and a parity measure that fails while the last layer is
    quantized: all in int8 fails, the FFN down-projections in fp32 fail, the last layer in fp32 too passes;
    the file and the record say so. The last layer's first-token branch goes to fp32 with the layer."""
    from mirrorfast.export.onnx import _write_int8

    fp32 = tmp_path / "model.onnx"
    export_model(tiny_bert_dir, tmp_path / "export", max_length=16)
    shutil.copy(tmp_path / "export" / "model.onnx", fp32)
    measured = []

    def measure(path):
        layers = _int8_layers(path)
        measured.append(layers)
        cosine = 0.95 if 1 in layers else 0.995
        return {"min_cosine": cosine, "threshold": 0.99, "worst": "case fake, row 0"}

    logs = []
    details, parity = _write_int8(fp32, tmp_path / "model_int8.onnx", measure, logs.append)
    assert logs == ["model_int8.onnx: fp32: nothing (every weight MatMul in int8)",
                    "model_int8.onnx: fp32: the FFN down-projections (retry: the previous try's min cosine "
                    "0.950000 < 0.99)",
                    "model_int8.onnx: fp32: the FFN down-projections and encoder layers [1] (retry: the previous "
                    "try's min cosine 0.950000 < 0.99)"]
    # all in int8, FFN down fp32, then the last layer (of 2) in fp32, its first-token branch with it
    assert measured == [{0, 1, "first_token"}, {0, 1, "first_token"}, {0}]
    assert details["fp32_layers"] == [1] and details["ffn_down_fp32"] and parity["min_cosine"] == 0.995
    assert [(t["ffn_down_fp32"], t["fp32_layers"]) for t in details["tries"]] == [(False, []), (True, []), (True, [1])]
    assert details["tries"][0]["min_cosine"] == 0.95
    assert _int8_layers(tmp_path / "model_int8.onnx") == {0}
    fp32_matmuls = {n.name for n in onnx.load(str(tmp_path / "model_int8.onnx")).graph.node if n.op_type == "MatMul"}
    assert set(details["kept_fp32"]) <= fp32_matmuls and len(details["kept_fp32"]) == 1 + 6 + 4  # layer 0's FFN down,
    # layer 1's six weight products and the branch's four (its key and value products are layer 1's)


def test_int8_that_never_reaches_parity_fails_and_writes_nothing(tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MirrorfastError, match=r"parity check failed for model_int8.onnx: min cosine .* < 1.5 .*with "
                                              r"the FFN down-projections and encoder layers \[1\] kept in fp32 "
                                              r"\(all in int8: min cosine"):
        export_model(tiny_bert_dir, out, int8=True, max_length=16, parity_thresholds={"int8": 1.5})
    assert not out.exists()

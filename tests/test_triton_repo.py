"""export/triton_repo.py: the Triton model repository matches the ONNX graph it serves."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from mirrorfast.errors import MirrorfastError
from mirrorfast.export.runtime import EXPORT_FORMAT

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="session")
def export_dir(tiny_export) -> Path:
    return tiny_export


# ------------------------------------------------------------------- a small protobuf-text parser
_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([A-Za-z_][A-Za-z0-9_.]*)|(-?\d+(?:\.\d+)?)|([:{}\[\],]))')


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m, f"cannot parse pbtxt at {text[pos:pos + 30]!r}"
        pos = m.end()
        if m.group(1) is None:
            out.append(m.group(0).strip())
    return out


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format -> {field: [values]} (messages are dicts, strings unquoted, numbers int)."""
    toks = _tokens(text)
    pos = 0

    def scalar(tok: str):
        if tok.startswith('"'):
            return json.loads(tok)
        if re.fullmatch(r"-?\d+", tok):
            return int(tok)
        return tok  # enum

    def value():
        nonlocal pos
        tok = toks[pos]
        if tok == "{":
            pos += 1
            return message("}")
        pos += 1
        return scalar(tok)

    def message(end: str | None) -> dict:
        nonlocal pos
        fields: dict = {}
        while pos < len(toks) and toks[pos] != end:
            name = toks[pos]
            pos += 1
            if toks[pos] == ":":
                pos += 1
            if toks[pos] == "[":
                pos += 1
                while toks[pos] != "]":
                    fields.setdefault(name, []).append(value())
                    if toks[pos] == ",":
                        pos += 1
                pos += 1
            else:
                fields.setdefault(name, []).append(value())
        pos += 1
        return fields

    return message(None)


def _graph_tensors(model_path: Path):
    model = onnx.load(str(model_path))
    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    return inputs, list(model.graph.output)


_ONNX_TO_TRITON = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32",
                   onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.FLOAT16: "TYPE_FP16"}


# -------------------------------------------------------------------------------------------- tests
def test_config_matches_onnx_graph(export_dir, tmp_path):
    from mirrorfast.export.triton_repo import write_triton_repo

    repo = tmp_path / "repo"
    model_dir = write_triton_repo(export_dir, repo, max_batch_size=32)
    assert model_dir == repo / "tiny-export"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt"]
    assert (model_dir / "1" / "model.onnx").read_bytes() == (export_dir / "model.onnx").read_bytes()

    cfg = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert cfg["name"] == [model_dir.name]
    assert cfg["backend"] == ["onnxruntime"]
    assert cfg["max_batch_size"] == [32]
    assert "dynamic_batching" in cfg and cfg["dynamic_batching"][0]["max_queue_delay_microseconds"] == [2000]

    hidden = json.loads((export_dir / "export.json").read_text())["dim"]
    g_inputs, g_outputs = _graph_tensors(export_dir / "model.onnx")
    assert [t["name"][0] for t in cfg["input"]] == [v.name for v in g_inputs]
    assert [t["name"][0] for t in cfg["output"]] == [v.name for v in g_outputs]
    assert [v.name for v in g_inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [v.name for v in g_outputs] == ["sentence_embedding", "token_embeddings"]
    for entry, v in zip(cfg["input"] + cfg["output"], g_inputs + g_outputs):
        assert entry["data_type"] == [_ONNX_TO_TRITON[v.type.tensor_type.elem_type]], v.name
        graph_rank = len(v.type.tensor_type.shape.dim)
        assert len(entry["dims"]) == graph_rank - 1, v.name  # batch dim left to max_batch_size
        # every concrete dim of the graph appears as is
        for d, graph_dim in zip(entry["dims"], list(v.type.tensor_type.shape.dim)[1:]):
            if graph_dim.HasField("dim_value"):
                assert d == graph_dim.dim_value
    dims = {t["name"][0]: t["dims"] for t in cfg["input"] + cfg["output"]}
    assert dims["input_ids"] == dims["attention_mask"] == dims["token_type_ids"] == [-1]
    assert dims["sentence_embedding"] == [hidden]
    assert dims["token_embeddings"] == [-1, hidden]

    # and what the graph really produces fits the declared dims
    sess = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    batch, seq = 3, 7
    feeds = {"input_ids": np.full((batch, seq), 1000, np.int64), "attention_mask": np.ones((batch, seq), np.int64),
             "token_type_ids": np.zeros((batch, seq), np.int64)}
    results = sess.run(None, feeds)
    for entry, arr in zip(cfg["output"], results):
        assert arr.shape[0] == batch
        assert all(d == -1 or d == s for d, s in zip(entry["dims"], arr.shape[1:])), (entry, arr.shape)
        assert arr.dtype == np.float32


def test_options_rendered(export_dir, tmp_path):
    from mirrorfast.export.triton_repo import write_triton_repo

    model_dir = write_triton_repo(export_dir, tmp_path / "repo", max_batch_size=64, model_name="minilm",
                                  preferred_batch_sizes=[16, 8], instance_kind="gpu", instance_count=2,
                                  max_queue_delay_us=500)
    cfg = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert model_dir.name == "minilm" and cfg["name"] == ["minilm"]
    assert cfg["dynamic_batching"][0] == {"preferred_batch_size": [8, 16], "max_queue_delay_microseconds": [500]}
    assert cfg["instance_group"] == [{"count": [2], "kind": ["KIND_GPU"]}]


def test_rewrite_replaces_ours_and_keeps_other_models(export_dir, tmp_path):
    from mirrorfast.export.triton_repo import write_triton_repo

    repo = tmp_path / "repo"
    other = repo / "other_model"
    other.mkdir(parents=True)
    (other / "config.pbtxt").write_text('name: "other_model"\n')
    first = write_triton_repo(export_dir, repo, max_batch_size=8)
    second = write_triton_repo(export_dir, repo, max_batch_size=16)
    assert first == second
    assert parse_pbtxt((second / "config.pbtxt").read_text())["max_batch_size"] == [16]
    assert (other / "config.pbtxt").read_text() == 'name: "other_model"\n'
    assert sorted(p.name for p in repo.iterdir()) == ["other_model", "tiny-export"]  # no temp leftovers
    (second / "2").mkdir()  # a version added by hand is not deleted by a rewrite without overwrite
    with pytest.raises(MirrorfastError, match="holds 2, which the previous output there did not write"):
        write_triton_repo(export_dir, repo, max_batch_size=16)
    assert (second / "2").is_dir()
    (second / "2").rmdir()

    with pytest.raises(MirrorfastError, match="not a previous"):
        write_triton_repo(export_dir, repo, model_name="other_model")
    write_triton_repo(export_dir, repo, model_name="other_model", overwrite=True)
    assert parse_pbtxt((other / "config.pbtxt").read_text())["backend"] == ["onnxruntime"]


def test_outputs_from_a_generator_are_served(export_dir, tmp_path):
    """A generator of output names is read once (the type check used it up: every output was served)."""
    from mirrorfast.export.triton_repo import write_triton_repo

    model_dir = write_triton_repo(export_dir, tmp_path / "repo", outputs=(o for o in ["sentence_embedding"]))
    cfg = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert [t["name"][0] for t in cfg["output"]] == ["sentence_embedding"]


def test_an_int8_model_is_placed_on_the_cpu_unless_asked_otherwise(export_dir, tmp_path):
    """The int8 file is dynamic quantization for the CPU: instance_kind "auto" (Triton's choice: a GPU where
    there is one) places it there; an explicit kind is kept."""
    from mirrorfast.export.triton_repo import write_triton_repo

    model_dir = write_triton_repo(export_dir, tmp_path / "repo", precision="int8")
    cfg = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert cfg["instance_group"] == [{"count": [1], "kind": ["KIND_CPU"]}]
    assert (model_dir / "1" / "model.onnx").read_bytes() == (export_dir / "model_int8.onnx").read_bytes()
    model_dir = write_triton_repo(export_dir, tmp_path / "repo", precision="int8", instance_kind="gpu")
    assert parse_pbtxt((model_dir / "config.pbtxt").read_text())["instance_group"][0]["kind"] == ["KIND_GPU"]
    model_dir = write_triton_repo(export_dir, tmp_path / "repo")  # fp32, auto: Triton's default placement
    assert "instance_group" not in parse_pbtxt((model_dir / "config.pbtxt").read_text())


def test_failures_leave_nothing_behind(export_dir, tmp_path, monkeypatch):
    from mirrorfast.export import triton_repo

    repo = tmp_path / "repo"
    not_export = tmp_path / "not-an-export"
    not_export.mkdir()
    with pytest.raises(MirrorfastError, match="export directory"):
        triton_repo.write_triton_repo(not_export, repo)
    with pytest.raises(MirrorfastError, match="missing not found"):
        triton_repo.write_triton_repo(tmp_path / "missing", repo)
    onnx_only = tmp_path / "onnx-only"  # an ONNX file without export.json is not an export (no tokenizer)
    onnx_only.mkdir()
    shutil.copyfile(export_dir / "model.onnx", onnx_only / "model.onnx")
    with pytest.raises(MirrorfastError, match="not an export directory"):
        triton_repo.write_triton_repo(onnx_only, repo)
    assert not repo.exists()
    with pytest.raises(MirrorfastError, match="no fp16 model"):
        triton_repo.write_triton_repo(export_dir, repo, precision="fp16")
    for settings, message in [
        ({"max_batch_size": 0}, "max_batch_size must be at least 1, got 0"),
        ({"max_queue_delay_us": -1}, "max_queue_delay_us must be >= 0, got -1"),
        ({"instance_kind": "tpu"}, r"instance_kind must be one of \['auto', 'cpu', 'gpu'\], got 'tpu'"),
        ({"instance_count": 0}, "instance_count must be at least 1, got 0"),
        ({"max_batch_size": 8, "preferred_batch_sizes": [4, 16]}, r"must be in 1..8, got \[4, 16\]"),
        ({"preferred_batch_sizes": [0]}, r"must be in 1..64, got \[0\]"),
        ({"model_name": "no/slashes"}, "must be letters, digits"),
        ({"max_batch_size": 8.5}, "max_batch_size must be an integer, got 8.5"),  # was written as 8
        ({"preferred_batch_sizes": "16"}, "preferred batch sizes must be a list of integers, got '16'"),
        ({"precision": "bf16"}, "precision must be one of fp32, fp16, int8, got 'bf16'"),  # said "export with --bf16"
        ({"outputs": "sentence_embedding"}, "outputs must be a list of output names"),  # was "no output s, e, n, ..."
        ({"outputs": 5}, "outputs must be a list of output names, e.g.*got 5"),
    ]:
        with pytest.raises(MirrorfastError, match=message):
            triton_repo.write_triton_repo(export_dir, repo, **settings)
        assert not repo.exists(), settings

    def broken_copy(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", broken_copy)
    with pytest.raises(MirrorfastError, match="No space left"):
        triton_repo.write_triton_repo(export_dir, repo)
    assert not repo.exists()  # the repository folder is created with the model folder, and removed with it


def test_fixed_batch_dimension_is_refused(tmp_path):
    from onnx import TensorProto, helper

    from mirrorfast.export.triton_repo import write_triton_repo

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [4, "sequence"])
    y = helper.make_tensor_value_info("out", TensorProto.INT64, [4, "sequence"])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["out"])], "g", [x], [y])
    src = tmp_path / "fixed"
    src.mkdir()
    onnx.save(helper.make_model(graph), str(src / "model.onnx"))
    manifest = {"format": EXPORT_FORMAT, "models": {"fp32": "model.onnx"}, "dim": 4, "max_length": 8}
    (src / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(MirrorfastError, match="fixed first dimension"):
        write_triton_repo(src, tmp_path / "repo")
    assert not (tmp_path / "repo" / "fixed").exists()


def test_export_command_writes_the_triton_repo(tiny_bert_dir, tmp_path, capsys):
    from mirrorfast.cli import main

    out, repo = tmp_path / "exp", tmp_path / "repo"
    assert main(["export", str(tiny_bert_dir), str(out), "--triton-repo", str(repo), "--triton-max-batch", "8"]) == 0
    assert "triton model:" in capsys.readouterr().out
    config = parse_pbtxt((repo / "exp" / "config.pbtxt").read_text())
    assert config["max_batch_size"] == [8]
    assert (repo / "exp" / "1" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()


@pytest.mark.parametrize("bad", ["max-batch", "repo-is-a-file"])
def test_export_command_checks_the_triton_options_before_exporting(tiny_bert_dir, tmp_path, capsys, bad):
    from mirrorfast.cli import main

    out, repo = tmp_path / "exp", tmp_path / "repo"
    if bad == "repo-is-a-file":
        repo.write_text("not a folder")
    extra = ["--triton-max-batch", "0"] if bad == "max-batch" else []
    assert main(["export", str(tiny_bert_dir), str(out), "--triton-repo", str(repo), *extra]) == 2
    captured = capsys.readouterr()
    message = "max_batch_size must be at least 1" if bad == "max-batch" else "exists and is not a directory"
    assert message in captured.err and captured.err.count("\n") == 1 and "exported" not in captured.out
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == (["repo"] if bad != "max-batch" else [])


def test_a_failed_export_leaves_no_triton_repo_folder(tmp_path, capsys):
    """The repository folder (and its missing parents) are created with the model folder, not by the check
    run before exporting: an export that fails leaves no empty folder behind."""
    from mirrorfast.cli import main

    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    repo = tmp_path / "serving" / "repo"
    assert main(["export", str(not_a_model), str(tmp_path / "exp"), "--triton-repo", str(repo)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["not-a-model"]


def test_sentence_only_serves_the_cut_graph(export_dir, tmp_path):
    """outputs=("sentence_embedding",): the config and the graph have that output alone, the graph lacks the
    full last layer's feed-forward (the first-token branch computes the embedding), and the vectors are
    the export's."""
    from mirrorfast.export.triton_repo import write_triton_repo

    model_dir = write_triton_repo(export_dir, tmp_path / "repo", outputs=("sentence_embedding",))
    cfg = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    hidden = json.loads((export_dir / "export.json").read_text())["dim"]
    assert [(t["name"][0], t["dims"]) for t in cfg["output"]] == [("sentence_embedding", [hidden])]
    assert [t["name"][0] for t in cfg["input"]] == ["input_ids", "attention_mask", "token_type_ids"]
    served = model_dir / "1" / "model.onnx"
    graph = onnx.load(str(served))
    assert [o.name for o in graph.graph.output] == ["sentence_embedding"]
    assert not any("/layer.1/intermediate/" in n.name for n in graph.graph.node)  # the tiny BERT's last layer
    rng = np.random.default_rng()
    ids = rng.integers(1000, 29000, size=(4, 9))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    whole = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    cut = ort.InferenceSession(str(served), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(cut.run(None, feeds)[0], whole.run(["sentence_embedding"], feeds)[0], rtol=0, atol=1e-6)


def test_an_output_the_graph_lacks_is_refused(export_dir, tmp_path):
    from mirrorfast.export.triton_repo import write_triton_repo

    with pytest.raises(MirrorfastError, match=r"model.onnx has no output pooled \(it has sentence_embedding, "
                                              r"token_embeddings\)"):
        write_triton_repo(export_dir, tmp_path / "repo", outputs=("pooled",))
    assert not (tmp_path / "repo").exists()


def test_export_command_sentence_only(tiny_bert_dir, tmp_path, capsys):
    from mirrorfast.cli import main

    out, repo = tmp_path / "exp", tmp_path / "repo"
    assert main(["export", str(tiny_bert_dir), str(out), "--triton-sentence-only"]) == 2
    assert "--triton-sentence-only needs --triton-repo DIR" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(tiny_bert_dir), str(out), "--triton-repo", str(repo), "--triton-sentence-only"]) == 0
    config = parse_pbtxt((repo / "exp" / "config.pbtxt").read_text())
    assert [t["name"][0] for t in config["output"]] == ["sentence_embedding"]


def test_sentence_only_of_a_graph_with_external_weights_is_refused(export_dir, tmp_path):
    """Weights in external files are not cut: serving the whole graph under a one-output config would lie."""
    from mirrorfast.export.triton_repo import write_triton_repo

    src = tmp_path / "external"
    src.mkdir()
    onnx.save(onnx.load(str(export_dir / "model.onnx")), str(src / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    shutil.copy(export_dir / "export.json", src / "export.json")
    with pytest.raises(MirrorfastError, match="model.onnx cannot be cut down to sentence_embedding"):
        write_triton_repo(src, tmp_path / "repo", outputs=("sentence_embedding",))
    assert not (tmp_path / "repo" / "external").exists()
    assert write_triton_repo(src, tmp_path / "repo").is_dir()  # all outputs: served whole, data file copied

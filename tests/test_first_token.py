"""The first-token branch of cls-pooled exports (export/first_token.py): the last layer run for position 0
alone equals the model's own last hidden state at position 0, for every family it is used for and only
those; exports carry it; sessions cut to `sentence_embedding` drop the full last layer."""

import json

import numpy as np
import pytest
import torch
import transformers

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from mirrorfast.export.first_token import FirstTokenLayer, StandaloneFirstTokenLayer  # noqa: E402
from mirrorfast.last_layer import last_bert_layer  # noqa: E402
from mirrorfast.export.runtime import cut_to_outputs, open_session  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=120,
             max_position_embeddings=64)
BERT_SHAPED = {
    "bert": lambda: transformers.BertConfig(**SMALL),
    "bert-1-layer": lambda: transformers.BertConfig(**{**SMALL, "num_hidden_layers": 1}),  # its input: the embeddings
    "roberta": lambda: transformers.RobertaConfig(**SMALL, pad_token_id=1),
    "xlm-roberta": lambda: transformers.XLMRobertaConfig(**SMALL, pad_token_id=1),
    "camembert": lambda: transformers.CamembertConfig(**SMALL, pad_token_id=1),
    "electra": lambda: transformers.ElectraConfig(embedding_size=16, **SMALL),
    "data2vec-text": lambda: transformers.Data2VecTextConfig(**SMALL, pad_token_id=1),
    "ernie": lambda: transformers.ErnieConfig(**SMALL),
}
OTHERS = {  # different layers, some with the same submodule names (RoFormer: rotary attention; XL: pre-norm)
    "roformer": lambda: transformers.RoFormerConfig(**SMALL),
    "xlm-roberta-xl": lambda: transformers.XLMRobertaXLConfig(**SMALL, pad_token_id=1),
    "mpnet": lambda: transformers.MPNetConfig(**SMALL),
    "distilbert": lambda: transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=120),
    "albert": lambda: transformers.AlbertConfig(embedding_size=16, **SMALL),
    "deberta-v2": lambda: transformers.DebertaV2Config(**SMALL),
}


def _padded_batch(seed: int):
    """Right-padded random ids, lengths 1 (only the first token) to 11, in a fresh random order."""
    rng = np.random.default_rng(seed)
    lengths = rng.permutation([1, 2, 5, 11, 7])
    ids = np.full((len(lengths), max(lengths)), 1, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(5, 120, size=n)
        mask[i, :n] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


@pytest.mark.parametrize("branch", [FirstTokenLayer, StandaloneFirstTokenLayer], ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", sorted(BERT_SHAPED))
def test_first_token_layer_equals_the_last_hidden_state_at_position_0(name, branch):
    torch.manual_seed(int.from_bytes(name.encode(), "little") % 2**31)
    model = transformers.AutoModel.from_config(BERT_SHAPED[name]()).double().eval()
    layer = last_bert_layer(model)
    assert layer is model.encoder.layer[-1]
    ids, mask = _padded_batch(seed=len(name))
    with torch.no_grad():
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        got = branch(layer).double()(states.hidden_states[-2], mask)
    # float64 on both sides: any difference beyond rounding is a different computation
    torch.testing.assert_close(got, states.last_hidden_state[:, 0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_other_layers_get_no_branch(name):
    model = transformers.AutoModel.from_config(OTHERS[name]())
    assert last_bert_layer(model) is None


def test_a_decoder_configured_bert_gets_no_branch():
    model = transformers.BertModel(transformers.BertConfig(**SMALL, is_decoder=True))
    assert last_bert_layer(model) is None


# ------------------------------------------------------------------------------------------- exports
def _last_layer(model) -> int:
    import re

    return max(int(m.group(1)) for n in model.graph.node for m in [re.search(r"/layer\.(\d+)/", n.name)] if m)


@pytest.mark.parametrize("file", ["model.onnx", "model_int8.onnx"])
def test_cut_graph_drops_the_full_last_layer_and_keeps_the_embedding(tiny_export, file):
    """The export's whole graph vs the graph cut to sentence_embedding: the cut one has no node of the full
    last layer's query or feed-forward (its key/value products stay: the branch reads them), and gives the
    same embeddings; in the whole graph the branch's embedding is the normalized token state at position 0."""
    manifest = json.loads((tiny_export / "export.json").read_text(encoding="utf-8"))
    assert file in manifest["first_token_last_layer"]
    path = tiny_export / file
    whole = onnx.load(str(path))
    cut = onnx.load_from_string(cut_to_outputs(path, ("sentence_embedding",))[0])  # the graph, weights apart
    last = _last_layer(whole)
    assert [o.name for o in cut.graph.output] == ["sentence_embedding"]
    full_layer = {n.name for n in whole.graph.node if f"/layer.{last}/" in n.name}
    kept = {n.name for n in cut.graph.node if f"/layer.{last}/" in n.name}
    assert kept and kept < full_layer
    assert not any(f"/layer.{last}/{part}/" in name for name in kept for part in ("intermediate", "output"))
    assert any(f"/layer.{last}/attention/self/key/" in name for name in kept)

    rng = np.random.default_rng()
    lengths = [int(n) for n in rng.integers(1, 30, size=6)]
    ids = np.zeros((6, max(lengths)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1000, 29000, size=n)
        mask[i, :n] = 1
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    whole_session = open_session(path, ["CPUExecutionProvider"])
    cut_session = open_session(path, ["CPUExecutionProvider"], outputs=("sentence_embedding",))
    assert [o.name for o in cut_session.get_outputs()] == ["sentence_embedding"]
    sentence, tokens = whole_session.run(["sentence_embedding", "token_embeddings"], feeds)
    np.testing.assert_allclose(cut_session.run(["sentence_embedding"], feeds)[0], sentence, rtol=0, atol=1e-6)
    if file == "model.onnx":  # int8: the two branches quantize their activations separately
        first = tokens[:, 0] / np.linalg.norm(tokens[:, 0], axis=1, keepdims=True)
        np.testing.assert_allclose(sentence, first, rtol=0, atol=1e-5)


@pytest.mark.parametrize("file", ["model.onnx", "model_int8.onnx"])
def test_the_cut_graph_travels_without_its_weights(tiny_export, file):
    """cut_to_outputs serializes the graph alone and hands its weights over as arrays (no second copy for
    onnxruntime to parse): each array equals the file's tensor, its place in the graph points to no file,
    and the small constants that shape inference reads stay in the graph."""
    whole = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(tiny_export / file)).graph.initializer}
    graph_bytes, weights = cut_to_outputs(tiny_export / file, ("sentence_embedding",))
    graph = onnx.load_from_string(graph_bytes).graph
    assert weights and len(graph_bytes) < sum(array.nbytes for array in weights.values()) / 10
    for tensor in graph.initializer:
        if tensor.name in weights:
            assert tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.raw_data
            assert weights[tensor.name].dtype == whole[tensor.name].dtype
            np.testing.assert_array_equal(weights[tensor.name], whole[tensor.name])
        else:
            assert onnx.numpy_helper.to_array(tensor).nbytes < 1024


@pytest.fixture(scope="module")
def tiny_mean_export(tiny_bert_dir, tmp_path_factory):
    import shutil

    from mirrorfast.export.onnx import export_model

    model_dir = tmp_path_factory.mktemp("tiny-mean") / "model"
    shutil.copytree(tiny_bert_dir, model_dir)
    (model_dir / "mirrorfast.json").write_text(json.dumps({"pooling": "mean", "max_length": 32}), encoding="utf-8")
    out = model_dir.parent / "export"
    export_model(model_dir, out)
    return out


def test_mean_pooled_exports_have_no_branch(tiny_mean_export):
    manifest = json.loads((tiny_mean_export / "export.json").read_text(encoding="utf-8"))
    assert manifest["first_token_last_layer"] == []
    nodes = onnx.load(str(tiny_mean_export / "model.onnx")).graph.node
    assert nodes and not any(n.name.startswith("/first_token/") for n in nodes)


def test_cutting_to_outputs_the_graph_has_not_is_an_error(tiny_export):
    from mirrorfast.errors import MirrorfastError

    with pytest.raises(MirrorfastError, match=r"cannot load .*model.onnx: the graph has no output pooled"):
        open_session(tiny_export / "model.onnx", ["CPUExecutionProvider"], outputs=("pooled",))


def test_graphs_with_external_weights_load_whole(tiny_export, tmp_path):
    """Weights in external files: no cut (the graph is loaded from its path, as before), same embeddings."""
    model = onnx.load(str(tiny_export / "model.onnx"))
    onnx.save(model, str(tmp_path / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    assert cut_to_outputs(tmp_path / "model.onnx", ("sentence_embedding",)) is None
    session = open_session(tmp_path / "model.onnx", ["CPUExecutionProvider"], outputs=("sentence_embedding",))
    ids = np.array([[101, 2054, 102]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    expected = open_session(tiny_export / "model.onnx", ["CPUExecutionProvider"]).run(["sentence_embedding"], feeds)[0]
    np.testing.assert_allclose(session.run(["sentence_embedding"], feeds)[0], expected, rtol=0, atol=1e-6)


def test_fp16_file_with_the_standalone_branch(tiny_bert_dir, tmp_path):
    """export_model(fp16_first_token=True): model_fp16.onnx gets the branch (listed in export.json, parity
    passed or the export would have failed); the optimizer still fused every layer's attention, the full
    last layer's included, and the branch's layer norms and GELU; cut to sentence_embedding the graph has
    one fused attention less and no Reshape (the branch splits no heads: no shape arithmetic to run on the
    host); it gives the whole graph's vectors."""
    from collections import Counter

    from mirrorfast.export.onnx import export_model

    result = export_model(tiny_bert_dir, tmp_path / "export", fp16=True, fp16_first_token=True, max_length=48)
    assert result.manifest["first_token_last_layer"] == ["model.onnx", "model_fp16.onnx"]
    fused = result.manifest["fp16"]["fused_operators"]
    assert fused["Attention"] == 2  # both layers of the tiny BERT
    assert not {"LayerNormalization", "Gelu"} & set(fused)  # the branch's too: Skip-LayerNorm, bias + GELU
    path = tmp_path / "export" / "model_fp16.onnx"
    whole = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    cut = Counter(node.op_type for node in onnx.load_from_string(cut_to_outputs(path, ("sentence_embedding",))[0])
                  .graph.node)
    assert (whole["Attention"], cut["Attention"], cut["Reshape"]) == (2, 1, 0)
    ids, mask = (torch.Tensor.numpy(t) for t in _padded_batch(seed=3))
    feeds = {"input_ids": ids + 1000, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    expected = open_session(path, ["CPUExecutionProvider"]).run(["sentence_embedding"], feeds)[0]
    got = open_session(path, ["CPUExecutionProvider"], outputs=("sentence_embedding",)).run(None, feeds)[0]
    np.testing.assert_array_equal(got, expected)


def test_fp32_vectors_do_not_depend_on_the_batch(tiny_export):
    """README's promise for fp32: a text alone and inside a padded batch of others gives the same bits, also
    through the branch (whose attention has one query row: see FirstTokenLayer for why it multiplies two)."""
    from mirrorfast.export.runtime import pad_right

    session = open_session(tiny_export / "model.onnx", ["CPUExecutionProvider"], outputs=("sentence_embedding",))
    rng = np.random.default_rng()

    def run(batch):
        ids, mask = pad_right(batch, 0)
        return session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask,
                                                    "token_type_ids": np.zeros_like(ids)})[0]

    for _ in range(8):  # one batch of a single-row product differs with ~60 % chance, so several
        rows = [list(rng.integers(1000, 29000, size=int(n))) for n in rng.integers(2, 48, size=12)]
        np.testing.assert_array_equal(run(rows), np.concatenate([run([row]) for row in rows]))


def test_onnx_encoder_cuts_the_files_with_the_branch_only(tiny_export, tiny_mean_export):
    from mirrorfast.export import OnnxEncoder

    for int8 in (False, True):
        encoder = OnnxEncoder(tiny_export, provider="cpu", int8=int8)
        assert [o.name for o in encoder.session.get_outputs()] == ["sentence_embedding"]
    whole = OnnxEncoder(tiny_mean_export, provider="cpu")  # no branch: nothing to gain from a cut
    assert [o.name for o in whole.session.get_outputs()] == ["sentence_embedding", "token_embeddings"]

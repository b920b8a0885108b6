"""`mirrorfast eval` on a model directory and on its ONNX export: same pairs, same scores."""

import json
import random

import pytest

from mirrorfast.cli import main
from mirrorfast.errors import MirrorfastError

WORDS = "cat dog tree river music train bread rain city car book song road light water stone".split()


@pytest.fixture
def eval_files(tmp_path):
    rng = random.Random(5)
    sts, words = tmp_path / "sts.csv", tmp_path / "words.tsv"
    sts.write_text("".join(
        f'"{" ".join(rng.sample(WORDS, 5))}","{" ".join(rng.sample(WORDS, 4))}",{rng.uniform(0, 5):.2f}\n'
        for _ in range(30)), encoding="utf-8")
    words.write_text("word1\tword2\tscore\n" + "".join(
        f"{rng.choice(WORDS)}\t{rng.choice(WORDS)}\t{rng.uniform(0, 10):.2f}\n" for _ in range(30)), encoding="utf-8")
    return sts, words


def eval_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_export_dir_scores_like_the_model(tiny_bert_dir, eval_files, tmp_path, capsys):
    sts, words = eval_files
    exported = tmp_path / "exported"
    assert main(["export", str(tiny_bert_dir), str(exported)]) == 0
    torch_result = eval_json(capsys, tiny_bert_dir, "--sts", sts, "--words", words)
    onnx_result = eval_json(capsys, exported, "--sts", sts, "--words", words)
    assert torch_result["pooling"] == onnx_result["pooling"] == "cls"
    assert [r["kind"] for r in onnx_result["results"]] == ["sts", "words"]
    for a, b in zip(torch_result["results"], onnx_result["results"]):
        assert a["pairs"] == b["pairs"] == 30
        assert abs(a["spearman"] - b["spearman"]) < 0.05

    # The pooling of an export lives in its graph: it cannot be overridden.
    assert main(["eval", str(exported), "--sts", str(sts), "--pooling", "mean"]) == 2
    assert "pooling is inside the graph" in capsys.readouterr().err


def test_eval_errors(tiny_bert_dir, eval_files, tmp_path, capsys):
    sts, _ = eval_files
    bad = tmp_path / "bad.csv"
    bad.write_text("only,two\n")
    constant, nan, header = tmp_path / "constant.csv", tmp_path / "nan.csv", tmp_path / "header.csv"
    header.write_text("sentence1,sentence2,score\na cat,a dog,3\nthe sky,the sea,1\n")
    constant.write_text("a cat,a dog,3\nthe sky,the sea,3.0\n")
    nan.write_text("a cat,a dog,3\nthe sky,the sea,nan\n")
    comma, extra = tmp_path / "comma.csv", tmp_path / "extra.tsv"
    # an unquoted comma: 4 fields
    comma.write_text("a cat,a dog,3\na cat sits,The total is 1,000,4.0\nthe sky,the sea,1\n")
    extra.write_text("word1\tword2\tscore\tpos\nold\tnew\t1.5\tA\n")
    for args, message in [
        ([tiny_bert_dir, "--sts", comma], "line 2 has 4 fields, expected exactly 3: text1,text2,score (quote"),
        ([tiny_bert_dir, "--words", extra], "line 2 has 4 fields, expected exactly 3: word1<TAB>word2<TAB>score"),
        ([tiny_bert_dir], "give at least one"),
        ([tiny_bert_dir, "--sts", tmp_path / "missing.csv"], "not found"),
        ([tiny_bert_dir, "--sts", bad], "line 1 has 2 fields"),
        ([tmp_path / "nomodel", "--sts", sts], "model directory"),
        ([bad, "--sts", sts], "is a file, not a model or export directory"),
        ([tiny_bert_dir, "--sts", constant], "all 2 scores are 3: a rank correlation with them is undefined"),
        ([tiny_bert_dir, "--sts", nan], "line 2: score 'nan' is not a finite number"),
        ([tiny_bert_dir, "--sts", header], "line 1: score 'score' is not a number (a header line? STS files have"),
    ]:
        assert main(["eval", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)


def test_eval_int8_scores_the_int8_model(tiny_export, eval_files, capsys):
    """--int8 evaluates model_int8.onnx (named in the result), as OnnxEncoder(int8=True) scores it."""
    from mirrorfast.evaluate import evaluate, read_sts
    from mirrorfast.export.runtime import OnnxEncoder

    sts, _ = eval_files
    result = eval_json(capsys, tiny_export, "--sts", sts, "--int8")
    assert result["model"].endswith("(model_int8.onnx)")
    direct = evaluate(OnnxEncoder(tiny_export, provider="cpu", int8=True), [read_sts(sts)])
    assert result["results"][0]["spearman"] == direct[0]["spearman"]
    fp32 = eval_json(capsys, tiny_export, "--sts", sts)
    assert not fp32["model"].endswith(")")


def test_eval_batch_size_reaches_the_encoder(tiny_export, eval_files):
    from mirrorfast.evaluate import evaluate, read_sts
    from mirrorfast.export.runtime import OnnxEncoder

    class Recording:  # the real encoder, with its calls' batch sizes written down
        def __init__(self, encoder):
            self.encoder, self.batch_sizes = encoder, []

        def encode(self, texts, batch_size=64):
            self.batch_sizes.append(batch_size)
            return self.encoder.encode(texts, batch_size=batch_size)

    sts, _ = eval_files
    recording = Recording(OnnxEncoder(tiny_export, provider="cpu"))
    evaluate(recording, [read_sts(sts)], batch_size=7)
    assert recording.batch_sizes == [7]


def test_cli_eval_passes_its_batch_size(tiny_export, eval_files, capsys, monkeypatch):
    import mirrorfast.evaluate as evaluate_module

    seen, spearman = [], evaluate_module.spearman
    monkeypatch.setattr(evaluate_module, "spearman",
                        lambda encoder, pairs, batch_size=128: seen.append(batch_size) or spearman(encoder, pairs, batch_size))
    sts, _ = eval_files
    eval_json(capsys, tiny_export, "--sts", sts, "--batch-size", "5")
    assert seen == [5]


def test_eval_int8_and_batch_size_errors(tiny_bert_dir, eval_files, capsys):
    sts, _ = eval_files
    for args, message in [
        ([tiny_bert_dir, "--sts", sts, "--int8"], "--int8 needs an export directory"),
        ([tiny_bert_dir, "--sts", sts, "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ]:
        assert main(["eval", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the errors of a machine without a GPU")
def test_eval_device(tiny_bert_dir, tiny_export, eval_files, capsys):
    """--device cpu scores as the default does here; --device cuda without a GPU is one clear error, for a
    model directory (PyTorch) and for an export (onnxruntime's CUDA provider)."""
    sts, _ = eval_files
    assert eval_json(capsys, tiny_bert_dir, "--sts", sts, "--device", "cpu") == eval_json(capsys, tiny_bert_dir, "--sts", sts)
    for model, message in ((tiny_bert_dir, "no CUDA GPU is available"), (tiny_export, "needs onnxruntime-gpu")):
        assert main(["eval", str(model), "--sts", str(sts), "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_a_collapsed_model_scores_null_not_nan(tiny_bert_dir, eval_files, capsys, monkeypatch):
    """An encoder that gives every pair the same cosine has no Spearman: JSON null (NaN is not JSON), 'n/a'
    in the table, and no scipy warning on stderr."""
    import numpy as np

    from mirrorfast.model import Encoder

    monkeypatch.setattr(Encoder, "encode", lambda self, texts, batch_size=128: np.ones((len(texts), 4), np.float32))
    sts, words = eval_files
    result = eval_json(capsys, tiny_bert_dir, "--sts", sts)
    assert result["results"][0]["spearman"] is None
    assert main(["eval", str(tiny_bert_dir), "--sts", str(sts), "--words", str(words)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("n/a (the model's cosines are all equal, or not finite)") == 2 and "Warning" not in captured.err


def test_spearman_of_a_hand_built_pair_set_needs_two_pairs():
    from pathlib import Path

    import numpy as np

    from mirrorfast.errors import MirrorfastError
    from mirrorfast.evaluate import PairSet, spearman

    one = PairSet(Path("mine"), "sts", ["a"], ["b"], np.array([1.0]))
    with pytest.raises(MirrorfastError, match="mine: a Spearman correlation needs at least 2 pairs, got 1"):
        spearman(None, one)  # refused before any encoding


def test_word_files_with_and_without_a_header(tmp_path):
    """The documented header line is skipped; a file without one keeps its first pair (it was dropped)."""
    from mirrorfast.evaluate import read_words

    pairs = "old\tnew\t1.58\nsmart\tintelligent\t9.2\nhard\tdifficult\t8.77\n"
    for name, text, first_line in [("header.tsv", "word1\tword2\tSimLex999\n" + pairs, 2),
                                   ("plain.tsv", pairs, 1)]:
        (tmp_path / name).write_text(text)
        got = read_words(tmp_path / name)
        assert got.left == ["old", "smart", "hard"] and got.right == ["new", "intelligent", "difficult"], name
        assert list(got.scores) == [1.58, 9.2, 8.77], name
    (tmp_path / "bad.tsv").write_text("word1\tword2\tscore\nold\tnew\n")
    with pytest.raises(MirrorfastError, match="line 2 has 2 fields"):
        read_words(tmp_path / "bad.tsv")


@pytest.fixture
def st_model_dir(tiny_bert_dir, tmp_path):
    """The tiny BERT laid out as sentence-transformers writes a model: mean pooling, max_seq_length 16."""
    import shutil

    path = tmp_path / "st-model"
    shutil.copytree(tiny_bert_dir, path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
    return path


def test_a_sentence_transformers_model_is_scored_with_a_note_and_can_be_as_published(st_model_dir, eval_files,
                                                                                      capsys):
    """mirrorfast's defaults (cls, the tokenizer's max length) are not what the model declares: say so, and
    --pooling / --max-length give the published behaviour (no note then)."""
    sts, _ = eval_files
    default = eval_json(capsys, st_model_dir, "--sts", sts)
    assert default["pooling"] == "cls"
    main(["eval", str(st_model_dir), "--sts", str(sts)])
    assert ("is a sentence-transformers model with mean pooling and max_seq_length 16; this run uses cls pooling "
            "and max length 128 (--pooling mean --max-length 16 for the model as published)") in capsys.readouterr().err
    assert main(["eval", str(st_model_dir), "--sts", str(sts), "--pooling", "mean", "--max-length", "16"]) == 0
    captured = capsys.readouterr()
    assert "sentence-transformers model" not in captured.err and "(pooling: mean)" in captured.out
    # Broken or partial layouts: no note, no error.
    (st_model_dir / "1_Pooling" / "config.json").write_text("{not json")
    (st_model_dir / "sentence_bert_config.json").unlink()
    assert main(["eval", str(st_model_dir), "--sts", str(sts)]) == 0
    assert "sentence-transformers model" not in capsys.readouterr().err


@pytest.mark.parametrize("pooling_config, declared, ending", [
    ({"embedding_dimension": 32, "pooling_mode": "mean", "include_prompt": True}, "mean",
     " (--pooling mean for the model as published)"),
    ({"embedding_dimension": 32, "pooling_mode": ["mean"]}, "mean", " (--pooling mean for the model as published)"),
    ({"word_embedding_dimension": 32}, "mean", " (--pooling mean for the model as published)"),  # its default
    ({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": 1}, "mean", " (--pooling mean for the model"),
    ({"embedding_dimension": 32, "pooling_mode": "max"}, "max", "; mirrorfast has no max pooling"),
    ({"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_max_tokens": True},
     "cls+max", "; mirrorfast has no cls+max pooling"),
])
def test_the_note_reads_every_sentence_transformers_pooling_format(st_model_dir, eval_files, capsys,
                                                                   pooling_config, declared, ending):
    """sentence-transformers 6 saves {"pooling_mode": "mean"} (a model re-saved by it was read as declaring
    nothing: cls, silently); a mode mirrorfast does not have is named too."""
    (st_model_dir / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    assert main(["eval", str(st_model_dir), "--sts", str(eval_files[0]), "--max-length", "16"]) == 0
    assert (f"is a sentence-transformers model with {declared} pooling; this run uses cls pooling{ending}"
            in capsys.readouterr().err)


def test_a_model_re_saved_by_sentence_transformers_keeps_its_note(tiny_bert_dir, eval_files, tmp_path, capsys):
    """The format this sentence-transformers writes, whatever its version: a mean-pooled mirrorfast output
    saved again by SentenceTransformer.save (no mirrorfast.json) is noted as mean-pooled."""
    st = pytest.importorskip("sentence_transformers")
    from mirrorfast.model import load_encoder, save_encoder

    encoder = load_encoder(tiny_bert_dir, pooling="mean", max_length=16)
    save_encoder(encoder, tmp_path / "ours", {})
    st.SentenceTransformer(str(tmp_path / "ours"), device="cpu").save(str(tmp_path / "resaved"))
    assert main(["eval", str(tmp_path / "resaved"), "--sts", str(eval_files[0]), "--max-length", "16"]) == 0
    assert "with mean pooling; this run uses cls pooling (--pooling mean" in capsys.readouterr().err


def test_export_takes_pooling_and_notes_a_sentence_transformers_model(st_model_dir, eval_files, tmp_path, capsys):
    assert main(["export", str(st_model_dir), str(tmp_path / "cls")]) == 0
    assert "is a sentence-transformers model with mean pooling" in capsys.readouterr().err
    assert main(["export", str(st_model_dir), str(tmp_path / "mean"), "--pooling", "mean", "--max-length", "16"]) == 0
    assert "sentence-transformers model" not in capsys.readouterr().err
    manifest = json.loads((tmp_path / "mean" / "export.json").read_text())
    assert (manifest["pooling"], manifest["max_length"]) == ("mean", 16)
    assert main(["eval", str(tmp_path / "mean"), "--sts", str(eval_files[0]), "--max-length", "8"]) == 2
    assert "--max-length cannot change an ONNX export" in capsys.readouterr().err


def test_readers_take_stray_carriage_returns_blank_leading_lines_and_nan_first_lines(tmp_path):
    """csv raised its own error (no line, a traceback in the CLI) on a carriage return inside a line; a word
    file starting with a blank line had its header read as a pair; a headerless first line scored nan was
    taken for a header and dropped."""
    from mirrorfast.evaluate import read_sts, read_words

    (tmp_path / "cr.csv").write_text("a b,c d,1\nx\ry,z,2\nfoo,bar,3\n", newline="")
    with pytest.raises(MirrorfastError, match="line 2 has 1 field, expected exactly 3"):
        read_sts(tmp_path / "cr.csv")
    (tmp_path / "mac.csv").write_text("a b,c d,1\rx y,z,2\rfoo,bar,3\r", newline="")  # old Mac line ends
    assert list(read_sts(tmp_path / "mac.csv").scores) == [1, 2, 3]
    (tmp_path / "blank.tsv").write_text("\nword1\tword2\tscore\nold\tnew\t1.5\nsmart\tbright\t9\n")
    assert read_words(tmp_path / "blank.tsv").left == ["old", "smart"]
    (tmp_path / "nan.tsv").write_text("cat\tdog\tnan\nold\tnew\t1.5\nsmart\tbright\t9\n")
    with pytest.raises(MirrorfastError, match="line 1: score 'nan' is not a finite number"):
        read_words(tmp_path / "nan.tsv")


def test_evaluate_functions_refuse_what_they_cannot_score(tmp_path):
    from pathlib import Path

    import numpy as np

    from mirrorfast.evaluate import PairSet, evaluate, read_sts, spearman

    with pytest.raises(MirrorfastError, match="an STS file must be a path"):
        read_sts(None)
    pairs = PairSet(Path("x"), "words", ["a", "b", "c"], ["d", "e"], np.array([1.0, 2.0, 3.0]))
    with pytest.raises(MirrorfastError, match="3 left texts, 2 right texts and 3 scores"):
        spearman(None, pairs)
    with pytest.raises(MirrorfastError, match="evaluate takes a list of PairSets"):
        evaluate(None, pairs)
    with pytest.raises(MirrorfastError, match="pairs must be a PairSet"):
        evaluate(None, ["x.csv"])

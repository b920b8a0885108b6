"""`OnnxEncoder` and `mirrorfast encode` (export/runtime.py): real sessions on the CPU EP, real tokenizers."""

import io
import json
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mirrorfast.errors import MirrorfastError

ort = pytest.importorskip("onnxruntime")

from mirrorfast.export import OnnxEncoder, export_model, is_export_dir  # noqa: E402
from mirrorfast.model import load_encoder  # noqa: E402

SENTENCES = [
    "A man is playing a guitar.",
    "Ünïcödé – naïve café, 日本語のテキスト, Привет мир 🙂",
    "x",
    "",
    "Two dogs run through a snowy field while their owner watches from the porch.",
    "What time is it?",
    "The stock market fell sharply on Monday after the central bank raised interest rates again. " * 12,
    "A woman slices an onion.",
    "¿Dónde está la biblioteca?",
    "The quick brown fox jumps over the lazy dog " * 3,
]
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


def _cos(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def tiny_onnx(tiny_export):
    return OnnxEncoder(tiny_export, provider="cpu")


@pytest.fixture(scope="module")
def tiny_torch(tiny_bert_dir):
    return load_encoder(tiny_bert_dir, max_length=48).eval()


# ---------------------------------------------------------------------------------------- loading
def test_public_attributes(tiny_onnx, tiny_export):
    e = tiny_onnx
    assert e.provider == "cpu" and e.model_path == tiny_export / "model.onnx" and isinstance(e.model_path, Path)
    assert e.name == "tiny-export" and e.dim == 32 and e.max_length == 48 and e.normalized is True
    assert isinstance(e.max_length, int) and isinstance(e.dim, int) and isinstance(e.name, str)
    assert e.tokenizer("hello")["input_ids"][0] == e.tokenizer.cls_token_id
    assert "model.onnx" in repr(e)


def test_int8_file_chosen_on_request(tiny_export):
    e = OnnxEncoder(tiny_export, provider="auto", int8=True)
    assert e.provider == "cpu" and e.model_path.name == "model_int8.onnx"


def test_is_export_dir(tiny_export, tiny_bert_dir, tmp_path):
    assert is_export_dir(tiny_export)
    assert not is_export_dir(tiny_bert_dir) and not is_export_dir(tmp_path / "missing")
    (tmp_path / "export.json").write_text("{not json")
    assert not is_export_dir(tmp_path)


def test_loading_errors(tiny_export, tiny_bert_dir, tmp_path):
    with pytest.raises(MirrorfastError, match="is a model directory, not an export: run `mirrorfast export "):
        OnnxEncoder(tiny_bert_dir)  # a trained model: the error says how to get an export
    with pytest.raises(MirrorfastError, match="not an export directory"):
        OnnxEncoder(tmp_path)
    with pytest.raises(MirrorfastError, match="not found"):
        OnnxEncoder(tmp_path / "missing")
    with pytest.raises(MirrorfastError, match="provider must be one of"):
        OnnxEncoder(tiny_export, provider="tpu")
    with pytest.raises(MirrorfastError, match="CPU only"):
        OnnxEncoder(tiny_export, provider="cuda", int8=True)
    for args, message in [((None,), "path must be a path \\(str or os.PathLike\\), got None"),  # os.fspath's TypeError
                          ((123,), "path must be a path"),
                          ((tiny_export, "cpu", "no"), "int8 must be True or False, got 'no'"),  # "no" is truthy
                          ((tiny_export, "cpu", False, 1), "io_binding must be True or False, got 1")]:
        with pytest.raises(MirrorfastError, match=message):
            OnnxEncoder(*args)


def test_a_damaged_export_is_one_clear_error(tiny_export, tmp_path):
    """A missing tokenizer.json gave vectors of [UNK]s (transformers builds an empty tokenizer); a dim in
    export.json that is not the graph's gave a numpy shape error at the first encode."""
    no_tokenizer, wrong_dim = tmp_path / "no-tokenizer", tmp_path / "wrong-dim"
    shutil.copytree(tiny_export, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(MirrorfastError, match="no vocabulary beyond its 5 special tokens: its files"):
        OnnxEncoder(no_tokenizer, provider="cpu")
    shutil.copytree(tiny_export, wrong_dim)
    manifest = json.loads((wrong_dim / "export.json").read_text())
    (wrong_dim / "export.json").write_text(json.dumps({**manifest, "dim": manifest["dim"] * 2}))
    with pytest.raises(MirrorfastError, match=f"gives {manifest['dim']}-dimensional sentence_embeddings where "
                                              f"export.json says {manifest['dim'] * 2}: the export directory is"):
        OnnxEncoder(wrong_dim, provider="cpu")


@pytest.mark.skipif(HAS_CUDA_EP, reason="this onnxruntime has the CUDA EP")
def test_cuda_provider_without_cuda_ep(tiny_export):
    with pytest.raises(MirrorfastError, match="provider 'cuda' needs onnxruntime-gpu"):
        OnnxEncoder(tiny_export, provider="cuda")


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available")
def test_auto_does_not_hide_a_broken_gpu_file(tiny_export, tmp_path, monkeypatch):
    """provider="auto" with the CUDA EP listed: a GPU file that does not load was swallowed and the fp32 file
    served on the CPU, with nothing said. A CUDA EP that finds no GPU (here: not really there, so onnxruntime
    runs the CPU EP) still falls back, to the fp32 file, and says so in .provider."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    export = tmp_path / "with-fp16"
    shutil.copytree(tiny_export, export)
    manifest = json.loads((export / "export.json").read_text())
    manifest["models"]["fp16"] = "model_fp16.onnx"
    (export / "export.json").write_text(json.dumps(manifest))
    shutil.copy(export / "model.onnx", export / "model_fp16.onnx")  # stands in for a GPU file that loads
    e = OnnxEncoder(export, provider="auto")
    assert e.provider == "cpu" and e.model_path.name == "model.onnx"
    (export / "model_fp16.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(MirrorfastError, match="model_fp16.onnx"):
        OnnxEncoder(export, provider="auto")


def test_int8_asked_but_not_exported(tiny_bert_dir, tmp_path):
    export_model(tiny_bert_dir, tmp_path / "fp32-only", max_length=16)
    with pytest.raises(MirrorfastError, match="no int8 model: export it with --int8"):
        OnnxEncoder(tmp_path / "fp32-only", int8=True)


def test_import_is_light_and_missing_onnxruntime_is_a_clear_error(tiny_export):
    code = (
        "import sys\n"
        "import mirrorfast.export\n"
        "assert 'onnxruntime' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n"
        "sys.modules['onnxruntime'] = None  # as if it were not installed\n"
        "from mirrorfast.errors import MirrorfastError\n"
        "try:\n"
        f"    mirrorfast.export.OnnxEncoder({str(tiny_export)!r})\n"
        "except MirrorfastError as exc:\n"
        "    print(exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "onnxruntime is not installed: pip install 'mirrorfast[cpu]'" in run.stdout


# --------------------------------------------------------------------------------------- encoding
def test_encode_matches_pytorch(tiny_onnx, tiny_torch):
    got = tiny_onnx.encode(SENTENCES)
    ref = tiny_torch.encode(SENTENCES, normalize=True)
    assert got.dtype == np.float32 and got.shape == (len(SENTENCES), 32)
    assert _cos(got, ref).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_int8_encode_matches_pytorch(tiny_export, tiny_torch):
    got = OnnxEncoder(tiny_export, int8=True).encode(SENTENCES, batch_size=4)
    assert _cos(got, tiny_torch.encode(SENTENCES, normalize=True)).min() >= 0.99


def test_io_binding_path_gives_the_same_vectors(tiny_export, tiny_onnx):
    """The I/O-binding route (the CUDA default) run on the CPU provider: same vectors, in input order."""
    assert tiny_onnx.io_binding is False  # the CPU default
    bound = OnnxEncoder(tiny_export, provider="cpu", io_binding=True)
    assert bound.io_binding and "io_binding=True" in repr(bound)
    texts = SENTENCES[::-1] + ["x"]
    for batch_size in (1, 3, 64):
        np.testing.assert_allclose(bound.encode(texts, batch_size=batch_size), tiny_onnx.encode(texts), atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_output_order_is_input_order(tiny_onnx, batch_size):
    """Texts of shuffled lengths come back in input order, whatever the batching."""
    rng = random.Random(batch_size)
    texts = [" ".join(rng.choice(["cat", "dog", "über", "天気", "runs", "fast"]) for _ in range(rng.randint(0, 60)))
             for _ in range(41)]
    one_by_one = np.stack([tiny_onnx.encode([t])[0] for t in texts])
    together = tiny_onnx.encode(texts, batch_size=batch_size)
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    shuffled = list(range(len(texts)))
    rng.shuffle(shuffled)
    np.testing.assert_allclose(tiny_onnx.encode([texts[i] for i in shuffled], batch_size=batch_size),
                               one_by_one[shuffled], atol=1e-5)


@pytest.mark.parametrize("which", ["onnx", "torch"])
def test_encode_edge_cases(tiny_onnx, tiny_torch, which):
    """OnnxEncoder.encode and the PyTorch Encoder.encode take the same inputs and refuse the same mistakes
    (a single string would otherwise be encoded character by character; batch size -1 gave zeros)."""
    encoder = tiny_onnx if which == "onnx" else tiny_torch
    assert encoder.encode([]).shape == (0, 32) and encoder.encode([]).dtype == np.float32
    long = encoder.encode(["word " * 500])  # truncated to max_length, no error
    assert long.shape == (1, 32) and np.isfinite(long).all()
    texts = ["first text", "second one", "third"]
    expected = encoder.encode(texts, batch_size=2)
    for same in (tuple(texts), (t for t in texts), np.array(texts)):
        np.testing.assert_array_equal(encoder.encode(same, batch_size=np.int64(2)), expected)
    for bad, message in [("a single string", "not a single string"), (None, "list of texts, got NoneType None"),
                         (5, "list of texts, got int 5"), (["ok", 3], "text 1 is of type int, not a string"),
                         (["ok", b"bytes"], "text 1 is of type bytes"),
                         (["ok", "ab\udc80"], r"text 1 is not valid Unicode \(unpaired surrogate at character 2\)")]:
        with pytest.raises(MirrorfastError, match=message):
            encoder.encode(bad)
    for batch_size in (0, -1, 1.5, True):
        with pytest.raises(MirrorfastError, match="batch size must be a positive integer"):
            encoder.encode(["ok"], batch_size=batch_size)


def test_encode_ids_refuses_rows_the_graph_cannot_take(tiny_onnx):
    good = tiny_onnx.token_ids(["a short text"])
    assert tiny_onnx.encode_ids(good).shape == (1, 32)
    np.testing.assert_array_equal(tiny_onnx.encode_ids(np.array(good)), tiny_onnx.encode_ids(good))  # an array too
    assert tiny_onnx.encode_ids(np.zeros((0, 3), dtype=np.int64)).shape == (0, 32)
    vocab = len(tiny_onnx.tokenizer)
    for rows, message in [([[101] * 49], "must have 1 to 48 ids"), ([good[0], []], "must have 1 to 48 ids"),
                          ([good[0] + [vocab]], f"must be in 0..{vocab - 1}"), ([[-1, 5]], "must be in 0..")]:
        with pytest.raises(MirrorfastError, match=message):
            tiny_onnx.encode_ids(rows)


def test_count_tokens_is_not_truncated(tiny_onnx):
    texts = ["", "hello world", "word " * 200]
    counts = tiny_onnx.count_tokens(texts)
    assert counts == [len(tiny_onnx.tokenizer(t)["input_ids"]) for t in texts]
    assert counts[0] == 2 and counts[2] == 202 > tiny_onnx.max_length
    assert tiny_onnx.count_tokens([]) == []


def test_works_with_evaluate_spearman(tiny_onnx, tiny_torch, tmp_path):
    from mirrorfast.evaluate import read_sts, spearman

    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "A man plays a guitar.,A man is playing a guitar.,4.8\n"
        "A dog runs.,The stock market fell.,0.2\n"
        "A woman slices an onion.,Someone cuts an onion.,4.1\n"
        "Kids play football.,\"A cat sleeps, quietly.\",0.9\n",
        encoding="utf-8",
    )
    pairset = read_sts(pairs)
    assert spearman(tiny_onnx, pairset) == pytest.approx(spearman(tiny_torch, pairset), abs=1e-6)


# ------------------------------------------------------------------------------------ encode (CLI)
def test_cli_encode_writes_the_same_vectors(tiny_export, tiny_onnx, tmp_path, capsys):
    from mirrorfast.cli import main

    lines = ["first line", "", "Ünïcödé 日本語", "   ", "third\r", "last without newline"]
    (tmp_path / "in.txt").write_text("\n".join(lines), encoding="utf-8")
    out = tmp_path / "vectors.npy"
    assert main(["encode", str(tiny_export), "--input", str(tmp_path / "in.txt"), "--output", str(out),
                 "--batch-size", "2", "--provider", "cpu"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert printed.count("\n") == 1 and "encoded 4 texts (2 blank lines skipped)" in printed
    assert "4/4" in captured.err and "text/s" in captured.err  # the progress bar, on stderr
    vectors = np.load(out)
    assert vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, tiny_onnx.encode(["first line", "Ünïcödé 日本語", "third",
                                                               "last without newline"], batch_size=2))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    from mirrorfast.output import current_umask

    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~current_umask()  # not mkstemp's 0600

    assert main(["encode", str(tiny_export), "--input", str(tmp_path / "in.txt"), "--output", str(out),
                 "--int8", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "model_int8.onnx on cpu" in captured.out and "text/s" not in captured.err


def test_cli_encode_says_how_many_texts_were_cut(tiny_export, tmp_path, capsys):
    """Texts over the export's max length (48 tokens) are cut to it, as the model was exported; encode says
    how many (a text of exactly 48 tokens is not cut), and the cut text's vector is its first 48 tokens'."""
    from transformers import AutoTokenizer

    from mirrorfast.cli import main

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_export))
    words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa " * 10).split()
    exact = next(text for k in range(1, 60) if len(tokenizer(text := " ".join(words[:k]))["input_ids"]) == 48)
    long_text = exact + " " + " ".join(words[:30])
    (tmp_path / "in.txt").write_text(f"short\n{exact}\n{long_text}\n{long_text} more\n", encoding="utf-8")
    out = tmp_path / "v.npy"
    assert main(["encode", str(tiny_export), "--input", str(tmp_path / "in.txt"), "--output", str(out),
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "note: 2 of the 4 texts were longer than the export's max length of 48 tokens and cut to it" in err
    vectors = np.load(out)
    np.testing.assert_array_equal(vectors[2], vectors[1])  # cut to the same 48 tokens as `exact`

    (tmp_path / "short.txt").write_text("short\n", encoding="utf-8")
    assert main(["encode", str(tiny_export), "--input", str(tmp_path / "short.txt"), "--output", str(out),
                 "--no-progress"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_cli_encode_errors(tiny_export, tmp_path, capsys):
    from mirrorfast.cli import main

    good = tmp_path / "in.txt"
    good.write_text("hello\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    cases = [
        (["--input", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "o.npy")], "not found"),
        (["--input", str(tmp_path / "latin1.txt"), "--output", str(tmp_path / "o.npy")], "line 2 is not valid UTF-8"),
        (["--input", str(tmp_path / "blank.txt"), "--output", str(tmp_path / "o.npy")], "no non-blank lines"),
        (["--input", str(good), "--output", str(tmp_path / "o.txt")], "must end in .npy"),
        (["--input", str(good), "--output", f"{tmp_path / 'o.npy'}/"], "names a directory"),
        (["--input", str(good), "--output", str(tmp_path / "in.txt" / "o.npy")], "in.txt is not a directory"),
        (["--input", str(good), "--output", str(tmp_path / "o.npy"), "--batch-size", "0"], "batch size"),
    ]
    for args, message in cases:
        assert main(["encode", str(tiny_export), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("mirrorfast encode: error:") and message in err and err.count("\n") == 1, err
    assert main(["encode", str(tmp_path), "--input", str(good), "--output", str(tmp_path / "o.npy")]) == 2
    assert "not an export directory" in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


def test_cli_encode_streams_a_file_larger_than_its_chunk(tiny_export, tiny_onnx, tmp_path, monkeypatch, capsys):
    """A file of many chunks: every call sees at most ENCODE_CHUNK texts, the vectors still come out in
    file order, exactly as one encode() of all the texts."""
    from mirrorfast.cli import main
    from mirrorfast.export import file_encoding, runtime

    rng = random.Random()
    texts = [" ".join(rng.choice(["alpha", "beta", "gamma", "Ünï", "日本"]) for _ in range(rng.randint(1, 30)))
             for _ in range(rng.randint(11, 17))]
    lines = [t for text in texts for t in ([text, ""] if rng.random() < 0.3 else [text])]
    (tmp_path / "in.txt").write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    monkeypatch.setattr(file_encoding, "ENCODE_CHUNK", 4)
    calls = []
    encode_by_length = runtime.OnnxEncoder._encode_by_length
    monkeypatch.setattr(runtime.OnnxEncoder, "_encode_by_length",
                        lambda self, chunk, *args: calls.append(len(chunk)) or encode_by_length(self, chunk, *args))
    out = tmp_path / "vectors.npy"
    assert main(["encode", str(tiny_export), "--input", str(tmp_path / "in.txt"), "--output", str(out),
                 "--batch-size", "3", "--provider", "cpu"]) == 0
    blanks = len(lines) - len(texts)  # 0, 1 or more: "1 blank line", else "lines"
    skipped = f"{blanks} blank line{'' if blanks == 1 else 's'} skipped"
    assert f"encoded {len(texts)} texts ({skipped})" in capsys.readouterr().out
    assert max(calls) == 4 and sum(calls) == len(texts)
    np.testing.assert_array_equal(np.load(out), tiny_onnx.encode(texts, batch_size=3))
    saved = io.BytesIO()
    np.save(saved, np.load(out))
    assert out.read_bytes() == saved.getvalue()  # byte for byte what np.save writes: any .npy reader takes it


@pytest.mark.parametrize("failure", ["encoding", "disk full", "input changed"])
def test_cli_encode_failing_midway_leaves_the_old_output(tiny_export, tmp_path, monkeypatch, capsys, failure):
    from mirrorfast.cli import main
    from mirrorfast.export import file_encoding, runtime

    (tmp_path / "in.txt").write_text("".join(f"text number {i}\n" for i in range(10)), encoding="utf-8")
    out = tmp_path / "vectors.npy"
    np.save(out, np.arange(3.0))
    monkeypatch.setattr(file_encoding, "ENCODE_CHUNK", 4)
    if failure == "encoding":
        encode_by_length = runtime.OnnxEncoder._encode_by_length
        chunks = iter(range(100))

        def fail_second(self, chunk, *args):
            if next(chunks) == 1:
                raise MirrorfastError("the model failed")
            return encode_by_length(self, chunk, *args)

        monkeypatch.setattr(runtime.OnnxEncoder, "_encode_by_length", fail_second)
        message = "the model failed"
    elif failure == "disk full":
        fdopen = runtime.os.fdopen

        class Full:
            def __init__(self, handle):
                self.handle, self.writes = handle, 0

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.handle.close()

            def write(self, data):
                self.writes += 1
                if self.writes > 2:  # the header, one block, then the disk is full
                    raise OSError(28, "No space left on device")
                return self.handle.write(data)

        monkeypatch.setattr(runtime.os, "fdopen", lambda fd, mode: Full(fdopen(fd, mode)))
        message = "No space left on device"
    else:
        monkeypatch.setattr(file_encoding, "_non_blank", lambda path: iter(["only", "three", "lines"]))
        message = "10 rows were due"
    assert main(["encode", str(tiny_export), "--input", str(tmp_path / "in.txt"), "--output", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mirrorfast encode: error:") and message in err and err.count("\n") == 1, err
    np.testing.assert_array_equal(np.load(out), np.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "vectors.npy"]


def test_cli_encode_refuses_a_cr_only_file(tiny_export, tmp_path, capsys):
    """Lines end at \\n: a file whose lines end in CR alone (old Mac) was one text, one row, exit 0."""
    from mirrorfast.cli import main

    for content in (b"first text\rsecond text\rthird text\r", b"x\na\rb\rc"):  # ... also with one \n, none at the end
        (tmp_path / "mac.txt").write_bytes(content)
        assert main(["encode", str(tiny_export), "--input", str(tmp_path / "mac.txt"), "--output",
                     str(tmp_path / "v.npy"), "--no-progress"]) == 2
        assert "lines end in a carriage return alone" in capsys.readouterr().err and not (tmp_path / "v.npy").exists()
    (tmp_path / "mac.txt").write_bytes(b"x\na\rb\rc\nd\n")  # CRs inside lines that end in \n: text
    assert main(["encode", str(tiny_export), "--input", str(tmp_path / "mac.txt"), "--output",
                 str(tmp_path / "v.npy"), "--no-progress"]) == 0
    assert np.load(tmp_path / "v.npy").shape[0] == 3


def test_cli_encode_creates_missing_parents_and_removes_them_on_failure(tiny_export, tmp_path, monkeypatch):
    """As train and export do: a new folder for the output is created when it is written, and a failed
    encode leaves no folder behind."""
    from mirrorfast.cli import main
    from mirrorfast.export import runtime

    (tmp_path / "in.txt").write_text("one\ntwo\n", encoding="utf-8")
    out = tmp_path / "new" / "deeper" / "vectors.npy"
    assert main(["encode", str(tiny_export), "--input", str(tmp_path / "in.txt"), "--output", str(out),
                 "--no-progress"]) == 0
    assert np.load(out).shape[0] == 2

    def fail(self, chunk, *args):
        raise MirrorfastError("the model failed")

    monkeypatch.setattr(runtime.OnnxEncoder, "_encode_by_length", fail)
    failed = tmp_path / "other" / "deeper" / "vectors.npy"
    assert main(["encode", str(tiny_export), "--input", str(tmp_path / "in.txt"), "--output", str(failed),
                 "--no-progress"]) == 2
    assert not (tmp_path / "other").exists()
    # An output that is a dangling symlink: the link is replaced; nothing is created where it pointed.
    monkeypatch.undo()
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "v.npy"
    link.symlink_to(tmp_path / "nowhere" / "deep" / "v.npy")
    assert main(["encode", str(tiny_export), "--input", str(tmp_path / "in.txt"), "--output", str(link),
                 "--no-progress"]) == 0
    assert not link.is_symlink() and np.load(link).shape[0] == 2 and not (tmp_path / "nowhere").exists()


def test_iter_lines_splits_as_the_whole_file_reader(tmp_path):
    """Streamed lines equal read_utf8's text split on \\n (a final newline ends the last line, one \\r
    before \\n dropped), and an invalid byte is reported at the same line."""
    from mirrorfast.textfile import iter_lines, read_utf8

    rng = random.Random()
    for _ in range(300):
        pieces = [rng.choice(["a", "é", " ", "\r", "\n", "\r\n", "日", "\u2028", "\t"]) for _ in range(rng.randint(0, 12))]
        data = ("\ufeff" if rng.random() < 0.5 else "") + "".join(pieces)
        path = tmp_path / "f.txt"
        path.write_bytes(data.encode("utf-8"))
        expected = read_utf8(path, "input file").split("\n")
        if expected[-1] == "":
            expected.pop()
        if data.count("\r") - data.count("\r\n") >= 2 and data.count("\n") <= 1:  # CR-only lines: refused
            with pytest.raises(MirrorfastError, match="lines end in a carriage return alone"):
                list(iter_lines(path, "input file"))
            continue
        assert list(iter_lines(path, "input file")) == [e.removesuffix("\r") for e in expected], repr(data)
    for data, lines in ((b"\xef\xbb\xbf", []), (b"\xef\xbb\xbf\n", [""]), (b"", []), (b"\n", [""])):  # edges
        path.write_bytes(data)
        assert list(iter_lines(path, "input file")) == lines, data
    path.write_bytes(b"ok\r\nfine\n\xe9t\xe9\n")
    with pytest.raises(MirrorfastError) as whole:
        read_utf8(path, "input file")
    with pytest.raises(MirrorfastError) as streamed:
        list(iter_lines(path, "input file"))
    assert str(streamed.value) == str(whole.value) and "line 3 is not valid UTF-8 (byte 0xe9)" in str(whole.value)


# -------------------------------------------------------------------------------------- MiniLM (slow)
@pytest.fixture(scope="module")
def minilm_torch(minilm_dir):
    return load_encoder(minilm_dir).eval()


@pytest.fixture(scope="module")
def torch_spearman(minilm_torch, minilm_untrained_spearman):
    """The PyTorch model's STS-B dev score (the shared fixture's; minilm_torch pools as it does: [CLS])."""
    assert minilm_torch.pooling == "cls"
    return minilm_untrained_spearman


@pytest.mark.slow
def test_minilm_all_files_match_pytorch(minilm_export, minilm_torch):
    ref = minilm_torch.encode(SENTENCES, normalize=True)
    onnx_fp32 = OnnxEncoder(minilm_export, provider="cpu")
    assert onnx_fp32.model_path.name == "model.onnx"
    assert _cos(onnx_fp32.encode(SENTENCES, batch_size=3), ref).min() >= 0.9999
    assert _cos(OnnxEncoder(minilm_export, int8=True).encode(SENTENCES), ref).min() >= 0.99
    # the fp16 file through a plain CPU session (OnnxEncoder only picks it for CUDA)
    tok = minilm_torch.tokenizer(SENTENCES, padding=True, truncation=True, max_length=512, return_tensors="np")
    session = ort.InferenceSession(str(minilm_export / "model_fp16.onnx"), providers=["CPUExecutionProvider"])
    fp16 = session.run(["sentence_embedding"], {k: v.astype(np.int64) for k, v in tok.items()})[0]
    assert _cos(fp16, ref).min() >= 0.999


@pytest.mark.slow
def test_minilm_stsb_dev_spearman_fp32(minilm_export, stsb_dev, torch_spearman):
    from mirrorfast.evaluate import spearman

    onnx_score = spearman(OnnxEncoder(minilm_export, provider="cpu"), stsb_dev)
    assert abs(onnx_score - torch_spearman) <= 0.05, (onnx_score, torch_spearman)


@pytest.mark.slow
def test_minilm_stsb_dev_spearman_int8(minilm_export, stsb_dev, torch_spearman):
    from mirrorfast.evaluate import spearman

    int8_score = spearman(OnnxEncoder(minilm_export, int8=True), stsb_dev)
    assert abs(int8_score - torch_spearman) <= 1.0, (int8_score, torch_spearman)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (a directory nobody can add to)")
def test_npy_output_where_nothing_can_be_created_is_refused_before_encoding():
    from mirrorfast.errors import MirrorfastError
    from mirrorfast.export.file_encoding import check_npy_output

    with pytest.raises(MirrorfastError, match="cannot write to /proc"):
        check_npy_output("/proc/vectors.npy")
    with pytest.raises(MirrorfastError, match="cannot create /proc/sub: "):  # it said "cannot write to /proc"
        check_npy_output("/proc/sub/vectors.npy")
    with pytest.raises(MirrorfastError, match="output file .npy has no name before .npy"):
        check_npy_output(".npy")
    with pytest.raises(MirrorfastError, match="output is an empty string"):
        check_npy_output("")


def test_encode_reuses_one_tokenizer_copy(tiny_onnx, monkeypatch):
    # Making a batch encoder copies the tokenizer (~20 ms for BERT's vocabulary, 10x a short encode call):
    # OnnxEncoder makes one when it loads, never per call.
    import mirrorfast.export.runtime as runtime
    import mirrorfast.tokens as tokens

    made = []
    for module in (runtime, tokens):  # the name runtime imported, and the one TokenizedTexts.build calls
        monkeypatch.setattr(module, "batch_encoder", lambda *args: made.append(args))
    tiny_onnx.encode(["one text"])
    tiny_onnx.encode(["two", "texts"])
    assert made == []


def _terminate_when(process: subprocess.Popen, appeared, timeout_s: float = 120.0) -> None:
    """SIGTERM `process` as soon as appeared() is true (it is polled), as a container stop would."""
    import signal
    import time

    deadline = time.monotonic() + timeout_s
    while not appeared():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the job never got to the point the test stops it at"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)


def test_sigterm_mid_encode_leaves_nothing_and_exits_143(tiny_export, tmp_path):
    """A stopped container or a scheduler's kill sends SIGTERM: encode unwinds as on Ctrl-C (its temporary
    .npy is removed), says so in one line and exits 128 + 15. Without a handler, Python dies at once and
    leaves the hidden partial file next to the output."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = random.Random()
    lines = (" ".join(rng.choices(words, k=rng.randint(3, 30))) for _ in range(150_000))
    (tmp_path / "in.txt").write_text("\n".join(lines), encoding="utf-8")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "mirrorfast.cli", "encode", str(tiny_export), "--input", str(tmp_path / "in.txt"),
         "--output", str(out_dir / "v.npy"), "--no-progress", "--provider", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def writing() -> bool:  # the temporary .npy is past its header (not the destination check's empty probe)
        for entry in out_dir.iterdir():
            try:
                if entry.stat().st_size > 4096:
                    return True
            except FileNotFoundError:  # the probe, removed between listing and stat
                pass
        return False

    _terminate_when(process, writing)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1] == "mirrorfast encode: terminated (SIGTERM); no partial output was left", err
    assert "Traceback" not in err and list(out_dir.iterdir()) == []


def test_sigterm_mid_export_leaves_nothing(tiny_bert_dir, tmp_path):
    """export writes into a temporary sibling for its whole run (files, then parity checks): SIGTERM removes it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mirrorfast.cli", "export", str(tiny_bert_dir), str(tmp_path / "exp"), "--int8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _terminate_when(process, lambda: any(p.name.startswith(".exp.tmp-") for p in tmp_path.iterdir()))
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_encoder_goes_to_worker_processes(tiny_export, tmp_path):
    """Pickled (a process pool's argument), an OnnxEncoder loads the export again: it was a raw TypeError
    (an onnxruntime session cannot be pickled). encode without a progress bar leaves the process's
    multiprocessing start method unset (a disabled tqdm fixed it: set_start_method('spawn') then failed)."""
    code = (
        "import multiprocessing as mp, pickle, sys\n"
        "import numpy as np\n"
        "from mirrorfast.export import OnnxEncoder\n"
        "if __name__ == '__main__':\n"
        f"    e = OnnxEncoder({str(tiny_export)!r}, provider='cpu')\n"
        "    texts = ['a first text', 'x', 'the third one is a little longer']\n"
        "    expected = e.encode(texts)\n"
        "    mp.set_start_method('spawn')\n"
        "    copy = pickle.loads(pickle.dumps(e))\n"
        "    assert copy.model_path == e.model_path and copy.provider == 'cpu'\n"
        "    assert np.array_equal(copy.encode(texts), expected)\n"
        "    with mp.Pool(1) as pool:\n"
        "        got = pool.apply(e.encode, (texts,))\n"
        "    assert np.array_equal(got, expected)\n"
        "    print('ok')\n"
    )
    script = tmp_path / "worker.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]

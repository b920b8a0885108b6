"""End to end: `mirrorfast train` on a tiny BERT, the output directory, and every bad-input message."""

import csv
import hashlib
import json
import os
import math
import re
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mirrorfast.cli import main
from mirrorfast.config import TrainConfig
from mirrorfast.errors import MirrorfastError
from mirrorfast.output import current_umask
from mirrorfast.trainer import train

SENTENCES = [
    f"Sentence number {i} talks about {topic} in a reasonably long way, long enough to mask."
    for i, topic in enumerate(["cats", "dogs", "trains", "rivers", "music", "code", "rain", "bread"] * 3)
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return path


def run_cli(*args) -> int:
    return main([*map(str, args)])


def tiny_args(tiny_bert_dir, corpus, out, *extra):
    return ["train", "--model", tiny_bert_dir, "--corpus", corpus, "--output", out, "--batch-size", 8,
            "--max-steps", 2, "--no-progress", *extra]


def test_train_end_to_end_loads_everywhere(tiny_bert_dir, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(*tiny_args(tiny_bert_dir, corpus, out)) == 0
    meta = json.loads((out / "mirrorfast.json").read_text())
    assert meta["pooling"] == "cls" and meta["max_length"] == 50 and meta["steps"] == 2
    assert math.isfinite(meta["final_loss"]) and meta["training"]["temperature"] == 0.04
    # Enough to repeat the run: the exact corpus (absolute path, SHA-256), the base model's absolute path,
    # the library versions, and how it went step by step.
    assert meta["corpus"]["path"] == str(corpus.resolve())
    assert meta["corpus"]["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert meta["base_model_path"] == str(Path(tiny_bert_dir).resolve())
    assert meta["versions"]["torch"] == torch.__version__ and "transformers" in meta["versions"]
    assert meta["device"] == "cpu" and meta["cpu_threads"] == torch.get_num_threads()
    assert len(meta["losses"]) == 2 and meta["losses"][-1] == meta["final_loss"]
    assert len(meta["input_wait_seconds"]) == len(meta["epoch_seconds"]) == 1
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".out.tmp-*")), "temporary directory left behind"
    mask = current_umask()  # transformers saves model.safetensors 0600: another user could not serve it
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()} == {0o666 & ~mask}

    # mirrorfast's encoder, plain transformers, and sentence-transformers give the same vectors.
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from mirrorfast.model import load_encoder

    # A text over the max length (50) is cut to it by each: the tokenizer files declare it too.
    texts = ["a short one", "a rather longer sentence to embed for the comparison", "word " * 80]
    ours = load_encoder(out).encode(texts)
    tok, hf = AutoTokenizer.from_pretrained(out), AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
        cls = hf(**batch).last_hidden_state[:, 0].numpy()
    st = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(ours, cls, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st, ours, rtol=1e-4, atol=1e-5)
    from tokenizers import Tokenizer  # the Rust tokenizer alone, as a non-Python client loads it

    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert [len(e.ids) for e in raw.encode_batch(texts)] == [len(ids) for ids in tok(texts, truncation=True)["input_ids"]]
    assert len(raw.encode(texts[2]).ids) == 50 and "max_length" not in json.loads((out / "tokenizer_config.json").read_text())

    # `mirrorfast eval --json` prints exactly one JSON object and uses the saved pooling.
    sts = tmp_path / "sts.csv"
    sts.write_text('"a cat sits",a cat sat,4.5\nthe sky,"a dog, barking",0.5\nrain falls,it rains,4.0\n')
    capsys.readouterr()
    assert run_cli("eval", out, "--sts", sts, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pooling"] == "cls" and result["results"][0]["pairs"] == 3 and result["results"][0]["kind"] == "sts"


def test_seed_repeats_losses_on_cpu(tiny_bert_dir, corpus):
    cfg = TrainConfig(model=str(tiny_bert_dir), corpus=str(corpus), level="sentence", batch_size=8, max_steps=3,
                      progress=False, device="cpu")
    first = train(cfg, log=lambda m: None, save=False).losses
    again = train(cfg, log=lambda m: None, save=False).losses
    other = train(TrainConfig(**{**cfg.__dict__, "seed": 7}), log=lambda m: None, save=False).losses
    assert first == again and first != other and len(first) == 3


def test_mean_pooling_drophead_pairs_and_small_corpus(tiny_bert_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\n".join(f"{s}||{s.upper()}" for s in SENTENCES[:5]), encoding="utf-8")
    out = tmp_path / "out"
    code = run_cli("train", "--model", tiny_bert_dir, "--pairs", pairs, "--output", out, "--pooling", "mean",
                   "--drophead", 0.2, "--max-steps", 2, "--no-progress", "--fp16")
    assert code == 0
    err = capsys.readouterr().err
    assert "fewer than --batch-size 200" in err and "batches of 5" in err
    assert "fp16 needs a GPU" in err and "device: CPU" in err
    st_pooling = json.loads((out / "1_Pooling/config.json").read_text())
    assert st_pooling["pooling_mode_mean_tokens"] and not st_pooling["pooling_mode_cls_token"]
    assert json.loads((out / "mirrorfast.json").read_text())["pooling"] == "mean"


def test_drophead_zeroes_whole_heads(tiny_bert_dir):
    from mirrorfast.model import enable_drophead, load_encoder

    encoder = load_encoder(tiny_bert_dir, dropout=0.0)
    attention = encoder.model.encoder.layer[0].attention.self
    assert enable_drophead(encoder.model, 0.5) == 2
    captured = []  # hooks run in registration order: this one sees drophead's output
    attention.register_forward_hook(lambda m, i, o: captured.append(o[0].detach()))
    batch = encoder.tokenize(["one sentence here", "and another"])
    torch.manual_seed(3)
    encoder.train()
    encoder(**batch)
    heads = captured[-1].view(2, -1, 4, 8)  # hidden 32 = 4 heads x 8
    dropped = (heads == 0).all(dim=(1, 3))
    assert dropped.any() and not dropped.all()
    encoder.eval()
    encoder(**batch)
    assert not (captured[-1].view(2, -1, 4, 8) == 0).all(dim=(1, 3)).any()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_loss_reads_the_views_in_the_autocast_dtype(tiny_bert_dir, precision):
    """Under autocast the step hands InfoNCE the views in the autocast dtype (the kernel's tensor-core path,
    as autocast runs the reference's z @ z.T); without autocast, in fp32."""
    from mirrorfast.data import TokenizedTexts, padded_batch
    from mirrorfast.kernels import info_nce_reference
    from mirrorfast.model import load_encoder
    from mirrorfast.trainer import training_step

    encoder = load_encoder(tiny_bert_dir, dropout=0.0).eval()  # no dropout: the same views twice
    rows = np.arange(6)
    first = TokenizedTexts.build(encoder.tokenizer, SENTENCES[:6], 24)
    second = TokenizedTexts.build(encoder.tokenizer, [s.replace("a", "[MASK]") for s in SENTENCES[:6]], 24)
    batch = padded_batch([(first, rows), (second, rows)], encoder.tokenizer.pad_token_id)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), autocast:
        views = encoder.embed_batch(batch)
    assert views.dtype == torch.float32  # the last LayerNorm runs in fp32 under autocast too
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    expected = info_nce_reference(views[:6].to(dtype), views[6:].to(dtype), 0.04, "mean")
    unrounded = info_nce_reference(views[:6], views[6:], 0.04, "mean")

    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = training_step(encoder, batch, 0.04, optimizer, scaler, autocast, "torch")
    assert loss.dtype == torch.float32
    assert loss.item() == expected.item()
    if precision == "bf16":
        assert loss.item() != unrounded.item(), "the bf16 rounding of the views did not reach the loss"


def test_view_source_masks_with_the_tokenizers_mask_token(tiny_bert_dir, corpus):
    from mirrorfast.data import load_corpus
    from mirrorfast.model import load_encoder
    from mirrorfast.trainer import ViewSource

    encoder = load_encoder(tiny_bert_dir)
    cfg = TrainConfig(corpus=str(corpus), level="sentence").resolved()
    first, second = ViewSource(load_corpus(str(corpus)), encoder.tokenizer, cfg).epoch(0)
    mask_id = encoder.tokenizer.mask_token_id
    assert mask_id not in first.ids.tolist()
    per_view = [second.ids[second.offsets[i] : second.offsets[i + 1]].tolist().count(mask_id)
                for i in range(len(second.offsets) - 1)]
    assert per_view == [1] * len(SENTENCES)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--temperature", "0"], "--temperature must be a finite number > 0"),
        (["--temperature", "inf"], "--temperature must be a finite number > 0"),
        (["--lr", "inf"], "--lr must be a finite number > 0"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
        (["--batch-size", "1"], "--batch-size must be at least 2"),
        (["--dropout", "1.5"], "--dropout must be in"),
        (["--max-length", "129"], "--max-length 129 exceeds the model's 128 positions"),  # an index error before
        (["--seed", str(2**64)], "--seed must be in [-2**63, 2**64)"),  # torch.manual_seed's overflow before
    ],
)
def test_bad_options(tiny_bert_dir, corpus, tmp_path, capsys, extra, message):
    assert run_cli(*tiny_args(tiny_bert_dir, corpus, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_inputs(tiny_bert_dir, tmp_path, capsys):
    cases = []
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases.append((["--corpus", empty], "is empty"))
    one = tmp_path / "one.txt"
    one.write_text("just one line\n")
    cases.append((["--corpus", one], "at least 2"))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok\nfine\n\xc3\x28 bad\n")
    cases.append((["--corpus", binary], "line 3 is not valid UTF-8"))
    cases.append((["--corpus", tmp_path / "missing.txt"], "not found"))
    nopairs = tmp_path / "pairs.txt"
    nopairs.write_text("a||b\nc d\n")
    cases.append((["--pairs", nopairs], "line 2 has no '||'"))
    # `--pairs "$UNSET"`: trained on the default wordfreq:en before
    cases.append((["--pairs", ""], "--pairs is an empty string (an unset shell variable?)"))
    cases.append((["--corpus", ""], "--corpus is an empty string (an unset shell variable?)"))
    cases.append((["--corpus", one, "--output", ""], "--output is an empty string (an unset shell variable?): give a"))
    for args, message in cases:
        code = run_cli("train", "--model", tiny_bert_dir, "--output", tmp_path / "o", "--no-progress", *args)
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name,value,message", [
    ("MIRRORFAST_KERNELS", "bogus", "MIRRORFAST_KERNELS must be torch"),
    ("MIRRORFAST_KERNEL_WARMUP", "yes", "MIRRORFAST_KERNEL_WARMUP must be 0 or 1"),
    ("MIRRORFAST_FUSED_LAYERNORM", "on", "MIRRORFAST_FUSED_LAYERNORM must be 0 or 1"),
    ("MIRRORFAST_PACKED_ATTENTION", "flashy", "MIRRORFAST_PACKED_ATTENTION must be one of"),
])
def test_a_mistyped_environment_switch_fails_before_the_model_loads(tiny_bert_dir, corpus, tmp_path, capsys,
                                                                    monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    assert run_cli(*tiny_args(tiny_bert_dir, corpus, tmp_path / "o")) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "model:" not in captured.out + captured.err
    assert not (tmp_path / "o").exists()


def test_not_a_model(tmp_path, corpus, capsys):
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "readme.txt").write_text("hi")
    assert run_cli("train", "--model", tmp_path / "notmodel", "--corpus", corpus, "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "is not a model directory" in err and "ONNX export" not in err
    (tmp_path / "notmodel" / "export.json").write_text("{}")  # an export directory: say so
    assert run_cli("train", "--model", tmp_path / "notmodel", "--corpus", corpus, "--output", tmp_path / "o") == 2
    assert "it is an ONNX export: use the model directory it was exported from" in capsys.readouterr().err


def test_a_damaged_model_directory_is_one_clear_error(tiny_bert_dir, corpus, tmp_path, capsys):
    """Without tokenizer files transformers builds a tokenizer of special tokens alone (every word [UNK]):
    that trained and saved a useless model with exit 0; a truncated weights file gave a traceback."""
    no_tokenizer, truncated = tmp_path / "no-tokenizer", tmp_path / "truncated"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert_dir / name, no_tokenizer / name)
    shutil.copytree(tiny_bert_dir, truncated)
    (truncated / "model.safetensors").write_bytes((tiny_bert_dir / "model.safetensors").read_bytes()[:1000])
    for model, message in [(no_tokenizer, "has no vocabulary beyond its 5 special tokens: its files"),
                           (truncated, f"cannot load model {truncated}: ")]:
        assert run_cli(*tiny_args(model, corpus, tmp_path / "o")) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("error:") == 1, err
        assert not (tmp_path / "o").exists()


def test_train_checks_its_own_arguments(tiny_bert_dir, corpus, tmp_path):
    cfg = TrainConfig(model=str(tiny_bert_dir), corpus=str(corpus), output=str(tmp_path / "o"), max_steps=1)
    with pytest.raises(MirrorfastError, match="save must be True or False, got 'no'"):  # "no" is truthy: it saved
        train(cfg, save="no")
    with pytest.raises(MirrorfastError, match="log must be a function of one line of text"):
        train(cfg, log=None)
    assert not (tmp_path / "o").exists()


def test_max_steps_builds_only_the_epochs_it_reaches(tiny_bert_dir, corpus, tmp_path, monkeypatch):
    """--epochs 10**12 --max-steps 2 ran out of memory building every epoch's batch order up front: with 3
    batches an epoch, 4 steps need 2 epochs' orders, not 1000."""
    from mirrorfast import trainer

    built = []
    real = trainer.epoch_batches
    monkeypatch.setattr(trainer, "epoch_batches", lambda *a: built.append(1) or real(*a))
    result = train(TrainConfig(model=str(tiny_bert_dir), corpus=str(corpus), batch_size=8, epochs=1000,
                               max_steps=4, output=str(tmp_path / "o"), progress=False), log=lambda m: None)
    assert len(result.losses) == 4 and len(built) == 2


def test_refuses_foreign_output_dir_unless_overwrite(tiny_bert_dir, corpus, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not lose me")
    assert run_cli(*tiny_args(tiny_bert_dir, corpus, out)) == 2
    assert "not a previous mirrorfast output" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "do not lose me"
    # A previous mirrorfast output is replaced without asking; a foreign one with --overwrite.
    assert run_cli(*tiny_args(tiny_bert_dir, corpus, out, "--overwrite")) == 0
    assert not (out / "thesis.tex").exists() and (out / "mirrorfast.json").is_file()
    assert run_cli(*tiny_args(tiny_bert_dir, corpus, out)) == 0
    recorded = json.loads((out / "mirrorfast.json").read_text())["files"]
    assert recorded == sorted(os.listdir(out)) and "mirrorfast.json" in recorded and "1_Pooling" in recorded
    # ... but not when it holds what that output did not write (an export saved inside it, notes): deleted
    # with exit 0 before. --overwrite still replaces it all.
    (out / "onnx").mkdir()
    (out / "onnx" / "model.onnx").write_text("an export")
    assert run_cli(*tiny_args(tiny_bert_dir, corpus, out)) == 2
    assert f"{out} holds onnx, which the previous output there did not write" in capsys.readouterr().err
    assert (out / "onnx" / "model.onnx").is_file()
    assert run_cli(*tiny_args(tiny_bert_dir, corpus, out, "--overwrite")) == 0
    assert not (out / "onnx").exists()
    # A damaged record (or none: an output from before) checks nothing: replaced as before, never a traceback.
    for damaged in ("[1, 2]", '{"files": 5}', '{"files": "mirrorfast.json"}', "{not json"):
        (out / "mirrorfast.json").write_text(damaged)
        assert run_cli(*tiny_args(tiny_bert_dir, corpus, out)) == 0, (damaged, capsys.readouterr().err)


def test_an_output_that_holds_an_input_is_refused(tiny_bert_dir, corpus, tmp_path, tmp_path_factory, capsys):
    """--output over the corpus's folder (or the model's) would delete it when the output is moved in."""
    model = tmp_path_factory.mktemp("models") / "base"
    shutil.copytree(tiny_bert_dir, model)
    for out, source in [(tmp_path, corpus), (model, model)]:
        assert run_cli(*tiny_args(model, corpus, out, "--overwrite")) == 2
        assert f"{source}, an input of this run" in capsys.readouterr().err
    assert corpus.is_file() and (model / "config.json").is_file()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (a directory nobody can add to)")
def test_output_where_nothing_can_be_created_fails_before_training(tiny_bert_dir, corpus, capsys):
    # /proc refuses new entries even to root, whom permission bits (os.access) do not stop; the probe
    # must fail before the run, with one line and no traceback, not when the trained model is saved.
    assert run_cli(*tiny_args(tiny_bert_dir, corpus, Path("/proc/mirrorfast-out"))) == 2
    captured = capsys.readouterr()
    assert "cannot write to /proc" in captured.err and "Traceback" not in captured.err
    assert "done:" not in captured.out + captured.err


def test_the_current_directory_as_output_is_refused_before_training(tiny_bert_dir, corpus, tmp_path, monkeypatch,
                                                                    capsys):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert run_cli(*tiny_args(tiny_bert_dir, corpus, ".")) == 2
    captured = capsys.readouterr()
    assert "is the current directory, which an output cannot replace" in captured.err
    assert "step" not in captured.out + captured.err.replace("--max-steps", "")
    assert list(here.iterdir()) == [] and list(tmp_path.glob(".here.*")) == []


def test_non_finite_loss_stops_and_writes_nothing(tiny_bert_dir, corpus, tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(*tiny_args(tiny_bert_dir, corpus, out, "--temperature", "1e-45")) == 2
    err = capsys.readouterr().err
    assert "not finite" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".o.*"))


def test_cuda_graphs_needs_a_gpu(tiny_bert_dir, corpus, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    assert run_cli(*tiny_args(tiny_bert_dir, corpus, tmp_path / "o", "--cuda-graphs", "--bf16")) == 2
    assert "--cuda-graphs needs a CUDA GPU" in capsys.readouterr().err


def test_auto_packs_only_where_flash_attention_runs(tiny_bert_dir, corpus, monkeypatch):
    """A T4 or V100 (no FlashAttention) trains padded under `auto`; explicit packed still runs there, through
    the gathered-SDPA path; on an sm80+ GPU `auto` packs, with the Triton kernel where the run's views fit it
    and FlashAttention otherwise."""
    from mirrorfast import packing, plan
    from mirrorfast.model import load_encoder
    from mirrorfast.plan import use_packing

    encoder = load_encoder(tiny_bert_dir)
    cuda = torch.device("cuda")  # a device object only: nothing touches a GPU
    auto = TrainConfig(model=str(tiny_bert_dir), corpus=str(corpus))
    packed = TrainConfig(**{**auto.__dict__, "attention": "packed"})
    assert not packing.flash_supported(torch.device("cpu"))
    for supported in (False, True):
        monkeypatch.setattr(plan, "flash_supported", lambda device, s=supported: s)
        monkeypatch.setattr(packing, "flash_supported", lambda device, s=supported: s)
        logs = []
        assert use_packing(auto, encoder, cuda, torch.float16, logs.append) is supported
        assert ("FlashAttention needs an Ampere" in "".join(logs)) is not supported  # said once, only when it matters
        assert use_packing(packed, encoder, cuda, torch.float16)
        assert packing.packed_kernel(cuda, 50) == ("flash" if supported else "sdpa")
        # the run's kernel: its shapes fit the Triton kernel (heads x head dim as timed), the default where it is
        resolved = auto.resolved()
        assert plan.run_packed_kernel(resolved, encoder.model.config, cuda, 200) == ("triton" if supported else "sdpa")
        long_views = TrainConfig(**{**resolved.__dict__, "max_length": 256})
        assert plan.run_packed_kernel(long_views, encoder.model.config, cuda, 200) == ("flash" if supported else "sdpa")


def test_cuda_graphs_on_wherever_they_apply(tiny_bert_dir, corpus, tmp_path):
    """Default (None): on exactly for CUDA + fp16/bf16 + packed attention; --no-cuda-graphs turns them off;
    --cuda-graphs insists and is refused where they cannot apply. The decision is recorded in the output."""
    from mirrorfast.plan import use_cuda_graphs

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects only: nothing touches a GPU
    auto = TrainConfig(model=str(tiny_bert_dir), corpus=str(corpus))
    for device, dtype, packed, expected in [(cuda, torch.float16, True, True), (cuda, torch.bfloat16, True, True),
                                            (cuda, None, False, False), (cuda, torch.float16, False, False),
                                            (cpu, torch.bfloat16, True, False), (cpu, None, False, False)]:
        assert use_cuda_graphs(auto, device, dtype, packed) is expected, (device, dtype, packed)
    off = TrainConfig(**{**auto.__dict__, "cuda_graphs": False})
    assert not use_cuda_graphs(off, cuda, torch.float16, True)
    on = TrainConfig(**{**auto.__dict__, "cuda_graphs": True})
    assert use_cuda_graphs(on, cuda, torch.bfloat16, True)
    with pytest.raises(MirrorfastError, match="needs packed attention"):
        use_cuda_graphs(on, cuda, torch.bfloat16, False)

    out = tmp_path / "o"
    assert run_cli(*tiny_args(tiny_bert_dir, corpus, out, "--device", "cpu", "--bf16")) == 0
    assert json.loads((out / "mirrorfast.json").read_text())["cuda_graphs"] is False
    assert run_cli(*tiny_args(tiny_bert_dir, corpus, out, "--device", "cpu", "--no-cuda-graphs")) == 0


def test_cpu_bf16_hint(tmp_path, monkeypatch):
    from mirrorfast import plan

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n\n")
    assert plan.cpu_has_native_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert not plan.cpu_has_native_bf16(str(info))
    assert not plan.cpu_has_native_bf16(str(tmp_path / "missing"))

    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(plan, "cpu_has_native_bf16", lambda native=native: native)
        logs = []
        assert plan.autocast_dtype("fp32", cpu, logs.append) is None
        assert plan.autocast_dtype("fp16", cpu, logs.append) is None
        assert plan.autocast_dtype("bf16", cpu, logs.append) is torch.bfloat16
        hinted = [m for m in logs if "--bf16 trained 1.5x to 1.6x faster" in m]
        assert len(hinted) == (2 if native else 0), logs
        assert sum("--fp16 needs a GPU" in m for m in logs) == 1


def test_cpu_bf16_emulated_warning(tmp_path, monkeypatch):
    """--bf16 on an x86 CPU without bf16 instructions says, once, that its matrix products are emulated (and
    what that cost); on one with them, or where that cannot be told, it says nothing of the kind."""
    import platform

    from mirrorfast import plan

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\n")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert plan.cpu_bf16_emulated(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16\n")
    assert not plan.cpu_bf16_emulated(str(info))
    assert not plan.cpu_bf16_emulated(str(tmp_path / "missing"))
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")  # its own bf16 story: not told from these flags
    info.write_text("processor\t: 0\nflags\t\t: fp asimd\n")
    assert not plan.cpu_bf16_emulated(str(info))

    cpu = torch.device("cpu")
    for emulated in (True, False):
        monkeypatch.setattr(plan, "cpu_bf16_emulated", lambda emulated=emulated: emulated)
        logs = []
        assert plan.autocast_dtype("bf16", cpu, logs.append) is torch.bfloat16  # warned, not overridden
        assert plan.autocast_dtype("fp32", cpu, logs.append) is None
        warned = [m for m in logs if "emulated" in m]
        assert len(warned) == (1 if emulated else 0), logs
        if emulated:
            assert plan.CPU_BF16_EMULATED_COST in warned[0] and "Leave out --bf16" in warned[0]


def test_drophead_trains_padded(tiny_bert_dir, corpus, tmp_path, capsys, monkeypatch):
    """DropHead draws one mask per sequence; a packed batch is one sequence of all views, so DropHead
    trains padded: `auto` picks padded even where it would pack, explicit packed is refused."""
    from mirrorfast import plan
    from mirrorfast.model import load_encoder
    from mirrorfast.plan import use_packing

    monkeypatch.setattr(plan, "flash_supported", lambda device: True)  # as on an sm80+ GPU
    encoder = load_encoder(tiny_bert_dir)
    cuda = torch.device("cuda")  # a device object only: use_packing decides without touching a GPU
    base = TrainConfig(model=str(tiny_bert_dir), corpus=str(corpus))
    assert use_packing(base, encoder, cuda, torch.float16)
    assert not use_packing(TrainConfig(**{**base.__dict__, "drophead": 0.1}), encoder, cuda, torch.float16)
    assert run_cli(*tiny_args(tiny_bert_dir, corpus, tmp_path / "o", "--attention", "packed", "--drophead", "0.1")) == 2
    assert "--drophead needs padded batches" in capsys.readouterr().err


def test_version(capsys):
    import importlib.metadata

    import mirrorfast

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mirrorfast {mirrorfast.__version__}"
    assert importlib.metadata.version("mirrorfast") == mirrorfast.__version__  # one source: pyproject reads it


def test_position_limit_counts_roberta_offset():
    import transformers

    from mirrorfast.model import position_limit

    assert position_limit(transformers.BertConfig(max_position_embeddings=512)) == 512
    assert position_limit(transformers.RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert position_limit(transformers.CamembertConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    from types import SimpleNamespace

    assert position_limit(SimpleNamespace(model_type="custom")) is None  # a config that states no positions


def test_view_source_copies_the_tokenizer_once(tiny_bert_dir, corpus, monkeypatch):
    # ViewSource re-tokenizes the masked view every epoch with one batch encoder (a tokenizer copy each).
    import mirrorfast.trainer as trainer
    from mirrorfast.data import load_corpus
    from mirrorfast.model import load_encoder

    import mirrorfast.tokens as tokens

    made = []
    real = tokens.batch_encoder
    for module in (trainer, tokens):  # the name the trainer imported, and the one TokenizedTexts.build calls
        monkeypatch.setattr(module, "batch_encoder", lambda *args: made.append(args) or real(*args))
    cfg = TrainConfig(corpus=str(corpus), level="sentence").resolved()
    source = trainer.ViewSource(load_corpus(str(corpus)), load_encoder(tiny_bert_dir).tokenizer, cfg)
    for epoch in range(3):
        source.epoch(epoch)
    assert len(made) == 1


def test_eval_files_are_scored_before_and_after_training(tiny_bert_dir, corpus, tmp_path, capsys):
    """--eval-sts / --eval-words: the before score is the untrained model's, the after score the saved
    model's (each checked against `mirrorfast eval` / spearman() run on its own), logged and recorded."""
    from mirrorfast.evaluate import read_sts, read_words, spearman
    from mirrorfast.model import load_encoder

    rng = np.random.default_rng()
    sts = tmp_path / "sts.csv"
    with open(sts, "w", encoding="utf-8", newline="") as handle:  # the sentences have commas: quoted
        csv.writer(handle).writerows([SENTENCES[i], SENTENCES[j], f"{rng.uniform(0, 5):.2f}"]
                                     for i, j in rng.integers(0, len(SENTENCES), (12, 2)))
    words = tmp_path / "words.tsv"
    vocab = ["cat", "dog", "train", "river", "music", "code", "rain", "bread", "sun", "car"]
    words.write_text("word1\tword2\tscore\n" + "".join(
        f"{vocab[i]}\t{vocab[j]}\t{rng.uniform(0, 10):.2f}\n" for i, j in rng.integers(0, len(vocab), (15, 2))))
    out = tmp_path / "out"
    # a large learning rate, so that two steps move the scores (a wrong "after" model would show)
    assert run_cli(*tiny_args(tiny_bert_dir, corpus, out, "--eval-sts", sts, "--eval-words", words, "--lr", 0.01)) == 0
    err = capsys.readouterr().err
    evaluation = json.loads((out / "mirrorfast.json").read_text())["evaluation"]
    assert [(e["file"], e["kind"], e["pairs"]) for e in evaluation] == [(str(sts), "sts", 12), (str(words), "words", 15)]

    untrained = load_encoder(tiny_bert_dir)
    trained = load_encoder(out)
    for e, pairs in zip(evaluation, (read_sts(sts), read_words(words))):
        assert e["before"] == pytest.approx(spearman(untrained, pairs), abs=1e-3)
        assert e["after"] == pytest.approx(spearman(trained, pairs), abs=1e-3)
        assert f"Spearman {e['before']:.2f} -> {e['after']:.2f}" in err
        assert e["before"] != e["after"]  # training moved the model


def test_a_bad_eval_file_fails_before_training(tiny_bert_dir, corpus, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("only,two\n")
    assert run_cli(*tiny_args(tiny_bert_dir, corpus, tmp_path / "o", "--eval-sts", bad)) == 2
    err = capsys.readouterr().err
    assert "line 1 has 2 fields" in err and "model:" not in err  # before the model was even loaded
    assert not (tmp_path / "o").exists()


@pytest.mark.triton_cpu
def test_loss_kernels_compile_in_the_background_before_the_first_step(tiny_bert_dir, tmp_path, monkeypatch):
    """With the fused loss, its kernels are compiled (infonce_triton.warm_up) in a background thread for
    every batch size of the run, in the dtype the loss gets, and the first step starts only when that is
    done. Here on the CPU through the Triton interpreter (the trainer's own choice there is PyTorch's loss)."""
    import threading

    import mirrorfast.kernels.infonce_triton as nce
    import mirrorfast.plan as plan
    import mirrorfast.trainer as trainer
    import mirrorfast.warmup as warmup

    events = []
    real_warm_up = nce.warm_up
    real_wait = warmup.KernelWarmUp.wait
    trainer_waits = threading.Event()

    def recording_warm_up(sizes, dim, dtype, device):
        events.append(("warm_up", tuple(sizes), dim, dtype, threading.current_thread() is threading.main_thread()))
        real_warm_up(sizes[:1], 8, dtype, device)  # the real thing, small (the interpreter is slow)
        # A compile slower than this run's setup: still running when the trainer reaches its first step.
        trainer_waits.wait(timeout=30)
        events.append(("warmed",))

    def recording_wait(self):
        events.append(("trainer waits",))
        trainer_waits.set()
        return real_wait(self)

    real_info_nce = trainer.info_nce

    def recording_info_nce(a, b, temperature, backend):
        events.append(("loss", backend, a.shape[0]))
        return real_info_nce(a, b, temperature, backend="torch")

    monkeypatch.setattr(nce, "warm_up", recording_warm_up)
    monkeypatch.setattr(warmup.KernelWarmUp, "wait", recording_wait)
    monkeypatch.setattr(trainer, "info_nce", recording_info_nce)
    monkeypatch.setattr(plan, "resolve_backend", lambda backend, device: "triton")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES[:13]) + "\n", encoding="utf-8")  # batches of 5, 5 and 3
    cfg = TrainConfig(model=str(tiny_bert_dir), corpus=str(corpus), batch_size=5, epochs=2, precision="bf16",
                      output=str(tmp_path / "out"), progress=False)
    result = train(cfg, log=lambda message: None, save=False)

    hidden = json.loads((Path(tiny_bert_dir) / "config.json").read_text())["hidden_size"]
    assert events[0] == ("warm_up", (3, 5), hidden, torch.bfloat16, False)  # sizes of both epochs, off the main thread
    assert events[1:3] == [("trainer waits",), ("warmed",)]  # the first step waits for the compile to end
    assert [e[2] for e in events[3:]] == [5, 5, 3] * 2 and result.steps == 6


def _warm_ups(**overrides):
    from types import SimpleNamespace

    from mirrorfast.warmup import kernel_warm_ups

    args = dict(loss_backend="torch", attention_kernel=None, fused_norm=False, device=torch.device("cpu"),
                config=SimpleNamespace(hidden_size=48, num_attention_heads=4), dtype=torch.bfloat16,
                half_model=False, schedules=[[np.arange(5), np.arange(3)], [np.arange(5), np.arange(3)]],
                max_length=50, dropout=0.1, bucket=None, pad_segment_max=128)
    return {name: args for name, fn, args in kernel_warm_ups(**{**args, **overrides})}


def test_kernel_warm_ups_follow_the_runs_choices():
    """Nothing to compile with PyTorch's loss and FlashAttention; otherwise each Triton family with the
    shapes and dtypes the run will launch it with."""
    cpu = torch.device("cpu")
    assert _warm_ups(attention_kernel="flash") == {}
    assert _warm_ups(loss_backend="triton")["loss"] == ([3, 5], 48, torch.bfloat16, cpu)
    assert _warm_ups(loss_backend="triton", dtype=None)["loss"][2] == torch.float32
    # attention: (heads, head_dim, dtype, device, max_len, dropout); bucketed batches round max_len up
    assert _warm_ups(attention_kernel="triton")["attention"] == (4, 12, torch.bfloat16, cpu, 50, 0.1)
    assert _warm_ups(attention_kernel="triton", bucket=512, pad_segment_max=64)["attention"][4] == 64
    assert _warm_ups(attention_kernel="triton", max_length=25, bucket=512, pad_segment_max=64)["attention"][4] == 64
    assert _warm_ups(attention_kernel="triton", max_length=25)["attention"][4] == 25
    assert _warm_ups(attention_kernel="triton", max_length=300)["attention"][4] == 128  # the kernel's limit
    # LayerNorm: (rows, hidden, h dtype, residual dtype, parameter dtype, p, device)
    assert _warm_ups(fused_norm=True, bucket=512)["LayerNorm"] == (
        512, 48, torch.bfloat16, torch.float32, torch.float32, 0.1, cpu)  # autocast: fp32 residual stream
    assert _warm_ups(fused_norm=True, half_model=True)["LayerNorm"][2:5] == (torch.bfloat16,) * 3


def test_kernel_warm_up_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("MIRRORFAST_KERNEL_WARMUP", "0")
    assert _warm_ups(loss_backend="triton", attention_kernel="triton", fused_norm=True) == {}
    monkeypatch.setenv("MIRRORFAST_KERNEL_WARMUP", "yes")
    with pytest.raises(MirrorfastError, match="MIRRORFAST_KERNEL_WARMUP must be 0 or 1"):
        _warm_ups(loss_backend="triton")


@pytest.mark.triton_cpu
def test_a_failed_kernel_warm_up_is_reported_not_fatal():
    """A warm-up that fails is reported (the kernels then compile at their first launch, where a real fault
    raises with its own traceback); the others still report their times."""
    from mirrorfast.warmup import KernelWarmUp, describe_warm_ups

    def broken():
        raise RuntimeError("PassManager::run failed")

    results = KernelWarmUp([("attention", lambda: None, ()), ("loss", broken, ())]).wait()
    assert isinstance(results["attention"], float) and isinstance(results["loss"], RuntimeError)
    line = describe_warm_ups(results)
    assert line.startswith("attention 0.") and "loss FAILED (RuntimeError: PassManager::run failed" in line


def test_train_help_lists_the_environment_switches(capsys):
    from mirrorfast.fused_norm import FUSED_LAYERNORM_ENV
    from mirrorfast.packing import ATTENTION_ENV
    from mirrorfast.warmup import WARMUP_ENV

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in (ATTENTION_ENV, FUSED_LAYERNORM_ENV, WARMUP_ENV, "MIRRORFAST_KERNELS"):
        assert name in text


@pytest.mark.parametrize("max_length", [0, 1, -5, 2.5])
def test_load_encoder_refuses_a_max_length_without_room_for_special_tokens(tiny_bert_dir, max_length):
    from mirrorfast.model import load_encoder

    with pytest.raises(MirrorfastError, match="max_length must be an integer >= 2"):
        load_encoder(tiny_bert_dir, max_length=max_length)
    assert load_encoder(tiny_bert_dir, max_length=2).encode(["word " * 50]).shape == (1, 32)


def test_train_config_takes_paths_and_refuses_wrong_types(tiny_bert_dir, corpus, tmp_path):
    """The Python API: Path objects work wherever a path goes, one evaluation file may be given bare, and a
    value of the wrong type is one clear error (not a TypeError from deep inside the run)."""
    cfg = TrainConfig(model=Path(tiny_bert_dir), corpus=Path(corpus), output=tmp_path / "o", eval_sts=Path("dev.csv"),
                      eval_words="words.tsv", max_steps=1, progress=False)
    resolved = cfg.resolved()
    assert (resolved.corpus, resolved.output) == (str(corpus), str(tmp_path / "o"))
    assert (resolved.eval_sts, resolved.eval_words) == (("dev.csv",), ("words.tsv",))
    result = train(replace(cfg, eval_sts=(), eval_words=()), log=lambda message: None)
    assert result.steps == 1 and (tmp_path / "o" / "mirrorfast.json").is_file()
    for field, value, message in [("batch_size", 2.5, "--batch-size must be an integer, got 2.5"),
                                  ("temperature", "0.1", "--temperature must be a number, got '0.1'"),
                                  ("dropout", None, "--dropout must be a number, got None"),
                                  ("epochs", True, "--epochs must be an integer, got True"),
                                  ("overwrite", "false", "overwrite must be True or False, got 'false'"),
                                  ("dedup", 0, "dedup must be True or False, got 0"),
                                  ("cuda_graphs", "no", "cuda_graphs must be True, False or None, got 'no'"),
                                  ("corpus", 5, "corpus must be a path (str or os.PathLike), got 5"),
                                  ("output", None, "output must be a path (str or os.PathLike), got None"),
                                  ("eval_sts", 5, "eval_sts must be a path or a list of paths, got 5")]:
        with pytest.raises(MirrorfastError, match=re.escape(message)):
            replace(cfg, **{field: value}).resolved()
    with pytest.raises(MirrorfastError, match="train takes a TrainConfig, got a dict"):
        train({"corpus": str(corpus)})
    # numpy scalars are numbers: taken, and stored as plain int / float (mirrorfast.json is JSON)
    resolved = replace(cfg, temperature=np.float32(0.05), batch_size=np.int64(8), seed=np.int32(3)).resolved()
    assert [type(v) for v in (resolved.temperature, resolved.batch_size, resolved.seed)] == [float, int, int]


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_train_from_a_no_grad_notebook_cell(tiny_bert_dir, corpus, mode):
    cfg = TrainConfig(model=str(tiny_bert_dir), corpus=str(corpus), level="sentence", batch_size=8, max_steps=1,
                      progress=False)
    with mode():
        result = train(cfg, log=lambda message: None, save=False)
    assert result.steps == 1 and math.isfinite(result.losses[0])


def test_load_encoder_is_in_eval_mode_leaves_it_so_and_leaves_transformers_settings(tiny_bert_dir, tmp_path):
    """load_encoder returns an encoder in eval mode (dropout off), encode leaves the mode as it found it
    (threads may share an eval-mode encoder), and transformers' verbosity and progress bars stay the host's."""
    from transformers.utils import logging as hf_logging

    from mirrorfast.model import load_encoder

    hf_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar()
    encoder = load_encoder(tiny_bert_dir)
    assert hf_logging.get_verbosity() == hf_logging.WARNING and hf_logging.is_progress_bar_enabled()
    assert not encoder.training and not encoder.model.training
    first = encoder.encode(["a b c", "d e"])
    assert not encoder.model.training
    np.testing.assert_array_equal(first, encoder.encode(["a b c", "d e"]))
    encoder.train()
    encoder.encode(["a b c"])
    assert encoder.training and encoder.model.training  # a training encoder goes back to training
    encoder.eval()
    encoder.model.train()  # the inner model alone, as after a user's own training loop: dropout was left on
    np.testing.assert_array_equal(first, encoder.encode(["a b c", "d e"]))
    assert encoder.model.training and not encoder.training  # each module as it was
    for call, message in [(lambda: encoder.encode(["x"], normalize="no"), "normalize must be True or False"),
                          (lambda: load_encoder(tiny_bert_dir, dropout="0.1"), "dropout must be a number in")]:
        with pytest.raises(MirrorfastError, match=message):
            call()

    saved = tmp_path / "m"
    shutil.copytree(tiny_bert_dir, saved)
    (saved / "mirrorfast.json").write_text(json.dumps({"pooling": "cls", "max_length": 1000}))
    with pytest.raises(MirrorfastError, match="1000 exceeds the model's 128 positions"):
        load_encoder(saved)


@pytest.mark.parametrize("source,level", [({}, "word"), ({"corpus": "wordfreq:de:500"}, "word"),
                                          ({"corpus": "my_sentences.txt"}, "sentence"),
                                          ({"corpus": Path("my_sentences.txt")}, "sentence"),
                                          ({"corpus": None, "pairs": "pairs.txt"}, "sentence")])
def test_the_python_api_picks_the_preset_as_the_cli_does(source, level):
    """No level given: the word preset for a wordfreq corpus, the sentence preset for a file (it was the word
    preset for any corpus through the Python API, the sentence preset through the CLI)."""
    resolved = TrainConfig(**source).resolved()
    assert resolved.level == level and resolved.temperature == (0.2 if level == "word" else 0.04)
    assert TrainConfig(**source, level="word").resolved().level == "word"  # an explicit level wins


def test_training_again_from_an_output_notes_a_change_of_pooling(tiny_bert_dir, corpus, tmp_path, capsys,
                                                                  monkeypatch):
    """Trained again from a mean-pooled output, a run on the default --pooling (cls, the paper's) says so:
    it switched silently before. mirrorfast.json records the evaluation files as absolute paths, as the
    corpus and the base model (they were recorded as typed, relative to where the run started)."""
    sts = tmp_path / "dev.csv"
    sts.write_text("".join(f'"{a}","{b}",{i % 5}\n' for i, (a, b) in enumerate(zip(SENTENCES, SENTENCES[1:]))))
    monkeypatch.chdir(tmp_path)
    first = tmp_path / "first"
    assert run_cli(*tiny_args(tiny_bert_dir, corpus, first, "--pooling", "mean", "--eval-sts", "dev.csv")) == 0
    meta = json.loads((first / "mirrorfast.json").read_text())
    assert meta["training"]["eval_sts"] == [str(sts.resolve())] and meta["training"]["eval_words"] == []
    capsys.readouterr()
    assert run_cli(*tiny_args(first, corpus, tmp_path / "second")) == 0
    assert (f"note: {first} was trained with mean pooling; this run trains cls pooling (--pooling mean keeps it)"
            in capsys.readouterr().err)
    assert run_cli(*tiny_args(first, corpus, tmp_path / "third", "--pooling", "mean")) == 0
    assert "was trained with" not in capsys.readouterr().err


def test_the_log_says_how_many_views_the_span_mask_reaches(tiny_bert_dir, tmp_path):
    """Strings under 30 characters stay whole at every level: --mask-span on a word list changed nothing,
    and nothing said so."""
    words = tmp_path / "words.txt"
    words.write_text("\n".join(["cat", "dog", "a much longer string of more than thirty characters", "tree"]) + "\n")
    for span, expected in [(3, "a 3-character span of 1 of the 4 second views"), (60, "changes nothing here")]:
        logs = []
        train(TrainConfig(model=str(tiny_bert_dir), corpus=str(words), level="word", mask_span=span, max_steps=1,
                          batch_size=4, progress=False), log=logs.append, save=False)
        assert sum(expected in line for line in logs) == 1, logs
    logs = []
    train(TrainConfig(model=str(tiny_bert_dir), corpus=str(words), level="word", max_steps=1, batch_size=4,
                      progress=False), log=logs.append, save=False)
    assert not any(line.startswith("mask:") for line in logs)  # the word preset masks nothing, and says nothing

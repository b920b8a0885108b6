"""benchmarks/gpu_suite.py --tiny: the GPU benchmark still runs end to end (on the CPU here) and prints
the reference and mirrorfast rows side by side for both models."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mirrorfast.plan import cpu_bf16_emulated

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def test_gpu_suite_tiny_runs_and_prints_both_recipes(shared_data, minilm_dir, tmp_path):
    out_json = tmp_path / "suite.json"
    env = dict(os.environ)  # OMP_NUM_THREADS and friends are inherited
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--tiny", "--device", "cpu", "--json", str(out_json)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"
    table = proc.stdout
    assert "FAILED" not in table, table
    # Where bf16 is emulated (~20x slower), --tiny skips MiniLM's bf16 rows and says so; the tiny BERT's run.
    emulated = cpu_bf16_emulated()
    bf16_rows = {"minilm:bf16", "minilm:bf16-half"} if emulated else set()
    for row in bf16_rows:
        assert f"skipped {row}: this CPU emulates bf16" in table, table
    # Rows are labelled by the precision they ran: on the CPU the fp16 recipe trains in fp32.
    for label, count in (("reference fp32", 2), ("sentence-transformers fp32", 2), ("mirrorfast fp32", 2),
                         ("mirrorfast bf16", 2 if emulated else 4),
                         ("mirrorfast bf16 half-model", 1 if emulated else 2)):
        assert table.count(label) == count, f"{label!r} should appear {count} times:\n{table}"
    assert "tiny BERT" in table and "all-MiniLM-L6-v2" in table, table
    assert "torch " in table and "transformers " in table, table

    report = json.loads(out_json.read_text())
    rows = {r["row"]: r for r in report["rows"]}
    recipes = ("reference", "st", "fp16", "bf16", "bf16-half")
    assert set(rows) == {f"{m}:{r}" for m in ("bert", "minilm") for r in recipes} - bf16_rows
    assert report["meta"]["skipped_rows"].keys() == bf16_rows
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["steady_ms_per_step"] > 0 and row["steady_tokens_per_second"] > 0, row
        assert len(row["epoch_seconds"]) == 2, row
    for recipe in recipes:
        if f"minilm:{recipe}" in bf16_rows:
            continue
        minilm = rows[f"minilm:{recipe}"]
        assert minilm["sts_before"] is not None and minilm["sts_after"] is not None, minilm
    assert rows["bert:fp16"]["speedup_steady"] > 0
    assert rows["bert:fp16"]["precision"] == "fp32" and rows["bert:bf16"]["precision"] == "bf16"
    half_path, bf16_path = (rows[r]["path"].split("/") for r in ("bert:bf16-half", "bert:bf16"))
    assert "bf16-model" in half_path and "bf16" in bf16_path, (half_path, bf16_path)
    assert half_path[-1] == bf16_path[-1] == "cls-last-layer", (half_path, bf16_path)  # cls pooling: [CLS] alone
    # the baselines and mirrorfast see the same data: same steps, (almost) the same real tokens per step
    assert rows["bert:reference"]["steps_per_epoch"] == rows["bert:st"]["steps_per_epoch"] == \
        rows["bert:fp16"]["steps_per_epoch"] == 3
    ref_tokens = rows["bert:reference"]["tokens_per_step"]
    for other in ("bert:st", "bert:fp16"):
        assert abs(ref_tokens - rows[other]["tokens_per_step"]) / ref_tokens < 0.05, other
    assert rows["bert:st"]["path"] == "st-trainer/padded-longest/MNRL-loss/fp32"


@pytest.mark.parametrize("script, prefix, args", [
    ("gpu_suite.py", "mirrorfast-suite-", ["--tiny", "--device", "cpu", "--rows", "bert:reference"]),
    ("profile_step.py", "mirrorfast-profile-", ["--tiny", "--device", "cpu"]),
])
def test_sigterm_removes_the_temporary_folder(minilm_dir, tmp_path, script, prefix, args):
    """`timeout` (SIGTERM) in the middle of a run: its temporary folder (420 MB for the suite) is removed, one line
    says so, exit 143."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"sentence number {i} of a small corpus\n" for i in range(48)))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / script), *args, "--corpus", str(corpus)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp.glob(prefix + "*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tmp.glob(prefix + "*")), f"no {prefix}* folder appeared (exit {proc.poll()})"
        time.sleep(0.5)  # into the work that fills it
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.strip().splitlines()[-1] == f"{script[:-3]}: terminated (SIGTERM), cleaned up", err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not list(tmp.glob(prefix + "*")), "the temporary folder is left behind"

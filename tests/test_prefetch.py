"""BatchStream: batches in training order, built at most a window ahead, views tokenized an epoch ahead;
and a windowed training run computes exactly what a one-window-per-epoch run does."""

import functools
import random
import threading

import numpy as np
import pytest
import torch

import mirrorfast.trainer
from mirrorfast.config import TrainConfig
from mirrorfast.prefetch import BatchStream
from mirrorfast.trainer import first_steps, train


class Recorder:
    """views/build/upload stand-ins that log what was asked, and when (which batch the consumer held)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events: list[tuple] = []
        self.consumed = 0

    def log(self, *event):
        with self.lock:
            self.events.append((*event, self.consumed))

    def views(self, epoch):
        self.log("views", epoch)
        return f"views-{epoch}"

    def build(self, views, rows):
        self.log("build", views, tuple(int(r[0]) for r in rows))
        return [(views, r.tolist()) for r in rows]

    def upload(self, batches):
        self.log("upload", len(batches))
        return [("device", *b) for b in batches]


def schedules_of(sizes, batch_size=2, seed=None):
    """Epochs of `sizes` batches of consecutive rows (epoch e's rows from 1000 e), shuffled given a seed."""
    out, start = [], 0
    for size in sizes:
        batches = [np.arange(start + batch_size * i, start + batch_size * (i + 1)) for i in range(size)]
        if seed is not None:
            random.Random(seed).shuffle(batches)
        out.append(batches)
        start += 1000
    return out


@pytest.mark.parametrize("window", [1, 2, 3, 64])
def test_batches_come_in_order_built_at_most_a_window_ahead(window):
    sizes = [5, 1, 4]
    schedules = schedules_of(sizes, seed=window)
    rec = Recorder()
    got = []
    with BatchStream(rec.views, rec.build, rec.upload, schedules, window=window) as stream:
        stream.start()
        for epoch in range(len(schedules)):
            for batch in stream.epoch(epoch):
                got.append(batch)
                rec.consumed += 1
    expected = [("device", f"views-{e}", rows.tolist()) for e, schedule in enumerate(schedules) for rows in schedule]
    assert got == expected

    # Each epoch's views are made once; epoch e + 1's not before epoch e has begun (memory). The log time is
    # when the background thread ran, so only this bound holds; it binds from epoch 2 on.
    views = [(e, consumed) for kind, e, consumed in (ev for ev in rec.events if ev[0] == "views")]
    assert sorted(e for e, _ in views) == [0, 1, 2]
    first_batch = np.cumsum([0] + sizes)  # index of each epoch's first batch in training order
    for e, consumed in views:
        assert consumed >= (first_batch[e - 1] if e else 0), (e, consumed)

    # A window is built only once the consumer reached the window before it (host memory: two windows).
    starts = [first_batch[e] + i for e, size in enumerate(sizes) for i in range(0, size, window)]
    builds = [ev for ev in rec.events if ev[0] == "build"]
    assert len(builds) == len(starts)
    for k, build in enumerate(builds):
        assert build[-1] >= (starts[k - 1] if k else 0), (k, build)
    assert sum(ev[1] for ev in rec.events if ev[0] == "upload") == sum(sizes)


def test_time_spent_waiting_for_batches_is_recorded_per_epoch():
    """The consumer's waits for batches not yet built (here: epoch 1's views take 0.3 s, begun as epoch 0 begins
    and epoch 0 consumed at once) are recorded per epoch; the first window (built in `start`) is not a wait."""
    import time

    def views(epoch):
        if epoch == 1:
            time.sleep(0.3)
        return epoch

    with BatchStream(views, lambda v, rows: [(v, r.tolist()) for r in rows], list, schedules_of([2, 2])) as stream:
        stream.start()
        for epoch in range(2):
            list(stream.epoch(epoch))
    assert set(stream.waited) == {1} and 0.25 <= stream.waited[1] < 5, stream.waited


def test_an_error_while_building_reaches_the_consumer():
    def build(views, rows):
        if int(rows[0][0]) >= 4:
            raise ValueError("no such token")
        return list(rows)

    with BatchStream(lambda e: None, build, list, schedules_of([4]), window=2) as stream:
        stream.start()
        batches = stream.epoch(0)
        next(batches), next(batches)  # window 0 came
        with pytest.raises(ValueError, match="no such token"):
            next(batches)


def test_nothing_to_stream():
    with BatchStream(lambda e: None, lambda v, r: r, list, []) as stream:
        stream.start()


def test_first_steps_cuts_the_schedules_after_max_steps():
    schedules = schedules_of([3, 3, 3])
    assert [len(s) for s in first_steps(schedules, 4)] == [3, 1]
    assert [len(s) for s in first_steps(schedules, 3)] == [3]
    assert [len(s) for s in first_steps(schedules, 1)] == [1]
    assert [len(s) for s in first_steps(schedules, 100)] == [3, 3, 3]
    assert first_steps(schedules, 4)[1][0] is schedules[1][0]


def test_windows_do_not_change_what_training_computes(tiny_bert_dir, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"sentence {i} about topic {i % 7}, long enough to be masked here" for i in range(40)))
    cfg = TrainConfig(model=str(tiny_bert_dir), corpus=str(corpus), level="sentence", batch_size=6, epochs=2,
                      progress=False, device="cpu")
    whole = train(cfg, log=lambda m: None, save=False)
    monkeypatch.setattr(mirrorfast.trainer, "BatchStream", functools.partial(BatchStream, window=2))
    windowed = train(cfg, log=lambda m: None, save=False)
    assert whole.steps == windowed.steps == 14 and len(windowed.epoch_seconds) == 2
    assert windowed.losses == whole.losses
    # each epoch's wait for host batches is a part of its time
    assert len(windowed.input_wait_seconds) == 2
    assert all(0 <= w <= s for w, s in zip(windowed.input_wait_seconds, windowed.epoch_seconds))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: uploads between CUDA-graph replays")
def test_windows_on_cuda_with_graphs(tiny_bert_dir, tmp_path, monkeypatch):
    """On the GPU's default path (bf16, packed attention, CUDA graphs) windows are uploaded between graph
    replays; the losses match one window per epoch (up to FlashAttention's non-deterministic backward)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"sentence {i} about topic {i % 7}, long enough to be masked here" for i in range(80)))
    cfg = TrainConfig(model=str(tiny_bert_dir), corpus=str(corpus), level="sentence", batch_size=8, epochs=2,
                      precision="bf16", progress=False, device="cuda")
    whole = train(cfg, log=lambda m: None, save=False)
    monkeypatch.setattr(mirrorfast.trainer, "BatchStream", functools.partial(BatchStream, window=3))
    windowed = train(cfg, log=lambda m: None, save=False)
    assert whole.steps == windowed.steps == 20
    assert windowed.losses == pytest.approx(whole.losses, rel=2e-3)

"""Training batches, built on the host and uploaded ahead of the step, in bounded memory.

An epoch's batches are built and uploaded a window (`WINDOW` batches) at a time: while the device trains
on one window, a background thread builds the next on the host; the next epoch's views are tokenized in a
second thread from the start of the epoch before. Host and device memory for batches is two windows,
whatever the corpus size (all of an epoch's batches at once took 390 MiB of host memory per 280,000
sentences). Neither thread touches the device: the main thread uploads, with non-blocking copies.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np

from mirrorfast.data import Batch

# Batches per window. The paper's 10,000 strings at batch 200 are 50 batches: one window per epoch, so
# each epoch's batches are uploaded at its start.
WINDOW = 64


class BatchStream:
    """Device batches, epoch by epoch, from `schedules[epoch]` (each batch's row indices).

    views(epoch) -> that epoch's tokenized views; build(views, rows_per_batch) -> host batches;
    upload(host batches) -> device batches. Use as a context manager: leaving it cancels work not started
    and waits for the threads.
    """

    def __init__(self, views: Callable[[int], object], build: Callable[[object, list[np.ndarray]], list[Batch]],
                 upload: Callable[[list[Batch]], list[Batch]], schedules: list[list[np.ndarray]], window: int = WINDOW):
        self.views, self.build, self.upload = views, build, upload
        self.epochs = len(schedules)
        # Windows in training order: (epoch, the row indices of its batches).
        self.windows = [(epoch, schedule[i : i + window])
                        for epoch, schedule in enumerate(schedules) for i in range(0, len(schedule), window)]
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="mirrorfast-views")
        self.building = ThreadPoolExecutor(1, thread_name_prefix="mirrorfast-batches")
        self.epoch_views: dict[int, Future] = {}
        self.next_window: tuple[int, Future] | None = None  # (window index, its host batches)
        self.first: list[Batch] | None = None
        # Seconds each epoch's loop waited for its batches (built on the host and uploaded): the device sat
        # idle for them unless it still had queued work. The first window is built before training starts.
        self.waited: dict[int, float] = {}

    def __enter__(self) -> "BatchStream":
        return self

    def __exit__(self, *exc) -> None:
        self.tokenizing.shutdown(wait=True, cancel_futures=True)
        self.building.shutdown(wait=True, cancel_futures=True)

    def start(self) -> None:
        """Build and upload the first window (before the training clock starts), and start on the second."""
        if self.windows:
            self._build(0)
            self.first = self._take(0)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        self.epoch_views.pop(epoch - 1, None)  # that epoch's windows are all built
        if epoch + 1 < self.epochs:
            self._views(epoch + 1)  # tokenized in the background for the whole of this epoch
        for index, (window_epoch, _) in enumerate(self.windows):
            if window_epoch != epoch:
                continue
            if index == 0:
                batches, self.first = self.first, None
            else:
                t0 = time.perf_counter()
                batches = self._take(index)
                self.waited[epoch] = self.waited.get(epoch, 0.0) + time.perf_counter() - t0
            yield from batches

    def _views(self, epoch: int) -> Future:
        if epoch not in self.epoch_views:
            self.epoch_views[epoch] = self.tokenizing.submit(self.views, epoch)
        return self.epoch_views[epoch]

    def _build(self, index: int) -> None:
        epoch, rows = self.windows[index]
        views = self._views(epoch)
        self.next_window = (index, self.building.submit(lambda: self.build(views.result(), rows)))

    def _take(self, index: int) -> list[Batch]:
        """Window `index`'s device batches; the next window starts building on the host."""
        built, host = self.next_window
        assert built == index, (built, index)  # windows are taken in order
        batches = self.upload(host.result())
        if index + 1 < len(self.windows):
            self._build(index + 1)
        return batches

"""The serving batcher: one inference thread fed by a bounded queue, and tokenizing off that thread.

Concurrent requests are merged into batches that close at a padded-token budget or after a short wait;
each request gets exactly its own vectors back, in order (see export/server.py for the request path).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from mirrorfast.tokens import Rows, batch_encoder

if TYPE_CHECKING:
    from mirrorfast.export.serve_edge import Metrics

logger = logging.getLogger("mirrorfast.serve")


# ----------------------------------------------------------------------------------------- batcher
class QueueFull(Exception):
    """The bounded queue has no room for this request."""


class WorkerStopped(Exception):
    """The inference worker is stopping or not running: no new requests."""


class _Job:
    __slots__ = ("inputs", "lengths", "vectors", "remaining", "loop", "future", "enqueued", "dead")

    def __init__(self, inputs: list, lengths: list[int], dim: int, loop, future) -> None:
        self.inputs = inputs
        self.lengths = lengths
        self.vectors = np.empty((len(inputs), dim), dtype=np.float32)
        self.remaining = len(inputs)
        self.loop = loop
        self.future = future
        self.enqueued = 0.0
        self.dead = False  # cancelled by the client or failed: skip its remaining inputs


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Batcher:
    """One inference thread fed by a bounded FIFO of inputs; merges concurrent requests into batches.

    `submit` is called on the event loop and returns an awaitable; the worker resolves it with
    loop.call_soon_threadsafe. The queue holds (job, index) pairs so a large request can span batches.
    """

    def __init__(
        self,
        encode: Callable[[list], np.ndarray],  # inputs (token id rows when serving) -> (n, dim)
        dim: int,
        max_batch_tokens: int,
        batch_wait_s: float,
        max_queue: int,
        metrics: Metrics | None = None,
    ) -> None:
        self._encode = encode
        self._dim = dim
        self._budget = max_batch_tokens
        self._wait = batch_wait_s
        self._max_queue = max_queue
        self._metrics = metrics
        self._items: deque[tuple[_Job, int]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._purge = False  # a request was cancelled: the worker purges the queue
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="mirrorfast-inference", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued input, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            self._thread = None

    def abandon_queue(self) -> None:
        """Drop every queued input (a forced exit: nobody will read them); a model call in progress runs on."""
        with self._cond:
            self._items.clear()
            if self._metrics is not None:
                self._metrics.queue_depth.set(0)
            self._cond.notify_all()

    @property
    def queued(self) -> int:
        return len(self._items)

    # -- producer side (event loop)
    def submit(self, inputs: list, lengths: list[int]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        job = _Job(inputs, lengths, self._dim, loop, loop.create_future())
        with self._cond:
            if self._stopping or self._thread is None:
                raise WorkerStopped("the inference worker is not running")
            if self._items and len(self._items) + len(inputs) > self._max_queue:
                # Inputs of cancelled (a client gone) or failed requests must not take this one's room: one pass
                # over the queue, only when it would otherwise be refused.
                self._purge_cancelled()
                if self._items and len(self._items) + len(inputs) > self._max_queue:
                    raise QueueFull()
            job.enqueued = time.monotonic()
            self._items.extend((job, i) for i in range(len(inputs)))
            job.future.add_done_callback(self._purge_if_cancelled)  # a client gone: drop its inputs
            if self._metrics is not None:
                self._metrics.queue_depth.set(len(self._items))
            self._cond.notify()
        return job.future

    def _purge_if_cancelled(self, future: asyncio.Future) -> None:
        """A request's future is done; if it was cancelled (a client gone, a graceful timeout), have the
        worker remove its queued inputs before its next batch rather than when it reaches them: O(1) here, on
        the event loop; one pass over the queue in the worker however many were cancelled meanwhile."""
        if future.cancelled():
            with self._cond:
                self._purge = True
                self._cond.notify()

    def _purge_cancelled(self) -> None:  # with self._cond held
        self._purge = False
        self._items = deque(item for item in self._items if not (item[0].dead or item[0].future.cancelled()))
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._items))

    # -- worker side
    def _take_batch(self) -> list[tuple[_Job, int]] | None:
        """Block until a batch is ready; None when stopping with nothing left."""
        with self._cond:
            while True:  # every wake-up (new inputs, a cancellation, the deadline, stop) looks afresh
                if self._purge:
                    self._purge_cancelled()
                while self._items and (self._items[0][0].dead or self._items[0][0].future.cancelled()):
                    self._items.popleft()  # inputs of dead/cancelled jobs at the head
                if not self._items:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                n, full = self._batch_fits()
                remaining = self._items[0][0].enqueued + self._wait - time.monotonic()  # the oldest's wait
                if full or remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            batch = [self._items.popleft() for _ in range(n)]
            if self._metrics is not None:
                self._metrics.queue_depth.set(len(self._items))
        return batch

    def _batch_fits(self) -> tuple[int, bool]:  # with self._cond held
        """How many queued inputs, from the head, fit the padded-token budget; and whether the next one
        would not (the batch is full)."""
        n, longest = 0, 0
        for job, i in self._items:
            length = job.lengths[i]
            if n and (n + 1) * max(longest, length) > self._budget:
                return n, True
            n += 1
            longest = max(longest, length)
        return n, False

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            batch = [(job, i) for job, i in batch if not job.dead and not job.future.cancelled()]
            if not batch:
                continue
            inputs = [job.inputs[i] for job, i in batch]
            longest = max(job.lengths[i] for job, i in batch)
            try:
                vectors = self._encode(inputs)
                if vectors.shape != (len(inputs), self._dim):
                    raise RuntimeError(f"the encoder returned shape {vectors.shape} for {len(inputs)} inputs")
            except BaseException as exc:  # noqa: BLE001 - reported to the requests, the worker goes on
                logger.exception("inference failed for a batch of %d inputs", len(inputs))
                for job in {id(j): j for j, _ in batch}.values():
                    if not job.dead:
                        job.dead = True
                        self._call(job, None, exc)
                with self._cond:
                    self._purge = True  # their inputs still queued go before the next batch
                continue
            if self._metrics is not None:
                self._metrics.batch_size.observe(len(inputs))
                self._metrics.batch_tokens.observe(len(inputs) * longest)
            for k, (job, i) in enumerate(batch):
                job.vectors[i] = vectors[k]
                job.remaining -= 1
                if job.remaining == 0:
                    self._call(job, job.vectors, None)

    @staticmethod
    def _call(job: _Job, result, error) -> None:
        try:
            job.loop.call_soon_threadsafe(_resolve, job.future, result, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


# -------------------------------------------------------------------------------------- tokenizing


class Tokenizing:
    """Tokenizes requests once, off the inference thread: token ids (special tokens included) for the
    worker. With `truncate`, texts longer than `max_tokens` get the tokenizer's own truncation, which keeps
    the special tokens, in the same single pass. Without it, rows are whole up to `max_tokens` and a longer
    text's row is cut at `max_tokens + 1` (the server refuses it by that length): a 4 MB text is refused
    from its first few thousand characters, not tokenized whole (14 s of this thread on a 2-core CPU).
    `max_tokens=None`: every row whole.

    Private copies of the encoder's tokenizer, so this never races anything else using it. Small requests
    are tokenized inline on the event loop (a thread hop costs more than a few sentences); large ones on a
    dedicated thread with a second copy, so the loop stays responsive.
    """

    INLINE_CHARS = 4096
    # A text over the limit is found from cuts of (limit + 1) x this many characters, then longer ones
    # (`mirrorfast.truncation`): whatever the cut, a row under the limit is the whole text's.
    REFUSE_CHARS_PER_TOKEN = 16

    def __init__(self, encoder, max_tokens: int | None, *, truncate: bool,
                 on_truncated: Callable[[int], object] | None = None) -> None:
        if max_tokens is None:
            cut, options = None, {}
        elif truncate:
            cut, options = max_tokens, {"on_truncated": on_truncated}
        else:
            cut, options = max_tokens + 1, {"chars_per_token_tried": self.REFUSE_CHARS_PER_TOKEN}
        self._inline = batch_encoder(encoder.tokenizer, cut, **options)
        self._pooled = batch_encoder(encoder.tokenizer, cut, **options)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mirrorfast-tokenize")

    def tokenize_sync(self, texts: list[str]) -> Rows:
        return self._pooled(texts)

    async def tokenize(self, texts: list[str]) -> Rows:
        if sum(len(t) for t in texts) <= self.INLINE_CHARS:
            return self._inline(texts)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._pooled, texts)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

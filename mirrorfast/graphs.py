"""CUDA-graph replay of the whole training step (forward, loss, backward, AdamW), one graph per batch shape.

Why: an eager BERT step launches on the order of a thousand kernels from Python, and on the GPU machines
we measured, that host work, not the GPU, sets the step time (benchmarks/RESULTS.md). Packed batches are
padded to a bucketed token count (mirrorfast.data.packed_batch(bucket=...)), so an epoch has only a
few shapes. The first batch of each shape runs eagerly (it is a real step, and it warms up lazily
initialized state: Triton JIT, cuBLAS workspaces, optimizer moments); the second one is captured (a
capture records without running) and replayed, and so is every later batch of that shape: copied into
the graph's static inputs, then replayed. A shape seen once (an epoch's short last batch) is never captured.

Requirements (checked by the trainer): CUDA, packed attention, fp16 or bf16 (autocast or --half-model),
AdamW(fused=True, capturable=True). With fp16 the GradScaler's inf check and scale update are device ops when the optimizer
is fused (no host decision), so they are captured too. Dropout stays random: replays advance the CUDA
generator's offset.
"""

import warnings
from typing import Callable

import torch

from mirrorfast.data import Batch
from mirrorfast.errors import MirrorfastError, first_line


# PyTorch warns once when a capturable optimizer steps outside a capture ("capturable=True can impair
# performance"): the eager first step of each shape does so on purpose, and every later step replays.
UNCAPTURED_STEP_WARNING = "This instance was constructed with capturable=True"


def on_side_stream(fn: Callable, *args):
    """fn(*args) on a side stream, the current stream waiting for it: PyTorch's warm-up recipe, so that lazy
    initialization (Triton JIT, cuBLAS workspaces, optimizer state) never happens inside a capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    return out


def capture(fn: Callable, *args) -> tuple[torch.cuda.CUDAGraph, object]:
    """Record fn(*args) into a CUDA graph (nothing runs); returns the graph and fn's (static) outputs.
    thread_local: another thread of the process (the trainer's tokenizing one) may run meanwhile."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn(*args)
    return graph, out


class GraphedStep:
    """Calls `step(batch) -> loss` eagerly the first time a shape comes, then captures it and replays it.

    At most `max_graphs` shapes are captured (each graph keeps its own activation memory); batches of further
    shapes run eagerly, and `log` says so once.
    """

    def __init__(self, step: Callable[[Batch], torch.Tensor], max_graphs: int = 16,
                 log: Callable[[str], None] = lambda message: None):
        self.step = step
        self.max_graphs = max_graphs
        self.log = log
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Batch, torch.Tensor]] = {}
        self.seen: set[tuple] = set()  # shapes that ran eagerly once
        self.said_full = False

    @staticmethod
    def shape_key(batch: Batch) -> tuple:
        return (*(tuple(t.shape) for t in batch.tensors()), batch.chunks, batch.max_len, batch.views)

    def __call__(self, batch: Batch) -> torch.Tensor:
        key = self.shape_key(batch)
        captured = self.graphs.get(key)
        if captured is None:
            if key in self.seen and len(self.graphs) < self.max_graphs:
                captured = self.graphs[key] = self._capture(batch)
            else:
                if key in self.seen and not self.said_full:
                    self.said_full = True
                    self.log(f"cuda graphs: {self.max_graphs} batch shapes captured; further shapes run eagerly")
                self.seen.add(key)
                return self._eager_on_side_stream(batch)
        graph, static_batch, static_loss = captured
        for static, new in zip(static_batch.tensors(), batch.tensors()):
            static.copy_(new, non_blocking=True)
        graph.replay()
        return static_loss  # read (asynchronously) before the next replay of this graph overwrites it

    def _eager_on_side_stream(self, batch: Batch) -> torch.Tensor:
        return on_side_stream(self._eager_step, batch)

    def _eager_step(self, batch: Batch) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=UNCAPTURED_STEP_WARNING)
            return self.step(batch)

    def _capture(self, batch: Batch):
        static_batch = batch.with_tensors(torch.clone)
        try:
            graph, static_loss = capture(self.step, static_batch)
        except RuntimeError as exc:  # e.g. an operation that synchronizes with the host inside the step
            raise MirrorfastError(f"--cuda-graphs: capturing the training step failed ({first_line(exc)}); "
                                  "train with --no-cuda-graphs") from exc
        return graph, static_batch, static_loss

"""GraphedStep's bookkeeping (which batches run eagerly, which are captured, which replay), with the CUDA
parts stubbed: capture and replay themselves run on a GPU only (benchmarks/gpu_suite.py measures them)."""

import torch

from mirrorfast.data import Batch
from mirrorfast.graphs import GraphedStep


class _Graph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


def _batch(tokens: int, max_len: int = 128) -> Batch:
    return Batch(torch.zeros(1, tokens, dtype=torch.long), position_ids=torch.zeros(1, tokens, dtype=torch.long),
                 cu_seqlens=torch.tensor([0, tokens], dtype=torch.int32), segment_ids=torch.zeros(tokens, dtype=torch.long),
                 max_len=max_len, tokens=tokens, views=2)


def _stubbed(max_graphs: int, logs: list):
    graphed = GraphedStep(lambda batch: torch.tensor(float(batch.tokens)), max_graphs=max_graphs, log=logs.append)
    events = []

    def eager(batch):
        events.append(("eager", batch.tokens))
        return graphed.step(batch)

    def capture(batch):
        events.append(("capture", batch.tokens))
        static = batch.with_tensors(torch.clone)
        return _Graph(), static, torch.tensor(float(batch.tokens))

    graphed._eager_on_side_stream, graphed._capture = eager, capture
    return graphed, events


def test_second_batch_of_a_shape_is_captured_then_replayed():
    logs = []
    graphed, events = _stubbed(max_graphs=16, logs=logs)
    for tokens in (512, 512, 512, 1024, 512, 1024, 1024):
        graphed(_batch(tokens))
    assert events == [("eager", 512), ("capture", 512), ("eager", 1024), ("capture", 1024)]
    replays = {key[0][1]: graph.replays for key, (graph, _, _) in graphed.graphs.items()}
    assert replays == {512: 3, 1024: 2} and logs == []
    # a different static max_len is another shape
    graphed(_batch(512, max_len=160))
    assert events[-1] == ("eager", 512)


def test_at_most_max_graphs_shapes_are_captured():
    logs = []
    graphed, events = _stubbed(max_graphs=2, logs=logs)
    for tokens in (512, 512, 1024, 1024, 1536, 1536, 1536, 512):
        graphed(_batch(tokens))
    assert [e for e in events if e[0] == "capture"] == [("capture", 512), ("capture", 1024)]
    assert events[-3:] == [("eager", 1536), ("eager", 1536), ("eager", 1536)]  # over the cap: eager, every time
    assert len(graphed.graphs) == 2 and logs == ["cuda graphs: 2 batch shapes captured; further shapes run eagerly"]


def test_eager_steps_hide_only_the_capturable_optimizer_warning():
    """The first step of each shape runs the capturable AdamW outside a capture, on purpose: PyTorch's
    warning about that (torch/optim/optimizer.py, its text as of torch 2.13) is dropped, any other is not."""
    import warnings

    def step(batch):
        warnings.warn("This instance was constructed with capturable=True or some of all the param_groups came "
                      "with capturable=True, but step() is running without CUDA graph capture. If you never intend "
                      "to graph-capture this instance, capturable=True can impair performance, and you should set "
                      "capturable=False.")
        warnings.warn("something else")
        return torch.tensor(1.0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GraphedStep(step)._eager_step(_batch(512))
    assert [str(w.message) for w in caught] == ["something else"]

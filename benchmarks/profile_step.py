#!/usr/bin/env python
"""Where a training step's time goes: torch.profiler over a real `mirrorfast.trainer.train()` run.

    python benchmarks/profile_step.py                          # BERT-base (random init), bf16, eager, GPU
    python benchmarks/profile_step.py --precision fp16 --cuda-graphs
    python benchmarks/profile_step.py --half-model                # the opt-in (fastest measured combination)
    MIRRORFAST_PACKED_ATTENTION=flash python benchmarks/profile_step.py  # FlashAttention varlen instead
    python benchmarks/profile_step.py --tiny --device cpu      # a 2-layer BERT on a few sentences (script check)

One warm-up run first (Triton JIT, cuBLAS and allocator warm-up), then the profiled run of `--epochs`
epochs of the paper's 10k sentences (batch 200 strings = 400 views, sentence preset). Prints the wall time,
the device (or CPU) time per step, and one table of operators and kernels sorted by their own device time
(`--rows`). The table is torch.profiler's; kernels replayed from a CUDA graph show as one graph launch, so
profile with the default `--no-cuda-graphs` to see them one by one. Data as in gpu_suite.py (../shared/data,
$MIRRORFAST_DATA, or the .gpu carry).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from from_checkout import ensure_importable  # noqa: E402
from script_main import run_main  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="bf16")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
                   help="profile the graphed step (its kernels then show as graph launches); default off")
    p.add_argument("--half-model", action="store_true", help="the model in half precision (--half-model)")
    p.add_argument("--epochs", type=int, default=2, help="epochs in the profiled run (default 2)")
    p.add_argument("--sentences", type=int, help="use the first N corpus strings (default: all 10k; --tiny: 48)")
    p.add_argument("--rows", type=int, default=28, help="table rows (default 28)")
    p.add_argument("--tiny", action="store_true", help="2-layer hidden-64 BERT, 48 sentences, batch 16")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--corpus", help="the corpus file (default: as gpu_suite.py finds it)")
    args = p.parse_args(argv)
    for name in ("epochs", "sentences", "rows"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")

    ensure_importable()
    import torch

    # auto falls back to the CPU for --tiny only: BERT-base on the 10k sentences would take hours there
    if not torch.cuda.is_available() and (args.device == "cuda" or args.device == "auto" and not args.tiny):
        raise SystemExit("profile_step: error: needs a CUDA GPU (none here); to try it on a CPU: --tiny --device cpu")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())

    import gpu_suite
    from mirrorfast.config import TrainConfig
    from mirrorfast.trainer import train

    source = gpu_suite._data_file(args.corpus, gpu_suite.CORPUS_NAME)  # a missing corpus: one line, no work done
    with tempfile.TemporaryDirectory(prefix="mirrorfast-profile-") as tmp:  # removed on SIGTERM too (run_main)
        work = Path(tmp)
        model = gpu_suite._random_bert_dir(work, args.tiny, gpu_suite._minilm_source())
        n = args.sentences or (48 if args.tiny else None)
        corpus = gpu_suite._subset_corpus(source, n, work / "corpus.txt")
        config = TrainConfig(model=str(model), corpus=str(corpus), level="sentence", precision=args.precision,
                             device="cuda" if cuda else "cpu", cuda_graphs=args.cuda_graphs, epochs=args.epochs,
                             half_model=args.half_model,
                             batch_size=16 if args.tiny else 200, dedup=False, output=str(work / "unused"),
                             progress=False)

        train(TrainConfig(**{**config.__dict__, "epochs": 1}), log=lambda m: None, save=False)  # warm-up
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            result = train(config, log=lambda m: None, save=False)
        wall = time.perf_counter() - t0

    events = prof.key_averages()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    kernels = [e for e in events if cuda and e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.self_device_time_total for e in kernels) if cuda else sum(e.self_cpu_time_total for e in events)
    where = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"{where}: {model.name}, {args.precision}, cuda_graphs={args.cuda_graphs}, half_model={args.half_model}; "
          f"{result.steps} steps, "
          f"epochs {', '.join(f'{s:.2f} s' for s in result.epoch_seconds)} (profiler on), wall {wall:.1f} s")
    print(f"{'device kernel' if cuda else 'CPU operator'} time: {busy_us / 1e3:.1f} ms in all, "
          f"{busy_us / 1e3 / max(result.steps, 1):.2f} ms per step")
    print(events.table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "profile_step"))

"""Inference table: PyTorch vs onnxruntime (CUDA EP fp32, our fp16 export with I/O binding) vs int8 on the CPU.

    python benchmarks/onnx_gpu_table.py                       # GPU machine: BERT-base, batch 256 x 32 tokens
    python benchmarks/onnx_gpu_table.py --cpu-only --quick    # any machine: CPU rows on a small model
    python benchmarks/onnx_gpu_table.py --gpu-only            # GPU machine, short of time: no CPU rows

BERT-base is built from a config (random weights: hidden 768, 12 layers, 12 heads) with a generated
WordPiece vocabulary, so nothing is downloaded; it goes through `mirrorfast.export.export_model` (fp16 for
the GPU, int8 for the CPU, each with its parity check) like any trained model. The input is one batch of
sentences of exactly --seq tokens ([CLS] ... [SEP], no padding); every row embeds the same batch
(pooled + L2-normalized sentence_embedding) and reports the median of many timed runs after warm-up.

Rows (GPU ones only where there is a CUDA GPU and, for onnxruntime, the CUDA execution provider, i.e.
onnxruntime-gpu first on PYTHONPATH; otherwise they are listed as skipped):
  PyTorch fp32 / fp16 autocast (CUDA)    inputs already on the device
  onnxruntime CUDA EP fp32 / fp16 export  "device-resident": inputs bound as CUDA OrtValues, output bound
                                          to a CUDA buffer (I/O binding), only run_with_iobinding timed;
                                          "host I/O included": numpy in, bind_cpu_input, numpy out;
                                          fp16 also with other CUDA EP options (FP16_VARIANTS): replayed
                                          from an onnxruntime CUDA graph (no launches), TunableOp (GEMM
                                          kernels chosen by timing), both
  fp16 export with the first-token branch  the same model exported again with fp16_first_token=True (opt-in:
                                          export/first_token.py): cut to sentence_embedding as OnnxEncoder
                                          runs it (with the variants), and whole, as a client that loads the
                                          file uncut runs it
  fp16 export, attention experiments      the same file with its attention on other kernels
                                          (ATTENTION_VARIANTS: packing mode, no mask), checked against it
  OnnxEncoder.encode (CUDA)               the serving path: tokenization + host I/O + fp16 model
  then, on the GPU, each fp16 file's kernels by GPU time (torch.profiler; --profile-runs)
  PyTorch fp32 / onnxruntime fp32 / int8 (CPU)

It prints one table and writes nothing. It runs from a plain checkout (no install needed).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from from_checkout import ensure_importable  # noqa: E402
from script_main import run_main  # noqa: E402

ensure_importable()  # works from a plain checkout too (the GPU machine)
from mirrorfast.export import OnnxEncoder, export_model  # noqa: E402
from mirrorfast.errors import MirrorfastError, first_line  # noqa: E402
from mirrorfast.export.runtime import open_session  # noqa: E402
from mirrorfast.export.onnx import SentenceEmbeddingGraph, _quiet_logging  # noqa: E402

OUTPUTS = ("sentence_embedding",)  # fetched alone, from the graph cut down to it, as OnnxEncoder runs it

WORDS = ("the a man woman dog cat plays runs eats sits on in with near guitar field street red small "
         "quickly slowly music food car train city river young old happy table chair window light").split()


def _vocab() -> list[str]:
    chars = string.ascii_lowercase + string.digits
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars + string.punctuation)
            + ["##" + c for c in chars] + WORDS)


def build_model(workdir: Path, quick: bool, max_length: int) -> Path:
    """A random-weight BERT (BERT-base, or a small one with --quick) + generated tokenizer, saved to disk."""
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    if quick:
        config = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    else:
        config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    model_dir = workdir / ("bert-small" if quick else "bert-base")
    BertModel(config).save_pretrained(model_dir, safe_serialization=True)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(_vocab())})
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(model_dir)
    return model_dir


def make_texts(batch: int, seq: int) -> list[str]:
    """`batch` sentences of seq - 2 known words each: exactly `seq` tokens with [CLS]/[SEP]."""
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=seq - 2)) for _ in range(batch)]


def measure(fn, warmup: int, iters: int, max_seconds: float, sync=lambda: None) -> tuple[float, int]:
    """Median milliseconds of fn() over up to `iters` runs (at least 3, at most max_seconds), after warm-up."""
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < iters and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times), len(times)


class Table:
    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.rows: list[tuple] = []
        self.skipped: list[str] = []
        self.profiles: list[str] = []  # printed after the table

    def add(self, name: str, device: str, ms: float, n: int, baseline: str | None = None, note: str = "") -> None:
        self.rows.append((name, device, ms, n, baseline, note))
        print(f"  {name} [{device}]: {ms:.2f} ms (median of {n})", flush=True)

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f"{what}: skipped ({why})")
        print(f"  {what}: skipped ({why})", flush=True)

    def render(self) -> str:
        by_name = {r[0]: r[2] for r in self.rows}
        lines = [
            "| row | device | median ms / batch | sentences/s | speed-up vs PyTorch fp32 (same device) | runs | notes |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for name, device, ms, n, baseline, note in self.rows:
            if baseline is None:
                speedup = "baseline"
            else:
                speedup = f"{by_name[baseline] / ms:.2f}x" if baseline in by_name else "n/a"
            lines.append(f"| {name} | {device} | {ms:.2f} | {self.batch / ms * 1000:.0f} | {speedup} | {n} | {note} |")
        return "\n".join(lines + [f"\n{s}" if i == 0 else s for i, s in enumerate(self.skipped)])


def kernel_profile(run, runs: int, top: int = 15) -> str:
    """Where run()'s GPU time goes, kernel by kernel: torch.profiler over `runs` calls. Its CUDA activity comes
    from CUPTI, which records every kernel of the process, onnxruntime's included (onnxruntime's own profiler
    times CUDA nodes on the host, where they are only launched). A Markdown table of the `top` kernels.
    Without a GPU it profiles the CPU's operators instead (torch's only: how the tests exercise it)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            run()
        sync()
    kernels = sorted((e for e in prof.key_averages() if e.device_type == kind and self_us(e) > 0),
                     key=self_us, reverse=True)
    busy_us = sum(self_us(e) for e in kernels)
    shown = kernels[:top]
    lines = [f"{'GPU kernel' if cuda else 'CPU operator'} time {busy_us / runs / 1e3:.3f} ms per run ({runs} runs "
             f"profiled{'; the CUDA-graph and TunableOp variants are not' if cuda else ''})",
             "| kernel | ms per run | share | launches per run |", "| --- | ---: | ---: | ---: |"]
    for e in shown:
        name = e.key if len(e.key) <= 100 else e.key[:97] + "..."
        lines.append(f"| `{name}` | {self_us(e) / runs / 1e3:.3f} | {self_us(e) / max(busy_us, 1e-9):.1%} | "
                     f"{e.count / runs:g} |")
    rest = busy_us - sum(self_us(e) for e in shown)
    lines.append(f"| {len(kernels) - len(shown)} other kernels | {rest / runs / 1e3:.3f} | "
                 f"{rest / max(busy_us, 1e-9):.1%} | |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_rows(table: Table, graph: torch.nn.Module, feeds: dict, device: str, args, cpu_iters: int) -> None:
    if device == "cuda":
        model = graph.to("cuda").eval()
        inputs = {k: torch.from_numpy(v).to("cuda") for k, v in feeds.items()}
        sync = torch.cuda.synchronize
        with torch.inference_mode():
            ms, n = measure(lambda: model(**inputs), 10, args.iters, 30, sync)
            table.add("PyTorch fp32", "cuda", ms, n, note="inputs on the device")
            with torch.autocast("cuda", dtype=torch.float16):
                ms, n = measure(lambda: model(**inputs), 10, args.iters, 30, sync)
            table.add("PyTorch fp16 autocast", "cuda", ms, n, "PyTorch fp32", "inputs on the device")
        graph.to("cpu")
        torch.cuda.empty_cache()
    else:
        inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
        with torch.inference_mode():
            ms, n = measure(lambda: graph(**inputs), 1, cpu_iters, args.cpu_seconds)
        table.add("PyTorch fp32 (CPU)", "cpu", ms, n, note=f"{torch.get_num_threads()} threads")


def ort_cuda_rows(table: Table, export_dir: Path, feeds: dict, texts: list[str], hidden: int, args,
                  branch_dir: Path | None = None) -> None:
    """branch_dir: an export whose model_fp16.onnx has the first-token branch (fp16_first_token=True, opt-in
    until these rows show whether it pays on the GPU): timed cut (as OnnxEncoder runs it) and whole (as a
    client that loads the file uncut, e.g. Triton with both outputs, runs it)."""
    import onnxruntime as ort

    files = [("fp32 model.onnx", export_dir / "model.onnx", OUTPUTS),
             ("fp16 model_fp16.onnx", export_dir / "model_fp16.onnx", OUTPUTS)]
    if branch_dir is not None:
        files += [(f"fp16 model_fp16.onnx + first-token branch{how}", branch_dir / "model_fp16.onnx", outputs)
                  for how, outputs in ((", cut", OUTPUTS), (", whole graph", None))]
    for label, path, outputs in files:
        session = open_session(path, ["CUDAExecutionProvider", "CPUExecutionProvider"], outputs=outputs)
        if session.get_providers()[0] != "CUDAExecutionProvider":
            table.skip(f"onnxruntime CUDA EP {label}", "the CUDA EP did not start on this machine")
            return
        names = [i.name for i in session.get_inputs()]
        # device-resident: inputs and output live on the GPU; only the run is timed
        on_device = {k: ort.OrtValue.ortvalue_from_numpy(feeds[k], "cuda", 0) for k in names}
        out = ort.OrtValue.ortvalue_from_shape_and_type((len(texts), hidden), np.float32, "cuda", 0)
        binding = session.io_binding()
        for k in names:
            binding.bind_ortvalue_input(k, on_device[k])
        binding.bind_ortvalue_output("sentence_embedding", out)
        ms, n = measure(lambda: session.run_with_iobinding(binding), 10, args.iters, 30, torch.cuda.synchronize)
        table.add(f"onnxruntime CUDA EP {label}, device-resident", "cuda", ms, n, "PyTorch fp32", "I/O binding")
        if outputs is None:  # the whole graph: its device-resident time is all this row is for
            continue

        # host I/O included: numpy in (copied to the device), embeddings copied back to numpy
        def host_io():
            b = session.io_binding()
            for k in names:
                b.bind_cpu_input(k, feeds[k])
            b.bind_output("sentence_embedding", "cuda")
            session.run_with_iobinding(b)
            return b.copy_outputs_to_cpu()[0]

        ms, n = measure(host_io, 10, args.iters, 30, torch.cuda.synchronize)
        table.add(f"onnxruntime CUDA EP {label}, host I/O included", "cuda", ms, n, "PyTorch fp32",
                  "numpy in/out, I/O binding")
        if path.name == "model_fp16.onnx":
            if args.profile_runs:  # the target's row (issue 4): what its ~4.5 ms are made of
                table.profiles.append(f"### Where the GPU time of {label} goes (device-resident, I/O binding)\n"
                                      + kernel_profile(lambda: session.run_with_iobinding(binding), args.profile_runs))
            fp16_variant_rows(table, path, label, on_device, out, args)
            if path.parent == export_dir:  # the shipped fp16 file's attention on other kernels
                attention_variant_rows(table, path, label, on_device, out, args)

    encoder = OnnxEncoder(export_dir, provider="cuda")
    ms, n = measure(lambda: encoder.encode(texts, batch_size=len(texts)), 5, args.iters, 30)
    table.add(f"OnnxEncoder.encode ({encoder.model_path.name})", "cuda", ms, n, "PyTorch fp32",
              "tokenization + host I/O included")


# CUDA EP provider options tried on the fp16 export, each against the plain run: (label, options, note).
FP16_VARIANTS = (
    ("CUDA graph", {"enable_cuda_graph": "1"}, "I/O binding, graph replay"),
    ("TunableOp", {"tunable_op_enable": "1", "tunable_op_tuning_enable": "1"},
     "I/O binding, kernels chosen by timing them on the first runs"),
    ("CUDA graph + TunableOp", {"enable_cuda_graph": "1", "tunable_op_enable": "1", "tunable_op_tuning_enable": "1"},
     "I/O binding, graph replay of the tuned kernels"),
)


def fp16_variant_rows(table: Table, path: Path, label: str, on_device: dict, out, args) -> None:
    """The device-resident fp16 run with other CUDA EP options (FP16_VARIANTS). A CUDA graph replays fixed
    addresses: inputs and output stay bound to the same device buffers, and the first run captures it.
    TunableOp times the candidate kernels of its ops (GEMMs) on the first runs, during the warm-up."""
    expected = out.numpy().copy()  # the plain session's vectors, left in `out` by its last run
    for variant, options, note in FP16_VARIANTS:
        what = f"onnxruntime CUDA EP {label}, {variant}"
        try:
            session = open_session(path, [("CUDAExecutionProvider", options), "CPUExecutionProvider"], outputs=OUTPUTS)
            binding = session.io_binding()
            for k, value in on_device.items():
                binding.bind_ortvalue_input(k, value)
            binding.bind_ortvalue_output("sentence_embedding", out)
            session.run_with_iobinding(binding)  # warm-up (capture, tuning)
            ms, n = measure(lambda: session.run_with_iobinding(binding), 10, args.iters, 30, torch.cuda.synchronize)
        except Exception as exc:  # noqa: BLE001 - e.g. nodes the CUDA EP leaves to the CPU make capture impossible
            table.skip(what, f"failed: {first_line(exc)[:200]}")
            continue
        worst = float(np.abs(out.numpy() - expected).max())
        if worst > 1e-3:  # the variant must compute what the plain session computed
            table.skip(what, f"its vectors differ from the plain run's by up to {worst:.2e}")
            continue
        table.add(f"{what}, device-resident", "cuda", ms, n, "PyTorch fp32", note)


def packing_mode(fp16_path: Path, out_path: Path) -> None:
    """The fp16 graph in onnxruntime's packing mode (convert_to_packing_mode): RemovePadding drops the padding
    tokens before the first layer, PackedAttention takes the packed sequences, RestorePadding puts them back.
    CUDA-only ops: no CPU execution provider runs this file."""
    import onnx
    from onnxruntime.transformers.convert_to_packing_mode import PackingMode
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(fp16_path)))
    with _quiet_logging():
        PackingMode(model).convert()
    if not model.get_nodes_by_op_type("PackedAttention"):
        raise MirrorfastError("convert_to_packing_mode left no PackedAttention node")
    model.save_model_to_file(str(out_path))


def without_attention_mask(fp16_path: Path, out_path: Path) -> None:
    """The fp16 graph with its Attention nodes' mask input removed: right only for batches without padding
    (as this table's), a diagnostic of what the attention would cost on the kernels onnxruntime keeps for
    unmasked attention (FlashAttention)."""
    import onnx

    model = onnx.load(str(fp16_path))
    attention = [node for node in model.graph.node if node.op_type == "Attention"]
    if not attention:
        raise MirrorfastError("no Attention node in the fp16 graph")
    for node in attention:
        del node.input[3:]  # input 3 is mask_index; 4 (past) and later are unused in this graph
    onnx.save(model, str(out_path))


# fp16 graphs whose attention runs on other kernels than the shipped file's, each against it. onnxruntime-gpu
# 1.31.1 on an H200 (2026-11-27) ran the shipped file's Attention op (a 1-D mask from EmbedLayerNormalization)
# through cuDNN's flash SDPA: 0.77 of 3.99 ms of GPU time at 256 x 32 tokens; with cuDNN off
# (ORT_ENABLE_CUDNN_FLASH_ATTENTION=0) through the unfused kernels, 4.95 ms against 4.35 for the whole run.
ATTENTION_VARIANTS = (
    ("packing mode", packing_mode, "RemovePadding + PackedAttention (convert_to_packing_mode), I/O binding"),
    ("no attention mask (unpadded batches only)", without_attention_mask,
     "diagnostic: Attention without its mask input, I/O binding"),
)


def attention_variant_rows(table: Table, path: Path, label: str, on_device: dict, out, args) -> None:
    """The device-resident fp16 run of graphs transformed by ATTENTION_VARIANTS, each checked against the
    shipped file's vectors (left in `out` by its last run) and profiled like it."""
    expected = out.numpy().copy()
    for variant, transform, note in ATTENTION_VARIANTS:
        what = f"onnxruntime CUDA EP {label}, {variant}"
        try:
            variant_path = path.with_name(f"{path.stem}-{transform.__name__}.onnx")
            transform(path, variant_path)
            session = open_session(variant_path, ["CUDAExecutionProvider", "CPUExecutionProvider"], outputs=OUTPUTS)
            binding = session.io_binding()
            for k, value in on_device.items():
                binding.bind_ortvalue_input(k, value)
            binding.bind_ortvalue_output("sentence_embedding", out)
            session.run_with_iobinding(binding)
            ms, n = measure(lambda: session.run_with_iobinding(binding), 10, args.iters, 30, torch.cuda.synchronize)
        except Exception as exc:  # noqa: BLE001 - an experiment: the other rows still run
            table.skip(what, f"failed: {type(exc).__name__}: {first_line(exc)[:200]}")
            continue
        worst = float(np.abs(out.numpy() - expected).max())
        if worst > 1e-3:
            table.skip(what, f"its vectors differ from the shipped file's by up to {worst:.2e}")
            continue
        table.add(f"{what}, device-resident", "cuda", ms, n, "PyTorch fp32", note)
        if args.profile_runs:
            table.profiles.append(f"### Where the GPU time of {label}, {variant} goes (device-resident)\n"
                                  + kernel_profile(lambda: session.run_with_iobinding(binding), args.profile_runs))


def ort_cpu_rows(table: Table, export_dir: Path, feeds: dict, args, cpu_iters: int) -> None:
    for label, file in (("fp32 model.onnx", "model.onnx"), ("int8 model_int8.onnx", "model_int8.onnx")):
        session = open_session(export_dir / file, ["CPUExecutionProvider"], outputs=OUTPUTS)
        names = [i.name for i in session.get_inputs()]
        inputs = {k: feeds[k] for k in names}
        ms, n = measure(lambda: session.run(["sentence_embedding"], inputs), 1, cpu_iters, args.cpu_seconds)
        table.add(f"onnxruntime CPU EP {label}", "cpu", ms, n, "PyTorch fp32 (CPU)", "numpy in/out")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-only", action="store_true", help="skip every GPU row, even where there is a GPU")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU rows and the int8 export")
    parser.add_argument("--quick", action="store_true", help="small model (hidden 256, 4 layers), batch 32")
    parser.add_argument("--batch", type=int, default=None, help="sentences per batch (default 256; 32 with --quick)")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sentence, [CLS]/[SEP] included (default 32)")
    parser.add_argument("--iters", type=int, default=100, help="timed GPU runs per row (default 100)")
    parser.add_argument("--cpu-iters", type=int, default=None, help="timed CPU runs per row (default 10; 5 quick)")
    parser.add_argument("--cpu-seconds", type=float, default=20.0, help="stop a CPU row after this long (>= 3 runs)")
    parser.add_argument("--profile-runs", type=int, default=20,
                        help="GPU: profile the fp16 export's kernels over this many runs after its rows (0: off)")
    args = parser.parse_args(argv)
    batch = args.batch or (32 if args.quick else 256)
    cpu_iters = args.cpu_iters or (5 if args.quick else 10)
    if args.seq < 3:
        parser.error("--seq must be at least 3")
    if args.gpu_only and args.cpu_only:
        parser.error("--gpu-only and --cpu-only exclude each other")
    if args.gpu_only and not torch.cuda.is_available():  # before the export: BERT-base takes ~100 s on a CPU
        raise SystemExit("onnx_gpu_table: error: --gpu-only needs a CUDA GPU (none here); without it the CPU rows run")
    started = time.perf_counter()

    import onnxruntime as ort

    has_cuda = torch.cuda.is_available() and not args.cpu_only
    has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    print(f"machine: {os.cpu_count()} CPU cores ({_cpu_name()}); "
          f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())})")

    max_length = max(64, args.seq)
    with tempfile.TemporaryDirectory(prefix="mirrorfast-onnx-table-") as tmp:
        workdir = Path(tmp)
        model_dir = build_model(workdir, args.quick, max_length)
        t0 = time.perf_counter()
        export_dir = workdir / "export"
        result = export_model(model_dir, export_dir, fp16=has_cuda and has_cuda_ep, int8=not args.gpu_only,
                              max_length=max_length)
        parity = ", ".join(f"{k} {v['min_cosine']:.5f} on {v['provider']}" for k, v in result.parity.items())
        print(f"exported {model_dir.name} in {time.perf_counter() - t0:.1f}s; parity min cosine: {parity}")
        branch_dir, branch_failure = None, None
        if has_cuda and has_cuda_ep:  # the opt-in fp16 file with the first-token branch, for its rows
            t0 = time.perf_counter()
            try:
                result = export_model(model_dir, workdir / "export-fp16-branch", fp16=True, fp16_first_token=True,
                                      max_length=max_length)
            except MirrorfastError as exc:  # e.g. its parity on the CUDA EP: the other rows still run
                branch_failure = f"the export with fp16_first_token=True failed: {first_line(exc)[:300]}"
                print(branch_failure)
            else:
                branch_dir = result.out_dir
                print(f"exported it again with fp16_first_token=True in {time.perf_counter() - t0:.1f}s; parity of "
                      f"model_fp16.onnx: min cosine {result.parity['model_fp16.onnx']['min_cosine']:.5f} on "
                      f"{result.parity['model_fp16.onnx']['provider']}")

        from mirrorfast.model import load_encoder

        encoder = load_encoder(model_dir, max_length=max_length)
        hidden = encoder.dim
        graph = SentenceEmbeddingGraph(encoder.model, encoder.pooling, True, True).eval()
        texts = make_texts(batch, args.seq)
        tokens = encoder.tokenizer(texts, padding=True, return_tensors="np")
        feeds = {k: v.astype(np.int64) for k, v in tokens.items()}
        assert feeds["input_ids"].shape == (batch, args.seq), feeds["input_ids"].shape
        print(f"model: {model_dir.name} (hidden {hidden}, {encoder.model.config.num_hidden_layers} layers, random "
              f"weights, {encoder.pooling} pooling); batch {batch} x {args.seq} tokens")

        table = Table(batch)
        if branch_failure:
            table.skip("onnxruntime CUDA EP fp16 model_fp16.onnx + first-token branch", branch_failure)
        if has_cuda:
            torch_rows(table, graph, feeds, "cuda", args, cpu_iters)
            if has_cuda_ep:
                ort_cuda_rows(table, export_dir, feeds, texts, hidden, args, branch_dir)
            else:
                table.skip("onnxruntime CUDA EP rows", "this onnxruntime has no CUDAExecutionProvider: "
                           "put onnxruntime-gpu first on PYTHONPATH")
        else:
            why = "--cpu-only" if args.cpu_only else "no CUDA GPU for PyTorch"
            table.skip("GPU rows (PyTorch CUDA, onnxruntime CUDA EP)", why)
        if args.gpu_only:
            table.skip("CPU rows (PyTorch, onnxruntime fp32 / int8)", "--gpu-only")
        else:
            torch_rows(table, graph, feeds, "cpu", args, cpu_iters)
            ort_cpu_rows(table, export_dir, feeds, args, cpu_iters)

    print()
    print(f"## Inference, {'small BERT (hidden 256, 4 layers)' if args.quick else 'BERT-base'}, "
          f"batch {batch} x {args.seq} tokens")
    print(table.render())
    for text in table.profiles:
        print(f"\n{text}")
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "onnx_gpu_table"))

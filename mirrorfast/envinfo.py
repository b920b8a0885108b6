"""`mirrorfast env`: what this machine offers mirrorfast, and what `train`, `eval` and `encode` will use on it.

For checking an installation, and for bug reports (like `transformers env`): versions, the GPU, the
optional pieces (triton, onnxruntime and its providers, the packaged default model), and the paths the
trainer picks here by default (device, attention, loss), from the same functions the trainer calls.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys


def package_version(distribution: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def default_run_packed_kernel(device) -> str:
    """The packed-attention kernel `mirrorfast train --fp16` would take on `device` with its defaults (the
    word preset; the packaged MiniLM's heads, or BERT-base's where that package is missing)."""
    from transformers import AutoConfig, BertConfig

    from mirrorfast.config import TrainConfig
    from mirrorfast.errors import MirrorfastError
    from mirrorfast.model import default_model_path
    from mirrorfast.plan import run_packed_kernel

    cfg = TrainConfig().resolved()
    try:
        model_config = AutoConfig.from_pretrained(default_model_path())
    except MirrorfastError:
        model_config = BertConfig()
    return run_packed_kernel(cfg, model_config, device, cfg.batch_size)


def report() -> dict:
    import torch

    import mirrorfast
    from mirrorfast.errors import MirrorfastError
    from mirrorfast.kernels import resolve_backend
    from mirrorfast.model import pick_device
    from mirrorfast.packing import flash_supported
    from mirrorfast.plan import cpu_bf16_emulated, cpu_has_native_bf16, environment_errors

    device = pick_device("auto")
    cuda = device.type == "cuda"
    info: dict = {
        "mirrorfast": mirrorfast.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu_has_native_bf16(),  # --bf16 pays on the CPU (benchmarks/RESULTS.md)
        "cpu_bf16_emulated": cpu_bf16_emulated(),  # --bf16 is ~20x slower than fp32 on the CPU (train warns)
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
    }
    for name in ("transformers", "tokenizers", "triton", "onnx", "sentence-transformers"):
        info[name] = package_version(name)
    installed = [d for d in ("onnxruntime-gpu", "onnxruntime") if package_version(d)]
    info["onnxruntime"] = ", ".join(f"{d} {package_version(d)}" for d in installed) or None
    if len(installed) == 2:  # they share the `onnxruntime` module: whichever was installed last wins
        info["onnxruntime"] += " (both installed: uninstall both, then install one)"
    if installed:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    try:
        from mirrorfast.model import default_model_path

        info["default_model"] = str(default_model_path())
    except Exception as exc:  # noqa: BLE001 - MirrorfastError with the install hint
        info["default_model"] = f"missing: {exc}"
    # What `mirrorfast train` would run here without options (--fp16/--bf16 on a GPU for the packed paths).
    info["train_device"] = str(device)
    # Facts from the trainer's own functions, not a re-derivation of its choice: `--attention auto` packs on
    # CUDA with --fp16/--bf16 where train_flash_attention is true, with train_packed_kernel.
    info["train_flash_attention"] = flash_supported(device)
    try:
        info["train_packed_kernel"] = default_run_packed_kernel(device)
    except MirrorfastError as exc:  # an override this machine cannot honour: say so, as training would
        info["train_packed_kernel"] = f"error: {exc}"
    try:
        info["train_loss"] = resolve_backend("auto", device)
    except MirrorfastError as exc:  # MIRRORFAST_KERNELS mistyped: listed below too
        info["train_loss"] = f"error: {exc}"
    info["overrides"] = {k: v for k, v in os.environ.items()
                         if k.startswith("MIRRORFAST_") and k != "MIRRORFAST_API_KEY"}
    info["override_errors"] = environment_errors()  # what `train` would stop on, all of it
    return info


def render(info: dict) -> str:
    width = max(map(len, info))
    lines = []
    for key, value in info.items():
        if value is None:
            value = "not installed" if key not in ("gpu", "gpu_capability", "torch_cuda") else "none"
        elif isinstance(value, list):
            value = ("; ".join(value) if key == "override_errors" else ", ".join(value)) or "none"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
        lines.append(f"{key.ljust(width)}  {value}")
    return "\n".join(lines)

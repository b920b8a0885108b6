"""ONNX export and inference: `export_model` (export/onnx.py) and `OnnxEncoder` (export/runtime.py).

Imports are lazy (PEP 562): `import mirrorfast.export` loads neither torch nor onnxruntime; each is
imported when first used, and a missing onnxruntime is a MirrorfastError naming the extra to install.
"""

__all__ = ["OnnxEncoder", "export_model", "is_export_dir"]


def __getattr__(name: str):
    if name == "export_model":
        from mirrorfast.export.onnx import export_model

        return export_model
    if name in ("OnnxEncoder", "is_export_dir"):
        from mirrorfast.export import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

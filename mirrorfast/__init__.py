"""mirrorfast: fast Mirror-BERT training, evaluation, ONNX export and serving."""

from mirrorfast.errors import MirrorfastError

__version__ = "0.1.0"
__all__ = ["MirrorfastError", "__version__"]

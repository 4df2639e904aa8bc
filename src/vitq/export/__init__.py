"""Export of a quantized model to a file a standard runtime runs (ONNX QDQ), and running that file."""

from vitq.export.onnx import export  # noqa: F401

__all__ = ["export"]

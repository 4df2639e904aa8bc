"""Export of a quantized model to a file a standard runtime runs (ONNX QDQ), and running that file:
``forms`` (the graph forms of the quantizers and layers), ``onnx`` (the writer, :func:`export`) and
``runtimes`` (onnxruntime / OpenVINO: running, checking, and the work-arounds their kernels need)."""

from vitq.export.onnx import export  # noqa: F401

__all__ = ["export"]

"""vitq: post-training quantization of vision transformers (Evol-Q, APQ-ViT, PTQ-ViT and baselines)."""

from vitq._version import __version__  # noqa: E402
from vitq.api import calibrate, prepare, refine, round_weights  # noqa: E402
from vitq.errors import VitqError  # noqa: E402
from vitq.evaluate import evaluate  # noqa: E402
from vitq.export.onnx import export  # noqa: E402  (the function; the module is vitq.export.onnx in sys.modules)
from vitq.scheme import Override, Scheme  # noqa: E402
from vitq.state import load, save  # noqa: E402

__all__ = ["Override", "Scheme", "VitqError", "calibrate", "evaluate", "export", "load", "prepare", "refine",
           "round_weights", "save", "__version__"]

"""vitq: post-training quantization of vision transformers (Evol-Q, APQ-ViT, PTQ-ViT and baselines)."""

__version__ = "0.1.0"

from vitq.api import calibrate, prepare, refine, round_weights  # noqa: E402
from vitq.errors import VitqError  # noqa: E402
from vitq.evaluate import evaluate  # noqa: E402
from vitq.export import export  # noqa: E402  (the function; the module is vitq.export in sys.modules)
from vitq.scheme import Override, Scheme  # noqa: E402
from vitq.state import load, save  # noqa: E402

__all__ = ["Override", "Scheme", "VitqError", "calibrate", "evaluate", "export", "load", "prepare", "refine",
           "round_weights", "save", "__version__"]

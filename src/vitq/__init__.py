"""vitq: post-training quantization of vision transformers (Evol-Q, APQ-ViT, PTQ-ViT and baselines).

The pipeline, one package per step: :mod:`vitq.models` (model loading and families) -> :func:`prepare` (a
scheme's quantizers from :mod:`vitq.quant`) -> :func:`calibrate` (a method of :mod:`vitq.methods`) ->
:func:`round_weights` / :func:`refine` (:mod:`vitq.refine`) -> :func:`search` (:mod:`vitq.search`: what a
deployment target should quantize) -> :func:`evaluate` / :func:`save` / :func:`export` (:mod:`vitq.export`).
:func:`quantize` runs them in that order.
"""

from vitq._version import __version__
from vitq.api import calibrate, prepare, quantize, refine, round_weights
from vitq.errors import VitqError
from vitq.evaluate import evaluate
from vitq.export import export  # the function; the package is vitq.export in sys.modules
from vitq.scheme import Override, Scheme
from vitq.search import search  # the function; the package is vitq.search in sys.modules
from vitq.state import load, save
from vitq.sweep import sweep  # the function; the package is vitq.sweep in sys.modules

__all__ = ["Override", "Scheme", "VitqError", "__version__", "calibrate", "evaluate", "export", "load", "prepare",
           "quantize", "refine", "round_weights", "save", "search", "sweep"]

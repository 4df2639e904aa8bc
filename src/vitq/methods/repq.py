"""RepQ-ViT-style calibration (both regimes): scale reparameterization of the post-LayerNorm activations,
log√2 post-softmax quantizer, per-channel weights with searched ranges.

Steps (each recorded in the returned dict, i.e. results.json):

1. :func:`vitq.methods.reparam.reparameterize`: one float pass observes the per-channel range of every ``qkv`` and
   ``fc1`` input and folds the per-channel scales and zero points into the LayerNorm and the linear layer
   (an exact rewrite of the float model), so one per-tensor quantizer serves those inputs;
2. one float pass observes every activation quantizer of the rewritten model; uniform quantizers get the
   ``act`` range (default ``mse``: the least squared error over every calibration value, the lower and upper
   ends clipped independently, as RepQ-ViT's per-end percentile search does; FQ-ViT's ``omse`` shrinks both
   ends by one factor, which on the post-GELU ``fc2`` input [-0.17, 40] clips away GELU's whole negative side
   and stops at 0.11 of the max), searched kinds (``logsqrt2``'s scale, ``adalog``'s base) search on the
   observed values;
3. weights: per output channel, the OMSE-searched range (``weights="omse"``; ``minmax`` also accepted).

The softmax quantizer is ``logsqrt2`` unless the scheme names another kind; ``--softmax-quantizer adalog
--gelu-quantizer adalog`` gives the adaptive-log variant. All calibration images given are used (RepQ-ViT
uses 32). Any ``--weight-rounding gptq`` runs afterwards on these weight quantizers.
"""

from __future__ import annotations

import dataclasses
import time

from torch import nn

from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.methods.baselines import calibrate_observed
from vitq.methods.reparam import reparameterize
from vitq.registry import register_method

REPQ_DEFAULTS = {"act": "mse", "weights": "omse", "reparam": True}


def _repq_args(group) -> None:
    group.add_argument("--repq-act", dest="repq_act", choices=("mse", "omse", "minmax"), default=None,
                       help="repq: range of the uniform activation quantizers (default mse: least squared error, "
                       "each end of the range clipped on its own)")
    group.add_argument("--repq-no-reparam", dest="repq_reparam", action="store_const", const=False, default=None,
                       help="repq: skip the scale reparameterization (ablation)")


def _repq_scheme(scheme, options: dict):
    if scheme.softmax_quantizer is None:
        return dataclasses.replace(scheme, softmax_quantizer="logsqrt2")
    return scheme


@register_method("repq", "RepQ-ViT style (both regimes): post-LayerNorm scales folded into LayerNorm and "
                 "qkv/fc1 (exact rewrite), log√2 softmax with a searched scale (default), activations by least "
                 "squared error with each range end clipped on its own, per-channel OMSE weights",
                 add_arguments=_repq_args, adjust_scheme=_repq_scheme)
def repq(model: nn.Module, calib: CalibData, **options) -> dict:
    unknown = sorted(set(options) - set(REPQ_DEFAULTS))
    if unknown:
        raise VitqError(f"method repq: unknown options {unknown} (expected some of {sorted(REPQ_DEFAULTS)})")
    o = {**REPQ_DEFAULTS, **options}
    for key in ("act", "weights"):
        if o[key] not in ("mse", "omse", "minmax"):
            raise VitqError(f"method repq: {key}={o[key]!r} (expected mse, omse or minmax)")
    info = {"effective_options": o}
    t0 = time.perf_counter()
    if o["reparam"]:
        info.update(reparameterize(model, calib))
    info["seconds_reparam"] = time.perf_counter() - t0
    info.update(calibrate_observed(model, calib, o["act"], o["weights"]))
    info["calibration_passes"] = 2 if o["reparam"] else 1
    scheme = getattr(model, "vitq_scheme", None)
    if scheme is not None:
        info["softmax_quantizer"] = scheme.softmax_kind
        info["gelu_quantizer"] = scheme.gelu_quantizer or "uniform"
    return info

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
3. weights: per output channel, the OMSE-searched range (``weights="omse"``; ``minmax`` also accepted),
   asymmetric (unsigned, a zero point per channel: all 2^b levels, as RepQ-ViT) unless the scheme names
   ``weight_signed`` or ``--repq-no-asym-weights`` (issue 26: in ``matmul`` the signed symmetric grid has
   2^b - 1 levels and a larger weight error).

4. ``--repq-search output`` (off by default): starting from steps 1-3, every layer's quantizers are searched
   again for the least squared error of the layer's output (:mod:`vitq.methods.outsearch`, AdaLog's search).

Options of the fold (issue 26): ``--repq-channel-range percentile`` searches each channel's range over
percentiles as RepQ-ViT does (min/max by default); ``--repq-fold-power P`` folds only r1^P of the scales.
``--repq-order sequential`` calibrates step 2 in RepQ-ViT's order instead, unit by unit with every upstream
quantizer active (:mod:`vitq.methods.sequential`).

The softmax quantizer is ``logsqrt2`` unless the scheme names another kind; ``--softmax-quantizer adalog
--gelu-quantizer adalog`` gives the adaptive-log variant. All calibration images given are used (RepQ-ViT
uses 32). Any ``--weight-rounding gptq`` runs afterwards on these weight quantizers.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from torch import nn

from vitq.calib import CalibData
from vitq.methods.baselines import calibrate_observed
from vitq.methods.head_balance import MODES as HEAD_BALANCE
from vitq.methods.head_balance import balance_heads
from vitq.methods.outsearch import INPUTS, output_search
from vitq.methods.reparam import CHANNEL_RANGES, reparameterize
from vitq.methods.sequential import ORDERS, calibrate_sequential
from vitq.options import Options, opt
from vitq.registry import register_method

RANGES = ("mse", "omse", "minmax", "quantiles")


@dataclass(frozen=True)
class RepqOptions(Options):
    act: str = opt("mse", "range of the uniform activation quantizers (mse: least squared error, each end of the "
                   "range clipped on its own; quantiles: RepQ-ViT's rule, the least squared error of the ranges "
                   "at the 0.999 / 0.9999 / 0.99999 quantiles)", choices=RANGES)
    weights: str = opt("omse", "range of the per-channel weight quantizers", choices=RANGES)
    reparam: bool = opt(True, "the scale reparameterization (off: ablation)")
    asym_weights: bool = opt(True, "asymmetric per-channel weights (a zero point per channel, all 2^b levels) "
                             "where the scheme leaves weight_signed unset")
    channel_range: str = opt("minmax", "per-channel range folded by the reparameterization (percentile: "
                             "RepQ-ViT's per-channel percentile search at the activation bits)",
                             choices=CHANNEL_RANGES)
    fold_power: float = opt(1.0, "fold r1^P of the per-channel scales (1: full fold; 0.5: half)", minimum=0.0,
                            maximum=1.0, metavar="P")
    head_balance: str = opt("none", "per-head q/k/v ranges balanced by an exact rescaling folded into the float "
                            "weights after the fold (v: v's heads and proj's input columns; qkv: also q against "
                            "k in every head); see vitq.methods.head_balance", choices=HEAD_BALANCE)
    order: str = opt("float", "calibration order of the activation quantizers (float: all observed in one float "
                     "pass; sequential: RepQ-ViT's, unit by unit, each with every upstream quantizer active; see "
                     "vitq.methods.sequential)", choices=ORDERS)
    search: str = opt("none", "after the calibration, search every layer's quantizers (weights per channel, the "
                      "input's range ends, log bases and top levels, q/k, softmax/v) for the least squared error "
                      "of the layer's output, coarse to fine (AdaLog's search; see vitq.methods.outsearch). "
                      "EXPERIMENTAL: on DeiT-Tiny W4A4 it took agreement from 71 to 15-22 percent",
                      choices=("none", "output"))
    search_inputs: str = opt("quant", "operands of the output search: those of the model with every earlier layer "
                             "quantized and searched (quant; AdaRound's asymmetric objective, EasyQuant's order) or "
                             "the float model's (float: AdaLog's, PTQ4ViT's; one float pass per block)",
                             choices=INPUTS)
    search_rounds: int = opt(2, "weight/input alternations per layer in the output search", minimum=1, metavar="R")
    search_images: int | None = opt(32, "output search on the first N calibration images (None: all)", minimum=1,
                                    metavar="N")
    search_tokens: int = opt(16, "token positions (attention: query rows per head) per image in the output search",
                             minimum=1, metavar="T")


def _repq_scheme(scheme, cfg: RepqOptions):
    if scheme.softmax_quantizer is None:
        scheme = dataclasses.replace(scheme, softmax_quantizer="logsqrt2")
    if scheme.weight_signed is None and cfg.asym_weights:
        scheme = dataclasses.replace(scheme, weight_signed=False)
    return scheme


@register_method("repq", "RepQ-ViT style (both regimes): post-LayerNorm scales folded into LayerNorm and "
                 "qkv/fc1 (exact rewrite), log√2 softmax with a searched scale (default), activations by least "
                 "squared error with each range end clipped on its own, per-channel asymmetric OMSE weights",
                 config=RepqOptions, adjust_scheme=_repq_scheme)
def repq(model: nn.Module, calib: CalibData, cfg: RepqOptions) -> dict:
    info = {"effective_options": cfg.to_dict()}
    t0 = time.perf_counter()
    if cfg.reparam:
        info.update(reparameterize(model, calib, cfg.channel_range, cfg.fold_power))
    info["seconds_reparam"] = time.perf_counter() - t0
    info.update(balance_heads(model, calib, cfg.head_balance))
    calibrate = calibrate_sequential if cfg.order == "sequential" else calibrate_observed
    info.update(calibrate(model, calib, cfg.act, cfg.weights))
    info["calibration_passes"] += cfg.reparam + (cfg.head_balance != "none")  # the fold's and the balance's
    if cfg.search == "output":
        info.update(output_search(model, calib, inputs=cfg.search_inputs, rounds=cfg.search_rounds,
                                  images=cfg.search_images, tokens=cfg.search_tokens))
    scheme = getattr(model, "vitq_scheme", None)
    if scheme is not None:
        info["softmax_quantizer"] = scheme.softmax_kind
        info["gelu_quantizer"] = scheme.gelu_quantizer or "uniform"
    return info

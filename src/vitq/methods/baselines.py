"""Observer-only baselines (METHODS.md §2): MinMax, Percentile, OMSE, and the FQ-ViT base that Evol-Q refines.

All four make a float pass over the calibration set with every activation quantizer observing (values
pass through unquantized), then set each quantizer from what it saw over *all* batches; OMSE and the PTF
shift choice make a second pass that sees every value (see :mod:`vitq.quant.observers`). Weights are
calibrated from the weights themselves, per output channel.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vitq.calib import CalibData, forward_all
from vitq.options import Options, opt
from vitq.quant.base import quantizers_of
from vitq.quant.modules import QWeighted
from vitq.quant.observers import apply_range, observing, start_error_pass, weight_range
from vitq.quant.uniform import PTFQuantizer
from vitq.registry import register_method


def weighted_modules(model: nn.Module) -> dict[str, QWeighted]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QWeighted)}


def calibrate_weights(model: nn.Module, how: str = "minmax", correction: bool = False) -> None:
    for m in weighted_modules(model).values():
        weight_range(m.weight_quant, m.weight.detach(), how)
        m.weight_correction.fill_(correction)


def calibrate_observed(model: nn.Module, calib: CalibData, act: str, weight: str,
                       percentile: float | None = None, weight_correction: bool = False) -> dict:
    """Observe every activation quantizer over the calibration set in float, then set ranges."""
    qs = quantizers_of(model)
    passes = 1
    with observing(model, percentile=percentile, seed=calib.seed) as observers:
        forward_all(model, calib, desc=f"observe ranges ({act})")
        if start_error_pass(model, observers, act):  # range searches see every value of every batch
            forward_all(model, calib, desc=f"observe errors ({act} search)")
            passes = 2
    for name, obs in calib.bar(observers.items(), f"set ranges ({act})", len(observers)):
        apply_range(qs[name], obs, act)
    calibrate_weights(model, weight, weight_correction)
    info = {"activations": act, "weights": weight, "weight_bias_correction": weight_correction,
            "calibration_passes": passes}
    if act == "omse" and any(isinstance(q, PTFQuantizer) for q in qs.values()):
        info["ptf"] = ("FQ-ViT rule: global min/max of all calibration values, each channel's power-of-two "
                       "shift by the lowest squared error over all of them")
    if percentile is not None:
        info["percentile"] = percentile
    return info


@register_method("minmax", "min/max range of every activation (per tensor) and weight (per channel)",
                 expected_time="DeiT-Tiny, 250 images: 6-12 s on 2 CPU cores (BENCHMARKS.md baselines)")
def minmax(model: nn.Module, calib: CalibData) -> dict:
    return calibrate_observed(model, calib, "minmax", "minmax")


@dataclass(frozen=True)
class PercentileOptions(Options):
    value: float = opt(0.9999, "clip activations at this quantile", above=0.5, maximum=1.0, metavar="P")


@register_method("percentile", "activations clipped at the 99.99th percentile (mean over batches); "
                 "weights min/max", config=PercentileOptions,
                 expected_time="DeiT-Tiny, 250 images: 30-45 s on 2 CPU cores (BENCHMARKS.md baselines)")
def percentile(model: nn.Module, calib: CalibData, cfg: PercentileOptions) -> dict:
    return calibrate_observed(model, calib, "percentile", "minmax", percentile=cfg.value)


@register_method("omse", "range shrink factor with the least MSE (1.00..0.11), for activations over all "
                 "calibration batches and weights per channel",
                 expected_time="DeiT-Tiny, 250 images: 7-10 s on 2 CPU cores (BENCHMARKS.md baselines)")
def omse(model: nn.Module, calib: CalibData) -> dict:
    return calibrate_observed(model, calib, "omse", "omse")


@register_method("fqvit", "FQ-ViT base of Evol-Q: weights min/max per channel with bias correction, "
                 "activations OMSE, PTF LayerNorm inputs (fq)",
                 expected_time="DeiT-Tiny, 250 images: 7-10 s on 2 CPU cores (BENCHMARKS.md baselines)")
def fqvit(model: nn.Module, calib: CalibData) -> dict:
    return calibrate_observed(model, calib, "omse", "minmax", weight_correction=True)

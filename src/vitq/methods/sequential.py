"""Sequential calibration: RepQ-ViT's order (its reference code calibrates in one forward with every quantizer
on, so each quantizer's range comes from inputs that already carry the upstream quantization error).

The activation quantizers are taken in the order a forward calls them and grouped by repeated unit (the
module name up to its first index, ``blocks.3``; stem and head are each a group). Weights are set first (they
depend on nothing else). Then, group by group: the group's quantizers observe the calibration set while every
quantizer before them is active and every one after them passes values through in float, their ranges are
set, and they become active for the next group. A pass stops at the group's last quantizer, so group g costs
about g / G of a forward; in all about as much as G / 2 forward passes (two per group where a range search
needs its error pass) against two for the float order (:func:`vitq.methods.baselines.calibrate_observed`).
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.calib import CalibData, forward_until
from vitq.methods.baselines import calibrate_weights
from vitq.quant.base import Quantizer, quantizers_of
from vitq.quant.observers import apply_range, observing, start_error_pass

ORDERS = ("float", "sequential")


def call_order(model: nn.Module, calib: CalibData) -> list[str]:
    """The activation quantizers (role other than weight) in the order one forward of the first calibration
    image calls them; quantizers it never calls come last, in module order."""
    acts = {n: q for n, q in quantizers_of(model).items() if q.role != "weight"}
    order: list[str] = []
    hooks = [q.register_forward_pre_hook(lambda _m, _a, n=n: None if n in order else order.append(n))
             for n, q in acts.items()]
    try:
        with torch.no_grad():
            model(calib.images[:1].to(calib.device))
    finally:
        for h in hooks:
            h.remove()
    return order + [n for n in acts if n not in order]


def unit_of(name: str) -> str:
    """The repeated unit a quantizer belongs to: its name up to the first numeric part (``blocks.3``), else
    its top-level module (``patch_embed``, ``head``)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return parts[0]


def groups_of(order: list[str]) -> list[list[str]]:
    """Consecutive quantizers of the call order that share a unit form a group."""
    groups: list[list[str]] = []
    for name in order:
        if groups and unit_of(groups[-1][-1]) == unit_of(name):
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _pass_until(model: nn.Module, calib: CalibData, last: Quantizer, desc: str) -> None:
    """Every calibration batch through the model, each stopped once ``last`` has seen its input."""
    with torch.no_grad():
        for x in calib.bar(calib.batches(), desc, calib.num_batches):
            forward_until(lambda x=x: model(x), last)


def calibrate_sequential(model: nn.Module, calib: CalibData, act: str, weight: str) -> dict:
    """Weights by ``weight``, then the activation quantizers group by group (see the module doc), each set by
    ``act`` from what it saw with every upstream quantizer active."""
    qs = quantizers_of(model)
    calibrate_weights(model, weight)
    order = call_order(model, calib)
    for name in order:  # a stale range downstream must not quantize while upstream groups are observed
        qs[name].initialized.fill_(False)
    groups = groups_of(order)
    passes = 0.0
    for i, names in enumerate(groups):
        # the fraction of the forward a pass runs: the position of the group's last quantizer in the order
        share = (order.index(names[-1]) + 1) / len(order)
        with observing(model, names=names) as observers:
            _pass_until(model, calib, qs[names[-1]], f"observe group {i + 1}/{len(groups)} ({act})")
            passes += share
            if start_error_pass(model, observers, act):
                _pass_until(model, calib, qs[names[-1]], f"observe errors {i + 1}/{len(groups)} ({act} search)")
                passes += share
        for name, obs in observers.items():
            apply_range(qs[name], obs, act)
    return {"activations": act, "weights": weight, "weight_bias_correction": False, "order": "sequential",
            "groups": len(groups), "calibration_passes": round(passes, 2)}

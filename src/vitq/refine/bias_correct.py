"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", §4.2, the empirical variant; also
Banner et al. 2019): quantizing a layer's weights (and everything before it) shifts the *mean* of its output
per channel, and at 4 bits a depthwise convolution's 9 or 25 weights per channel shift it a lot. The shift is
measured on the calibration images and taken out of the layer's bias.

Per quantized linear/conv layer with a bias, in data-flow order (stem, every trunk unit, tail; inside a unit
in the order the layers run): ``bias_c -= E[y_quant,c] - E[y_float,c]``, the mean over images and positions
(and tokens) of its output channel c in the quantized model (every earlier layer already corrected) and in
the float model. The float model is the prepared model itself with every quantizer passed through (BatchNorm
folded, the same layers), so the layers are paired exactly; the float means are taken once, before any bias
changes. A unit is re-run from its cached quantized input once per layer it holds, so the whole correction
costs about as many forward passes as the largest unit has layers.

Layers without a bias are left as they are (listed in the record). Only biases change: the weights, their
quantizers and the activation quantizers are untouched, so the result saves and reloads like any state.
Run it last in a refiner chain (after ``recon``), or alone after any method and ``--weight-rounding``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from vitq.calib import CalibData
from vitq.models.trunk import Trunk
from vitq.options import Options, opt
from vitq.quant.base import passthrough
from vitq.quant.modules import QConv2d, QWeighted
from vitq.refine.recon_pieces import weighted_stages
from vitq.registry import register_refiner


@dataclass(frozen=True)
class BiasCorrectOptions(Options):
    max_images: int = opt(128, "calibration images used for the means (a seeded subset when there are more)",
                          minimum=1, metavar="N")


def channel_mean(y: torch.Tensor, conv: bool) -> tuple[torch.Tensor, int]:
    """Sum over everything but the channel axis (axis 1 of a conv output, the last one otherwise), in float64,
    and the number of values summed per channel."""
    y = y.detach()
    if conv:
        return y.sum(dim=(0, 2, 3), dtype=torch.float64), y.numel() // y.shape[1]
    return y.reshape(-1, y.shape[-1]).sum(0, dtype=torch.float64), y.numel() // y.shape[-1]


@torch.no_grad()
def _means(layers: list[QWeighted], run, inputs: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Mean output per channel of each of ``layers`` when ``run`` is applied to every input."""
    acc: dict[int, list] = {id(m): [0.0, 0] for m in layers}

    def hook(mod, _args, out):
        s, n = channel_mean(out, isinstance(mod, QConv2d))
        acc[id(mod)][0] = acc[id(mod)][0] + s
        acc[id(mod)][1] += n

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        for x in inputs:
            run(x)
    finally:
        for h in handles:
            h.remove()
    return {k: v[0] / v[1] for k, v in acc.items() if v[1]}


@torch.no_grad()
def correct_biases(model: nn.Module, calib: CalibData, max_images: int = 128) -> dict:
    """Correct the biases of ``model`` (prepared and calibrated) in place; returns the record."""
    t0 = time.perf_counter()
    model.eval()
    images = calib.images[:max_images] if len(calib) > max_images else calib.images
    small = CalibData(images, batch_size=calib.batch_size, device=calib.device, progress=False, seed=calib.seed)
    inputs = list(small.batches())
    trunk = Trunk(model)
    stages = weighted_stages(model, trunk, inputs[0])
    names = {id(m): n for n, m in model.named_modules()}
    everything = [m for _, layers, _ in stages for m in layers]
    with passthrough(model):
        float_means = _means(everything, model, inputs)
    info: dict[str, dict] = {}
    no_bias = []
    for si, (_name, layers, run) in enumerate(stages):
        for layer in layers:
            if layer.bias is None:
                no_bias.append(names[id(layer)])
                continue
            q = _means([layer], run, inputs).get(id(layer))
            f = float_means.get(id(layer))
            if q is None or f is None:
                info[names[id(layer)]] = {"skipped": "no calibration input reached it"}
                continue
            shift = q - f
            layer.bias.sub_(shift.to(layer.bias.dtype))
            info[names[id(layer)]] = {"mean_abs_shift": float(shift.abs().mean()),
                                      "max_abs_shift": float(shift.abs().max())}
        if si < len(stages) - 1:
            inputs = [run(x) for x in inputs]
    return {"num_images": len(small), "layers_corrected": sum("mean_abs_shift" in v for v in info.values()),
            "layers_without_bias": no_bias, "layers": info, "seconds": time.perf_counter() - t0}


@register_refiner("biascorr", "empirical bias correction (Nagel et al. 2019): per layer in data-flow order, the "
                  "shift of its mean output per channel (quantized vs float, calibration images) is taken out "
                  "of its bias", config=BiasCorrectOptions)
def biascorr(model: nn.Module, float_model: nn.Module, calib: CalibData, cfg: BiasCorrectOptions) -> dict:
    return {"config": cfg.to_dict(), **correct_biases(model, calib, cfg.max_images)}

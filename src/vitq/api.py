"""The Python API: the same steps as the CLI, on any model built from timm's parts.

    qmodel = vitq.prepare(model, vitq.Scheme("fq", w_bits=4, a_bits=8), method="fqvit")
    vitq.calibrate(qmodel, calib_images, method="fqvit")
    vitq.refine(qmodel, model, calib_images, refiner="evolq")      # optional
    vitq.round_weights(qmodel, calib_images, how="gptq")           # optional: GPTQ weight rounding
    metrics = vitq.evaluate(qmodel, model, val_batches)
    vitq.save(qmodel, "out/"); qmodel2 = vitq.load(model, "out/")
"""

from __future__ import annotations

import time

import torch
from torch import nn

from vitq import prepare as _prepare
from vitq.calib import CalibData
from vitq.gptq import round_weights  # noqa: F401  (part of the API: vitq.round_weights)
from vitq.registry import get_method, get_refiner
from vitq.scheme import Scheme


def _recordable(options: dict) -> dict:
    """The options that belong in a results file (plain values; not tensors, data or callbacks)."""
    scalar = (bool, int, float, str, type(None))

    def plain(v) -> bool:
        return isinstance(v, scalar) or (isinstance(v, (list, tuple)) and all(isinstance(i, scalar) for i in v))

    return {k: v for k, v in options.items() if plain(v)}


def prepare(model: nn.Module, scheme: Scheme | None = None, method: str | None = None,
            options: dict | None = None, **scheme_kwargs) -> nn.Module:
    """A quantization-ready copy of ``model``. ``method`` lets a method adjust the scheme it needs (e.g. its
    softmax quantizer kind) before quantizers are inserted."""
    scheme = scheme if scheme is not None else Scheme(**scheme_kwargs)
    if method is not None:
        entry = get_method(method)
        if entry.adjust_scheme is not None:
            scheme = entry.adjust_scheme(scheme, options or {})
    return _prepare.prepare(model, scheme)


def as_calib(images, batch_size: int = 50, device="cpu", seed: int = 0, progress: bool = True) -> CalibData:
    if isinstance(images, CalibData):
        return images
    return CalibData(torch.as_tensor(images), batch_size=batch_size, device=device, seed=seed, progress=progress)


def calibrate(qmodel: nn.Module, images, method: str = "fqvit", batch_size: int = 50, device="cpu",
              seed: int = 0, progress: bool = True, **options) -> dict:
    """Fill the quantizers from calibration images ([N, C, H, W] preprocessed, or a CalibData)."""
    entry = get_method(method)
    calib = as_calib(images, batch_size, device, seed, progress)
    torch.manual_seed(seed)
    qmodel.to(calib.device).eval()
    t0 = time.perf_counter()
    info = entry.fn(qmodel, calib, **options) or {}
    info = {"method": method, "options": _recordable(options), **info, "seconds": time.perf_counter() - t0}
    return info


def refine(qmodel: nn.Module, float_model: nn.Module, images, refiner: str = "evolq", batch_size: int = 50,
           device="cpu", seed: int = 0, progress: bool = True, **options) -> dict:
    """Improve an already-calibrated model (e.g. Evol-Q), scored against ``float_model``."""
    entry = get_refiner(refiner)
    calib = as_calib(images, batch_size, device, seed, progress)
    torch.manual_seed(seed)
    qmodel.to(calib.device).eval()
    float_model.to(calib.device).eval()
    t0 = time.perf_counter()
    info = entry.fn(qmodel, float_model, calib, **options) or {}
    return {"refiner": refiner, "options": _recordable(options), **info, "seconds": time.perf_counter() - t0}

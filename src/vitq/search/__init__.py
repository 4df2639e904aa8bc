"""Searches over a calibrated model's quantization choices, by name (:data:`SEARCHES`).

    qmodel, run = vitq.quantize(model, images, recipe="best", target="onnxruntime")
    record = vitq.search(qmodel, model, images, how="hago", min_speedup=1.5)   # or vitq quantize --search hago

``hago`` (:mod:`vitq.search.hago`): which quantizer groups the deployment target runs as integer kernels to
quantize, from their sensitivity on the calibration images and their latency measured in the target's runtime.
"""

from __future__ import annotations

from torch import nn

from vitq.calib import as_calib
from vitq.errors import VitqError
from vitq.search.hago import hago

SEARCHES = {"hago": hago}


def search(qmodel: nn.Module, float_model: nn.Module, images, /, how: str = "hago", batch_size: int = 50,
           device="cpu", seed: int = 0, progress: bool = True, **options) -> dict:
    """Run the search ``how`` on the calibrated ``qmodel`` (changed in place to the chosen configuration) with
    calibration ``images`` ([N, C, H, W] preprocessed, or a CalibData); returns its record."""
    if how not in SEARCHES:
        raise VitqError(f"unknown search {how!r} (expected one of {', '.join(SEARCHES)})")
    calib = as_calib(images, batch_size, device, seed, progress)
    return SEARCHES[how](qmodel, float_model, calib, progress=progress, **options)


__all__ = ["SEARCHES", "search"]

"""Calibration data as one preprocessed tensor, running a model over it (with a progress bar), and where the
images come from: real ones, synthetic ones (data-free), or both (:func:`calib_source`, :mod:`vitq.synth`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from vitq.errors import VitqError


@dataclass
class CalibData:
    """The calibration images ([N, C, H, W], preprocessed, kept on the CPU) and how to batch them.

    Methods and refiners make several passes over the same images, so they are decoded once.
    """

    images: torch.Tensor
    batch_size: int = 50
    device: torch.device | str = "cpu"
    progress: bool = True
    seed: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_batches(self) -> int:
        return -(-len(self) // self.batch_size)

    def batches(self) -> Iterator[torch.Tensor]:
        for i in range(0, len(self), self.batch_size):
            yield self.images[i:i + self.batch_size].to(self.device)

    def bar(self, iterable, desc: str, total: int | None = None):
        return tqdm(iterable, desc=desc, total=total, disable=not self.progress, leave=False, dynamic_ncols=True)


def as_calib(images, batch_size: int = 50, device="cpu", seed: int = 0, progress: bool = True) -> CalibData:
    """Calibration data from images ([N, C, H, W], preprocessed) or a CalibData (returned as it is)."""
    if isinstance(images, CalibData):
        return images
    return CalibData(torch.as_tensor(images), batch_size=batch_size, device=device, seed=seed, progress=progress)


@torch.no_grad()
def forward_all(model: nn.Module, calib: CalibData, desc: str = "calibrate") -> torch.Tensor:
    """Run the model over every calibration batch; returns the concatenated outputs (on the CPU)."""
    outs = [model(x).float().cpu() for x in calib.bar(calib.batches(), desc, calib.num_batches)]
    return torch.cat(outs)


class _Reached(Exception):
    """Raised by :func:`forward_until`'s hook: the rest of the forward is not needed."""


def forward_until(run, module: nn.Module):
    """Call ``run()`` until ``module`` has computed (its first call) and return that output, skipping the rest of
    the forward; None when ``run`` ends without calling ``module``."""
    out = []

    def hook(_m, _inputs, y):
        out.append(y)
        raise _Reached

    handle = module.register_forward_hook(hook)
    try:
        run()
    except _Reached:
        pass
    finally:
        handle.remove()
    return out[0] if out else None


# ------------------------------------------------------------------------------------------------ sources
SYNTHETIC = "synthetic"
DEFAULT_SYNTHETIC = 32


def synthetic_count(spec) -> int | None:
    """``"synthetic"`` / ``"synthetic:N"`` (the data-free source) -> N (32 when not given); None for anything
    else (a folder, or images)."""
    if not isinstance(spec, str) or not (spec == SYNTHETIC or spec.startswith(SYNTHETIC + ":")):
        return None
    if spec == SYNTHETIC:
        return DEFAULT_SYNTHETIC
    text = spec[len(SYNTHETIC) + 1:]
    if not text.isdigit() or int(text) <= 0:
        raise VitqError(f"--calib {spec} is invalid (expected synthetic or synthetic:N with N a positive number "
                        "of images, e.g. synthetic:32)")
    return int(text)


def calib_source(model: nn.Module, calib, augment_synthetic: int | None = None, synthetic: dict | None = None,
                 seed: int = 0, progress: bool = True) -> tuple[object, dict]:
    """Resolve where calibration images come from: real images (``calib``, a tensor or CalibData, returned
    as given), synthetic ones only (``calib="synthetic[:N]"``), or real plus ``augment_synthetic`` synthetic ones
    (FDDA's setting). ``synthetic``: ``generator`` (default auto), ``options``, ``directory`` (PNG folder),
    ``budget_min``, ``transform`` (see :func:`vitq.synth.synthesize`). Returns (images, the source's record)."""
    from vitq.synth import synthesize

    extra = dict(synthetic or {})
    unknown = sorted(set(extra) - {"generator", "options", "directory", "budget_min", "transform"})
    if unknown:
        raise VitqError(f"synthetic options {unknown} are unknown (expected generator, options, directory, "
                        "budget_min, transform)")
    num = synthetic_count(calib)
    if num is not None:
        if augment_synthetic:
            raise VitqError("--augment-synthetic adds synthetic images to real ones; with --calib synthetic:N "
                            "every image is synthetic already (give N there)")
        images, rec = synthesize(model, num, seed=seed, progress=progress, **extra)
        return images, {"kind": "synthetic", "num_real": 0, "num_synthetic": num, "synthetic": rec}
    if isinstance(calib, str):
        raise VitqError(f"calib {calib!r}: expected images [N, C, H, W], a CalibData, or synthetic[:N]")
    if not augment_synthetic:
        if extra:
            raise VitqError("synthetic options given, but neither calib='synthetic[:N]' nor augment_synthetic=N")
        return calib, {"kind": "real", "num_real": len(calib), "num_synthetic": 0}
    if isinstance(augment_synthetic, bool) or not isinstance(augment_synthetic, int) or augment_synthetic < 0:
        raise VitqError(f"--augment-synthetic {augment_synthetic} is invalid (expected a number of images >= 0)")
    real = calib.images if isinstance(calib, CalibData) else torch.as_tensor(calib)
    images, rec = synthesize(model, augment_synthetic, seed=seed, real=real, progress=progress, **extra)
    both = torch.cat([real.float(), images.to(real.device)])
    if isinstance(calib, CalibData):
        both = CalibData(both, batch_size=calib.batch_size, device=calib.device, progress=calib.progress,
                         seed=calib.seed)
    return both, {"kind": "real+synthetic", "num_real": len(real), "num_synthetic": augment_synthetic,
                  "synthetic": rec}

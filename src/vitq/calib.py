"""Calibration data as one preprocessed tensor, and running a model over it (with a progress bar)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


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

"""The ``float`` quantizer kind: a quantizer a deployment target leaves in float (see :mod:`vitq.targets`).

It keeps its place, bits and role (so methods that hook or read a model's quantizers by name still find it, and a
saved state rebuilds it by kind), but it is never calibrated: calibration, range searches and refiners leave it
the identity, and the export writes nothing for it.
"""

from __future__ import annotations

import torch

from vitq.quant.base import Quantizer, register_quantizer


@register_quantizer("float")
class KeptFloat(Quantizer):
    """The identity, whatever a method does to it (``mark_initialized`` changes nothing; it has no ``set_range``,
    so range-setting passes take it for a parameter-free kind and skip their searches)."""

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def mark_initialized(self) -> None:
        pass

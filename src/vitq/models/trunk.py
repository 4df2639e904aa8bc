"""A model seen as stem → units → tail, so block-wise methods can cache a unit's input and run from there.

Units are the transformer blocks in order (for Swin also each stage's patch-merging downsample). The scales
of unit i do not change its input, so a search over unit i needs only ``forward_from(i, cached_input)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.models.family import family_of


class Trunk:
    def __init__(self, model: nn.Module):
        self.model = model
        family = family_of(model)
        if family.trunk is None:
            raise VitqError(f"{type(model).__name__} ({family.name}) cannot be cut into units; block-wise methods "
                            "need a family of `vitq models` that can")
        parts = family.trunk(model)
        self.stem: Callable[[torch.Tensor], torch.Tensor] = parts.stem
        self.units: list[tuple[str, nn.Module]] = list(parts.units)
        self.tail: Callable[[torch.Tensor], torch.Tensor] = parts.tail
        self._is_block = parts.is_block

    def __len__(self) -> int:
        return len(self.units)

    def blocks(self) -> list[tuple[int, str, nn.Module]]:
        """(unit index, name, module) of the blocks block-wise searches work on: transformer blocks (units
        that contain an attention); for a CNN every residual block."""
        return [(i, n, m) for i, (n, m) in enumerate(self.units) if self._is_block(m)]

    def input_of(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The input of unit ``index`` for images ``x``."""
        h = self.stem(x)
        for _, unit in self.units[:index]:
            h = unit(h)
        return h

    def forward_from(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """Logits from the input ``h`` of unit ``index`` (index == len(self) runs only the tail)."""
        for _, unit in self.units[index:]:
            h = unit(h)
        return self.tail(h)


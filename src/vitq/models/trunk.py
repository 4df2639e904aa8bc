"""A model seen as stem → units → tail, so block-wise methods can cache a unit's input and run from there.

Units are the transformer blocks in order (for Swin also each stage's patch-merging downsample). The scales
of unit i do not change its input, so a search over unit i needs only ``forward_from(i, cached_input)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vitq.errors import VitqError


class Trunk:
    def __init__(self, model: nn.Module):
        self.model = model
        self.stem: Callable[[torch.Tensor], torch.Tensor]
        self.units: list[tuple[str, nn.Module]] = []
        self._is_block = lambda m: hasattr(m, "attn")
        parts = _family_parts(model)
        if parts is not None:  # CNN, LeViT, Hugging Face ViT: the family says (vitq.models.family)
            self.stem, self.units, self.tail, self._is_block = parts.stem, list(parts.units), parts.tail, parts.is_block
        elif hasattr(model, "blocks") and hasattr(model, "_pos_embed"):  # timm VisionTransformer (ViT, DeiT)
            self.stem = lambda x: model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
            self.units = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
            self.tail = lambda x: model.forward_head(model.norm(x))
        elif hasattr(model, "layers") and hasattr(model, "patch_embed"):  # timm SwinTransformer
            self.stem = model.patch_embed
            for i, stage in enumerate(model.layers):
                if not isinstance(stage.downsample, nn.Identity):
                    self.units.append((f"layers.{i}.downsample", stage.downsample))
                self.units += [(f"layers.{i}.blocks.{j}", b) for j, b in enumerate(stage.blocks)]
            self.tail = lambda x: model.forward_head(model.norm(x))
        else:
            raise VitqError(f"{type(model).__name__} is not a timm VisionTransformer or SwinTransformer (or "
                            "another family of `vitq models`); block-wise methods need one")

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


def _family_parts(model: nn.Module):
    from vitq.models.family import family_of

    try:
        family = family_of(model)
    except VitqError:
        return None
    return family.trunk(model) if family.trunk is not None else None

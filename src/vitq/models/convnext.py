"""timm ConvNeXt: stem, stages of (downsample, blocks) and a norm + MLP head. A ConvNeXt block is a depthwise 7×7
convolution, a LayerNorm over channels, an MLP (linear or 1×1 convolutions) with GELU, a LayerScale factor and a
residual add.

Every Conv2d (depthwise included) and Linear is swapped for its quantized version (weights per output channel,
inputs per tensor; the stem's input is the image at ``input_bits``); timm's block forward is kept, its parts
converted. Under ``fq`` every LayerNorm input is quantized (PTF over the channels, for timm's channels-first
``LayerNorm2d`` too) and every unit's output (the residual stream) per tensor, as in the timm CNN family.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitq.errors import VitqError
from vitq.models.common import quantize_unit_output, swap_weighted
from vitq.models.family import Family, TrunkParts, register_family
from vitq.models.timm_cnn import search_paths as cnn_search_paths
from vitq.quant.modules import QLayerNorm
from vitq.quant.uniform import PTFQuantizer
from vitq.scheme import Scheme

# the LayerNorm after the pooling sees one vector per image: per-channel power-of-two shifts fitted to a calibration
# set's few vectors clip unseen images (convnext_atto, random init, minmax on 4 images: logit cosine 0.987 with
# shifts, 0.9994 with one range)
POOLED_PTF = {"max_shift": 0}


class QLayerNorm2d(nn.Module):
    """timm's ``LayerNorm2d`` (a LayerNorm over the channels of [B, C, H, W]) with its input quantized by PTF
    per channel (fq)."""

    vitq_quantized = True

    def __init__(self, norm: nn.LayerNorm, a_bits: int):
        super().__init__()
        self.normalized_shape, self.eps = norm.normalized_shape, norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.input_quant = PTFQuantizer(a_bits, "norm_input", num_channels=norm.normalized_shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quant(x.permute(0, 2, 3, 1))
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


def _classes():
    from timm.layers import LayerNorm, LayerNorm2d
    from timm.models.convnext import ConvNeXt, ConvNeXtBlock

    return ConvNeXt, ConvNeXtBlock, LayerNorm2d, LayerNorm


def detect(model: nn.Module) -> bool:
    return type(model).__name__ == "ConvNeXt" and type(model) is _classes()[0]


def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Each stage's downsample (where it has one), then its blocks."""
    out = []
    for i, stage in enumerate(model.stages):
        if not isinstance(stage.downsample, nn.Identity):
            out.append((f"stages.{i}.downsample", stage.downsample))
        out += [(f"stages.{i}.blocks.{j}", b) for j, b in enumerate(stage.blocks)]
    return out


def convert(model: nn.Module, scheme: Scheme) -> None:
    _, Block, LayerNorm2d, TimmLayerNorm = _classes()
    for name, m in model.named_modules():
        if type(m) is Block and not isinstance(m.norm, nn.LayerNorm):
            raise VitqError(f"ConvNeXtBlock {name} with norm {type(m.norm).__name__} is not supported (expected a "
                            "LayerNorm)")
    swap_weighted(model, scheme, image_layers={"stem.0"})
    if not scheme.fully_quantized:
        return
    for name, m in list(model.named_modules()):
        if type(m) in (LayerNorm2d, TimmLayerNorm, nn.LayerNorm):
            a = scheme.bits_for(name)[1]
            new = QLayerNorm2d(m, a) if type(m) is LayerNorm2d else QLayerNorm(m, a)
            if name == "head.norm":  # after the pooling: one vector per image, see POOLED_PTF
                new.input_quant = PTFQuantizer(a, "norm_input", num_channels=m.normalized_shape[0], **POOLED_PTF)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
        elif isinstance(m, nn.LayerNorm):
            raise VitqError(f"normalization {name} ({type(m).__name__}) in a ConvNeXt is not supported")
    for name, unit in units(model):
        quantize_unit_output(unit, scheme.bits_for(name)[1], scheme)


def trunk(model: nn.Module) -> TrunkParts:
    Block = _classes()[1]
    return TrunkParts(stem=model.stem, units=units(model),
                      tail=lambda x: model.forward_head(model.norm_pre(x)),
                      is_block=lambda m: type(m) is Block)


def search_paths(unit: nn.Module, groups: set[str]) -> list[str] | None:
    """A ConvNeXt unit: all its weight scales (the CNN rule: ``attn`` and ``mlp`` both mean them)."""
    return cnn_search_paths(unit, groups)


register_family(Family(
    name="timm-convnext",
    description="timm ConvNeXt (depthwise convolution, LayerNorm, MLP and LayerScale per block)",
    detect=detect, convert=convert, trunk=trunk, search_paths=search_paths, float_ok=("ConvNeXtBlock",),
    quantizes={
        "fq": "conv/linear weights per output channel (uint), every conv/linear input per tensor, LayerNorm "
              "inputs (PTF over the channels) and every unit's output (the residual stream) per tensor; GELU, "
              "LayerScale and pooling in float",
        "matmul": "conv/linear weights per output channel (int), every conv/linear input per tensor; LayerNorm, "
                  "GELU, LayerScale and pooling in float",
    },
))

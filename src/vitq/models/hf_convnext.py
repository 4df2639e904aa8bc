"""Hugging Face ``ConvNextForImageClassification`` (``--model hf:DIR``; loading and preprocessing as
:mod:`vitq.models.hf`).

ConvNeXt has no attention: every Conv2d (the patchify stem, each layer's 7x7 depthwise conv, the 2x2
downsampling convs) and Linear (each layer's two pointwise layers, the classifier) gets per-output-channel
weights and a per-tensor input quantizer; LayerNorms, GELU and the LayerScale multipliers stay in float. Under
``fq`` each layer's output (the residual stream) is quantized per tensor as well, as for the timm CNNs. Each
stage's downsampling (LayerNorm + conv) and each ``ConvNextLayer`` is a trunk unit, searched by block-wise
methods; Evol-Q searches the weight scales of all the unit's layers.
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.models.common import quantize_unit_output, swap_weighted
from vitq.models.family import Family, TrunkParts, register_family, weight_quantizer_paths
from vitq.models.hf import INSTALL_HINT, HFImageClassifier
from vitq.scheme import Scheme

CLASS = "ConvNextForImageClassification"


def detect(model: nn.Module) -> bool:
    return isinstance(model, HFImageClassifier) and type(model.hf).__name__ == CLASS


def _is_layer(m: nn.Module) -> bool:
    return type(m).__name__ == "ConvNextLayer" and type(m).__module__.startswith("transformers.")


def _is_downsampling(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and any(type(c).__name__ == "ConvNextLayerNorm" for c in m)


def _is_unit(m: nn.Module) -> bool:
    return _is_layer(m) or _is_downsampling(m)


def _stages(model: HFImageClassifier) -> list[nn.Module]:
    stages = getattr(getattr(model.base, "encoder", None), "stages", None)
    if not isinstance(stages, nn.ModuleList):
        raise VitqError(f"{CLASS}: no encoder.stages found (this transformers version is not supported)")
    return list(stages)


def convert(model: HFImageClassifier, scheme: Scheme) -> None:
    base_name = f"hf.{model.hf.base_model_prefix}"
    for i, stage in enumerate(_stages(model)):
        # a ModuleList the stage iterates; as an nn.Sequential (same keys, same iteration) it is a callable unit
        stage.downsampling_layer = nn.Sequential(*stage.downsampling_layer)
        for j, layer in enumerate(stage.layers):
            if not _is_layer(layer):
                raise VitqError(f"unsupported ConvNeXt layer {base_name}.encoder.stages.{i}.layers.{j} "
                                f"({type(layer).__name__}); supported: ConvNextLayer")
            if scheme.fully_quantized:
                quantize_unit_output(layer, scheme.bits_for(f"{base_name}.encoder.stages.{i}.layers.{j}")[1], scheme)
    swap_weighted(model, scheme, image_layers={f"{base_name}.embeddings.patch_embeddings"})


def trunk(model: HFImageClassifier) -> TrunkParts:
    base = model.base
    prefix = f"hf.{model.hf.base_model_prefix}.encoder.stages"
    units = []
    for i, stage in enumerate(_stages(model)):
        if len(stage.downsampling_layer):
            units.append((f"{prefix}.{i}.downsampling_layer", stage.downsampling_layer))
        units += [(f"{prefix}.{i}.layers.{j}", m) for j, m in enumerate(stage.layers)]

    def tail(h: torch.Tensor) -> torch.Tensor:  # global average pooling, LayerNorm, classifier
        return model.hf.classifier(base.layernorm(h.mean([-2, -1])))

    return TrunkParts(stem=base.embeddings, units=units, tail=tail, is_block=_is_unit)


def search_paths(unit: nn.Module, groups: set[str]) -> list[str] | None:
    """A ConvNeXt layer: the weight scales of its depthwise conv and both pointwise layers; a downsampling: its
    conv's (``attn`` and ``mlp`` both mean them: a unit has one kind of weight)."""
    if not _is_unit(unit):
        return None
    return weight_quantizer_paths(unit) if groups & {"attn", "mlp"} else []


register_family(Family(
    name="hf-convnext",
    description=f"Hugging Face transformers {CLASS} (--model hf:DIR, a save_pretrained folder; {INSTALL_HINT}); "
                "one trunk unit per layer and per downsampling",
    detect=detect, convert=convert, trunk=trunk, search_paths=search_paths,
    float_ok=("ConvNextLayer",),  # its own parameter is the LayerScale multiplier
    quantizes={
        "fq": "weights per output channel (uint), every conv/linear input, and each layer's output (the residual "
              "stream) per tensor; LayerNorm, GELU and LayerScale in float",
        "matmul": "weights per output channel (int), every conv/linear input; LayerNorm, GELU and LayerScale "
                  "in float",
    },
))

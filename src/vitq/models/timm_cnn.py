"""timm CNNs: ResNet, RegNet, EfficientNet / MobileNetV2 (``EfficientNet`` in timm) and MobileNetV3.

Preparation folds every BatchNorm into the convolution before it (:mod:`vitq.models.fold`), then swaps
each Conv2d (depthwise included; timm's TF-'SAME' ``Conv2dSame`` too) and Linear for its quantized version:
weights per output channel, the input per tensor (the first convolution's input is the image, at the
scheme's ``input_bits``). Activations (ReLU, ReLU6, SiLU, Hardswish, ...), pooling and squeeze-excite gates
stay in float. Under ``fq`` the output of every block (the residual sum, for ResNet after its ReLU) is
also quantized per tensor, the CNN counterpart of FQ-ViT's quantized residual stream.

Every residual / inverted-residual block is a trunk unit, so block-wise methods (Evol-Q) search it; Evol-Q's
search vector for a CNN block is the per-channel weight scales of all its convolutions.
"""

from __future__ import annotations

from torch import nn

from vitq.models.common import example_input, quantize_unit_output, swap_weighted
from vitq.models.family import Family, TrunkParts, register_family, weight_quantizer_paths
from vitq.models.fold import fold_batchnorms
from vitq.quant.base import Quantizer

# class name -> (stem modules, stage containers, modules between the last stage and forward_head)
ARCHS = {
    "ResNet": (("conv1", "bn1", "act1", "maxpool"), ("layer1", "layer2", "layer3", "layer4"), ()),
    "RegNet": (("stem",), ("s1", "s2", "s3", "s4"), ("final_conv",)),
    "EfficientNet": (("conv_stem", "bn1"), ("blocks",), ("conv_head", "bn2")),
    "MobileNetV3": (("conv_stem", "bn1"), ("blocks",), ()),
}
TRACE_SIZE = (64, 64)  # any size works for these CNNs; small keeps the folding trace cheap


def detect(model: nn.Module) -> bool:
    return type(model).__name__ in ARCHS and type(model).__module__.startswith("timm.models.")


def _units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks in order: children of each stage container, descending through plain nn.Sequential."""
    units = []

    def walk(prefix: str, container: nn.Module) -> None:
        for name, child in container.named_children():
            if type(child) is nn.Sequential:
                walk(f"{prefix}{name}.", child)
            else:
                units.append((f"{prefix}{name}", child))

    for stage in ARCHS[type(model).__name__][1]:
        walk(f"{stage}.", getattr(model, stage))
    return units


def trunk(model: nn.Module) -> TrunkParts:
    stem_names, _, tail_names = ARCHS[type(model).__name__]

    def stem(x):
        for n in stem_names:
            x = getattr(model, n)(x)
        return x

    def tail(x):
        for n in tail_names:
            x = getattr(model, n)(x)
        return model.forward_head(x)

    return TrunkParts(stem, _units(model), tail, is_block=lambda m: True)


def convert(model: nn.Module, scheme) -> None:
    info = fold_batchnorms(model, example_input(TRACE_SIZE))
    swap_weighted(model, scheme, image_layers=set(info["reads_image"]))
    if scheme.fully_quantized:
        for name, unit in _units(model):
            quantize_unit_output(unit, scheme.bits_for(name)[1], scheme)


def search_paths(unit: nn.Module, groups: set[str]) -> list[str] | None:
    """A CNN block (weight quantizers but no attention quantizers): all its convolution weight scales; the
    ``attn`` and ``mlp`` groups both mean them (a CNN block has one kind of weight)."""
    roles = {m.role for m in unit.modules() if isinstance(m, Quantizer)}
    if "weight" not in roles or roles & {"q", "k", "v", "softmax"}:
        return None
    return weight_quantizer_paths(unit) if groups & {"attn", "mlp"} else []


register_family(Family(
    name="timm-cnn",
    description="timm ResNet, RegNet, EfficientNet/MobileNetV2, MobileNetV3 (BatchNorm folded into the "
                "preceding convolution; one trunk unit per residual / inverted-residual block)",
    detect=detect, convert=convert, trunk=trunk, search_paths=search_paths, float_ok=("BasicBlock",),
    quantizes={
        "fq": "conv/linear weights per output channel (uint), every conv/linear input per tensor, and every "
              "block's output (the residual stream) per tensor; activations, pooling and SE gates in float",
        "matmul": "conv/linear weights per output channel (int), every conv/linear input per tensor; "
                  "block outputs, activations, pooling and SE gates in float",
    },
))

"""Model families: which models vitq can prepare, and how each is converted and cut into block-wise units.

A :class:`Family` says how to recognise a model (``detect``), how to turn a float copy into a quantized one
(``convert``: BatchNorm folding where needed, then the float-class → quantized-class swaps), how to see it as
stem → units → tail for block-wise methods (``trunk``), and what it quantizes under each scheme (for
``vitq models``). :func:`family_of` returns the first family whose ``detect`` accepts a model; the timm
ViT/DeiT/Swin family is tried last and also takes any other model built from timm's transformer parts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.quant.base import Quantizer


@dataclass(frozen=True)
class TrunkParts:
    """A model as stem → units → tail: ``tail(units[-1](...units[0](stem(x))))`` equals ``model(x)``.
    ``is_block(unit)`` says which units block-wise searches (Evol-Q, APQ's BBC) work on."""

    stem: Callable[[torch.Tensor], torch.Tensor]
    units: list[tuple[str, nn.Module]]
    tail: Callable[[torch.Tensor], torch.Tensor]
    is_block: Callable[[nn.Module], bool] = lambda m: hasattr(m, "attn")


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    detect: Callable[[nn.Module], bool]
    convert: Callable  # (model, scheme) -> None, in place on the copy prepare made
    trunk: Callable[[nn.Module], TrunkParts] | None  # None: not cut into units (block-wise methods refuse it)
    quantizes: dict[str, str] = field(default_factory=dict)  # scheme name -> what is quantized
    # (unit, groups) -> names inside the unit of the weight quantizers Evol-Q perturbs
    search_paths: Callable[[nn.Module, set[str]], list[str]] | None = None
    fallback: bool = False  # tried after every other family
    # the (H, W) a model was built for when timm's pretrained_cfg may say otherwise (LeViT built with img_size)
    input_size: Callable[[nn.Module], tuple[int, int]] | None = None
    # class names of modules left as they are (own parameters in float, e.g. embeddings; blocks whose parts
    # are converted one by one), which the final check would otherwise refuse
    float_ok: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} registered twice")
    FAMILIES[family.name] = family
    return family


def family_of(model: nn.Module) -> Family:
    for fam in sorted(FAMILIES.values(), key=lambda f: f.fallback):
        if fam.detect(model):
            return fam
    raise VitqError(f"{type(model).__name__} is not a model family vitq supports (see `vitq models`)")


def record_input_size(model: nn.Module) -> None:
    """Make a timm model's ``pretrained_cfg`` name the input size it was built with, for families whose
    size timm's data config does not follow (so the eval transform produces what the model accepts)."""
    fam = family_of(model)
    cfg = getattr(model, "pretrained_cfg", None)
    if fam.input_size is not None and isinstance(cfg, dict):
        h, w = fam.input_size(model)
        model.pretrained_cfg = {**cfg, "input_size": (cfg.get("input_size", (3,))[0], int(h), int(w))}


def search_paths(unit: nn.Module, groups: set[str], model_family: Family | None = None) -> list[str] | None:
    """Names (inside ``unit``) of the weight quantizers Evol-Q searches for a unit, by the rule of the family
    whose unit it is (each family's rule returns None for units it does not know); None when no rule
    applies."""
    fams = [model_family] if model_family is not None else list(FAMILIES.values())
    for fam in fams:
        if fam.search_paths is not None:
            paths = fam.search_paths(unit, groups)
            if paths is not None:
                return paths
    return None


def weight_quantizer_paths(module: nn.Module, prefix: str = "") -> list[str]:
    """Names of the weight quantizers inside ``module`` (module order), e.g. ``conv_pw.weight_quant``."""
    return [f"{prefix}{n}" for n, m in module.named_modules() if isinstance(m, Quantizer) and m.role == "weight"]


def group_paths(unit: nn.Module, children: dict[str, str], groups: set[str]) -> list[str]:
    """The weight quantizers Evol-Q searches for ``groups`` in a unit whose groups each name one child module
    (``{"attn": "attn", "mlp": "mlp"}``): every weight quantizer inside that child, in module order."""
    return [p for g, child in children.items() if g in groups
            for p in weight_quantizer_paths(unit.get_submodule(child), f"{child}.")]

"""timm ViT / DeiT / Swin (and any model built from timm's ``Attention``, ``Block``, ``WindowAttention``,
``SwinTransformerBlock``): their quantized modules, the conversion, the trunk and Evol-Q's search paths. Tried
after every other family, so it also takes models it then refuses module by module.

Each quantized module is built *from* the timm module it replaces (reusing its parameters and settings); no
model code is copied and no ``forward`` is patched. Features a module does not handle raise
:class:`VitqError` naming the module.
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.models.family import Family, TrunkParts, group_paths, register_family
from vitq.quant.base import Quantizer
from vitq.quant.modules import QAttentionBase, QConv2d, QLayerNorm, QLinear, QTransformerBlock, split_prefix
from vitq.quant.uniform import PTFQuantizer
from vitq.scheme import Scheme


class QAttention(QAttentionBase):
    """Built from timm's ``vision_transformer.Attention`` (standard multi-head self-attention)."""

    def __init__(self, attn: nn.Module, scheme: Scheme, a_bits: int, softmax_bits: int):
        super().__init__()
        for feat in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(attn, feat, nn.Identity()), nn.Identity):
                raise VitqError(f"attention with {feat} ({type(getattr(attn, feat)).__name__}) is not supported")
        if getattr(attn, "gate", None) is not None:
            raise VitqError("gated attention is not supported")
        self._init_core(attn, scheme, a_bits, softmax_bits)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise VitqError("attention masks / causal attention are not supported")
        return self._attend(x)


class QWindowAttention(QAttentionBase):
    """Built from timm's Swin ``WindowAttention``: the relative position bias (:meth:`score_bias`) and the
    shifted-window mask are added to the scores before the (fq) score quantizer."""

    def __init__(self, attn: nn.Module, scheme: Scheme, a_bits: int, softmax_bits: int):
        super().__init__()
        if not hasattr(attn, "_get_rel_pos_bias"):
            raise VitqError(f"{type(attn).__name__} without relative position bias is not supported")
        self._init_core(attn, scheme, a_bits, softmax_bits)
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index,
                             persistent="relative_position_index" not in attn._non_persistent_buffers_set)
        self.window_area = attn.window_area

    def score_bias(self) -> torch.Tensor:
        """The relative position bias, [1, H, N, N] (N = window area)."""
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._qkv(x)
        scores = self._scores(q, k)
        if mask is not None:
            nw, n = mask.shape[0], scores.shape[-1]
            scores = (scores.view(-1, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0))
            scores = scores.view(-1, self.num_heads, n, n)
        return self._softmax_v(scores, v)


class QBlock(QTransformerBlock):
    """Built from timm's ViT ``Block``. In the fq regime the residual stream is quantized (PTF) where it
    enters each LayerNorm, and the quantized value also feeds the skip connection."""

    sequential = True

    def __init__(self, block: nn.Module, res_quant1: Quantizer | None, res_quant2: Quantizer | None):
        super().__init__()
        for name in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
            setattr(self, name, getattr(block, name))
        self._init_residual(res_quant1, res_quant2)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise VitqError("attention masks / causal attention are not supported")
        return super().forward(x)


class QSwinBlock(QTransformerBlock):
    """Built from timm's ``SwinTransformerBlock``. The shifted-window partition is timm's own ``_attn``
    (called on this module, which carries the attributes it reads); only the residual adds are ours."""

    sequential = False

    def __init__(self, block: nn.Module, res_quant1: Quantizer | None, res_quant2: Quantizer | None):
        super().__init__()
        if not hasattr(type(block), "_attn"):
            raise VitqError(f"{type(block).__name__} of this timm version is not supported (no _attn)")
        self._timm_cls = type(block)
        for name in ("norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2"):
            setattr(self, name, getattr(block, name))
        for name in ("window_size", "shift_size", "window_area", "dynamic_mask", "input_resolution"):
            setattr(self, name, getattr(block, name, False))
        self.register_buffer("attn_mask", block.attn_mask, persistent=False)
        self._init_residual(res_quant1, res_quant2)

    def get_attn_mask(self, x: torch.Tensor) -> torch.Tensor:  # read by timm's _attn when dynamic_mask
        return self._timm_cls.get_attn_mask(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = self.res_quant1(x)
        x = x + self.drop_path1(self._timm_cls._attn(self, self.norm1(x)))
        x = self.res_quant2(x.reshape(B, -1, C))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


# the prefix tokens' PTF quantizers (and the pooled fc_norm input's) use one range, no per-channel shifts: fitted
# to the few prefix tokens of a calibration set (one or five per image), per-channel ranges clip the unseen images'
# class tokens (measured on the tiny DINOv2-reg of tests/zoo.py, minmax on 8 images: held-out logit cosine 0.969
# with shifts, 0.998 without)
PREFIX_PTF = {"max_shift": 0}


def timm_classes():
    """timm's (Attention, Block, WindowAttention, SwinTransformerBlock)."""
    from timm.layers import Attention
    from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
    from timm.models.vision_transformer import Block

    return Attention, Block, WindowAttention, SwinTransformerBlock


def convert_children(module: nn.Module, prefix: str, scheme: Scheme, in_block: bool, num_prefix: int = 0) -> None:
    """Swap, depth first, every child of ``module`` that has a quantized version (``prefix``: the module's
    qualified name and a dot; ``in_block``: the module is a timm block, whose norm1/norm2 its QBlock handles;
    ``num_prefix``: the class/register tokens leading the token tensors of a VisionTransformer, whose residual
    stream and LayerNorm inputs get their own quantizers under fq, see :class:`PrefixSplit`)."""
    Attention, Block, WindowAttention, SwinBlock = timm_classes()
    for child_name, child in list(module.named_children()):
        name = f"{prefix}{child_name}"
        w, a, s = scheme.bits_for(name)
        is_block = type(child) in (Block, SwinBlock)
        convert_children(child, name + ".", scheme, in_block=is_block, num_prefix=num_prefix)
        new = None
        if isinstance(child, nn.Linear):
            new = QLinear(child, w, a, scheme.signed_weights, scheme)
        elif isinstance(child, nn.Conv2d):
            role = "image" if name.endswith("patch_embed.proj") else "linear_input"
            new = QConv2d(child, w, scheme.input_bits if role == "image" else a, scheme.signed_weights, role, scheme)
        elif type(child) is Attention:
            new = QAttention(child, scheme, a, s)
        elif type(child) is WindowAttention:
            new = QWindowAttention(child, scheme, a, s)
        elif is_block:
            r1 = r2 = None
            if scheme.fully_quantized:
                n = num_prefix if type(child) is Block else 0
                r1 = split_prefix(PTFQuantizer(a, "residual", num_channels=child.norm1.normalized_shape[0]), n,
                                  **PREFIX_PTF)
                r2 = split_prefix(PTFQuantizer(a, "residual", num_channels=child.norm2.normalized_shape[0]), n,
                                  **PREFIX_PTF)
            new = (QBlock if type(child) is Block else QSwinBlock)(child, r1, r2)
        elif isinstance(child, nn.LayerNorm) and scheme.fully_quantized and not (
                in_block and child_name in ("norm1", "norm2")):
            new = QLayerNorm(child, a)
            if prefix == "" and child_name in ("norm_pre", "norm"):  # the VisionTransformer's token tensors
                new.input_quant = split_prefix(new.input_quant, num_prefix, **PREFIX_PTF)
            elif prefix == "" and child_name == "fc_norm":  # after the pooling: one vector per image, one range
                new.input_quant = PTFQuantizer(a, "norm_input", num_channels=child.normalized_shape[0], **PREFIX_PTF)
        if new is not None:
            setattr(module, child_name, new)


def num_prefix_tokens(model: nn.Module) -> int:
    """The class/distillation/register tokens leading a timm VisionTransformer's tokens (0 for other models)."""
    return int(getattr(model, "num_prefix_tokens", 0)) if hasattr(model, "_pos_embed") else 0


def convert(model: nn.Module, scheme: Scheme) -> None:
    convert_children(model, "", scheme, in_block=False, num_prefix=num_prefix_tokens(model))


def trunk(model: nn.Module) -> TrunkParts:
    """ViT/DeiT: the blocks; Swin: each stage's patch-merging downsample (not a block) and its blocks."""
    if hasattr(model, "blocks") and hasattr(model, "_pos_embed"):  # timm VisionTransformer (ViT, DeiT)
        return TrunkParts(stem=lambda x: model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x)))),
                          units=[(f"blocks.{i}", b) for i, b in enumerate(model.blocks)],
                          tail=lambda x: model.forward_head(model.norm(x)))
    if hasattr(model, "layers") and hasattr(model, "patch_embed"):  # timm SwinTransformer
        units = []
        for i, stage in enumerate(model.layers):
            if not isinstance(stage.downsample, nn.Identity):
                units.append((f"layers.{i}.downsample", stage.downsample))
            units += [(f"layers.{i}.blocks.{j}", b) for j, b in enumerate(stage.blocks)]
        return TrunkParts(stem=model.patch_embed, units=units, tail=lambda x: model.forward_head(model.norm(x)))
    raise VitqError(f"{type(model).__name__} is not a timm VisionTransformer or SwinTransformer (or another family "
                    "of `vitq models`); block-wise methods need one")


def search_paths(unit: nn.Module, groups: set[str]) -> list[str] | None:
    """ViT/Swin blocks: ``attn`` = the qkv and proj weight scales, ``mlp`` = fc1 and fc2."""
    if not isinstance(unit, (QBlock, QSwinBlock)):
        return None
    return group_paths(unit, {"attn": "attn", "mlp": "mlp"}, groups)


def detect(model: nn.Module) -> bool:
    """A model built from timm's ViT/Swin parts: at least one of their blocks, every block / attention module
    one of them, and no BatchNorm (others go to the generic path)."""
    Attention, Block, WindowAttention, SwinBlock = timm_classes()
    known = (Attention, Block, WindowAttention, SwinBlock)
    found = False
    for m in model.modules():
        cls = type(m)
        if cls in known or isinstance(m, (QBlock, QSwinBlock)):  # a model this family prepared is still its own
            found = True
        elif cls.__module__.startswith("vitq."):  # the rest of what prepare built (QAttention, quantizers, ...)
            continue
        elif cls.__name__.endswith("Block") or "Attention" in cls.__name__ or isinstance(
                m, nn.modules.batchnorm._BatchNorm):
            return False
    return found


register_family(Family(
    name="timm-vit",
    description="timm VisionTransformer (ViT, DeiT) and SwinTransformer, or any model built from their "
                "Attention/Block/WindowAttention/SwinTransformerBlock",
    detect=detect, convert=convert, trunk=trunk, search_paths=search_paths,
    quantizes={
        "fq": "weights per output channel (uint), every linear input, q/k/v, attention scores, softmax output, "
              "LayerNorm inputs and the residual stream (PTF; class/register tokens with their own range)",
        "matmul": "weights per output channel (int), every linear input, q/k/v and softmax output (both "
                  "attention-matmul inputs); softmax and LayerNorm in float",
    },
))

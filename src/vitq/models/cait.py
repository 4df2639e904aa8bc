"""timm CaiT: LayerScale blocks with talking-heads attention over the patch tokens, then class-attention blocks
that update only the class token. Its quantized modules, the conversion, the trunk and Evol-Q's search paths.

- Talking heads mix the heads with two small linear maps, one on the scores (before the softmax) and one on the
  probabilities (after it); both are quantized layers, and the mixed weights feed attn·V through the softmax
  quantizer (uniform only: they are signed), so both inputs of every matmul are quantized.
- Class attention: q from the class token only, k and v from the class token and the patch tokens (separate
  ``q``/``k``/``v`` projections).
- Under fq the residual stream is quantized where it enters each LayerNorm; the class-attention blocks' LayerNorm
  sees the class token (its own range, see :class:`vitq.quant.modules.PrefixSplit`) beside the patch tokens.

Each quantized module is built from the timm module it replaces; LayerScale factors stay float multiplies (as in
the timm ViT family).
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.models.family import Family, TrunkParts, group_paths, register_family
from vitq.quant.base import Quantizer
from vitq.quant.modules import (
    QAttentionBase,
    QLayerNorm,
    QLinear,
    QTransformerBlock,
        split_prefix,
)
from vitq.quant.uniform import PTFQuantizer
from vitq.scheme import Scheme


class Scale(nn.Module):
    """A LayerScale factor (``gamma_1``/``gamma_2`` of a CaiT block, shared, not copied) as a module."""

    def __init__(self, gamma: nn.Parameter):
        super().__init__()
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class QTalkingHeadAttn(QAttentionBase):
    """Built from timm's ``TalkingHeadAttn``: ``proj_l`` mixes the heads' scores, ``proj_w`` their softmax
    probabilities (both QLinear over the head axis, so the probabilities are quantized at ``proj_w``'s input).
    ``softmax_quant`` quantizes what attn·V reads, the mixed weights (as in the base class it quantizes attn·V's
    first input); they may be negative, so only the uniform kind can quantize them."""

    def __init__(self, attn: nn.Module, scheme: Scheme, a_bits: int, softmax_bits: int):
        super().__init__()
        kind = scheme.kind_for("softmax")
        if kind != "uniform":
            raise VitqError(f"softmax quantizer {kind!r} in CaiT's TalkingHeadAttn: attn·V reads the heads' mix of "
                            "the probabilities (signed, not in [0, 1]), which only the uniform kind quantizes; use "
                            "a method that keeps the uniform softmax quantizer (e.g. minmax, percentile, ptqvit)")
        self._init_core(attn, scheme, a_bits, softmax_bits)
        self.proj_l, self.proj_w = attn.proj_l, attn.proj_w

    def _softmax_v(self, scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The base class's step with the heads mixed before the softmax and after it (so vitq's export, which
        rebuilds only the base class's step, keeps this module's own forward)."""
        scores = self.proj_l(scores.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.score_quant(scores).softmax(dim=-1)
        attn = self.softmax_quant(self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        out = self.attn_drop(attn) @ v
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
        return self.proj_drop(self.proj(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._attend(x)


class QClassAttn(QAttentionBase):
    """Built from timm's CaiT ``ClassAttn``: the class token (token 0) attends to all tokens; [B, 1, C] out."""

    def __init__(self, attn: nn.Module, scheme: Scheme, a_bits: int, softmax_bits: int):
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.qkv = None
        self.q, self.k, self.v, self.proj = attn.q, attn.k, attn.v, attn.proj
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self._init_quantizers(scheme, a_bits, softmax_bits)

    def _project(self, x: torch.Tensor):
        B, N, C = x.shape
        heads = lambda t: t.reshape(B, t.shape[1], self.num_heads, -1).transpose(1, 2)  # noqa: E731
        return heads(self.q(x[:, :1])), heads(self.k(x)), heads(self.v(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._attend(x)


class QLayerScaleBlock(QTransformerBlock):
    """Built from timm's CaiT ``LayerScaleBlock`` (patch tokens only, so one residual range per stream)."""

    sequential = False  # its attention mixes the heads: not the base attention a method may run part by part

    def __init__(self, block: nn.Module, res_quant1: Quantizer | None, res_quant2: Quantizer | None):
        super().__init__()
        for name in ("norm1", "attn", "norm2", "mlp"):
            setattr(self, name, getattr(block, name))
        self.drop_path1 = self.drop_path2 = block.drop_path
        self.ls1, self.ls2 = Scale(block.gamma_1), Scale(block.gamma_2)
        self._init_residual(res_quant1, res_quant2)


class QClassAttnBlock(QTransformerBlock):
    """Built from timm's ``LayerScaleBlockClassAttn``: ``forward(x, x_cls)`` updates the class token from the
    patch tokens ``x``. Under fq ``res_quant1`` quantizes [class token, patch tokens] where they enter
    ``norm1`` (the class token with its own range) and ``res_quant2`` the class token where it enters ``norm2``."""

    sequential = False

    def __init__(self, block: nn.Module, res_quant1: nn.Module | None, res_quant2: Quantizer | None):
        super().__init__()
        for name in ("norm1", "attn", "norm2", "mlp"):
            setattr(self, name, getattr(block, name))
        self.drop_path1 = self.drop_path2 = block.drop_path
        self.ls1, self.ls2 = Scale(block.gamma_1), Scale(block.gamma_2)
        self._init_residual(res_quant1, res_quant2)

    def forward(self, x: torch.Tensor, x_cls: torch.Tensor) -> torch.Tensor:
        u = self.res_quant1(torch.cat((x_cls, x), dim=1))
        x_cls = u[:, :1] + self.drop_path1(self.ls1(self.attn(self.norm1(u))))
        x_cls = self.res_quant2(x_cls)
        return x_cls + self.drop_path2(self.ls2(self.mlp(self.norm2(x_cls))))


class CaitClassStage(nn.Module):
    """A trunk unit over [class token, patch tokens]: one class-attention block, which on the first of them
    (``first``) takes the patch tokens alone and puts the model's class token in front. Holds the block as
    ``block`` (quantizer names inside the unit start with ``block.``)."""

    def __init__(self, block: QClassAttnBlock, cls_token: nn.Parameter | None):
        super().__init__()
        self.block = block
        self.attn = block.attn  # a unit with an attention: block-wise searches work on it
        self._cls = [cls_token]  # not a submodule or parameter of the unit (the model owns it)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        cls_token = self._cls[0]
        if cls_token is not None:
            x, x_cls = h, cls_token.expand(h.shape[0], -1, -1)
        else:
            x, x_cls = h[:, 1:], h[:, :1]
        return torch.cat((self.block(x, x_cls), x), dim=1)


def _classes():
    from timm.models.cait import Cait, ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn, TalkingHeadAttn

    return Cait, ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn, TalkingHeadAttn


def detect(model: nn.Module) -> bool:
    return type(model).__name__ == "Cait" and type(model) is _classes()[0]


def _residual(scheme: Scheme, a_bits: int, dim: int, num_prefix: int = 0) -> nn.Module | None:
    if not scheme.fully_quantized:
        return None
    return split_prefix(PTFQuantizer(a_bits, "residual", num_channels=dim), num_prefix, max_shift=0)


def convert_children(module: nn.Module, prefix: str, scheme: Scheme) -> None:
    _, ClassAttn, LSBlock, ClassBlock, TalkingHead = _classes()
    for child_name, child in list(module.named_children()):
        name = f"{prefix}{child_name}"
        w, a, s = scheme.bits_for(name)
        convert_children(child, name + ".", scheme)
        new = None
        if isinstance(child, nn.Linear):
            new = QLinear(child, w, a, scheme.signed_weights, scheme)
        elif isinstance(child, nn.Conv2d):
            from vitq.quant.modules import QConv2d

            new = QConv2d(child, w, scheme.input_bits, scheme.signed_weights, "image", scheme)
        elif type(child) is TalkingHead:
            new = QTalkingHeadAttn(child, scheme, a, s)
        elif type(child) is ClassAttn:
            new = QClassAttn(child, scheme, a, s)
        elif type(child) is LSBlock:
            dim = child.norm1.normalized_shape[0]
            r1 = r2 = None
            if scheme.fully_quantized:
                r1 = PTFQuantizer(a, "residual", num_channels=dim)
                r2 = PTFQuantizer(a, "residual", num_channels=dim)
            new = QLayerScaleBlock(child, r1, r2)
        elif type(child) is ClassBlock:
            dim = child.norm1.normalized_shape[0]
            new = QClassAttnBlock(child, _residual(scheme, a, dim, 1), _residual(scheme, a, dim))
        elif isinstance(child, nn.LayerNorm) and scheme.fully_quantized and not isinstance(module, (LSBlock,
                                                                                                   ClassBlock)):
            new = QLayerNorm(child, a)
            if name == "norm":  # [class token, patch tokens]
                new.input_quant = split_prefix(new.input_quant, 1, max_shift=0)
        if new is not None:
            setattr(module, child_name, new)


def convert(model: nn.Module, scheme: Scheme) -> None:
    if model.blocks_token_only is None or not len(model.blocks_token_only):
        raise VitqError("Cait without class-attention blocks (blocks_token_only) is not supported")
    if model.global_pool != "token":
        raise VitqError(f"Cait with global_pool={model.global_pool!r} is not supported (expected 'token')")
    convert_children(model, "", scheme)


def trunk(model: nn.Module) -> TrunkParts:
    """The LayerScale blocks on the patch tokens, then one :class:`CaitClassStage` per class-attention block."""
    units = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    units += [(f"blocks_token_only.{i}", CaitClassStage(b, model.cls_token if i == 0 else None))
              for i, b in enumerate(model.blocks_token_only)]
    return TrunkParts(stem=lambda x: model.pos_drop(model.patch_embed(x) + model.pos_embed), units=units,
                      tail=lambda h: model.forward_head(model.norm(h)),
                      is_block=lambda m: isinstance(m, (QLayerScaleBlock, CaitClassStage)))


def search_paths(unit: nn.Module, groups: set[str]) -> list[str] | None:
    """CaiT units: ``attn`` = the attention's projections and head mixers, ``mlp`` = fc1 and fc2."""
    if isinstance(unit, QLayerScaleBlock):
        return group_paths(unit, {"attn": "attn", "mlp": "mlp"}, groups)
    if isinstance(unit, CaitClassStage):
        return group_paths(unit, {"attn": "block.attn", "mlp": "block.mlp"}, groups)
    return None


register_family(Family(
    name="timm-cait",
    description="timm CaiT (LayerScale blocks with talking-heads attention, then class-attention blocks)",
    detect=detect, convert=convert, trunk=trunk, search_paths=search_paths, float_ok=("Scale",),
    quantizes={
        "fq": "weights per output channel (uint), every linear input (the head mixers' too), q/k/v, attention "
              "scores, the attn·V input (the mixed attention weights), LayerNorm inputs and the residual stream "
              "(PTF; the class token with its own range)",
        "matmul": "weights per output channel (int), every linear input (the head mixers' too), q/k/v and the "
                  "attn·V input (the mixed attention weights; both attention-matmul inputs); softmax and LayerNorm "
                  "in float",
    },
))

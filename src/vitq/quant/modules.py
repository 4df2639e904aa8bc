"""Quantized modules, each built *from* the timm module it replaces (reusing its parameters and settings).

No model code is copied and no ``forward`` is patched: :func:`vitq.prepare.prepare` swaps these in.
Features a module does not handle raise :class:`VitqError` naming the module.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vitq.errors import VitqError
from vitq.quant.base import Quantizer, make_quantizer
from vitq.quant.uniform import PTFQuantizer, UniformQuantizer


def correct_weight(w: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """Weight bias correction (Banner et al.): per output channel, give the quantized weight the mean and
    standard deviation of the float weight."""
    dims = tuple(range(1, w.dim()))
    mu, mu_hat = w.mean(dims, keepdim=True), w_hat.mean(dims, keepdim=True)
    sd, sd_hat = w.std(dims, keepdim=True), w_hat.std(dims, keepdim=True)
    return (w_hat - mu_hat) * (sd / sd_hat.clamp_min(1e-12)) + mu


class QWeighted(nn.Module):
    """Shared part of QLinear and QConv2d: an input quantizer, a per-output-channel weight quantizer and an
    optional weight bias correction (a buffer, so it is part of the saved state)."""

    def _init_quant(self, module: nn.Module, w_bits: int, a_bits: int, signed_weights: bool, input_role: str):
        self.weight = module.weight
        self.bias = module.bias
        self.input_quant = make_quantizer("uniform", a_bits, input_role)
        self.weight_quant = UniformQuantizer(w_bits, "weight", signed=signed_weights, channel_axis=0,
                                             num_channels=module.weight.shape[0])
        self.register_buffer("weight_correction", torch.zeros((), dtype=torch.bool))

    def quantized_weight(self) -> torch.Tensor:
        w_hat = self.weight_quant(self.weight)
        if bool(self.weight_correction) and bool(self.weight_quant.initialized):
            w_hat = correct_weight(self.weight, w_hat)
        return w_hat


class QLinear(QWeighted):
    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int, signed_weights: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_quant(linear, w_bits, a_bits, signed_weights, "linear_input")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quant(x), self.quantized_weight(), self.bias)


class QConv2d(QWeighted):
    def __init__(self, conv: nn.Conv2d, w_bits: int, a_bits: int, signed_weights: bool, input_role: str):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise VitqError(f"Conv2d with padding={conv.padding!r}, padding_mode={conv.padding_mode!r} "
                            "is not supported (expected numeric zero padding)")
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self._init_quant(conv, w_bits, a_bits, signed_weights, input_role)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.input_quant(x), self.quantized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class QLayerNorm(nn.Module):
    """LayerNorm whose input is quantized with a power-of-two factor per channel (fq regime). The float
    LayerNorm of the dequantized input equals the integer LayerNorm with shifts."""

    def __init__(self, norm: nn.LayerNorm, a_bits: int):
        super().__init__()
        if len(norm.normalized_shape) != 1:
            raise VitqError(f"LayerNorm over {tuple(norm.normalized_shape)} is not supported (expected one axis)")
        self.normalized_shape, self.eps = norm.normalized_shape, norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.input_quant = PTFQuantizer(a_bits, "norm_input", num_channels=norm.normalized_shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(self.input_quant(x), self.normalized_shape, self.weight, self.bias, self.eps)


class QAttentionBase(nn.Module):
    """The quantized attention computation shared by ViT's ``Attention`` and Swin's ``WindowAttention``.

    ``score_quant`` (fq only; an ``nn.Identity`` tap otherwise, so methods can always hook the pre-softmax
    scores) quantizes q·kᵀ·scale (+ bias); ``softmax_quant`` quantizes the attention probabilities.
    """

    def _init_core(self, attn: nn.Module, a_bits: int, softmax_bits: int, fully_quantized: bool,
                   softmax_kind: str, per_head: bool):
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.qkv, self.proj = attn.qkv, attn.proj
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        heads = {"channel_axis": 1, "num_channels": attn.num_heads} if per_head else {}  # q/k/v are [B, H, N, D]
        self.q_quant = make_quantizer("uniform", a_bits, "q", **heads)
        self.k_quant = make_quantizer("uniform", a_bits, "k", **heads)
        self.v_quant = make_quantizer("uniform", a_bits, "v", **heads)
        self.score_quant = make_quantizer("uniform", a_bits, "scores") if fully_quantized else nn.Identity()
        self.softmax_quant = make_quantizer(softmax_kind, softmax_bits, "softmax")

    def _qkv(self, x: torch.Tensor):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_quant(q), self.k_quant(k), self.v_quant(v)

    def score_bias(self) -> torch.Tensor | None:
        """The additive bias of the pre-softmax scores ([1, H, N, N]), or None when there is none."""
        return None

    def _softmax_v(self, scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        attn = self.softmax_quant(self.score_quant(scores).softmax(dim=-1))
        x = self.attn_drop(attn) @ v
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)
        return self.proj_drop(self.proj(x))


class QAttention(QAttentionBase):
    """Built from timm's ``vision_transformer.Attention`` (standard multi-head self-attention)."""

    def __init__(self, attn: nn.Module, a_bits: int, softmax_bits: int, fully_quantized: bool, softmax_kind: str,
                 per_head: bool = False):
        super().__init__()
        for feat in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(attn, feat, nn.Identity()), nn.Identity):
                raise VitqError(f"attention with {feat} ({type(getattr(attn, feat)).__name__}) is not supported")
        if getattr(attn, "gate", None) is not None:
            raise VitqError("gated attention is not supported")
        self._init_core(attn, a_bits, softmax_bits, fully_quantized, softmax_kind, per_head)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise VitqError("attention masks / causal attention are not supported")
        q, k, v = self._qkv(x)
        return self._softmax_v((q * self.scale) @ k.transpose(-2, -1), v)


class QWindowAttention(QAttentionBase):
    """Built from timm's Swin ``WindowAttention``: relative position bias and the shifted-window mask are
    added to the scores before the (fq) score quantizer."""

    def __init__(self, attn: nn.Module, a_bits: int, softmax_bits: int, fully_quantized: bool, softmax_kind: str,
                 per_head: bool = False):
        super().__init__()
        if not hasattr(attn, "_get_rel_pos_bias"):
            raise VitqError(f"{type(attn).__name__} without relative position bias is not supported")
        self._init_core(attn, a_bits, softmax_bits, fully_quantized, softmax_kind, per_head)
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index,
                             persistent="relative_position_index" not in attn._non_persistent_buffers_set)
        self.window_area = attn.window_area

    def rel_pos_bias(self) -> torch.Tensor:
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def score_bias(self) -> torch.Tensor:
        return self.rel_pos_bias()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._qkv(x)
        scores = (q * self.scale) @ k.transpose(-2, -1) + self.rel_pos_bias()
        if mask is not None:
            nw, n = mask.shape[0], scores.shape[-1]
            scores = (scores.view(-1, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0))
            scores = scores.view(-1, self.num_heads, n, n)
        return self._softmax_v(scores, v)


class QTransformerBlock(nn.Module):
    """Base of pre-norm residual transformer blocks (``norm1``, ``attn``, ``norm2``, ``mlp``, ``res_quant1``,
    ``res_quant2``). ``sequential``: the forward is exactly ``x = res_quant1(x); x = x +
    drop_path1(ls1(attn(norm1(x)))); x = res_quant2(x); return x + drop_path2(ls2(mlp(norm2(x))))``."""

    sequential: ClassVar[bool] = False


class QBlock(QTransformerBlock):
    """Built from timm's ViT ``Block``. In the fq regime the residual stream is quantized (PTF) where it
    enters each LayerNorm, and the quantized value also feeds the skip connection."""

    sequential = True

    def __init__(self, block: nn.Module, res_quant1: Quantizer | None, res_quant2: Quantizer | None):
        super().__init__()
        for name in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
            setattr(self, name, getattr(block, name))
        self.res_quant1 = res_quant1 if res_quant1 is not None else nn.Identity()
        self.res_quant2 = res_quant2 if res_quant2 is not None else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise VitqError("attention masks / causal attention are not supported")
        x = self.res_quant1(x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = self.res_quant2(x)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class QSwinBlock(QTransformerBlock):
    """Built from timm's ``SwinTransformerBlock``. The shifted-window partition is timm's own ``_attn``
    (called on this module, which carries the attributes it reads); only the residual adds are ours."""

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
        self.res_quant1 = res_quant1 if res_quant1 is not None else nn.Identity()
        self.res_quant2 = res_quant2 if res_quant2 is not None else nn.Identity()

    def get_attn_mask(self, x: torch.Tensor) -> torch.Tensor:  # read by timm's _attn when dynamic_mask
        return self._timm_cls.get_attn_mask(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = self.res_quant1(x)
        x = x + self.drop_path1(self._timm_cls._attn(self, self.norm1(x)))
        x = self.res_quant2(x.reshape(B, -1, C))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)

"""The family-neutral quantized modules, each built *from* the float module it replaces (reusing its parameters
and settings): :class:`QWeighted` (:class:`QLinear`, :class:`QConv2d`), :class:`QLayerNorm`, and the bases every
family's quantized attention and pre-norm block derive from, :class:`QAttentionBase` and
:class:`QTransformerBlock`. Activation quantizers are built by :func:`activation_quantizer`, which takes their
kind from the scheme.

No model code is copied and no ``forward`` is patched: the families' ``convert`` swap these in. Features a
module does not handle raise :class:`VitqError` naming the module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitq.errors import VitqError
from vitq.quant.base import Quantizer, make_quantizer
from vitq.quant.uniform import PTFQuantizer, UniformQuantizer
from vitq.scheme import BASE_KIND, Scheme


def activation_quantizer(scheme: Scheme | None, bits: int, role: str, use: str | None = None,
                         **kwargs) -> Quantizer:
    """The one place activation quantizers are built: a quantizer of ``role`` whose kind the scheme gives for
    ``use`` (default: the role; see :meth:`Scheme.kind_for`). Without a scheme, the base kind."""
    kind = scheme.kind_for(use or role) if scheme is not None else BASE_KIND
    return make_quantizer(kind, bits, role, **kwargs)


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

    vitq_quantized = True

    def _init_quant(self, module: nn.Module, w_bits: int, a_bits: int, signed_weights: bool, input_role: str,
                    scheme: Scheme | None):
        self.weight = module.weight
        self.bias = module.bias
        self.input_quant = activation_quantizer(scheme, a_bits, input_role)
        self.weight_quant = UniformQuantizer(w_bits, "weight", signed=signed_weights, channel_axis=0,
                                             num_channels=module.weight.shape[0])
        self.register_buffer("weight_correction", torch.zeros((), dtype=torch.bool))

    def quantized_weight(self) -> torch.Tensor:
        w_hat = self.weight_quant(self.weight)
        if bool(self.weight_correction) and bool(self.weight_quant.initialized):
            w_hat = correct_weight(self.weight, w_hat)
        return w_hat


class QLinear(QWeighted):
    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int, signed_weights: bool,
                 scheme: Scheme | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_quant(linear, w_bits, a_bits, signed_weights, "linear_input", scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quant(x), self.quantized_weight(), self.bias)


class QConv2d(QWeighted):
    def __init__(self, conv: nn.Conv2d, w_bits: int, a_bits: int, signed_weights: bool, input_role: str,
                 scheme: Scheme | None = None):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise VitqError(f"Conv2d with padding={conv.padding!r}, padding_mode={conv.padding_mode!r} "
                            "is not supported (expected numeric zero padding)")
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self._init_quant(conv, w_bits, a_bits, signed_weights, input_role, scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.input_quant(x), self.quantized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class QLayerNorm(nn.Module):
    """LayerNorm whose input is quantized with a power-of-two factor per channel (fq regime). The float
    LayerNorm of the dequantized input equals the integer LayerNorm with shifts."""

    vitq_quantized = True

    def __init__(self, norm: nn.LayerNorm, a_bits: int):
        super().__init__()
        if len(norm.normalized_shape) != 1:
            raise VitqError(f"LayerNorm over {tuple(norm.normalized_shape)} is not supported (expected one axis)")
        self.normalized_shape, self.eps = norm.normalized_shape, norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.input_quant = PTFQuantizer(a_bits, "norm_input", num_channels=norm.normalized_shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(self.input_quant(x), self.normalized_shape, self.weight, self.bias, self.eps)


class PrefixSplit(nn.Module):
    """Two quantizers for one token tensor [B, N, C]: ``prefix_quant`` for its first ``num_prefix`` tokens
    (class, distillation and register tokens) and ``token_quant`` for the patch tokens. Static and
    integer-friendly (which range a token uses is known from its position), for the fq regime's residual stream
    and LayerNorm inputs: with LayerScale (DeiT-III, DINOv2, CaiT) the class token is orders of magnitude
    smaller than the patch tokens, so one range rounds it to a few levels (at timm's init, to 0), and the
    LayerNorm that follows, invariant to its scale, then normalizes the rounding noise."""

    vitq_quantized = True

    def __init__(self, prefix_quant: Quantizer, token_quant: Quantizer, num_prefix: int):
        super().__init__()
        if num_prefix < 1:
            raise ValueError(f"num_prefix {num_prefix} (expected at least one prefix token)")
        self.prefix_quant, self.token_quant, self.num_prefix = prefix_quant, token_quant, int(num_prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.num_prefix
        return torch.cat([self.prefix_quant(x[:, :n]), self.token_quant(x[:, n:])], dim=1)


def split_prefix(quant: Quantizer, num_prefix: int, **prefix_kwargs) -> nn.Module:
    """``quant`` for the patch tokens beside a fresh quantizer of the same kind and settings (those of
    ``prefix_kwargs`` changed) for the first ``num_prefix`` tokens (:class:`PrefixSplit`); ``quant`` itself when
    there are no prefix tokens."""
    if num_prefix < 1:
        return quant
    twin = make_quantizer(quant.kind, quant.bits, quant.role, **{**quant.init_kwargs(), **prefix_kwargs})
    return PrefixSplit(twin, quant, num_prefix)


class QAttentionBase(nn.Module):
    """The quantized attention computation every family's attention derives from.

    Attributes: ``num_heads``, ``scale``, ``qkv`` (the fused q/k/v projection; None where q, k and v are
    projected separately), ``proj``, ``attn_drop``, ``proj_drop``, and the quantizers ``q_quant``, ``k_quant``,
    ``v_quant``, ``score_quant`` (fq only; an ``nn.Identity`` tap otherwise, so methods can always hook the
    pre-softmax scores) and ``softmax_quant``. A subclass builds its float parts, calls
    :meth:`_init_quantizers`, and overrides :meth:`_project` where q/k/v are not one fused ``qkv`` and
    :meth:`score_bias` where its scores carry an additive bias. ``scale_first``: the scores are
    (q·scale)·kᵀ (timm) or, when False, (q·kᵀ)·scale (the order of the float model it replaces).
    """

    vitq_quantized = True
    scale_first = True

    def _init_core(self, attn: nn.Module, scheme: Scheme, a_bits: int, softmax_bits: int):
        """From a module with timm's attention attributes (num_heads, scale, qkv, proj, attn_drop, proj_drop)."""
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.qkv, self.proj = attn.qkv, attn.proj
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self._init_quantizers(scheme, a_bits, softmax_bits)

    def _init_quantizers(self, scheme: Scheme, a_bits: int, softmax_bits: int):
        """q/k/v (per tensor, or per head under ``attn_granularity="head"``), score (fq) and softmax quantizers."""
        per_head = scheme.attn_granularity == "head"
        heads = {"channel_axis": 1, "num_channels": self.num_heads} if per_head else {}  # q/k/v are [B, H, N, D]
        self.q_quant = activation_quantizer(scheme, a_bits, "q", **heads)
        self.k_quant = activation_quantizer(scheme, a_bits, "k", **heads)
        self.v_quant = activation_quantizer(scheme, a_bits, "v", **heads)
        self.score_quant = activation_quantizer(scheme, a_bits, "scores") if scheme.fully_quantized else nn.Identity()
        self.softmax_quant = activation_quantizer(scheme, softmax_bits, "softmax")

    def _project(self, x: torch.Tensor):
        """Float q, k, v as [B, H, N, D] from the fused ``qkv`` projection of ``x`` [B, N, C]."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def _qkv(self, x: torch.Tensor):
        """Quantized q, k, v as [B, H, N, D]."""
        q, k, v = self._project(x)
        return self.q_quant(q), self.k_quant(k), self.v_quant(v)

    def score_bias(self) -> torch.Tensor | None:
        """The additive bias of the pre-softmax scores (broadcast to [B, H, N, N]); None when there is none."""
        return None

    def _scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Pre-softmax scores q·kᵀ·scale + :meth:`score_bias`."""
        scores = (q * self.scale) @ k.transpose(-2, -1) if self.scale_first else (q @ k.transpose(-2, -1)) * self.scale
        bias = self.score_bias()
        return scores if bias is None else scores + bias

    def _softmax_v(self, scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Quantized softmax of the (quantized) scores, times v, heads merged, projected: [B, N, C]."""
        attn = self.softmax_quant(self.score_quant(scores).softmax(dim=-1))
        x = self.attn_drop(attn) @ v
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)
        return self.proj_drop(self.proj(x))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """The whole attention of ``x`` [B, N, C] when no mask is added to the scores."""
        q, k, v = self._qkv(x)
        return self._softmax_v(self._scores(q, k), v)


class QTransformerBlock(nn.Module):
    """Base of the quantized pre-norm residual transformer blocks: ``norm1``, ``attn`` (a
    :class:`QAttentionBase`), ``norm2``, ``mlp`` (``fc1``, ``act``, ``fc2``), and ``res_quant1`` /
    ``res_quant2`` quantizing the residual stream where it enters each branch (fq; ``nn.Identity`` otherwise).

    ``sequential`` is True when the forward is exactly the one below (with ``ls1``, ``ls2``, ``drop_path1``,
    ``drop_path2``), so a method may run the block part by part; a block whose attention depends on its own
    reshaping (Swin's windows) sets it False and overrides ``forward``.
    """

    vitq_quantized = True
    sequential: bool = True

    def _init_residual(self, res_quant1: Quantizer | None, res_quant2: Quantizer | None):
        self.res_quant1 = res_quant1 if res_quant1 is not None else nn.Identity()
        self.res_quant2 = res_quant2 if res_quant2 is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res_quant1(x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = self.res_quant2(x)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

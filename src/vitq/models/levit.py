"""timm LeViT (``levit_*``): convolutional stem, attention with learned attention biases, subsampling
attention between stages, linear/conv + BatchNorm layers, Hardswish.

Preparation folds every BatchNorm (``ConvNorm``/``LinearNorm`` into their layer, the head's ``NormLinear``
BatchNorm into the linear after it), then builds :class:`QLevitAttention` / :class:`QLevitAttentionDownsample`
from timm's modules (reusing their layers, biases and index tables) and swaps every Conv2d/Linear for its
quantized version. q, k, v and the softmax output are quantized (per tensor, or per head), the attention bias
is added to the scores in float, and under ``fq`` the scores (bias included) and the residual stream at the
input of each residual branch (per tensor: LeViT has no LayerNorm, so no PTF) are quantized too. Hardswish
stays in float. The ``use_conv`` variants (``levit_conv_*``) are refused.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.models.common import example_input, swap_weighted
from vitq.models.family import Family, TrunkParts, group_paths, register_family
from vitq.models.fold import fold_batchnorms
from vitq.quant.base import Quantizer
from vitq.quant.modules import QAttentionBase, activation_quantizer
from vitq.scheme import Scheme


def _levit():
    from timm.models import levit

    return levit


class _QLevitCore(QAttentionBase):
    """What both LeViT attention kinds share: the attention biases (:meth:`score_bias`, added to the scores in
    float), scores computed as (q·kᵀ)·scale as timm's LeViT does, no dropout."""

    scale_first = False

    def _init_levit(self, attn: nn.Module, scheme: Scheme, a_bits: int, softmax_bits: int):
        if attn.use_conv:
            raise VitqError(f"{type(attn).__name__} with use_conv=True (levit_conv_*) is not supported; "
                            "expected a levit_* model")
        self.num_heads, self.key_dim, self.val_dim = attn.num_heads, attn.key_dim, attn.val_dim
        self.val_attn_dim, self.scale = attn.val_attn_dim, attn.scale
        self.proj = attn.proj
        self.attention_biases = attn.attention_biases
        self.register_buffer("attention_bias_idxs", attn.attention_bias_idxs.clone(), persistent=False)
        self.qkv = None  # QLevitAttention sets its fused projection; the downsampling one has q and kv
        self.attn_drop, self.proj_drop = nn.Identity(), nn.Identity()
        self._init_quantizers(scheme, a_bits, softmax_bits)

    def score_bias(self) -> torch.Tensor:
        """The learned attention biases, [1, H, Nq, N]."""
        return self.attention_biases[:, self.attention_bias_idxs].unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._attend(x)


class QLevitAttention(_QLevitCore):
    """Built from timm's LeViT ``Attention``: qkv (LinearNorm, BN folded), heads split into q, k, v."""

    def __init__(self, attn: nn.Module, scheme: Scheme, a_bits: int, softmax_bits: int):
        super().__init__()
        self._init_levit(attn, scheme, a_bits, softmax_bits)
        self.qkv = attn.qkv

    def _project(self, x: torch.Tensor):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], 3)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class QLevitAttentionDownsample(_QLevitCore):
    """Built from timm's LeViT ``AttentionDownsample``: queries from the subsampled tokens (``q``: subsample
    then LinearNorm), keys and values from all tokens (``kv``)."""

    def __init__(self, attn: nn.Module, scheme: Scheme, a_bits: int, softmax_bits: int):
        super().__init__()
        self._init_levit(attn, scheme, a_bits, softmax_bits)
        self.kv, self.q = attn.kv, attn.q

    def _project(self, x: torch.Tensor):
        B, N, _ = x.shape
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        q = self.q(x).view(B, -1, self.num_heads, self.key_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class QLevitBlock(nn.Module):
    """Built from timm's ``LevitBlock``; under fq the residual stream is quantized where each branch starts."""

    vitq_quantized = True

    def __init__(self, block: nn.Module, res_quant1: Quantizer | None, res_quant2: Quantizer | None):
        super().__init__()
        for name in ("attn", "drop_path1", "mlp", "drop_path2"):
            setattr(self, name, getattr(block, name))
        self.res_quant1 = res_quant1 if res_quant1 is not None else nn.Identity()
        self.res_quant2 = res_quant2 if res_quant2 is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res_quant1(x)
        x = x + self.drop_path1(self.attn(x))
        x = self.res_quant2(x)
        return x + self.drop_path2(self.mlp(x))


class QLevitDownsample(nn.Module):
    """Built from timm's ``LevitDownsample`` (subsampling attention, then a residual MLP)."""

    vitq_quantized = True

    def __init__(self, block: nn.Module, res_quant: Quantizer | None):
        super().__init__()
        for name in ("attn_downsample", "mlp", "drop_path"):
            setattr(self, name, getattr(block, name))
        self.res_quant = res_quant if res_quant is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res_quant(self.attn_downsample(x))
        return x + self.drop_path(self.mlp(x))


def detect(model: nn.Module) -> bool:
    return type(model).__module__ == "timm.models.levit" and not getattr(model, "use_conv", False)


def input_size(model: nn.Module) -> tuple[int, int]:
    """The resolution the model was built for: first attention's token grid times the stem's stride."""
    levit = _levit()
    attn = next((m for m in model.modules() if isinstance(m, (levit.Attention, levit.AttentionDownsample))), None)
    if attn is None:
        raise VitqError("LeViT model without attention modules")
    stride = math.prod(m.stride[0] for m in model.stem.modules() if isinstance(m, nn.Conv2d))
    return attn.resolution[0] * stride, attn.resolution[1] * stride


def convert(model: nn.Module, scheme: Scheme) -> None:
    levit = _levit()
    if getattr(model, "use_conv", False):
        raise VitqError(f"{type(model).__name__} with use_conv=True (levit_conv_*) is not supported; "
                        "expected a levit_* model")
    info = fold_batchnorms(model, example_input(input_size(model)))
    for name, m in list(model.named_modules()):
        _, a, s = scheme.bits_for(name)
        new = None
        if type(m) is levit.Attention:
            new = QLevitAttention(m, scheme, a, s)
        elif type(m) is levit.AttentionDownsample:
            new = QLevitAttentionDownsample(m, scheme, a, s)
        if new is not None:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)

    def res(bits: int) -> Quantizer | None:
        return activation_quantizer(scheme, bits, "residual") if scheme.fully_quantized else None

    for name, m in list(model.named_modules()):
        a = scheme.bits_for(name)[1]
        new = None
        if type(m) is levit.LevitBlock:
            new = QLevitBlock(m, res(a), res(a))
        elif type(m) is levit.LevitDownsample:
            new = QLevitDownsample(m, res(a))
        if new is not None:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)
    swap_weighted(model, scheme, image_layers=set(info["reads_image"]))


def _units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    units = []
    for i, stage in enumerate(model.stages):
        if not isinstance(stage.downsample, nn.Identity):
            units.append((f"stages.{i}.downsample", stage.downsample))
        units += [(f"stages.{i}.blocks.{j}", b) for j, b in enumerate(stage.blocks)]
    return units


def trunk(model: nn.Module) -> TrunkParts:
    return TrunkParts(stem=lambda x: model.stem(x).flatten(2).transpose(1, 2), units=_units(model),
                      tail=model.forward_head, is_block=lambda m: hasattr(m, "attn") or hasattr(m, "attn_downsample"))


def search_paths(unit: nn.Module, groups: set[str]) -> list[str] | None:
    """LeViT units: ``attn`` = the weight scales of the (subsampling) attention, ``mlp`` = those of the MLP."""
    if not isinstance(unit, (QLevitBlock, QLevitDownsample)):
        return None
    attn = "attn" if isinstance(unit, QLevitBlock) else "attn_downsample"
    return group_paths(unit, {"attn": attn, "mlp": "mlp"}, groups)


register_family(Family(
    name="timm-levit",
    description="timm LeViT (levit_*; not levit_conv_*): BatchNorms folded, attention with learned "
                "attention biases, subsampling attention; one trunk unit per block and per subsampling block",
    detect=detect, convert=convert, trunk=trunk, search_paths=search_paths, input_size=input_size,
    quantizes={
        "fq": "weights per output channel (uint), every conv/linear input, q/k/v, attention scores (bias "
              "included), softmax output, and the residual stream per tensor (no LayerNorm, so no PTF); "
              "Hardswish in float",
        "matmul": "weights per output channel (int), every conv/linear input, q/k/v and softmax output; "
                  "scores, softmax and Hardswish in float",
    },
))

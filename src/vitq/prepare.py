"""Insert quantizers into a model according to a scheme: swap timm modules for their quantized versions.

The user's model is left untouched (a deep copy is converted). Anything holding weights that we do not know
how to quantize, and any attention or block type we do not handle, stops preparation with a clear error.
"""

from __future__ import annotations

import copy

from torch import nn

from vitq.errors import VitqError
from vitq.quant.base import Quantizer, make_quantizer
from vitq.quant.modules import QAttention, QBlock, QConv2d, QLayerNorm, QLinear, QSwinBlock, QWindowAttention
from vitq.quant.uniform import PTFQuantizer
from vitq.scheme import Scheme

# parameter-holding leaves that are fine to leave in float (LayerScale multiplies the residual branch)
_FLOAT_OK = ("LayerScale", "LayerNorm")


def _timm_classes():
    from timm.layers import Attention
    from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
    from timm.models.vision_transformer import Block

    return Attention, Block, WindowAttention, SwinTransformerBlock


def prepare(model: nn.Module, scheme: Scheme) -> nn.Module:
    """Return a quantization-ready copy of ``model`` (quantizers uncalibrated, i.e. the identity)."""
    from vitq.models.family import family_of

    qmodel = copy.deepcopy(model).eval()
    family = family_of(qmodel)
    family.convert(qmodel, scheme)
    if scheme.gelu_quantizer not in (None, "uniform"):
        _set_gelu_quantizers(qmodel, scheme.gelu_quantizer)
    _check_supported(qmodel, family.float_ok)
    qmodel.vitq_scheme = scheme
    return qmodel


def _convert(module: nn.Module, prefix: str, scheme: Scheme, in_block: bool) -> None:
    Attention, Block, WindowAttention, SwinBlock = _timm_classes()
    per_head = scheme.attn_granularity == "head"
    for child_name, child in list(module.named_children()):
        name = f"{prefix}{child_name}"
        w, a, s = scheme.bits_for(name)
        is_block = type(child) in (Block, SwinBlock)
        _convert(child, name + ".", scheme, in_block=is_block)
        new = None
        if isinstance(child, nn.Linear):
            new = QLinear(child, w, a, scheme.signed_weights)
        elif isinstance(child, nn.Conv2d):
            role = "image" if name.endswith("patch_embed.proj") else "linear_input"
            new = QConv2d(child, w, scheme.input_bits if role == "image" else a, scheme.signed_weights, role)
        elif type(child) is Attention:
            new = QAttention(child, a, s, scheme.fully_quantized, scheme.softmax_kind, per_head)
        elif type(child) is WindowAttention:
            new = QWindowAttention(child, a, s, scheme.fully_quantized, scheme.softmax_kind, per_head)
        elif is_block:
            r1 = r2 = None
            if scheme.fully_quantized:
                r1 = PTFQuantizer(a, "residual", num_channels=child.norm1.normalized_shape[0])
                r2 = PTFQuantizer(a, "residual", num_channels=child.norm2.normalized_shape[0])
            new = (QBlock if type(child) is Block else QSwinBlock)(child, r1, r2)
        elif isinstance(child, nn.LayerNorm) and scheme.fully_quantized and not (
                in_block and child_name in ("norm1", "norm2")):
            new = QLayerNorm(child, a)
        if new is not None:
            setattr(module, child_name, new)


def _set_gelu_quantizers(model: nn.Module, kind: str) -> None:
    """Give the input of every MLP's fc2 that follows a GELU (the post-GELU activation) a ``kind`` quantizer."""
    for m in list(model.modules()):
        fc2, act = getattr(m, "fc2", None), getattr(m, "act", None)
        if isinstance(fc2, QLinear) and isinstance(act, nn.GELU):
            old = fc2.input_quant
            fc2.input_quant = make_quantizer(kind, old.bits, old.role)


def _check_supported(model: nn.Module, float_ok: tuple[str, ...] = ()) -> None:
    """Refuse, by name, what the conversion left unquantized: attention and block modules, and any module
    holding weights, unless it is a quantized module (``vitq_quantized``) or a known float-ok holder."""
    qtypes = (QLinear, QConv2d, QLayerNorm, Quantizer)
    for name, m in model.named_modules():
        cls = type(m).__name__
        if isinstance(m, qtypes) or getattr(type(m), "vitq_quantized", False) or cls in float_ok:
            continue
        if "Attention" in cls and not isinstance(m, (QAttention, QWindowAttention)):
            raise VitqError(f"unsupported attention module {name} ({cls}); supported: timm Attention, WindowAttention")
        if cls.endswith("Block") and not isinstance(m, (QBlock, QSwinBlock)):
            raise VitqError(f"unsupported block {name} ({cls}); supported: timm ViT Block, SwinTransformerBlock")
        own = [p for p, _ in m.named_parameters(recurse=False)]
        if own and not isinstance(m, (QAttention, QWindowAttention)) and not (
                cls in _FLOAT_OK or name == "" or isinstance(m, nn.LayerNorm)):
            raise VitqError(f"unsupported module {name} ({cls}) holds weights {own} that vitq cannot quantize")


def quantizer_config(q: Quantizer) -> dict:
    """What is needed to rebuild a quantizer of the same structure (kind, bits, role, constructor args)."""
    cfg = {"kind": q.kind, "bits": q.bits, "role": q.role}
    cfg.update(q.init_kwargs() if hasattr(q, "init_kwargs") else {})
    return cfg


def rebuild_quantizers(model: nn.Module, configs: dict[str, dict]) -> None:
    """Replace each named quantizer whose saved structure differs from the scheme's (a method may have
    swapped in another kind), so a saved state loads into a freshly prepared model."""
    for name, cfg in configs.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        current = getattr(parent, attr, None)
        if isinstance(current, Quantizer) and quantizer_config(current) == cfg:
            continue
        cfg = dict(cfg)
        setattr(parent, attr, make_quantizer(cfg.pop("kind"), cfg.pop("bits"), cfg.pop("role"), **cfg))

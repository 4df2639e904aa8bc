"""Insert quantizers into a model according to a scheme: the model's family swaps its modules for their
quantized versions, then what every family shares (the post-GELU quantizer kind, the check that nothing was
left unquantized).

The user's model is left untouched (a deep copy is converted). Anything holding weights that we do not know
how to quantize, and any attention or block type we do not handle, stops preparation with a clear error.
"""

from __future__ import annotations

import copy

from torch import nn

from vitq.errors import VitqError
from vitq.models.family import family_of
from vitq.quant.base import Quantizer, make_quantizer
from vitq.quant.modules import QAttentionBase, QLayerNorm, QLinear, QTransformerBlock, QWeighted, activation_quantizer
from vitq.scheme import Scheme

# parameter-holding leaves that are fine to leave in float (LayerScale multiplies the residual branch)
_FLOAT_OK = ("LayerScale", "LayerNorm")


def prepare(model: nn.Module, scheme: Scheme) -> nn.Module:
    """Return a quantization-ready copy of ``model`` (quantizers uncalibrated, i.e. the identity)."""
    qmodel = copy.deepcopy(model).eval()
    family = family_of(qmodel)
    family.convert(qmodel, scheme)
    set_gelu_quantizers(qmodel, scheme)
    check_supported(qmodel, family.float_ok)
    qmodel.vitq_scheme = scheme
    return qmodel


def set_gelu_quantizers(model: nn.Module, scheme: Scheme) -> None:
    """Give the input of every MLP's fc2 that follows a GELU (the post-GELU activation) the scheme's kind for
    ``post_gelu`` (left as built where it already is of that kind)."""
    kind = scheme.kind_for("post_gelu")
    for m in list(model.modules()):
        fc2, act = getattr(m, "fc2", None), getattr(m, "act", None)
        if isinstance(fc2, QLinear) and isinstance(act, nn.GELU) and fc2.input_quant.kind != kind:
            old = fc2.input_quant
            fc2.input_quant = activation_quantizer(scheme, old.bits, old.role, use="post_gelu")


def check_supported(model: nn.Module, float_ok: tuple[str, ...] = ()) -> None:
    """Refuse, by name, what the conversion left unquantized: attention and block modules, and any module
    holding weights, unless it is a quantized module (``vitq_quantized``) or a known float-ok holder."""
    qtypes = (QWeighted, QLayerNorm, QAttentionBase, QTransformerBlock, Quantizer)
    for name, m in model.named_modules():
        cls = type(m).__name__
        if isinstance(m, qtypes) or getattr(type(m), "vitq_quantized", False) or cls in float_ok:
            continue
        if "Attention" in cls:
            raise VitqError(f"unsupported attention module {name} ({cls}); supported: the attention modules of the "
                            "families of `vitq models`")
        if cls.endswith("Block"):
            raise VitqError(f"unsupported block {name} ({cls}); supported: the blocks of the families of "
                            "`vitq models`")
        own = [p for p, _ in m.named_parameters(recurse=False)]
        if own and not (cls in _FLOAT_OK or name == "" or isinstance(m, nn.LayerNorm)):
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

"""Insert quantizers into a model according to a scheme: the model's family swaps its modules for their
quantized versions, then what every family shares (the post-GELU quantizer kind, the check that nothing was
left unquantized).

The user's model is left untouched (a deep copy is converted). Anything holding weights that we do not know
how to quantize, and any attention or block type we do not handle, stops preparation with a clear error.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

from torch import nn

from vitq.errors import VitqError
from vitq.models.family import family_of
from vitq.quant.base import Quantizer, make_quantizer, quantizers_of
from vitq.quant.keep_float import KeptFloat
from vitq.quant.modules import QAttentionBase, QLayerNorm, QLinear, QTransformerBlock, QWeighted, activation_quantizer
from vitq.quant.uniform import UniformQuantizer
from vitq.scheme import Scheme
from vitq.targets import GROUPS, ROLE_GROUP, SPLITS, float_reason, get_target, weight_note

log = logging.getLogger("vitq")

# parameter-holding leaves that are fine to leave in float (LayerScale multiplies the residual branch)
_FLOAT_OK = ("LayerScale", "LayerNorm")


def prepare(model: nn.Module, scheme: Scheme) -> nn.Module:
    """Return a quantization-ready copy of ``model`` (quantizers uncalibrated, i.e. the identity). Under a
    deployment target (``scheme.target``) only the quantizers the target runs as integer kernels are built; the
    others are ``float`` quantizers, and ``qmodel.vitq_target_report`` says which and why."""
    scheme = scheme_for_target(scheme)
    qmodel = copy.deepcopy(model).eval()
    family = family_of(qmodel)
    family.convert(qmodel, scheme)
    set_gelu_quantizers(qmodel, scheme)
    qmodel.vitq_target_report = apply_target(qmodel, scheme)
    check_supported(qmodel, family.float_ok)
    qmodel.vitq_scheme = scheme
    return qmodel


def scheme_for_target(scheme: Scheme) -> Scheme:
    """The scheme with what its target requires of it: symmetric (signed) per-channel weights."""
    target = get_target(scheme.target)
    if not target.simulation and target.symmetric_weights and not scheme.signed_weights:
        return dataclasses.replace(scheme, weight_signed=True)
    return scheme


def apply_target(model: nn.Module, scheme: Scheme) -> dict:
    """Replace every quantizer the scheme's target does not run as an integer kernel (or that ``keep_float``
    names) with a ``float`` quantizer, give the rest the codes the target takes (TensorRT: signed, symmetric;
    OpenVINO: signed, symmetric q and k),
    and return what was left in float and why: ``{"target", "float": {reason: [names]}, "weights"}``."""
    target = get_target(scheme.target)
    reasons: dict[str, str] = {}
    units = quantizer_units(model)
    for name, q in quantizers_of(model).items():
        per_axis = q.role != "weight" and getattr(q, "channel_axis", None) is not None
        kept = next((g for g in (ROLE_GROUP.get(q.role), units[name]) if g in scheme.keep_float), None)
        why = keep_float_reason(scheme, kept) if kept else float_reason(target, q.role, q.kind, q.bits, per_axis, ())
        if why:
            reasons[name] = why
    # both inputs of an attention matmul or neither: one in float makes it a float matmul
    for name, q in quantizers_of(model).items():
        parent, _, _ = name.rpartition(".")
        group = ROLE_GROUP.get(q.role)
        if name in reasons or group not in ("qk", "attn_v"):
            continue
        partner = next((n for n, p in quantizers_of(model.get_submodule(parent) if parent else model).items()
                        if "." not in n and ROLE_GROUP.get(p.role) == group and f"{parent}.{n}" in reasons), None)
        if partner is not None:
            reasons[name] = f"its partner {partner} is float, so the {group} matmul runs in float"
    for name, q in quantizers_of(model).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if name in reasons:
            setattr(parent, attr, KeptFloat(q.bits, q.role))
        elif (type(q) is UniformQuantizer and q.role != "weight" and not q.signed
              and (target.signed_activations or (target.symmetric_qk and q.role in GROUPS["qk"]))):
            setattr(parent, attr, UniformQuantizer(q.bits, q.role, signed=True, channel_axis=q.channel_axis,
                                                   num_channels=q.scale.numel()))
    roles = {n: q.role for n, q in quantizers_of(model).items()}
    by_reason: dict[str, list[str]] = {}
    for name, why in reasons.items():
        by_reason.setdefault(why, []).append(name)
    report = {"target": target.name, "float": by_reason, "keep_float": list(scheme.keep_float),
              "weights": weight_note(target, scheme.w_bits)}
    for why, names in by_reason.items():
        groups = sorted({ROLE_GROUP.get(roles[n], roles[n]) for n in names})
        log.info("target %s: %d quantizers left in float (%s): %s", target.name, len(names), ", ".join(groups),
                 why)
    if report["weights"]:
        log.info("target %s: %s", target.name, report["weights"])
    return report


def keep_float_reason(scheme: Scheme, group: str) -> str:
    """Why a quantizer of ``group`` (a name of ``scheme.keep_float``) is a float one."""
    if group in scheme.search_float:
        return f"group {group} kept float by the {scheme.search_why}"
    return f"group {group} kept in float by the scheme (keep_float)"


def classifier_name(model: nn.Module) -> str | None:
    """The qualified name of the model's classifier (timm's ``get_classifier()``, else a top-level ``head`` /
    ``classifier`` / ``fc`` module), or None."""
    get = getattr(model, "get_classifier", None)
    head = None
    if callable(get):
        try:
            head = get()
        except (AttributeError, TypeError, NotImplementedError):
            head = None
    if isinstance(head, nn.Module):
        found = next((n for n, m in model.named_modules() if m is head and n), None)
        if found:
            return found
    return next((n for n in ("head", "classifier", "fc") if isinstance(getattr(model, n, None), nn.Module)), None)


def quantizer_units(model: nn.Module) -> dict[str, str]:
    """Quantizer name -> the finest group that names it (:data:`vitq.targets.KEEP_FLOAT_NAMES`): its role's
    group, split where :data:`vitq.targets.SPLITS` says (linear inputs: ``.post_gelu`` for fc2's input after a
    GELU, ``.head`` for the classifier's, ``.other`` for the rest). A role of no group keeps its own name."""
    head = classifier_name(model)
    post_gelu = {f"{n}.fc2.input_quant" if n else "fc2.input_quant" for n, m in model.named_modules()
                 if isinstance(getattr(m, "fc2", None), QLinear) and isinstance(getattr(m, "act", None), nn.GELU)}
    out = {}
    for name, q in quantizers_of(model).items():
        group = ROLE_GROUP.get(q.role, q.role)
        if group in SPLITS:
            part = ("head" if head and name.startswith(head + ".") else
                    "post_gelu" if name in post_gelu else "other")
            group = f"{group}.{part}"
        out[name] = group
    return out


def target_groups(model: nn.Module) -> dict[str, int]:
    """How many quantizers of each group a prepared model computes (``float`` ones not counted)."""
    out = dict.fromkeys(GROUPS, 0)
    for q in quantizers_of(model).values():
        if not isinstance(q, KeptFloat) and q.role in ROLE_GROUP:
            out[ROLE_GROUP[q.role]] += 1
    return out


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

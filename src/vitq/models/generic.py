"""The generic path: any model no dedicated family recognises (tried last), quantized layer by layer.

- **Weighted layers.** BatchNorm is folded wherever it follows a convolution or linear layer, or precedes a
  linear layer (timm's ``BatchNormAct2d`` too: the BatchNorm is folded, its activation kept), each fold checked
  on a traced input; a BatchNorm that cannot be folded (after an addition, a concatenation, a pooling...) is
  kept in float and said so (``model.vitq_notes``, a warning, and the run's record). Then every ``nn.Linear``
  and ``nn.Conv2d`` (depthwise, grouped, TF-'SAME' ``Conv2dSame`` too) becomes ``QLinear`` / ``QConv2d``:
  weights per output channel, the input per tensor (the convolution reading the image at the scheme's
  ``input_bits``).
- **Attention.** The matmuls of attention are quantized where the model computes them, by intercepting the
  calls (:mod:`vitq.models.generic_ops` says how, and why interception rather than graph capture): fused
  ``F.scaled_dot_product_attention`` (q, k, v and the softmax output), explicit ``q @ k.transpose(-2, -1)`` and
  ``attn @ v``, ``bmm`` and two-operand ``einsum``.
- **Units** for block-wise methods come from the model's own block lists (:mod:`vitq.models.generic_trunk`).
- **Refused by name:** any other module computing with weights (``nn.Conv1d``, a Conv2d subclass with its own
  forward such as weight standardization, a module feeding its own parameter to ``F.linear`` / ``F.conv*``),
  and the ``fq`` scheme, whose residual-stream and LayerNorm quantizers need the block structure a dedicated
  family declares. Norms, LayerScale factors, position embeddings and other parameters that only add or scale
  stay in float (listed in the notes).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.models.common import example_input, swap_weighted
from vitq.models.family import Family, TrunkParts, register_family, weight_quantizer_paths
from vitq.models.fold import bn_factors, fold_into_next, fold_into_previous, trace_pairs
from vitq.models.generic_ops import attach_sites, record_calls
from vitq.models.generic_trunk import check_trunk, find_units, stem_and_tail
from vitq.quant.modules import QWeighted

NAME = "generic"
_BN = nn.modules.batchnorm._BatchNorm


def input_size(model: nn.Module) -> tuple[int, int]:
    """The (H, W) the model was built for: its patch embedding's or its own ``img_size``, else timm's
    pretrained_cfg, else 224."""
    for owner in (getattr(model, "patch_embed", None), model):
        size = getattr(owner, "img_size", None)
        if isinstance(size, int):
            return size, size
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
            return int(size[0]), int(size[1])
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return (int(size[1]), int(size[2])) if size else (224, 224)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _remainder(bn: nn.Module) -> nn.Module:
    """What a folded BatchNorm leaves: timm's BatchNormAct2d keeps its dropout and activation."""
    parts = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
             if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    return nn.Identity() if not parts else parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return float((out - ref).abs().max()) <= 1e-4 * (float(ref.abs().max()) or 1.0) + 1e-6


@torch.no_grad()
def fold_where_possible(model: nn.Module, example: torch.Tensor) -> tuple[dict, list[str]]:
    """Fold every BatchNorm that can be folded (see the module docstring); returns the trace of
    :func:`vitq.models.fold.trace_pairs` and the names of the BatchNorms kept in float. All folds are tried
    at once; if the output then changes (a folded layer's output is also read elsewhere), one by one."""
    model.eval()
    info = trace_pairs(model, example)
    bns = {n: m for n, m in model.named_modules() if isinstance(m, _BN)}
    if not bns:
        return info, []
    ref = model(example)
    plans = {}
    for name, bn in bns.items():
        prev, nxt = info["before"].get(name), info["after"].get(name)
        if bn.running_mean is None or not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
            continue
        if prev is not None and model.get_submodule(prev).weight.shape[0] == bn.num_features:
            plans[name] = (prev, "previous")
        elif nxt is not None and model.get_submodule(nxt).weight.shape[1] == bn.num_features:
            plans[name] = (nxt, "next")
    def apply(name):
        """Fold one BatchNorm; returns what undoes it (the BatchNorm and its layer's weight and bias before)."""
        layer, how = plans[name]
        m, bn = model.get_submodule(layer), model.get_submodule(name)
        bn_factors(bn)  # refuses a BatchNorm without running statistics
        before = (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
        (fold_into_previous(m, bn) if how == "previous" else fold_into_next(bn, m))
        _set(model, name, _remainder(bn))
        return bn, before

    def undo(name, state):
        bn, (w, b) = state
        m = model.get_submodule(plans[name][0])
        m.weight.copy_(w)
        if b is None:
            m.bias = None
        else:
            m.bias.copy_(b)
        _set(model, name, bn)

    done = {name: apply(name) for name in plans}
    if not _close(model(example), ref):
        for name in reversed(list(done)):
            undo(name, done[name])
        for name in list(plans):
            state = apply(name)
            if not _close(model(example), ref):
                undo(name, state)
                del plans[name]
    kept = sorted(set(bns) - set(plans))
    return info, kept


def _string_padding(model: nn.Module) -> None:
    """nn.Conv2d(padding='same' / 'valid') as the numeric zero padding it computes (odd effective kernels)."""
    for m in model.modules():
        if type(m) is nn.Conv2d and isinstance(m.padding, str):
            if m.padding == "valid":
                m.padding = (0, 0)
            elif all((d * (k - 1)) % 2 == 0 for k, d in zip(m.kernel_size, m.dilation)):
                m.padding = tuple(d * (k - 1) // 2 for k, d in zip(m.kernel_size, m.dilation))
                m._reversed_padding_repeated_twice = [p for p in reversed(m.padding) for _ in range(2)]


def _call_modules(model: nn.Module) -> None:
    """Two switches of timm's modules, set to their equivalent other path: where a module can either call its
    linear layer or read the layer's weight into ``F.linear`` (EVA attention with separate q/v biases), the call
    (the bias is added after), so the layer's quantizers apply; and ``fused_attn`` off, so attention is the
    explicit ``q @ kᵀ``, softmax, ``@ v`` in vitq and in the exported graph alike (torch's ONNX tracer fails on
    some of timm's fused calls, e.g. EVA's)."""
    for m in model.modules():
        if getattr(m, "qkv_bias_separate", None) is False and isinstance(getattr(m, "qkv", None), nn.Linear):
            m.qkv_bias_separate = True
        if getattr(m, "fused_attn", None) is True:
            m.fused_attn = False


def _reparameterize(model: nn.Module) -> list[str]:
    """timm's own inference fusion where the model has it (RepVGG, MobileOne, FastViT, ... branches with their
    BatchNorms merged into one convolution: an exact float rewrite); returns the classes it fused."""
    fusable = sorted({type(m).__name__ for m in model.modules() if callable(getattr(m, "reparameterize", None))
                      or callable(getattr(m, "fuse", None))})
    if fusable and type(model).__module__.startswith("timm."):
        from timm.models import reparameterize_model

        reparameterize_model(model, inplace=True)
    return fusable if type(model).__module__.startswith("timm.") else []


def _keep_conv_attributes(model: nn.Module, before: dict[str, nn.Module]) -> None:
    """Attributes of a swapped layer that model code reads (e.g. ``kernel_size``), kept on its quantized one."""
    for name, m in model.named_modules():
        old = before.get(name)
        if isinstance(m, QWeighted) and old is not None:
            for attr in ("kernel_size", "in_channels", "out_channels", "padding_mode"):
                if hasattr(old, attr) and not hasattr(m, attr):
                    setattr(m, attr, getattr(old, attr))


def _refuse_leftovers(model: nn.Module, param_ops: list[tuple[str, str]]) -> list[str]:
    """Refuse what computes with weights but was not quantized; return the classes kept in float."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.Embedding)):
            raise VitqError(f"unsupported module {name} ({type(m).__name__}): vitq's generic path quantizes "
                            "nn.Linear and nn.Conv2d (and timm's Conv2dSame) only")
    for owner, op in param_ops:
        m = model.get_submodule(owner)
        if not isinstance(m, QWeighted):
            raise VitqError(f"unsupported module {owner or 'the model'} ({type(m).__name__}) computes {op} with "
                            "its own weights; vitq's generic path quantizes nn.Linear and nn.Conv2d only")
    return sorted({type(m).__name__ for m in model.modules()
                   if list(m.parameters(recurse=False)) and not isinstance(m, QWeighted)})


_TORCH_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_TORCH_COMPUTING = (nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                    nn.modules.rnn.RNNBase, _BN)


def _plain_torch(model: nn.Module) -> bool:
    """Whether ``model`` is torch's containers around torch's own layers (no code of its own, no attention, no
    BatchNorm), e.g. ``nn.Sequential(nn.Linear(...))``: its layers can be swapped without tracing it."""
    return type(model) in _TORCH_CONTAINERS and all(
        type(m).__module__.startswith("torch.nn.modules") and not isinstance(m, _TORCH_COMPUTING)
        for m in model.modules())


def convert(model: nn.Module, scheme) -> None:
    if scheme.fully_quantized:
        raise VitqError(f"{type(model).__name__} is prepared by vitq's generic path (family {NAME!r}), which "
                        f"supports the matmul scheme only: fq quantizes the residual stream and every LayerNorm "
                        "input, which needs the block structure a dedicated family declares; use --scheme matmul")
    example = example_input(input_size(model))
    _string_padding(model)
    _call_modules(model)
    fused = _reparameterize(model)
    if _plain_torch(model):  # nothing to trace: no BatchNorm, no forward but torch's own layers
        swap_weighted(model, scheme)
        _refuse_leftovers(model, [])
        model.vitq_notes = ["torch layers only: every Linear/Conv2d quantized (nothing traced)"]
        return
    try:
        info, kept_bn = fold_where_possible(model, example)
    except VitqError:
        raise
    except Exception as e:  # the model's own code failed on the traced input
        raise VitqError(f"{type(model).__name__}: vitq's generic path runs the model once on a {list(example.shape)} "
                        f"input (its size from img_size or timm's pretrained_cfg) to find what to quantize, and the "
                        f"model failed there: {type(e).__name__}: {e}") from e
    before = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    swap_weighted(model, scheme, image_layers=set(info["reads_image"]))
    _keep_conv_attributes(model, before)
    rec = record_calls(model, example)
    sites = attach_sites(model, rec, scheme)
    kept = _refuse_leftovers(model, rec.param_ops)
    notes = [f"reparameterized by timm (branches fused): {', '.join(fused)}"] if fused else []
    bn_note = (f"{len(kept_bn)} BatchNorm(s) kept in float (not next to a conv/linear layer, or that layer's output "
               f"is also read elsewhere): "
               f"{', '.join(kept_bn[:6])}{' ...' if len(kept_bn) > 6 else ''}")
    notes += [bn_note] if kept_bn else []
    notes += [f"kept in float (norms, scales, embeddings): {', '.join(kept)}"] if kept else []
    notes.append(f"attention matmuls quantized in {len(sites)} module(s)" if sites else
                 "no attention matmul found (only weighted layers are quantized)")
    model.vitq_notes = notes
    if kept_bn:
        warnings.warn(f"vitq generic path, {type(model).__name__}: {bn_note}", stacklevel=2)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def trunk(model: nn.Module) -> TrunkParts:
    """The model's own block lists as units, checked on a traced input (cached on the model). A model without
    one (no container whose children run one after another on their input alone, e.g. blocks called with
    extra arguments) is one unit, the whole model, with a warning."""
    cached = model.__dict__.get("_vitq_units")
    if cached is None:
        example = example_input(input_size(model))
        units = find_units(model, example)
        if len(units) >= 2:
            stem, tail = stem_and_tail(model, units)
            try:
                check_trunk(model, units, stem, tail, example)
            except VitqError as e:
                warnings.warn(str(e), stacklevel=2)
                units = []
        if len(units) < 2:
            warnings.warn(f"{type(model).__name__} (family {NAME!r}): no block list whose blocks run one after "
                          "another on their input alone; block-wise methods see the whole model as one unit",
                          stacklevel=2)
        cached = [n for n, _ in units]
        model.__dict__["_vitq_units"] = cached
    if not cached:
        return TrunkParts(_identity, [("", model)], _identity, is_block=lambda m: True)
    units = [(n, model.get_submodule(n)) for n in cached]
    stem, tail = stem_and_tail(model, units)
    return TrunkParts(stem, units, tail, is_block=lambda m: bool(weight_quantizer_paths(m)))


def search_paths(unit: nn.Module, groups: set[str]) -> list[str] | None:
    """A unit with intercepted attention: ``attn`` = the weights inside its attention modules (those holding
    ``vitq_ops``), ``mlp`` = its other weights. Units without attention are left to the CNN rule."""
    owners = [n for n, m in unit.named_modules() if isinstance(getattr(m, "vitq_ops", None), nn.ModuleList)]
    if not owners:
        return None
    paths = weight_quantizer_paths(unit)
    in_attn = [p for p in paths if any(p.startswith(f"{o}.") for o in owners if o)]
    chosen = (in_attn if "attn" in groups else []) + ([p for p in paths if p not in in_attn] if "mlp" in groups
                                                       else [])
    return [p for p in paths if p in chosen]


class _AllModules(tuple):
    """``float_ok`` of the generic path: every module class. The generic conversion does its own, stricter
    check (every weighted op of a traced forward is quantized or refused by name), so prepare's class-name
    check, written for the dedicated families' block and attention classes, is not applied."""

    def __contains__(self, item) -> bool:
        return True


register_family(Family(
    name=NAME,
    description="any other model (tried last): BatchNorm folded where it follows a conv/linear layer, every "
                "Linear/Conv2d quantized, attention matmuls quantized where the model calls them "
                "(scaled_dot_product_attention, q @ kᵀ, attn @ v); units from the model's own block lists",
    detect=lambda model: True, convert=convert, trunk=trunk, search_paths=search_paths, fallback=True,
    input_size=input_size, float_ok=_AllModules(),
    quantizes={
        "fq": "refused (the residual-stream and LayerNorm quantizers of fq need a dedicated family)",
        "matmul": "weights per output channel (int), every linear/conv input per tensor, both inputs of every "
                  "attention matmul (q, k, softmax output, v); norms, activations and BatchNorms that cannot be "
                  "folded in float",
    },
))

"""BatchNorm folding: every BatchNorm of a float model merged into the convolution or linear layer next to it.

Which layer a BatchNorm belongs to is read from one traced forward pass, not guessed from names: a
BatchNorm whose input is the output of a Conv2d/Linear (possibly a view of it, as LeViT's ``LinearNorm``
flattens) folds into that layer's weights per output channel; a BatchNorm whose output is the input of a
Linear (LeViT's ``NormLinear`` head) folds into that layer per input channel. The folded model is checked
against the original on the traced input, and a BatchNorm that cannot be folded is refused by name.

Per output channel c of y = W x + b followed by BN: g_c = γ_c / sqrt(var_c + eps),
W'_c = g_c W_c, b'_c = g_c (b_c - μ_c) + β_c. Before a linear layer: W' = W diag(g), b' = b + W (β - g μ).
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.errors import VitqError

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_WEIGHTED = (nn.Conv2d, nn.Linear)


def bn_factors(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, shift) with BN(z) = g z + shift per channel (eval mode, running statistics)."""
    if bn.running_mean is None or bn.running_var is None:
        raise VitqError(f"BatchNorm without running statistics ({type(bn).__name__}) cannot be folded")
    inv = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv)
    g = gamma * inv
    return g, beta - g * bn.running_mean.double()


@torch.no_grad()
def fold_into_previous(layer: nn.Module, bn: nn.Module) -> None:
    """y = BN(layer(x)) becomes y = layer'(x) (per output channel)."""
    g, shift = bn_factors(bn)
    w = layer.weight.double()
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(g)
    layer.weight.copy_((w * g.view(-1, *([1] * (w.dim() - 1)))).to(layer.weight.dtype))
    new_b = (g * b + shift).to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b)
    else:
        layer.bias.copy_(new_b)


@torch.no_grad()
def fold_into_next(bn: nn.Module, linear: nn.Linear) -> None:
    """y = linear(BN(x)) becomes y = linear'(x) (per input feature)."""
    g, shift = bn_factors(bn)
    w = linear.weight.double()
    b = linear.bias.double() if linear.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    new_b = (b + w @ shift).to(linear.weight.dtype)
    linear.weight.copy_((w * g.view(1, -1)).to(linear.weight.dtype))
    if linear.bias is None:
        linear.bias = nn.Parameter(new_b)
    else:
        linear.bias.copy_(new_b)


def _remainder(bn: nn.Module) -> nn.Module:
    """What is left of a BatchNorm after folding: timm's BatchNormAct2d keeps its dropout and activation."""
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    parts = [m for m in (drop, act) if m is not None and not isinstance(m, nn.Identity)]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.numel() == b.numel()


@torch.no_grad()
def trace_pairs(model: nn.Module, example: torch.Tensor) -> dict:
    """One forward pass recording, for every BatchNorm, the weighted layer that produced its input or consumes
    its output; and the weighted layers in execution order with the ones that read the image itself."""
    names = {m: n for n, m in model.named_modules()}
    outputs: list[tuple[str, torch.Tensor]] = []  # kept alive, so no address is reused during the pass
    bn_outputs: list[tuple[str, torch.Tensor]] = []
    info = {"before": {}, "after": {}, "order": [], "reads_image": []}
    hooks = []

    def weighted_pre(mod, args):
        x = args[0]
        name = names[mod]
        info["order"].append(name)
        if _same_storage(x, example):
            info["reads_image"].append(name)
        for bn_name, t in bn_outputs:
            if _same_storage(x, t) and isinstance(mod, nn.Linear):
                info["after"].setdefault(bn_name, name)

    def weighted_post(mod, args, out):
        if isinstance(out, torch.Tensor):
            outputs.append((names[mod], out))

    def bn_pre(mod, args):
        x = args[0]
        for name, t in reversed(outputs):
            if _same_storage(x, t):
                info["before"][names[mod]] = name
                break

    def bn_post(mod, args, out):
        bn_outputs.append((names[mod], out))

    for m in model.modules():
        if isinstance(m, _WEIGHTED):
            hooks += [m.register_forward_pre_hook(weighted_pre), m.register_forward_hook(weighted_post)]
        elif isinstance(m, _BN):
            hooks += [m.register_forward_pre_hook(bn_pre), m.register_forward_hook(bn_post)]
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
    return info


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


@torch.no_grad()
def fold_batchnorms(model: nn.Module, example: torch.Tensor, rtol: float = 1e-4) -> dict:
    """Fold every BatchNorm of ``model`` (eval mode, in place); returns the trace (see :func:`trace_pairs`)
    plus ``folded``: {BatchNorm name: layer name}. Raises VitqError naming a BatchNorm it cannot fold."""
    model.eval()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, _BN)}
    info = trace_pairs(model, example)
    if not bns:
        return {**info, "folded": {}}
    reference = model(example)
    folded = {}
    for name, bn in bns.items():
        prev, nxt = info["before"].get(name), info["after"].get(name)
        if prev is not None and model.get_submodule(prev).weight.shape[0] == bn.num_features:
            fold_into_previous(model.get_submodule(prev), bn)
            folded[name] = prev
        elif nxt is not None and model.get_submodule(nxt).weight.shape[1] == bn.num_features:
            fold_into_next(bn, model.get_submodule(nxt))
            folded[name] = nxt
        else:
            raise VitqError(f"BatchNorm {name} ({type(bn).__name__}) does not directly follow a convolution or "
                            "linear layer (nor precede a linear layer), so it cannot be folded")
        _set(model, name, _remainder(bn))
    out = model(example)
    err = float((out - reference).abs().max())
    scale = float(reference.abs().max()) or 1.0
    if not err <= rtol * scale + 1e-6:
        raise VitqError(f"folding the BatchNorms of {type(model).__name__} changed its output (max error "
                        f"{err:.3g} of {scale:.3g}); a BatchNorm input is also used elsewhere")
    return {**info, "folded": folded}

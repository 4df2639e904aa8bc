"""Scale reparameterization of post-LayerNorm activations (RepQ-ViT's idea), an exact rewrite of the model.

The inputs of ``qkv`` and ``fc1`` come straight from a LayerNorm and have a few channels with much larger
ranges than the rest. Calibrated per channel (asymmetric: scale ``s_c``, zero point ``z_c`` from the channel's
observed [min, max], widened to include 0), they would need a per-channel activation quantizer. Instead, with
``s̃ = mean(s)``, ``z̃ = mean(z)``, ``r1 = s / s̃`` and ``r2 = z - z̃``, the LayerNorm's affine parameters become

    γ' = γ / r1,   β' = (β + s·r2) / r1

so that its output is ``X' = (X + s·r2) / r1``, and the next linear layer's weight and bias become

    W' = W · r1 (per input column),   b' = b - W (s·r2)

so that ``W' X' + b' = W X + b``: the float model computes the same function, and every channel of ``X'``
has (up to the rounding of zero points) the same quantization grid ``X'/s̃ + z̃ = X/s_c + z_c``, which one
per-tensor quantizer can represent. The per-tensor quantizer is calibrated afterwards by any method.

Works for the blocks of timm ViT/DeiT and Swin in both regimes (in ``fq`` the block norms are plain
LayerNorms behind the residual PTF quantizers, which stay as they are). A linear layer without a bias gets
the scale part only (``r2 = 0``). The rewrite changes parameters in place, so it is part of the saved state.
(Swin: exact when the window partition needs no padding, i.e. feature maps divisible by the window.)
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.calib import CalibData, forward_all
from vitq.errors import VitqError
from vitq.models.timm_vit import QBlock, QSwinBlock
from vitq.quant.modules import QLinear

LEVELS = 255  # grid used to express the per-channel zero points (the result does not depend on it)


def targets(model: nn.Module) -> dict[str, tuple[nn.LayerNorm, QLinear]]:
    """{name of the linear: (LayerNorm before it, the linear)} for every block's qkv and fc1."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, (QBlock, QSwinBlock)):
            continue
        for norm_name, lin_name, lin in (("norm1", "attn.qkv", getattr(m.attn, "qkv", None)),
                                         ("norm2", "mlp.fc1", getattr(m.mlp, "fc1", None))):
            norm = getattr(m, norm_name)
            if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and isinstance(lin, QLinear):
                out[f"{name}.{lin_name}"] = (norm, lin)
    return out


@torch.no_grad()
def channel_ranges(model: nn.Module, calib: CalibData, names) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel [min, max] of the inputs of the named linear layers over all calibration images."""
    mods = dict(model.named_modules())
    ranges: dict[str, list] = {}
    handles = []

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            lo, hi = x.min(0).values, x.max(0).values
            if name in ranges:
                lo, hi = torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)
            ranges[name] = [lo, hi]
        return fn

    for n in names:
        handles.append(mods[n].register_forward_pre_hook(hook(n)))
    try:
        forward_all(model, calib, desc="reparam: per-channel ranges")
    finally:
        for h in handles:
            h.remove()
    return {n: (v[0], v[1]) for n, v in ranges.items()}


@torch.no_grad()
def fold(norm: nn.LayerNorm, linear: QLinear, lo: torch.Tensor, hi: torch.Tensor) -> dict:
    """Fold the per-channel grid of [lo, hi] into ``norm`` and ``linear`` (in place, exact in real arithmetic;
    computed in float64). Returns summary statistics of the factors."""
    dev, dt = linear.weight.device, linear.weight.dtype
    # every channel's range includes 0, as every uniform quantizer's range does: the zero points then lie in
    # [0, LEVELS]. Without it a near-constant channel (γ ≈ 0: the real DeiT-Tiny has some) gets a tiny width,
    # a zero point of ~1e5 that dominates the mean z̃, and one per-tensor grid that fits no channel.
    lo = lo.to(dev, torch.float64).clamp(max=0.0)
    hi = hi.to(dev, torch.float64).clamp(min=0.0)
    width = (hi - lo).clamp_min(0.0)
    width = torch.maximum(width, 1e-6 * width.max().clamp_min(1e-12))  # a constant channel keeps a finite scale
    s = width / LEVELS
    z = -lo / s
    r1 = s / s.mean()
    r2 = (z - z.mean()) if linear.bias is not None else torch.zeros_like(z)
    shift = s * r2
    gamma, beta = norm.weight.double(), norm.bias.double() if norm.bias is not None else torch.zeros_like(s)
    w = linear.weight.double()
    norm.weight.copy_((gamma / r1).to(dt))
    if norm.bias is None:
        if bool((shift != 0).any()):
            raise VitqError("reparameterization needs the LayerNorm to have a bias")
    else:
        norm.bias.copy_(((beta + shift) / r1).to(dt))
    if linear.bias is not None:
        linear.bias.copy_((linear.bias.double() - w @ shift).to(dt))
    linear.weight.copy_((w * r1[None, :]).to(dt))
    return {"r1_min": float(r1.min()), "r1_max": float(r1.max()), "zero_point_folded": linear.bias is not None}


def reparameterize(model: nn.Module, calib: CalibData) -> dict:
    """Observe the per-channel ranges of every qkv/fc1 input (with the model as it is) and fold them into the
    LayerNorms and linear layers. Returns {"reparameterized": [names], "factors": {name: stats}}."""
    found = targets(model)
    if not found:
        raise VitqError(f"{type(model).__name__}: no LayerNorm → qkv/fc1 pairs to reparameterize "
                        "(expected a prepared timm ViT/DeiT or Swin)")
    ranges = channel_ranges(model, calib, list(found))
    stats = {n: fold(norm, lin, *ranges[n]) for n, (norm, lin) in found.items()}
    r1_max = max(v["r1_max"] for v in stats.values())
    return {"reparameterized": sorted(found), "reparam_layers": len(found), "reparam_r1_max": r1_max,
            "reparam_factors": stats}

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

Options (issue 26): ``channel_range="percentile"`` takes each channel's range as RepQ-ViT does, by a search over
upper/lower percentiles (:data:`PERCENTILES`, plus the plain min/max) for the least squared error of that channel
quantized alone at the layer's activation bits (a second float pass); ``power < 1`` folds only ``r1^power``
(a partial fold: the wide channels' weight columns grow less, the per-tensor quantizer sees some of the spread).

Works for every transformer block (``QTransformerBlock``: timm ViT/DeiT, Swin, ...) in both regimes (in
``fq`` the block norms are plain LayerNorms behind the residual PTF quantizers, which stay as they are). A linear
layer without a bias gets the scale part only (``r2 = 0``). The rewrite changes parameters in place, so it is
part of the saved state. (Swin: exact when the window partition needs no padding, i.e. feature maps divisible by
the window.)
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.calib import CalibData, forward_all
from vitq.errors import VitqError
from vitq.quant.modules import QLinear, QTransformerBlock
from vitq.quant.observers import QUANTILES

LEVELS = 255  # grid used to express the per-channel zero points (the result does not depend on it)
PERCENTILES = (*QUANTILES, 1.0)  # candidate upper percentiles (lower: 1 - p): RepQ-ViT's three and min/max
CHANNEL_RANGES = ("minmax", "percentile")


def targets(model: nn.Module) -> dict[str, tuple[nn.LayerNorm, QLinear]]:
    """{name of the linear: (LayerNorm before it, the linear)} for every block's qkv and fc1."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, QTransformerBlock):
            continue
        for norm_name, lin_name, lin in (("norm1", "attn.qkv", getattr(m.attn, "qkv", None)),
                                         ("norm2", "mlp.fc1", getattr(m.mlp, "fc1", None))):
            norm = getattr(m, norm_name)
            if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and isinstance(lin, QLinear):
                out[f"{name}.{lin_name}"] = (norm, lin)
    return out


def _hooked_pass(model: nn.Module, calib: CalibData, names, fn, desc: str) -> None:
    """One float pass with ``fn(name, rows [N, C])`` called on every input of the named layers."""
    mods = dict(model.named_modules())

    def hook(name):
        def run(_mod, args):
            x = args[0].detach().float()
            fn(name, x.reshape(-1, x.shape[-1]))
        return run

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        forward_all(model, calib, desc=desc)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def channel_ranges(model: nn.Module, calib: CalibData, names, tail: float = 0.0) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per-channel [min, max] of the inputs of the named linear layers over all calibration images; with
    ``tail > 0`` the ``tail`` fraction (+2) of the smallest and of the largest values of each channel instead
    (sorted, [k, C] each: row 0 is the min / max) and the number of rows seen, as ``(low, high, rows)``."""
    ext: dict[str, list] = {}
    first_images = min(calib.batch_size, len(calib))

    def fn(name, x):
        if name not in ext:  # rows per image from the first batch give the number of rows of all images
            keep = int(tail * x.shape[0] / first_images * len(calib)) + 2 if tail > 0 else 1
            ext[name] = [None, None, 0, keep]
        e = ext[name]
        k = min(e[3], x.shape[0])
        lo, hi = -(-x).topk(k, dim=0).values, x.topk(k, dim=0).values
        if e[0] is not None:
            k = min(e[3], e[0].shape[0] + k)
            lo = -(-torch.cat([e[0], lo])).topk(k, dim=0).values
            hi = torch.cat([e[1], hi]).topk(k, dim=0).values
        ext[name] = [lo, hi, e[2] + x.shape[0], e[3]]

    _hooked_pass(model, calib, names, fn, "reparam: per-channel ranges")
    if tail <= 0:
        return {n: (v[0][0], v[1][0]) for n, v in ext.items()}
    return {n: (v[0], v[1], v[2]) for n, v in ext.items()}


def _quantile_from_top(top: torch.Tensor, rows: int, pct: float) -> torch.Tensor:
    """The ``pct`` quantile per channel (linear interpolation, as torch.quantile) from the sorted largest values
    ``top`` [k, C] (row 0 the max) of ``rows`` values."""
    pos = (1.0 - pct) * (rows - 1)  # position counted from the largest value
    i = min(int(pos), top.shape[0] - 1)
    j = min(i + 1, top.shape[0] - 1)
    frac = pos - int(pos)
    return top[i] + (top[j] - top[i]) * frac


def _grid_error(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int) -> torch.Tensor:
    """Per-channel squared error of asymmetric uniform quantization of rows ``x`` [N, C] on [lo, hi] (0 in)."""
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    s = ((hi - lo) / levels).clamp_min(1e-12)
    z = torch.round(-lo / s)
    xq = (torch.clamp(torch.round(x / s) + z, 0, levels) - z) * s
    return (xq - x).double().pow(2).sum(0)


@torch.no_grad()
def searched_ranges(model: nn.Module, calib: CalibData, names, bits: dict[str, int]) -> dict[str, tuple]:
    """RepQ-ViT's per-channel range: for each channel the [1 - p, p] percentile range (p in PERCENTILES) with
    the least squared error of that channel quantized on its own at ``bits[name]``. Two float passes (the
    extremes, then the errors of every candidate). Returns {name: (lo, hi, chosen p per channel)}."""
    ext = channel_ranges(model, calib, names, tail=1.0 - min(PERCENTILES))
    cands = {}
    for n, (low, high, rows) in ext.items():
        his = [_quantile_from_top(high, rows, p) for p in PERCENTILES]
        los = [-_quantile_from_top(-low, rows, p) for p in PERCENTILES]
        cands[n] = (torch.stack(los), torch.stack(his))
    errs = {n: torch.zeros(len(PERCENTILES), c[0].shape[1], dtype=torch.float64) for n, c in cands.items()}

    def fn(name, x):
        los, his = cands[name]
        levels = 2 ** bits[name] - 1
        for i in range(len(PERCENTILES)):
            errs[name][i] += _grid_error(x, los[i], his[i], levels).cpu()

    _hooked_pass(model, calib, names, fn, "reparam: percentile search")
    out = {}
    for n, (los, his) in cands.items():
        best = errs[n].argmin(0).to(los.device)
        idx = torch.arange(los.shape[1], device=los.device)
        out[n] = (los[best, idx], his[best, idx], torch.tensor(PERCENTILES, dtype=torch.float64)[best.cpu()])
    return out


@torch.no_grad()
def fold(norm: nn.LayerNorm, linear: QLinear, lo: torch.Tensor, hi: torch.Tensor, power: float = 1.0) -> dict:
    """Fold the per-channel grid of [lo, hi] into ``norm`` and ``linear`` (in place, exact in real arithmetic;
    computed in float64); ``power`` < 1 folds only ``r1^power`` of the scales. Returns summary statistics of
    the factors."""
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
    r1 = (s / s.mean()).pow(power)
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


def reparameterize(model: nn.Module, calib: CalibData, channel_range: str = "minmax", power: float = 1.0) -> dict:
    """Observe the per-channel ranges of every qkv/fc1 input (with the model as it is; ``channel_range``:
    ``minmax`` or ``percentile``, see the module) and fold them (``r1^power``) into the LayerNorms and linear
    layers. Returns {"reparameterized": [names], "factors": {name: stats}, ...}."""
    if channel_range not in CHANNEL_RANGES:
        raise VitqError(f"reparameterization channel range {channel_range!r} (expected one of {CHANNEL_RANGES})")
    if not 0.0 <= power <= 1.0:
        raise VitqError(f"reparameterization fold power {power!r} (expected 0 <= power <= 1; 1 = full fold)")
    found = targets(model)
    if not found:
        raise VitqError(f"{type(model).__name__}: no LayerNorm → qkv/fc1 pairs to reparameterize "
                        "(expected a prepared model with transformer blocks, e.g. timm ViT/DeiT or Swin)")
    info: dict = {}
    if channel_range == "percentile":
        found_ranges = searched_ranges(model, calib, list(found), {n: lin.input_quant.bits
                                                                   for n, (_, lin) in found.items()})
        ranges = {n: v[:2] for n, v in found_ranges.items()}
        chosen = torch.cat([v[2] for v in found_ranges.values()])
        info["reparam_percentiles"] = {str(p): int((chosen == p).sum()) for p in PERCENTILES}
    else:
        ranges = channel_ranges(model, calib, list(found))
    stats = {n: fold(norm, lin, *ranges[n], power=power) for n, (norm, lin) in found.items()}
    r1_max = max(v["r1_max"] for v in stats.values())
    return {"reparameterized": sorted(found), "reparam_layers": len(found), "reparam_r1_max": r1_max,
            "reparam_factors": stats, "reparam_channel_range": channel_range, "reparam_power": power, **info}

"""Cross-layer equalization (CLE; Nagel et al. 2019, "Data-Free Quantization through Weight Equalization and
Bias Correction", §4.1) in front of another calibration method: ``--method cle`` (option ``base``, default
``minmax``) equalizes the float weights of the prepared model, then calibrates it with ``base``.

For two convolutions a → act → b, scaling output channel c of a (its weights and bias) by ``1/s_c`` and input
channel c of b by ``s_c`` leaves the model unchanged when ``act(y/s) = act(y)/s`` for s > 0. CLE chooses
``s_c = sqrt(r_a,c / r_b,c)`` (r_a,c: the largest |weight| of a's output channel c, r_b,c: of b's input channel
c), so both become ``sqrt(r_a,c · r_b,c)``: a channel that a folded BatchNorm made tiny or huge no longer
dominates or vanishes in b's per-output-channel weight range, and the per-tensor activation between them is
better balanced. Pairs are equalized in turn, ``sweeps`` times over every unit (a depthwise convolution is the
receiver of one pair and the sender of the next).

Which pairs, found from the model, not from names: two convolutions that run one after the other inside one
trunk unit (an inverted-residual or residual block; never across units, where a skip connection may also read
the tensor), with matching channels, where b's input is an elementwise function of a's output that is checked
on calibration images to be one of

* identity or ReLU: positively homogeneous, any s > 0 is exact;
* ReLU6 (MobileNet/EfficientNet-Lite): ``min(max(y, 0), 6)`` is homogeneous only below the clip. A channel that
  reaches 6 on the calibration images keeps s = 1; for the others s is kept ≥ max(y_c)/6 so that the scaled
  channel still stays below the clip (exact on the calibration images; an image whose value exceeds the
  calibration maximum by more than that margin is clipped differently; the record gives the float deviation on
  the calibration images, checked against ``tolerance``);
* anything else (Hardswish, SiLU/Swish, GELU, a squeeze-excite gate between them): not positively homogeneous,
  the pair is left alone and listed in the record with the reason.

Grouped and depthwise receivers are handled per input channel (the weight of group g's input column).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.models.trunk import Trunk
from vitq.options import Options, opt
from vitq.quant.base import passthrough
from vitq.quant.modules import QConv2d
from vitq.registry import get_method, register_method

RELU6_CLIP = 6.0


@dataclass(frozen=True)
class CLEOptions(Options):
    base: str = opt("minmax", "the calibration method run after equalization (its default options)", metavar="M")
    sweeps: int = opt(3, "passes over the pairs of every unit", minimum=1, metavar="N")
    tolerance: float = opt(1e-3, "largest relative change of the float logits on the calibration images that "
                           "equalization may cause (else it is refused)", above=0.0, metavar="T")


def _act_of(y: torch.Tensor, z: torch.Tensor) -> str | None:
    """Which positively homogeneous function maps a's output ``y`` to b's input ``z`` (None: not one of them).
    ReLU6 is tried first: when no value reaches 6 it is the cautious reading. A pooled input (squeeze-excite)
    has another shape: not elementwise."""
    if y.shape != z.shape:
        return None
    tol = 1e-4 * float(y.abs().max()) + 1e-6
    for name, fn in (("relu6", lambda t: t.clamp(0.0, RELU6_CLIP)), ("relu", torch.relu), ("identity", lambda t: t)):
        if float((fn(y) - z).abs().max()) <= tol:
            return name
    return None


@torch.no_grad()
def _unit_convs(unit: nn.Module, run, x: torch.Tensor):
    """The convolutions of ``unit`` in the order they run on ``x``, with their output and their input."""
    order, outs, ins = [], {}, {}

    def pre(mod, args):
        if id(mod) not in ins:
            order.append(mod)
            ins[id(mod)] = args[0].clone()

    def post(mod, _args, out):  # a copy: timm's activations work in place on the conv output
        outs.setdefault(id(mod), out.clone())

    convs = [m for m in unit.modules() if isinstance(m, QConv2d)]
    hs = [m.register_forward_pre_hook(pre) for m in convs] + [m.register_forward_hook(post) for m in convs]
    try:
        run(x)
    finally:
        for h in hs:
            h.remove()
    return order, outs, ins


def _column_view(b: QConv2d, channels: int) -> list[tuple[slice, int]]:
    """For each input channel c of ``b``: (its output rows, its column in the weight)."""
    per = b.weight.shape[1]
    rows = b.weight.shape[0] // b.groups
    return [(slice((c // per) * rows, (c // per + 1) * rows), c % per) for c in range(channels)]


def _in_ranges(b: QConv2d, cols) -> torch.Tensor:
    w = b.weight.detach().abs()
    return torch.stack([w[r, k].max() for r, k in cols])


@torch.no_grad()
def _equalize_pair(a: QConv2d, b: QConv2d, act: str, ymax: torch.Tensor) -> torch.Tensor:
    """Rescale channel c of a by 1/s_c and of b's input by s_c; returns s (and keeps ReLU6 exact)."""
    c = a.weight.shape[0]
    cols = _column_view(b, c)
    ra = a.weight.detach().abs().reshape(c, -1).amax(1).double()
    rb = _in_ranges(b, cols).double()
    s = torch.sqrt(ra / rb.clamp_min(1e-12))
    s = torch.where((ra > 0) & (rb > 0), s, torch.ones_like(s))
    if act == "relu6":
        s = torch.where(ymax >= RELU6_CLIP, torch.ones_like(s), torch.maximum(s, ymax / RELU6_CLIP))
    sf = s.to(a.weight.dtype)
    a.weight.div_(sf.view(-1, *([1] * (a.weight.dim() - 1))))
    if a.bias is not None:
        a.bias.div_(sf)
    for ch, (r, k) in enumerate(cols):
        b.weight[r, k] *= sf[ch]
    return s


@torch.no_grad()
def equalize(model: nn.Module, calib: CalibData, sweeps: int = 3, tolerance: float = 1e-3) -> dict:
    """Cross-layer equalization of the prepared ``model``'s float weights in place; returns the record."""
    trunk = Trunk(model)
    batches = list(calib.batches())
    with passthrough(model):
        before = torch.cat([model(x) for x in batches])
        pairs, skipped = [], []
        h = trunk.stem(batches[0][:8])  # a few images show which function joins two convolutions
        for uname, unit in trunk.units:
            order, outs, ins = _unit_convs(unit, unit, h)
            for a, b in zip(order, order[1:], strict=False):
                if b.weight.shape[1] * b.groups != a.weight.shape[0] or a.groups != 1 and a.groups != a.weight.shape[0]:
                    continue
                act = _act_of(outs[id(a)], ins[id(b)])
                names = {id(m): n for n, m in unit.named_modules()}
                label = f"{uname}.{names[id(a)]} -> {uname}.{names[id(b)]}"
                if act is None:
                    skipped.append({"pair": label, "why": "b's input is not identity/ReLU/ReLU6 of a's output "
                                    "(e.g. Hardswish, SiLU, a squeeze-excite gate): not positively homogeneous"})
                    continue
                pairs.append((label, a, b, act))
            h = unit(h)
        ymax = _output_max(model, [a for _, a, _, act in pairs if act == "relu6"], batches)
        for _ in range(sweeps):
            for _label, a, b, act in pairs:
                s = _equalize_pair(a, b, act, ymax.get(id(a)))
                if id(a) in ymax:
                    ymax[id(a)] = ymax[id(a)] / s
        after = torch.cat([model(x) for x in batches])
    change = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
    if not change <= tolerance:
        raise VitqError(f"cross-layer equalization changed the float logits by {change:.3g} (relative) on the "
                        f"calibration images, more than tolerance={tolerance}; use another --method")
    return {"pairs": [{"pair": lb, "activation": act} for lb, _, _, act in pairs], "not_equalized": skipped,
            "sweeps": sweeps, "float_logit_change": change}


@torch.no_grad()
def _output_max(model: nn.Module, layers: list[nn.Module], batches) -> dict[int, torch.Tensor]:
    """Per output channel, the largest value of each layer's output over the calibration images (double)."""
    acc: dict[int, torch.Tensor] = {}

    def hook(mod, _args, out):
        m = out.detach().double().transpose(0, 1).reshape(out.shape[1], -1).amax(1)
        acc[id(mod)] = m if id(mod) not in acc else torch.maximum(acc[id(mod)], m)

    hs = [m.register_forward_hook(hook) for m in layers]
    try:
        for x in batches:
            model(x)
    finally:
        for h in hs:
            h.remove()
    return acc


@register_method("cle", "cross-layer equalization (Nagel et al. 2019) of conv pairs through identity/ReLU/ReLU6 "
                 "inside each block, then the --cle-base method calibrates", config=CLEOptions)
def cle(model: nn.Module, calib: CalibData, cfg: CLEOptions) -> dict:
    if cfg.base == "cle":
        raise VitqError("cle: base='cle' would equalize forever; choose a calibration method such as minmax")
    base = get_method(cfg.base)
    info = equalize(model, calib, cfg.sweeps, cfg.tolerance)
    return {"equalization": info, "base": cfg.base, **(base.call(model, calib) or {})}

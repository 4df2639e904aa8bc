"""What block reconstruction learns and how: AdaRound's rounding variables of a weight (:class:`Rounding`,
applied through :class:`SoftWeights`), LSQ step sizes of uniform activation quantizers (:class:`LsqQuantizer`),
QDrop's elementwise bypass of activation quantizers (:class:`Dropper`) and the reconstruction loss."""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from vitq.quant.base import Quantizer
from vitq.quant.modules import QWeighted
from vitq.quant.uniform import UniformQuantizer

ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch (AdaRound)
# attribute (not saved) reconstruction leaves on each layer whose rounding it fixed: the continuous weights it
# rounded (when they were not already on the grid), which Evol-Q's ``wscale_pre`` rounds again with a new scale
UNROUNDED = "unrounded_weight"


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


class Rounding:
    """The AdaRound variables of one quantized layer (its weight quantizer's scale and zero point fixed).
    ``start``: the continuous weight to round (default the layer's weight; GPTQ's compensated weights before
    their rounding, :data:`vitq.refine.gptq.CONTINUOUS`, give AdaRound GPTQ's error feedback as its starting point)."""

    def __init__(self, module: QWeighted, start: torch.Tensor | None = None):
        self.module = module
        q = module.weight_quant
        w = (module.weight if start is None else start).detach()
        self.scale = q._view(q.scale, w).detach()
        self.zero = q._view(q.zero_point, w).detach()
        self.qmin, self.qmax = q.qmin, q.qmax
        x = w / self.scale
        self.floor = torch.floor(x)
        self.continuous = w.clone()  # (w may be the live weight, which the hard rounding overwrites)
        # a weight already on its grid (GPTQ, an earlier recon) can move one level in one direction only
        self.on_grid = float(((x - torch.round(x)).abs() < 1e-3).float().mean())
        rest = (x - self.floor).clamp(1e-4, 1.0 - 1e-4)
        self.v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)).requires_grad_(True)

    def soft(self) -> torch.Tensor:
        q = torch.clamp(self.floor + self.zero + rectified_sigmoid(self.v), self.qmin, self.qmax)
        return (q - self.zero) * self.scale

    @torch.no_grad()
    def hard(self) -> torch.Tensor:
        q = torch.clamp(self.floor + self.zero + (self.v >= 0).to(self.floor), self.qmin, self.qmax)
        return (q - self.zero) * self.scale

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1.0 - (2.0 * rectified_sigmoid(self.v) - 1.0).abs().pow(beta)).sum()


def keep_mask(shape, p: float, gen: torch.Generator | None) -> torch.Tensor:
    """A CPU bool tensor of ``shape``, each element True with probability ``p`` rounded to a multiple of 1/256,
    from ``gen``. Seven random bytes come from each int64 draw (``random_()`` leaves its top bit 0): three
    times faster than ``torch.rand(shape) < p``, which was a tenth of a reconstruction step's time."""
    cut = round(p * 256)
    if cut <= 0 or cut >= 256:
        return torch.full(tuple(shape), cut > 0, dtype=torch.bool)
    n = math.prod(shape)
    words = torch.empty(-(-n // 7), dtype=torch.int64).random_(generator=gen).view(torch.uint8).view(-1, 8)
    octets = words[:, :7] if sys.byteorder == "little" else words[:, 1:]
    return (octets.reshape(-1)[:n] < cut).view(shape)


class Dropper:
    """QDrop: forward hooks that let each activation value pass unquantized with probability ``p``."""

    def __init__(self, acts: list[tuple[str, Quantizer]], p: float):
        self.p, self.gen, self.active = p, None, False
        self.handles = [q.register_forward_hook(self._hook) for _, q in acts] if p > 0 else []
        # (quantizers swapped for an LsqQuantizer call drop() themselves; their hooks never run meanwhile)

    def _hook(self, module, inputs, output):
        return self.drop(inputs[0], output)

    def drop(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not self.active or self.p <= 0:
            return out
        keep_float = keep_mask(x.shape, self.p, self.gen).to(x.device)
        return torch.where(keep_float, x, out)

    def mix(self, x: torch.Tensor, x_float: torch.Tensor) -> torch.Tensor:
        """QDrop's input mixing: each value of ``x`` replaced by ``x_float``'s with probability ``p``."""
        return torch.where(keep_mask(x.shape, self.p, self.gen).to(x.device), x_float, x)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _LsqFakeQuant(torch.autograd.Function):
    """Uniform fake quantization with the LSQ gradient in one node: the same forward values as
    ``UniformQuantizer.fake_quant``; backward ``dx = g`` inside the range (straight-through), 0 outside;
    ``ds = g · (round(x/s) − x/s)`` inside, ``g · (q − z)`` outside (clipped), summed to the scale's shape.
    Several times fewer tensor passes than autograd through the module, which is most of a step's time."""

    @staticmethod
    def forward(ctx, x, s, z, qmin: int, qmax: int, reduce_dims: tuple[int, ...]):
        xs = x / s
        r = torch.round(xs)
        q = torch.clamp(r + z, qmin, qmax)
        inside = (r + z >= qmin) & (r + z <= qmax)
        ctx.save_for_backward(xs, r, q, z, inside)
        ctx.reduce_dims, ctx.s_shape = reduce_dims, s.shape
        return (q - z) * s

    @staticmethod
    def backward(ctx, g):
        xs, r, q, z, inside = ctx.saved_tensors
        dx = g * inside
        ds = g * torch.where(inside, r - xs, q - z)
        ds = ds.sum(ctx.reduce_dims, keepdim=True) if ctx.reduce_dims else ds
        return dx, ds.reshape(ctx.s_shape), None, None, None, None


class LsqQuantizer(nn.Module):
    """Stands in for one uniform activation quantizer while its piece is reconstructed: LSQ on the original's
    scale (same tensor), zero point fixed, and QDrop's elementwise bypass. Swapped back afterwards."""

    def __init__(self, original: UniformQuantizer, dropper: Dropper):
        super().__init__()
        self.original = original
        self.dropper = dropper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.original
        s, z = q._view(q.scale, x), q._view(q.zero_point, x)
        if q.channel_axis is None:
            reduce_dims = tuple(range(x.dim()))
        else:
            axis = q.channel_axis % x.dim()
            reduce_dims = tuple(d for d in range(x.dim()) if d != axis)
        out = _LsqFakeQuant.apply(x, s, z, q.qmin, q.qmax, reduce_dims)
        return self.dropper.drop(x, out)


class SoftWeights:
    """Forward hooks on the weight quantizers that replace their output by the AdaRound soft weight (by the
    hard-rounded one while ``hard`` is set)."""

    def __init__(self, roundings: list[Rounding]):
        self.hard = False
        self.handles = [r.module.weight_quant.register_forward_hook(self._make(r)) for r in roundings]

    def _make(self, r: Rounding):
        return lambda module, inputs, output: r.hard() if self.hard else r.soft()

    def mix(self, x: torch.Tensor, x_float: torch.Tensor) -> torch.Tensor:
        """QDrop's input mixing: each value of ``x`` replaced by ``x_float``'s with probability ``p``."""
        return torch.where(keep_mask(x.shape, self.p, self.gen).to(x.device), x_float, x)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def rec_loss(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """BRECQ's reconstruction loss: squared error summed over the feature axis, mean over the rest; with
    ``weight`` (the Fisher weights of :mod:`vitq.refine.recon_fisher`, the output's shape) each squared error
    is weighted."""
    err = (out - target).pow(2)
    return (err if weight is None else err * weight.to(err.dtype)).sum(-1).mean()


class LogScaleQuantizer(nn.Module):
    """Stands in for one log quantizer (``adalog``, ``logsqrt2``) while its piece is reconstructed: its top
    level ``scale`` (and, for a signed ``adalog``, the negative step ``neg_scale``) learn with a
    straight-through estimator. The codes are those of the original (base kept); each output level is
    ``scale · 2^(-k/r)``, so its gradient with respect to the scale is ``level / scale``; values above the top
    level are clipped (no gradient to the input), every other value passes the gradient straight through."""

    def __init__(self, original: Quantizer, dropper: Dropper):
        super().__init__()
        self.original = original
        self.dropper = dropper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.original
        with torch.no_grad():
            xq = q.fake_quant(x.detach())
        s = q.scale
        out = torch.where(xq > 0, xq * (s / s.detach()), xq)
        if getattr(q, "signed", False):
            ns = q.neg_scale
            out = torch.where(xq < 0, xq * (ns / ns.detach()), out)
        inside = (x <= s.detach()).to(x.dtype)
        out = out + (x - x.detach()) * inside
        return self.dropper.drop(x, out)


class PtfLsqQuantizer(nn.Module):
    """Stands in for one PTF quantizer (FQ-ViT's LayerNorm input) while its piece is reconstructed: the global
    scale learns with the LSQ gradient through every channel's ``scale · 2^-shift`` (shifts and zero point
    kept), and QDrop's bypass."""

    def __init__(self, original: Quantizer, dropper: Dropper):
        super().__init__()
        self.original = original
        self.dropper = dropper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.original
        s = q.channel_scale()
        out = _LsqFakeQuant.apply(x, s, q.zero_point, q.qmin, q.qmax, tuple(range(x.dim() - 1)))
        return self.dropper.drop(x, out)


LEARNED_KINDS = {"uniform": LsqQuantizer, "ptf": PtfLsqQuantizer, "adalog": LogScaleQuantizer,
                 "logsqrt2": LogScaleQuantizer}
LEARNED_BUFFERS = ("scale", "neg_scale")  # what a learned activation quantizer changes


def learned_buffers(q: Quantizer) -> list[torch.Tensor]:
    """The buffers reconstruction learns in ``q``: its scale, and a signed adalog's negative step."""
    out = [q.scale]
    if getattr(q, "signed", False) and hasattr(q, "neg_scale"):
        out.append(q.neg_scale)
    return out


def rel_loss(out: torch.Tensor, target: torch.Tensor, energy: float) -> torch.Tensor:
    """The reconstruction loss relative to the float output's energy (``rec_loss(target, 0)`` over the
    calibration images): the same number means the same relative error in every piece."""
    return rec_loss(out, target) / max(energy, 1e-12)


def kl_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(float ‖ quantized) of the logits' softmax, mean over the images (the head's loss)."""
    logp = torch.log_softmax(target.float(), -1)
    return (logp.exp() * (logp - torch.log_softmax(out.float(), -1))).sum(-1).mean()

"""LAPQ, loss-aware post-training quantization (Nahshan et al.; METHODS.md §2).

1. **Lp initialization.** Float passes observe every activation quantizer over all calibration images.
   For each p of a small sweep (default 2, 2.5, 3, 3.5, 4), every clipping range is set to the shrink factor
   of its observed range (1.00, 0.99, ..., 0.11, as OMSE) that minimizes Σ|x − x̂|^p: activations per tensor on
   the observers' seeded sample, weights per output channel on the weights. The p whose initialization gives
   the lowest task loss is kept (all losses recorded). Activations use the observers' histograms of every
   value (second pass); PTF quantizers (fq) use FQ-ViT's rule for every p (see :class:`Clip`).
2. **Joint Powell step.** ``scipy.optimize.minimize(method="Powell")`` over a vector of multiplicative factors
   on the Lp ranges, starting at 1: one factor per activation quantizer with a range (uniform, per tensor or
   per head; PTF: its global range, shifts re-chosen) and one per weighted layer (scaling the ranges of all of
   its output channels together). That is 149 variables for DeiT-Tiny in the ``matmul`` regime. Bounds
   [``low``, ``high``] keep every range positive.
   The loss is label-free: KL(float ‖ quantized) of the softmax outputs (or cross-entropy against the float
   model's top-1, ``loss="ce"``), averaged over the first ``loss_images`` calibration images, with the float
   outputs computed once. Evaluation labels are never seen.

The number of loss evaluations of the Powell step is capped (``max_evals``; scipy's own ``maxfev`` is only
checked after a full sweep over all directions), and the best point seen is written back, so the joint step
never ends above its initialization's loss. Speed: scipy's line searches change one coordinate (one
quantizer) at a time, so the input of every transformer block is cached for the last point evaluated and a
new point is run only from the first block whose quantizers changed. Progress is a tqdm bar over
evaluations; Ctrl-C raises ``KeyboardInterrupt`` out of the method (the CLI writes nothing then).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitq.calib import CalibData, forward_all
from vitq.errors import VitqError
from vitq.methods.baselines import weighted_modules
from vitq.models.trunk import Trunk
from vitq.options import OptionError, Options, opt
from vitq.quant.base import passthrough, quantizers_of
from vitq.quant.observers import OMSE_FACTORS, apply_range, observing, start_error_pass
from vitq.quant.uniform import PTFQuantizer, UniformQuantizer
from vitq.registry import register_method

LOSSES = ("kl", "ce")


@dataclass(frozen=True)
class LapqOptions(Options):
    p_values: tuple[float, ...] = opt((2.0, 2.5, 3.0, 3.5, 4.0), "p of the Lp-norm initialization, swept; the "
                                      "lowest task loss wins", minimum=0.5, maximum=8.0, metavar="P,P,...")
    max_evals: int = opt(500, "cap on task-loss evaluations of the Powell step", minimum=1, metavar="N")
    loss_images: int = opt(32, "the task loss uses the first N calibration images", minimum=1, metavar="N")
    loss: str = opt("kl", "label-free task loss against the float model's outputs: kl or ce (cross-entropy with "
                    "the float top-1)", choices=LOSSES)
    xtol: float = opt(0.01, "Powell line-search tolerance on the factors", above=0.0)
    low: float = opt(0.1, "lower bound of every range factor", above=0.0, below=1.0)
    high: float = opt(1.5, "upper bound of every range factor", above=1.0)
    joint: bool = opt(True, "the joint Powell step (off: stop after the Lp initialization, an ablation)")

    def check(self) -> None:
        if not self.p_values:
            raise OptionError("p_values", self.p_values, "at least one p, e.g. 2,3,4")


class _Budget(Exception):
    pass


# -- Lp-optimal clipping -----------------------------------------------------------------------------------------

def _lp_uniform(q: UniformQuantizer, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, p: float,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ w·|x − x̂|^p per row of x [C, n] for the ranges lo, hi [C] (the quantizer's integer grid); ``weights``
    are histogram counts when x holds bin centres."""
    scale, zero = q.params_for_range(lo.float(), hi.float())
    scale, zero = scale.reshape(-1, 1).to(x), zero.reshape(-1, 1).to(x)
    xq = (torch.clamp(torch.round(x / scale) + zero, q.qmin, q.qmax) - zero) * scale
    err = (xq - x).abs().pow(p)
    return (err * weights if weights is not None else err).sum(1)


def lp_factors(q: UniformQuantizer, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, p: float,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of x [C, n], the shrink factor of [lo, hi] (OMSE's factors) with the least Lp error."""
    errs = torch.stack([_lp_uniform(q, x, lo * f, hi * f, p, weights) for f in OMSE_FACTORS])  # [F, C]
    return torch.tensor(OMSE_FACTORS, dtype=lo.dtype)[errs.argmin(0).cpu()]


class Clip:
    """One optimized variable: a quantizer whose range is ``factor`` times its Lp-initialized range.

    Weights: Lp per output channel over the weight values. Uniform activations: Lp per tensor (per head) over
    every calibration value, from the observer's histogram (second pass). PTF quantizers: FQ-ViT's rule
    (global min/max, each channel's shift by least squared error over every value) for any p; the factor then
    scales the global range with the shifts kept."""

    def __init__(self, name: str, q, weight: torch.Tensor | None, obs=None):
        self.name, self.q, self.weight, self.obs = name, q, weight, obs
        self.lo = self.hi = self.shift = None  # the Lp range the factor multiplies

    def init_lp(self, p: float) -> None:
        q = self.q
        if isinstance(q, PTFQuantizer):
            apply_range(q, self.obs, "omse")
            self.lo, self.hi, self.shift = self.obs.min, self.obs.max, q.shift.clone()
            return
        if self.weight is not None:
            w = self.weight.detach().double()
            x = w.reshape(w.shape[0], -1) if q.channel_axis is not None else w.reshape(1, -1)
            weights, lo, hi = None, x.min(1).values, x.max(1).values
        else:
            x, weights = self.obs.histogram()
            if q.channel_axis is None:
                x, weights = x.reshape(1, -1), weights.reshape(1, -1)
                lo, hi = torch.tensor([self.obs.min], dtype=x.dtype), torch.tensor([self.obs.max], dtype=x.dtype)
            else:
                lo, hi = self.obs.channel_min.to(x.dtype), self.obs.channel_max.to(x.dtype)
        f = lp_factors(q, x, lo, hi, p, weights)
        self.lo, self.hi = (lo * f).float(), (hi * f).float()
        if q.channel_axis is None:
            self.lo, self.hi = self.lo[0], self.hi[0]

    def apply(self, factor: float) -> None:
        if isinstance(self.q, PTFQuantizer):
            self.q.set_range(self.lo * factor, self.hi * factor)
            self.q.shift.copy_(self.shift)
        else:
            self.q.set_range(self.lo * factor, self.hi * factor)


# -- the loss, with block-input caching -----------------------------------------------------------------------------

class LossEvaluator:
    """Task loss of the quantized model on fixed images against cached float outputs. Each variable belongs
    to a unit (-1 stem, 0..U-1 a block, U the tail); a point is run from the first unit whose variables differ
    from the previous point's (block inputs of the previous point are cached)."""

    def __init__(self, model: nn.Module, clips: list[Clip], images: list[torch.Tensor], loss: str):
        self.model, self.clips, self.images, self.loss = model, clips, images, loss
        try:
            self.trunk = Trunk(model)
            names = [n for n, _ in self.trunk.units]
        except VitqError:  # not a timm ViT/Swin: no caching, every point runs the whole model
            self.trunk, names = None, []
        self.n_units = len(names)
        self.unit_of = np.array([self._unit(c.name, names) for c in clips])
        with torch.no_grad(), passthrough(model):
            self.float_logp = [F.log_softmax(model(x).float(), -1) for x in images]
        self.cache: list | None = None
        self.x: np.ndarray | None = None
        self.calls = 0

    @staticmethod
    def _unit(name: str, units: list[str]) -> int:
        if not units:
            return -1
        for i, u in enumerate(units):
            if name.startswith(u + "."):
                return i
        return -1 if name.startswith("patch_embed") else len(units)

    def set_point(self, x: np.ndarray) -> int:
        """Apply the factors that changed; returns the first unit to recompute."""
        if self.x is None:
            changed = np.arange(len(x))
        else:
            changed = np.flatnonzero(x != self.x)
        for i in changed:
            self.clips[i].apply(float(x[i]))
        self.x = np.array(x, dtype=float, copy=True)
        if self.cache is None or self.trunk is None:
            return -1
        return int(self.unit_of[changed].min()) if len(changed) else self.n_units + 1

    def _logits(self, start: int) -> list[torch.Tensor]:
        if self.trunk is None:
            return [self.model(x) for x in self.images]
        t = self.trunk
        if start <= -1 or self.cache is None:
            self.cache = [[t.stem(x) for x in self.images]]
            self.cache += [None] * self.n_units
            start = 0
        for u in range(start, self.n_units):
            unit = t.units[u][1]
            self.cache[u + 1] = [unit(h) for h in self.cache[u]]
        return [t.tail(h) for h in self.cache[self.n_units]]

    @torch.no_grad()
    def __call__(self, x: np.ndarray) -> float:
        self.calls += 1
        start = self.set_point(x)
        total, n = 0.0, 0
        for logits, flp in zip(self._logits(start), self.float_logp):
            lq = F.log_softmax(logits.float(), -1)
            if self.loss == "kl":
                total += float((flp.exp() * (flp - lq)).sum())
            else:
                total += float(F.nll_loss(lq, flp.argmax(-1), reduction="sum"))
            n += logits.shape[0]
        return total / n


# -- driver -----------------------------------------------------------------------------------------------------------

def _clips(model: nn.Module, observers: dict) -> list[Clip]:
    qs = quantizers_of(model)
    out = []
    for name, obs in observers.items():  # activation quantizers, in module order
        q = qs[name]
        if isinstance(q, (UniformQuantizer, PTFQuantizer)):
            out.append(Clip(name, q, None, obs))
        else:
            apply_range(q, obs, "minmax")  # parameter-free kinds (log2) or kinds without a range to clip
    for name, m in weighted_modules(model).items():
        if isinstance(m.weight_quant, UniformQuantizer):
            out.append(Clip(f"{name}.weight_quant", m.weight_quant, m.weight))
    order = {n: i for i, n in enumerate(qs)}
    return sorted(out, key=lambda c: order.get(c.name, len(order)))


@register_method("lapq", "LAPQ (Nahshan et al.): Lp-norm clipping init (p swept), then Powell over all clipping "
                 "values on a label-free KL loss vs the float model", config=LapqOptions,
                 quick_options={"max_evals": 100, "p_values": "2,3,4"})
def lapq(model: nn.Module, calib: CalibData, cfg: LapqOptions) -> dict:
    from scipy.optimize import minimize

    t0 = time.perf_counter()
    with observing(model, seed=calib.seed) as observers:
        forward_all(model, calib, desc="lapq: observe")
        if start_error_pass(model, observers, "omse"):  # histograms of every value (PTF: shift errors)
            forward_all(model, calib, desc="lapq: observe errors")
    clips = _clips(model, observers)
    images = calib.images[:cfg.loss_images]
    batches = [images[i:i + calib.batch_size].to(calib.device) for i in range(0, len(images), calib.batch_size)]
    ev = LossEvaluator(model, clips, batches, cfg.loss)
    ones = np.ones(len(clips))
    p_loss = {}
    for p in calib.bar(cfg.p_values, "lapq: Lp init", len(cfg.p_values)):
        for c in clips:
            c.init_lp(p)
        ev.x = None  # every range changed
        p_loss[p] = ev(ones)
    best_p = min(p_loss, key=p_loss.get)
    for c in clips:
        c.init_lp(best_p)
    ev.x = None
    init_loss = ev(ones)
    t_init = time.perf_counter() - t0
    info = {"options": cfg.to_dict(), "variables": len(clips), "p_sweep_loss": {str(p): v for p, v in p_loss.items()},
            "p": best_p, "init_loss": init_loss, "loss_images": len(images),
            "loss": ("KL(float || quantized) of the softmax outputs" if cfg.loss == "kl"
                     else "cross-entropy against the float model's top-1") + ", mean over the loss images",
            "parametrization": "one range factor per activation quantizer and per weighted layer (all its channels), "
                               "times its Lp-initialized range; start 1",
            "init_seconds": t_init}
    if not cfg.joint:
        info.update({"final_loss": init_loss, "evaluations": 0})
        return info
    best = {"f": init_loss, "x": ones.copy()}
    bar = calib.bar(range(cfg.max_evals), "lapq: Powell", cfg.max_evals)
    n = [0]

    def fun(x):
        if n[0] >= cfg.max_evals:
            raise _Budget
        n[0] += 1
        x = np.clip(x, cfg.low, cfg.high)
        f = ev(x)
        if f < best["f"]:
            best.update(f=f, x=x.copy())
        bar.update(1)
        bar.set_postfix(loss=f"{best['f']:.4f}", refresh=False)
        return f

    t1 = time.perf_counter()
    stopped = "converged"
    try:
        minimize(fun, ones, method="Powell", bounds=[(cfg.low, cfg.high)] * len(clips),
                 options={"xtol": cfg.xtol, "ftol": 1e-6, "maxfev": cfg.max_evals})
    except _Budget:
        stopped = "evaluation cap"
    finally:
        bar.close()
    if n[0] >= cfg.max_evals:  # scipy may stop at its own maxfev before our guard raises
        stopped = "evaluation cap"
    ev(best["x"])  # write the best point seen back into the quantizers
    factors = {c.name: float(f) for c, f in zip(clips, best["x"])}
    info.update({"final_loss": best["f"], "evaluations": n[0], "stopped": stopped,
                 "changed_factors": int(np.sum(best["x"] != 1.0)), "factors": factors,
                 "powell_seconds": time.perf_counter() - t1, "forward_calls": ev.calls})
    return info

"""Closed-form compensation of the activation quantization error (ERQ's Aqer, Zhong et al., ICML 2024; issue 26):
every quantized linear layer in turn, in data-flow order, gets the weight and bias that best map its *quantized*
input to the float layer's output, by ridge regression, rounded onto its weight grid.

For a layer whose quantized input rows (after its input quantizer) are ``X̃`` (with a column of ones for the bias)
and whose float output is ``Y``, the continuous solution is

    W' = argmin ||X̃ W'ᵀ − Y||² + λ ||W' − W||²  =  (X̃ᵀX̃ + λ I)⁻¹ (X̃ᵀY + λ Wᵀ)  (transposed)

with ``λ = damp × mean diag(X̃ᵀX̃)`` (the input part; several ``damp``: each layer takes the one whose nearest-rounded
solution has the lowest held-out error, see below). ``X̃`` comes from the quantized model as it is when the layer's
turn comes: every upstream layer already refit, rounded and (if kept) in place. ``Y`` is the layer's output in the
float function: a copy of the model taken at the start, run with every quantizer passed through (the float model,
reparameterization included, so the layers pair one to one) on the float inputs; ERQ's own target. ``W'`` is then
rounded onto the layer's weight grid (its quantizer's scales, kept): ``gptq`` rounds it with GPTQ on the centred
input covariance (ERQ's Wqer likewise follows the ridge step with a rounding step aware of the inputs), ``nearest``
stores ``W'`` and lets the quantizer round it; the bias is refit in closed form to the rounded weight.

Guard: a seeded share of the calibration images (``holdout``) is kept out of the solve; an update stays only if the
layer's output MSE on those held-out images goes down, else the layer is restored. The classification head (the
linear layers after the last unit) is left as it is unless ``head`` is set; convolutions are left as they are.
Everything is accumulated as second moments, so each layer costs one pass of its unit over the images, quantized
and float, each stopped where the layer has run; GPTQ runs once per layer, on the λ chosen. Run it first in a
chain (its targets are the model's float function when it starts).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from vitq.calib import CalibData, forward_until
from vitq.errors import VitqError
from vitq.models.trunk import Trunk
from vitq.options import OptionError, Options, opt
from vitq.quant.base import passthrough
from vitq.quant.modules import QLinear
from vitq.refine.gptq import gptq_rows, grid_quant
from vitq.refine.recon_pieces import weighted_stages
from vitq.registry import register_refiner

log = logging.getLogger("vitq")
ROUNDINGS = ("gptq", "nearest")


@dataclass(frozen=True)
class RidgeOptions(Options):
    VERSION = 2
    damp: tuple[float, ...] = opt((0.01, 0.1, 1.0), "ridge weight λ as a fraction of the mean diagonal of X̃ᵀX̃ (keeps "
                                  "W' near W); several: per layer, the one with the lowest held-out error",
                                  above=0.0, metavar="D[,D...]")
    holdout: float = opt(0.2, "fraction of the calibration images held out (seeded): a layer's update stays only if "
                         "its output error on them goes down", above=0.0, below=1.0, metavar="F")
    head: bool = opt(False, "also refit the classification head (the linear layers after the last unit)")
    rounding: str = opt("gptq", "how the solved weight goes onto the grid: gptq (GPTQ on the layer's quantized "
                        "inputs) or nearest (the continuous solution is stored and the quantizer rounds it: what "
                        "recon's AdaRound should start from in ridge,recon)", choices=ROUNDINGS)
    first_token: float = opt(1.0, "weight of the first token's rows (a ViT's class token, the only one its head "
                             "reads) against 1 for every other token, in the solve and the held-out check; e.g. "
                             "196 for DeiT at 224 (as much as all patch tokens together)", above=0.0, metavar="W")

    @classmethod
    def preset(cls, given: dict) -> dict:
        damp = given.get("damp")
        if isinstance(damp, (int, float)) and not isinstance(damp, bool):  # one number from Python
            given = {**given, "damp": (float(damp),)}
        return given

    def check(self) -> None:
        if not self.damp:
            raise OptionError("damp", self.damp, "one or more numbers > 0, e.g. 0.01,0.1,1")


def split_images(n: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) image indices, sorted: ``round(holdout × n)`` images (at least one) drawn with ``seed``."""
    k = max(1, round(holdout * n))
    if n - k < 1:
        raise VitqError(f"ridge: --ridge-holdout {holdout} of {n} calibration image(s) leaves none to solve on "
                        "(give more images or a smaller --ridge-holdout)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[k:].sort().values, perm[:k].sort().values


class Moments:
    """Second moments of a layer's input rows (with a ones column) and float output rows: ``a`` = X̃ᵀX̃, ``c`` = X̃ᵀY,
    ``yy`` = ||Y||², ``n`` rows; the squared error of any weight and bias follows from them exactly."""

    def __init__(self, first_token: float = 1.0):
        self.a = self.c = None
        self.yy, self.n, self.first_token = 0.0, 0.0, first_token

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Rows of ``x`` [..., tokens, in] and ``y`` [..., tokens, out]; with ``first_token`` != 1 the rows of token 0
        count that many times (``n`` is then the weighted number of rows)."""
        wt = torch.ones(x.shape[:-1], dtype=torch.float64, device=x.device)
        if self.first_token != 1.0 and x.dim() >= 3 and x.shape[-2] > 1:
            wt[..., 0] = self.first_token
        x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
        if x.shape[0] != y.shape[0]:
            raise VitqError(f"ridge: a layer saw {x.shape[0]} input rows but its float twin {y.shape[0]} output rows")
        wt = wt.reshape(-1, 1)
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
        xw = (x * wt).T
        a, c = xw @ x, xw @ y
        self.a, self.c = (a, c) if self.a is None else (self.a + a, self.c + c)
        self.yy += float((y.pow(2) * wt).sum())
        self.n += float(wt.sum())

    def mse(self, w: torch.Tensor, b: torch.Tensor | None) -> float:
        """Mean squared error of ``X̃ wᵀ + b`` against ``Y`` per output value."""
        wa = torch.cat([w.double(), (b.double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                                 device=w.device))[:, None]], 1)
        sq = float((wa @ self.a * wa).sum() - 2 * (wa * self.c.T).sum()) + self.yy
        return max(sq, 0.0) / (self.n * w.shape[0])


def ridge_solve(m: Moments, w: torch.Tensor, b: torch.Tensor | None, damp: float) -> tuple[torch.Tensor, float]:
    """The ridge minimiser [W', b'] (float64; b' the last column, absent without a bias) and its λ."""
    d = w.shape[1]
    a, c = (m.a, m.c) if b is not None else (m.a[:d, :d], m.c[:d])
    wa = torch.cat([w.double(), b.double()[:, None]], 1) if b is not None else w.double()
    lam = damp * float(torch.diagonal(m.a)[:d].mean().clamp_min(1e-12))
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(a + lam * eye, c + lam * wa.T).T, lam


def _on_grid(train: Moments, wq, w0: torch.Tensor, b0: torch.Tensor | None, w_new: torch.Tensor, lam: float,
             gptq: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A solved weight put on the grid (GPTQ, or left for the quantizer's nearest rounding) and the bias refit to
    it: (the weight to store, the weight the layer then computes with, the bias)."""
    d = w0.shape[1]
    if gptq:
        h = train.a[:d, :d]
        if b0 is not None:  # the bias is refit below: the error of a rounded weight is in the centred covariance
            mean = train.a[d, :d] / train.n
            h = h - train.n * torch.outer(mean, mean)
        w_new = gptq_rows(w_new, h, grid_quant(wq))
    w_eff = wq.fake_quant(w_new.to(w0.dtype))  # what the layer computes with (exactly on the float32 grid)
    bias = None
    if b0 is not None:  # the bias that best fits the rounded weight (the same ridge penalty)
        sums_y, sums_x = train.c[d], train.a[d, :d]
        bias = ((sums_y - w_eff.double() @ sums_x + lam * b0.double()) / (train.n + lam)).to(b0.dtype)
    return (w_eff if gptq else w_new.to(w0.dtype)), w_eff, bias


@torch.no_grad()
def refit_layer(layer: QLinear, train: Moments, held: Moments, damps: tuple[float, ...], rounding: str) -> dict:
    """Solve for each λ; the one whose solution (nearest-rounded, bias refit) has the lowest held-out error is put
    on the grid and kept if the layer's held-out error goes down, else the layer is restored. From the layer's
    moments on the train and held-out images."""
    wq = layer.weight_quant
    if not bool(wq.initialized):
        raise VitqError("ridge needs calibrated weight quantizers (run a calibration method before the refiner)")
    w0, b0 = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    corr0 = layer.weight_correction.clone()
    before = (train.mse(layer.quantized_weight(), layer.bias), held.mse(layer.quantized_weight(), layer.bias))
    d = w0.shape[1]
    sols = [ridge_solve(train, w0, b0, damp) for damp in damps]
    held_err = []
    for sol, lam in sols:
        _, w_eff, bias = _on_grid(train, wq, w0, b0, sol[:, :d], lam, gptq=False)
        held_err.append(held.mse(w_eff, bias))
    i = min(range(len(damps)), key=held_err.__getitem__)
    w_new, lam = sols[i][0][:, :d], sols[i][1]
    clipped = float(((w_new - wq.fake_quant(w_new.to(w0.dtype)).double()).abs()
                     > 0.5 * wq.scale.double().reshape(-1, 1) * (1 + 1e-6)).double().mean())
    stored, _, bias = _on_grid(train, wq, w0, b0, w_new, lam, gptq=rounding == "gptq")
    layer.weight.copy_(stored)
    if b0 is not None:
        layer.bias.copy_(bias)
    layer.weight_correction.fill_(False)
    w_eff = layer.quantized_weight()
    after = (train.mse(w_eff, layer.bias), held.mse(w_eff, layer.bias))
    accepted = after[1] < before[1]
    if not accepted:
        layer.weight.copy_(w0)
        if b0 is not None:
            layer.bias.copy_(b0)
        layer.weight_correction.copy_(corr0)
    return {"rows_train": train.n, "rows_held": held.n, "damp": damps[i], "lambda": lam, "clipped": clipped,
            "mse_held_by_damp": dict(zip(map(str, damps), held_err, strict=True)),
            "mse_train_before": before[0], "mse_train_after": after[0], "mse_held_before": before[1],
            "mse_held_after": after[1], "accepted": accepted}


@torch.no_grad()
def _moments(layer: QLinear, twin: QLinear, run_q, run_f, ref: nn.Module, xq: list, xf: list,
             first_token: float = 1.0) -> Moments:
    """The layer's quantized inputs (the model as it is now) against its twin's float outputs, batch by batch;
    each pass stops where the layer (its twin) has run."""
    m = Moments(first_token)
    for hq, hf in zip(xq, xf, strict=True):
        x = forward_until(lambda h=hq: run_q(h), layer.input_quant)
        with passthrough(ref):
            y = forward_until(lambda h=hf: run_f(h), twin)
        if x is not None and y is not None:
            m.add(x, y)
    return m


def _batches(images: torch.Tensor, calib: CalibData) -> list[torch.Tensor]:
    return [images[i:i + calib.batch_size].to(calib.device) for i in range(0, len(images), calib.batch_size)]


@register_refiner("ridge", "ERQ-style closed-form compensation of the activation quantization error: layer by "
                  "layer, each linear's weight and bias refit by ridge regression from its quantized input to the "
                  "float output, rounded onto its grid, kept only if its held-out error drops", config=RidgeOptions)
def ridge(model: nn.Module, float_model: nn.Module, calib: CalibData, cfg: RidgeOptions) -> dict:
    return refit_model(model, float_model, calib, cfg)


@torch.no_grad()
def refit_model(model: nn.Module, float_model: nn.Module, calib: CalibData, cfg: RidgeOptions) -> dict:
    """Refit every eligible linear layer of ``model`` in data-flow order; returns the refinement record."""
    t0 = time.perf_counter()
    model.eval()
    train_idx, held_idx = split_images(len(calib), cfg.holdout, calib.seed)
    xq = {"train": _batches(calib.images[train_idx], calib), "held": _batches(calib.images[held_idx], calib)}
    xf = dict(xq)
    ref = copy.deepcopy(model)  # the float function of the model as it starts (its quantizers passed through)
    probe = xq["train"][0]
    with passthrough(ref):
        z_ref = ref(probe).float()
    z_float = float_model.eval()(probe).float()
    gap = float((z_ref - z_float).abs().max())
    if gap > 1e-3 * float(z_float.abs().max().clamp_min(1e-12)):
        log.warning("ridge: the model with its quantizers passed through differs from the float model (max logit "
                    "gap %.3g): its targets are the model as it started (run ridge first in a chain)", gap)
    stages, ref_stages = weighted_stages(model, Trunk(model), probe), weighted_stages(ref, Trunk(ref), probe)
    names = {id(m): n for n, m in model.named_modules()}
    ref_mods = dict(ref.named_modules())
    layers: dict[str, dict] = {}
    for si, ((stage, mods, run_q), (_, _, run_f)) in enumerate(zip(stages, ref_stages, strict=True)):
        for layer in mods:
            name = names[id(layer)]
            if name in layers:
                continue
            if not isinstance(layer, QLinear):
                layers[name] = {"skipped": "convolution"}
                continue
            if stage == "tail" and not cfg.head:
                layers[name] = {"skipped": "head (--ridge-head refits it)"}
                continue
            twin = ref_mods[name]
            mom = {s: _moments(layer, twin, run_q, run_f, ref, xq[s], xf[s], cfg.first_token)
                   for s in ("train", "held")}
            if not mom["train"].n or not mom["held"].n:
                layers[name] = {"skipped": "no calibration input reached it"}
                continue
            layers[name] = refit_layer(layer, mom["train"], mom["held"], cfg.damp, cfg.rounding)
        if si < len(stages) - 1:
            for s in xq:
                xq[s] = [run_q(h) for h in xq[s]]
                with passthrough(ref):
                    xf[s] = [run_f(h) for h in xf[s]]
    solved = [n for n, e in layers.items() if "accepted" in e]
    accepted = [n for n in solved if layers[n]["accepted"]]
    skipped_head = [n for n, e in layers.items() if e.get("skipped", "").startswith("head")]
    seconds = time.perf_counter() - t0
    log.info("ridge: %d of %d linear layers refit and kept (held-out output error down), %d restored, %d head "
             "layer(s) skipped; %d train / %d held-out images, %s rounding: %.1f s", len(accepted), len(solved),
             len(solved) - len(accepted), len(skipped_head), len(train_idx), len(held_idx), cfg.rounding, seconds)
    return {"config": cfg.to_dict(), "num_train": len(train_idx), "num_held": len(held_idx), "layers": layers,
            "layers_accepted": accepted, "layers_rejected": [n for n in solved if n not in accepted],
            "reference_logit_gap": gap, "ridge_seconds": seconds}

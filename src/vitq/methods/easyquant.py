"""EasyQuant (Wu et al.; METHODS.md §2): per layer, alternately search the per-channel weight scales and the
per-tensor input scale on a grid [low·Δ, high·Δ] around the min/max scale Δ, maximizing the cosine similarity
between the float and the quantized layer output.

Choices (recorded in the returned dict):

- **Init.** Min/max of every activation over the calibration images and of every weight channel (the Δ the
  grid is relative to). The scheme's quantizers are kept (fq: uint weights and activations; matmul: int
  weights, uint activations), so a grid factor f gives the range [f·lo, f·hi] of the quantizer's own grid.
- **Sites and their outputs.** Linear / conv layers: input quantizer and weight quantizer, output = the layer
  output (before any activation). Attention matmuls: q and k quantizers with output q·kᵀ·scale (the scores,
  before softmax), softmax and v quantizers with output attn·V (the heads before the projection); k and v play
  the weight's role (searched first). Every quantizer of the sites is searched; in the ``fq`` regime the
  quantizers that belong to no matmul input (attention scores, PTF LayerNorm inputs and residual stream) keep
  an observer-based range (``fq_init``, default OMSE over all calibration images) and are not searched.
- **Objective.** Weight step: per output channel, the cosine similarity of that channel's outputs (over all
  cached samples and tokens), each channel choosing its own factor (a channel's output depends only on its
  own scale). Input step and attention sites: the mean over calibration samples of the cosine similarity of
  the whole flattened layer output. The layer's cosine similarity (the latter) is checked after every step
  and the best state seen, the initial one included, is kept: a layer never ends below its initial value.
- **Order.** Layers in execution order; each layer's inputs come from the model with all earlier layers
  already quantized (the quantized prefix), its target is the float model's output on float inputs.
- **Speed.** Each layer's inputs and float outputs are cached once, on ``tokens`` random token positions per
  sample (linear layers) and ``rows`` query rows per sample and head (attention), using the caching machinery
  of :mod:`vitq.methods.layerwise`; the search images are the first ``search_images`` calibration images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitq.calib import CalibData, forward_all
from vitq.methods.baselines import calibrate_weights
from vitq.methods.hessian import Grids, Knob, linear_grid, make_knob
from vitq.methods.layerwise import Layer, find_layers, image_chunks, record, run_segment, segments, weight_matrix
from vitq.options import OptionError, Options, opt
from vitq.quant.base import passthrough, quantizers_of
from vitq.quant.observers import apply_range, observing, start_error_pass
from vitq.registry import register_method


@dataclass(frozen=True)
class EasyQuantOptions(Options):
    candidates: int = opt(100, "grid points in [low·Δ, high·Δ]", minimum=1, metavar="C")
    rounds: int = opt(3, "at most R weight/input alternations per layer", minimum=1, metavar="R")
    low: float = opt(0.5, "lower end of the grid, times Δ", above=0)
    high: float = opt(1.2, "upper end of the grid, times Δ")
    search_images: int | None = opt(None, "search on the first N calibration images (None: all)", minimum=1,
                                    metavar="N")
    tokens: int = opt(64, "token positions cached per sample for linear layers", minimum=1, metavar="T")
    rows: int = opt(32, "query rows cached per sample and head for the attention matmuls", minimum=1, metavar="R")
    fq_init: str = opt("omse", "(fq) range of the quantizers that are not searched (scores, PTF)",
                       choices=("minmax", "omse"))

    def check(self) -> None:
        if not self.low < self.high:
            raise OptionError("high", self.high, f"a number above low = {self.low} (0 < low < high)")


def layer_cosine(out_hat: torch.Tensor, out: torch.Tensor) -> float:
    """Mean over samples (dim 0) of the cosine similarity of the flattened outputs."""
    return float(F.cosine_similarity(out_hat.reshape(out.shape[0], -1), out.reshape(out.shape[0], -1), dim=1,
                                     eps=1e-12).mean())


def channel_cosine(out_hat: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per output channel (last dim) over all other dims -> [C]."""
    a, b = out_hat.reshape(-1, out.shape[-1]), out.reshape(-1, out.shape[-1])
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-12)


class Site:
    """One searched operation on cached operands: ``a`` the input side, ``b`` the weight side (k or v for the
    attention matmuls)."""

    def __init__(self, layer: Layer, tag: str, grids: Grids):
        self.layer, self.kind = layer, layer.kind
        fl, cur = layer.cache["float"], layer.cache[tag]
        m = layer.module
        if self.kind == "linear":
            self.A, self.B, self.bias = cur["A"], weight_matrix(m), m.bias
            self.Bshape = m.weight.shape
            target = self._out(fl["A"], self.B)
            self.a_knob = make_knob("input", m.input_quant, grids)
            self.b_knob = make_knob("weight", m.weight_quant, grids, per_channel=True)
        else:
            self.A, self.B, self.bias = cur["A"], cur["B"], None
            target = self._out(fl["A"], fl["B"])
            self.a_knob = make_knob("a", layer.a_quant, grids)
            self.b_knob = make_knob("b", layer.b_quant, grids)
        self.target = target

    def _out(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(A, B, self.bias)
        if self.kind == "qk":
            return (A * float(self.layer.module.scale)) @ B.transpose(-2, -1)
        return A @ B

    def quant_a(self) -> torch.Tensor:
        q = self.layer.a_quant
        return q.fake_quant(self.A) if self.a_knob is not None else q(self.A)

    def quant_b(self) -> torch.Tensor:
        q = self.layer.b_quant
        if self.kind == "linear":
            w = self.B.reshape(self.Bshape)
            return q.fake_quant(w).reshape(self.B.shape)
        return q.fake_quant(self.B) if self.b_knob is not None else q(self.B)

    def objective(self, Aq: torch.Tensor | None = None, Bq: torch.Tensor | None = None) -> float:
        Aq = self.quant_a() if Aq is None else Aq
        Bq = self.quant_b() if Bq is None else Bq
        return layer_cosine(self._out(Aq, Bq), self.target)

    def step(self, side: str) -> bool:
        """Grid search of one side with the other fixed; returns whether the choice changed."""
        knob: Knob | None = self.a_knob if side == "a" else self.b_knob
        if knob is None:
            return False
        fixed = self.quant_b() if side == "a" else self.quant_a()
        per_channel = knob.per_channel and self.kind == "linear"
        scores = []
        for i in range(len(knob.states)):
            knob.apply(i)
            if side == "a":
                out = self._out(self.quant_a(), fixed)
            else:
                out = self._out(fixed, self.quant_b())
            scores.append(channel_cosine(out, self.target) if per_channel else
                          torch.tensor(layer_cosine(out, self.target)))
        scores = torch.stack(scores)
        if per_channel:
            idx = scores.argmax(0)
            knob.apply_per_channel(idx.to(knob.states[0]["scale"].device))
            changed = knob.choice is None or not torch.equal(knob.choice, idx.cpu())
            knob.choice = idx.cpu()
        else:
            best = int(scores.argmax())
            knob.apply(best)
            changed = knob.choice != best
            knob.choice = best
        return changed

    def search(self, rounds: int) -> dict:
        knobs = [k for k in (self.a_knob, self.b_knob) if k is not None]
        init = cur = self.objective()
        best = {"obj": init, "state": [k.snapshot() for k in knobs]}
        done = 0
        for _ in range(rounds):
            done += 1
            changed = False
            for side in ("b", "a"):
                changed |= self.step(side)
                cur = self.objective()
                if cur > best["obj"]:
                    best = {"obj": cur, "state": [k.snapshot() for k in knobs]}
            if not changed:
                break
        for k, s in zip(knobs, best["state"]):
            k.apply_state(s)
        return {"init_cosine": init, "cosine": best["obj"], "rounds": done}


@torch.no_grad()
def _calibrate_sequential(model: nn.Module, calib: CalibData, layers: list[Layer], cfg: EasyQuantOptions) -> list[dict]:
    gen = torch.Generator().manual_seed(calib.seed)
    grids = Grids(linear_grid(cfg.low, cfg.high, cfg.candidates), list(range(13)),
                  [2.0 ** (-i / 2) for i in range(1, 17)])
    h_f = h_q = image_chunks(calib, cfg.search_images)
    trace = []
    for seg_name, fn, seg_layers in calib.bar(segments(model, layers, h_f[0]), "easyquant", None):
        with passthrough(model):
            h_f_next = record(fn, h_f, seg_layers, "float", gen, tokens=cfg.tokens, rows=cfg.rows, stop=False)
        for layer in seg_layers:
            record(fn, h_q, [layer], "quant", gen, tokens=cfg.tokens, rows=cfg.rows, stop=True, keep_output=False)
            site = Site(layer, "quant", grids)
            res = site.search(cfg.rounds)
            trace.append({"layer": layer.name, "kind": layer.kind, **res})
            layer.cache.clear()
            layer.idx = None
        if seg_name != "tail":
            h_q = run_segment(fn, h_q)
        h_f = h_f_next
    return trace


@register_method("easyquant", "EasyQuant (Wu et al.): per layer, alternating grid search of per-channel weight "
                 "and per-tensor input scales maximizing output cosine similarity, layers in order",
                 config=EasyQuantOptions, quick_options={"candidates": 20, "rounds": 2})
def easyquant(model: nn.Module, calib: CalibData, cfg: EasyQuantOptions) -> dict:
    scheme = getattr(model, "vitq_scheme", None)
    fq = bool(scheme is not None and scheme.fully_quantized)
    t0 = time.perf_counter()
    layers = find_layers(model)
    searched = {id(q) for la in layers for q in (la.a_quant, la.b_quant)}
    qs = quantizers_of(model)
    with observing(model, seed=calib.seed) as observers:  # float pass(es) over all calibration images
        forward_all(model, calib, desc="easyquant: observe")
        rest = {n: obs for n, obs in observers.items() if id(qs[n]) not in searched}
        if start_error_pass(model, rest, cfg.fq_init):  # OMSE of the unsearched fq quantizers sees every value
            forward_all(model, calib, desc="easyquant: observe errors")
    for n, obs in observers.items():
        apply_range(qs[n], obs, "minmax" if id(qs[n]) in searched else cfg.fq_init)
    calibrate_weights(model, "minmax", correction=False)
    t1 = time.perf_counter()
    trace = _calibrate_sequential(model, calib, layers, cfg)
    inits = [t["init_cosine"] for t in trace]
    finals = [t["cosine"] for t in trace]
    n_images = len(calib) if cfg.search_images is None else min(cfg.search_images, len(calib))
    return {"regime": scheme.name if scheme is not None else None,
            "init": "min/max ranges (activations over all calibration images, weights per channel)",
            "not_searched": (f"scores and PTF quantizers: {cfg.fq_init} (not searched)" if fq else "none"),
            "calibration_inputs": "sequential: inputs from the already-quantized earlier layers",
            "search_images": n_images, "mean_init_cosine": sum(inits) / max(len(inits), 1),
            "mean_cosine": sum(finals) / max(len(finals), 1), "search_seconds": time.perf_counter() - t1,
            "init_seconds": t1 - t0, "layers": trace}

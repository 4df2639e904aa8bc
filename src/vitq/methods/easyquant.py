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
  of :mod:`vitq.methods.ptqvit`; the search images are the first ``search_images`` calibration images.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from vitq.calib import CalibData, forward_all
from vitq.errors import VitqError
from vitq.methods.baselines import calibrate_weights
from vitq.methods.hessian import Grids, Knob, linear_grid, make_knob
from vitq.methods.ptqvit import Layer, _chunks, _record, _run, _segments, _weight_matrix, find_layers, float_mode
from vitq.quant.base import quantizers_of
from vitq.quant.observers import apply_range, observing, start_error_pass
from vitq.registry import merge_options, register_method

DEFAULTS = {"candidates": 100, "rounds": 3, "low": 0.5, "high": 1.2, "search_images": None, "tokens": 64,
            "rows": 32, "fq_init": "omse"}


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
            self.A, self.B, self.bias = cur["A"], _weight_matrix(m), m.bias
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
def _calibrate_sequential(model: nn.Module, calib: CalibData, layers: list[Layer], opts: dict) -> list[dict]:
    gen = torch.Generator().manual_seed(calib.seed)
    grids = Grids(linear_grid(opts["low"], opts["high"], opts["candidates"]), list(range(13)),
                  [2.0 ** (-i / 2) for i in range(1, 17)])
    h_f = h_q = _chunks(calib, opts["search_images"])
    rec_opts = {"tokens": opts["tokens"], "rows": opts["rows"]}
    trace = []
    for seg_name, fn, seg_layers in calib.bar(_segments(model, layers), "easyquant", None):
        with float_mode(model):
            h_f_next = _record(fn, h_f, seg_layers, "float", rec_opts, gen, stop=False)
        for layer in seg_layers:
            _record(fn, h_q, [layer], "quant", rec_opts, gen, stop=True, keep_output=False)
            site = Site(layer, "quant", grids)
            res = site.search(opts["rounds"])
            trace.append({"layer": layer.name, "kind": layer.kind, **res})
            layer.cache.clear()
            layer.idx = None
        if seg_name != "tail":
            h_q = _run(fn, h_q)
        h_f = h_f_next
    return trace


def resolve_options(options: dict) -> dict:
    o = merge_options("easyquant", options, DEFAULTS)
    for k in ("candidates", "rounds", "tokens", "rows"):
        if not isinstance(o[k], int) or o[k] < 1:
            raise VitqError(f"--easyquant-{k} {o[k]!r} (expected a positive integer)")
    if o["search_images"] is not None and (not isinstance(o["search_images"], int) or o["search_images"] < 1):
        raise VitqError(f"--easyquant-search-images {o['search_images']!r} (expected a positive integer)")
    if not 0 < o["low"] < o["high"]:
        raise VitqError(f"--easyquant-low {o['low']} / --easyquant-high {o['high']} (expected 0 < low < high)")
    if o["fq_init"] not in ("minmax", "omse"):
        raise VitqError(f"--easyquant-fq-init {o['fq_init']!r} (expected minmax or omse)")
    return o


def _add_arguments(group) -> None:
    d = DEFAULTS
    group.add_argument("--easyquant-candidates", type=int, default=None, metavar="C",
                       help=f"easyquant: grid points in [low·Δ, high·Δ] (default {d['candidates']})")
    group.add_argument("--easyquant-rounds", type=int, default=None, metavar="R",
                       help=f"easyquant: at most R weight/input alternations per layer (default {d['rounds']})")
    group.add_argument("--easyquant-low", type=float, default=None,
                       help=f"easyquant: lower end of the grid, times Δ (default {d['low']})")
    group.add_argument("--easyquant-high", type=float, default=None,
                       help=f"easyquant: upper end of the grid, times Δ (default {d['high']})")
    group.add_argument("--easyquant-search-images", type=int, default=None, metavar="N",
                       help="easyquant: search on the first N calibration images (default: all)")
    group.add_argument("--easyquant-tokens", type=int, default=None, metavar="T",
                       help=f"easyquant: token positions cached per sample for linear layers (default {d['tokens']})")
    group.add_argument("--easyquant-rows", type=int, default=None, metavar="R",
                       help=f"easyquant: query rows cached per sample and head for the attention matmuls "
                            f"(default {d['rows']})")
    group.add_argument("--easyquant-fq-init", choices=("minmax", "omse"), default=None,
                       help="easyquant (fq): range of the quantizers that are not searched (scores, PTF) "
                            "(default omse)")


@register_method("easyquant", "EasyQuant (Wu et al.): per layer, alternating grid search of per-channel weight "
                 "and per-tensor input scales maximizing output cosine similarity, layers in order",
                 add_arguments=_add_arguments, quick_options={"candidates": 20, "rounds": 2})
def easyquant(model: nn.Module, calib: CalibData, **options) -> dict:
    o = resolve_options(options)
    scheme = getattr(model, "vitq_scheme", None)
    fq = bool(scheme is not None and scheme.fully_quantized)
    t0 = time.perf_counter()
    layers = find_layers(model)
    searched = {id(q) for la in layers for q in (la.a_quant, la.b_quant)}
    qs = quantizers_of(model)
    with observing(model, seed=calib.seed) as observers:  # float pass(es) over all calibration images
        forward_all(model, calib, desc="easyquant: observe")
        rest = {n: obs for n, obs in observers.items() if id(qs[n]) not in searched}
        if start_error_pass(model, rest, o["fq_init"]):  # OMSE of the unsearched fq quantizers sees every value
            forward_all(model, calib, desc="easyquant: observe errors")
    for n, obs in observers.items():
        apply_range(qs[n], obs, "minmax" if id(qs[n]) in searched else o["fq_init"])
    calibrate_weights(model, "minmax", correction=False)
    t1 = time.perf_counter()
    trace = _calibrate_sequential(model, calib, layers, o)
    inits = [t["init_cosine"] for t in trace]
    finals = [t["cosine"] for t in trace]
    n_images = len(calib) if o["search_images"] is None else min(o["search_images"], len(calib))
    return {"options": o, "regime": scheme.name if scheme is not None else None,
            "init": "min/max ranges (activations over all calibration images, weights per channel)",
            "not_searched": (f"scores and PTF quantizers: {o['fq_init']} (not searched)" if fq else "none"),
            "calibration_inputs": "sequential: inputs from the already-quantized earlier layers",
            "search_images": n_images, "mean_init_cosine": sum(inits) / max(len(inits), 1),
            "mean_cosine": sum(finals) / max(len(finals), 1), "search_seconds": time.perf_counter() - t1,
            "init_seconds": t1 - t0, "layers": trace}

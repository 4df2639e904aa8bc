"""Output-aware search of quantizer parameters (AdaLog's idea, Wu et al. ECCV 2024, "Fast Progressive Combining
Search"): after an observer-based calibration (repq's), every searched operation of the model is revisited and
its two input quantizers are re-chosen for the least squared error of the operation's *output*, not of the
tensors themselves.

- **Operations** (:func:`vitq.methods.layerwise.find_layers`): every weighted layer (its input quantizer and its
  per-output-channel weight quantizer; output ``x W^T + b``), and in every attention q·kᵀ (q and k quantizers;
  output the scores before softmax) and attn·V (the softmax quantizer and the v quantizer; output the heads before
  the projection). So the post-GELU quantizer (``fc2``'s input quantizer) is searched on the ``fc2`` output and
  the softmax quantizer on attn·V, as AdaLog does.
- **What is searched.** Uniform quantizers: the two ends of the range on their own (a signed symmetric grid: one
  factor). Per-channel weights choose per output channel (a channel's output error depends only on its own range
  once the input is fixed). ``adalog`` / ``adalog_shift``: the base r and the top level (the negative step and
  the shift stay); ``logsqrt2``: its top level. Other kinds are left as they are.
- **Coarse to fine.** Each step tries, around the current state (always one of the candidates): first one factor
  on both ends over 2^(-3/2) .. √2 (log: r over 1 .. 4 in steps of 1/2 times a few top levels), then each end on
  its own by 2^(k/8), k = -2..2 (log: r ± k/8), then by 2^(±1/32) (log: r ± 1/32), re-centred on the best each
  time: 9 + 25 + 9 candidates per uniform quantizer and step; a simpler form of AdaLog's progressive top-k
  refinement.
- **Order.** Per operation, the weight side (k, v) first, then the input side (AdaLog's order), for ``rounds``
  rounds (stopping early when a round changes nothing). Every step keeps the current state among its candidates,
  so the output error never rises; the start is restored in any case if the end is not below it.
- **Inputs** (``inputs``): ``quant`` (repq's default): the operands come from the model with every earlier
  operation already quantized and searched (EasyQuant's order) while the target stays the float output on float
  operands (AdaRound's "asymmetric" objective), so a layer's ranges are chosen for the inputs it will really see
  and can absorb part of the error upstream; it costs a partial pass of the segment per operation. ``float``:
  the operands are the float model's, as AdaLog and PTQ4ViT do (their calibrators keep every layer in the float
  "raw" mode until all layers are calibrated, so each layer's cached input is the float one); one float pass per
  segment serves all its operations. On tiny random-init DeiTs ``quant`` came out closer to the float logits.
- **Speed.** The first ``images`` calibration images, ``tokens`` token positions per image (the first, a ViT's class
  token, always, and random others) for a weighted
  layer and query rows per image and head for the attention matmuls (keys and values whole), cached by
  :func:`vitq.methods.layerwise.record`, one segment (stem, block, tail) at a time.

The result is an ordinary state: only scales, zero points, bases and top levels of existing quantizers change.

**Experimental: harmful on a real model as it stands.** On DeiT-Tiny matmul W4A4 (repq + adalog, 32 images,
BENCHMARKS.md section "lowbit") every one of the 74 searched operations lowered its own output error (mean 0.40 →
0.35), yet the model's agreement with float fell from 71.4 to 15.4 % (KL 0.54 → 3.98); always including the class
token gave 22.4 % (KL 3.57). The cause is not found; on tiny random-init DeiTs the search does bring the logits
closer to float. :func:`output_search` warns when it runs.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from vitq.calib import CalibData
from vitq.methods.layerwise import Layer, find_layers, image_chunks, record, run_segment, segments
from vitq.quant.base import Quantizer, passthrough
from vitq.quant.log import MAX_DEPTH, AdaLogQuantizer, AdaLogShiftQuantizer, LogSqrt2Quantizer
from vitq.quant.uniform import UniformQuantizer

log = logging.getLogger("vitq")

INPUTS = ("float", "quant")
COARSE = tuple(2.0 ** (j / 4) for j in range(-6, 3))  # one factor on both ends: 2^(-3/2) .. 2^(1/2)
FINE_RATIOS = (2.0 ** (1 / 8), 2.0 ** (1 / 32))  # then each end on its own: ratio^i, i in STEPS[stage - 1]
STEPS = ((-2, -1, 0, 1, 2), (-1, 0, 1))
R_COARSE = tuple(1.0 + 0.5 * i for i in range(7))  # adalog's r: 1 .. 4 (log2 .. base 2^(1/4))
LOG_TOPS = {"softmax": tuple(2.0 ** (-j / 4) for j in range(5)), "other": tuple(2.0 ** (j / 4) for j in range(-4, 2))}
LOG_R_STEPS = (1 / 8, 1 / 32)
MIN_R = 0.5


def knobs_of(q: nn.Module) -> tuple[str, ...]:
    """The buffers of quantizer ``q`` that the search chooses (none for kinds it leaves as they are)."""
    if type(q) is UniformQuantizer:
        return ("scale", "zero_point")
    if isinstance(q, AdaLogQuantizer):
        return ("base_exp", "scale")
    if isinstance(q, LogSqrt2Quantizer):
        return ("scale",)
    return ()


def snapshot(q: nn.Module) -> dict[str, torch.Tensor]:
    return {k: getattr(q, k).detach().clone() for k in knobs_of(q)}


def apply_state(q: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for k, v in state.items():
        getattr(q, k).copy_(v)


def _uniform_range(q: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    if q.signed:
        return -q.qmax * q.scale, q.qmax * q.scale
    return (q.qmin - q.zero_point) * q.scale, (q.qmax - q.zero_point) * q.scale


def _uniform_candidates(q: UniformQuantizer, stage: int) -> list[dict[str, torch.Tensor]]:
    """Range factors (lo, hi) around the current range: one factor on both ends (stage 0), then each end on its
    own by FINE_RATIOS[stage - 1]^i (a signed symmetric grid has one end)."""
    if stage == 0:
        pairs = [(f, f) for f in COARSE if f != 1.0]
    else:
        r, steps = FINE_RATIOS[stage - 1], STEPS[stage - 1]
        ends = [(r**i, r**i) for i in steps] if q.signed else [(r**i, r**k) for i in steps for k in steps]
        pairs = [p for p in ends if p != (1.0, 1.0)]
    lo, hi = _uniform_range(q)
    states = []
    for a, b in pairs:
        s, z = q.params_for_range(lo * a, hi * b)
        states.append({"scale": s.reshape(q.scale.shape).to(q.scale), "zero_point":
                       z.reshape(q.zero_point.shape).to(q.zero_point)})
    return states


def _log_candidates(q: Quantizer, stage: int) -> list[dict[str, torch.Tensor]]:
    """AdaLog: (r, top level) on a grid (stage 0: r over R_COARSE, tops relative to the current one), then r ± k/8
    by top levels 2^(k/8) (k = -2..2) and r ± 1/32 by 2^(±1/32). logsqrt2: the top level only."""
    top = float(q.scale)
    if isinstance(q, LogSqrt2Quantizer):
        factors = COARSE if stage == 0 else [FINE_RATIOS[stage - 1] ** i for i in STEPS[stage - 1]]
        return [{"scale": torch.full_like(q.scale, top * f)} for f in factors if f != 1.0]
    r0 = float(q.base_exp)
    if stage == 0:
        tops = LOG_TOPS["softmax" if q.role == "softmax" else "other"]
        grid = [(r, top * f) for r in sorted({*R_COARSE, r0}) for f in tops]
    else:
        dr, ratio, steps = LOG_R_STEPS[stage - 1], FINE_RATIOS[stage - 1], STEPS[stage - 1]
        grid = [(r0 + i * dr, top * ratio**k) for i in steps for k in steps if r0 + i * dr >= MIN_R]
    return [{"base_exp": torch.full_like(q.base_exp, r), "scale": torch.full_like(q.scale, s)}
            for r, s in grid if (r, s) != (r0, top)]


def candidates(q: nn.Module, stage: int) -> list[dict[str, torch.Tensor]]:
    """Candidate states of ``q`` for one stage of the coarse-to-fine search, the current state first."""
    make = _uniform_candidates if type(q) is UniformQuantizer else _log_candidates
    return [snapshot(q), *make(q, stage)]


def log_top_code(q: AdaLogQuantizer) -> int:
    """The largest log code of an adaptive-log quantizer at its current base (as the quantizer counts it)."""
    depth = int(math.floor(MAX_DEPTH * float(q.base_exp)))
    return min(2 ** (q.bits - 1) - 1 if q.signed else 2**q.bits - 2, depth)


def fast_log(q: AdaLogQuantizer, x: torch.Tensor):
    """A function that quantizes the fixed tensor ``x`` with ``q``'s current base and top level, for the many
    candidates of one step: log2 of the values and everything no candidate changes (the negative side, the shift)
    are computed once. The same rule as the quantizer's (a rounding tie may land on the other side)."""
    shift = float(q.shift) if isinstance(q, AdaLogShiftQuantizer) else 0.0
    xs = x + shift
    pos = xs > 0
    lx = torch.log2(xs.clamp_min(1e-30))
    neg = None if shift else q.fake_quant(x).masked_fill(pos, 0.0)  # the signed kind's negative side

    def quantize() -> torch.Tensor:
        r, ls = float(q.base_exp), math.log2(float(q.scale))
        code = torch.round((ls - lx) * r).clamp_min_(0.0)
        out = torch.exp2(ls - code / r) * (pos & (code <= log_top_code(q)))  # levels; 0 past the last code
        return out - shift if shift else out + neg
    return quantize


class Operation:
    """One searched operation on cached operands: side ``a`` (the input, or q, or the softmax output) and side
    ``b`` (the weight, or k, or v). ``target`` is the float output on float operands."""

    def __init__(self, layer: Layer, tag: str):
        self.layer, self.kind, m = layer, layer.kind, layer.module
        fl, cur = layer.cache["float"], layer.cache[tag]
        self.A = cur["A"]
        if self.kind == "linear":
            self.B, self.bias = None, m.bias
            w = m.weight.detach().float()
            self.W = w.reshape(w.shape[0], -1)
            self.target = self.output(fl["A"], self.W)
        else:
            self.B, self.bias = cur["B"], None
            self.target = self.output(fl["A"], fl["B"])
        self.norm = float(self.target.double().pow(2).sum()) or 1.0

    def output(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(a, b, self.bias)
        if self.kind == "qk":
            return (a @ b.transpose(-2, -1)) * float(self.layer.module.scale)
        return a @ b

    def quant(self, side: str) -> nn.Module:
        return self.layer.a_quant if side == "a" else self.layer.b_quant

    def operand(self, side: str) -> torch.Tensor:
        """The quantized operand of ``side`` with its quantizer's current state."""
        if side == "a":
            return self.layer.a_quant(self.A)
        if self.kind == "linear":
            w = self.layer.module.quantized_weight().detach().float()
            return w.reshape(w.shape[0], -1)
        return self.layer.b_quant(self.B)

    def error(self) -> float:
        """The squared output error with both quantizers' current states."""
        return float((self.output(self.operand("a"), self.operand("b")) - self.target).double().pow(2).sum())

    def _a_side(self):
        q = self.layer.a_quant
        if isinstance(q, AdaLogQuantizer):
            return fast_log(q, self.A)
        return lambda: q(self.A)

    def scorer(self, side: str):
        """A function giving the squared output error (per output channel for a weight side) at the current
        state of ``side``'s quantizer, the other side fixed. Linear layers use the cheaper of two exact forms:
        the product itself (rows x in x out per candidate) or, with the Gram matrix of the fixed side, the error
        expanded around the current operands (in x in x out, resp. rows x in x in)."""
        if self.kind != "linear":
            if side == "a":
                quant_a, b = self._a_side(), self.operand("b")
                return lambda: (self.output(quant_a(), b) - self.target).double().pow(2).sum()
            a = self.operand("a")
            return lambda: (self.output(a, self.operand("b")) - self.target).double().pow(2).sum()
        t = self.target.reshape(-1, self.target.shape[-1])
        x = self.A.reshape(-1, self.A.shape[-1])
        (n, d_in), d_out = x.shape, self.W.shape[0]
        if side == "b":
            xq = self.layer.a_quant(x)
            if d_in >= n:
                return lambda: (F.linear(xq, self.operand("b"), self.bias) - t).pow(2).sum(0).double()
            res = F.linear(xq, self.W, self.bias) - t  # error of the float weights; D = Ŵ - W adds xq Dᵀ
            gram, cross, base = xq.T @ xq, (xq.T @ res).T, res.pow(2).sum(0).double()

            def weight_error():
                d = self.operand("b") - self.W
                return ((d @ gram) * d).sum(1).double() + 2 * (d * cross).sum(1).double() + base
            return weight_error
        wq, quant_a = self.operand("b"), self._a_side()
        flat = lambda: quant_a().reshape(-1, d_in)  # noqa: E731
        if d_in >= d_out:
            return lambda: (F.linear(flat(), wq, self.bias) - t).pow(2).double().sum()
        res = F.linear(x, wq, self.bias) - t  # error with the float input; D = x̂ - x adds D Ŵᵀ
        gram, cross, base = wq.T @ wq, res @ wq, res.pow(2).double().sum()

        def input_error():
            d = flat() - x
            return ((d @ gram) * d).double().sum() + 2 * (d * cross).double().sum() + base
        return input_error

    def step(self, side: str) -> None:
        """Coarse-to-fine search of one side with the other side fixed at its current state."""
        q = self.quant(side)
        if not knobs_of(q):
            return
        per_channel = (side == "b" and self.kind == "linear" and isinstance(q, UniformQuantizer)
                       and q.channel_axis == 0)
        score = self.scorer(side)
        for stage in range(len(FINE_RATIOS) + 1):
            states = candidates(q, stage)
            errs = []
            for st in states:
                apply_state(q, st)
                e = score()
                errs.append(e if per_channel or e.dim() == 0 else e.sum())
            errs = torch.stack(errs)
            if per_channel:  # each output channel takes its own best candidate (index 0 = current on a tie)
                idx = errs.argmin(0).to(q.scale.device)
                cols = torch.arange(idx.numel(), device=idx.device)
                apply_state(q, {k: torch.stack([s[k] for s in states])[idx, cols] for k in states[0]})
            else:
                apply_state(q, states[int(errs.argmin())])

    def search(self, rounds: int) -> dict:
        quants = [self.quant("a"), self.quant("b")]
        start = [snapshot(q) for q in quants]
        before = self.error()
        err, done = before, 0
        for _ in range(rounds):
            done += 1
            prev = err
            self.step("b")
            self.step("a")
            err = self.error()
            if not err < prev:
                break
        if not err < before:  # nothing gained: the start stays exactly
            for q, st in zip(quants, start):
                apply_state(q, st)
            err = before
        return {"before": before / self.norm, "after": err / self.norm, "rounds": done,
                "searched": [self.layer.quantizer_name(_attr(self.layer, s)) for s in ("a", "b")
                             if knobs_of(self.quant(s))]}


def _attr(layer: Layer, side: str) -> str:
    return (layer.a_attr if side == "a" else layer.b_attr)[1]


@torch.no_grad()
def output_search(model: nn.Module, calib: CalibData, *, inputs: str = "quant", rounds: int = 2,
                  images: int | None = 32, tokens: int = 16) -> dict:
    """Search every operation's quantizers on its output error (see the module doc); returns what was done, the
    seconds and each operation's relative output error (squared error / squared float output) before and after."""
    if inputs not in INPUTS:
        raise ValueError(f"inputs {inputs!r} (expected one of {INPUTS})")
    log.warning("--repq-search output is experimental: on DeiT-Tiny W4A4 it lowered every layer's output error but "
                "took agreement with float from 71.4 to 15-22 percent (BENCHMARKS.md, section lowbit); check it")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(calib.seed)
    layers = find_layers(model)
    h_f = h_q = image_chunks(calib, images)
    trace = []
    for seg_name, fn, seg_layers in calib.bar(segments(model, layers, h_f[0]), "output search", None):
        with passthrough(model):
            h_f_next = record(fn, h_f, seg_layers, "float", gen, tokens=tokens, rows=tokens, stop=False, first=True)
        for layer in seg_layers:
            tag = "float"
            if inputs == "quant":
                record(fn, h_q, [layer], "quant", gen, tokens=tokens, rows=tokens, stop=True, keep_output=False,
                       first=True)
                tag = "quant"
            trace.append({"layer": layer.name, "kind": layer.kind, **Operation(layer, tag).search(rounds)})
            layer.cache.clear()
            layer.idx = None
        if inputs == "quant" and seg_name != "tail":
            h_q = run_segment(fn, h_q)
        h_f = h_f_next
    before = [t["before"] for t in trace]
    after = [t["after"] for t in trace]
    n = max(len(trace), 1)
    return {"search": "output", "search_inputs": inputs, "search_rounds": rounds,
            "search_images": sum(h.shape[0] for h in image_chunks(calib, images)), "search_tokens": tokens,
            "search_seconds": time.perf_counter() - t0, "search_operations": len(trace),
            "search_improved": sum(a < b for a, b in zip(after, before)),
            "search_mean_error_before": sum(before) / n, "search_mean_error_after": sum(after) / n,
            "search_layers": trace}

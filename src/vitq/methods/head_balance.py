"""Per-head balance of the q, k and v ranges by an exact rescaling of float weights (issue 26, item 2b).

An attention's q, k and v each have one per-tensor quantizer, though their heads' ranges differ a lot (per-head
scales, as AdaLog, APHQ-ViT or FIMA-Q use, need an export that allows them). Positive per-head factors folded
into the projections give the heads balanced ranges while the float model computes the same function, so the
result exports wherever the plain model does:

* v: head h of v (its rows of the v projection, and their bias) times ``c_h``; attn·V of head h then scales by
  ``c_h``, and the output projection's input columns of head h divided by ``c_h`` undo it. ``c_h = G / R_h``
  (``R_h``: head h's largest |v| over the calibration images, ``G`` their geometric mean, so the factors'
  product is 1) gives every head of v, and of the output projection's input, the same range.
* q/k: head h of q times ``a_h`` and of k divided by ``a_h``: every head's q·kᵀ, so every score, is unchanged.
  ``a_h = sqrt(Rk_h / Rq_h)`` gives q and k of head h the same range ``P_h = sqrt(Rq_h·Rk_h)``.

Why no further balance across heads for q/k: with per-tensor steps ``Q``, ``K`` (proportional to the largest
head range of q', k') a head's score error is ~ ``Q²·Rk'_h² + K²·Rq'_h²`` with ``Rq'_h·Rk'_h = P_h²`` fixed;
it is at least ``2·Q·K·P_h²`` (AM-GM) and ``Q·K`` is at least ``max P²``, and both bounds are met, for every head
at once, only by ``Rq'_h = Rk'_h·t`` with one ``t`` for all heads: the per-head balance above (any common
factor is absorbed by the quantizers). For v the error a head gets back through the division is
``(max_j c_j R_j)² / c_h²``, least for every head when all ``c_h R_h`` are equal: the factors above (what a
per-head quantizer would give). The price is in the output projection's weights: its per-row weight grid now
spans columns scaled by ``1 / c_h``; :func:`balance_heads` records that weight error (per-row min/max grid at the
layer's weight bits, in the original units) before and after.

Which rows belong to which head is read from the attention module (a :class:`QAttentionBase`): a fused ``qkv``
(rows [3, heads, head_dim], plus separate ``q_bias``/``k_bias``/``v_bias`` added after it, as EVA has), or
separate ``q_proj``/``k_proj``/``v_proj`` (or ``q``/``k``/``v``) projections, and ``proj`` (its input: the heads
in order). After the rewrite each module is checked on a captured input (its projection gives q·a, k/a, v·c
per head, and its softmax·V step with the output projection the same output); a module that fails is restored
and recorded as skipped, or, under ``qkv``, gets q/k only where v's step is what failed (EVA's
``scale_attn_inner``: a LayerNorm over all heads before the output projection). Skipped too: modules with q/k
norms (a norm after the projection undoes the factor) and LeViT's (its per-head [q, k, v] split inside a
projection with a folded BatchNorm, and an activation before its output projection); when no module of a model
can be rescaled, :func:`balance_heads` refuses. Rotary embeddings
(EVA) are fine: the rotation mixes channels within a head, so it commutes with a per-head factor.

Runs on a prepared, uncalibrated model (the float pass sees the quantizers as identities), after repq's
LayerNorm reparameterization (which changes qkv's input columns; this changes its output rows) and before the
quantizers are observed.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from vitq.calib import CalibData, forward_all
from vitq.errors import VitqError
from vitq.quant.base import Quantizer
from vitq.quant.modules import QAttentionBase
from vitq.quant.observers import weight_range
from vitq.quant.uniform import UniformQuantizer

MODES = ("none", "v", "qkv")
ROLES = ("q", "k", "v")
TOL = 1e-4  # relative tolerance of the exactness check (float32 round-off of a rescaled projection)


def _linear(m) -> nn.Module | None:
    w = getattr(m, "weight", None)
    return m if isinstance(m, nn.Module) and isinstance(w, torch.Tensor) and w.dim() == 2 else None


def sources(attn: nn.Module) -> dict[str, list[tuple[torch.Tensor, int, int]]] | str:
    """{role: [(tensor, first row, rows)]}: the tensors (weights and biases) whose rows [first, first + rows)
    make q, k or v (rows = heads · head_dim), or why none were found."""
    fused = _linear(getattr(attn, "qkv", None))
    if fused is not None:
        rows = fused.weight.shape[0]
        if rows % 3:
            return f"fused qkv with {rows} output rows (expected three equal parts q, k, v)"
        n = rows // 3
        out = {}
        for i, role in enumerate(ROLES):
            out[role] = [(t, i * n, n) for t in (fused.weight, fused.bias) if t is not None]
            extra = getattr(attn, f"{role}_bias", None)  # EVA: separate biases added after the projection
            if isinstance(extra, torch.Tensor):
                out[role].append((extra, 0, extra.shape[0]))
        return out
    for names in (("q_proj", "k_proj", "v_proj"), ("q", "k", "v")):
        lins = [_linear(getattr(attn, n, None)) for n in names]
        if all(lin is not None for lin in lins):
            return {role: [(t, 0, lin.weight.shape[0]) for t in (lin.weight, lin.bias) if t is not None]
                    for role, lin in zip(ROLES, lins)}
    return "no fused qkv and no separate q/k/v projections"


def _has_qk_norm(attn: nn.Module) -> bool:
    return any(isinstance(getattr(attn, f, None), nn.Module) and not isinstance(getattr(attn, f), nn.Identity)
               for f in ("q_norm", "k_norm"))


@torch.no_grad()
def head_ranges(model: nn.Module, calib: CalibData, keep: int = 2) -> tuple[dict, dict]:
    """One float pass: per attention module, each head's largest |q|, |k|, |v| where they enter their quantizers
    ({name: {role: [H]}}), and its first ``keep`` inputs ({name: tensor}) for the exactness check."""
    ranges: dict[str, dict[str, torch.Tensor]] = {}
    inputs: dict[str, torch.Tensor] = {}
    handles = []

    def on_qkv(name, role):
        def run(_mod, args):
            x = args[0].detach()
            r = x.abs().amax(dim=tuple(d for d in range(x.dim()) if d != 1)).double().cpu()
            old = ranges.setdefault(name, {}).get(role)
            ranges[name][role] = r if old is None else torch.maximum(old, r)
        return run

    def on_input(name):
        def run(_mod, args):
            if name not in inputs and args and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0].detach()[:keep].clone()
        return run

    for name, m in model.named_modules():
        if isinstance(m, QAttentionBase):
            handles.append(m.register_forward_pre_hook(on_input(name)))
            for role in ROLES:
                handles.append(getattr(m, f"{role}_quant").register_forward_pre_hook(on_qkv(name, role)))
    try:
        forward_all(model, calib, desc="head balance: per-head ranges")
    finally:
        for h in handles:
            h.remove()
    return ranges, inputs


def spread(r: torch.Tensor) -> float:
    """Largest over smallest of the nonzero per-head ranges (1: balanced)."""
    nz = r[r > 0]
    return float(nz.max() / nz.min()) if nz.numel() else 1.0


def v_factors(rv: torch.Tensor) -> torch.Tensor:
    """c_h = G / R_h (G: geometric mean of the nonzero ranges); 1 for a head that never leaves 0."""
    nz = rv > 0
    if not bool(nz.any()):
        return torch.ones_like(rv)
    g = torch.exp(torch.log(rv[nz]).mean())
    return torch.where(nz, g / rv.clamp_min(1e-300), torch.ones_like(rv))


def qk_factors(rq: torch.Tensor, rk: torch.Tensor) -> torch.Tensor:
    """a_h = sqrt(Rk_h / Rq_h) (q times a_h, k divided by it); 1 where either range is 0."""
    ok = (rq > 0) & (rk > 0)
    return torch.where(ok, (rk / rq.clamp_min(1e-300)).sqrt(), torch.ones_like(rq))


def _scale_rows(t: torch.Tensor, first: int, f: torch.Tensor) -> None:
    """Rows [first, first + len(f)) of ``t`` times ``f`` (in float64, written back in place)."""
    seg = t.data[first:first + f.numel()]
    seg.copy_((seg.double() * f.to(seg.device).view((-1,) + (1,) * (t.dim() - 1))).to(t.dtype))


def _row_error(w: torch.Tensor, bits: int, col_scale: torch.Tensor | None = None) -> float:
    """Frobenius norm of the weight error of vitq's per-row asymmetric ``bits``-bit quantizer at each row's
    min/max, columns times ``col_scale`` (back to the original units)."""
    w = w.detach().float()
    q = UniformQuantizer(bits, "weight", signed=False, channel_axis=0, num_channels=w.shape[0]).to(w.device)
    weight_range(q, w, "minmax")
    err = (q.fake_quant(w) - w).double()
    if col_scale is not None:
        err = err * col_scale.to(err)[None, :]
    return float(err.norm())


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= TOL * b.abs().max().clamp_min(1e-12))


@torch.no_grad()
def rescale(attn: QAttentionBase, src: dict, a: torch.Tensor | None, c: torch.Tensor | None,
            x: torch.Tensor) -> str | None:
    """Fold q·a, k/a (``a``: None leaves q, k) and v·c with the output projection's columns / c (``c``: None
    leaves v) into ``attn``'s float weights, checked on its input ``x``; on failure everything is restored and
    the reason returned (None: done)."""
    heads = int(attn.num_heads)
    proj = _linear(getattr(attn, "proj", None))
    touched = [t for role in ROLES for t, _, _ in src[role]] + ([proj.weight] if proj is not None else [])
    saved = [t.detach().clone() for t in touched]
    q0, k0, v0 = attn._project(x)
    scores = attn._scores(q0, k0)
    out0 = attn._softmax_v(scores, v0)
    factors = {"q": a, "k": None if a is None else 1.0 / a, "v": c}
    for role, f in factors.items():
        if f is None:
            continue
        for t, first, rows in src[role]:
            _scale_rows(t, first, f.repeat_interleave(rows // heads))
    if c is not None:
        dv = proj.weight.shape[1] // heads
        proj.weight.data.copy_((proj.weight.double() / c.repeat_interleave(dv).to(proj.weight.device)[None, :])
                               .to(proj.weight.dtype))
    q1, k1, v1 = attn._project(x)
    shape = (1, heads, 1, 1)
    ok = (a is None or (_close(q1, q0 * a.view(shape).to(q0)) and _close(k1, k0 / a.view(shape).to(k0))))
    ok = ok and (c is None or (_close(v1, v0 * c.view(shape).to(v0)) and _close(attn._softmax_v(scores, v1), out0)))
    if ok:
        return None
    for t, s in zip(touched, saved):
        t.data.copy_(s)
    return "the rescaling is not exact for this module's layout (checked on a calibration input)"


def _layer_plan(attn: nn.Module, src, rng: dict, mode: str) -> tuple[dict, str | None]:
    """The factors for one module: {"a": ..., "c": ...} (None where a role is left), or why it is skipped."""
    heads = int(attn.num_heads)
    if isinstance(src, str):
        return {}, src
    if any(r not in rng or rng[r].numel() != heads for r in ROLES):
        return {}, "q/k/v quantizers not reached by the float pass (or not [batch, heads, tokens, dim])"
    rows = {rows for role in ROLES for _, _, rows in src[role]}
    if any(n % heads for n in rows):
        return {}, f"projection rows {sorted(rows)} not divisible by {heads} heads"
    plan: dict = {"a": None, "c": None}
    proj = _linear(getattr(attn, "proj", None))
    if proj is None or proj.weight.shape[1] != src["v"][0][2]:
        return {}, "no output projection taking the heads' attn·V as its input columns"
    plan["c"] = v_factors(rng["v"])
    if mode == "qkv":
        if _has_qk_norm(attn):
            return {}, "q/k norm after the projection"
        plan["a"] = qk_factors(rng["q"], rng["k"])
    return plan, None


def balance_heads(model: nn.Module, calib: CalibData, mode: str) -> dict:
    """Balance every attention module's per-head ranges (``mode``: ``v`` or ``qkv``, see the module), in place.
    Returns what was done for results.json: per balanced module the ranges' spread (largest / smallest head)
    before and after, the factors' extremes and the output projection's weight error ratio (after / before);
    the skipped modules with why; seconds."""
    if mode not in MODES:
        raise VitqError(f"head balance {mode!r} (expected one of {MODES})")
    if mode == "none":
        return {"head_balance": "none"}
    t0 = time.perf_counter()
    attns = {n: m for n, m in model.named_modules() if isinstance(m, QAttentionBase)}
    if not attns:
        raise VitqError(f"head balance: {type(model).__name__} has no quantized attention modules (expected a "
                        "prepared transformer, e.g. timm ViT/DeiT/Swin, EVA, CaiT or a Hugging Face ViT)")
    done = [n for n, m in attns.items() for q in m.modules() if isinstance(q, Quantizer) and bool(q.initialized)]
    if done:
        raise VitqError(f"head balance rewrites float weights before calibration, but {done[0]} already has "
                        "calibrated quantizers (prepare the model afresh)")
    ranges, inputs = head_ranges(model, calib)
    layers, skipped = {}, {}
    for name, attn in attns.items():
        src = sources(attn)
        plan, why = _layer_plan(attn, src, ranges.get(name, {}), mode)
        if why is None:
            why = rescale(attn, src, plan["a"], plan["c"], inputs[name])
            if why is not None and plan["a"] is not None:  # q/k alone (an inner norm before proj breaks v's)
                partial = rescale(attn, src, plan["a"], None, inputs[name])
                plan["c"], why, skipped[f"{name} (v)"] = None, partial, why
        if why is not None:
            skipped[name] = why
            continue
        rng, c, a = ranges[name], plan["c"], plan["a"]
        rec = {"v_spread": spread(rng["v"])}
        if c is not None:
            proj = _linear(attn.proj)
            cols = c.repeat_interleave(proj.weight.shape[1] // int(attn.num_heads))
            bits = getattr(getattr(proj, "weight_quant", None), "bits", 8)
            w_before = _row_error(proj.weight.detach().double() * cols.to(proj.weight.device)[None, :], bits)
            rec.update({"v_spread_after": spread(rng["v"] * c), "v_factor_min": float(c.min()),
                        "v_factor_max": float(c.max()),
                        "proj_weight_error_ratio": _row_error(proj.weight, bits, cols) / max(w_before, 1e-30)})
        if a is not None:
            rec.update({"q_spread": spread(rng["q"]), "k_spread": spread(rng["k"]),
                        "qk_spread_after": spread(rng["q"] * a), "qk_factor_min": float(a.min()),
                        "qk_factor_max": float(a.max())})
        layers[name] = rec
    if not layers:
        reasons = "; ".join(f"{n}: {w}" for n, w in list(skipped.items())[:3])
        raise VitqError(f"head balance {mode!r}: no attention module of {type(model).__name__} could be rescaled "
                        f"exactly ({reasons}); use --repq-head-balance none")
    ratios = [r["proj_weight_error_ratio"] for r in layers.values() if "proj_weight_error_ratio" in r]
    return {"head_balance": mode, "head_balance_layers": len(layers), "head_balance_skipped": skipped,
            "head_balance_factors": layers,
            "head_balance_v_spread_max": max(r["v_spread"] for r in layers.values()),
            "head_balance_proj_weight_error_ratio_mean": sum(ratios) / len(ratios) if ratios else None,
            "seconds_head_balance": time.perf_counter() - t0}

"""Closed-form compensation of the activation quantization error (ERQ's idea, issue 26): for every quantized
linear layer, the weight that best maps the *quantized* input to the float layer's output, by ridge regression.

For a layer with weight ``W`` whose float input rows are ``X`` and quantized input rows are ``X̂`` (same tokens),

    W' = argmin ||X̂ W'ᵀ − X Wᵀ||² + λ ||W' − W||²  =  (W Xᵀ X̂ + λ W) (X̂ᵀ X̂ + λ I)⁻¹

with ``λ = damp × mean diag(X̂ᵀ X̂)``. ``W'`` replaces the layer's weight (its weight quantizer, scales unchanged,
rounds it as before). Piece by piece (:mod:`vitq.refine.recon_pieces`: stem, trunk units, tail): ``X`` comes
from the quantized model with every quantizer bypassed (the same function as the float model, reparameterization
included) on the float input of the piece, ``X̂`` from the quantized model on its own input; all layers of a
piece are solved from one pair of passes. A piece whose output error (MSE against the float piece, all
calibration images) grows is restored. Seconds, no gradients; convolutions are left as they are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from vitq.calib import CalibData
from vitq.options import Options, opt
from vitq.quant.base import passthrough
from vitq.quant.modules import QLinear
from vitq.refine.recon_pieces import Cache, piece_state, pieces_of, restore_piece
from vitq.registry import register_refiner


@dataclass(frozen=True)
class RidgeOptions(Options):
    damp: float = opt(0.01, "ridge weight λ relative to the mean diagonal of X̂ᵀX̂ (keeps W' near W)", above=0.0,
                      metavar="D")


def _capture(layers: list[tuple[str, QLinear]], store: dict[str, torch.Tensor]):
    """Forward hooks on each layer's input quantizer keeping its output (the layer's input as it computes)."""
    def hook(name):
        def fn(_mod, _inputs, out):
            store[name] = out.detach().reshape(-1, out.shape[-1]).double()
        return fn
    return [m.input_quant.register_forward_hook(hook(n)) for n, m in layers]


@torch.no_grad()
def _solve(w: torch.Tensor, a: torch.Tensor, c: torch.Tensor, damp: float) -> torch.Tensor:
    lam = damp * float(torch.diagonal(a).mean().clamp_min(1e-12))
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    w = w.double()
    return torch.linalg.solve((a + lam * eye).T, (w @ c + lam * w).T).T


@register_refiner("ridge", "closed-form compensation of the activation quantization error (ERQ): each linear's "
                  "weight refit by ridge regression from its quantized input to the float output", config=RidgeOptions)
def ridge(model: nn.Module, float_model: nn.Module, calib: CalibData, cfg: RidgeOptions) -> dict:
    t0 = time.perf_counter()
    model.eval()
    float_model.eval()
    cache = Cache(calib)
    trace = []
    with torch.no_grad():
        for p in pieces_of(model, float_model):
            targets = cache.targets(p)
            layers = [(n, m) for n, m in p.weighted if isinstance(m, QLinear)]
            entry = {"piece": p.name, "layers": len(layers)}
            if layers:
                before = cache.error(p, targets)
                start = piece_state(p)
                acc = {n: [0.0, 0.0] for n, _ in layers}
                xf, xq = {}, {}
                for hf, hq in zip(cache.f, cache.q, strict=True):
                    handles = _capture(layers, xf)
                    try:
                        with passthrough(p.root):
                            p.quant(hf)
                    finally:
                        for h in handles:
                            h.remove()
                    handles = _capture(layers, xq)
                    try:
                        p.quant(hq)
                    finally:
                        for h in handles:
                            h.remove()
                    for n, _ in layers:
                        acc[n][0] = acc[n][0] + xq[n].T @ xq[n]
                        acc[n][1] = acc[n][1] + xf[n].T @ xq[n]
                for n, m in layers:
                    m.weight.copy_(_solve(m.weight, acc[n][0], acc[n][1], cfg.damp).to(m.weight.dtype))
                after = cache.error(p, targets)
                kept = not after <= before
                if kept:
                    restore_piece(p, start)
                entry.update({"mse_before": before, "mse_learned": after, "kept_start": kept,
                              "mse_after": before if kept else after})
            trace.append(entry)
            cache.advance(p, targets)
    return {"config": cfg.to_dict(), "trace": trace, "pieces_kept_start": [e["piece"] for e in trace
                                                                           if e.get("kept_start")],
            "ridge_seconds": time.perf_counter() - t0}

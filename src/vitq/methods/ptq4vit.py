"""PTQ4ViT (METHODS.md §2): twin-uniform softmax and post-GELU quantizers, and per layer an alternating grid
search of weight and input scales minimising the Hessian-guided distance of the layer's output.

Choices (each recorded in the returned dict, i.e. results.json):

- regime: ``matmul`` (``adjust_scheme`` refuses ``fq``); the softmax quantizer is ``twin`` unless the scheme
  names another kind (any kind works: uniform, log2, twin, mpq);
- the input of each MLP's fc2 (after GELU) gets a ``twin_gelu`` quantizer (swapped into the prepared model;
  ``twin_gelu=False`` keeps the uniform one);
- initial Δ: min/max of the float activations over the calibration images and of each weight channel;
- grid: ``candidates`` factors of Δ spread over [αΔ, βΔ], α=0, β=1.2, 100 candidates; α=0 means the grid
  starts at β/candidates (a zero scale is degenerate). Weight scales are searched per output channel (the
  diagonal-weighted distance splits over output channels, so every channel picks its own factor at no extra
  cost); input scales per tensor. Twin softmax: small range tops 2^-k, k = 0..twin_max_shift (PTQ4ViT ties
  the two scales by a power of two). MPQ (if chosen): thresholds 2^(-i/2), i = 1..mpq_candidates;
- alternation: weight then input (for attention: q then k on q·kᵀ, softmax then v on softmax·V), ``rounds``
  rounds (3), stopping early when a round changes nothing;
- distance: E[(O-Ô)ᵀ diag((∂L/∂O)²)(O-Ô)], gradients of the task loss on the float model; the task loss on
  unlabelled images is the cross-entropy against the float model's own top-1 prediction (KL to its own
  output has zero gradient there);
- inputs of every search are float ("parallel"): earlier layers are not quantized while a layer is searched;
- calibration images: the first ``num_calib`` (32) of the given ones; ``token_fraction`` < 1 subsamples token
  rows of linear inputs and query rows of attention maps (a speed option, default 1 = all rows).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from torch import nn

from vitq.calib import CalibData
from vitq.methods.baselines import calibrate_observed
from vitq.methods.hessian import Grids, attention_modules, capture, layerwise_search, linear_grid, swap_gelu_quantizers
from vitq.options import OptionError, Options, opt
from vitq.quant.base import make_quantizer
from vitq.registry import register_method


@dataclass(frozen=True)
class Ptq4vitOptions(Options):
    """PTQ4ViT's options (APQ's extend them: :class:`vitq.methods.apq.ApqOptions`)."""

    num_calib: int = opt(32, "use the first N calibration images", minimum=1, metavar="N")
    candidates: int = opt(100, "grid points in [alpha*D, beta*D]", minimum=1, metavar="C")
    rounds: int = opt(3, "weight/input alternation rounds", minimum=1)
    alpha: float = opt(0.0, "grid start as a fraction of the min/max scale (0 = beta/C)", minimum=0.0)
    beta: float = opt(1.2, "grid end as a fraction of the min/max scale", above=0.0)
    twin_gelu: bool = opt(True, "twin-uniform quantizer on each fc2 input after GELU (off: keep the uniform one)")
    twin_max_shift: int = opt(12, "twin softmax: small range tops 2^-k for k = 0..this", minimum=0)
    mpq_candidates: int = opt(16, "MPQ softmax thresholds 2^(-i/2), i = 1..this", minimum=1)
    token_fraction: float = opt(1.0, "fraction of token rows used by the searches (1 = all)", above=0.0,
                                maximum=1.0)
    grad_batch: int = opt(8, "images per batch of the float pass with gradients", minimum=1)

    def check(self) -> None:
        if not self.alpha < self.beta:
            raise OptionError("alpha", self.alpha, f"0 <= alpha < beta = {self.beta:g}")


def grids_from(cfg: Ptq4vitOptions) -> Grids:
    return Grids(linear_grid(cfg.alpha, cfg.beta, cfg.candidates), list(range(cfg.twin_max_shift + 1)),
                 [2.0 ** (-i / 2) for i in range(1, cfg.mpq_candidates + 1)])


def ensure_softmax_kind(model: nn.Module, kind: str) -> str:
    """If the model was prepared without naming a softmax quantizer (scheme default), give its attentions
    ``kind`` (what ``adjust_scheme`` would have done); a kind the scheme names is kept. Returns the kind used."""
    scheme = getattr(model, "vitq_scheme", None)
    attns = attention_modules(model)
    if scheme is not None and scheme.softmax_quantizer is None:
        for a in attns.values():
            old = a.softmax_quant
            if old.kind != kind:
                a.softmax_quant = make_quantizer(kind, old.bits, old.role).to(next(model.parameters()).device)
    kinds = sorted({a.softmax_quant.kind for a in attns.values()})
    return ",".join(kinds)


def setup(model: nn.Module, calib: CalibData, cfg: Ptq4vitOptions, softmax_kind: str,
          blocks: list[str] | None = None):
    """Shared first steps of ptq4vit and apq: take the first num_calib images, swap in the twin-GELU and
    softmax quantizers, set every quantizer from min/max, and run the float pass with gradients."""
    images = calib.images[:cfg.num_calib]
    sub = CalibData(images, batch_size=calib.batch_size, device=calib.device, progress=calib.progress,
                    seed=calib.seed)
    info = {"num_calib_given": len(calib), "num_calib_used": len(sub),
            "calib_images_used": f"the first {len(sub)} of the given calibration images"}
    info["softmax_quantizer"] = ensure_softmax_kind(model, softmax_kind)
    info["twin_gelu_swapped"] = len(swap_gelu_quantizers(model)) if cfg.twin_gelu else 0
    model.to(calib.device)
    t0 = time.perf_counter()
    calibrate_observed(model, sub, "minmax", "minmax")
    cap = capture(model, images, calib.device, batch_size=cfg.grad_batch, token_fraction=cfg.token_fraction,
                  blocks=blocks, seed=calib.seed, bar=calib.bar)
    info["seconds_init_and_float_pass"] = time.perf_counter() - t0
    scheme = getattr(model, "vitq_scheme", None)
    info["regime"] = scheme.name if scheme is not None else "unknown"
    return sub, cap, info


def run_ptq4vit(model: nn.Module, calib: CalibData, cfg: Ptq4vitOptions, softmax_kind: str) -> dict:
    _, cap, info = setup(model, calib, cfg, softmax_kind)
    t0 = time.perf_counter()
    trace = layerwise_search(model, cap, grids_from(cfg), cfg.rounds, calib.device, bar=calib.bar)
    info["seconds_layerwise_search"] = time.perf_counter() - t0
    info["layerwise"] = trace
    return info


def _ptq4vit_scheme(scheme, cfg: Ptq4vitOptions):
    if scheme.softmax_quantizer is None:
        return dataclasses.replace(scheme, softmax_quantizer="twin")
    return scheme


@register_method("ptq4vit", "PTQ4ViT (matmul): twin-uniform softmax/GELU quantizers, per-layer alternating "
                 "weight/input grid search on the Hessian-guided distance, 32 images",
                 config=Ptq4vitOptions, adjust_scheme=_ptq4vit_scheme, regimes=("matmul",),
                 quick_options={"candidates": 10, "rounds": 2, "num_calib": 16},
                 expected_time="DeiT-Tiny, 32 images: 66-81 s on 2 CPU cores with 16 candidates, 2 rounds, 0.2 of "
                               "the token rows (BENCHMARKS.md apq); at the defaults (100 candidates, all rows) "
                               "tens of minutes (not measured); GPU not measured")
def ptq4vit(model: nn.Module, calib: CalibData, cfg: Ptq4vitOptions) -> dict:
    info = {"effective_options": cfg.to_dict(), "inputs": "float (parallel)",
            "task_loss": "cross-entropy against the float model's own top-1 prediction",
            "weight_search": "per output channel", "input_search": "per tensor"}
    info.update(run_ptq4vit(model, calib, cfg, "twin"))
    return info

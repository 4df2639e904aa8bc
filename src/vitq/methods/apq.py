"""APQ-ViT (METHODS.md §4): Bottom-elimination Blockwise Calibration (BBC) and the Matthew-effect Preserving
Quantizer (MPQ) for softmax outputs, on a PTQ4ViT base.

The paper's full text was not available; this is the interpretation of METHODS.md §4, every choice an
option, and all of them recorded in the returned dict (results.json):

1. Base (PTQ4ViT-style, ``vitq.methods.ptq4vit``): min/max init, twin-GELU quantizer on each fc2 input, then
   the per-layer alternating grid search on the Hessian-guided distance of each op's own output (float
   inputs, gradients of the task loss = cross-entropy against the float model's own top-1 prediction).
   With ``bbc=False`` this is all that runs (the "plain per-layer Hessian metric" ablation).
2. BBC (``bbc=True``): block by block in order, every quantizer of the block (qkv, q, k, softmax, v, proj,
   fc1, fc2: weights and inputs) is searched again, one at a time with the others fixed, against the
   error of the **block output**: e = (∂L/∂O_block)² ⊙ (O_block - Ô_block)² per element, sorted, the smallest
   ``1 - keep_fraction`` dropped (bottom elimination, default keep 50 %), the rest summed.
   - Ô_block: the quantized block on the inputs of the already-calibrated quantized model
     (``bbc_inputs="quantized"``, via ``vitq.models.trunk.Trunk``) or on the float inputs (``"float"``);
   - target O_block (``bbc_target``): ``"same_input"`` (default since issue 15) = the float block on the *same*
     input as the quantized block, so the metric measures only the error this block's quantizers add;
     ``"float"`` (the first reading) = the float block on float inputs, so the metric also contains all the
     upstream error, which the block's quantizers cannot remove and end up fitting (a scale that happens to
     cancel part of that error on 32 images) -- with it BBC lost to its own base on held-out images;
   - guard (``bbc_guard``, default on): after a block's search, its whole squared-gradient-weighted error
     (every token row, nothing eliminated) is compared with the one before; if it got worse, the block's
     quantizers go back to the base's values (recorded per block). The sampled rows and the bottom
     elimination make the search metric a noisy proxy; the guard keeps BBC from ever ending worse than its
     base on the block's own full metric;
   - candidates: ``bbc_candidates`` factors over [bbc_alpha, bbc_beta] (0.8..1.2, 9 points, 1.0 included so
     the block metric never gets worse) of the base's scales; weights move by one factor per layer (the
     block metric does not split over output channels), keeping the base's per-channel pattern; MPQ
     thresholds and twin-softmax shifts are searched over their full grids;
   - ``bbc_rounds`` passes over the block's quantizers (default 1); ``bbc_token_fraction`` (default:
     ``token_fraction``) < 1 evaluates the block output at a random subset of query tokens (keys/values always
     use all tokens);
   - the patch embedding and the head are not in any block and keep the base result.
   BBC itself is :mod:`vitq.methods.bbc` (blocks found through ``QTransformerBlock``; a sequential one is
   split into reusable pieces, any other searched whole on all rows).
3. MPQ (``mpq=True``): the softmax quantizer kind ``mpq`` (split code space: one bit picks the region, [t, 1]
   uniform, [0, t) log2), t searched per layer: first on the per-layer metric (base), then with the BBC
   metric. ``mpq=False`` uses ``softmax`` (default ``twin``; ``uniform`` or ``log2`` possible) instead.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from torch import nn

from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.methods.bbc import bbc_blocks, bbc_search
from vitq.methods.hessian import Grids, layerwise_search, linear_grid
from vitq.methods.ptq4vit import Ptq4vitOptions, grids_from, setup
from vitq.options import OptionError, opt
from vitq.registry import register_method

SOFTMAX_KINDS = ("twin", "uniform", "log2", "mpq")


@dataclass(frozen=True)
class ApqOptions(Ptq4vitOptions):
    """PTQ4ViT's options (the base search) and BBC's and MPQ's."""

    bbc: bool = opt(True, "bottom-elimination blockwise calibration (off: the plain per-layer Hessian metric)")
    mpq: bool = opt(True, "MPQ softmax quantizer (off: --apq-softmax)")
    softmax: str = opt("twin", "softmax quantizer when MPQ is off", choices=SOFTMAX_KINDS)
    keep_fraction: float = opt(0.5, "fraction of the largest weighted block-output errors kept", metavar="F")
    bbc_candidates: int = opt(9, "BBC factors over [bbc_alpha, bbc_beta] of the base scales", minimum=1)
    bbc_alpha: float = opt(0.8, "BBC grid start", above=0.0)
    bbc_beta: float = opt(1.2, "BBC grid end", above=0.0)
    bbc_rounds: int = opt(1, "BBC passes over each block's quantizers", minimum=1)
    bbc_inputs: str = opt("quantized", "block inputs for BBC: from the calibrated earlier blocks (quantized) or "
                          "float", choices=("quantized", "float"))
    bbc_target: str = opt("same_input", "BBC target: the float block on the same input as the quantized block "
                          "(same_input) or on float inputs (float, the old reading)", choices=("same_input", "float"))
    bbc_token_fraction: float | None = opt(None, "fraction of query-token rows in the BBC block metric (default: "
                                           "--apq-token-fraction)", above=0.0, maximum=1.0)
    bbc_guard: bool = opt(True, "undo a block's BBC result when its whole (all rows, nothing eliminated) "
                          "weighted error got worse")

    def check(self) -> None:
        super().check()
        if not 0.0 < self.keep_fraction <= 1.0:
            raise OptionError("keep_fraction", self.keep_fraction, "0 < keep_fraction <= 1")
        if not self.bbc_alpha <= self.bbc_beta:
            raise OptionError("bbc_alpha", self.bbc_alpha, f"0 < bbc_alpha <= bbc_beta = {self.bbc_beta:g}")


def _softmax_kind(cfg: ApqOptions) -> str:
    return "mpq" if cfg.mpq else cfg.softmax


def _apq_scheme(scheme, cfg: ApqOptions):
    if scheme.softmax_quantizer is None:
        return dataclasses.replace(scheme, softmax_quantizer=_softmax_kind(cfg))
    if not cfg.mpq and scheme.softmax_quantizer == "mpq":
        raise VitqError("apq: mpq=False contradicts the scheme's softmax quantizer 'mpq'")
    return scheme


@register_method("apq", "APQ-ViT (matmul): PTQ4ViT base, bottom-elimination blockwise calibration on the "
                 "squared-gradient-weighted block-output error, MPQ softmax quantizer",
                 config=ApqOptions, adjust_scheme=_apq_scheme, regimes=("matmul",),
                 quick_options={"candidates": 10, "rounds": 2, "bbc_candidates": 3, "num_calib": 16},
                 expected_time="DeiT-Tiny, 32 images: 129-177 s on 2 CPU cores with 16 candidates, 2 rounds, 0.2 "
                               "of the token rows, 5 BBC candidates (BENCHMARKS.md apq); at the defaults tens of "
                               "minutes (not measured); GPU not measured")
def apq(model: nn.Module, calib: CalibData, cfg: ApqOptions) -> dict:
    info = {"effective_options": cfg.to_dict(),
            "interpretation": "METHODS.md §4 (paper text unavailable); see vitq.methods.apq",
            "base": "PTQ4ViT per-layer search, float (parallel) inputs, weights per channel, inputs per tensor",
            "task_loss": "cross-entropy against the float model's own top-1 prediction",
            "bbc": (f"block-output error weighted by squared gradients, keep the largest {cfg.keep_fraction:g}, "
                    f"inputs {cfg.bbc_inputs}, target {cfg.bbc_target}, guard {'on' if cfg.bbc_guard else 'off'}, "
                    "weights one factor per layer") if cfg.bbc else "off",
            "mpq": "split code space: [t,1] uniform, [0,t) log2, t per layer" if cfg.mpq else "off"}
    blocks = bbc_blocks(model) if cfg.bbc else None
    sub, cap, setup_info = setup(model, calib, cfg, _softmax_kind(cfg), blocks=blocks)
    info.update(setup_info)
    grids = grids_from(cfg)
    t0 = time.perf_counter()
    info["layerwise"] = layerwise_search(model, cap, grids, cfg.rounds, calib.device, bar=calib.bar)
    info["seconds_layerwise_search"] = time.perf_counter() - t0
    if cfg.bbc:
        bgrids = Grids(linear_grid(cfg.bbc_alpha, cfg.bbc_beta, cfg.bbc_candidates), grids.twin_shifts,
                       grids.mpq_thresholds)
        t0 = time.perf_counter()
        info["bbc_blocks"] = bbc_search(model, cap, sub.images, bgrids, cfg, calib.device, calib.seed, bar=calib.bar)
        info["seconds_bbc"] = time.perf_counter() - t0
    return info

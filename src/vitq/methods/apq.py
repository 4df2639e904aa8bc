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
3. MPQ (``mpq=True``): the softmax quantizer kind ``mpq`` (split code space: one bit picks the region, [t, 1]
   uniform, [0, t) log2), t searched per layer: first on the per-layer metric (base), then with the BBC
   metric. ``mpq=False`` uses ``softmax`` (default ``twin``; ``uniform`` or ``log2`` possible) instead.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.methods.hessian import (
    BlockPieces,
    Grids,
    bbc_distance,
    block_knob_stages,
    float_mode,
    layerwise_search,
    linear_grid,
    search_knobs,
)
from vitq.methods.ptq4vit import PTQ4VIT_DEFAULTS, check_options, grids_from, require_matmul, setup
from vitq.models.timm_vit import QBlock
from vitq.models.trunk import Trunk
from vitq.registry import register_method

APQ_DEFAULTS = {**PTQ4VIT_DEFAULTS, "bbc": True, "mpq": True, "softmax": "twin", "keep_fraction": 0.5,
                "bbc_candidates": 9, "bbc_alpha": 0.8, "bbc_beta": 1.2, "bbc_rounds": 1, "bbc_inputs": "quantized",
                "bbc_target": "same_input", "bbc_token_fraction": None, "bbc_guard": True}
SOFTMAX_KINDS = ("twin", "uniform", "log2", "mpq")


def _check_apq(o: dict) -> None:
    if not 0.0 < float(o["keep_fraction"]) <= 1.0:
        raise VitqError(f"method apq: keep_fraction={o['keep_fraction']} (expected 0 < f <= 1)")
    if o["bbc_inputs"] not in ("quantized", "float"):
        raise VitqError(f"method apq: bbc_inputs={o['bbc_inputs']!r} (expected 'quantized' or 'float')")
    if o["bbc_target"] not in ("same_input", "float"):
        raise VitqError(f"method apq: bbc_target={o['bbc_target']!r} (expected 'same_input' or 'float')")
    f = o["bbc_token_fraction"]
    if f is not None and not 0.0 < float(f) <= 1.0:
        raise VitqError(f"method apq: bbc_token_fraction={f} (expected 0 < f <= 1, or None = token_fraction)")
    if o["softmax"] not in SOFTMAX_KINDS:
        raise VitqError(f"method apq: softmax={o['softmax']!r} (expected one of {', '.join(SOFTMAX_KINDS)})")
    if not 0.0 < float(o["bbc_alpha"]) <= float(o["bbc_beta"]):
        raise VitqError(f"method apq: bbc_alpha={o['bbc_alpha']}, bbc_beta={o['bbc_beta']} "
                        "(expected 0 < bbc_alpha <= bbc_beta)")


def _softmax_kind(o: dict) -> str:
    return "mpq" if o["mpq"] else o["softmax"]


@torch.no_grad()
def _bbc_block(block: nn.Module, name: str, x: torch.Tensor, target: torch.Tensor, g2: torch.Tensor,
               grids: Grids, o: dict, gen: torch.Generator) -> dict:
    keep = float(o["keep_fraction"])
    stages = block_knob_stages(block, name, grids)
    knobs = [kb for s in stages for kb in s]
    start = [kb.snapshot() for kb in knobs]

    def whole() -> float:  # the guard's metric: every token row, every element, nothing eliminated
        return float(bbc_distance(target, block(x), g2, 1.0))

    whole_before = whole() if o["bbc_guard"] else None
    if isinstance(block, QBlock):
        pieces = BlockPieces(block)
        n = x.shape[1]
        frac = o["bbc_token_fraction"] if o["bbc_token_fraction"] is not None else o["token_fraction"]
        k = max(1, int(round(float(frac) * n)))
        idx = torch.randperm(n, generator=gen)[:k].sort().values.to(x.device)
        t, w = target[:, idx], g2[:, idx]

        def metric(oh):
            return bbc_distance(t, oh, w, keep)

        before = float(metric(pieces.full(x, idx)))
        for _ in range(o["bbc_rounds"]):
            search_knobs(stages[0], lambda: pieces.full(x, idx), metric, 1)
            qkv = pieces.qkv(x)
            search_knobs(stages[1], lambda qkv=qkv: pieces.mlp(pieces.project(x, pieces.attend(qkv, idx), idx)),
                         metric, 1)
            att = pieces.attend(qkv, idx)
            search_knobs(stages[2], lambda att=att: pieces.mlp(pieces.project(x, att, idx)), metric, 1)
            y = pieces.project(x, att, idx)
            search_knobs(stages[3], lambda y=y: pieces.mlp(y), metric, 1)
        after = float(metric(pieces.full(x, idx)))
        rows = f"{k} of {n} query tokens"
    else:  # e.g. a Swin block: whole block, all rows

        def metric(oh):
            return bbc_distance(target, oh, g2, keep)

        before = float(metric(block(x)))
        for _ in range(o["bbc_rounds"]):
            search_knobs(knobs, lambda: block(x), metric, 1)
        after = float(metric(block(x)))
        rows = "all tokens"
    out = {"bbc_distance_ratio": after / before if before > 0 else 1.0, "rows": rows}
    if o["bbc_guard"]:
        whole_after = whole()
        kept = whole_after <= whole_before
        if not kept:  # the eliminated/sampled metric improved but the block's whole error got worse: undo
            for kb, st in zip(knobs, start, strict=True):
                kb.apply_state(st)
        out["guard"] = {"whole_error_ratio": whole_after / whole_before if whole_before > 0 else 1.0,
                        "kept": kept}
    out["choices"] = {kb.name[len(name) + 1:]: kb.describe() for kb in knobs}
    return out


@torch.no_grad()
def bbc_search(model: nn.Module, cap, images: torch.Tensor, grids: Grids, o: dict, device, seed: int,
               bar=lambda it, **kw: it) -> dict:
    """BBC over every transformer block in order (see the module docstring)."""
    trunk = Trunk(model)
    blocks = {i: (n, b) for i, n, b in trunk.blocks()}
    gen = torch.Generator().manual_seed(seed + 1)
    quantized_inputs = o["bbc_inputs"] == "quantized"
    h = trunk.stem(images.to(device)) if quantized_inputs else None
    trace = {}
    for i, (uname, unit) in enumerate(bar(trunk.units, desc="BBC blocks", total=len(trunk.units))):
        if i in blocks:
            d = cap.blocks[uname]
            x = h if quantized_inputs else d["x"].to(device)
            if quantized_inputs and o["bbc_target"] == "same_input":
                with float_mode(unit):  # the float block on the same (quantized) input: only this block's error
                    target = unit(x)
            else:
                target = d["o"].to(device)
            trace[uname] = _bbc_block(unit, uname, x, target, d["g2"].to(device), grids, o, gen)
        if quantized_inputs:
            h = unit(h)
    return trace


def _apq_args(group) -> None:
    group.add_argument("--apq-no-bbc", dest="apq_bbc", action="store_const", const=False, default=None,
                       help="apq: skip bottom-elimination blockwise calibration (plain per-layer Hessian metric)")
    group.add_argument("--apq-no-mpq", dest="apq_mpq", action="store_const", const=False, default=None,
                       help="apq: use --apq-softmax instead of the MPQ softmax quantizer")
    group.add_argument("--apq-softmax", dest="apq_softmax", choices=SOFTMAX_KINDS, default=None,
                       help="apq: softmax quantizer when MPQ is off (default twin)")
    group.add_argument("--apq-keep-fraction", dest="apq_keep_fraction", type=float, default=None, metavar="F",
                       help="apq: fraction of the largest weighted block-output errors kept (default 0.5)")
    group.add_argument("--apq-num-calib", dest="apq_num_calib", type=int, default=None, metavar="N",
                       help="apq: use the first N calibration images (default 32)")
    group.add_argument("--apq-candidates", dest="apq_candidates", type=int, default=None, metavar="C",
                       help="apq: base per-layer grid points in [alpha*D, beta*D] (default 100)")
    group.add_argument("--apq-rounds", dest="apq_rounds", type=int, default=None,
                       help="apq: base per-layer alternation rounds (default 3)")
    group.add_argument("--apq-bbc-candidates", dest="apq_bbc_candidates", type=int, default=None,
                       help="apq: BBC factors over [bbc_alpha, bbc_beta] of the base scales (default 9)")
    group.add_argument("--apq-bbc-alpha", dest="apq_bbc_alpha", type=float, default=None,
                       help="apq: BBC grid start (default 0.8)")
    group.add_argument("--apq-bbc-beta", dest="apq_bbc_beta", type=float, default=None,
                       help="apq: BBC grid end (default 1.2)")
    group.add_argument("--apq-bbc-rounds", dest="apq_bbc_rounds", type=int, default=None,
                       help="apq: BBC passes over each block's quantizers (default 1)")
    group.add_argument("--apq-bbc-inputs", dest="apq_bbc_inputs", choices=("quantized", "float"), default=None,
                       help="apq: block inputs for BBC (default quantized: from the calibrated earlier blocks)")
    group.add_argument("--apq-bbc-target", dest="apq_bbc_target", choices=("same_input", "float"), default=None,
                       help="apq: BBC target = the float block on the same input as the quantized block "
                            "(same_input, default) or the float block on float inputs (float, the old reading)")
    group.add_argument("--apq-bbc-token-fraction", dest="apq_bbc_token_fraction", type=float, default=None,
                       help="apq: fraction of query-token rows in the BBC block metric (default: "
                            "--apq-token-fraction)")
    group.add_argument("--apq-no-bbc-guard", dest="apq_bbc_guard", action="store_const", const=False,
                       default=None, help="apq: keep a block's BBC result even when its whole (all rows, "
                                          "nothing eliminated) weighted error got worse")
    group.add_argument("--apq-token-fraction", dest="apq_token_fraction", type=float, default=None,
                       help="apq: fraction of token rows used by the searches (default 1 = all)")
    group.add_argument("--apq-no-twin-gelu", dest="apq_twin_gelu", action="store_const", const=False,
                       default=None, help="apq: keep a uniform quantizer after GELU")


def _apq_scheme(scheme, options: dict):
    require_matmul(scheme, "apq")
    want = "mpq" if options.get("mpq", True) else options.get("softmax", "twin")
    if scheme.softmax_quantizer is None:
        return dataclasses.replace(scheme, softmax_quantizer=want)
    if options.get("mpq") is False and scheme.softmax_quantizer == "mpq":
        raise VitqError("apq: mpq=False contradicts the scheme's softmax quantizer 'mpq'")
    return scheme


@register_method("apq", "APQ-ViT (matmul): PTQ4ViT base, bottom-elimination blockwise calibration on the "
                 "squared-gradient-weighted block-output error, MPQ softmax quantizer", add_arguments=_apq_args,
                 adjust_scheme=_apq_scheme,
                 validate=lambda o: _check_apq(check_options(o, APQ_DEFAULTS, "apq")),
                 quick_options={"candidates": 10, "rounds": 2, "bbc_candidates": 3, "num_calib": 16},
                 expected_time="DeiT-Tiny, 32 images: 129-177 s on 2 CPU cores with 16 candidates, 2 rounds, 0.2 "
                               "of the token rows, 5 BBC candidates (BENCHMARKS.md apq); at the defaults tens of "
                               "minutes (not measured); GPU not measured")
def apq(model: nn.Module, calib: CalibData, **options) -> dict:
    o = check_options(options, APQ_DEFAULTS, "apq")
    _check_apq(o)
    info = {"effective_options": o, "interpretation": "METHODS.md §4 (paper text unavailable); see vitq.methods.apq",
            "base": "PTQ4ViT per-layer search, float (parallel) inputs, weights per channel, inputs per tensor",
            "task_loss": "cross-entropy against the float model's own top-1 prediction",
            "bbc": (f"block-output error weighted by squared gradients, keep the largest {o['keep_fraction']:g}, "
                    f"inputs {o['bbc_inputs']}, target {o['bbc_target']}, guard {'on' if o['bbc_guard'] else 'off'}, "
                    "weights one factor per layer") if o["bbc"] else "off",
            "mpq": "split code space: [t,1] uniform, [0,t) log2, t per layer" if o["mpq"] else "off"}
    blocks = [n for _, n, _ in Trunk(model).blocks()] if o["bbc"] else None
    sub, cap, setup_info = setup(model, calib, o, _softmax_kind(o), blocks=blocks)
    info.update(setup_info)
    grids = grids_from(o)
    t0 = time.perf_counter()
    info["layerwise"] = layerwise_search(model, cap, grids, o["rounds"], calib.device, bar=calib.bar)
    info["seconds_layerwise_search"] = time.perf_counter() - t0
    if o["bbc"]:
        bgrids = Grids(linear_grid(float(o["bbc_alpha"]), float(o["bbc_beta"]), o["bbc_candidates"]),
                       grids.twin_shifts, grids.mpq_thresholds)
        t0 = time.perf_counter()
        info["bbc_blocks"] = bbc_search(model, cap, sub.images, bgrids, o, calib.device, calib.seed, bar=calib.bar)
        info["seconds_bbc"] = time.perf_counter() - t0
    return info

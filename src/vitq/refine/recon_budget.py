"""Turn a wall-clock budget for block reconstruction (``--recon-budget-min``) into steps per piece.

A timed probe on the first trunk unit (the stem's float output on one mini-batch as its input) measures one
step (forward and backward of the quantized unit) and one forward over the calibration images; every piece
also runs three such forwards (targets, error before and after; the error's forward of the final state is the
next piece's input). With ``P`` pieces, ``N`` images, a step of ``t_step`` seconds and a forward of ``t_img``
seconds per image:

    steps = floor((budget − P · 3 · N · t_img) / (P · t_step · OVERHEAD))

``OVERHEAD`` covers what the probe leaves out (AdaRound's soft weights and regulariser, the optimiser, QDrop's
draws); stem and head are cheaper than a unit, so the rule errs on the side of finishing early. The choice is
returned (and logged by the refiner) with the measurements it came from.
"""

from __future__ import annotations

import math
import time

import torch

from vitq.refine.recon_pieces import Piece

OVERHEAD = 1.6  # a full step over the probe's forward + backward (measured on DeiT-Tiny: 1.3-1.6)
PROBE_STEPS = 3


def _timed(fn, reps: int) -> float:
    fn()  # warm-up (allocations, first-call costs)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def plan_iters(pieces: list[Piece], images: torch.Tensor, batch: int, budget_min: float) -> tuple[int, dict]:
    """Steps per piece that fit ``budget_min`` minutes (see the module). ``images``: the calibration images."""
    unit = pieces[1] if len(pieces) > 2 else pieces[0]
    x_img = images[:batch]
    with torch.no_grad():
        x = pieces[0].float(x_img) if unit is not pieces[0] else x_img
    x = x.detach()

    def step():
        xr = x.clone().requires_grad_(True)
        with torch.enable_grad():
            unit.quant(xr).float().pow(2).mean().backward()

    def forward():
        with torch.no_grad():
            unit.quant(x)

    t_step = _timed(step, PROBE_STEPS)
    t_img = _timed(forward, PROBE_STEPS) / max(x.shape[0], 1)
    n, p = images.shape[0], len(pieces)
    fixed = p * 3.0 * n * t_img
    budget = budget_min * 60.0
    iters = max(0, math.floor((budget - fixed) / (p * t_step * OVERHEAD)))
    info = {"budget_min": budget_min, "probe_piece": unit.name, "seconds_per_step": t_step * OVERHEAD,
            "seconds_forward_per_image": t_img, "fixed_seconds": fixed, "pieces": p, "images": n, "iters": iters}
    return iters, info

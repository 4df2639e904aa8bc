"""Block reconstruction (BRECQ / QDrop style): learn the weights' rounding and the activation step sizes piece
by piece so that each quantized piece reproduces the float piece's output on the calibration images.

Pieces, in order: the stem (patch embedding), every unit of :class:`vitq.models.trunk.Trunk` (transformer blocks,
Swin's patch merging), and the tail (final norm and head). For each piece:

* every weight of a quantized linear/conv gets an AdaRound variable ``V`` (Nagel et al. 2020): the weight is
  ``s · (clamp(floor(w/s) + z + h(V), qmin, qmax) − z)`` with the rectified sigmoid
  ``h(V) = clamp(sigmoid(V)·1.2 − 0.1, 0, 1)``, ``V`` initialised so ``h`` equals the fractional part (i.e. the
  start is round-to-nearest), and the regulariser ``Σ 1 − |2h − 1|^β`` added after a warm-up, β annealed
  linearly from 20 to 2. At the end ``h`` is hardened (``V ≥ 0`` rounds up) and the dequantized weight is
  written into the layer's weight with the layer's weight bias correction off: the weight then lies exactly
  on the quantizer grid (the weight quantizer maps it onto itself bit for bit), so the result is an
  ordinary state that saves and reloads like any other. Weight scales and zero points are not changed.
* every activation quantizer of kind ``uniform`` learns its step size with the LSQ gradient (the scale
  buffer is made a leaf for the duration; the quantizer's rounding is straight-through, see
  :func:`vitq.quant.base.round_ste`). Other kinds (log2, twin, mpq, ptf, ...) keep their parameters.
* the loss is the squared error of the piece's output against the float piece's output on the float
  input (sum over the feature axis, mean over the rest: BRECQ's convention), on random mini-batches.
* QDrop: during the optimisation each activation quantizer of the piece is bypassed elementwise with
  probability ``drop_prob`` (the value passes unquantized), and the piece's input mixes, elementwise with the
  same probability, the float model's input into the quantized model's input.

Optional (issue 26; off by default until measured on the real model, see BENCHMARKS.md):

* ``learn_log``: the top level of each log quantizer (``adalog``, ``logsqrt2``; a signed adalog's negative step
  too) learns through a straight-through estimator (:class:`vitq.refine.recon_learn.LogScaleQuantizer`);
  ``learn_ptf``: the global scale of each PTF quantizer learns with LSQ through every channel's power-of-two
  factor; ``learn_bias``: the biases of the piece's quantized layers learn (Adam, ``bias_lr``, cosine).
* ``normalize``: the loss is divided by the piece's float output energy (times the first piece's, so the
  regulariser weight means the same in every piece: the raw error grows ~8x from the first to the last DeiT
  block); ``head_loss="kl"``: the last piece (the logits) learns KL(float ‖ quant) and is accepted on it.
* ``holdout``: that fraction of the images is left out of the steps; every ``check_every`` steps the
  hard-rounded error on them is measured, the best checked state is kept, and the piece stops after
  ``patience`` checks without improvement (so the steps follow each piece's progress).
* ``loss_weight="fisher"``: each block-output squared error weighted by the float model's squared gradient there
  (its cross-entropy to its own prediction, one backward pass; :mod:`vitq.refine.recon_fisher`).
* ``start="gptq"``: AdaRound starts from GPTQ's compensated weights before their rounding (kept by
  :mod:`vitq.refine.gptq` on each layer) instead of the weights on the grid.
* ``budget_min``: a timed probe turns a wall-clock budget into steps per piece (:mod:`vitq.refine.recon_budget`);
  the choice is logged and returned under ``budget``.

The input of each piece is the output of the already reconstructed quantized pieces before it. After a piece
the output error (plain MSE over all calibration images, no dropping, hard rounding) is measured again; if it
is larger than before, the piece's starting state is restored and this is recorded.

Resume: with ``checkpoint_path`` the whole quantized state and the trace are written atomically after every
finished piece. A piece's random numbers come from a generator seeded by (seed, piece index), and the cached
inputs are recomputed by the same batched forward, so a killed run restarted with the same options ends
bit for bit where an uninterrupted one does (on one thread).

The options are the fields of :class:`ReconOptions`; the pieces and their input cache live in
:mod:`vitq.refine.recon_pieces`, what is learned (AdaRound, LSQ, QDrop) in :mod:`vitq.refine.recon_learn`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.options import OptionError, Options, opt
from vitq.quant.base import EPS, Quantizer
from vitq.refine.gptq import CONTINUOUS
from vitq.refine.recon_budget import plan_iters
from vitq.refine.recon_fisher import WEIGHTS, fisher_weights
from vitq.refine.recon_learn import (
    LEARNED_KINDS,
    UNROUNDED,
    Dropper,
    Rounding,
    SoftWeights,
    kl_loss,
    learned_buffers,
    rec_loss,
)
from vitq.refine.recon_pieces import Cache, Piece, frozen_parameters, piece_state, pieces_of, restore_piece, swapped
from vitq.registry import register_refiner
from vitq.state import read_checkpoint, write_checkpoint

log = logging.getLogger("vitq")
CHECKPOINT_FORMAT = "vitq-recon-ckpt-1"


@dataclass(frozen=True)
class ReconOptions(Options):
    iters: int = opt(20000, "optimisation steps per block (20000 as BRECQ/QDrop, for a GPU; CPU: 40)", minimum=0,
                     metavar="N")
    # the flag is --recon-batch-size; the field is not called batch_size, which is the calibration batching
    # of vitq.refine(..., batch_size=...)
    batch: int = opt(32, "calibration images per step (CPU: 4)", minimum=1, metavar="N", flag="batch_size")
    lr: float = opt(1e-3, "Adam learning rate of the AdaRound rounding variables (CPU: 1e-2)", minimum=0.0,
                    metavar="LR")
    scale_lr: float = opt(1e-3, "Adam learning rate of the activation step sizes, relative to each initial step "
                          "size (1e-3 x a typical DeiT step size of 0.04 is BRECQ's 4e-5), cosine-annealed to 0 "
                          "(CPU: 4e-3)", minimum=0.0, metavar="LR")
    weight: float = opt(0.01, "weight of the AdaRound rounding regulariser (lambda)", minimum=0.0, metavar="L")
    warmup: float = opt(0.2, "fraction of the steps without the rounding regulariser", minimum=0.0, below=1.0,
                        metavar="F")
    beta_start: float = opt(20.0, "exponent of the rounding regulariser after the warm-up (annealed linearly to "
                            "--recon-beta-end)", metavar="B")
    beta_end: float = opt(2.0, "exponent of the rounding regulariser at the last step", above=0.0, metavar="B")
    drop_prob: float = opt(0.5, "QDrop: probability that an activation value is left unquantized (0 = off)",
                           minimum=0.0, below=1.0, metavar="P")
    learn_weights: bool = opt(True, "AdaRound: learn the weights' rounding")
    learn_scales: bool = opt(True, "LSQ: learn the step sizes of the uniform activation quantizers")
    learn_log: bool = opt(False, "learn the top level of the log quantizers (adalog, logsqrt2) with a "
                          "straight-through estimator")
    learn_ptf: bool = opt(False, "LSQ on the global scale of the PTF quantizers (fq LayerNorm inputs)")
    learn_bias: bool = opt(False, "learn the biases of the piece's quantized layers")
    bias_lr: float = opt(1e-3, "Adam learning rate of the biases (absolute), cosine-annealed to 0", minimum=0.0,
                         metavar="LR")
    normalize: bool = opt(False, "each piece's loss relative to its float output energy (times the first "
                          "piece's energy, so the regulariser weight means the same in every piece)")
    loss_weight: str = opt("none", "weights of the block-output squared error: fisher = the squared gradient of "
                           "the float model's cross-entropy to its own prediction (no labels) w.r.t. each output "
                           "element, from one backward pass over the calibration images (BRECQ/APHQ/FIMA-Q's "
                           "diagonal Fisher)", choices=WEIGHTS)
    head_loss: str = opt("mse", "loss of the last piece (the head's logits): kl = KL(float || quant) of the "
                         "softmax, mse = the block loss", choices=("kl", "mse"))
    holdout: float = opt(0.0, "fraction of the calibration images held out of the steps: every --recon-check-every "
                         "steps the hard-rounded error on them is measured, the best state kept, and a piece "
                         "stops after --recon-patience checks without improvement (0 = off)", minimum=0.0,
                         below=1.0, metavar="F")
    check_every: int = opt(25, "steps between two held-out checks", minimum=1, metavar="N")
    patience: int = opt(3, "held-out checks without improvement before a piece stops", minimum=1, metavar="N")
    start: str = opt("weights", "AdaRound's continuous start: the layer's weights, or gptq = GPTQ's compensated "
                     "weights before rounding (needs --weight-rounding gptq in the same run)",
                     choices=("weights", "gptq"))
    budget_min: float | None = opt(None, "wall-clock budget of the whole reconstruction in minutes: a timed "
                                   "probe turns it into steps per piece (replaces --recon-iters; the choice is "
                                   "logged and recorded)", above=0.0, metavar="MIN")
    seed: int | None = opt(None, "seed of the mini-batches and drops; none = the calibration seed (--seed)",
                           metavar="N")
    checkpoint_path: str | None = opt(None, "resume file written after every block (a rerun of the same command "
                                      "continues)", metavar="FILE")

    def check(self) -> None:
        if not self.beta_start >= self.beta_end:
            raise OptionError("beta_start", self.beta_start, "beta_start >= beta_end > 0")


CPU_SETTING = {"iters": 40, "batch": 4, "lr": 1e-2, "scale_lr": 4e-3}  # documented cheaper setting


def make_config(options: dict | None = None) -> ReconOptions:
    """The checked options; a bad one is refused naming its flag."""
    return ReconOptions.build(options, "recon")


def beta_at(step: int, cfg: ReconOptions) -> float | None:
    """β of the rounding regulariser at ``step`` (None during the warm-up: no regulariser)."""
    start = int(cfg.warmup * cfg.iters)
    if step < start:
        return None
    rel = (step - start) / max(1, cfg.iters - start)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1.0 - rel)


def derive_seed(seed: int, piece: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * piece + 17) % (2**63 - 1)


def _learned_scales(p: Piece, cfg: ReconOptions) -> list[tuple[str, Quantizer]]:
    kinds = {"uniform": cfg.learn_scales, "ptf": cfg.learn_ptf, "adalog": cfg.learn_log, "logsqrt2": cfg.learn_log}
    return [(n, q) for n, q in p.scales if kinds.get(q.kind, False)]


def _start_of(module, cfg: ReconOptions, name: str):
    if cfg.start != "gptq":
        return None
    w = getattr(module, CONTINUOUS, None)
    if w is None:
        raise VitqError(f"--recon-start gptq: {name} has no GPTQ compensated weights (run --weight-rounding gptq "
                        "in the same run, before recon)")
    return w


def reconstruct_piece(p: Piece, cache: Cache, targets: list[torch.Tensor], cfg: ReconOptions,
                      gen: torch.Generator, bar=None, energy_ref: float | None = None, last: bool = False,
                      holdout: torch.Tensor | None = None, fisher: list[torch.Tensor] | None = None
                      ) -> tuple[dict, list[torch.Tensor]]:
    """Optimise one piece in place; returns its trace entry (losses, accepted or not) and the piece's outputs
    over the calibration batches in its final state (the next piece's inputs). ``energy_ref``: the first
    piece's output energy (--recon-normalize); ``last``: the head (--recon-head-loss); ``holdout``: the indices
    of the held-out images (--recon-holdout)."""
    t0 = time.perf_counter()
    kl_head = last and cfg.head_loss == "kl"
    metric = kl_loss if kl_head else None
    fisher = None if kl_head else fisher  # (--recon-loss-weight: per batch, the outputs' shape)
    out_before: list[torch.Tensor] = []
    before = cache.error(p, targets, metric, fisher, outputs=out_before)
    start = piece_state(p)
    xq, xf, tg = torch.cat(cache.q), torch.cat(cache.f), torch.cat(targets)
    fw = torch.cat(fisher) if fisher is not None else None
    n = xq.shape[0]
    train = torch.arange(n)
    if holdout is not None:
        train = train[~torch.isin(train, holdout)]
    roundings = [Rounding(m, _start_of(m, cfg, nm)) for nm, m in p.weighted] if cfg.learn_weights else []
    learned = _learned_scales(p, cfg)
    biases = [m.bias for _, m in p.weighted if m.bias is not None] if cfg.learn_bias else []
    energy = float(tg.pow(2).sum(-1).mean())
    entry = {"piece": p.name, "layers": len(roundings), "step_sizes": len(learned), "biases": len(biases),
             "mse_before": before, "metric": "kl" if kl_head else "mse" if fisher is None else "fisher-mse",
             "output_energy": energy, "layers_on_grid": sum(r.on_grid > 0.5 for r in roundings)}
    if cfg.iters == 0 or (not roundings and not learned and not biases):
        entry.update({"mse_after": before, "kept_start": False, "iters": 0, "seconds": time.perf_counter() - t0})
        return entry, out_before
    for r in roundings:
        r.module.weight_correction.fill_(False)
    opt_v = torch.optim.Adam([r.v for r in roundings], lr=cfg.lr) if roundings else None
    groups, base_lr, leaves = [], [], []
    for _, q in learned:
        for b in learned_buffers(q):
            leaves.append(b)
            base_lr.append(cfg.scale_lr * float(b.detach().abs().mean()))
            groups.append({"params": [b], "lr": base_lr[-1]})
    for b in biases:
        leaves.append(b)
        base_lr.append(cfg.bias_lr)
        groups.append({"params": [b], "lr": cfg.bias_lr})
    for b in leaves:
        b.requires_grad_(True)
    opt_s = torch.optim.Adam(groups) if groups else None
    dropper = Dropper(p.acts, cfg.drop_prob)
    dropper.gen = gen
    soft = SoftWeights(roundings)
    first_loss = last_loss = None
    scale = 1.0 if not cfg.normalize else (energy_ref or energy) / max(energy, 1e-12)
    swap = [(name, LEARNED_KINDS[q.kind](q, dropper)) for name, q in learned]
    best, stale, steps, checks = None, 0, 0, []
    try:
        with swapped(p.root, swap):
            dropper.active = True
            for step in range(cfg.iters):
                idx = train[torch.randint(len(train), (min(cfg.batch, len(train)),), generator=gen)].to(xq.device)
                x_in = xq[idx]
                if cfg.drop_prob > 0:
                    x_in = dropper.mix(x_in, xf[idx])
                out = p.quant(x_in)
                rec = kl_loss(out, tg[idx]) if kl_head else rec_loss(out, tg[idx], None if fw is None else fw[idx])
                beta = beta_at(step, cfg)
                loss = rec * scale
                if beta is not None and roundings and cfg.weight > 0:
                    loss = loss + cfg.weight * sum(r.regularizer(beta) for r in roundings)
                if opt_v is not None:
                    opt_v.zero_grad(set_to_none=True)
                if opt_s is not None:
                    opt_s.zero_grad(set_to_none=True)
                    frac = 0.5 * (1.0 + math.cos(math.pi * step / cfg.iters))
                    for g, lr in zip(opt_s.param_groups, base_lr, strict=True):
                        g["lr"] = lr * frac
                loss.backward()
                if opt_v is not None:
                    opt_v.step()
                if opt_s is not None:
                    opt_s.step()
                    with torch.no_grad():
                        for _, q in learned:
                            for b in learned_buffers(q):
                                b.clamp_(min=EPS)
                steps = step + 1
                last_loss = float(rec.detach())
                first_loss = last_loss if first_loss is None else first_loss
                if bar is not None and (step % 50 == 0 or step == cfg.iters - 1):
                    bar.set_postfix_str(f"{p.name} step {step + 1}/{cfg.iters} rec {last_loss:.4g}")
                if holdout is not None and (steps % cfg.check_every == 0 or steps == cfg.iters):
                    dropper.active = False
                    err = _held_out_error(p, soft, xq[holdout], tg[holdout], metric,
                                          None if fw is None else fw[holdout])
                    dropper.active = True
                    checks.append(err)
                    if best is None or err < best[0]:
                        best, stale = (err, _snapshot(roundings, leaves)), 0
                    else:
                        stale += 1
                        if stale >= cfg.patience:
                            break
    finally:
        dropper.active = False
        dropper.remove()
        soft.remove()
        for b in leaves:
            b.requires_grad_(False)
    if best is not None:
        _restore_snapshot(roundings, leaves, best[1])
    with torch.no_grad():
        for r in roundings:
            r.module.weight.copy_(r.hard())
    out_after: list[torch.Tensor] = []
    after = cache.error(p, targets, metric, fisher, outputs=out_after)
    kept = not after <= before  # also when the learned state is not finite
    if kept:
        restore_piece(p, start)
    else:
        for r in roundings:
            if r.on_grid <= 0.5:
                setattr(r.module, UNROUNDED, r.continuous)
    entry.update({"mse_after": before if kept else after, "mse_learned": after, "kept_start": kept,
                  "iters": steps, "train_loss_first": first_loss, "train_loss_last": last_loss,
                  "seconds": time.perf_counter() - t0})
    if holdout is not None:
        entry["held_out"] = checks
    return entry, out_before if kept else out_after


@torch.no_grad()
def _held_out_error(p: Piece, soft: SoftWeights, x: torch.Tensor, t: torch.Tensor, metric, w=None) -> float:
    """The piece's error on the held-out images with the weights rounded hard (what stopping now would give)."""
    soft.hard = True
    try:
        total = 0.0
        for i in range(0, x.shape[0], 32):
            out, ti, wi = p.quant(x[i:i + 32]), t[i:i + 32], None if w is None else w[i:i + 32]
            total += float((metric(out, ti) if metric else rec_loss(out, ti, wi)) * out.shape[0])
        return total / x.shape[0]
    finally:
        soft.hard = False


def _snapshot(roundings: list[Rounding], leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return [r.v.detach().clone() for r in roundings] + [b.detach().clone() for b in leaves]


@torch.no_grad()
def _restore_snapshot(roundings: list[Rounding], leaves: list[torch.Tensor], snap: list[torch.Tensor]) -> None:
    for t, v in zip([r.v for r in roundings] + leaves, snap, strict=True):
        t.copy_(v)


def _write_checkpoint(path: str, model: nn.Module, meta: dict) -> None:
    write_checkpoint(path, model.state_dict(), meta, CHECKPOINT_FORMAT)


def _read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    return read_checkpoint(path, CHECKPOINT_FORMAT, "recon")


def _state_checksum(model: nn.Module) -> float:
    return float(sum(float(v.double().abs().sum()) for v in model.state_dict().values() if v.is_floating_point()))


@register_refiner("recon", "block reconstruction (BRECQ/QDrop): AdaRound weight rounding and LSQ activation "
                  "step sizes learned block by block against the float block's output", config=ReconOptions)
def recon(model: nn.Module, float_model: nn.Module, calib: CalibData, cfg: ReconOptions, *,
          on_block_end: Callable[[dict], None] | None = None) -> dict:
    """Reconstruct ``model`` in place. ``on_block_end(event)`` is called after each piece (and its
    checkpoint); tests use it to simulate a kill."""
    seed = cfg.seed if cfg.seed is not None else calib.seed
    model.eval()
    float_model.eval()
    t_start = time.perf_counter()
    pieces = pieces_of(model, float_model, probe=calib.images[:1].to(calib.device))
    fingerprint = {"config": {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_path"}, "seed": seed,
                   "pieces": [p.name for p in pieces], "num_calib": len(calib), "batch_size": calib.batch_size,
                   "start_checksum": _state_checksum(model),
                   "calib_checksum": float(calib.images.double().abs().sum())}
    state = {"done": 0, "trace": [], "runs": 0}
    resumed = None
    path = cfg.checkpoint_path
    if path and os.path.exists(path):
        tensors, meta = _read_checkpoint(path)
        saved = meta["fingerprint"]
        for key in ("config", "seed", "pieces", "num_calib", "batch_size"):
            if saved.get(key) != fingerprint[key]:
                raise VitqError(f"recon checkpoint {path} belongs to another run ({key} differs); delete it or use "
                                "the same options")
        for key in ("start_checksum", "calib_checksum"):
            if not math.isclose(saved[key], fingerprint[key], rel_tol=1e-9):
                raise VitqError(f"recon checkpoint {path} was made from another starting model or other "
                                "calibration images; delete it or start from the same calibration")
        model.load_state_dict({k: tensors[k] for k in model.state_dict()}, strict=True)
        state = meta["state"]
        resumed = {"from_piece": state["done"]}
    state["runs"] += 1

    cache = Cache(calib)
    holdout = None
    if cfg.holdout > 0:
        n_out = max(1, min(len(calib) - 1, round(cfg.holdout * len(calib))))
        holdout = torch.randperm(len(calib), generator=torch.Generator().manual_seed(derive_seed(seed, -1)))[:n_out]
    with frozen_parameters(model, float_model):
        if cfg.budget_min is not None and "budget" not in state:
            iters, state["budget"] = plan_iters(pieces, calib.images, cfg.batch, cfg.budget_min)
            log.info("recon: --recon-budget-min %g: %d steps per piece (probe: %.3g s per step, %.3g s of "
                     "forwards per piece on %d images)", cfg.budget_min, iters,
                     state["budget"]["seconds_per_step"], state["budget"]["fixed_seconds"] / len(pieces),
                     len(calib))
        fisher, fisher_info = fisher_weights(pieces, calib) if cfg.loss_weight == "fisher" else (None, None)
    if cfg.budget_min is not None:
        cfg = dataclasses.replace(cfg, iters=state["budget"]["iters"])
    bar = calib.bar(None, "recon", total=len(pieces))
    try:
        with frozen_parameters(model, float_model):
            for i, p in enumerate(pieces):
                if i < state["done"]:  # finished before a restart: recompute its output only
                    cache.advance(p)
                    bar.update(1)
                    continue
                targets = cache.targets(p)
                if "energy_ref" not in state:
                    state["energy_ref"] = float(torch.cat(targets).pow(2).sum(-1).mean())
                gen = torch.Generator().manual_seed(derive_seed(seed, i))
                entry, outputs = reconstruct_piece(p, cache, targets, cfg, gen, bar, energy_ref=state["energy_ref"],
                                                   last=i == len(pieces) - 1, holdout=holdout,
                                                   fisher=None if fisher is None else fisher[i])
                cache.advance(p, targets, outputs)
                state["trace"].append(entry)
                state["done"] = i + 1
                if path:
                    _write_checkpoint(path, model, {"fingerprint": fingerprint, "state": state})
                bar.update(1)
                msg = (f"recon {p.name}: mse {entry['mse_before']:.5g} -> {entry['mse_after']:.5g}"
                       + (" (learned state worse: kept the start)" if entry["kept_start"] else ""))
                if calib.progress:
                    bar.write(msg)
                if on_block_end is not None:
                    on_block_end({"piece": p.name, "index": i})
    finally:
        bar.close()
    on_grid = sum(e.get("layers_on_grid", 0) for e in state["trace"])
    if on_grid:
        log.warning("recon: %d layer(s) started with their weights already on the quantizer grid (GPTQ or an "
                    "earlier recon): AdaRound can move each such weight by one level in one direction only; "
                    "reconstruct from round-to-nearest (no --weight-rounding gptq) for the full search", on_grid)
    seconds = time.perf_counter() - t_start
    log.info("recon: %d pieces on %d calibration images, %d steps of %d images per piece: %.0f s", len(pieces),
             len(calib), cfg.iters, cfg.batch, seconds)
    return {
        "config": {**cfg.to_dict(), "seed": seed},
        "num_calib": len(calib),
        "trace": state["trace"],
        "pieces_kept_start": [e["piece"] for e in state["trace"] if e["kept_start"]],
        "recon_seconds": seconds,
        "checkpoint": {"path": path, "resumed": resumed, "runs": state["runs"]},
        "budget": state.get("budget"),
        "fisher": fisher_info,
        "steps_taken": [e.get("iters", 0) for e in state["trace"]],
    }

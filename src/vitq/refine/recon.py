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

The input of each piece is the output of the already reconstructed quantized pieces before it. After a piece
the output error (plain MSE over all calibration images, no dropping, hard rounding) is measured again; if it
is larger than before, the piece's starting state is restored and this is recorded.

Resume: with ``checkpoint_path`` the whole quantized state and the trace are written atomically after every
finished piece. A piece's random numbers come from a generator seeded by (seed, piece index), and the cached
inputs are recomputed by the same batched forward, so a killed run restarted with the same options ends
bit for bit where an uninterrupted one does (on one thread).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.models.trunk import Trunk
from vitq.quant.base import EPS, Quantizer
from vitq.quant.modules import QWeighted
from vitq.quant.uniform import UniformQuantizer
from vitq.registry import register_refiner
from vitq.state import read_checkpoint, write_checkpoint

log = logging.getLogger("vitq")
CHECKPOINT_FORMAT = "vitq-recon-ckpt-1"
ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch (AdaRound)


@dataclass(frozen=True)
class ReconConfig:
    iters: int = 20000  # optimisation steps per piece (BRECQ/QDrop: 20000)
    batch: int = 32  # images per step (--recon-batch-size; not batch_size, which is the calibration batching)
    lr: float = 1e-3  # Adam learning rate of the AdaRound variables
    scale_lr: float = 1e-3  # Adam learning rate of the activation step sizes, relative to each initial step size
    # (1e-3 x a typical DeiT step size of 0.04 is BRECQ's 4e-5); cosine-annealed to 0
    weight: float = 0.01  # rounding regulariser weight (lambda)
    warmup: float = 0.2  # fraction of the steps without the rounding regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0
    drop_prob: float = 0.5  # QDrop: probability that an activation value is left unquantized
    learn_weights: bool = True  # AdaRound
    learn_scales: bool = True  # LSQ on uniform activation quantizers
    seed: int | None = None  # None = the calibration seed
    checkpoint_path: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CPU_SETTING = {"iters": 40, "batch": 4, "lr": 1e-2, "scale_lr": 4e-3}  # documented cheaper setting
FIELDS = {f.name for f in dataclasses.fields(ReconConfig)}


def make_config(options: dict) -> ReconConfig:
    unknown = sorted(set(options) - FIELDS)
    if unknown:
        raise VitqError(f"unknown recon options {unknown} (expected some of {sorted(FIELDS)})")
    cfg = ReconConfig(**{k: v for k, v in options.items() if v is not None})

    def need(ok: bool, what: str, expected: str) -> None:
        if not ok:
            flag = "batch-size" if what == "batch" else what.replace("_", "-")
            raise VitqError(f"--recon-{flag} {getattr(cfg, what)!r} is invalid (expected {expected})")

    need(isinstance(cfg.iters, int) and cfg.iters >= 0, "iters", "an integer >= 0")
    need(isinstance(cfg.batch, int) and cfg.batch >= 1, "batch", "an integer >= 1")
    need(cfg.lr >= 0, "lr", "a number >= 0")
    need(cfg.scale_lr >= 0, "scale_lr", "a number >= 0")
    need(cfg.weight >= 0, "weight", "a number >= 0")
    need(0.0 <= cfg.warmup < 1.0, "warmup", "a fraction in [0, 1)")
    need(cfg.beta_start >= cfg.beta_end > 0, "beta_start", "beta_start >= beta_end > 0")
    need(0.0 <= cfg.drop_prob < 1.0, "drop_prob", "a probability in [0, 1)")
    return cfg


# ------------------------------------------------------------------------------------------------ AdaRound

def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


class Rounding:
    """The AdaRound variables of one quantized layer (its weight quantizer's scale and zero point fixed)."""

    def __init__(self, module: QWeighted):
        self.module = module
        q = module.weight_quant
        w = module.weight.detach()
        self.scale = q._view(q.scale, w).detach()
        self.zero = q._view(q.zero_point, w).detach()
        self.qmin, self.qmax = q.qmin, q.qmax
        x = w / self.scale
        self.floor = torch.floor(x)
        # a weight already on its grid (GPTQ, an earlier recon) can move one level in one direction only
        self.on_grid = float(((x - torch.round(x)).abs() < 1e-3).float().mean())
        rest = (x - self.floor).clamp(1e-4, 1.0 - 1e-4)
        self.v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)).requires_grad_(True)

    def soft(self) -> torch.Tensor:
        q = torch.clamp(self.floor + self.zero + rectified_sigmoid(self.v), self.qmin, self.qmax)
        return (q - self.zero) * self.scale

    @torch.no_grad()
    def hard(self) -> torch.Tensor:
        q = torch.clamp(self.floor + self.zero + (self.v >= 0).to(self.floor), self.qmin, self.qmax)
        return (q - self.zero) * self.scale

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1.0 - (2.0 * rectified_sigmoid(self.v) - 1.0).abs().pow(beta)).sum()


def beta_at(step: int, cfg: ReconConfig) -> float | None:
    """β of the rounding regulariser at ``step`` (None during the warm-up: no regulariser)."""
    start = int(cfg.warmup * cfg.iters)
    if step < start:
        return None
    rel = (step - start) / max(1, cfg.iters - start)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1.0 - rel)


# ------------------------------------------------------------------------------------------------- pieces

@dataclass
class Piece:
    name: str
    quant: Callable[[torch.Tensor], torch.Tensor]
    float: Callable[[torch.Tensor], torch.Tensor]
    weighted: list[tuple[str, QWeighted]]
    scales: list[tuple[str, UniformQuantizer]]  # learnable activation step sizes
    acts: list[tuple[str, Quantizer]]  # every activation quantizer (QDrop bypass)
    root: nn.Module  # the quantized model (names above are qualified in it)


def pieces_of(qmodel: nn.Module, float_model: nn.Module) -> list[Piece]:
    """Stem, trunk units, tail; each with the quantized layers and quantizers it owns."""
    tq, tf = Trunk(qmodel), Trunk(float_model)
    if len(tq) != len(tf):
        raise VitqError("the float model does not have the quantized model's blocks (recon needs the model the "
                        "quantized one was prepared from)")
    names = ["stem"] + [n for n, _ in tq.units] + ["tail"]
    owned: dict[str, list[tuple[str, nn.Module]]] = {n: [] for n in names}
    for mname, m in qmodel.named_modules():
        if not isinstance(m, (QWeighted, Quantizer)):
            continue
        owner = next((u for u, _ in tq.units if mname.startswith(u + ".")), None)
        if owner is None:
            owner = "stem" if mname.startswith(("patch_embed.", "norm_pre.")) else "tail"
        owned[owner].append((mname, m))
    funcs = [(tq.stem, tf.stem)] + list(zip([u for _, u in tq.units], [u for _, u in tf.units], strict=True))
    funcs.append((tq.tail, tf.tail))
    out = []
    for name, (fq, ff) in zip(names, funcs, strict=True):
        mods = owned[name]
        weighted = [(n, m) for n, m in mods if isinstance(m, QWeighted)]
        acts = [(n, m) for n, m in mods if isinstance(m, Quantizer) and m.role != "weight"]
        scales = [(n, m) for n, m in acts if m.kind == "uniform" and bool(m.initialized)]
        out.append(Piece(name, fq, ff, weighted, scales, acts, qmodel))
    for p in out:
        for n, m in p.weighted:
            if not bool(m.weight_quant.initialized):
                raise VitqError(f"{n} is not calibrated: run a calibration method before the recon refiner")
    return out


def piece_state(p: Piece) -> dict[str, torch.Tensor]:
    """What reconstruction of ``p`` changes: weights, weight-correction flags, activation step sizes."""
    st = {}
    for n, m in p.weighted:
        st[f"{n}.weight"] = m.weight.detach().clone()
        st[f"{n}.weight_correction"] = m.weight_correction.clone()
    for n, q in p.scales:
        st[f"{n}.scale"] = q.scale.detach().clone()
    return st


@torch.no_grad()
def restore_piece(p: Piece, st: dict[str, torch.Tensor]) -> None:
    for n, m in p.weighted:
        m.weight.copy_(st[f"{n}.weight"])
        m.weight_correction.copy_(st[f"{n}.weight_correction"])
    for n, q in p.scales:
        q.scale.copy_(st[f"{n}.scale"])


@contextmanager
def frozen_parameters(*models: nn.Module):
    """No gradients for the models' own parameters (only AdaRound variables and step sizes learn)."""
    saved = [(p, p.requires_grad) for m in models for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in saved:
            p.requires_grad_(r)


class Dropper:
    """QDrop: forward hooks that let each activation value pass unquantized with probability ``p``."""

    def __init__(self, acts: list[tuple[str, Quantizer]], p: float):
        self.p, self.gen, self.active = p, None, False
        self.handles = [q.register_forward_hook(self._hook) for _, q in acts] if p > 0 else []
        # (quantizers swapped for an LsqQuantizer call drop() themselves; their hooks never run meanwhile)

    def _hook(self, module, inputs, output):
        return self.drop(inputs[0], output)

    def drop(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not self.active or self.p <= 0:
            return out
        keep_float = torch.rand(x.shape, generator=self.gen, device="cpu").to(x.device) < self.p
        return torch.where(keep_float, x, out)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _LsqFakeQuant(torch.autograd.Function):
    """Uniform fake quantization with the LSQ gradient in one node: the same forward values as
    ``UniformQuantizer.fake_quant``; backward ``dx = g`` inside the range (straight-through), 0 outside;
    ``ds = g · (round(x/s) − x/s)`` inside, ``g · (q − z)`` outside (clipped), summed to the scale's shape.
    Several times fewer tensor passes than autograd through the module, which is most of a step's time."""

    @staticmethod
    def forward(ctx, x, s, z, qmin: int, qmax: int, reduce_dims: tuple[int, ...]):
        xs = x / s
        r = torch.round(xs)
        q = torch.clamp(r + z, qmin, qmax)
        inside = (r + z >= qmin) & (r + z <= qmax)
        ctx.save_for_backward(xs, r, q, z, inside)
        ctx.reduce_dims, ctx.s_shape = reduce_dims, s.shape
        return (q - z) * s

    @staticmethod
    def backward(ctx, g):
        xs, r, q, z, inside = ctx.saved_tensors
        dx = g * inside
        ds = g * torch.where(inside, r - xs, q - z)
        ds = ds.sum(ctx.reduce_dims, keepdim=True) if ctx.reduce_dims else ds
        return dx, ds.reshape(ctx.s_shape), None, None, None, None


class LsqQuantizer(nn.Module):
    """Stands in for one uniform activation quantizer while its piece is reconstructed: LSQ on the original's
    scale (same tensor), zero point fixed, and QDrop's elementwise bypass. Swapped back afterwards."""

    def __init__(self, original: UniformQuantizer, dropper: Dropper):
        super().__init__()
        self.original = original
        self.dropper = dropper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.original
        s, z = q._view(q.scale, x), q._view(q.zero_point, x)
        if q.channel_axis is None:
            reduce_dims = tuple(range(x.dim()))
        else:
            axis = q.channel_axis % x.dim()
            reduce_dims = tuple(d for d in range(x.dim()) if d != axis)
        out = _LsqFakeQuant.apply(x, s, z, q.qmin, q.qmax, reduce_dims)
        return self.dropper.drop(x, out)


@contextmanager
def swapped(model_root: nn.Module, names_and_modules: list[tuple[str, nn.Module]]):
    """Put modules in place of the named submodules of ``model_root``; put the originals back on exit."""
    saved = []
    try:
        for name, new in names_and_modules:
            parent_name, _, attr = name.rpartition(".")
            parent = model_root.get_submodule(parent_name) if parent_name else model_root
            saved.append((parent, attr, getattr(parent, attr)))
            setattr(parent, attr, new)
        yield
    finally:
        for parent, attr, old in reversed(saved):
            setattr(parent, attr, old)


class SoftWeights:
    """Forward hooks on the weight quantizers that replace their output by the AdaRound soft weight."""

    def __init__(self, roundings: list[Rounding]):
        self.handles = [r.module.weight_quant.register_forward_hook(self._make(r)) for r in roundings]

    @staticmethod
    def _make(r: Rounding):
        return lambda module, inputs, output: r.soft()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def rec_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BRECQ's reconstruction loss: squared error summed over the feature axis, mean over the rest."""
    return (out - target).pow(2).sum(-1).mean()


# --------------------------------------------------------------------------------------------- the refiner

class Cache:
    """Per calibration batch: the quantized model's and the float model's input of the current piece."""

    def __init__(self, calib: CalibData):
        self.calib = calib
        self.q = [x for x in calib.batches()]
        self.f = list(self.q)

    @torch.no_grad()
    def targets(self, p: Piece) -> list[torch.Tensor]:
        return [p.float(h) for h in self.f]

    @torch.no_grad()
    def error(self, p: Piece, targets: list[torch.Tensor]) -> float:
        """Plain MSE of the quantized piece (its current state) against the float targets, all images."""
        total = n = 0.0
        for h, t in zip(self.q, targets, strict=True):
            total += float((p.quant(h) - t).pow(2).sum())
            n += t.numel()
        return total / n

    @torch.no_grad()
    def advance(self, p: Piece, targets: list[torch.Tensor] | None = None) -> None:
        self.q = [p.quant(h) for h in self.q]
        self.f = targets if targets is not None else [p.float(h) for h in self.f]


def derive_seed(seed: int, piece: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * piece + 17) % (2**63 - 1)


def reconstruct_piece(p: Piece, cache: Cache, targets: list[torch.Tensor], cfg: ReconConfig,
                      gen: torch.Generator, bar=None) -> dict:
    """Optimise one piece in place; returns its trace entry (losses, accepted or not)."""
    t0 = time.perf_counter()
    before = cache.error(p, targets)
    start = piece_state(p)
    xq, xf, tg = torch.cat(cache.q), torch.cat(cache.f), torch.cat(targets)
    n = xq.shape[0]
    roundings = [Rounding(m) for _, m in p.weighted] if cfg.learn_weights else []
    scales = [q for _, q in p.scales] if cfg.learn_scales else []
    entry = {"piece": p.name, "layers": len(roundings), "step_sizes": len(scales), "mse_before": before,
             "layers_on_grid": sum(r.on_grid > 0.5 for r in roundings)}
    if cfg.iters == 0 or (not roundings and not scales):
        entry.update({"mse_after": before, "kept_start": False, "iters": 0, "seconds": time.perf_counter() - t0})
        return entry
    for r in roundings:
        r.module.weight_correction.fill_(False)
    opt_v = torch.optim.Adam([r.v for r in roundings], lr=cfg.lr) if roundings else None
    opt_s, base_lr = None, []
    if scales:
        groups = []
        for q in scales:
            q.scale.requires_grad_(True)
            base_lr.append(cfg.scale_lr * float(q.scale.detach().abs().mean()))
            groups.append({"params": [q.scale], "lr": base_lr[-1]})
        opt_s = torch.optim.Adam(groups)
    dropper = Dropper(p.acts, cfg.drop_prob)
    dropper.gen = gen
    soft = SoftWeights(roundings)
    first_loss = last_loss = None
    swap = [(name, LsqQuantizer(q, dropper)) for name, q in p.scales if q in scales]
    try:
        with swapped(p.root, swap):
            dropper.active = True
            for step in range(cfg.iters):
                idx = torch.randint(n, (min(cfg.batch, n),), generator=gen).to(xq.device)
                x_in = xq[idx]
                if cfg.drop_prob > 0:
                    mix = torch.rand(x_in.shape, generator=gen).to(x_in.device) < cfg.drop_prob
                    x_in = torch.where(mix, xf[idx], x_in)
                out = p.quant(x_in)
                rec = rec_loss(out, tg[idx])
                beta = beta_at(step, cfg)
                loss = rec
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
                        for q in scales:
                            q.scale.clamp_(min=EPS)
                last_loss = float(rec.detach())
                first_loss = last_loss if first_loss is None else first_loss
                if bar is not None and (step % 50 == 0 or step == cfg.iters - 1):
                    bar.set_postfix_str(f"{p.name} step {step + 1}/{cfg.iters} rec {last_loss:.4g}")
    finally:
        dropper.active = False
        dropper.remove()
        soft.remove()
        for q in scales:
            q.scale.requires_grad_(False)
    with torch.no_grad():
        for r in roundings:
            r.module.weight.copy_(r.hard())
    after = cache.error(p, targets)
    kept = not after <= before  # also when the learned state is not finite
    if kept:
        restore_piece(p, start)
    entry.update({"mse_after": before if kept else after, "mse_learned": after, "kept_start": kept,
                  "iters": cfg.iters, "train_loss_first": first_loss, "train_loss_last": last_loss,
                  "seconds": time.perf_counter() - t0})
    return entry


def _write_checkpoint(path: str, model: nn.Module, meta: dict) -> None:
    write_checkpoint(path, model.state_dict(), meta, CHECKPOINT_FORMAT)


def _read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    return read_checkpoint(path, CHECKPOINT_FORMAT, "recon")


def _state_checksum(model: nn.Module) -> float:
    return float(sum(float(v.double().abs().sum()) for v in model.state_dict().values() if v.is_floating_point()))


def _add_arguments(group) -> None:
    group.add_argument("--recon-iters", type=int, default=None, metavar="N",
                       help="optimisation steps per block (20000 as BRECQ/QDrop, for a GPU; CPU: 40)")
    group.add_argument("--recon-batch-size", dest="recon_batch", type=int, default=None, metavar="N",
                       help="calibration images per step (32; CPU: 4)")
    group.add_argument("--recon-lr", type=float, default=None, metavar="LR",
                       help="Adam learning rate of the AdaRound rounding variables (1e-3; CPU: 1e-2)")
    group.add_argument("--recon-scale-lr", type=float, default=None, metavar="LR",
                       help="Adam learning rate of the activation step sizes, relative to each step size "
                            "(1e-3; CPU: 4e-3)")
    group.add_argument("--recon-weight", type=float, default=None, metavar="L",
                       help="weight of the AdaRound rounding regulariser (0.01)")
    group.add_argument("--recon-warmup", type=float, default=None, metavar="F",
                       help="fraction of the steps without the rounding regulariser (0.2)")
    group.add_argument("--recon-drop-prob", type=float, default=None, metavar="P",
                       help="QDrop: probability that an activation value is left unquantized (0.5; 0 = off)")
    group.add_argument("--recon-checkpoint-path", default=None, metavar="FILE",
                       help="resume file written after every block (a rerun of the same command continues)")


@register_refiner("recon", "block reconstruction (BRECQ/QDrop): AdaRound weight rounding and LSQ activation "
                  "step sizes learned block by block against the float block's output", add_arguments=_add_arguments)
def recon(model: nn.Module, float_model: nn.Module, calib: CalibData,
          on_block_end: Callable[[dict], None] | None = None, **options) -> dict:
    """Reconstruct ``model`` in place. ``on_block_end(event)`` is called after each piece (and its
    checkpoint); tests use it to simulate a kill."""
    cfg = make_config(options)
    seed = cfg.seed if cfg.seed is not None else calib.seed
    model.eval()
    float_model.eval()
    t_start = time.perf_counter()
    pieces = pieces_of(model, float_model)
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
    bar = calib.bar(None, "recon", total=len(pieces))
    try:
        with frozen_parameters(model, float_model):
            for i, p in enumerate(pieces):
                if i < state["done"]:  # finished before a restart: recompute its output only
                    cache.advance(p)
                    bar.update(1)
                    continue
                targets = cache.targets(p)
                gen = torch.Generator().manual_seed(derive_seed(seed, i))
                entry = reconstruct_piece(p, cache, targets, cfg, gen, bar)
                cache.advance(p, targets)
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
    return {
        "config": {**cfg.to_dict(), "seed": seed},
        "num_calib": len(calib),
        "trace": state["trace"],
        "pieces_kept_start": [e["piece"] for e in state["trace"] if e["kept_start"]],
        "recon_seconds": time.perf_counter() - t_start,
        "checkpoint": {"path": path, "resumed": resumed, "runs": state["runs"]},
    }

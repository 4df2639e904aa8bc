"""The pieces of block reconstruction: the stem, every unit of :class:`vitq.models.trunk.Trunk` and the tail,
each with the quantized layers and quantizers it owns (:func:`pieces_of`); what reconstructing a piece changes
(:func:`piece_state`, :func:`restore_piece`); and the cache of each piece's inputs over the calibration batches
(:class:`Cache`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.models.trunk import Trunk
from vitq.quant.base import Quantizer
from vitq.quant.modules import QWeighted
from vitq.refine.recon_learn import LEARNED_KINDS, learned_buffers


@dataclass
class Piece:
    name: str
    quant: Callable[[torch.Tensor], torch.Tensor]
    float: Callable[[torch.Tensor], torch.Tensor]
    weighted: list[tuple[str, QWeighted]]
    scales: list[tuple[str, Quantizer]]  # activation quantizers whose scales can learn (LEARNED_KINDS)
    acts: list[tuple[str, Quantizer]]  # every activation quantizer (QDrop bypass)
    root: nn.Module  # the quantized model (names above are qualified in it)


@torch.no_grad()
def run_in_stem(trunk: Trunk, modules: list[nn.Module], probe: torch.Tensor) -> set[int]:
    """The ids of those ``modules`` that run when the trunk's stem runs on ``probe`` (one image is enough):
    a layer outside every unit belongs to the stem if so, else to the tail, whatever the family calls it (a
    ViT's ``patch_embed``, a CNN's ``conv_stem`` / ``conv1``)."""
    seen: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.add(id(mod))) for m in modules]
    try:
        trunk.stem(probe[:1])
    finally:
        for h in hooks:
            h.remove()
    return seen


def weighted_stages(model: nn.Module, trunk: Trunk, probe: torch.Tensor):
    """The quantized linear/conv layers in data-flow order, by stage: [(name, its layers, the function that runs
    the stage on its input)] for the stem, every trunk unit and the tail. A layer outside every unit is in the
    stem when it runs there on ``probe`` (a ViT's patch embedding, a CNN's first convolution), else in the tail."""
    def weighted(mod):
        return [m for m in mod.modules() if isinstance(m, QWeighted)]

    inside = {id(m) for _, u in trunk.units for m in u.modules()}
    outside = [m for m in weighted(model) if id(m) not in inside]
    stem_ids = run_in_stem(trunk, outside, probe)
    stages = [("stem", [m for m in outside if id(m) in stem_ids], trunk.stem)]
    stages += [(n, weighted(u), u) for n, u in trunk.units]
    stages.append(("tail", [m for m in outside if id(m) not in stem_ids], trunk.tail))
    return stages


def pieces_of(qmodel: nn.Module, float_model: nn.Module, probe: torch.Tensor | None = None) -> list[Piece]:
    """Stem, trunk units, tail; each with the quantized layers and quantizers it owns. A layer outside every
    unit belongs to the stem when it runs there on ``probe`` (an image; without one: when its name starts with
    ``patch_embed.`` or ``norm_pre.``), else to the tail."""
    tq, tf = Trunk(qmodel), Trunk(float_model)
    if len(tq) != len(tf):
        raise VitqError("the float model does not have the quantized model's blocks (recon needs the model the "
                        "quantized one was prepared from)")
    names = ["stem"] + [n for n, _ in tq.units] + ["tail"]
    owned: dict[str, list[tuple[str, nn.Module]]] = {n: [] for n in names}
    outside = []
    for mname, m in qmodel.named_modules():
        if not isinstance(m, (QWeighted, Quantizer)):
            continue
        owner = next((u for u, _ in tq.units if mname.startswith(u + ".")), None)
        if owner is None:
            outside.append((mname, m))
        else:
            owned[owner].append((mname, m))
    if probe is not None:
        stem_ids = run_in_stem(tq, [m for _, m in outside], probe)
        for mname, m in outside:
            owned["stem" if id(m) in stem_ids else "tail"].append((mname, m))
    else:
        for mname, m in outside:
            owned["stem" if mname.startswith(("patch_embed.", "norm_pre.")) else "tail"].append((mname, m))
    funcs = [(tq.stem, tf.stem)] + list(zip([u for _, u in tq.units], [u for _, u in tf.units], strict=True))
    funcs.append((tq.tail, tf.tail))
    out = []
    for name, (fq, ff) in zip(names, funcs, strict=True):
        mods = owned[name]
        weighted = [(n, m) for n, m in mods if isinstance(m, QWeighted)]
        acts = [(n, m) for n, m in mods if isinstance(m, Quantizer) and m.role != "weight"]
        scales = [(n, m) for n, m in acts if m.kind in LEARNED_KINDS and bool(m.initialized)]
        out.append(Piece(name, fq, ff, weighted, scales, acts, qmodel))
    for p in out:
        for n, m in p.weighted:
            if not bool(m.weight_quant.initialized):
                raise VitqError(f"{n} is not calibrated: run a calibration method before the recon refiner")
    return out


def piece_state(p: Piece) -> dict[str, torch.Tensor]:
    """What reconstruction of ``p`` changes: weights, biases, weight-correction flags, activation scales."""
    st = {}
    for n, m in p.weighted:
        st[f"{n}.weight"] = m.weight.detach().clone()
        if m.bias is not None:
            st[f"{n}.bias"] = m.bias.detach().clone()
        st[f"{n}.weight_correction"] = m.weight_correction.clone()
    for n, q in p.scales:
        for i, b in enumerate(learned_buffers(q)):
            st[f"{n}.learned{i}"] = b.detach().clone()
    return st


@torch.no_grad()
def restore_piece(p: Piece, st: dict[str, torch.Tensor]) -> None:
    for n, m in p.weighted:
        m.weight.copy_(st[f"{n}.weight"])
        if m.bias is not None:
            m.bias.copy_(st[f"{n}.bias"])
        m.weight_correction.copy_(st[f"{n}.weight_correction"])
    for n, q in p.scales:
        for i, b in enumerate(learned_buffers(q)):
            b.copy_(st[f"{n}.learned{i}"])


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
    def error(self, p: Piece, targets: list[torch.Tensor], metric=None, weights=None,
              outputs: list | None = None) -> float:
        """Plain MSE of the quantized piece (its current state) against the float targets, all images; with
        ``metric(out, target)`` (a mean over images) that metric's mean over all images instead; with
        ``weights`` (per batch, the targets' shape: Fisher weights) the weighted squared error. ``outputs``: a
        list that receives the piece's outputs (for :meth:`advance`, which then need not run the piece again)."""
        total = n = 0.0
        for i, (h, t) in enumerate(zip(self.q, targets, strict=True)):
            out = p.quant(h)
            if outputs is not None:
                outputs.append(out)
            if metric is not None:
                total += float(metric(out, t)) * t.shape[0]
                n += t.shape[0]
                continue
            err = (out - t).pow(2)
            total += float((err if weights is None else err * weights[i].to(err.dtype)).sum())
            n += t.numel()
        return total / n

    @torch.no_grad()
    def advance(self, p: Piece, targets: list[torch.Tensor] | None = None, outputs: list | None = None) -> None:
        """Move on to the next piece: its inputs are this piece's outputs (``outputs`` when :meth:`error` kept
        them for the piece's final state, else computed) and the float targets."""
        self.q = outputs if outputs is not None else [p.quant(h) for h in self.q]
        self.f = targets if targets is not None else [p.float(h) for h in self.f]

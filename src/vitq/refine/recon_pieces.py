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
    def error(self, p: Piece, targets: list[torch.Tensor], metric=None) -> float:
        """Plain MSE of the quantized piece (its current state) against the float targets, all images; with
        ``metric(out, target)`` (a mean over images) that metric's mean over all images instead."""
        total = n = 0.0
        for h, t in zip(self.q, targets, strict=True):
            if metric is not None:
                total += float(metric(p.quant(h), t)) * t.shape[0]
                n += t.shape[0]
                continue
            total += float((p.quant(h) - t).pow(2).sum())
            n += t.numel()
        return total / n

    @torch.no_grad()
    def advance(self, p: Piece, targets: list[torch.Tensor] | None = None) -> None:
        self.q = [p.quant(h) for h in self.q]
        self.f = targets if targets is not None else [p.float(h) for h in self.f]

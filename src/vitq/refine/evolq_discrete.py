"""Evol-Q's knob search (issue 26): the block's non-differentiable, mostly discrete quantization knobs that
gradients and reconstruction cannot reach, searched by the same small evolutionary algorithm as the scales.

A *knob* is one quantizer's or one layer's set of genes; a block's search space (:class:`KnobSpace`) is its
knobs of the groups asked for:

* ``logq``: each log quantizer (``adalog``, ``adalog_shift``, ``logsqrt2``) of the block: its base
  ``2^(1/r)`` (a move is one step of ``vitq.quant.log.R_GRID``: r ± 0.25 within [1, 4]), its top level (a move
  multiplies it by ``2^(±1/(2r))``, half a level) and, for a signed ``adalog``, its negative step (``2^(±1/4)``).
* ``heads``: the q/k/v quantizers' scales, one gain per head where they are per head (else one per tensor);
  each head's gain moves by ``2^(±1/8)``.
* ``ptf``: the per-channel power-of-two shifts of the PTF (fq LayerNorm-input and residual) quantizers; a move
  shifts a few channels by ±1 within [0, max_shift] (at an end, the other way).
* ``wscale_pre``: the per-output-channel weight scales of the block's quantized layers *before their rounding
  is fixed*: a child's scale is ``s · (1 + U(-r, r))`` (relative radius, ``--evolq-radius``, default 0.02) and
  the layer's weight is rounded again from its continuous weights with that scale. The continuous weights are
  the ones reconstruction rounded (:data:`vitq.refine.recon_learn.UNROUNDED`), else GPTQ's compensated weights
  (:data:`vitq.refine.gptq.CONTINUOUS`), else the layer's own weights when they are not on the grid (plain
  calibration: the forward rounds them). Each weight keeps the rounding offset reconstruction or GPTQ chose
  (its code minus the nearest code of its continuous weight, at the start scale), so the start scale gives the
  start weights bit for bit. A layer on its grid with no continuous weights is left out (recorded).
* ``attn``, ``mlp``, ``act``: the release's scale groups as knobs (weight scales re-rounded by the forward only,
  activation scales), mutated as ``--evolq-mutation`` says.

A child mutates one knob drawn at random and each other knob with probability 1/(number of knobs), so most
children differ from their parent in one or two knobs. The start state is a member of the population and only
the worst member is dropped, so the block's fitness never gets worse; the held-out check of
:mod:`vitq.refine.evolq` then keeps or reverts the block's result.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.models.family import search_paths
from vitq.quant.base import EPS, Quantizer
from vitq.quant.log import R_GRID, AdaLogQuantizer, LogSqrt2Quantizer
from vitq.quant.modules import QWeighted
from vitq.quant.uniform import PTFQuantizer, UniformQuantizer
from vitq.refine.evolq_options import DISCRETE_GROUPS, EvolQOptions, default_radius
from vitq.refine.evolq_search import replace_worst
from vitq.refine.fitness import FitnessEvaluator
from vitq.refine.gptq import CONTINUOUS
from vitq.refine.recon_learn import UNROUNDED

R_MIN, R_MAX = min(R_GRID), max(R_GRID)
R_STEP = 0.25
HEAD_STEP = 2.0 ** (1 / 8)
NEG_STEP = 2.0 ** (1 / 4)
PTF_CHANNELS = 4  # channels a PTF move shifts, on average


def uses_knobs(groups) -> bool:
    """True when the search needs the knob engine (a group beyond the release's attn/mlp/act)."""
    return any(g in DISCRETE_GROUPS for g in groups)


def _sign(gen: torch.Generator, shape=()) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen).float() * 2.0 - 1.0


class Knob:
    """One quantizer's or layer's genes. ``live`` are the tensors it changes (saved, restored, checkpointed)."""

    name: str
    live: dict[str, torch.Tensor]

    def genes(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, genes: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def mutate(self, genes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class LogKnob(Knob):
    """Base (adalog kinds), top level and (signed adalog) negative step of one log quantizer."""

    def __init__(self, name: str, q: Quantizer):
        self.name, self.q = name, q
        self.has_base = isinstance(q, AdaLogQuantizer)
        self.has_neg = self.has_base and bool(q.signed)
        self.live = {"scale": q.scale}
        if self.has_base:
            self.live["base_exp"] = q.base_exp
        if self.has_neg:
            self.live["neg_scale"] = q.neg_scale

    def _r(self) -> float:
        return float(self.q.base_exp) if self.has_base else 2.0

    def genes(self) -> torch.Tensor:
        parts = [self._r(), float(self.q.scale)] + ([float(self.q.neg_scale)] if self.has_neg else [])
        return torch.tensor(parts, dtype=torch.float64)

    def apply(self, genes: torch.Tensor) -> None:
        if self.has_base:
            self.q.base_exp.fill_(float(genes[0]))
        self.q.scale.fill_(float(genes[1]))
        if self.has_neg:
            self.q.neg_scale.fill_(float(genes[2]))

    def mutate(self, genes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        out = genes.clone()
        which = [1] + ([0] if self.has_base else []) + ([2] if self.has_neg else [])
        g = which[int(torch.randint(len(which), (), generator=gen))]
        s = float(_sign(gen))
        if g == 0:
            r = float(out[0]) + s * R_STEP
            out[0] = r if R_MIN <= r <= R_MAX else float(out[0]) - s * R_STEP  # at an end: the other way
        elif g == 1:
            out[1] = max(float(out[1]) * 2.0 ** (s / (2.0 * float(out[0]))), EPS)
        else:
            out[2] = max(float(out[2]) * NEG_STEP ** s, EPS)
        return out


class GainKnob(Knob):
    """The scale of a uniform quantizer; each element (a head) moves by ``2^(±1/8)`` with probability 1/2 (at
    least one)."""

    def __init__(self, name: str, q: UniformQuantizer):
        self.name, self.q = name, q
        self.live = {"scale": q.scale}

    def genes(self) -> torch.Tensor:
        return self.q.scale.detach().double().reshape(-1).cpu().clone()

    def apply(self, genes: torch.Tensor) -> None:
        self.q.scale.copy_(genes.reshape(self.q.scale.shape).to(self.q.scale))

    def mutate(self, genes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = genes.numel()
        pick = torch.rand(n, generator=gen) < 0.5
        pick[int(torch.randint(n, (), generator=gen))] = True
        return genes * torch.where(pick, HEAD_STEP ** _sign(gen, (n,)).double(), torch.ones(n, dtype=torch.float64))


class ShiftKnob(Knob):
    """The per-channel power-of-two shifts of one PTF quantizer."""

    def __init__(self, name: str, q: PTFQuantizer):
        self.name, self.q = name, q
        self.live = {"shift": q.shift}

    def genes(self) -> torch.Tensor:
        return self.q.shift.detach().double().cpu().clone()

    def apply(self, genes: torch.Tensor) -> None:
        self.q.shift.copy_(genes.to(self.q.shift))

    def mutate(self, genes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = genes.numel()
        pick = torch.rand(n, generator=gen) < min(1.0, PTF_CHANNELS / n)
        pick[int(torch.randint(n, (), generator=gen))] = True
        step = _sign(gen, (n,)).double()
        moved = genes + step
        moved = torch.where((moved < 0) | (moved > self.q.max_shift), genes - step, moved)  # at an end: back
        return torch.where(pick, moved, genes)


class ScaleKnob(Knob):
    """A uniform quantizer's scale under the release's mutation (``attn``/``mlp``/``act`` groups): every element
    ``|s + U(-r, r)|`` (absolute) or ``|s + U(-r, r)·|s||`` (relative); for a weight quantizer of a layer whose
    rounding is fixed, ``layer`` is given and the weight is rounded again from its continuous weights."""

    def __init__(self, name: str, q: UniformQuantizer, cfg: EvolQOptions, layer: QWeighted | None = None,
                 source: torch.Tensor | None = None):
        self.name, self.q, self.layer = name, q, layer
        self.live = {"scale": q.scale}
        self.relative = cfg.mutation == "relative"
        self.radius = cfg.radius if cfg.radius is not None else default_radius(q.bits)
        self.source = source
        if source is not None:
            self.live["weight"] = layer.weight
            with torch.no_grad():  # the rounding GPTQ/recon chose: its code minus the nearest code on the grid
                s, z = q._view(q.scale, source), q._view(q.zero_point, source)
                nearest = torch.clamp(torch.round(source / s) + z, q.qmin, q.qmax)
                self.offset = torch.round(layer.weight.detach() / s) + z - nearest

    def genes(self) -> torch.Tensor:
        return self.q.scale.detach().double().reshape(-1).cpu().clone()

    @torch.no_grad()
    def apply(self, genes: torch.Tensor) -> None:
        q = self.q
        q.scale.copy_(genes.reshape(q.scale.shape).to(q.scale))
        if self.source is None:
            return
        s, z = q._view(q.scale, self.source), q._view(q.zero_point, self.source)
        nearest = torch.clamp(torch.round(self.source / s) + z, q.qmin, q.qmax)
        codes = torch.clamp(nearest + self.offset, q.qmin, q.qmax)
        self.layer.weight.copy_((codes - z) * s)

    def mutate(self, genes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = (torch.rand(genes.shape, generator=gen, dtype=torch.float32) * 2.0 - 1.0).double()
        step = noise * self.radius * (genes.abs() if self.relative else 1.0)
        return (genes + step).abs().clamp_min(EPS)


def continuous_weights(layer: QWeighted) -> tuple[torch.Tensor | None, str]:
    """(the continuous weights ``wscale_pre`` rounds again, or None to let the forward round the layer's own
    weights; where they come from)."""
    for attr, what in ((UNROUNDED, "reconstruction's continuous start"), (CONTINUOUS, "GPTQ's compensated weights")):
        w = getattr(layer, attr, None)
        if w is not None and tuple(w.shape) == tuple(layer.weight.shape):
            return w.detach().to(layer.weight), what
    q = layer.weight_quant
    with torch.no_grad():
        on_grid = torch.equal(q.fake_quant(layer.weight.detach()), layer.weight.detach())
    return None, ("on its grid, no continuous weights" if on_grid else "the layer's weights (rounded by the forward)")


class KnobSpace:
    """The knobs of one block; ``skipped`` names what a group found but could not search (and why)."""

    def __init__(self, knobs: list[Knob], skipped: dict[str, str], sources: dict[str, str]):
        self.knobs, self.skipped, self.sources = knobs, skipped, sources

    def live(self) -> list[tuple[str, torch.Tensor]]:
        return [(f"{k.name}.{b}", t) for k in self.knobs for b, t in k.live.items()]

    def num_genes(self) -> int:
        return sum(k.genes().numel() for k in self.knobs)


def knob_space(unit_name: str, block: nn.Module, cfg: EvolQOptions) -> KnobSpace:
    """The knobs of ``block`` for the groups of ``cfg.search``, in a fixed order."""
    groups = set(cfg.search)
    knobs: list[Knob] = []
    skipped: dict[str, str] = {}
    sources: dict[str, str] = {}
    mods = [(f"{unit_name}.{n}", m) for n, m in block.named_modules()]
    for name, m in mods:
        if isinstance(m, Quantizer) and not bool(m.initialized):
            if m.role != "weight" and any(g in groups for g in ("logq", "heads", "ptf", "act")):
                raise VitqError(f"{name} is not calibrated: run a calibration method before the evolq refiner")
    if groups & {"attn", "mlp"}:
        paths = search_paths(block, groups & {"attn", "mlp"})
        if paths is None:
            raise VitqError(f"block {unit_name} ({type(block).__name__}) has no evolq search rule in any model "
                            "family (a family declares one with Family.search_paths)")
        for p in paths:
            q = block.get_submodule(p)
            if not isinstance(q, UniformQuantizer):
                raise VitqError(f"{unit_name}.{p} is a {type(q).__name__}; evolq perturbs uniform quantizer scales")
            knobs.append(ScaleKnob(f"{unit_name}.{p}", q, cfg))
    if "wscale_pre" in groups:
        for name, m in mods:
            if not isinstance(m, QWeighted) or not isinstance(m.weight_quant, UniformQuantizer):
                continue
            if not bool(m.weight_quant.initialized):
                raise VitqError(f"{name} is not calibrated: run a calibration method before the evolq refiner")
            source, what = continuous_weights(m)
            if source is None and what.startswith("on its grid"):
                skipped[f"{name}.weight_quant"] = what
                continue
            sources[name] = what
            knobs.append(ScaleKnob(f"{name}.weight_quant", m.weight_quant, cfg, m if source is not None else None,
                                   source))
    for name, m in mods:
        if not isinstance(m, Quantizer) or m.role == "weight":
            continue
        if "logq" in groups and isinstance(m, (AdaLogQuantizer, LogSqrt2Quantizer)):
            knobs.append(LogKnob(name, m))
        elif "heads" in groups and m.role in ("q", "k", "v"):
            if isinstance(m, UniformQuantizer):
                knobs.append(GainKnob(name, m))
            else:
                skipped[name] = f"a {m.kind} quantizer has no per-head scale to gain"
        elif "ptf" in groups and isinstance(m, PTFQuantizer):
            if m.max_shift > 0:
                knobs.append(ShiftKnob(name, m))
            else:
                skipped[name] = "a PTF quantizer without shifts (max_shift 0)"
        elif "act" in groups and isinstance(m, UniformQuantizer):
            knobs.append(ScaleKnob(name, m, cfg))
    return KnobSpace(knobs, skipped, sources)


def _apply(member: list[torch.Tensor | None], knobs: list[Knob], start: dict[str, torch.Tensor]) -> None:
    for gene, k in zip(member, knobs, strict=True):
        if gene is None:  # the start state, bit for bit
            for b, t in k.live.items():
                t.copy_(start[f"{k.name}.{b}"])
        else:
            k.apply(gene)


def _mutate(member: list, knobs: list[Knob], starts: list[torch.Tensor], gen: torch.Generator) -> list:
    n = len(knobs)
    pick = torch.rand(n, generator=gen) < 1.0 / n
    pick[int(torch.randint(n, (), generator=gen))] = True
    child = list(member)
    for i in torch.nonzero(pick).flatten().tolist():
        genes = knobs[i].mutate(starts[i] if member[i] is None else member[i], gen)
        child[i] = None if torch.equal(genes, starts[i]) else genes
    return child


@torch.no_grad()
def search_knobs(evaluator: FitnessEvaluator, unit: int, space: KnobSpace, cfg: EvolQOptions,
                 gen: torch.Generator) -> tuple[float, float, int]:
    """Evolve the knobs of one block; leaves the best member applied. Returns (before, after, evaluations).
    The start is in the population and only the worst member is dropped (ties: the newest), so the result is
    never worse than the start on the search images."""
    evaluator.cache_inputs(unit)
    before = evaluator.evaluate(unit)
    knobs = space.knobs
    if not knobs:
        return before, before, 1
    start = {n: t.detach().clone() for n, t in space.live()}
    starts = [k.genes() for k in knobs]
    pop: list[list] = [[None] * len(knobs) for _ in range(cfg.population)]
    fit = [before] * cfg.population
    evals = 1
    for _ in range(cfg.cycles):
        new = []
        for _ in range(cfg.children):
            drawn = torch.randint(len(pop), (cfg.sample,), generator=gen).tolist()
            parent = min(drawn, key=lambda j: (fit[j], j))
            child = _mutate(pop[parent], knobs, starts, gen)
            _apply(child, knobs, start)
            f = evaluator.evaluate(unit)
            new.append((child, f if math.isfinite(f) else math.inf))
            evals += 1
        replace_worst(pop, fit, new)
    best = min(range(len(fit)), key=lambda j: (fit[j], j))
    _apply(pop[best], knobs, start)
    return before, fit[best], evals

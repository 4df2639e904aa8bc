"""Evol-Q's search of one block: its search space (the quantizers whose scales are perturbed), the scales as
one vector, and the small evolutionary algorithm that improves them (:func:`search_block`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.models.family import search_paths
from vitq.quant.base import EPS
from vitq.quant.uniform import UniformQuantizer
from vitq.refine.evolq_options import EvolQOptions, default_radius
from vitq.refine.fitness import FitnessEvaluator


def search_space(unit_name: str, block: nn.Module, groups: Iterable[str]) -> list[tuple[str, UniformQuantizer]]:
    """(qualified name, quantizer) whose ``scale`` the search perturbs for one block, in a fixed order."""
    out: list[tuple[str, UniformQuantizer]] = []
    groups = set(groups)
    paths = search_paths(block, groups)  # each family declares which weight scales a unit's groups mean
    if paths is None:
        raise VitqError(f"block {unit_name} ({type(block).__name__}) has no evolq search rule in any model family "
                        "(a family declares one with Family.search_paths)")
    for p in paths:
        try:
            q = block.get_submodule(p)
        except AttributeError:
            raise VitqError(f"block {unit_name} ({type(block).__name__}) has no {p}, which its family's search "
                            "rule names") from None
        out.append((f"{unit_name}.{p}", q))
    if "act" in groups:
        out += [(f"{unit_name}.{n}", m) for n, m in block.named_modules()
                if isinstance(m, UniformQuantizer) and m.role != "weight"]
    for name, q in out:
        if not isinstance(q, UniformQuantizer):
            raise VitqError(f"{name} is a {type(q).__name__}; evolq perturbs uniform quantizer scales only")
        if not bool(q.initialized):
            raise VitqError(f"{name} is not calibrated: run a calibration method before the evolq refiner")
    return out


def get_vector(qs: list[tuple[str, UniformQuantizer]]) -> torch.Tensor:
    return torch.cat([q.scale.detach().reshape(-1) for _, q in qs]).clone()


def set_vector(qs: list[tuple[str, UniformQuantizer]], v: torch.Tensor) -> None:
    i = 0
    for _, q in qs:
        n = q.scale.numel()
        q.scale.copy_(v[i:i + n].reshape(q.scale.shape).to(q.scale))
        i += n


def mutation_radius(qs: list[tuple[str, UniformQuantizer]], cfg: EvolQOptions) -> torch.Tensor:
    """Per element of the search vector: r (absolute) or r·|s| (relative)."""
    parts = []
    for _, q in qs:
        s = q.scale.detach().reshape(-1).float()
        if cfg.mutation == "relative":
            parts.append(s.abs() * cfg.radius)
        else:
            r = cfg.radius if cfg.radius is not None else default_radius(q.bits)
            parts.append(torch.full_like(s, r))
    return torch.cat(parts)


def derive_seed(seed: int, pass_index: int, unit: int) -> int:
    """The seed of one block's search in one pass: resuming needs no saved generator state."""
    return (int(seed) * 1_000_003 + pass_index * 10_007 + unit) % (2**63 - 1)


def replace_worst(pop: list, fit: list[float], new: list[tuple]) -> None:
    """A generation's children (member, fitness) join the population, then as many of its worst members (ties:
    the later one) leave: the population keeps its size."""
    for child, f in new:
        pop.append(child)
        fit.append(f)
    for _ in new:
        worst = max(range(len(fit)), key=lambda j: (fit[j], j))
        del pop[worst], fit[worst]


def search_block(evaluator: FitnessEvaluator, unit: int, qs: list[tuple[str, UniformQuantizer]],
                 cfg: EvolQOptions, gen: torch.Generator) -> tuple[float, float, int]:
    """Evolve the scales of one block; writes back the best member. Returns (before, after, evaluations).

    The best fitness never gets worse: the initial state is in the population and only the worst member is
    dropped (ties: the newest member is dropped and the oldest kept as best)."""
    evaluator.cache_inputs(unit)
    base = get_vector(qs)
    radius = mutation_radius(qs, cfg).to(base)
    before = evaluator.evaluate(unit)
    pop = [base.clone() for _ in range(cfg.population)]
    fit = [before] * cfg.population
    evals = 1
    for _ in range(cfg.cycles):
        new = []
        for _ in range(cfg.children):
            drawn = torch.randint(len(pop), (cfg.sample,), generator=gen).tolist()
            parent = min(drawn, key=lambda j: (fit[j], j))
            noise = (torch.rand(base.shape, generator=gen, dtype=torch.float32) * 2.0 - 1.0).to(base)
            child = (pop[parent] + noise * radius).abs().clamp_min(EPS)
            set_vector(qs, child)
            new.append((child, evaluator.evaluate(unit)))
            evals += 1
        replace_worst(pop, fit, new)
    best = min(range(len(fit)), key=lambda j: (fit[j], j))
    set_vector(qs, pop[best])
    return before, fit[best], evals

"""Evol-Q (ICCV 2023, earlier CPT-V): block-wise evolutionary search of quantization scales (METHODS.md §5).

The loss landscape over quantization scales is jagged, so instead of gradients the search perturbs the
scales of one transformer block at a time (last block to first) with a small evolutionary algorithm and
scores each candidate with a contrastive loss between the quantized and the float network's logits on the
calibration images.

Three modes:

* ``checked`` (the default): the faithful search below, but the calibration images are split (seeded) into
  a search part and a check part (``check_fraction``, default 0.2; unlabelled). The search scores candidates
  on the search part only; after a block's search its new scales are kept only when the fitness on the check
  part (``check_loss``: the same fitness by default, or e.g. KL to the teacher) does not get worse, and are
  reverted otherwise. This stops the search from fitting its calibration images at the cost of unseen ones.
  The returned dict has both curves (``curves``: search and check fitness after every block step).
* ``faithful`` reproduces the official release: the search vector of a block is the per-channel weight
  scales of its attention's qkv and proj layers; population 15, 10 members drawn with replacement, the best
  of them is the parent, child = |parent + U(-r, r)| with an absolute r (the release's: 1e-4 for 8-bit
  weights, 1e-3 for every other width), the child is inserted and the worst member dropped; K = 3 cycles per
  block, P = 10 passes; batches of 100 images (infoNCE negatives = the other 99); no check part. Its option
  ``teacher="int_layernorm"`` computes the "float" targets as the release does, through its integer LayerNorm:
  the calibrated model with only its LayerNorm-input (PTF: residual and norm-input) quantizers active and
  every other quantizer passing values through (in the ``matmul`` regime, which has none, that is the float
  model). The default teacher is the float model.
* ``improved`` (ours): mutation relative to each scale (r = 2 % of |s|, so 3-bit and 8-bit layers get the
  same relative step and activation scales can join), MLP weight scales and the block's activation scales in
  the search space, 4 children per cycle (each from its own tournament), and early stop when a whole pass
  improves the fitness by less than ``min_improvement`` (relative) ``patience`` times in a row; with the
  check part of ``checked``.

Every option is a field of :class:`EvolQConfig`; the effective values go into the returned dict.

Speed: the float logits are computed once; for each block its (quantized) input is computed once, and a
candidate runs only the blocks from the searched one to the end (:class:`FitnessEvaluator`).

Resume: with ``checkpoint_path`` set, the scales and the search state are written atomically after every
completed block. The random numbers of a block are drawn from a generator seeded by (seed, pass, unit), so a
killed search restarted with the same options continues after its last completed block and ends with the
same scales as an uninterrupted run.

Selection never looks at labels unless ``select_on_val`` is set (the release's behaviour: after every block
the validation top-1 is measured; every block of pass 0 is saved unconditionally, later blocks only when the
top-1 improves on the saved one, and the saved state is returned); that needs ``val_batches`` and is recorded.

Precision: the search and its fitness evaluations run in full float32 (``vitq.precision.full_float32``: TF32
off through both of torch's APIs, the caller's settings restored).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.models.trunk import Trunk
from vitq.precision import full_float32
from vitq.quant.base import quantizers_of
from vitq.quant.uniform import PTFQuantizer, UniformQuantizer
from vitq.registry import register_refiner
from vitq.state import read_checkpoint, write_checkpoint

EPS = 1e-8
CHECKPOINT_FORMAT = "vitq-evolq-ckpt-1"
GROUPS = ("attn", "mlp", "act")
TEACHERS = ("float", "int_layernorm")


# ----------------------------------------------------------------------------------------------- fitness

def infonce_loss(zq: torch.Tensor, zf: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """Contrastive loss of Evol-Q for one batch: row i of the quantized logits should match row i of the
    float logits, the other rows of the batch are the negatives. Scaled by 2T as in the official code."""
    q = F.normalize(zq.float(), dim=1)
    k = F.normalize(zf.float(), dim=1)
    sim = q @ k.t() / temperature
    labels = torch.arange(sim.shape[0], device=sim.device)
    return F.cross_entropy(sim, labels) * (2.0 * temperature)


def mse_loss(zq: torch.Tensor, zf: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    return F.mse_loss(zq.float(), zf.float())


def kl_loss(zq: torch.Tensor, zf: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """KL(float ‖ quant) of the class distributions, mean over images (nats)."""
    lp, lq = F.log_softmax(zf.float(), 1), F.log_softmax(zq.float(), 1)
    return (lp.exp() * (lp - lq)).sum(1).mean()


def cosine_loss(zq: torch.Tensor, zf: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(zq.float(), zf.float(), dim=1).mean()


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "infonce": infonce_loss, "mse": mse_loss, "kl": kl_loss, "cosine": cosine_loss,
}


class FitnessEvaluator:
    """Fitness (lower is better) of the quantized model's current state over the calibration batches.

    The float logits are computed once. ``cache_inputs(unit)`` stores the input of one unit for every
    batch; ``evaluate(unit)`` then runs only units ``unit..end``. ``evaluate(None)`` runs the whole model
    (the reference the cached path must equal). Each evaluation's time is recorded per unit.
    """

    def __init__(self, qmodel: nn.Module, float_model: nn.Module, calib: CalibData, loss: str = "infonce",
                 temperature: float = 3.0):
        if loss not in LOSSES:
            raise VitqError(f"fitness loss {loss!r} is unknown (expected one of {', '.join(LOSSES)})")
        self.qmodel, self.calib = qmodel, calib
        self.trunk = Trunk(qmodel)
        self.loss_name, self.temperature = loss, float(temperature)
        self._loss = LOSSES[loss]
        with torch.no_grad():  # float_model: the teacher (the float model, or see int_layernorm_teacher)
            self.float_logits = [float_model(x).float() for x in calib.batches()]
        self.cached_unit: int | None = None
        self._inputs: list[torch.Tensor] = []
        self.times: dict[int | None, list[float]] = {}
        self.cache_seconds = 0.0

    @torch.no_grad()
    def cache_inputs(self, unit: int) -> None:
        t0 = time.perf_counter()
        self._inputs = [self.trunk.input_of(unit, x) for x in self.calib.batches()]
        self.cached_unit = unit
        self.cache_seconds += time.perf_counter() - t0

    @torch.no_grad()
    def logits(self, unit: int | None = None) -> list[torch.Tensor]:
        if unit is None:
            return [self.qmodel(x).float() for x in self.calib.batches()]
        if unit != self.cached_unit:
            self.cache_inputs(unit)
        return [self.trunk.forward_from(unit, h).float() for h in self._inputs]

    @torch.no_grad()
    def evaluate(self, unit: int | None = None) -> float:
        if unit is not None and unit != self.cached_unit:
            self.cache_inputs(unit)
        t0 = time.perf_counter()
        total = 0.0
        if unit is None:
            batches = (self.qmodel(x) for x in self.calib.batches())
        else:
            batches = (self.trunk.forward_from(unit, h) for h in self._inputs)
        for zq, zf in zip(batches, self.float_logits, strict=True):
            total += float(self._loss(zq, zf, self.temperature))
        value = total / len(self.float_logits)  # mean over batches, as the official code
        self.times.setdefault(unit, []).append(time.perf_counter() - t0)
        return value if math.isfinite(value) else math.inf


# ------------------------------------------------------------------------------------------ configuration

@dataclass(frozen=True)
class EvolQConfig:
    mode: str = "checked"
    passes: int = 10  # P: passes over all blocks
    cycles: int = 3  # K: generations per block
    population: int = 15
    sample: int = 10  # members drawn (with replacement) per tournament; the best is the parent
    children: int = 1  # children per generation (each from its own tournament)
    loss: str = "infonce"
    temperature: float = 3.0
    search: tuple[str, ...] = ("attn",)  # attn = qkv+proj weight scales, mlp = fc1+fc2, act = block activations
    mutation: str = "absolute"  # absolute: U(-r, r); relative: U(-r, r) * |s|
    radius: float | None = None  # r; None with absolute mutation = by weight bits (see default_radius)
    patience: int | None = None  # early stop after this many passes improving less than min_improvement;
    # None or 0 = never stop early
    min_improvement: float = 1e-4  # relative improvement of the fitness over one pass
    select_on_val: bool = False  # release behaviour: keep the state with the best validation top-1
    batch_size: int = 100  # images per fitness batch (infoNCE negatives = batch - 1), the release's 100
    check_fraction: float = 0.2  # share of the calibration images held out as the check part (0 = none)
    check_loss: str | None = None  # fitness on the check part; None = the search's loss
    teacher: str = "float"  # float, or int_layernorm (the release's targets, see the module docstring)
    seed: int | None = None  # None = the calibration seed
    checkpoint_path: str | None = None  # resume file, written after every block; None = no checkpoint

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["search"] = list(self.search)
        return d


PRESETS: dict[str, dict] = {
    "checked": {},
    "faithful": {"check_fraction": 0.0},
    "improved": {"children": 4, "search": ("attn", "mlp", "act"), "mutation": "relative", "radius": 0.02,
                 "patience": 2},
}
FIELDS = {f.name for f in dataclasses.fields(EvolQConfig)}


def make_config(options: dict) -> EvolQConfig:
    """The mode's preset, then the options given (a user option always wins), validated."""
    mode = options.get("mode") or "checked"
    if mode not in PRESETS:
        raise VitqError(f"evolq mode {mode!r} is unknown (expected one of {', '.join(PRESETS)})")
    unknown = sorted(set(options) - FIELDS)
    if unknown:
        raise VitqError(f"unknown evolq options {unknown} (expected some of {sorted(FIELDS)})")
    values = {**PRESETS[mode], **{k: v for k, v in options.items() if v is not None}, "mode": mode}
    if isinstance(values.get("search"), str):
        values["search"] = tuple(s.strip() for s in values["search"].split(",") if s.strip())
    values["search"] = tuple(values.get("search", ("attn",)))
    if values.get("mutation") == "relative" and values.get("radius") is None:
        values["radius"] = 0.02
    cfg = EvolQConfig(**values)
    _check(cfg)
    return cfg


def _check(cfg: EvolQConfig) -> None:
    def need(ok: bool, what: str, expected: str) -> None:
        if not ok:
            raise VitqError(f"--evolq-{what.replace('_', '-')} {getattr(cfg, what)!r} is invalid (expected "
                            f"{expected})")

    need(isinstance(cfg.passes, int) and cfg.passes >= 1, "passes", "an integer >= 1")
    need(isinstance(cfg.cycles, int) and cfg.cycles >= 1, "cycles", "an integer >= 1")
    need(isinstance(cfg.population, int) and cfg.population >= 2, "population", "an integer >= 2")
    need(isinstance(cfg.sample, int) and cfg.sample >= 1, "sample", "an integer >= 1")
    need(isinstance(cfg.children, int) and 1 <= cfg.children < cfg.population, "children",
         "an integer >= 1 and smaller than the population")
    need(cfg.loss in LOSSES, "loss", f"one of {', '.join(LOSSES)}")
    need(cfg.temperature > 0, "temperature", "a positive number")
    need(len(cfg.search) > 0 and all(g in GROUPS for g in cfg.search) and len(set(cfg.search)) == len(cfg.search),
         "search", f"a comma-separated subset of {', '.join(GROUPS)}")
    need(cfg.mutation in ("absolute", "relative"), "mutation", "absolute or relative")
    need(cfg.radius is None or cfg.radius > 0, "radius", "a positive number")
    need(cfg.patience is None or (isinstance(cfg.patience, int) and cfg.patience >= 0), "patience",
         "an integer >= 0 (0 or none: no early stop)")
    need(cfg.min_improvement >= 0, "min_improvement", "a number >= 0")
    need(isinstance(cfg.batch_size, int) and cfg.batch_size >= 2, "batch_size",
         "an integer >= 2 (infoNCE needs negatives)")
    need(0.0 <= cfg.check_fraction < 1.0, "check_fraction", "a number in [0, 1)")
    need(cfg.check_loss is None or cfg.check_loss in LOSSES, "check_loss", f"one of {', '.join(LOSSES)}")
    need(cfg.teacher in TEACHERS, "teacher", f"one of {', '.join(TEACHERS)}")


def default_radius(bits: int) -> float:
    """Absolute mutation radius of the release: 1e-4 for 8-bit weights (and wider), 1e-3 for every other width
    (the release tests ``bits == 8``; 5-7-bit weights get 1e-3 as there)."""
    return 1e-4 if bits >= 8 else 1e-3


# ------------------------------------------------------------------------------------------- search space

def search_space(unit_name: str, block: nn.Module, groups: Iterable[str]) -> list[tuple[str, UniformQuantizer]]:
    """(qualified name, quantizer) whose ``scale`` the search perturbs for one block, in a fixed order."""
    out: list[tuple[str, UniformQuantizer]] = []
    groups = set(groups)
    paths = []
    if "attn" in groups:
        paths += ["attn.qkv.weight_quant", "attn.proj.weight_quant"]
    if "mlp" in groups:
        paths += ["mlp.fc1.weight_quant", "mlp.fc2.weight_quant"]
    from vitq.models.family import search_paths  # CNN, LeViT and HF units: their family's rule

    family_paths = search_paths(block, groups)
    paths = family_paths if family_paths is not None else paths
    for p in paths:
        try:
            q = block.get_submodule(p)
        except AttributeError:
            raise VitqError(f"block {unit_name} has no {p} (evolq searches timm ViT/Swin blocks)") from None
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


def mutation_radius(qs: list[tuple[str, UniformQuantizer]], cfg: EvolQConfig) -> torch.Tensor:
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


def search_block(evaluator: FitnessEvaluator, unit: int, qs: list[tuple[str, UniformQuantizer]],
                 cfg: EvolQConfig, gen: torch.Generator) -> tuple[float, float, int]:
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
        for child, f in new:
            pop.append(child)
            fit.append(f)
        for _ in new:
            worst = max(range(len(fit)), key=lambda j: (fit[j], j))
            del pop[worst], fit[worst]
    best = min(range(len(fit)), key=lambda j: (fit[j], j))
    set_vector(qs, pop[best])
    return before, fit[best], evals


# --------------------------------------------------------------------------------------------- checkpoint

def _write_checkpoint(path: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    write_checkpoint(path, tensors, meta, CHECKPOINT_FORMAT)


def _read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    return read_checkpoint(path, CHECKPOINT_FORMAT, "evolq")


# ------------------------------------------------------------------------------------------------ refiner

@torch.no_grad()
def val_top1(model: nn.Module, val_batches, device) -> float:
    batches = val_batches() if callable(val_batches) else val_batches
    hit = n = 0
    for x, y in batches:
        pred = model(x.to(device)).argmax(1).cpu()
        hit += int((pred == y.cpu()).sum())
        n += int(y.shape[0])
    if n == 0:
        raise VitqError("select_on_val: the validation batches are empty")
    return 100.0 * hit / n


def _add_arguments(group) -> None:
    group.add_argument("--evolq-mode", choices=sorted(PRESETS), default=None,
                       help="checked (default) = the release's search scored on a search part of the calibration "
                            "images, a block's new scales kept only if the held-out check part does not get "
                            "worse; faithful = the official release (no check part); improved = relative "
                            "mutation, MLP and activation scales, 4 children per generation, early stop, check part")
    group.add_argument("--evolq-passes", type=int, default=None, metavar="P", help="passes over all blocks (10)")
    group.add_argument("--evolq-cycles", type=int, default=None, metavar="K", help="generations per block (3)")
    group.add_argument("--evolq-loss", choices=sorted(LOSSES), default=None, help="fitness (infonce)")
    group.add_argument("--evolq-temperature", type=float, default=None, metavar="T", help="infoNCE temperature (3.0)")
    group.add_argument("--evolq-population", type=int, default=None, metavar="N", help="population size (15)")
    group.add_argument("--evolq-sample", type=int, default=None, metavar="N", help="tournament size (10)")
    group.add_argument("--evolq-children", type=int, default=None, metavar="N",
                       help="children per generation (faithful/checked 1, improved 4)")
    group.add_argument("--evolq-search", default=None, metavar="GROUPS",
                       help="comma-separated subset of attn,mlp,act (faithful/checked attn, improved attn,mlp,act)")
    group.add_argument("--evolq-mutation", choices=("absolute", "relative"), default=None,
                       help="absolute U(-r,r) (faithful/checked) or relative U(-r,r)*|s| (improved)")
    group.add_argument("--evolq-radius", type=float, default=None, metavar="R",
                       help="mutation radius (faithful/checked: 1e-4 for 8-bit weights, 1e-3 otherwise, as the "
                            "release; improved 0.02)")
    group.add_argument("--evolq-patience", type=int, default=None, metavar="N",
                       help="stop after N passes that improve the fitness less than --evolq-min-improvement "
                            "(faithful/checked: never; improved: 2; 0 = never)")
    group.add_argument("--evolq-min-improvement", type=float, default=None, metavar="F",
                       help="relative fitness improvement per pass that counts as progress (1e-4)")
    group.add_argument("--evolq-batch-size", type=int, default=None, metavar="N",
                       help="images per fitness batch, independent of --batch-size (100, the release's; infoNCE "
                            "negatives = N - 1)")
    group.add_argument("--evolq-check-fraction", type=float, default=None, metavar="F",
                       help="share of the calibration images held out (seeded) as the check part (checked and "
                            "improved 0.2, faithful 0 = no check)")
    group.add_argument("--evolq-check-loss", choices=sorted(LOSSES), default=None,
                       help="fitness on the check part (default: the search's --evolq-loss)")
    group.add_argument("--evolq-teacher", choices=TEACHERS, default=None,
                       help="targets: float (default) or int_layernorm = the release's, through its integer "
                            "LayerNorm (the calibrated model with only its LayerNorm-input/PTF quantizers on)")
    group.add_argument("--evolq-checkpoint-path", default=None, metavar="FILE",
                       help="resume file written after every block (default OUT.evolq-ckpt beside --out); a "
                            "rerun of the same command continues from it; removed after success")
    group.add_argument("--evolq-select-on-val", action="store_true", default=None,
                       help="REPRODUCTION ONLY, as the release: after every block measure top-1 on the --val "
                            "images; every block of pass 0 is saved unconditionally, later blocks only when "
                            "top-1 beats the saved state, and the saved state is the result (selects on "
                            "evaluation labels; recorded in results.json)")


class _PassThrough:
    """An observer that records nothing: a quantizer with it attached is the identity."""

    def update(self, x: torch.Tensor) -> None:
        pass


def int_layernorm_teacher(qmodel: nn.Module) -> nn.Module:
    """The release's "float" model: a copy of the calibrated model in which only the LayerNorm-input quantizers
    (PTF: the residual stream and the inputs of the other LayerNorms) quantize; every other quantizer passes
    values through. Built once from the state before the search (the search never changes PTF scales)."""
    teacher = copy.deepcopy(qmodel).eval()
    for q in quantizers_of(teacher).values():
        if not isinstance(q, PTFQuantizer):
            q.observer = _PassThrough()  # a quantizer with an observer attached passes values through
    teacher.vitq_ptf_quantizers = sum(isinstance(q, PTFQuantizer) for q in quantizers_of(teacher).values())
    return teacher


def split_calibration(calib: CalibData, cfg: EvolQConfig, seed: int) -> tuple[CalibData, CalibData | None]:
    """(search part, check part or None), both batched by ``cfg.batch_size``; the check part is a seeded random
    ``check_fraction`` of the images."""
    n = len(calib)

    def part(images):
        return CalibData(images, batch_size=min(cfg.batch_size, images.shape[0]), device=calib.device,
                         progress=calib.progress, seed=calib.seed)

    if cfg.check_fraction <= 0:
        return part(calib.images), None
    k = int(round(cfg.check_fraction * n))
    if k < 2 or n - k < 2:
        raise VitqError(f"evolq check_fraction={cfg.check_fraction} leaves {k} check and {n - k} search images of "
                        f"{n} (expected at least 2 of each: use more calibration images or another fraction)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, 7919, 0)))
    check_idx, search_idx = perm[:k].sort().values, perm[k:].sort().values
    return part(calib.images[search_idx]), part(calib.images[check_idx])


@register_refiner("evolq", "Evol-Q / CPT-V: block-wise evolutionary search of quantization scales scored by an "
                  "infoNCE loss against the float model; by default a block's change is kept only if a held-out "
                  "check part of the calibration images does not get worse (METHODS.md §5)",
                  add_arguments=_add_arguments, validate=make_config,
                  quick_options={"passes": 1, "cycles": 1, "population": 6, "sample": 3},
                  expected_time="DeiT-Tiny, defaults (10 passes): ~1.5 h on 2 CPU cores over 250 images "
                                "(extrapolated from 2 passes / 100 images = 430 s); ~40 s on an H100 over 200 "
                                "images (BENCHMARKS.md evolq sections)")
def evolq(model: nn.Module, float_model: nn.Module, calib: CalibData, val_batches=None,
          on_block_end: Callable[[dict], None] | None = None, **options) -> dict:
    """Refine ``model`` in place. ``val_batches`` (list of (images, labels), or a callable returning an
    iterable of them) is read only with ``select_on_val``. ``on_block_end(event)`` is called after each
    block (and its checkpoint); tests use it to simulate a kill. Runs in full float32 (no TF32)."""
    with full_float32():
        return _evolq(model, float_model, calib, val_batches, on_block_end, **options)


def _evolq(model: nn.Module, float_model: nn.Module, calib: CalibData, val_batches=None,
           on_block_end: Callable[[dict], None] | None = None, **options) -> dict:
    cfg = make_config(options)
    seed = cfg.seed if cfg.seed is not None else calib.seed
    if cfg.select_on_val and val_batches is None:
        raise VitqError("evolq select_on_val needs labelled validation batches (API: val_batches=[(images, "
                        "labels), ...] or a callable returning them; CLI: --val DIR)")
    model.eval()
    float_model.eval()
    t_start = time.perf_counter()
    search_calib, check_calib = split_calibration(calib, cfg, seed)
    teacher = int_layernorm_teacher(model) if cfg.teacher == "int_layernorm" else float_model
    evaluator = FitnessEvaluator(model, teacher, search_calib, cfg.loss, cfg.temperature)
    checker = None if check_calib is None else \
        FitnessEvaluator(model, teacher, check_calib, cfg.check_loss or cfg.loss, cfg.temperature)
    order = list(reversed(evaluator.trunk.blocks()))
    if not order:
        raise VitqError("the model has no transformer blocks for evolq to search")
    spaces = {unit: search_space(name, block, cfg.search) for unit, name, block in order}
    all_qs = [nq for unit, _, _ in reversed(order) for nq in spaces[unit]]
    initial = evaluator.evaluate(None)  # whole-model forward: also the reference time for the block cache
    check_initial = checker.evaluate(None) if checker is not None else None

    state = {"pass": 0, "position": 0, "trace": [], "evaluations": 1, "pass_start": initial, "stale": 0,
             "stopped_early_after_pass": None, "done": False, "val": None, "runs": 0, "check": check_initial,
             "rejected": 0}
    valbest: dict[str, torch.Tensor] = {}
    if cfg.select_on_val:
        top1 = val_top1(model, val_batches, calib.device)
        state["val"] = {"rule": "release: every block of pass 0 saved unconditionally, later blocks only when "
                                "val top-1 beats the saved state",
                        "initial_top1": top1, "best_top1": top1, "selected_after": None, "top1_trace": []}
        valbest = {n: q.scale.detach().clone() for n, q in all_qs}
    fingerprint = {"config": {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_path"}, "seed": seed,
                   "quantizers": [n for n, _ in all_qs], "num_calib": len(calib), "batch_size": cfg.batch_size,
                   "initial_fitness": initial}
    resumed = None
    path = cfg.checkpoint_path
    if path and os.path.exists(path):
        tensors, meta = _read_checkpoint(path)
        _check_fingerprint(path, meta["fingerprint"], fingerprint)
        qmap = dict(all_qs)
        for n, q in qmap.items():
            q.scale.copy_(tensors[f"scale::{n}"].to(q.scale))
        if cfg.select_on_val:
            valbest = {n: tensors[f"valbest::{n}"].to(q.scale) for n, q in qmap.items()}
        state = meta["state"]
        resumed = {"from_pass": state["pass"], "from_position": state["position"], "done": state["done"]}
    state["runs"] += 1

    def save_checkpoint() -> None:
        if not path:
            return
        tensors = {f"scale::{n}": q.scale for n, q in all_qs}
        tensors.update({f"valbest::{n}": t for n, t in valbest.items()})
        _write_checkpoint(path, tensors, {"fingerprint": fingerprint, "state": state})

    total_steps = cfg.passes * len(order)
    bar = calib.bar(None, "evolq", total=total_steps)
    bar.update(min(total_steps, state["pass"] * len(order) + state["position"]))
    try:
        while not state["done"] and state["pass"] < cfg.passes:
            p = state["pass"]
            for pos in range(state["position"], len(order)):
                unit, name, _ = order[pos]
                t0 = time.perf_counter()
                gen = torch.Generator().manual_seed(derive_seed(seed, p, unit))
                start = get_vector(spaces[unit])
                before, candidate, n = search_block(evaluator, unit, spaces[unit], cfg, gen)
                entry = {"pass": p, "block": name, "before": before, "candidate": candidate, "after": candidate,
                         "evaluations": n}
                if checker is not None:
                    entry["check_before"] = state["check"]
                    entry["check_candidate"] = None
                    entry["kept"] = True
                    if not torch.equal(get_vector(spaces[unit]), start):
                        checker.cache_inputs(unit)
                        c = checker.evaluate(unit)
                        entry["check_candidate"] = c
                        if c > state["check"]:  # the held-out part got worse: undo this block's change
                            set_vector(spaces[unit], start)
                            entry["kept"], entry["after"] = False, before
                            state["rejected"] += 1
                        else:
                            state["check"] = c
                    entry["check"] = state["check"]
                entry["seconds"] = time.perf_counter() - t0
                if cfg.select_on_val:
                    top1 = val_top1(model, val_batches, calib.device)
                    entry["val_top1"] = top1
                    state["val"]["top1_trace"].append(top1)
                    if p == 0 or top1 > state["val"]["best_top1"]:  # the release's rule
                        state["val"]["best_top1"] = top1
                        state["val"]["selected_after"] = {"pass": p, "block": name}
                        valbest = {m: q.scale.detach().clone() for m, q in all_qs}
                state["trace"].append(entry)
                state["evaluations"] += n
                state["position"] = pos + 1
                save_checkpoint()
                bar.update(1)
                bar.set_postfix_str(f"pass {p + 1}/{cfg.passes} {name} best {entry['after']:.4f}")
                if on_block_end is not None:
                    on_block_end({"pass": p, "block": name, "position": pos})
            # end of a pass: early-stop bookkeeping, then move on
            now = state["trace"][-1]["after"] if state["trace"] else state["pass_start"]
            start_fit = state["pass_start"]
            gain = (start_fit - now) / abs(start_fit) if start_fit not in (0.0, math.inf) else 0.0
            state["stale"] = state["stale"] + 1 if gain < cfg.min_improvement else 0
            state["pass_start"] = now
            state["pass"], state["position"] = p + 1, 0
            if cfg.patience and state["stale"] >= cfg.patience:
                state["stopped_early_after_pass"] = p
                state["done"] = True
            save_checkpoint()
        state["done"] = True
        save_checkpoint()
    finally:
        bar.close()

    if cfg.select_on_val:
        for n, q in all_qs:
            q.scale.copy_(valbest[n])
    final = evaluator.evaluate(None)
    check_final = checker.evaluate(None) if checker is not None else None
    out = _report(cfg, seed, evaluator, order, spaces, state, initial, final, resumed,
                  time.perf_counter() - t_start)
    out["fitness"]["search_images"] = len(search_calib)
    out["teacher"] = ("float model" if cfg.teacher == "float" else
                      f"int_layernorm: the calibrated model with only its {teacher.vitq_ptf_quantizers} "
                      "LayerNorm-input (PTF) quantizers active")
    out["curves"] = {"search": [initial] + [e["after"] for e in state["trace"]]}
    if checker is not None:
        out["check"] = {"loss": cfg.check_loss or cfg.loss, "num_images": len(check_calib),
                        "fraction": cfg.check_fraction, "initial": check_initial, "final": check_final,
                        "rejected_steps": state["rejected"], "steps": len(state["trace"])}
        out["curves"]["check"] = [check_initial] + [e["check"] for e in state["trace"]]
    return out


def _check_fingerprint(path: str, saved: dict, now: dict) -> None:
    for key in ("config", "seed", "quantizers", "num_calib", "batch_size"):
        if saved.get(key) != now[key]:
            raise VitqError(f"evolq checkpoint {path} belongs to another search ({key} differs: "
                            f"{str(saved.get(key))[:80]} vs {str(now[key])[:80]}); delete it or use the same "
                            "options")
    a, b = saved["initial_fitness"], now["initial_fitness"]
    if not math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7):
        raise VitqError(f"evolq checkpoint {path} was made from another starting model (initial fitness "
                        f"{a:.6g} vs {b:.6g}); delete it or start from the same calibration")


def _report(cfg: EvolQConfig, seed: int, ev: FitnessEvaluator, order, spaces, state: dict, initial: float,
            final: float, resumed, seconds: float) -> dict:
    config = cfg.to_dict()
    config["seed"] = seed
    if cfg.mutation == "absolute" and cfg.radius is None:
        bits = sorted({q.bits for qs in spaces.values() for _, q in qs})
        config["radius"] = {f"{b}-bit": default_radius(b) for b in bits}
    per_block = {}
    for unit, name, _ in order:
        ts = ev.times.get(unit, [])
        if ts:
            per_block[name] = sum(ts) / len(ts)
    cached = [t for u, ts in ev.times.items() if u is not None for t in ts]
    full = ev.times.get(None, [])
    full_mean = sum(full) / len(full) if full else float("nan")
    cached_mean = sum(cached) / len(cached) if cached else float("nan")
    out = {
        "config": config,
        "fitness": {"loss": cfg.loss, "temperature": cfg.temperature, "initial": initial, "final": final,
                    "gain": initial - final, "num_calib": len(ev.calib), "batch_size": ev.calib.batch_size},
        "search_space": {"groups": list(cfg.search),
                         "scales_per_block": {name: sum(q.scale.numel() for _, q in spaces[u])
                                              for u, name, _ in order},
                         "quantizers_per_block": {name: [n for n, _ in spaces[u]] for u, name, _ in order}},
        "passes_done": state["pass"],
        "stopped_early_after_pass": state["stopped_early_after_pass"],
        "evaluations": state["evaluations"],
        "trace": state["trace"],
        "fitness_eval_seconds": {
            "per_block": per_block,
            "block_cached_mean": cached_mean,
            "full_forward": full_mean,
            "speedup_vs_full_forward": full_mean / cached_mean if cached and full else float("nan"),
            "total": sum(cached) + sum(full),
            "count_this_run": len(cached) + len(full),
            "input_cache_total": ev.cache_seconds,
        },
        "search_seconds": seconds,
        "select_on_val": cfg.select_on_val,
        "checkpoint": {"path": cfg.checkpoint_path, "resumed": resumed, "runs": state["runs"]},
    }
    if cfg.select_on_val:
        out["val_selection"] = {"WARNING": "selected on evaluation labels (reproduction of the release only)",
                                **state["val"]}
    return out

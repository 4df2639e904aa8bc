"""Evol-Q (ICCV 2023, earlier CPT-V): block-wise evolutionary search of quantization scales (METHODS.md §5).

The loss landscape over quantization scales is jagged, so instead of gradients the search perturbs the
scales of one transformer block at a time (last block to first) with a small evolutionary algorithm and
scores each candidate with a contrastive loss between the quantized and the float network's logits on the
calibration images.

Four modes:

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
* ``discrete`` (issue 26): the knobs gradients and reconstruction cannot reach
  (:mod:`vitq.refine.evolq_discrete`: log quantizers' base and top level, per-head q/k/v gains, PTF shifts, and
  weight scales with the weights rounded again from their continuous values), scored by KL(float ‖ quant)
  over every search image, with the check part (KL too) of ``checked``: a block's change that makes the
  held-out part worse is reverted. One short pass by default.

Every option is a field of :class:`vitq.refine.evolq_options.EvolQOptions`; the effective values go into the
returned dict.

Speed: the float logits are computed once; for each block its (quantized) input is computed once, and a
candidate runs only the blocks from the searched one to the end
(:class:`vitq.refine.fitness.FitnessEvaluator`).

Resume: with ``checkpoint_path`` set, the scales and the search state are written atomically after every
completed block. The random numbers of a block are drawn from a generator seeded by (seed, pass, unit), so a
killed search restarted with the same options continues after its last completed block and ends with the
same scales as an uninterrupted run.

Selection never looks at labels unless ``select_on_val`` is set (the release's behaviour: after every block
the validation top-1 is measured; every block of pass 0 is saved unconditionally, later blocks only when the
top-1 improves on the saved one, and the saved state is returned); that needs the run-time ``val_batches``
and is recorded.

Precision: the search and its fitness evaluations run in full float32 (``vitq.precision.full_float32``: TF32
off through both of torch's APIs, the caller's settings restored).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable

import torch
from torch import nn

from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.precision import full_float32
from vitq.quant.base import passthrough, quantizers_of
from vitq.quant.uniform import PTFQuantizer
from vitq.refine.evolq_discrete import KnobSpace, knob_space, search_knobs, uses_knobs
from vitq.refine.evolq_options import EvolQOptions, default_radius
from vitq.refine.evolq_search import derive_seed, search_block, search_space
from vitq.refine.fitness import FitnessEvaluator
from vitq.registry import register_refiner
from vitq.state import read_checkpoint, write_checkpoint

CHECKPOINT_FORMAT = "vitq-evolq-ckpt-1"


def write_search_checkpoint(path: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    write_checkpoint(path, tensors, meta, CHECKPOINT_FORMAT)


def read_search_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    return read_checkpoint(path, CHECKPOINT_FORMAT, "evolq")


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


class IntLayerNormTeacher(nn.Module):
    """The release's "float" model: a copy of the calibrated model in which only the LayerNorm-input quantizers
    (PTF: the residual stream and the inputs of the other LayerNorms) quantize; every other quantizer passes
    values through while it runs."""

    def __init__(self, qmodel: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(qmodel).eval()
        qs = quantizers_of(self.model).values()
        self.others = [q for q in qs if not isinstance(q, PTFQuantizer)]
        self.vitq_ptf_quantizers = sum(isinstance(q, PTFQuantizer) for q in qs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with passthrough(self.others):
            return self.model(x)


def int_layernorm_teacher(qmodel: nn.Module) -> nn.Module:
    """The teacher of ``teacher="int_layernorm"`` (:class:`IntLayerNormTeacher`), built once from the state before
    the search (it keeps the calibrated PTF shifts when the ``ptf`` group changes the model's)."""
    return IntLayerNormTeacher(qmodel).eval()


def split_calibration(calib: CalibData, cfg: EvolQOptions, seed: int) -> tuple[CalibData, CalibData | None]:
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
                  config=EvolQOptions,
                  quick_options={"passes": 1, "cycles": 1, "population": 6, "sample": 3},
                  expected_time="DeiT-Tiny, defaults (10 passes): ~1.5 h on 2 CPU cores over 250 images "
                                "(extrapolated from 2 passes / 100 images = 430 s); ~40 s on an H100 over 200 "
                                "images (BENCHMARKS.md evolq sections)")
def evolq(model: nn.Module, float_model: nn.Module, calib: CalibData, cfg: EvolQOptions, *, val_batches=None,
          on_block_end: Callable[[dict], None] | None = None) -> dict:
    """Refine ``model`` in place. ``val_batches`` (list of (images, labels), or a callable returning an
    iterable of them) is read only with ``select_on_val``. ``on_block_end(event)`` is called after each
    block (and its checkpoint); tests use it to simulate a kill. Runs in full float32 (no TF32)."""
    with full_float32():
        return _search(model, float_model, calib, cfg, val_batches, on_block_end)


@torch.no_grad()  # (nothing here needs gradients; the knob search writes into weights that are parameters)
def _search(model: nn.Module, float_model: nn.Module, calib: CalibData, cfg: EvolQOptions, val_batches,
            on_block_end: Callable[[dict], None] | None) -> dict:
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
    knobs = uses_knobs(cfg.search)
    spaces = {unit: knob_space(name, block, cfg) if knobs else search_space(name, block, cfg.search)
              for unit, name, block in order}
    if knobs and not any(spaces[u].knobs for u, _, _ in order):
        raise VitqError(f"evolq --evolq-search {','.join(cfg.search)} finds nothing to search in this model (no "
                        "log, q/k/v, PTF or weight quantizer of those groups, or every weight already on its grid "
                        "with no continuous weights); pick groups the scheme has")
    all_qs = [nt for unit, _, _ in reversed(order) for nt in _live(spaces[unit])]  # (name, tensor searched)
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
        valbest = {n: t.detach().clone() for n, t in all_qs}
    fingerprint = {"config": {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_path"}, "seed": seed,
                   "quantizers": [n for n, _ in all_qs], "num_calib": len(calib), "batch_size": cfg.batch_size,
                   "initial_fitness": initial}
    resumed = None
    path = cfg.checkpoint_path
    if path and os.path.exists(path):
        tensors, meta = read_search_checkpoint(path)
        _check_fingerprint(path, meta["fingerprint"], fingerprint)
        qmap = dict(all_qs)
        for n, t in qmap.items():
            t.copy_(tensors[f"scale::{n}"].to(t))
        if cfg.select_on_val:
            valbest = {n: tensors[f"valbest::{n}"].to(t) for n, t in qmap.items()}
        state = meta["state"]
        resumed = {"from_pass": state["pass"], "from_position": state["position"], "done": state["done"]}
    state["runs"] += 1

    def save_checkpoint() -> None:
        if not path:
            return
        tensors = {f"scale::{n}": t for n, t in all_qs}
        tensors.update({f"valbest::{n}": t for n, t in valbest.items()})
        write_search_checkpoint(path, tensors, {"fingerprint": fingerprint, "state": state})

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
                start = [t.detach().clone() for _, t in _live(spaces[unit])]
                search = search_knobs if knobs else search_block
                before, candidate, n = search(evaluator, unit, spaces[unit], cfg, gen)
                entry = {"pass": p, "block": name, "before": before, "candidate": candidate, "after": candidate,
                         "evaluations": n}
                if checker is not None:
                    entry["check_before"] = state["check"]
                    entry["check_candidate"] = None
                    entry["kept"] = True
                    if _changed(spaces[unit], start):
                        checker.cache_inputs(unit)
                        c = checker.evaluate(unit)
                        entry["check_candidate"] = c
                        if c > state["check"]:  # the held-out part got worse: undo this block's change
                            _restore(spaces[unit], start)
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
                        valbest = {m: t.detach().clone() for m, t in all_qs}
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
        for n, t in all_qs:
            t.copy_(valbest[n])
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


def _live(space) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of what a block's search changes: the release's scale vector (named by quantizer), or the
    knobs' buffers and re-rounded weights."""
    return space.live() if isinstance(space, KnobSpace) else [(n, q.scale) for n, q in space]


def _changed(space, start: list[torch.Tensor]) -> bool:
    return any(not torch.equal(t, s) for (_, t), s in zip(_live(space), start, strict=True))


@torch.no_grad()
def _restore(space, start: list[torch.Tensor]) -> None:
    for (_, t), s in zip(_live(space), start, strict=True):
        t.copy_(s)


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


def _report(cfg: EvolQOptions, seed: int, ev: FitnessEvaluator, order, spaces, state: dict, initial: float,
            final: float, resumed, seconds: float) -> dict:
    config = cfg.to_dict()
    config["seed"] = seed
    knobs = any(isinstance(sp, KnobSpace) for sp in spaces.values())
    if cfg.mutation == "absolute" and cfg.radius is None and not knobs:
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
                         "quantizers_per_block": {name: [n for n, _ in spaces[u]] for u, name, _ in order}}
        if not knobs else
        {"groups": list(cfg.search), "engine": "knobs (vitq.refine.evolq_discrete)",
         "genes_per_block": {name: spaces[u].num_genes() for u, name, _ in order},
         "knobs_per_block": {name: [k.name for k in spaces[u].knobs] for u, name, _ in order},
         "left_out": {n: why for u, _, _ in order for n, why in spaces[u].skipped.items()},
         "continuous_weights": {n: what for u, _, _ in order for n, what in spaces[u].sources.items()}},
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

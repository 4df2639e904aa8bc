"""Hardware-aware search of what to quantize (after HAGO: a hardware specification says which tensors the target
runs as integer kernels; the search picks, among them, what to quantize under a constraint).

Input: a calibrated model under a deployment target (``Scheme.target``). Its quantizers are put in groups
(:func:`vitq.prepare.quantizer_units`: the target's groups, linear inputs split into fc2's post-GELU input, the
classifier's input and the rest); the groups the model quantizes are searched, those it already leaves float
stay float. Nothing is recalibrated: a configuration sets some groups back to float quantizers.

1. **Sensitivity**, on the calibration images only (no labels anywhere): mean KL(float ‖ model) and top-1
   agreement with the float model, for the all-quantized model, each group alone set back to float (its gain:
   KL(all) − KL(that one float)) and each group alone quantized.
2. **Latency** in the target's runtime on this machine (:mod:`vitq.search.latency`): the same configurations
   exported with vitq's ONNX QDQ writer (OpenVINO reads that file for the openvino target) and timed in
   alternated rounds; per-group costs, additive. Speed-ups are over the float file a user compares against
   (``torch.onnx`` of the float model), with vitq's own float export timed beside it; the record says what this
   CPU offers int8 kernels (VNNI / AVX-512 / AMX, from /proc/cpuinfo), and so does the error when nothing
   reaches ``--min-speedup``.
3. **Solve** (:mod:`vitq.search.solve`): every subset scored by the additive models, the predicted front
   re-measured (accuracy and, in one more alternated timing, latency), and the choice made on measured values.
4. **Apply**: the chosen float groups join the scheme's ``keep_float`` (``search_float`` / ``search_why`` say the
   search chose them), their quantizers become ``float`` ones with the reason "kept float by the hago search
   (...)"; a saved state reloads, and exports, as the same model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.export.runtimes import cpu_int8_support, int8_note, require
from vitq.prepare import keep_float_reason, quantizer_units
from vitq.quant.base import quantizers_of
from vitq.quant.keep_float import KeptFloat
from vitq.search.latency import (
    TIMED_RUNTIMES,
    LatencyModel,
    export_config,
    export_reference,
    file_name,
    floated,
    time_files,
)
from vitq.search.solve import Constraint, choose, constraint_of, describe, pareto, predict_all, recheck_set
from vitq.targets import get_target

log = logging.getLogger("vitq")


@dataclass(frozen=True)
class HagoOptions:
    """One constraint (``min_speedup``, ``max_kl`` or ``min_agreement``) and how much to measure: the groups
    searched (default every group the model quantizes), the timing batch and rounds (short by default: batch 8,
    5 rounds), the runtime's threads (default torch's) and how many front configurations are re-measured."""

    min_speedup: float | None = None
    max_kl: float | None = None
    min_agreement: float | None = None
    groups: tuple[str, ...] | None = None
    batch: int = 8
    rounds: int = 5
    threads: int | None = None
    checks: int = 8

    def __post_init__(self):
        if isinstance(self.groups, str):
            object.__setattr__(self, "groups", tuple(g.strip() for g in self.groups.split(",") if g.strip()))
        elif self.groups is not None:
            object.__setattr__(self, "groups", tuple(self.groups))
        for name, low in (("batch", 1), ("rounds", 1), ("checks", 1), ("threads", 1)):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
                raise VitqError(f"search option {name} = {v!r} is out of range (expected an integer >= {low})")
        self.constraint  # noqa: B018  (checks exactly one constraint, in range)

    @property
    def constraint(self) -> Constraint:
        return constraint_of(self.min_speedup, self.max_kl, self.min_agreement)

    def record(self) -> dict:
        return {**dataclasses.asdict(self), "groups": list(self.groups) if self.groups else None}


@torch.no_grad()
def _accuracy(qmodel: nn.Module, float_logits: list[torch.Tensor], calib: CalibData) -> tuple[float, float]:
    """(mean KL(float ‖ model) in nats, % top-1 agreement with the float model) on the calibration images."""
    kl, agree = 0.0, 0
    for x, zf in zip(calib.batches(), float_logits, strict=True):
        lp, lq = F.log_softmax(zf, 1), F.log_softmax(qmodel(x).float(), 1)
        kl += float((lp.exp() * (lp - lq)).sum())
        agree += int((lq.argmax(1) == lp.argmax(1)).sum())
    return kl / len(calib), 100.0 * agree / len(calib)


def searched_groups(qmodel: nn.Module, asked: tuple[str, ...] | None) -> tuple[dict, dict]:
    """(group -> names of its quantizers the model computes, group -> its quantizers already float), limited to
    ``asked`` where given (each asked group must be one the model quantizes)."""
    units = quantizer_units(qmodel)
    active: dict[str, list[str]] = {}
    idle: dict[str, list[str]] = {}
    for name, q in quantizers_of(qmodel).items():
        (idle if isinstance(q, KeptFloat) else active).setdefault(units[name], []).append(name)
    idle = {g: v for g, v in idle.items() if g not in active}
    if asked:
        bad = [g for g in asked if g not in active]
        if bad:
            raise VitqError(f"--search-groups {bad[0]!r} is not a group this model quantizes (expected some of "
                            f"{', '.join(sorted(active))})")
        active = {g: active[g] for g in asked}
    if not active:
        raise VitqError("the hago search found no quantized group to choose from (every quantizer is float)")
    return dict(sorted(active.items())), idle


def hago(qmodel: nn.Module, float_model: nn.Module, calib: CalibData, progress: bool = True, **options) -> dict:
    """Search which quantizer groups of the calibrated ``qmodel`` to quantize under its deployment target, apply
    the choice to ``qmodel`` (in place) and return the search's record (tables, fronts, the choice)."""
    try:
        opts = HagoOptions(**options)
    except TypeError as e:
        known = ", ".join(f.name for f in dataclasses.fields(HagoOptions))
        raise VitqError(f"unknown hago search option ({e}); expected some of {known}") from None
    constraint = opts.constraint
    scheme = qmodel.vitq_scheme
    target = get_target(scheme.target)
    if target.runtime not in TIMED_RUNTIMES:
        raise VitqError(f"the hago search measures latency in the target's runtime: --target {target.name} has "
                        f"{'none' if target.simulation else 'no runtime vitq can run here'} (expected --target "
                        f"{' or '.join(TIMED_RUNTIMES)})")
    require("onnx")
    require(target.runtime)
    t_start = time.perf_counter()
    active, idle = searched_groups(qmodel, opts.groups)
    groups = list(active)
    names = lambda gs: [n for g in gs for n in active[g]]  # noqa: E731
    every = [n for n, q in quantizers_of(qmodel).items() if not isinstance(q, KeptFloat)]
    qmodel.eval()
    float_model.to(calib.device).eval()
    with torch.no_grad():
        float_logits = [float_model(x).float() for x in calib.batches()]
    acc: dict[tuple, tuple[float, float]] = {}

    def accuracy(float_groups: tuple) -> tuple[float, float]:
        if float_groups not in acc:
            with floated(qmodel, names(float_groups)):
                acc[float_groups] = _accuracy(qmodel, float_logits, calib)
        return acc[float_groups]

    everything = tuple(groups)
    alone_quant = {g: tuple(h for h in groups if h != g) for g in groups}
    stage1 = [(), everything, *((g,) for g in groups), *alone_quant.values()]
    stage1 = list(dict.fromkeys(stage1))
    log.info("hago search on %s: %d groups (%s), %s", target.runtime, len(groups), ", ".join(groups), constraint)
    for cfg in stage1:
        accuracy(cfg)
    kl_all, agr_all = acc[()]
    sensitivity = [{"group": g, "quantizers": len(active[g]), "kl_alone_float": acc[(g,)][0],
                    "kl_gain": kl_all - acc[(g,)][0], "kl_alone_quantized": acc[alone_quant[g]][0],
                    "agreement_alone_float": acc[(g,)][1], "agreement_alone_quantized": acc[alone_quant[g]][1]}
                   for g in groups]

    folder = tempfile.mkdtemp(prefix="vitq-hago.")
    device = next(iter(qmodel.parameters())).device
    example = calib.images[:1].float().cpu()
    reps = -(-opts.batch // len(calib))
    x = calib.images.float().cpu().repeat(reps, 1, 1, 1)[:opts.batch].numpy()
    threads = opts.threads or torch.get_num_threads()
    files: dict = {}
    try:
        qmodel.cpu()

        def export_all(cfgs) -> None:
            for cfg in cfgs:
                if cfg not in files:
                    files[cfg] = export_config(qmodel, every if cfg == "float" else names(cfg),
                                               file_name(folder, len(files)), example, float_model.cpu())

        export_all(["float", *stage1])
        reference = export_reference(float_model.cpu(), file_name(folder, -1), example)
        ref = "reference" if reference else "float"
        if reference:
            files["reference"] = file_name(folder, -1)
        timed = list(dict.fromkeys([ref, "float"]))
        t1 = time_files({c: files[c] for c in [*timed, *stage1]}, target.runtime, x, opts.rounds, threads)
        lat = LatencyModel(t1["float"], t1[()], t1[everything], {g: t1[(g,)] for g in groups},
                           {g: t1[alone_quant[g]] for g in groups})
        predicted = predict_all(groups, kl_all, {s["group"]: s["kl_gain"] for s in sensitivity}, agr_all,
                                {g: acc[(g,)][1] - agr_all for g in groups}, lat, t1[ref])
        pred = {p["float"]: p for p in predicted}
        front_pred = pareto(predicted)
        checks = [p["float"] for p in recheck_set(front_pred, constraint, opts.checks)]
        stage2 = list(dict.fromkeys([*timed, (), *checks]))
        export_all(stage2)
        qmodel.to(device)
        for cfg in stage2[len(timed):]:
            accuracy(cfg)
        t2 = time_files({c: files[c] for c in stage2}, target.runtime, x, opts.rounds, threads)
    finally:
        qmodel.to(device)
        float_model.to(calib.device)
        shutil.rmtree(folder, ignore_errors=True)

    measured = {}
    for stage, times in ((1, t1), (2, t2)):
        for cfg, t in times.items():
            if cfg in timed:
                continue
            kl, agr = acc[cfg]
            measured[cfg] = {"float": cfg, "kl": kl, "agreement": agr, "speedup": times[ref] / t,
                             "speedup_vs_vitq_float": times["float"] / t,
                             "ms": 1e3 * t, "stage": stage, "predicted_kl": pred[cfg]["kl"],
                             "predicted_agreement": pred[cfg]["agreement"],
                             "predicted_speedup": pred[cfg]["speedup"]}
    points = list(measured.values())
    front = pareto(points)
    cpu = cpu_int8_support()
    chosen = choose(points, constraint, target.runtime, note=int8_note(cpu) if cpu and not cpu["int8_dot"] else "")
    rechecked = [measured[c] for c in stage2[len(timed):]]
    additivity = {"configurations": len(rechecked),
                  "speedup_mean_abs_error": _mean([abs(p["predicted_speedup"] - p["speedup"]) for p in rechecked]),
                  "kl_mean_abs_error": _mean([abs(p["predicted_kl"] - p["kl"]) for p in rechecked]),
                  "latency_residual": lat.residual()}
    why = (f"hago search ({constraint} on {target.runtime}: measured {chosen['speedup']:.2f}× float, calibration "
           f"KL {chosen['kl']:.4g}, agreement {chosen['agreement']:.1f} %)")
    apply(qmodel, chosen["float"], why)
    log.info("hago search chose %s: %.2f× float, calibration KL %.4g, agreement %.1f %% (%.0f s)", describe(chosen),
             chosen["speedup"], chosen["kl"], chosen["agreement"], time.perf_counter() - t_start)
    return {"search": "hago", "options": opts.record(), "constraint": str(constraint), "target": target.name,
            "runtime": target.runtime, "groups": {g: len(v) for g, v in active.items()},
            "already_float": {g: len(v) for g, v in idle.items()}, "num_calib": len(calib),
            "timing": {"batch": opts.batch, "rounds": opts.rounds, "threads": threads, "statistic": "median of "
                       "alternated rounds (short by default; ratios on a loaded machine are noisy)"},
            "sensitivity": sensitivity, "cpu": cpu, "cpu_note": int8_note(cpu),
            "float_reference": {"graph": reference or "vitq's own float export (torch.onnx failed on this model)",
                                "ms": [1e3 * t1[ref], 1e3 * t2[ref]], "ms_vitq_float_export": [1e3 * t1["float"],
                                                                                         1e3 * t2["float"]],
                                "note": "speed-ups are over this graph; speedup_vs_vitq_float: over vitq's own "
                                        "float export (ms per batch: stage 1, stage 2)"},
            "latency_model": {"ms_float": 1e3 * lat.t_float, "ms_all_quantized": 1e3 * lat.t_all,
                              "ms_searched_float": 1e3 * lat.t_none, "residual": lat.residual(),
                              "groups": lat.table(), "model": "additive: latency(S) = all-quantized + Σ costs of "
                              "the float groups; cost = mean of the saving vs all-quantized and vs float"},
            "predicted_front": [_row(p) for p in front_pred], "measured": [_row(p) for p in points],
            "pareto_front": [_row(p) for p in front], "chosen": _row(chosen), "additivity": additivity,
            "keep_float": list(qmodel.vitq_scheme.keep_float), "why": why,
            "seconds": time.perf_counter() - t_start}


def apply(qmodel: nn.Module, float_groups, why: str) -> None:
    """Leave ``float_groups`` float in ``qmodel`` as the scheme's keep_float (chosen by the search ``why``; an
    earlier search's float groups stay float: their quantizers were not kept) and record the reasons in its
    target report."""
    scheme = qmodel.vitq_scheme
    float_groups = tuple(g for g in float_groups if g not in scheme.keep_float)
    searched = (*scheme.search_float, *float_groups)
    new = dataclasses.replace(scheme, keep_float=(*scheme.keep_float, *float_groups), search_float=searched,
                              search_why=why if searched else "")
    units = quantizer_units(qmodel)
    report = dict(getattr(qmodel, "vitq_target_report", None) or {})
    reasons = {w: list(ns) for w, ns in (report.get("float") or {}).items()}
    for name, q in quantizers_of(qmodel).items():
        if units[name] in float_groups and not isinstance(q, KeptFloat):
            parent_name, _, attr = name.rpartition(".")
            setattr(qmodel.get_submodule(parent_name) if parent_name else qmodel, attr, KeptFloat(q.bits, q.role))
            reasons.setdefault(keep_float_reason(new, units[name]), []).append(name)
    report.update({"float": reasons, "keep_float": list(new.keep_float)})
    qmodel.vitq_target_report = report
    qmodel.vitq_scheme = new


def _row(p: dict) -> dict:
    return {**p, "float": list(p["float"])}


def _mean(values: list[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")

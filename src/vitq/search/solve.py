"""The solver of the hardware-aware search: every subset of the searched groups (which of them stay float) is
scored by the additive models, the predicted accuracy–latency front is re-measured, and the choice under the
one constraint is made on measured values.

Why enumeration: a model has a handful of quantizer groups (7 for a ViT under onnxruntime), so all 2^k subsets
are scored in microseconds and the predicted front is exact for the additive models; an integer program would
give the same optimum for these linear models and no front, and an evolutionary search (Evol-Q's) earns its cost
only over thousands of per-layer choices. What is not exact is the additivity, so the front's configurations are
measured (accuracy on the calibration images, latency in the runtime) before anything is chosen.

A point is a dict: ``float`` (the sorted tuple of groups left float), ``kl`` (mean KL(float ‖ model) on the
calibration images), ``agreement`` (% top-1 agreement with the float model there) and ``speedup`` (float latency
/ latency, same runtime and stage).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from vitq.errors import VitqError

MAX_GROUPS = 16  # 2^16 subsets: still instant
KINDS = {"min_speedup": "--min-speedup", "max_kl": "--max-kl", "min_agreement": "--min-agreement"}


@dataclass(frozen=True)
class Constraint:
    """``min_speedup``: the most accurate (lowest KL) configuration at least that many times faster than float;
    ``max_kl`` / ``min_agreement``: the fastest configuration within that KL / at least that agreement."""

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise VitqError(f"unknown search constraint {self.kind!r} (expected one of {', '.join(KINDS)})")
        v = self.value
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (self.kind == "min_speedup" and v <= 0):
            raise VitqError(f"{self.flag} {v!r} is out of range (expected a positive number)")
        if self.kind == "min_agreement" and v > 100:
            raise VitqError(f"{self.flag} {v} is out of range (expected a percentage, 0..100)")

    @property
    def flag(self) -> str:
        return KINDS[self.kind]

    def __str__(self) -> str:
        return f"{self.flag} {self.value:g}"

    def ok(self, p: dict) -> bool:
        if self.kind == "min_speedup":
            return p["speedup"] >= self.value
        if self.kind == "max_kl":
            return p["kl"] <= self.value
        return p["agreement"] >= self.value

    def key(self, p: dict) -> tuple:
        """Larger is better: accuracy first under a speed constraint, speed first under an accuracy one (fewer
        float groups break the remaining ties)."""
        if self.kind == "min_speedup":
            return -p["kl"], p["agreement"], p["speedup"], -len(p["float"])
        return p["speedup"], -p["kl"], -len(p["float"])


def constraint_of(min_speedup: float | None = None, max_kl: float | None = None,
                  min_agreement: float | None = None) -> Constraint:
    """The one constraint given (exactly one of the three)."""
    given = {k: v for k, v in (("min_speedup", min_speedup), ("max_kl", max_kl), ("min_agreement", min_agreement))
             if v is not None}
    if len(given) != 1:
        names = ", ".join(KINDS[k] for k in given) or "none"
        raise VitqError(f"the hago search needs exactly one of --min-speedup, --max-kl, --min-agreement (given: "
                        f"{names})")
    (kind, value), = given.items()
    return Constraint(kind, float(value))


def dominates(a: dict, b: dict) -> bool:
    """``a`` is at least as accurate (KL) and as fast as ``b``, and strictly better in one of the two."""
    return a["kl"] <= b["kl"] and a["speedup"] >= b["speedup"] and (a["kl"] < b["kl"] or a["speedup"] > b["speedup"])


def pareto(points: list[dict]) -> list[dict]:
    """The non-dominated points (KL down, speed up), fastest first; equal points kept once."""
    front, seen = [], set()
    for p in sorted(points, key=lambda p: (-p["speedup"], p["kl"])):
        sig = (p["kl"], p["speedup"])
        if sig in seen or any(dominates(q, p) for q in points):
            continue
        seen.add(sig)
        front.append(p)
    return front


def predict_all(groups: list[str], kl_all: float, kl_gain: dict, agreement_all: float, agreement_gain: dict,
                latency, t_float: float) -> list[dict]:
    """Every subset of ``groups`` left float, scored by the additive models: KL = KL(all quantized) − the gains of
    its float groups (at least 0), agreement likewise (at most 100), latency by ``latency.predict``."""
    if len(groups) > MAX_GROUPS:
        raise VitqError(f"the hago search enumerates subsets of at most {MAX_GROUPS} groups (got {len(groups)}): "
                        "limit it with --search-groups")
    out = []
    for r in range(len(groups) + 1):
        for subset in itertools.combinations(groups, r):
            t = latency.predict(subset)
            out.append({"float": tuple(sorted(subset)),
                        "kl": max(kl_all - sum(kl_gain[g] for g in subset), 0.0),
                        "agreement": min(agreement_all + sum(agreement_gain[g] for g in subset), 100.0),
                        "speedup": t_float / t if t > 0 else float("inf")})
    return out


def recheck_set(front: list[dict], constraint: Constraint, checks: int) -> list[dict]:
    """At most ``checks`` points of the predicted front to measure: the predicted choice under the constraint
    and its neighbours on the front first, then points spread evenly over the rest of it."""
    if len(front) <= checks:
        return list(front)
    ok = [i for i, p in enumerate(front) if constraint.ok(p)]
    best = max(ok, key=lambda i: constraint.key(front[i])) if ok else min(
        range(len(front)), key=lambda i: abs(front[i]["speedup"] - constraint.value)
        if constraint.kind == "min_speedup" else front[i]["kl"])
    picked = [i for i in (best, best - 1, best + 1) if 0 <= i < len(front)][:checks]
    rest = [i for i in range(len(front)) if i not in picked]
    need = checks - len(picked)
    if need > 0 and rest:
        step = len(rest) / need
        picked += [rest[int(k * step)] for k in range(need)]
    return [front[i] for i in sorted(set(picked))]


def choose(points: list[dict], constraint: Constraint, runtime: str, note: str = "") -> dict:
    """The best measured point under the constraint; a clear error naming the best reachable one if none meets
    it (``note``: a sentence added to a --min-speedup error, e.g. what the CPU lacks for int8 kernels)."""
    ok = [p for p in points if constraint.ok(p)]
    if ok:
        return max(ok, key=constraint.key)
    field = {"min_speedup": "speedup", "max_kl": "kl", "min_agreement": "agreement"}[constraint.kind]
    best = (min if field == "kl" else max)(points, key=lambda p: p[field])
    what = {"speedup": f"the fastest runs at {best['speedup']:.2f}× float",
            "kl": f"the lowest KL measured is {best['kl']:.4g}",
            "agreement": f"the highest agreement measured is {best['agreement']:.2f} %"}[field]
    extra = f"; {note}" if note and field == "speedup" else ""
    raise VitqError(f"no configuration the hago search measured in {runtime} meets {constraint}: {what} "
                    f"({describe(best)}){extra}; ask for at most that, or use another constraint")


def describe(p: dict) -> str:
    return "float: " + ", ".join(p["float"]) if p["float"] else "every searched group quantized"

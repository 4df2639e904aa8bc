"""Recipes: named choices of method, quantizer kinds and refiners per regime, and the measurements behind
``vitq quantize --recipe best``.

A recipe fills only what the user left unset (explicit flags win). ``best`` picks, for the requested regime and
bits, the usable recipe with the highest measured top-1 agreement with the float model at exactly those bits
(ties: lower KL, then cheaper; :func:`rank`); where nothing was measured it takes the first usable recipe of
the regime in table order (the order we expect from the measurements at other bits) and says so. A recipe that
needs a method, refiner, quantizer kind or flag this installation lacks is skipped with the reason.

Every number in :data:`MEASURED` comes from ``benchmarks/bench_recon.py`` (BENCHMARKS.md, section "recon"),
which generates :mod:`vitq.recipes_measured` from its kept runs; nothing is filled in by hand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from vitq.errors import VitqError
from vitq.recipes_measured import MEASURED
from vitq.targets import get_target

log = logging.getLogger("vitq")


@dataclass(frozen=True)
class Recipe:
    name: str
    scheme: str  # fq | matmul
    method: str
    refine: tuple[str, ...] = ()
    flags: dict = field(default_factory=dict)  # CLI destinations -> values (besides method and refine)
    cpu_flags: dict = field(default_factory=dict)  # the cheaper setting used with --device cpu
    note: str = ""
    targets: tuple[str, ...] = ()  # deployment targets it is made for (--recipe best --target picks it there)

    def settings(self, device: str = "cpu") -> dict:
        """Every CLI destination this recipe sets, for ``device``."""
        out = {"method": self.method, **self.flags}
        if self.refine:
            out["refine"] = ",".join(self.refine)
        if device == "cpu":
            out.update(self.cpu_flags)
        return out

    def plan(self, device: str = "cpu") -> dict:
        """The recipe as the arguments of :func:`vitq.quantize`: method and its options, scheme fields, weight
        rounding, refiner chain with each refiner's options, and the number of calibration images it uses."""
        from vitq.registry import METHODS, REFINERS

        plan = {"method": self.method, "options": {}, "scheme": {}, "rounding": None, "refine": list(self.refine),
                "refine_options": {}, "num_calib": None}
        for dest, value in self.settings(device).items():
            if dest in ("method", "refine"):
                continue
            if dest in SCHEME_FIELDS:
                plan["scheme"][dest] = value
            elif dest == "weight_rounding":
                plan["rounding"] = value
            elif dest == "num_calib":
                plan["num_calib"] = value
            elif dest.startswith(self.method.replace("-", "_") + "_") and self.method in METHODS:
                plan["options"][dest[len(self.method) + 1:]] = value
            else:
                owner = next((r for r in self.refine if r in REFINERS and dest.startswith(r.replace("-", "_") + "_")),
                             None)
                if owner is None:
                    raise VitqError(f"recipe {self.name}: setting {dest!r} belongs to no step of the recipe")
                plan["refine_options"].setdefault(owner, {})[dest[len(owner) + 1:]] = value
        return plan

    def as_flags(self, device: str = "cpu") -> list[str]:
        """The command-line flags the recipe stands for."""
        out = []
        for dest, value in self.settings(device).items():
            out += [FLAG_NAMES.get(dest, f"--{dest.replace('_', '-')}"), str(value)]
        return out


FLAG_NAMES = {"recon_batch": "--recon-batch-size"}  # destinations whose flag is not --DEST
SCHEME_FIELDS = ("softmax_quantizer", "gelu_quantizer", "attn_granularity", "attn_bits", "weight_signed",
                 "keep_float")

# the reduced CPU setting of the benchmark (BENCHMARKS.md "recon" section states it). Every calibration image the
# user gives is used: a step's cost does not depend on their number (only the per-piece caches and error passes
# grow with it), and reconstruction on 50 of 250 images overfitted them (issue 26). 500 steps per piece: at matmul
# W4A4 they gave 80.2 ± 1.7 % agreement over 3 draws against 79.4 for 200 (draw 0; BENCHMARKS.md, section
# "levers"), in about 10 minutes per DeiT-Tiny on 2 cores.
RECON_CPU = {"recon_iters": 500, "recon_batch": 4, "recon_lr": 1e-2, "recon_scale_lr": 4e-3}
EVOLQ_CPU = {"evolq_passes": 1}

ADALOG = {"softmax_quantizer": "adalog", "gelu_quantizer": "adalog"}
GPTQ = {"weight_rounding": "gptq"}
CALIB_CPU: dict = {}  # calibration alone: all images, as on a GPU


def _family(scheme: str, method: str, base_name: str, flags: dict, what: str) -> tuple[Recipe, ...]:
    """A base (method and flags) alone, + recon, + recon + evolq: the three pipelines of the benchmark."""
    name = f"{scheme}-{base_name}"
    return (
        Recipe(f"{name}-recon", scheme, method, ("recon",), flags=flags, cpu_flags=RECON_CPU,
               note=f"{what}, then block reconstruction"),
        Recipe(f"{name}-recon-evolq", scheme, method, ("recon", "evolq"), flags=flags,
               cpu_flags={**RECON_CPU, **EVOLQ_CPU}, note=f"{what}, block reconstruction, then Evol-Q"),
        Recipe(name, scheme, method, flags=flags, cpu_flags=CALIB_CPU, note=f"{what} (calibration only)"),
    )


# One recipe per pipeline of the benchmark (BENCHMARKS.md, recon section), so --recipe best can pick any row.
# Order within a regime: the fallback of --recipe best where nothing was measured at the bits asked is the first
# usable recipe of the regime. GPTQ before recon is measured but not preferred: GPTQ leaves every weight on its
# grid, where AdaRound can move it one level in one direction only (see vitq.refine.recon).
RECIPES: tuple[Recipe, ...] = (
    *_family("fq", "repq", "repq", {}, "RepQ-ViT"),
    *_family("fq", "fqvit", "fqvit", {}, "FQ-ViT"),
    *_family("fq", "repq", "repq-gptq", GPTQ, "RepQ-ViT with GPTQ weight rounding"),
    *_family("matmul", "repq", "repq-adalog", ADALOG,
             "RepQ-ViT with adaptive-log softmax and post-GELU quantizers"),
    *_family("matmul", "repq", "repq-adalog-gptq", {**ADALOG, **GPTQ},
             "RepQ-ViT with adaptive-log softmax and post-GELU quantizers and GPTQ weight rounding"),
    # deployable: every quantizer it builds is a QDQ pair the runtimes fuse into an integer kernel
    Recipe("ship-repq-gptq", "matmul", "repq", flags={"softmax_quantizer": "uniform", "keep_float": "attn_v", **GPTQ},
           cpu_flags=CALIB_CPU, targets=("onnxruntime", "openvino", "tensorrt"),
           note="deployable W8A8: RepQ-ViT fold (exact), uniform per-tensor activations, per-channel symmetric "
                "GPTQ weights, softmax·v left in float (its softmax-output quantizer is most of the error and "
                "attn·v a few % of the matmul work)"),
)


def rank(measured: dict, index: int) -> tuple:
    """How --recipe best orders measured recipes: highest agreement, then lowest KL, then cheapest, then the
    table's order (``index``). The benchmark names its best rows with the same key."""
    return measured["agreement"], -measured.get("kl", 0.0), -measured.get("seconds", 0.0), -index


def by_name(name: str) -> Recipe:
    for r in RECIPES:
        if r.name == name:
            return r
    raise VitqError(f"--recipe {name!r} is unknown (expected best or one of {', '.join(r.name for r in RECIPES)})")


def unavailable(recipe: Recipe, dests: set[str] | None = None, target: str | None = None) -> str | None:
    """Why ``recipe`` cannot run in this installation, or ship to ``target`` (None if it can). ``dests``: the CLI
    destinations."""
    from vitq.registry import METHODS, REFINERS
    t = get_target(target)
    if not t.simulation:
        kept = str(recipe.flags.get("keep_float", "")).split(",")
        for dest, group in (("softmax_quantizer", "attn_v"), ("gelu_quantizer", "linear_input")):
            kind = recipe.flags.get(dest)
            if kind not in (None, *t.kinds) and group not in kept and group in t.integer:
                return f"its {dest.replace('_', ' ')} {kind!r} has no integer kernel in {t.name}"
    if recipe.method not in METHODS:
        return f"method {recipe.method!r} is not registered"
    missing = [r for r in recipe.refine if r not in REFINERS]
    if missing:
        return f"refiner {missing[0]!r} is not registered"
    kind = recipe.flags.get("softmax_quantizer")
    if kind is not None:
        from vitq.quant.base import QUANTIZER_KINDS

        if kind not in QUANTIZER_KINDS:
            return f"quantizer kind {kind!r} is not registered"
    if dests is not None:
        lacking = [d for d in {**recipe.flags, **recipe.cpu_flags} if d not in dests]
        if lacking:
            return f"flag {FLAG_NAMES.get(lacking[0], '--' + lacking[0].replace('_', '-'))} does not exist in this vitq"
    return None


def choose(name: str, scheme: str | None, w_bits: int, a_bits: int, dests: set[str] | None = None,
           target: str | None = None) -> tuple[Recipe, str]:
    """The recipe for ``name`` (or ``best``) at this regime and bits (``scheme`` None: the default regime, or
    under a deployment ``target`` any regime), and why it was chosen."""
    if name != "best":
        recipe = by_name(name)
        if scheme is not None and recipe.scheme != scheme:
            raise VitqError(f"--recipe {name} is for the {recipe.scheme} regime, not --scheme {scheme}")
        why = unavailable(recipe, dests, target)
        if why:
            raise VitqError(f"--recipe {name} cannot run here: {why}")
        return recipe, "named"
    if not get_target(target).simulation:
        return _choose_for_target(get_target(target).name, scheme, dests)
    scheme = scheme or "fq"
    usable = []
    for r in RECIPES:
        if r.scheme != scheme:
            continue
        why = unavailable(r, dests)
        if why:
            log.info("recipe %s skipped: %s", r.name, why)
            continue
        usable.append(r)
    if not usable:
        raise VitqError(f"--recipe best: no usable recipe for --scheme {scheme}")
    measured = [(MEASURED[(r.name, w_bits, a_bits)], i, r) for i, r in enumerate(usable)
                if (r.name, w_bits, a_bits) in MEASURED]
    if measured:
        m, _, best = max(measured, key=lambda t: rank(t[0], t[1]))
        return best, f"highest measured agreement at {scheme} W{w_bits}A{a_bits} ({m['agreement']:.2f} %)"
    return usable[0], f"nothing measured at {scheme} W{w_bits}A{a_bits}: first usable recipe of the table"


def _choose_for_target(target: str, scheme: str | None, dests: set[str] | None) -> tuple[Recipe, str]:
    """--recipe best under a deployment target: the recipe made for it, else the first of the table it can ship."""
    usable = []
    for r in RECIPES:
        why = unavailable(r, dests, target)
        if (scheme is None or r.scheme == scheme) and why is None:
            usable.append(r)
        elif why:
            log.info("recipe %s skipped for --target %s: %s", r.name, target, why)
    made = [r for r in usable if target in r.targets]
    if made:
        return made[0], (f"the recipe made for --target {target}: every quantizer it builds runs as an integer "
                         "kernel there (BENCHMARKS.md, export section)")
    if not usable:
        raise VitqError(f"--recipe best --target {target}: no usable recipe"
                        + (f" for --scheme {scheme}" if scheme else ""))
    return usable[0], f"no recipe made for --target {target} in this regime: the first of the table it can ship"


def format_table() -> str:
    lines = []
    for r in RECIPES:
        why = unavailable(r)
        lines.append(f"{r.name}{'  [skipped: ' + why + ']' if why else ''}")
        lines.append(f"    {r.note}")
        if r.targets:
            lines.append(f"    made for --target {', '.join(r.targets)}")
        lines.append(f"    flags (cpu): {' '.join(r.as_flags('cpu'))}")
        if r.cpu_flags:
            lines.append(f"    flags (cuda): {' '.join(r.as_flags('cuda'))}")
        rows = sorted((k[1], k[2], v) for k, v in MEASURED.items() if k[0] == r.name)
        if not rows:
            lines.append("    unmeasured")
        for w, a, m in rows:
            lines.append(f"    {r.scheme} W{w}A{a}: agreement {m['agreement']:.2f} %, top-1 {m['top1']:.2f} %, "
                         f"KL {m['kl']:.4f}, cost {m['seconds']:.0f} s ({m['where']})")
    return "\n".join(lines)

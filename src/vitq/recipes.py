"""Recipes: named choices of method, quantizer kinds and refiners per regime, and the measurements behind
``vitq quantize --recipe best``.

A recipe fills only what the user left unset (explicit flags win). ``best`` picks, for the requested regime and
bits, the usable recipe with the highest measured top-1 agreement with the float model at exactly those bits;
where nothing was measured it takes the first usable recipe of the regime in table order (the order we expect
from the measurements at other bits) and says so. A recipe that needs a method, refiner, quantizer kind or
flag this installation lacks is skipped with the reason.

Every number in :data:`MEASURED` comes from ``benchmarks/bench_recon.py`` (BENCHMARKS.md, section "recon");
nothing is filled in by hand from elsewhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from vitq.errors import VitqError

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

    def settings(self, device: str = "cpu") -> dict:
        """Every CLI destination this recipe sets, for ``device``."""
        out = {"method": self.method, **self.flags}
        if self.refine:
            out["refine"] = ",".join(self.refine)
        if device == "cpu":
            out.update(self.cpu_flags)
        return out

    def as_flags(self, device: str = "cpu") -> list[str]:
        """The command-line flags the recipe stands for."""
        out = []
        for dest, value in self.settings(device).items():
            out += [FLAG_NAMES.get(dest, f"--{dest.replace('_', '-')}"), str(value)]
        return out


FLAG_NAMES = {"recon_batch": "--recon-batch-size"}  # destinations whose flag is not --DEST

# the reduced CPU setting of the benchmark (BENCHMARKS.md "recon" section states it)
RECON_CPU = {"recon_iters": 40, "recon_batch": 4, "recon_lr": 1e-2, "recon_scale_lr": 4e-3, "num_calib": 50}
EVOLQ_CPU = {"evolq_passes": 1}

GPTQ = {"weight_rounding": "gptq"}
ADALOG_GPTQ = {"softmax_quantizer": "adalog", "gelu_quantizer": "adalog", "weight_rounding": "gptq"}

RECIPES: tuple[Recipe, ...] = (
    Recipe("fq-repq-gptq-recon", "fq", "repq", ("recon",), flags=GPTQ, cpu_flags=RECON_CPU,
           note="RepQ-ViT with GPTQ weight rounding, then block reconstruction"),
    Recipe("fq-repq-gptq", "fq", "repq", flags=GPTQ, cpu_flags={"num_calib": RECON_CPU["num_calib"]},
           note="RepQ-ViT with GPTQ weight rounding (calibration only)"),
    Recipe("fq-fqvit-recon-evolq", "fq", "fqvit", ("recon", "evolq"), cpu_flags={**RECON_CPU, **EVOLQ_CPU},
           note="FQ-ViT base, block reconstruction, then Evol-Q (faithful)"),
    Recipe("fq-fqvit-recon", "fq", "fqvit", ("recon",), cpu_flags=RECON_CPU,
           note="FQ-ViT base, then block reconstruction"),
    Recipe("fq-fqvit", "fq", "fqvit", note="FQ-ViT base alone (calibration only)"),
    Recipe("matmul-repq-adalog-gptq-recon", "matmul", "repq", ("recon",), flags=ADALOG_GPTQ, cpu_flags=RECON_CPU,
           note="RepQ-ViT, adaptive-log softmax and post-GELU quantizers, GPTQ, then block reconstruction"),
    Recipe("matmul-repq-adalog-gptq", "matmul", "repq", flags=ADALOG_GPTQ,
           cpu_flags={"num_calib": RECON_CPU["num_calib"]},
           note="RepQ-ViT, adaptive-log softmax and post-GELU quantizers, GPTQ (calibration only)"),
    Recipe("matmul-ptq4vit-recon-evolq", "matmul", "ptq4vit", ("recon", "evolq"),
           cpu_flags={**RECON_CPU, **EVOLQ_CPU},
           note="PTQ4ViT base (twin softmax/GELU kept), block reconstruction, then Evol-Q (faithful)"),
    Recipe("matmul-ptq4vit-recon", "matmul", "ptq4vit", ("recon",), cpu_flags=RECON_CPU,
           note="PTQ4ViT base, then block reconstruction"),
    Recipe("matmul-ptq4vit", "matmul", "ptq4vit", note="PTQ4ViT base alone (calibration only)"),
)

WHERE = "DeiT-Tiny, 500 val images, CPU setting; BENCHMARKS.md recon section"
# (recipe, w_bits, a_bits) -> measured on DeiT-Tiny, all 500 val images, CPU setting; from bench_recon.py
# (the command in that section, 2026-11-23, one calibration draw; cost = wall seconds of calibration + refiners on
# 2 shared CPU cores)
MEASURED: dict[tuple[str, int, int], dict] = {
    ("matmul-repq-adalog-gptq", 4, 4): {"agreement": 76.2, "top1": 69.0, "kl": 0.4031, "seconds": 23.6, "where": WHERE},
    ("matmul-repq-adalog-gptq-recon", 4, 4): {"agreement": 75.4, "top1": 68.2, "kl": 0.3986, "seconds": 54.7,
                                              "where": WHERE},
    ("matmul-repq-adalog-gptq-recon-evolq", 4, 4): {"agreement": 74.2, "top1": 67.2, "kl": 0.4002, "seconds": 110.3,
                                                    "where": WHERE},
    ("fq-repq-gptq", 4, 8): {"agreement": 88.8, "top1": 75.6, "kl": 0.1038, "seconds": 24.1, "where": WHERE},
    ("fq-repq-gptq-recon", 4, 8): {"agreement": 89.0, "top1": 75.6, "kl": 0.1021, "seconds": 58.8, "where": WHERE},
    ("fq-repq-gptq-recon-evolq", 4, 8): {"agreement": 89.4, "top1": 75.2, "kl": 0.1053, "seconds": 121.8,
                                         "where": WHERE},
    ("fq-repq-gptq", 3, 8): {"agreement": 73.2, "top1": 66.8, "kl": 0.4747, "seconds": 21.9, "where": WHERE},
    ("fq-repq-gptq-recon", 3, 8): {"agreement": 74.2, "top1": 67.4, "kl": 0.479, "seconds": 58.0, "where": WHERE},
    ("fq-repq-gptq-recon-evolq", 3, 8): {"agreement": 73.8, "top1": 67.0, "kl": 0.4708, "seconds": 102.8,
                                         "where": WHERE},
    ("fq-fqvit", 4, 8): {"agreement": 85.4, "top1": 73.4, "kl": 0.1875, "seconds": 3.9, "where": WHERE},
    ("fq-fqvit-recon", 4, 8): {"agreement": 87.2, "top1": 76.8, "kl": 0.1185, "seconds": 36.2, "where": WHERE},
    ("fq-fqvit-recon-evolq", 4, 8): {"agreement": 87.4, "top1": 76.6, "kl": 0.1165, "seconds": 65.0, "where": WHERE},
    ("matmul-ptq4vit", 4, 4): {"agreement": 59.6, "top1": 54.2, "kl": 0.8985, "seconds": 456.3, "where": WHERE},
    ("matmul-ptq4vit-recon", 4, 4): {"agreement": 70.6, "top1": 63.8, "kl": 0.6142, "seconds": 484.7, "where": WHERE},
    ("matmul-ptq4vit-recon-evolq", 4, 4): {"agreement": 68.8, "top1": 61.6, "kl": 0.6182, "seconds": 519.8,
                                           "where": WHERE},
}


def by_name(name: str) -> Recipe:
    for r in RECIPES:
        if r.name == name:
            return r
    raise VitqError(f"--recipe {name!r} is unknown (expected best or one of {', '.join(r.name for r in RECIPES)})")


def unavailable(recipe: Recipe, dests: set[str] | None = None) -> str | None:
    """Why ``recipe`` cannot run in this installation (None if it can). ``dests``: the CLI destinations."""
    from vitq.registry import METHODS, REFINERS, load_builtin

    load_builtin()
    if recipe.method not in METHODS:
        return f"method {recipe.method!r} is not registered"
    missing = [r for r in recipe.refine if r not in REFINERS]
    if missing:
        return f"refiner {missing[0]!r} is not registered"
    kind = recipe.flags.get("softmax_quantizer")
    if kind is not None:
        from vitq.quantizers import QUANTIZER_KINDS

        if kind not in QUANTIZER_KINDS:
            return f"quantizer kind {kind!r} is not registered"
    if dests is not None:
        lacking = [d for d in {**recipe.flags, **recipe.cpu_flags} if d not in dests]
        if lacking:
            return f"flag {FLAG_NAMES.get(lacking[0], '--' + lacking[0].replace('_', '-'))} does not exist in this vitq"
    return None


def choose(name: str, scheme: str, w_bits: int, a_bits: int, dests: set[str] | None = None) -> tuple[Recipe, str]:
    """The recipe for ``name`` (or ``best``) at this regime and bits, and why it was chosen."""
    if name != "best":
        recipe = by_name(name)
        if recipe.scheme != scheme:
            raise VitqError(f"--recipe {name} is for the {recipe.scheme} regime, not --scheme {scheme}")
        why = unavailable(recipe, dests)
        if why:
            raise VitqError(f"--recipe {name} cannot run here: {why}")
        return recipe, "named"
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
        m, _, best = max(measured, key=lambda t: (t[0]["agreement"], -t[1]))
        return best, f"highest measured agreement at {scheme} W{w_bits}A{a_bits} ({m['agreement']:.2f} %)"
    return usable[0], f"nothing measured at {scheme} W{w_bits}A{a_bits}: first usable recipe of the table"


def apply_recipe(args) -> dict:
    """Fill the unset arguments of ``vitq quantize`` from ``args.recipe``; returns what goes into results.json."""
    if args.init_state is not None:
        raise VitqError(f"--recipe {args.recipe} chooses a method; it cannot start from --init-state")
    dests = set(vars(args))
    scheme = args.scheme or "fq"
    w_bits = 8 if args.w_bits is None else args.w_bits
    a_bits = 8 if args.a_bits is None else args.a_bits
    recipe, why = choose(args.recipe, scheme, w_bits, a_bits, dests)
    applied, overridden = {}, {}
    for dest, value in recipe.settings(args.device).items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
            applied[dest] = value
        else:
            overridden[dest] = getattr(args, dest)
    log.info("recipe %s (%s): %s", recipe.name, why, " ".join(recipe.as_flags(args.device)))
    return {"name": recipe.name, "asked": args.recipe, "why": why, "applied": applied,
            "overridden_by_flags": overridden, "measured": MEASURED.get((recipe.name, w_bits, a_bits))}


def format_table() -> str:
    lines = []
    for r in RECIPES:
        why = unavailable(r)
        lines.append(f"{r.name}{'  [skipped: ' + why + ']' if why else ''}")
        lines.append(f"    {r.note}")
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


def cmd_recipes(args) -> int:
    print(format_table())
    if args.scheme is not None:
        recipe, why = choose("best", args.scheme, args.w_bits, args.a_bits)
        print(f"\n--recipe best for {args.scheme} W{args.w_bits}A{args.a_bits}: {recipe.name} ({why})")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("recipes", help="list the recipes of --recipe with their measured agreement and cost")
    p.add_argument("--scheme", choices=("fq", "matmul"), default=None, help="also say what --recipe best picks")
    p.add_argument("--w-bits", type=int, default=8)
    p.add_argument("--a-bits", type=int, default=8)
    p.set_defaults(func=cmd_recipes)

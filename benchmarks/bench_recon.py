"""Block reconstruction on the real DeiT-Tiny (issue 11): the leaderboard of base method alone, + recon, + recon +
evolq, for each configuration and calibration draw; calibrate/reconstruct/search on calib/, evaluate on all of
val/. The defaults are the reduced CPU setting of the recipes (vitq.recipes.RECON_CPU); the written section
states every reduction.

Each finished (configuration, draw) is kept in benchmarks/recon_rows.json, so a rerun (or a run cut off and
started again) does only what is missing; the section, the figure and the recipe numbers
(src/vitq/recipes_measured.py, read by ``--recipe best``) are rewritten from all kept runs.

    python -m benchmarks.bench_recon [--configs fq:4/8:fqvit,matmul:4/4:repq+adalog+gptq] [--seeds 0,1,2]
        [--num-calib N] [--recon-iters N] [--recon-batch N] [--evolq-passes P] [--threads N] [--fresh]
        [--render] [--no-write] [--recon-options k=v,...] [--variants NAME:k=v,...;...]
        [--evolq-options k=v,...] [--evolq-variants NAME:k=v,...;...] [--no-recon]

Evol-Q variants (``--evolq-variants``) run from a copy of the chain's model after recon (after the base with
``--no-recon``) and are recorded as pipeline ``recon,evolq[NAME]`` (``evolq[NAME]``); a value listing several
groups joins them with ``+`` (``search=logq+wscale_pre``), since ``,`` separates the options.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import textwrap
import time
from pathlib import Path

import torch

import vitq
from benchmarks.common import (
    FIGURES,
    ROOT,
    Bench,
    command,
    environment,
    load_kept_rows,
    mean_std,
    parse_config,
    save_kept_rows,
    table,
    write_section,
)
from vitq.calib import CalibData
from vitq.recipes import EVOLQ_CPU, RECIPES, RECON_CPU, rank

DEFAULT_CONFIGS = ",".join([  # the leaderboard: RepQ-ViT (RTN) and FQ-ViT bases, and the GPTQ bases as a comparison
    "fq:8/8:repq", "fq:4/8:repq", "fq:4/8:fqvit", "fq:4/8:repq+gptq", "fq:3/8:repq", "fq:3/8:fqvit",
    "matmul:8/8:repq+adalog", "matmul:6/6:repq+adalog", "matmul:4/4:repq+adalog", "matmul:4/4:repq+adalog+gptq",
    "matmul:3/3:repq+adalog"])
RECIPE_OF = {"": "{scheme}-{method}", "recon": "{scheme}-{method}-recon",
             "recon,evolq": "{scheme}-{method}-recon-evolq"}


ROWS = ROOT / "benchmarks" / "recon_rows.json"
MEASURED_FILE = ROOT / "src" / "vitq" / "recipes_measured.py"
REGIME_ORDER = {"fq": 0, "matmul": 1}


def parse_spec(spec: str) -> tuple[str, int, int, str, list[str]]:
    scheme, w, a, method_spec = parse_config(spec)
    method, *extras = method_spec.split("+")  # e.g. repq+adalog+gptq
    unknown = set(extras) - {"adalog", "gptq"}
    if unknown:
        raise SystemExit(f"--configs {spec}: unknown suffix {sorted(unknown)} (expected +adalog, +gptq)")
    return scheme, w, a, method_spec, extras


def parse_options(text: str) -> dict:
    """``k=v,k=v`` -> {k: v} with v as bool (true/false), int, float or str."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        k, _, v = item.partition("=")
        low = v.lower()
        if low in ("true", "false"):
            out[k] = low == "true"
            continue
        for conv in (int, float):
            try:
                out[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            out[k] = v
    return out


def parse_variants(text: str) -> dict[str, dict]:
    """``name:k=v,k=v;name2:...`` -> {name: options}: extra recon runs from a copy of the same base."""
    out = {}
    for part in filter(None, (t.strip() for t in text.split(";"))):
        name, _, opts = part.partition(":")
        out[name] = parse_options(opts)
    return out


def evolq_options(text: str) -> dict:
    """``k=v,k=v`` as :func:`parse_options`; a value ``a+b`` is the list ``a,b`` (e.g. search=logq+ptf)."""
    return {k: v.replace("+", ",") if isinstance(v, str) else v for k, v in parse_options(text).items()}


def _evolq_record(info: dict, cost: float) -> dict:
    out = {"seconds": cost, "step_seconds": info["seconds"], "calib_kl": info["calib_kl"]}
    for key in ("fitness", "check", "evaluations", "passes_done"):
        if key in info:
            out[f"evolq_{key}"] = info[key]
    return out


def _recon_record(info: dict, cost: float) -> dict:
    return {"seconds": cost, "step_seconds": info["seconds"], "calib_kl": info["calib_kl"],
            "pieces_kept_start": info["pieces_kept_start"], "steps_taken": info.get("steps_taken"),
            "budget": info.get("budget"), "fisher_seconds": (info.get("fisher") or {}).get("seconds"),
            "trace": [{k: e.get(k) for k in ("piece", "mse_before", "mse_learned", "mse_after", "kept_start",
                                             "iters", "seconds")} for e in info["trace"]]}


def run_one(bench, calib_x, spec: str, seed: int, args) -> dict:
    """Base calibration, + recon (+ each --variants recon from a copy of the base), + recon + evolq for one
    configuration and calibration draw."""
    scheme, w, a, method_spec, extras = parse_spec(spec)
    method = method_spec.split("+")[0]
    kinds = {"softmax_quantizer": "adalog", "gelu_quantizer": "adalog"} if "adalog" in extras else {}
    calib = CalibData(calib_x, batch_size=args.batch_size, progress=False, seed=seed)
    run = bench.quantize(vitq.Scheme(scheme, w, a, **kinds), method, calib,
                         rounding="gptq" if "gptq" in extras else None, seed=seed)
    q = run.qmodel
    cost = run.info["seconds"] + run.record["weight_rounding"].get("seconds", 0.0)
    out, record, chain = {}, {"seconds": cost, "step_seconds": cost}, []
    recon_opts = {"iters": args.recon_iters, "batch": args.recon_batch, "lr": args.recon_lr,
                  "scale_lr": args.recon_scale_lr, **parse_options(args.recon_options)}
    base_cost = cost
    steps = [(None, None)]
    for vname, vopts in parse_variants(args.variants).items():
        steps.append((f"recon[{vname}]", {**recon_opts, **vopts}))
    if not args.no_recon:
        steps.append(("recon", recon_opts))
    evolq_opts = {**({"passes": args.evolq_passes} if args.evolq_passes > 0 else {}),
                  **evolq_options(args.evolq_options)}  # (--evolq-passes 0: variants take their mode's passes)
    for vname, vopts in parse_variants(args.evolq_variants).items():
        steps.append((f"evolq[{vname}]", {**evolq_opts, **evolq_options(",".join(f"{k}={v}" for k, v in
                                                                                 vopts.items()))}))
    if args.evolq_passes > 0:
        steps.append(("evolq", evolq_opts))
    for name, opts in steps:
        variant = name is not None and "[" in name
        model_q = copy.deepcopy(q) if variant else q
        chain_cost = cost
        if name is not None:
            refiner = "recon" if name.startswith("recon") else "evolq"
            info = vitq.refine(model_q, bench.model, calib, refiner, batch_size=args.batch_size, seed=seed,
                               progress=False, **opts)
            if model_q is q:
                chain.append(name)
                cost += info["seconds"]
            # a recon variant starts from the base, an evolq variant from the chain so far
            start_cost = base_cost if refiner == "recon" else chain_cost
            total = cost if model_q is q else start_cost + info["seconds"]
            record = _recon_record(info, total) if refiner == "recon" else _evolq_record(info, total)
        result, eval_seconds = bench.score(model_q)
        r = result["quant"]
        record.update({"eval_seconds": eval_seconds, **r})
        key = ",".join(chain + [name]) if name is not None and name.startswith("evolq[") else \
            (name if model_q is not q else ",".join(chain))
        out[key] = record
        del model_q
        print(f"seed {seed} {spec} {key or 'base'}: top-1 {r['top1']:.2f} agreement "
              f"{r['agreement']:.2f} KL {r['kl']:.4f} step {record['step_seconds']:.0f} s", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma-separated scheme:W/A:method[+adalog][+gptq]")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated calibration draws")
    p.add_argument("--num-calib", type=int, default=None, help="calibration images (default: all of calib/)")
    p.add_argument("--batch-size", type=int, default=50, help="calibration / evolq batch (the CLI default)")
    p.add_argument("--recon-iters", type=int, default=RECON_CPU["recon_iters"])
    p.add_argument("--recon-batch", type=int, default=RECON_CPU["recon_batch"])
    p.add_argument("--recon-lr", type=float, default=RECON_CPU["recon_lr"])
    p.add_argument("--recon-scale-lr", type=float, default=RECON_CPU["recon_scale_lr"])
    p.add_argument("--evolq-passes", type=int, default=EVOLQ_CPU["evolq_passes"], help="0: no Evol-Q step")
    p.add_argument("--recon-options", default="", help="more recon options, k=v,k=v (e.g. learn_log=false)")
    p.add_argument("--variants", default="", help="extra recon runs from a copy of each base, recorded as "
                   "pipeline recon[NAME]: NAME:k=v,k=v;NAME2:...")
    p.add_argument("--no-recon", action="store_true", help="no recon step in the chain (base, then Evol-Q)")
    p.add_argument("--evolq-options", default="", help="more evolq options of every Evol-Q step, k=v,k=v (a "
                   "list joined by +: mode=discrete,search=logq+ptf)")
    p.add_argument("--evolq-variants", default="", help="extra Evol-Q runs from a copy of the chain after recon "
                   "(after the base with --no-recon), recorded as pipeline recon,evolq[NAME]: "
                   "NAME:k=v,k=v;NAME2:...")
    p.add_argument("--rows", default=str(ROWS), help="file of the kept runs")
    p.add_argument("--num-val", type=int, default=None, help="val images (default all 500; fewer for a smoke run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help=f"forget the runs kept in {ROWS.name}")
    p.add_argument("--render", action="store_true", help="only rewrite the section (and recipe numbers) from the "
                                                          "kept runs")
    p.add_argument("--no-write", action="store_true", help="print only: leave BENCHMARKS.md, the kept runs, the "
                                                           "figure and the recipe numbers alone")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    settings = {k: getattr(args, k) for k in ("num_calib", "batch_size", "recon_iters", "recon_batch", "recon_lr",
                                              "recon_scale_lr", "evolq_passes", "num_val")}
    for k in ("recon_options", "evolq_options", "evolq_variants", "no_recon"):
        if getattr(args, k):  # (absent from the settings of rows kept before the option existed)
            settings[k] = getattr(args, k)
    fresh_run = args.no_write and not args.render  # a --no-write run neither reads nor writes the kept runs
    kept = {"settings": settings, "rows": {}} if fresh_run else load_kept_rows(Path(args.rows), settings, args.fresh)
    seeds = [int(s) for s in args.seeds.split(",")]
    specs = args.configs.split(",")
    for spec in specs:
        parse_spec(spec)
    if not args.render:
        bench = Bench()
        bench.val(args.num_val)
        kept["float_top1"] = bench.float_result["top1"]
        kept["num_val"] = len(bench.val_x)
        for seed in seeds:
            calib_x = None
            for spec in specs:
                if f"{spec}|{seed}" in kept["rows"]:
                    continue
                if calib_x is None:
                    calib_x = bench.calib(args.num_calib, seed=seed)
                kept["rows"][f"{spec}|{seed}"] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                                  "command": command(),
                                                  "pipelines": run_one(bench, calib_x, spec, seed, args)}
                if not args.no_write:
                    save_kept_rows(Path(args.rows), kept)
                    report(args, kept, t_start, partial=True)
    report(args, kept, t_start, partial=False)


def setting_order(spec: str) -> tuple:
    scheme, w, a, method_spec, _ = parse_spec(spec)
    return REGIME_ORDER.get(scheme, 9), -a, -w


def report(args, kept: dict, t_start: float, partial: bool) -> None:
    runs: dict[str, dict[str, list[dict]]] = {}  # spec -> pipeline -> one record per seed
    for key, row in kept["rows"].items():
        spec = key.rsplit("|", 1)[0]
        for pipeline, rec in row["pipelines"].items():
            runs.setdefault(spec, {}).setdefault(pipeline, []).append(rec)
    if not runs:
        print("no kept runs to report")
        return
    float_top1, num_val = kept["float_top1"], kept["num_val"]
    rows, measured, steps_of = [], {}, {}
    for spec in sorted(runs, key=setting_order):
        scheme, w, a, method_spec, _ = parse_spec(spec)
        for pipeline, recs in runs[spec].items():
            recipe = RECIPE_OF.get(pipeline, "{scheme}-{method}-" + pipeline).format(
                scheme=scheme, method=method_spec.replace("+", "-"))
            step = [r["step_seconds"] for r in recs]
            kl_cal = [r["calib_kl"]["before"] - r["calib_kl"]["after"] for r in recs if "calib_kl" in r]
            steps = method_spec.replace("+", " + ") + (" + " + pipeline.replace(",", " + ") if pipeline else "")
            agree, top1 = statistics.mean(r["agreement"] for r in recs), statistics.mean(r["top1"] for r in recs)
            rows.append([f"{scheme} W{w}A{a}", steps, len(recs), mean_std([r["top1"] for r in recs]),
                         f"{float_top1 - top1:.2f}",
                         mean_std([r["agreement"] for r in recs]), mean_std([r["kl"] for r in recs], ".4f"),
                         mean_std(kl_cal, ".4f") if kl_cal else "-", mean_std(step, ".0f"),
                         mean_std([r["seconds"] for r in recs], ".0f"),
                         "/".join(str(len(r["pieces_kept_start"])) for r in recs)
                         if pipeline.startswith("recon") and "evolq" not in pipeline else "-"])
            if pipeline not in RECIPE_OF:  # a --variants run: in the table, not a recipe
                continue
            steps_of[(recipe, w, a)] = steps
            measured[(recipe, w, a)] = {
                "agreement": round(agree, 2), "top1": round(top1, 2),
                "kl": round(statistics.mean(r["kl"] for r in recs), 4),
                "seconds": round(statistics.mean(r["seconds"] for r in recs), 1), "draws": len(recs)}
    best = best_rows(measured)
    total_min = (time.perf_counter() - t_start) / 60
    compute_min = sum(max(r["seconds"] for r in row["pipelines"].values())
                      + sum(r["eval_seconds"] for r in row["pipelines"].values()) for row in kept["rows"].values()) / 60
    s = kept["settings"]
    draws = sorted({int(key.rsplit("|", 1)[1]) for key in kept["rows"]})
    md = [
        "## Block reconstruction (recon), chains and recipes on the real DeiT-Tiny (issue 11)",
        "",
        *(["**Partial: the run was cut off after the configurations shown.**", ""] if partial else []),
        "Commands (each runs only what `benchmarks/" + Path(args.rows).name + "` lacks; `--render` rewrites this "
        "section from it): "
        + ", ".join(f"`{c}`" for c in dict.fromkeys(r.get("command", "?") for r in kept["rows"].values()))
        + "  ",
        f"{environment()}  ",
        f"{len(kept['rows'])} runs (configuration × draw), {compute_min:.0f} min of calibration, refinement and "
        "evaluation in all. Every row ran on the 2 CPU cores of this machine (no GPU was lent).",
        "",
        f"**Reduced for CPU time:** {s['num_calib'] or 'all'} of the 250 `calib/` images (BRECQ/QDrop: 1,024), "
        "used for the base calibration, the reconstruction and the Evol-Q search alike; recon "
        f"**{s['recon_iters']} steps per piece** (BRECQ/QDrop: 20,000) on mini-batches of {s['recon_batch']} "
        "images (BRECQ: 32), AdaRound "
        f"learning rate {s['recon_lr']:g} (BRECQ 1e-3, raised because of the few steps), step-size learning "
        f"rate {s['recon_scale_lr']:g} relative to each step size (BRECQ: 4e-5 absolute, about 1e-3 relative); "
        f"regulariser weight 0.01, warm-up 20 %, β 20 → 2, QDrop probability 0.5 as the defaults. Evol-Q "
        f"(default checked mode) with **{s['evolq_passes']} pass(es)** (default 10), batches of "
        f"{s['batch_size']}. More recon options: {s.get('recon_options') or 'none'}; rows `recon[NAME]` are "
        "extra reconstructions (`--variants`) from a copy of the same base. "
        + (f"More Evol-Q options: {s.get('evolq_options') or 'none'}; rows `evolq[NAME]` are extra Evol-Q runs "
           f"(`--evolq-variants` {s['evolq_variants']}) from a copy of the chain before them. "
           if s.get("evolq_variants") else "")
        + ("No recon step in the chain (`--no-recon`). " if s.get("no_recon") else "") +
        f"Calibration draws (seeds): {', '.join(map(str, draws))}; column n says how many "
        "a row has. Base methods alone at other settings: sections lowbit, baselines, ptqvit and apq.",
        "",
        f"Evaluation: all {num_val} images of `val/` (float top-1 {float_top1:.2f}). Cells are mean ± std over "
        "the draws. Drop = float top-1 − mean quant top-1; agreement = top-1 agreement with float (%); KL = mean "
        "KL(float ‖ quant) in nats; calib KL gain = the step's decrease of KL(float ‖ quant) on the calibration "
        "images; step s = wall time of that step (calibration, reconstruction or search); total s = calibration "
        "plus every step so far; kept = per draw, pieces (of 14: stem, 12 blocks, head) where the learned state "
        "was worse on the calibration images and the start was kept. Selection never used the val labels.",
        "",
        table(["config", "pipeline", "n", "top-1", "drop", "agreement", "KL", "calib KL gain", "step s",
               "total s", "kept"], rows),
        "",
        "Best row per setting, which `--recipe best` picks (highest mean agreement; ties: lower KL, then cheaper): "
        + "; ".join(f"{sch} W{w}A{a}: {steps_of[(name, w, a)]} = recipe `{name}` "
                    f"({measured[(name, w, a)]['agreement']:.2f})"
                    for (sch, w, a), name in sorted(best.items(), key=lambda kv: (REGIME_ORDER.get(kv[0][0], 9),
                                                                                   -kv[0][2], -kv[0][1]))) + ".",
        "",
        f"Per-piece traces (MSE before → after, seconds): `benchmarks/{Path(args.rows).name}`. Figure: "
        "`benchmarks/figures/recon_agreement.png`.",
    ]
    text = "\n".join(md)
    print(text)
    if not args.no_write:
        plot(runs)
        write_section("recon", text)
        write_measured(measured, s)
    print(f"{'partial' if partial else 'done'} after {total_min:.1f} min", flush=True)


def best_rows(measured: dict) -> dict:
    """(scheme, w, a) -> the recipe --recipe best picks from these measurements (vitq.recipes.rank)."""
    index = {r.name: i for i, r in enumerate(RECIPES)}
    missing = sorted({name for name, _, _ in measured} - set(index))
    if missing:
        raise SystemExit(f"rows without a recipe in vitq.recipes.RECIPES: {missing} (add them, or --recipe best "
                         "cannot reproduce the leaderboard)")
    best = {}
    for (name, w, a), m in measured.items():
        r = RECIPES[index[name]]
        key = (r.scheme, w, a)
        if key not in best or rank(m, index[name]) > rank(measured[(best[key], w, a)], index[best[key]]):
            best[key] = name
    return best


def write_measured(measured: dict, settings: dict) -> None:
    """The recipe numbers (vitq.recipes_measured), generated from the kept runs."""
    setting = ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None)
    lines = ['"""Measured recipe numbers: generated by ``python -m benchmarks.bench_recon`` from',
             "``benchmarks/recon_rows.json`` (BENCHMARKS.md, section recon). Do not edit by hand.",
             "",
             "DeiT-Tiny, all val images, the CPU setting of the recipes:",
             *textwrap.wrap(setting, 116),
             "agreement and top-1 in %, KL in nats, seconds = wall time of calibration and refiners on 2 CPU cores;",
             "each value is the mean over the calibration draws (draws = how many).",
             '"""',
             "",
             'WHERE = "DeiT-Tiny, 500 val images, CPU setting; BENCHMARKS.md recon section"',
             "",
             "MEASURED: dict[tuple[str, int, int], dict] = {"]
    for (recipe, w, a), v in sorted(measured.items()):
        values = ", ".join(f'"{k}": {x!r}' for k, x in v.items())
        lines += [f'    ("{recipe}", {w}, {a}):', f"        {{{values}, \"where\": WHERE}},"]
    lines.append("}")
    MEASURED_FILE.write_text("\n".join(lines) + "\n")


def plot(runs: dict) -> None:
    """Agreement against weight bits: one panel per regime, a colour per base, a line style per pipeline."""
    series: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
    for spec, pipes in runs.items():
        scheme, w, a, method, _ = parse_spec(spec)
        for pipeline, recs in pipes.items():
            series.setdefault((scheme, method, pipeline), []).append(
                (int(w), statistics.mean(r["agreement"] for r in recs)))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = sorted({k[0] for k in series}, key=lambda sch: REGIME_ORDER.get(sch, 9))
    methods = sorted({k[1] for k in series})
    styles = {"": ":", "recon": "-", "recon,evolq": "--"}
    fig, axes = plt.subplots(1, len(schemes), figsize=(5.5 * len(schemes), 4.2), squeeze=False)
    for ax, scheme in zip(axes[0], schemes, strict=True):
        for (sch, method, pipeline), pts in sorted(series.items()):
            if sch != scheme:
                continue
            pts.sort()
            label = method + (" + " + pipeline.replace(",", " + ") if pipeline else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle=styles.get(pipeline, "-."),
                    color=f"C{methods.index(method)}", label=label)
        ax.set_xlabel("weight bits" + (" (activations 8 bits)" if scheme == "fq" else " (activations: the same)"))
        ax.set_ylabel("top-1 agreement with float (%)")
        ax.set_title(f"DeiT-Tiny, {scheme}, 500 val images")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(FIGURES / "recon_agreement.png", dpi=120)


if __name__ == "__main__":
    main()

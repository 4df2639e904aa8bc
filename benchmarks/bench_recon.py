"""Block reconstruction on the real DeiT-Tiny (issue 11): the leaderboard of base method alone, + recon, + recon +
evolq, for each configuration and calibration draw; calibrate/reconstruct/search on calib/, evaluate on all of
val/. The defaults are the reduced CPU setting of the recipes (vitq.recipes.RECON_CPU); the written section
states every reduction.

The grid is ``benchmarks/grids/recon.yaml``: one sweep job per (configuration, draw) runs the chain recon,evolq
with ``eval_steps`` (the base and + recon evaluated inside the job), so a job gives the three rows of its
configuration. ``vitq sweep`` runs it into a results store (a rerun runs only unfinished jobs); this script renders
the section, the figure and the recipe numbers (src/vitq/recipes_measured.py, read by ``--recipe best``) from
the store. No loop, kept-row file or lock of its own. The rows the script's loop measured before sweeps were
imported into the store once (``benchmarks/import_kept_rows.py``) and are marked as such.

    vitq sweep benchmarks/grids/recon.yaml --store benchmarks/results/recon [--only seed=0 --only w_bits=4]
    python -m benchmarks.bench_recon [--store DIR] [--run [--only KEY=VALUE]] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import textwrap
import time
from pathlib import Path

from benchmarks.common import FIGURES, ROOT, environment, mean_std, table, write_section
from benchmarks.sweep_section import latest, shown
from vitq.recipes import RECIPES, rank

GRID = ROOT / "benchmarks" / "grids" / "recon.yaml"
STORE = ROOT / "benchmarks" / "results" / "recon"
RECIPE_OF = {"": "{scheme}-{method}", "recon": "{scheme}-{method}-recon",
             "recon,evolq": "{scheme}-{method}-recon-evolq"}
MEASURED_FILE = ROOT / "src" / "vitq" / "recipes_measured.py"
REGIME_ORDER = {"fq": 0, "matmul": 1}
CANONICAL = ("adalog", "gptq")  # the suffixes of a base's label that name a recipe


def parse_spec(spec: str) -> tuple[str, int, int, str, list[str]]:
    """``scheme:W/A:label`` -> (scheme, w, a, label, label's suffixes after the method)."""
    scheme, bits, method_spec = spec.split(":")
    w, a = (int(v) for v in bits.split("/"))
    return scheme, w, a, method_spec, method_spec.split("+")[1:]


def is_recipe(method_spec: str) -> bool:
    """A base named by method + adalog + gptq (a recipe of vitq.recipes); other labels are variants."""
    return set(method_spec.split("+")[1:]) <= set(CANONICAL)


def pipelines(row: dict) -> dict[str, dict]:
    """A store row's stages as the leaderboard's pipelines: '' (base), 'recon', 'recon,evolq' -> their record
    (metrics, step and cumulative seconds, calibration KL gain, pieces of recon that kept their start)."""
    rec = row["record"]
    chain = rec["refinement"]["chain"] if "chain" in (rec.get("refinement") or {}) else [rec.get("refinement")]
    info = {step["refiner"]: step for step in chain if step}
    out, names, total = {}, [], 0.0
    for stage in rec["stages"]:
        if stage["after"] != "base":
            names.append(stage["after"])
        total += stage["step_s"]
        r = {"seconds": total, "step_seconds": stage["step_s"], "eval_seconds": stage["eval_s"], **stage["quant"]}
        if stage["calib_kl"] is not None:
            r["calib_kl"] = stage["calib_kl"]
        if stage["after"] == "recon":
            r["pieces_kept_start"] = info["recon"]["pieces_kept_start"]
        out[",".join(names)] = r
    return out


def store_runs(store: Path) -> dict:
    """{"rows": {"spec|seed": {"when", "command", "pipelines", "imported"}}, "float_top1", "num_val",
    "settings"} from the store: the latest row of each job of the grid as it is now (rows made at another
    setting, e.g. before the recipes used every image, stay in the store but not in the section)."""
    kept: dict = {"rows": {}, "float_top1": None, "num_val": None, "settings": None}
    if not (store / "results.sqlite").exists():
        return kept
    where = shown(store)
    found, _ = latest(store, GRID)
    for row in found.values():
        c = row["config"]
        if not c.get("eval_steps") or c["refine"] != "recon,evolq":
            continue
        spec = f"{c['scheme']}:{c['w_bits']}/{c['a_bits']}:{row['label']}"
        imported = row["record"].get("imported_from")
        command = row["record"]["command"] if imported else \
            f"vitq sweep {shown(GRID)} --store {where}"
        kept["rows"][f"{spec}|{c['seed']}"] = {"when": row["finished"], "command": command, "imported": imported,
                                               "machine": row["machine"], "pipelines": pipelines(row)}
        kept["float_top1"], kept["num_val"] = row["float_top1"], row["num_val"]
        ro = dict(c["refine_options"])
        for step in (row["record"]["refinement"] or {}).get("chain", []):  # the options in effect (defaults too)
            ro[step["refiner"]] = {**step.get("options", {}), **ro.get(step["refiner"], {})}
        kept["settings"] = {"num_calib": c["num_calib"], "batch_size": c["batch_size"],
                            "recon_iters": ro["recon"].get("iters"), "recon_batch": ro["recon"].get("batch"),
                            "recon_lr": ro["recon"].get("lr"), "recon_scale_lr": ro["recon"].get("scale_lr"),
                            "evolq_passes": ro["evolq"].get("passes")}
        given = c["refine_options"].get("recon", {})  # what the grid sets beyond the four reduced ones
        more = {k: v for k, v in given.items() if k not in ("iters", "batch", "lr", "scale_lr")}
        if more:
            kept["settings"]["recon_options"] = ",".join(f"{k}={v}" for k, v in sorted(more.items()))
    return kept


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", default=str(STORE), help="results store of the grid (default %(default)s)")
    p.add_argument("--run", action="store_true", help="first run the grid's unfinished jobs with vitq sweep")
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                   help="with --run: only these jobs of the grid (as vitq sweep --only)")
    p.add_argument("--address", default=None, help="with --run: a Ray cluster (default: a local instance)")
    p.add_argument("--no-write", action="store_true", help="print only: leave BENCHMARKS.md, the figure and the "
                                                           "recipe numbers alone")
    args = p.parse_args()
    t_start = time.perf_counter()
    store = Path(args.store).resolve()
    if args.run:
        import vitq
        from vitq.cli.results import parse_where

        print(vitq.sweep(str(GRID), str(store), address=args.address, where=parse_where(args.only, "--only")))
    kept = store_runs(store)
    report(args, kept, t_start, partial=missing_jobs(kept))


def store_name(args) -> str:
    store = Path(args.store).resolve()
    return str(store.relative_to(ROOT) if store.is_relative_to(ROOT) else store)


def missing_jobs(kept: dict) -> int:
    """How many of the grid's (configuration, draw) the store has no run of."""
    from vitq.sweep.grid import expand, read_grid

    jobs = expand(read_grid(str(GRID)), str(GRID.parent))
    return sum(1 for j in jobs if f"{j.config['scheme']}:{j.config['w_bits']}/{j.config['a_bits']}:{j.label}|"
               f"{j.config['seed']}" not in kept["rows"])


def setting_order(spec: str) -> tuple:
    scheme, w, a, method_spec, _ = parse_spec(spec)
    return REGIME_ORDER.get(scheme, 9), -a, -w


def report(args, kept: dict, t_start: float, partial: bool) -> None:
    """The section from the store's runs; ``partial``: the grid has jobs the store lacks."""
    runs: dict[str, dict[str, list[dict]]] = {}  # spec -> pipeline -> one record per seed
    for key, row in kept["rows"].items():
        spec = key.rsplit("|", 1)[0]
        for pipeline, rec in row["pipelines"].items():
            runs.setdefault(spec, {}).setdefault(pipeline, []).append(rec)
    if not runs:
        print(f"no runs of {GRID.name} in the store {args.store}")
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
            if pipeline not in RECIPE_OF or not is_recipe(method_spec):  # a variant: in the table, not a recipe
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
    imported = sum(1 for r in kept["rows"].values() if r.get("imported"))
    whens = [r["when"].replace("T", " ").rstrip("Z").removesuffix(" UTC")[:16] for r in kept["rows"].values()]
    draws = sorted({int(key.rsplit("|", 1)[1]) for key in kept["rows"]})
    md = [
        "## Block reconstruction (recon), chains and recipes on the real DeiT-Tiny (issue 11)",
        "",
        *([f"**Partial: the store lacks {partial} of the grid's jobs (`vitq sweep --status`).**", ""]
          if partial else []),
        f"Grid: `{shown(GRID)}`, one `vitq sweep` job per configuration and draw (the chain "
        "recon,evolq with `eval_steps`: base and + recon evaluated inside the job); a rerun of the grid runs only "
        "the jobs the store lacks. Section, figure and recipe numbers written by `python -m benchmarks.bench_recon` "
        "from the store. Commands that made the rows: "
        + ", ".join(f"`{c}`" for c in dict.fromkeys(r.get("command", "?") for r in kept["rows"].values()))
        + (f" ({imported} of the runs were made by this script's loop before sweeps, with the commands shown, "
           "and imported into the store by `benchmarks/import_kept_rows.py`; their code version says so)"
           if imported else "") + "  ",
        f"Written: {environment()}  ",
        f"{len(kept['rows'])} runs (configuration × draw), {compute_min:.0f} min of calibration, refinement and "
        f"evaluation in all, from {min(whens)} to {max(whens)} UTC, on: "
        + "; ".join(dict.fromkeys(r["machine"] or "?" for r in kept["rows"].values())) + ".",
        "",
        f"**Reduced for CPU time:** {s['num_calib'] or 'all'} of the 250 `calib/` images (BRECQ/QDrop: 1,024), "
        "used for the base calibration, the reconstruction and the Evol-Q search alike; recon "
        f"**{s['recon_iters']} steps per piece** (BRECQ/QDrop: 20,000) on mini-batches of {s['recon_batch']} "
        "images (BRECQ: 32), AdaRound "
        f"learning rate {s['recon_lr']:g} (BRECQ 1e-3, raised because of the few steps), step-size learning "
        f"rate {s['recon_scale_lr']:g} relative to each step size (BRECQ: 4e-5 absolute, about 1e-3 relative); "
        f"regulariser weight 0.01, warm-up 20 %, β 20 → 2, QDrop probability 0.5 as the defaults. Evol-Q "
        f"(default checked mode) with **{s['evolq_passes']} pass(es)** (default 10), batches of "
        f"{s['batch_size']}. More recon options: {s.get('recon_options') or 'none'}. "
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
        f"Per-piece traces (MSE before → after, seconds): the job records of the store (column `record` of "
        f"`{store_name(args)}/results.sqlite`, `refinement.chain[0].trace`). Figure: "
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
             "the sweep store ``benchmarks/results/recon`` (BENCHMARKS.md, section recon). Do not edit by hand.",
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

"""Evol-Q on the real DeiT-Tiny (issues 3 and 15), from a sweep: the fqvit base vs + evolq in the release's
(faithful) mode and in the default checked mode (search/check split of the calibration images), for fq W4A8 and
fq W3A8; calibrate and search on calib/, evaluate on all of val/; the search and check fitness curves of every run.

The runs are the seed-0 jobs of the grid ``benchmarks/grids/evolq.yaml`` (each job evaluates its base too:
``eval_steps``), whose checked jobs over seeds 0, 1, 2 also make the section "evolq-seeds". ``vitq sweep`` runs the
grid into ``benchmarks/results/evolq`` and this script renders both sections from the store (the "evolq-seeds" one
by ``benchmarks/bench_evolq_seeds.py``); no loop or kept-row file of its own. The rows measured before sweeps
(``benchmarks/figures/evolq_runs.json``, this script's run of 2026-11-23, and ``evolq_seed_rows.json``) were
imported by ``benchmarks/import_kept_rows.py`` (kinds ``evolq`` and ``evolq-seeds``).

    vitq sweep benchmarks/grids/evolq.yaml --store benchmarks/results/evolq [--only seed=0]
    python -m benchmarks.bench_evolq [--store DIR] [--run [--only KEY=VALUE]] [--no-write]
    python -m benchmarks.bench_evolq --landscape [--landscape-block 11] [--threads 2]

``--landscape`` is the one computation here that is not a job: it calibrates the fq W4A8 fqvit base on the grid's
calibration draw and measures infoNCE and agreement along one random direction of one block's scales
(``benchmarks/figures/evolq_landscape.{png,json}``); the section shows it once such a run has written its date
into the json. (Issue 15's before/after row, the old ``--issue-row``, was a one-time comparison with quoted
numbers: a sub-grid ``{bits: "4/8", num_calib: 64, seed: 0}`` of both modes gives its runs.)
"""

from __future__ import annotations

import json
import time

from benchmarks import bench_evolq_seeds
from benchmarks.common import FIGURES, ROOT, environment, table, write_json
from benchmarks.sweep_section import (
    after_table,
    arguments,
    emit,
    grid_jobs,
    latest,
    missing_line,
    provenance,
    setting_key,
    shown,
)

SECTION = "evolq"
GRID = ROOT / "benchmarks" / "grids" / "evolq.yaml"
STORE = ROOT / "benchmarks" / "results" / "evolq"
LANDSCAPE = FIGURES / "evolq_landscape.json"
MODES = ("faithful", "checked")


def curve(values) -> str:
    return " ".join(f"{v:.4f}" for v in values)


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render(store) -> str:
    found, missing = latest(store, GRID)
    runs: dict = {}  # (tag, mode) -> row, seed 0
    cfg = None
    for job in grid_jobs(GRID):
        c = job.config
        if c["seed"] != 0:
            continue
        cfg = c
        row = found.get(setting_key(c, job.label))
        if row is not None:
            runs[(f"{c['scheme']} W{c['w_bits']}A{c['a_bits']}", c["refine_options"]["evolq"]["mode"])] = row
    rows, curves = [], []
    for tag in dict.fromkeys(t for t, _ in runs):
        done = [(m, runs[(tag, m)]) for m in MODES if (tag, m) in runs]
        base = done[0][1]["record"]["stages"][0]["quant"]
        rows.append([tag, "fqvit", _num(base["top1"], ".2f"), f"{base['agreement']:.2f}", f"{base['kl']:.4f}",
                     *["-"] * 7])
        for mode, r in done:
            b, info = r["record"]["stages"][0]["quant"], r["record"]["refinement"]
            f, c = info["fitness"], info.get("check")
            rows.append([tag, f"fqvit + evolq {mode}", _num(r["top1"], ".2f"), f"{r['agreement']:.2f}",
                         f"{r['kl']:.4f}", f"{r['agreement'] - b['agreement']:+.2f}", f"{r['kl'] - b['kl']:+.4f}",
                         f"{f['initial']:.4f} → {f['final']:.4f} ({f['search_images']})",
                         f"{c['initial']:.4f} → {c['final']:.4f} ({c['num_images']})" if c else "-",
                         f"{c['rejected_steps']} / {c['steps']}" if c else "-", info["evaluations"],
                         f"{info['search_seconds']:.0f}"])
            cv = info["curves"]
            curves.append(f"- {tag} {mode}: search `{curve(cv['search'])}`" +
                          (f"; check `{curve(cv['check'])}`" if "check" in cv else ""))
    done_rows = list(runs.values())
    floats = [r["float_top1"] for r in done_rows if r["float_top1"] is not None]
    evolq = cfg["refine_options"]["evolq"]
    md = ["## Evol-Q / CPT-V on the real DeiT-Tiny (issues 3 and 15)", ""]
    seed0 = [j for j in missing if j.config["seed"] == 0]
    if seed0:
        md += [missing_line(seed0), ""]
    md += [provenance(done_rows, GRID, store) + "  ", f"Written: {environment()}  ",
           "One seed (0: the calibration order, the search/check split and the search; section \"evolq-seeds\" has "
           "three); with 500 val images one image is 0.2 points.", "",
           f"**Reduced for CPU time:** {cfg['num_calib']} of the 250 `calib/` images (paper: 1,000), "
           f"**{evolq['passes']} pass(es)** over the 12 blocks (paper and default: 10). Everything else is the "
           "mode's default: population 15, tournament 10, K = 3 cycles, one child per generation, qkv+proj weight "
           "scales, absolute mutation r = 1e-3 (<8-bit weights), batches of 100 images (infoNCE negatives = the "
           "other 99). **faithful** = the release: search fitness on all calibration images, every improvement "
           "kept. **checked** (the default since issue 15) = the same search on a seeded 80 % of the images; a "
           "block's new scales are kept only when the infoNCE on the other 20 % (check part, unlabelled) does not "
           "get worse. Each job calibrates its own base on the same images (the base row: from the faithful job's "
           "`eval_steps` stage; the checked job's base is the same model).", "",
           f"Evaluation: all 500 images of `val/` (float top-1 {floats[0] if floats else float('nan'):.2f}). "
           "Agreement = top-1 agreement with float (%), KL = mean KL(float ‖ quant) in nats, Δ = change against "
           "the base row. Fitness = infoNCE (T = 3), initial → final on the search part (images), check = the same "
           "on the check part; rejected = block steps whose change was undone by the check. Selection never used "
           "the val labels.", "",
           table(["scheme", "method", "top-1", "agreement", "KL", "Δ agree", "Δ KL", "search fitness",
                  "check fitness", "rejected / steps", "evals", "search s"], rows), "",
           "Fitness curves (value after every block step, last block first; the first value is the start):", "",
           *curves, "",
           f"Per-run records (config, traces, timings): the store's `record` column (`vitq results --store "
           f"{shown(store)} --format json`)."]
    md += landscape_lines()
    kept = "\n".join(ln for ln in after_table(SECTION).splitlines() if not ln.startswith(
        ("Fitness curves", "- fq ", "Per-run records", "Landscape (", "![Evol-Q loss landscape]", "**Partial"))
        ).strip()
    if kept:
        md += ["", kept]
    return "\n".join(md)


def landscape_lines() -> list[str]:
    if not LANDSCAPE.exists():
        return []
    land = json.loads(LANDSCAPE.read_text())
    if "written" not in land:  # made before this script wrote its date: not shown
        return []
    lo, hi, ag = min(land["infonce"]), max(land["infonce"]), land["agreement"]
    return ["", f"Landscape ({land['state']}, {land['block']}, qkv+proj weight scales, {land['num_calib']} "
            f"calibration images; `{land['command']}`, {land['written']}): scales moved along one random direction, "
            f"relative RMS change ±{100 * land['radius']:.0f} % in {land['steps']} steps. infoNCE {lo:.4f} .. "
            f"{hi:.4f}; agreement {min(ag):.1f} .. {max(ag):.1f} %. Numbers: `benchmarks/figures/"
            "evolq_landscape.json`.", "", "![Evol-Q loss landscape](benchmarks/figures/evolq_landscape.png)"]


def landscape(args, grid=GRID) -> None:
    """The landscape figure around the grid's fq W4A8 fqvit base, calibrated as its seed-0 job calibrates it."""
    import torch

    import vitq
    from benchmarks.common import command
    from vitq.calib import CalibData
    from vitq.precision import full_float32
    from vitq.refine.landscape import compute_landscape, plot_landscape
    from vitq.sweep.job import calib_data, float_model

    torch.set_num_threads(args.threads)
    c = next(j.config for j in grid_jobs(grid) if (j.config["w_bits"], j.config["a_bits"], j.config["seed"]) ==
             (4, 8, 0))
    draw = calib_data(c["model"], c["calib"], c["num_calib"], c["seed"], c["batch_size"], args.threads)
    calib = CalibData(torch.as_tensor(draw["images"]), batch_size=c["batch_size"], progress=False, seed=c["seed"])
    model = float_model(c["model"])
    torch.manual_seed(c["seed"])
    with full_float32():
        base, _ = vitq.quantize(model, calib, vitq.Scheme(c["scheme"], c["w_bits"], c["a_bits"]), c["method"],
                                seed=c["seed"], progress=False)
        land = compute_landscape(base, model, calib, block=args.landscape_block, dims=1,
                                 steps=args.landscape_steps, radius=args.landscape_radius)
    land.update(state=f"{c['scheme']} W{c['w_bits']}A{c['a_bits']} {c['method']}", command=command(),
                written=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    plot_landscape(land, str(FIGURES / "evolq_landscape.png"))
    write_json(LANDSCAPE, land)
    print("\n".join(landscape_lines()))


def extra(ap) -> None:
    ap.add_argument("--landscape", action="store_true", help="compute the landscape figure (a real-model run), "
                    "then render")
    ap.add_argument("--landscape-block", default="11")
    ap.add_argument("--landscape-steps", type=int, default=21)
    ap.add_argument("--landscape-radius", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of --landscape")


def main() -> int:
    args = arguments(GRID, STORE, __doc__, extra=extra)
    if args.landscape:
        landscape(args)
    md, seeds = render(args.store), bench_evolq_seeds.render(args.store)
    emit(args, (SECTION, md), (bench_evolq_seeds.SECTION, seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

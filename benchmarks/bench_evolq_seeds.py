"""Evol-Q's spread over seeds (issue 15, section "evolq-seeds"), from a sweep: fq W4A8 and W3A8, the fqvit base on all
250 ``calib/`` images, then Evol-Q (checked mode, one pass), three seeds; the change against each seed's own base as
mean ± std. The jobs are the checked ones of ``benchmarks/grids/evolq.yaml`` (``eval_steps`` evaluates the base
inside each job); ``vitq sweep`` runs the grid into ``benchmarks/results/evolq`` and ``python -m
benchmarks.bench_evolq`` renders this section with section "evolq" (this module alone renders only this one). No
loop or kept-row file of its own (the rows ``bench_evolq.py --seeds`` kept before sweeps,
``benchmarks/evolq_seed_rows.json``, were imported by ``python -m benchmarks.import_kept_rows evolq-seeds FILE``;
seed 0 is the same job as section "evolq"'s checked runs, and came from that section's record, imported first).

    vitq sweep benchmarks/grids/evolq.yaml --store benchmarks/results/evolq --only "label=fqvit + evolq checked"
    python -m benchmarks.bench_evolq_seeds [--store DIR] [--run [--only KEY=VALUE]] [--no-write]
"""

from __future__ import annotations

import statistics

from benchmarks.common import ROOT, environment, mean_std, table
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

SECTION = "evolq-seeds"
GRID = ROOT / "benchmarks" / "grids" / "evolq.yaml"
STORE = ROOT / "benchmarks" / "results" / "evolq"
MODE = "checked"  # the mode the grid runs over seeds


def pm(values, fmt: str) -> str:
    return mean_std(values, fmt, always=True)


def seed_row(row: dict) -> dict:
    """One job's numbers: its base (the eval_steps stage) and the refined model, their change, the search's."""
    base = row["record"]["stages"][0]["quant"]
    info = row["record"]["refinement"] or {}
    return {"seed": row["seed"], "base_agree": base["agreement"], "base_kl": base["kl"], "agree": row["agreement"],
            "kl": row["kl"], "d_agree": row["agreement"] - base["agreement"], "d_kl": row["kl"] - base["kl"],
            "rejected": (info.get("check") or {}).get("rejected_steps"), "search_s": info.get("search_seconds")}


def render(store) -> str:
    found, missing = latest(store, GRID)
    per: dict = {}
    cfg = None
    for job in grid_jobs(GRID):
        if job.config["refine_options"]["evolq"]["mode"] != MODE:
            continue  # the faithful runs of section "evolq" (one seed)
        row = found.get(setting_key(job.config, job.label))
        c = cfg = job.config
        per.setdefault((f"{c['scheme']} W{c['w_bits']}A{c['a_bits']}", job.label), [])
        if row is not None:
            per[(f"{c['scheme']} W{c['w_bits']}A{c['a_bits']}", job.label)].append(seed_row(row))
    rows = []
    for (tag, name), d in per.items():
        if not d:
            continue
        d.sort(key=lambda x: x["seed"])
        rows.append([tag, name, len(d), pm([x["base_agree"] for x in d], ".2f"), pm([x["agree"] for x in d], ".2f"),
                     pm([x["d_agree"] for x in d], "+.2f"), pm([x["base_kl"] for x in d], ".4f"),
                     pm([x["kl"] for x in d], ".4f"), pm([x["d_kl"] for x in d], "+.4f"),
                     " / ".join(f"{x['d_agree']:+.1f}, {x['d_kl']:+.4f}" for x in d),
                     " / ".join("-" if x["rejected"] is None else str(x["rejected"]) for x in d),
                     f"{statistics.mean(x['search_s'] for x in d):.0f}"])
    done = [r for r in found.values() if r["config"]["refine_options"]["evolq"]["mode"] == MODE]
    missing = [j for j in missing if j.config["refine_options"]["evolq"]["mode"] == MODE]
    seeds = sorted({r["seed"] for r in done})
    floats = [r["float_top1"] for r in done if r["float_top1"] is not None]
    evolq = cfg["refine_options"]["evolq"]
    md = ["## Evol-Q: spread over seeds (issue 15)", ""]
    if missing:
        md += [missing_line(missing), ""]
    md += [provenance(done, GRID, store) + "  ", f"Written: {environment()}  ",
           f"Seeds {', '.join(map(str, seeds)) or '-'}: each seed sets the calibration draw ({cfg['num_calib']} of the "
           "250 `calib/` images, in a seeded order that the base calibration follows), the search/check split and "
           f"the search. Evol-Q {evolq['mode']} mode, {evolq['passes']} pass(es) (reduced for CPU time, as in the "
           "section above); evaluation on all 500 `val/` images (float top-1 "
           f"{statistics.mean(floats) if floats else float('nan'):.2f}), the base evaluated inside the same job "
           "(`eval_steps`). Values are mean ± sample std over the seeds; Δ = run − its own base; rejected = block "
           "steps undone by the check (checked mode).", "",
           table(["scheme", "method", "seeds", "base agreement", "agreement", "Δ agree", "base KL", "KL", "Δ KL",
                  "per seed Δ agree, Δ KL", "rejected", "search s (mean)"], rows), "",
           "Per-run records (the search's own record, the commit of an imported run): the store's `record` column "
           f"(`vitq results --store {shown(store)} --format json`)."]
    kept = "\n".join(ln for ln in after_table(SECTION).splitlines()
                     if not ln.startswith(("Per-run records", "**Partial"))).strip()
    if kept:
        md += ["", kept]
    return "\n".join(md)


def main() -> int:
    args = arguments(GRID, STORE, __doc__)
    md = render(args.store)
    emit(args, (SECTION, md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

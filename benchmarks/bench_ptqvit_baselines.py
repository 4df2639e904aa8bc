"""The baselines PTQ-ViT compares against (EasyQuant, ACIQ, LAPQ; issue 14) on the real DeiT-Tiny, next to
minmax, omse and ptqvit at the same setting: matmul W8A8, W6A6, W4A8, W4A4 and fq W8A8, W4A8, from a sweep.

The grid is ``benchmarks/grids/ptqvit_baselines.yaml`` (one seed, reduced searches, stated in the section);
``vitq sweep`` runs it into a results store (a rerun runs only the jobs the store lacks) and this script renders
the section from the store. No loop, kept-row file or lock of its own. The 40 rows the script's loop measured
before sweeps were imported into the store once (``benchmarks/import_kept_rows.py``); the run column names the
commit (or code version) and time of each row.

    vitq sweep benchmarks/grids/ptqvit_baselines.yaml --store benchmarks/results/ptqvit_baselines
    python -m benchmarks.bench_ptqvit_baselines [--store DIR] [--run [--only KEY=VALUE]] [--no-write]
"""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.common import DEIT_WEIGHTS, ROOT, command, environment, table
from benchmarks.sweep_section import arguments, emit, shown

GRID = ROOT / "benchmarks" / "grids" / "ptqvit_baselines.yaml"
STORE = ROOT / "benchmarks" / "results" / "ptqvit_baselines"
# PTQ-ViT paper (Liu et al. 2021), Table 1: EasyQuant on DeiT-S / DeiT-B (their regime, not ours); float top-1
# of those checkpoints from the DeiT paper
PAPER_EASYQUANT = [("DeiT-S", 79.8, "W6A6", 73.26), ("DeiT-S", 79.8, "W8A8", 76.59),
                   ("DeiT-B", 81.8, "W6A6", 75.86), ("DeiT-B", 81.8, "W8A8", 79.36)]


def setting(c: dict) -> str:
    return f"{c['scheme']} W{c['w_bits']}A{c['a_bits']}"


def note_of(row: dict) -> str | None:
    """The method's own line of a row (lapq's p, easyquant's cosines, aciq's channel bits)."""
    rec, label, method = row["record"], setting(row["config"]), row["config"]["method"]
    if rec.get("imported_from"):
        return rec.get("note")
    info = rec["calibration"]
    if method == "lapq":
        return (f"- lapq {label}: p = {info['p']} (sweep losses "
                f"{ {k: round(v, 4) for k, v in info['p_sweep_loss'].items()} }), loss {info['init_loss']:.4f}"
                f" -> {info['final_loss']:.4f} after {info['evaluations']} evaluations ({info['stopped']}), "
                f"{info['changed_factors']} of {info['variables']} factors moved")
    if method == "easyquant":
        return (f"- easyquant {label}: mean layer cosine {info['mean_init_cosine']:.4f} -> "
                f"{info['mean_cosine']:.4f} over {len(info['layers'])} layers")
    if method == "aciq" and not row["config"]["options"]:
        mins = min(min(v["bits"]) for v in info["layers"].values())
        maxs = max(max(v["bits"]) for v in info["layers"].values())
        return f"- aciq {label}: weight channel bits {mins}..{maxs}, average {info['average_weight_bits']:.3f}"
    return None


def kept_from_store(store: Path) -> dict:
    """``{"rows": {"setting | name": {"row", "note"}}, "float_top1", "num_val"}`` (the latest row of each job
    setting) from the store."""
    from vitq.sweep.report import results

    kept: dict = {"rows": {}}
    if not (store / "results.sqlite").exists():
        return kept
    for r in results(str(store)):
        c = r["config"]
        rec = r["record"]
        run = (f"{rec['commit']} {r['finished'][:16].replace('T', ' ')}" if rec.get("imported_from") else
               f"{r['code_version']} {r['finished'][:16].replace('T', ' ')}")
        calib_s = r["quantize_s"] if rec.get("imported_from") else round(rec["calibration"]["seconds"], 1)
        kept["rows"][f"{setting(c)} | {r['label']}"] = {
            "row": [setting(c), r["label"], r["top1"], r["agreement"], round(r["kl"], 4), calib_s, run],
            "note": note_of(r)}
        kept["float_top1"], kept["num_val"], kept["num_calib"] = r["float_top1"], r["num_val"], c["num_calib"]
        kept.setdefault("machines", [])
        if r["machine"] not in kept["machines"]:
            kept["machines"].append(r["machine"])
    return kept


def grid_plan() -> tuple[list[str], dict]:
    """The grid's rows in table order (``setting | name``), and the options of each method."""
    from vitq.sweep.grid import expand, read_grid

    order, opts = [], {}
    for j in expand(read_grid(str(GRID)), str(GRID.parent)):
        order.append(f"{setting(j.config)} | {j.label}")
        if j.label == j.config["method"]:
            opts.setdefault(j.config["method"], j.config["options"])
    first = [k for k in order if "aciq " not in k]
    return sorted(first, key=lambda k: (SETTING_ORDER.index(k.split(" | ")[0]), METHOD_ORDER.index(
        k.split(" | ")[1]))) + [k for k in order if "aciq " in k], opts


SETTING_ORDER = ["matmul W4A8", "matmul W8A8", "matmul W6A6", "matmul W4A4", "fq W8A8", "fq W4A8"]
METHOD_ORDER = ["minmax", "omse", "ptqvit", "aciq", "easyquant", "lapq"]


def main() -> int:
    args = arguments(GRID, STORE, __doc__)
    store = args.store
    kept = kept_from_store(store)
    order, opts = grid_plan()
    md = write(args, kept, order, opts, store)
    emit(args, ("ptqvit-baselines", md))
    return 0


def write(args, kept, order, opts, store) -> str:
    """The section from the store's rows, in the grid's order."""
    n_calib, n_val = kept.get("num_calib", "?"), kept.get("num_val", "?")
    pq, eq, lq = opts.get("ptqvit", {}), opts.get("easyquant", {}), opts.get("lapq", {})
    where = shown(store)
    done = [k for k in order if k in kept["rows"]]
    missing = [k.replace(" | ", ": ") for k in order if k not in kept["rows"]]
    status = "complete" if not missing else (f"partial, {len(done)} of {len(order)} rows; not run yet: "
                                             f"{', '.join(missing)}")
    float_top1 = kept.get("float_top1", float("nan"))
    paper = [[f"{net} (paper, other model)", bits, f"{top1:.2f}", f"{top1 - fl:+.2f}"]
             for net, fl, bits, top1 in PAPER_EASYQUANT]
    ours = []
    for k in done:
        r = kept["rows"][k]["row"]
        ours.append([*r[:2], r[2], f"{r[2] - float_top1:+.2f}", r[3], f"{r[4]:.4f}", r[5], r[6]])
    notes = [kept["rows"][k]["note"] for k in done if kept["rows"][k]["note"]]
    md = f"""## Baselines of PTQ-ViT: EasyQuant, ACIQ, LAPQ on DeiT-Tiny (issue 14)

Grid: `{shown(GRID)}`, run by `vitq sweep {shown(GRID)} --store {where}` (a rerun runs
only the jobs the store lacks); this text written from the store by `{command()}`. The run column names the commit
(rows measured by this script's loop before sweeps, imported into the store by `benchmarks/import_kept_rows.py`)
or the code version of the sweep job, and the UTC time of each row's run.

Written: {environment()}. Rows ran on: {'; '.join(kept.get('machines', ['?']))}.

Model `deit_tiny_patch16_224` ({DEIT_WEIGHTS.name}); calibration: {n_calib} images of calib/ (seed 0, the same
images for every row); evaluation: all {n_val} images of val/. Float top-1 on val: {float_top1:.2f} %.
Agreement = top-1 agreement with the float model (%), KL = mean KL(float ‖ quant) in nats; calib s = calibration
seconds on this machine's 2 shared CPU cores (1-minute load average {os.getloadavg()[0]:.1f} when this was
written; other sessions were running, so times are indicative). One seed (0) per row: no mean ± std over
seeds (CPU budget); the calibration draw is the same for every row.

Settings (reductions for CPU time are marked *):
- `minmax`, `omse`, `aciq`: defaults (aciq: Laplace clipping of every tensor but the softmax output (min/max),
  per-channel weight bits in [2, 8] averaging the scheme's weight bits, weight bias correction). aciq
  ablations: `no_allocation=True` (every channel at the scheme's bits), `activations=minmax` (ACIQ on the
  weights only: activations keep their min/max) and `distribution=gaussian` (Gaussian fit and constants).
- `ptqvit`*: candidates {pq.get('candidates')} (default 100), at most 3 rounds (default 20), 16 cached tokens
  and 16 query rows per image (defaults 64 / 32), 128 ranking pairs (default 256); otherwise its defaults
  (per-output-channel weights with one searched factor, unsigned softmax output, asymmetric linear-layer inputs;
  the PTQ-ViT section has the paper's per-tensor signed form).
- `easyquant`*: grid [0.5Δ, 1.2Δ] with {eq.get('candidates')} points (default 100), at most {eq.get('rounds')}
  alternations (default 3), {eq.get('tokens')} cached tokens and 16 query rows per image (defaults 64 / 32).
- `lapq`*: p swept over {{{lq.get('p_values')}}} (default 2, 2.5, 3, 3.5, 4); Powell capped at
  {lq.get('max_evals')} loss evaluations (default 500), KL to the float outputs on the first
  {lq.get('loss_images')} calibration images (default 32). With ~150 variables and ~10 evaluations per line search,
  the cap covers only the first directions
  (quantizers of the first blocks) of Powell's first sweep.

Status: {status}.

{table(["setting", "method", "top-1 %", "Δ float", "agreement %", "KL", "calib s", "run"], ours)}

{chr(10).join(notes)}

Published EasyQuant figures from the PTQ-ViT paper (Liu et al. 2021, Table 1), on **other models** (DeiT-S,
DeiT-B, their regime and checkpoints): drops from the DeiT paper's float top-1 (DeiT-S 79.8, DeiT-B 81.8). Only
the drop is comparable in spirit, not the top-1; DeiT-Tiny is smaller and usually more sensitive to quantization.

{table(["model", "bits", "EasyQuant top-1 %", "Δ float"], paper)}
"""
    return md


if __name__ == "__main__":
    raise SystemExit(main())

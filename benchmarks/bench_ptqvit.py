"""PTQ-ViT on the real DeiT-Tiny (matmul regime) against percentile and OMSE at the same bits: both weight
granularities (per output channel, the default, and the paper's per tensor), mixed precision against the uniform
model of the same size (the default relative sensitivity with its check, and the first version: post-softmax
sensitivity, no check), and the ablations, from a sweep.

The grid is ``benchmarks/grids/ptqvit.yaml`` (one row per label, the search reduced for CPU time as the section
states); ``vitq sweep`` runs it into a results store (a rerun runs only the jobs the store lacks; ``--only
label=...`` runs some rows) and this script renders the section from the store. No loop, time budget or kept-row
file of its own; the 34 rows the script's loop measured before sweeps were imported into the store once
(``benchmarks/import_kept_rows.py``).

    vitq sweep benchmarks/grids/ptqvit.yaml --store benchmarks/results/ptqvit
    python -m benchmarks.bench_ptqvit [--store DIR] [--run [--only KEY=VALUE]] [--no-write]
"""

from __future__ import annotations

import os

from benchmarks.common import DEIT_WEIGHTS, ROOT, command, environment, table
from benchmarks.sweep_section import arguments, emit, grid_jobs, latest, shown

GRID = ROOT / "benchmarks" / "grids" / "ptqvit.yaml"
STORE = ROOT / "benchmarks" / "results" / "ptqvit"


def row_of(r: dict) -> tuple[list, str]:
    """The table row of a store row (label, top-1, agreement, KL, calib s, MP size, run) and its MP note."""
    rec = r["record"]
    if rec.get("imported_from"):
        return rec["table_row"], rec.get("note") or ""
    info = rec["calibration"]
    mp = info.get("mixed_precision")
    size = f"{mp['model_size_mb']:.3f} ({mp['average_weight_bits']:.2f} b)" if mp else ""
    row = [r["label"], r["top1"], r["agreement"], round(r["kl"], 4), round(info["seconds"], 1), size,
           f"{r['code_version']} {(r['finished'] or '')[:16].replace('T', ' ')}"]
    note = ""
    if mp:
        chk = mp["check"]
        kl = (f"; composed KL on the calibration images: program's allocation {chk['kl_chosen']:.4f}, uniform "
              f"{chk['kl_uniform']:.4f}" if "kl_chosen" in chk else "")
        note = (f"- {r['label']}: sigma {mp['sensitivity']}; sum of Omega: program's allocation "
                f"{chk['omega_chosen']:.4g}, uniform {chk.get('omega_uniform', float('nan')):.4g}{kl}; "
                f"fallback to uniform: {'yes' if chk['fallback_to_uniform'] else 'no'}; program's bits "
                f"{_short(mp['program_bits'])}; used {_short(mp['bits'])}")
    return row, note


def main() -> int:
    args = arguments(GRID, STORE, __doc__)
    found, missing = latest(args.store, GRID)
    kept = {"rows": {}}
    for r in found.values():
        row, note = row_of(r)
        kept["rows"][r["label"]] = {"row": row, "note": note, "float_top1": r["float_top1"]}
    plan = [(j.label,) for j in grid_jobs(GRID)]
    search = next((j.config["options"] for j in grid_jobs(GRID) if j.label == "ptqvit W6A6"), {})
    first = next(iter(found.values()), None)
    md = write(search, kept, plan, first["config"]["num_calib"] if first else "?", first["num_val"] if first else "?",
               args.store, found)
    emit(args, ("ptqvit", md))
    return 0


def _short(bits: dict) -> str:
    """blocks.0.attn / blocks.0.mlp ... as 'MSA 7,7,6,... / MLP 8,7,...'."""
    msa = [str(b) for k, b in bits.items() if k.endswith(".attn")]
    mlp = [str(b) for k, b in bits.items() if k.endswith(".mlp")]
    return f"MSA {','.join(msa)} / MLP {','.join(mlp)}"


def before_after(rows) -> str:
    """The issue-15 settings that concern ptqvit: before (the code path of the first version, re-run here) and
    after (today's defaults), from this run's rows; '-' where a row was not run."""
    by = {r[0]: r for r in rows}

    def cell(label, kind):
        r = by.get(label)
        if r is None:
            return "-"
        return f"{r[2]:.1f} / {r[3]:.3f}" if kind == "agree" else f"{r[1]:.1f} / {r[2]:.1f}"

    lines = [
        ["ptqvit W6A6: agreement % / KL", cell("ptqvit W6A6 per-tensor W", "agree"), cell("ptqvit W6A6", "agree")],
        ["omse W6A6: agreement % / KL", "87.6 / - (issue 15, reported)", cell("omse W6A6", "agree")],
        ["ptqvit MP6: top-1 % / agreement %", cell("ptqvit MP6 first version", "top1"), cell("ptqvit MP6", "top1")],
        ["uniform ptqvit W6A6 (same size): top-1 % / agreement %", cell("ptqvit W6A6 per-tensor W", "top1"),
         cell("ptqvit W6A6", "top1")],
    ]
    return table(["setting (matmul, this section's calibration images and search)", "before", "after"], lines)


def write(search, kept, plan, n_calib, n_val, store, found) -> str:
    rows = [kept["rows"][p[0]]["row"] for p in plan if p[0] in kept["rows"]]
    notes = [kept["rows"][p[0]]["note"] for p in plan if kept["rows"].get(p[0], {}).get("note")]
    float_top1 = next(iter(kept["rows"].values()))["float_top1"]
    missing = [p[0] for p in plan if p[0] not in kept["rows"]]
    status = "complete" if not missing else f"PARTIAL ({len(rows)} of {len(plan)} rows; not run: {', '.join(missing)})"
    imported = sorted({r["record"]["imported_from"] for r in found.values() if r["record"].get("imported_from")})
    md = f"""## PTQ-ViT (`ptqvit`) on DeiT-Tiny, `matmul` regime

Grid: `{shown(GRID)}`, run by `vitq sweep {shown(GRID)} --store {shown(store)}` (a rerun runs only the jobs the store
lacks); this text written from the store by `{command()}`. The last column names the commit (rows measured by
this script's loop before sweeps, `python -m benchmarks.bench_ptqvit`, imported into the store from
{', '.join(imported) or '-'} by `benchmarks/import_kept_rows.py`) or the code version of the sweep job, and the
UTC time of each row's run.

Written: {environment()}

Model `deit_tiny_patch16_224` ({DEIT_WEIGHTS.name}); calibration: {n_calib} images of calib/ (seed 0, the same
images for every method); evaluation: all {n_val} images of val/. Float top-1 on val: {float_top1:.2f} %.
Agreement = top-1 agreement with the float model (%), KL = mean KL(float ‖ quant) in nats; time = calibration
seconds on the 2 CPU cores of the machine of each row (1-minute load average {os.getloadavg()[0]:.1f} when this was
written).

Reductions (all for CPU time; the method's defaults are candidates 100, rounds 20, tokens 64, rows 32, pairs
256, mp-candidates 20, on all calibration images): {n_calib} calibration images, candidates
{search.get('candidates')}, at most {search.get('rounds')} rounds, {search.get('tokens')} cached token positions per
image for linear layers, {search.get('rows')} query rows per image and head for the attention matmuls,
{search.get('pairs')} ranking pairs per row, Ω estimated with {search.get('mp_candidates')} candidates and 1 round.
Calibration order: sequential (the default). percentile /
omse use their defaults (per-channel min/max and OMSE weights, per-tensor activations) on the same images.
W9/W10 modules in MP8 are allowed only through mixed precision (quantizers rebuilt with those bits).

Rows: `ptqvit` uses its defaults except the reductions above: per-output-channel weights, one searched factor
of every channel's max shared by the channels, linear-layer inputs on an unsigned grid with a zero point
(`--ptqvit-input-grid asymmetric`); every other row uses the paper's signed symmetric inputs ("symmetric
inputs": the defaults before that change); "per-tensor W" is `--ptqvit-weight-granularity tensor` (the
paper's form, the only one before issue 15); "own-channel" is `--ptqvit-channel-search own` (each weight step
also tries every channel's own factor, chosen by that channel's output error: the first per-channel version,
which the ablation rows use). Softmax output: unsigned by default; every "per-tensor W", "first version",
"own-channel" and "signed softmax" row uses the paper's signed quantizer (`--ptqvit-softmax-signed`).
MPn = `--mixed-precision n` with the default relative sensitivity (nuclear norm of QKᵀ / of the MLP output,
divided by its mean over the model's MSAs / MLPs) and the check against the uniform allocation; "first version"
is the code before issue 15 (`--ptqvit-weight-granularity tensor --ptqvit-softmax-signed
--ptqvit-mp-sensitivity softmax --ptqvit-mp-no-check`); "softmax-sigma no check" the same allocation with
per-channel weights; "raw-sigma" the unnormalised QKᵀ / output norms.
The uniform model of MPn's size is the row "ptqvit WnAn".

Status: {status}.

Before → after for issue 15 (before = the first version's code path, selected by the options above and run
here on the same images; the omse "before" is the figure the issue reports for its 64-image run before the
item-1 observer fix, not re-run):

{before_after(rows)}

{table(["config", "top-1 %", "agreement %", "KL", "calib s", "MP size MB (avg bits)", "run"],
        [r[:3] + [f"{r[3]:.4f}"] + r[4:] for r in rows])}

{chr(10).join(notes)}
"""
    return md


if __name__ == "__main__":
    raise SystemExit(main())

"""PTQ-ViT on the real DeiT-Tiny (matmul regime) against percentile and OMSE at the same bits: both weight
granularities (per output channel, the default, and the paper's per tensor), mixed precision against the uniform
model of the same size (the default relative sensitivity with its check, and the first version: post-softmax
sensitivity, no check), and the ablations.

Lean by design (2 shared CPU cores): the val images are decoded once and the float logits computed once; the
search runs with reduced candidates / rounds / cached tokens (stated in the section); rows run in priority order
and the section is rewritten after every row, so a run stopped by its time budget still leaves honest partial
results.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import vitq
from benchmarks.common import (
    DEIT_WEIGHTS,
    ROOT,
    Bench,
    Budget,
    command,
    environment,
    git_commit,
    load_kept_rows,
    save_kept_rows,
    table,
    write_section,
)

ROWS_FILE = ROOT / "benchmarks" / "ptqvit_rows.json"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-calib", type=int, default=64)
    ap.add_argument("--budget-min", type=float, default=45.0, help="start no new row after this many minutes")
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--mp-candidates", type=int, default=10)
    ap.add_argument("--only", default=None, help="comma-separated row labels to run (default: all)")
    ap.add_argument("--no-write", action="store_true", help="print the rows, leave BENCHMARKS.md alone")
    ap.add_argument("--fresh", action="store_true", help=f"forget the rows kept in {ROWS_FILE.name}")
    args = ap.parse_args()
    budget = Budget(args.budget_min)
    torch.manual_seed(0)
    torch.set_num_threads(2)

    bench = Bench()
    calib_x = bench.calib(args.num_calib)
    bench.val()
    val_x = bench.val_x
    print(f"data ready: calib {tuple(calib_x.shape)}, val {tuple(val_x.shape)} "
          f"({budget.elapsed:.0f}s)", flush=True)

    search = {"candidates": args.candidates, "rounds": args.rounds, "tokens": args.tokens, "rows": args.rows,
              "pairs": args.pairs, "mp_candidates": args.mp_candidates}
    # every non-default row keeps the signed symmetric input grid it was run with (the default before
    # --ptqvit-input-grid asymmetric became it)
    sym = dict(search, input_grid="symmetric")
    tensor = dict(sym, weight_granularity="tensor", softmax_signed=True)
    signed = dict(sym, softmax_signed=True)
    plan = [
        ("ptqvit W6A6", 6, "ptqvit", search),
        ("omse W6A6", 6, "omse", {}),
        ("ptqvit W6A6 per-tensor W", 6, "ptqvit", tensor),
        ("ptqvit MP6", 6, "ptqvit", dict(search, mixed_precision=6)),
        ("ptqvit MP6 first version", 6, "ptqvit",
         dict(tensor, mixed_precision=6, mp_sensitivity="softmax", mp_no_check=True)),
        ("ptqvit W4A4", 4, "ptqvit", search),
        ("ptqvit W4A4 per-tensor W", 4, "ptqvit", tensor),
        ("ptqvit W8A8", 8, "ptqvit", search),
        ("ptqvit W8A8 per-tensor W", 8, "ptqvit", tensor),
        ("ptqvit MP8", 8, "ptqvit", dict(search, mixed_precision=8)),
        ("omse W8A8", 8, "omse", {}),
        ("omse W4A4", 4, "omse", {}),
    ]
    for bits in (8, 6, 4):
        plan.append((f"percentile W{bits}A{bits}", bits, "percentile", {}))
    # the first per-channel search (each step also tries every channel's own factor by its output error), kept as
    # the option channel_search="own"; the ablations were run with it
    own = dict(sym, channel_search="own", softmax_signed=True)
    plan += [
        ("ptqvit W6A6 own-channel", 6, "ptqvit", own),
        ("ptqvit W4A4 own-channel", 4, "ptqvit", own),
        ("ptqvit W8A8 own-channel", 8, "ptqvit", own),
        ("ptqvit MP6 own-channel", 6, "ptqvit", dict(own, mixed_precision=6)),
        ("ptqvit MP8 own-channel", 8, "ptqvit", dict(own, mixed_precision=8)),
        ("ptqvit W6A6 own-channel no ranking", 6, "ptqvit", dict(own, no_ranking=True)),
        ("ptqvit W6A6 own-channel no bias corr", 6, "ptqvit", dict(own, no_bias_corr=True)),
        ("ptqvit MP6 own-channel softmax-sigma no check", 6, "ptqvit",
         dict(own, mixed_precision=6, mp_sensitivity="softmax", mp_no_check=True)),
        ("ptqvit MP6 own-channel raw-sigma", 6, "ptqvit", dict(own, mixed_precision=6, mp_sensitivity="raw")),
    ]
    plan += [  # per-channel weights, shared factor, the paper's signed softmax quantizer
        ("ptqvit W6A6 signed softmax", 6, "ptqvit", signed),
        ("ptqvit W4A4 signed softmax", 4, "ptqvit", signed),
        ("ptqvit W8A8 signed softmax", 8, "ptqvit", signed),
        ("ptqvit MP6 signed softmax", 6, "ptqvit", dict(signed, mixed_precision=6)),
        ("ptqvit MP8 signed softmax", 8, "ptqvit", dict(signed, mixed_precision=8)),
    ]
    plan += [  # the defaults before the asymmetric input grid (signed symmetric linear-layer inputs)
        ("ptqvit W6A6 symmetric inputs", 6, "ptqvit", sym),
        ("ptqvit W8A8 symmetric inputs", 8, "ptqvit", sym),
        ("ptqvit W4A4 symmetric inputs", 4, "ptqvit", sym),
        ("ptqvit MP6 symmetric inputs", 6, "ptqvit", dict(sym, mixed_precision=6)),
        ("ptqvit MP8 symmetric inputs", 8, "ptqvit", dict(sym, mixed_precision=8)),
    ]
    full_plan = list(plan)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        unknown = set(wanted) - {p[0] for p in plan}
        if unknown:
            raise SystemExit(f"--only: unknown rows {sorted(unknown)}")
        plan = [p for p in plan if p[0] in wanted]
    settings = {k: getattr(args, k) for k in ("num_calib", "candidates", "rounds", "tokens", "rows", "pairs",
                                              "mp_candidates")}
    kept = load_kept_rows(ROWS_FILE, settings, args.fresh)
    commit = git_commit()
    for label, bits, method, opts in plan:
        if budget.over(label):
            continue
        run = bench.row(vitq.Scheme("matmul", bits, bits), method, options=opts, batch_size=len(calib_x), chunk=50)
        r, info = run.result, run.info
        mp = info.get("mixed_precision")
        size = (f"{mp['model_size_mb']:.3f} ({mp['average_weight_bits']:.2f} b)" if mp else "")
        row = [label, r["quant"]["top1"], r["quant"]["agreement"], round(r["quant"]["kl"], 4),
               round(info["seconds"], 1), size, f"{commit} {time.strftime('%H:%M', time.gmtime())}"]
        note = ""
        if mp:
            chk = mp["check"]
            kl = (f"; composed KL on the calibration images: program's allocation {chk['kl_chosen']:.4f}, uniform "
                  f"{chk['kl_uniform']:.4f}" if "kl_chosen" in chk else "")
            note = (f"- {label}: sigma {mp['sensitivity']}; sum of Omega: program's allocation "
                    f"{chk['omega_chosen']:.4g}, uniform {chk.get('omega_uniform', float('nan')):.4g}{kl}; "
                    f"fallback to uniform: {'yes' if chk['fallback_to_uniform'] else 'no'}; program's bits "
                    f"{_short(mp['program_bits'])}; used {_short(mp['bits'])}")
            print(note, flush=True)
        print(row, f"elapsed {budget.elapsed:.0f}s", flush=True)
        if not args.no_write:
            kept["rows"][label] = {"row": row, "note": note, "float_top1": r["float"]["top1"]}
            save_kept_rows(ROWS_FILE, kept)
            write(args, kept, budget.skipped, full_plan, len(calib_x), len(val_x), done=False)
    if not args.no_write:
        write(args, kept, budget.skipped, full_plan, len(calib_x), len(val_x), done=True)
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


def write(args, kept, skipped, plan, n_calib, n_val, done: bool) -> None:
    rows = [kept["rows"][p[0]]["row"] for p in plan if p[0] in kept["rows"]]
    notes = [kept["rows"][p[0]]["note"] for p in plan if kept["rows"].get(p[0], {}).get("note")]
    float_top1 = next(iter(kept["rows"].values()))["float_top1"]
    missing = [p[0] for p in plan if p[0] not in kept["rows"]]
    status = ("complete" if not missing else f"not run: {', '.join(missing)}") if done and not skipped \
        else f"PARTIAL ({len(rows)} of {len(plan)} rows)"
    md = f"""## PTQ-ViT (`ptqvit`) on DeiT-Tiny, `matmul` regime

Command (rows are kept in `benchmarks/{ROWS_FILE.name}` across runs with the same settings, e.g. with `--only`; the
last column names the commit and UTC time of each row's run): `{command()}`

{environment()}

Model `deit_tiny_patch16_224` ({DEIT_WEIGHTS.name}); calibration: {n_calib} images of calib/ (seed 0, the same
images for every method); evaluation: all {n_val} images of val/. Float top-1 on val: {float_top1:.2f} %.
Agreement = top-1 agreement with the float model (%), KL = mean KL(float ‖ quant) in nats; time = calibration
seconds on this machine's 2 CPU cores (1-minute load average {os.getloadavg()[0]:.1f} when this was written).

Reductions (all for CPU time; the method's defaults are candidates 100, rounds 20, tokens 64, rows 32, pairs
256, mp-candidates 20, on all calibration images): {n_calib} calibration images, candidates {args.candidates},
at most {args.rounds} rounds, {args.tokens} cached token positions per image for linear layers, {args.rows}
query rows per image and head for the attention matmuls, {args.pairs} ranking pairs per row, Ω estimated with
{args.mp_candidates} candidates and 1 round. Calibration order: sequential (the default). percentile /
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
    write_section("ptqvit", md)


if __name__ == "__main__":
    raise SystemExit(main())

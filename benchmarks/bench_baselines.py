"""Baseline methods on the real DeiT-Tiny (issue 2): float and minmax / percentile / omse / fqvit under both schemes
at W8A8, W6A6, W4A8, W4A4, from a sweep. Calibrates on all of calib/ (250 images), evaluates on all of val/ (500).

The grid is ``benchmarks/grids/baselines.yaml``; ``vitq sweep`` runs it into a results store (a rerun runs only
the jobs the store lacks) and this script renders the section from the store, keeping the text after the table
(the hand-written readings) as it is. No loop of its own.

    vitq sweep benchmarks/grids/baselines.yaml --store benchmarks/results/baselines
    python -m benchmarks.bench_baselines [--store DIR] [--run [--only KEY=VALUE]] [--no-write]
"""

from __future__ import annotations

from benchmarks.common import ROOT, environment, table
from benchmarks.sweep_section import after_table, arguments, emit, latest, missing_line, provenance

GRID = ROOT / "benchmarks" / "grids" / "baselines.yaml"
STORE = ROOT / "benchmarks" / "results" / "baselines"
SECTION = "baselines"


def render(store) -> str:
    found, missing = latest(store, GRID)
    rows = list(found.values())
    float_row = next((r["record"]["float_row"] for r in rows if r["record"].get("float_row")), None)
    top5 = next((r["float_top5"] for r in rows if r["float_top5"] is not None), None)
    fl1 = rows[0]["float_top1"] if rows else float("nan")
    fl5 = top5 if top5 is not None else (float(float_row["top-5"]) if float_row else float("nan"))
    lines = [["float", "-", "-", fl1, fl5, 100.0, "0", "-", "-"]]
    for r in rows:
        c = r["config"]
        lines.append([c["method"], c["scheme"], f"W{c['w_bits']}A{c['a_bits']}", r["top1"], r["top5"], r["agreement"],
                      f"{r['kl']:.4f}", r["record"]["calibration"]["seconds"], r["eval_s"]])
    n_val = rows[0]["num_val"] if rows else "?"
    n_calib = "all 250" if rows and rows[0]["config"]["num_calib"] is None else rows[0]["config"]["num_calib"] \
        if rows else "?"
    md = ["## Baselines on the real DeiT-Tiny (issue 2)", "", missing_line(missing), "",
          provenance(rows, GRID, store) + "  ", f"Written: {environment()}  ",
          f"Calibration: {n_calib} images of `calib/` (batches of 50); evaluation: all {n_val} images"
          " of `val/`, labels by WordNet id. Agreement = top-1 agreement with the float model (%), KL = mean "
          "KL(float ‖ quant) of the softmax outputs (nats). Times in seconds on the machine of each row "
          "(calibration includes the observation pass; eval = one quantized forward over the val images).",
          "", table(["method", "scheme", "bits", "top-1", "top-5", "agreement", "KL", "calibrate s", "eval s"], lines)]
    kept = after_table(SECTION)
    return "\n".join(md) + ("\n\n" + kept if kept else "")


def main() -> None:
    args = arguments(GRID, STORE, __doc__)
    text = render(args.store)
    emit(args, (SECTION, text))


if __name__ == "__main__":
    main()

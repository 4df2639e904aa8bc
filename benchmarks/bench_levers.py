"""What each lever of the low-bit pipeline gives on its own (issue 26): the grid ``benchmarks/grids/recon_levers.yaml``
(DeiT-Tiny, matmul W4A4, repq + adaptive-log quantizers, every calibration image) run by ``vitq sweep`` into a
store; this script renders the ablation table of section "levers" from it (each job's base and every step of its
chain, mean ± std over the draws the store holds).

    vitq sweep benchmarks/grids/recon_levers.yaml --store benchmarks/results/recon_levers
    python -m benchmarks.bench_levers [--store DIR] [--run [--only KEY=VALUE]] [--no-write]
"""

from __future__ import annotations

from collections import defaultdict

from benchmarks.bench_recon import pipelines
from benchmarks.common import ROOT, environment, mean_std, table
from benchmarks.sweep_section import after_table, arguments, emit, latest, missing_line, provenance

SECTION = "levers"
GRID = ROOT / "benchmarks" / "grids" / "recon_levers.yaml"
STORE = ROOT / "benchmarks" / "results" / "recon_levers"
HEADERS = ["job (label)", "after", "n", "top-1", "drop", "agreement", "KL", "calib KL gain", "step s", "total s"]


def rows_of(found: dict) -> tuple[list[list], dict]:
    """Table rows (label, stage) with mean ± std over the draws, in the grid's order, and the float top-1."""
    by: dict = defaultdict(lambda: defaultdict(list))
    order, float_top1 = [], None
    for (label, _), row in found.items():
        if label not in order:
            order.append(label)
        float_top1 = row["float_top1"]
        for stage, rec in pipelines(row).items():
            by[label][stage or "base"].append(rec)
    out = []
    for label in order:
        for stage, recs in by[label].items():
            gain = [r["calib_kl"]["gain"] if isinstance(r["calib_kl"], dict) else r["calib_kl"]
                    for r in recs if r.get("calib_kl") is not None]
            out.append([label, stage, len(recs), mean_std(r["top1"] for r in recs),
                        f"{float_top1 - sum(r['top1'] for r in recs) / len(recs):.2f}",
                        mean_std(r["agreement"] for r in recs), mean_std((r["kl"] for r in recs), ".4f"),
                        mean_std(gain, ".4f") if gain else "-", mean_std((r["step_seconds"] for r in recs), ".0f"),
                        mean_std((r["seconds"] for r in recs), ".0f")])
    return out, {"float_top1": float_top1}


def main() -> None:
    args = arguments(GRID, STORE, __doc__)
    found, missing = latest(args.store, GRID)
    rows, info = rows_of(found)
    text = "\n\n".join(filter(None, [
        "## What each low-bit lever gives alone: DeiT-Tiny matmul W4A4 (issue 26)",
        provenance(list(found.values()), GRID, args.store),
        f"Written: {environment()}.",
        "Setting: `--scheme matmul --w-bits 4 --a-bits 4 --method repq --softmax-quantizer adalog "
        "--gelu-quantizer adalog` (RepQ-ViT's asymmetric per-channel weights), calibrated on all 250 `calib/` "
        "images (the seed draws only the order of recon's mini-batches and drops); recon 200 steps per piece on "
        "batches of 4, AdaRound lr 0.01, step-size lr 0.004 (the recipes' CPU setting); each lever is a recon "
        "option (`--recon-learn-log`, `--recon-learn-bias`, `--recon-normalize`, `--recon-head-loss kl`, "
        "`--recon-loss-weight fisher`, `--recon-start gptq` after `--weight-rounding gptq`), `ridge` is the "
        "closed-form refiner, `evolq discrete` is `--evolq-mode discrete` after recon. Evaluation: all "
        f"{next(iter(found.values()))['num_val']} images of `val/` (float top-1 "
        f"{info['float_top1']:.2f}); agreement = top-1 agreement with float (%), KL = mean KL(float ‖ quant) "
        "(nats), calib KL gain = the step's decrease of KL on the calibration images; step s / total s = wall "
        "seconds of the step / of the job so far on 2 CPU cores (a loaded machine: other jobs ran beside it)."
        if found else "No job of the grid has run yet.",
        table(HEADERS, rows) if rows else "",
        missing_line(missing),
        after_table(SECTION),
    ]))
    emit(args, (SECTION, text))
    if not args.no_write:
        print(f"section {SECTION} written ({len(rows)} rows)")


if __name__ == "__main__":
    main()

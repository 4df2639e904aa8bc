"""The low-bit CNN chains of issue 22 on the real EfficientNet-Lite0 (``python -m benchmarks.bench_cnn --lowbit
...``): cross-layer equalization (``--method cle``), empirical bias correction (``--refine biascorr``), GPTQ on
depthwise convolutions and block reconstruction (``recon``), alone and combined. Writes the ``cnn-lowbit``
section of BENCHMARKS.md."""

from __future__ import annotations

import time

import vitq
from benchmarks.bench_cnn import WEIGHTS
from benchmarks.common import Bench, Budget, head, mean_std, table, write_section
from vitq.errors import VitqError
from vitq.models.loading import sha256_file
from vitq.scheme import Override

SECTION = "cnn-lowbit"


def parse_chain(text: str) -> dict:
    """``METHOD[/BASE]:ROUNDING:REFINERS`` -> vitq.quantize keywords."""
    method, rounding, refine = (text.strip().split(":") + ["", ""])[:3]
    options = {}
    if "/" in method:
        method, base = method.split("/")
        options = {"base": base}
    return {"method": method, "options": options, "rounding": rounding or None, "refine": refine or None}


def label(kw: dict) -> str:
    parts = [kw["method"] + (f" ({kw['options']['base']})" if kw["options"] else "")]
    if kw["rounding"]:
        parts.append(kw["rounding"])
    if kw["refine"]:
        parts += kw["refine"].split(",")
    return " → ".join(parts)


def run_lowbit(args) -> None:
    w, a = map(int, args.lowbit_bits.split("/"))
    seeds = [int(v) for v in args.lowbit_seeds.split(",") if v]
    bench = Bench("tf_efficientnet_lite0", WEIGHTS)
    bench.val(num_workers=2)
    calibs = {sd: bench.calib(args.num_calib, seed=sd, num_workers=2) for sd in seeds}
    recon = {"iters": args.recon_iters, "batch": args.recon_batch, "lr": 1e-2, "scale_lr": 4e-3}
    overrides = tuple(Override.parse(o) for o in args.lowbit_overrides.split(",") if o)
    scheme = vitq.Scheme("matmul", w, a, overrides=overrides)
    fl = bench.float_result
    rows = [["float", "-", f"{fl['top1']:.2f}", "100.00", "0", "-"]]
    state = {"rows": rows, "sha": sha256_file(WEIGHTS), "desc": bench.desc, "n": len(calibs[seeds[0]]),
             "val": len(bench.val_x), "overrides": [str(o) for o in overrides]}
    budget = Budget(10_000, args.stop_at)
    state["skipped"] = budget.skipped
    for chain in args.lowbit.split(";"):
        kw = parse_chain(chain)
        if budget.over(label(kw)):
            continue
        runs = []
        for sd in seeds:
            ro = {"recon": dict(recon)} if kw["refine"] and "recon" in kw["refine"] else {}
            t0 = time.perf_counter()
            try:
                row = bench.row(scheme, kw["method"], calib=calibs[sd], options=kw["options"],
                                rounding=kw["rounding"], refine=kw["refine"], refine_options=ro, seed=sd,
                                batch_size=50)
            except VitqError as e:  # reported in the table, the other chains still run
                print(chain, sd, "failed:", e, flush=True)
                rows.append([label(kw), f"seed {sd}", f"failed: {e}", "-", "-", "-"])
                continue
            runs.append({**row.quant, "seconds": time.perf_counter() - t0 - row.eval_seconds})
            print(chain, sd, runs[-1], flush=True)
        if not runs:
            continue
        rows.append([label(kw), f"{len(runs)} seed{'s' if len(runs) > 1 else ''}",
                     mean_std([r["top1"] for r in runs]), mean_std([r["agreement"] for r in runs]),
                     mean_std([r["kl"] for r in runs], ".4f"), mean_std([r["seconds"] for r in runs], ".0f")])
        if not args.no_write:
            write_section(SECTION, report(state, args, w, a, partial=True))
    text = report(state, args, w, a, partial=False)
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


def report(state: dict, args, w: int, a: int, partial: bool) -> str:
    md = [
        *head(f"A CNN at W{w}A{a}: EfficientNet-Lite0 with equalization, bias correction, GPTQ, recon (issue 22)",
              partial),
        f"Model and data as in the section above (`tf_efficientnet_lite0`, sha256 {state['sha'][:12]}…, BatchNorm "
        f"folded, weights per output channel int{w} symmetric, every conv/linear input per tensor uint{a}, `matmul` "
        f"regime, ReLU6 and pooling in float). Calibration: {state['n']} images of `calib/` drawn with the row's seed "
        f"(seed 0 first); evaluation: all {state['val']} images of `val/`; agreement = top-1 agreement with float "
        "(%), KL = mean KL(float ‖ quant). Nothing is selected on `val/`. `cle`: cross-layer equalization "
        "(`--method cle`, then its base method, minmax unless named); `gptq`: `--weight-rounding gptq` (depthwise "
        "convolutions one 9×9 / 25×25 Hessian per channel); `recon`: block reconstruction with "
        f"{args.recon_iters} steps per piece, batch {args.recon_batch}, lr 1e-2, step-size lr 4e-3 (the documented "
        "CPU setting scaled), stem + 16 blocks + head; `biascorr`: empirical bias correction, last. Seconds: "
        "the whole quantize call (calibration, rounding, refiners) on this shared 2-core machine under load from "
        "other jobs (timings are indicative only)."
        + (f" Overrides (every row): {', '.join(state['overrides'])}." if state["overrides"] else ""),
        "",
        table(["chain", "runs", "top-1", "agreement", "KL", "quantize s"], state["rows"]),
    ]
    if state["skipped"]:
        md += ["", f"Not run (the run's time budget, `--stop-at {args.stop_at}`, was spent): "
               + ", ".join(state["skipped"]) + "."]
    return "\n".join(md)

"""Block reconstruction on the real DeiT-Tiny (issue 11): base method alone, + recon, + recon + evolq, for each
configuration; calibrate/reconstruct/search on calib/, evaluate on all of val/. The defaults are the reduced CPU
setting of the recipes (vitq.recipes.RECON_CPU); the written section states every reduction.

    python -m benchmarks.bench_recon [--configs matmul:4/4:ptq4vit,fq:4/8:fqvit] [--num-calib N]
        [--recon-iters N] [--recon-batch N] [--evolq-passes P] [--seeds S] [--threads N] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import vitq
from benchmarks.common import (
    CALIB_DIR,
    DEIT_WEIGHTS,
    ROOT,
    VAL_DIR,
    batched_logits,
    command,
    environment,
    load_images,
    table,
    write_section,
)
from vitq.calib import CalibData
from vitq.data import model_transform
from vitq.evaluate import Metrics
from vitq.models import create_model
from vitq.recipes import RECON_CPU

FIGURES = ROOT / "benchmarks" / "figures"
RECIPE_OF = {"": "{scheme}-{method}", "recon": "{scheme}-{method}-recon",
             "recon,evolq": "{scheme}-{method}-recon-evolq"}


def metrics(float_logits, q_logits, labels) -> dict:
    m = Metrics()
    m.update(float_logits, q_logits, labels)
    return m.result()["quant"]


def mean_std(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="matmul:4/4:ptq4vit,fq:4/8:fqvit")
    p.add_argument("--num-calib", type=int, default=RECON_CPU["num_calib"])
    p.add_argument("--batch-size", type=int, default=50, help="calibration / evolq batch (the CLI default)")
    p.add_argument("--recon-iters", type=int, default=RECON_CPU["recon_iters"])
    p.add_argument("--recon-batch", type=int, default=RECON_CPU["recon_batch"])
    p.add_argument("--recon-lr", type=float, default=RECON_CPU["recon_lr"])
    p.add_argument("--recon-scale-lr", type=float, default=RECON_CPU["recon_scale_lr"])
    p.add_argument("--evolq-passes", type=int, default=1)
    p.add_argument("--seeds", type=int, default=1, help="calibration draws (seeds 0..S-1)")
    p.add_argument("--num-val", type=int, default=None, help="val images (default all 500; fewer for a smoke run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print only: leave BENCHMARKS.md and figures/ alone")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    model = create_model("deit_tiny_patch16_224", weights=DEIT_WEIGHTS)
    transform, _ = model_transform(model)
    val_x, val_y = load_images(VAL_DIR, args.num_val, transform)
    float_logits = batched_logits(model, val_x)
    float_top1 = metrics(float_logits, float_logits, val_y)["top1"]
    recon_opts = {"iters": args.recon_iters, "batch": args.recon_batch, "lr": args.recon_lr,
                  "scale_lr": args.recon_scale_lr}
    evolq_opts = {"passes": args.evolq_passes}

    runs: dict[str, dict[str, list[dict]]] = {}  # config -> pipeline -> one record per seed
    for seed in range(args.seeds):
        calib_x, _ = load_images(CALIB_DIR, args.num_calib, transform, seed=seed)
        for spec in args.configs.split(","):
            scheme, bits, method_spec = spec.split(":")
            w, a = map(int, bits.split("/"))
            key = f"{scheme}:{w}:{a}:{method_spec}"
            method, *extras = method_spec.split("+")  # e.g. repq+adalog+gptq
            unknown = set(extras) - {"adalog", "gptq"}
            if unknown:
                raise SystemExit(f"--configs {spec}: unknown suffix {sorted(unknown)} (expected +adalog, +gptq)")
            kinds = {"softmax_quantizer": "adalog", "gelu_quantizer": "adalog"} if "adalog" in extras else {}
            calib = CalibData(calib_x, batch_size=args.batch_size, progress=False, seed=seed)
            q = vitq.prepare(model, vitq.Scheme(scheme, w, a, **kinds), method=method)
            t0 = time.perf_counter()
            vitq.calibrate(q, calib, method, seed=seed)
            if "gptq" in extras:
                vitq.round_weights(q, calib, how="gptq", seed=seed, progress=False)
            cost = time.perf_counter() - t0
            record = {"seconds": cost, "step_seconds": cost}
            chain = []
            for name, opts in ((None, None), ("recon", recon_opts), ("evolq", evolq_opts)):
                if name is not None:
                    info = vitq.refine(q, model, calib, name, batch_size=args.batch_size, seed=seed, progress=False,
                                       **opts)
                    chain.append(name)
                    cost += info["seconds"]
                    record = {"seconds": cost, "step_seconds": info["seconds"], "calib_kl": info["calib_kl"],
                              "info": info}
                t0 = time.perf_counter()
                r = metrics(float_logits, batched_logits(q, val_x), val_y)
                record.update({"seed": seed, "num_calib": len(calib_x), "eval_seconds": time.perf_counter() - t0,
                               **r})
                pipeline = ",".join(chain)
                runs.setdefault(key, {}).setdefault(pipeline, []).append(record)
                print(f"seed {seed} {key} {pipeline or 'base'}: top-1 {r['top1']:.2f} agreement "
                      f"{r['agreement']:.2f} KL {r['kl']:.4f} step {record['step_seconds']:.0f} s", flush=True)

            if not args.no_write:  # after every configuration, so a cut-off run leaves what it measured
                report(args, runs, float_top1, len(val_x), t_start, partial=True)
    report(args, runs, float_top1, len(val_x), t_start, partial=False)


def report(args, runs: dict, float_top1: float, num_val: int, t_start: float, partial: bool) -> None:
    rows, measured = [], {}
    for key, pipes in runs.items():
        scheme, w, a, method = key.split(":")
        for pipeline, recs in pipes.items():
            recipe = RECIPE_OF[pipeline].format(scheme=scheme, method=method.replace("+", "-"))
            step = [r["step_seconds"] for r in recs]
            kl_cal = [r["calib_kl"]["before"] - r["calib_kl"]["after"] for r in recs if "calib_kl" in r]
            kept = sum(len(r["info"]["pieces_kept_start"]) for r in recs if pipeline.endswith("recon"))
            steps = method.replace("+", " + ") + (" + " + pipeline.replace(",", " + ") if pipeline else "")
            rows.append([f"{scheme} W{w}A{a}", steps,
                         mean_std([r["top1"] for r in recs]), mean_std([float_top1 - r["top1"] for r in recs]),
                         mean_std([r["agreement"] for r in recs]), mean_std([r["kl"] for r in recs], 4),
                         mean_std(kl_cal, 4) if kl_cal else "-", mean_std(step, 0),
                         mean_std([r["seconds"] for r in recs], 0),
                         kept if pipeline.endswith("recon") else "-"])
            measured[(recipe, int(w), int(a))] = {
                "agreement": round(statistics.mean(r["agreement"] for r in recs), 2),
                "top1": round(statistics.mean(r["top1"] for r in recs), 2),
                "kl": round(statistics.mean(r["kl"] for r in recs), 4),
                "seconds": round(statistics.mean(r["seconds"] for r in recs), 1)}

    total_min = (time.perf_counter() - t_start) / 60
    recipes_literal = "\n".join(f"    {k!r}: {{**{v!r}, \"where\": WHERE}}," for k, v in measured.items())
    md = [
        "## Block reconstruction (recon), chains and recipes on the real DeiT-Tiny (issue 11)",
        "",
        *(["**Partial: the run was cut off after the configurations shown.**", ""] if partial else []),
        f"Command: `{command()}`  ",
        f"{environment()}  ",
        f"Whole script: {total_min:.1f} min.",
        "",
        f"**Reduced for CPU time:** {args.num_calib} of the 250 `calib/` images (BRECQ/QDrop: 1,024), used for the "
        f"base calibration, the reconstruction and the Evol-Q search alike; recon **{args.recon_iters} steps per "
        f"piece** (BRECQ/QDrop: 20,000) on mini-batches of {args.recon_batch} images (BRECQ: 32), AdaRound "
        f"learning rate {args.recon_lr:g} (BRECQ 1e-3, raised because of the few steps), step-size learning "
        f"rate {args.recon_scale_lr:g} relative to each step size (BRECQ: 4e-5 absolute, about 1e-3 relative); "
        f"regulariser weight 0.01, warm-up 20 %, β 20 → 2, QDrop probability 0.5 as the defaults. Evol-Q "
        f"faithful with **{args.evolq_passes} pass(es)** (default 10), batches of {args.batch_size}. "
        f"**{args.seeds} calibration draw(s)** (seed 0{'..' + str(args.seeds - 1) if args.seeds > 1 else ''}"
        f"{'' if args.seeds > 1 else '; one seed only, so no ± std'}). {args.threads} torch threads.",
        "",
        f"Evaluation: all {num_val} images of `val/` (float top-1 {float_top1:.2f}). Drop = float top-1 − "
        "quant top-1; agreement = top-1 agreement with float (%); KL = mean KL(float ‖ quant) in nats; calib "
        "KL gain = the step's decrease of KL(float ‖ quant) on the calibration images; step s = wall time of "
        "that step (calibration, reconstruction or search); total s = calibration plus every step so far; kept "
        "= pieces (of 14: stem, 12 blocks, head) where the learned state was worse on the calibration images "
        "and the start was kept. Selection never used the val labels.",
        "",
        table(["config", "pipeline", "top-1", "drop", "agreement", "KL", "calib KL gain", "step s", "total s",
               "kept"], rows),
        "",
        "Per-piece traces (MSE before → after, seconds): `benchmarks/figures/recon_runs.json`. The recipe table "
        "(`vitq recipes`) takes its numbers from this run.",
    ]
    text = "\n".join(md)
    print(text)
    print("MEASURED entries for vitq.recipes:\n" + recipes_literal)
    if not args.no_write:
        FIGURES.mkdir(parents=True, exist_ok=True)
        with open(FIGURES / "recon_runs.json", "w") as f:
            json.dump({"args": vars(args), "float_top1": float_top1, "runs": runs}, f, indent=1, default=str)
        plot(runs)
        write_section("recon", text)
    print(f"{'partial' if partial else 'done'} after {total_min:.1f} min", flush=True)




def plot(runs: dict) -> None:
    """Agreement against weight bits per pipeline, one line per regime and pipeline (>= 2 bit widths only)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for key, pipes in runs.items():
        scheme, w, a, method = key.split(":")
        for pipeline, recs in pipes.items():
            label = f"{scheme} A{a} {method}{' + ' + pipeline.replace(',', ' + ') if pipeline else ''}"
            series.setdefault(label, []).append((int(w), statistics.mean(r["agreement"] for r in recs)))
    if max(len(v) for v in series.values()) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("weight bits")
    ax.set_ylabel("top-1 agreement with float (%)")
    ax.set_title("DeiT-Tiny, 500 val images")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(FIGURES / "recon_agreement.png", dpi=120)


if __name__ == "__main__":
    main()

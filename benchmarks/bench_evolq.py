"""Evol-Q on the real DeiT-Tiny (issue 3): base method vs + evolq faithful vs + evolq improved, for fq W4A8,
fq W3A8 (base fqvit) and matmul W4A4 (base omse); calibrate and search on calib/, evaluate on all of val/.
Also the landscape figure of one block. The defaults are reduced to fit this shared 2-core machine (see
the written section); pass larger values where there is time.

    python -m benchmarks.bench_evolq [--num-calib N] [--batch-size N] [--passes P] [--improved-children N]
        [--configs fq:4/8:fqvit,fq:3/8:fqvit,matmul:4/4:omse] [--threads N] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import json
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
from vitq.landscape import compute_landscape, plot_landscape
from vitq.models import create_model

FIGURES = ROOT / "benchmarks" / "figures"


def metrics(float_logits, q_logits, labels) -> dict:
    m = Metrics()
    m.update(float_logits, q_logits, labels)
    return m.result()["quant"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-calib", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--improved-children", type=int, default=2)
    p.add_argument("--configs", default="fq:4/8:fqvit,fq:3/8:fqvit,matmul:4/4:omse")
    p.add_argument("--landscape-block", default="11")
    p.add_argument("--landscape-steps", type=int, default=21)
    p.add_argument("--landscape-radius", type=float, default=0.05)
    p.add_argument("--num-val", type=int, default=None, help="val images (default all 500; fewer for a smoke run)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true", help="print only: leave BENCHMARKS.md and figures/ alone")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    model = create_model("deit_tiny_patch16_224", weights=DEIT_WEIGHTS)
    transform, _ = model_transform(model)
    calib_x, _ = load_images(CALIB_DIR, args.num_calib, transform)
    val_x, val_y = load_images(VAL_DIR, args.num_val, transform)
    print(f"calib {len(calib_x)} images, val {len(val_x)} images", flush=True)
    float_logits = batched_logits(model, val_x)
    float_top1 = metrics(float_logits, float_logits, val_y)["top1"]

    rows, details, landscape = [], {}, None
    for spec in args.configs.split(","):
        scheme, bits, method = spec.split(":")
        w, a = map(int, bits.split("/"))
        tag = f"{scheme} W{w}A{a}"
        base = vitq.prepare(model, vitq.Scheme(scheme, w, a), method=method)
        calib = CalibData(calib_x, batch_size=args.batch_size, progress=False)
        t0 = time.perf_counter()
        vitq.calibrate(base, calib, method)
        cal_s = time.perf_counter() - t0
        r = metrics(float_logits, batched_logits(base, val_x), val_y)
        rows.append([tag, method, r["top1"], r["agreement"], r["kl"], "-", "-", "-", "-", "-"])
        print(rows[-1], flush=True)
        if landscape is None:  # the landscape of one block of the first base model
            landscape = compute_landscape(base, model, calib, block=args.landscape_block, dims=1,
                                          steps=args.landscape_steps, radius=args.landscape_radius)
            landscape["state"] = f"{tag} {method}"
            print("landscape", landscape["block"], f"{landscape['seconds']:.0f} s", flush=True)
        for mode in ("faithful", "improved"):
            opts = {"mode": mode, "passes": args.passes}
            if mode == "improved":
                opts["children"] = args.improved_children
            q = copy.deepcopy(base)
            info = vitq.refine(q, model, calib, "evolq", batch_size=args.batch_size, progress=False, **opts)
            r = metrics(float_logits, batched_logits(q, val_x), val_y)
            t = info["fitness_eval_seconds"]
            rows.append([tag, f"{method} + evolq {mode}", r["top1"], r["agreement"], r["kl"],
                         f"{info['fitness']['initial']:.4f} → {info['fitness']['final']:.4f}", info["evaluations"],
                         info["search_seconds"], f"{t['full_forward']:.2f} / {t['block_cached_mean']:.2f}",
                         t["speedup_vs_full_forward"]])
            details[f"{tag} {mode}"] = info
            print(rows[-1], flush=True)
        details[f"{tag} calibrate_seconds"] = cal_s

    if not args.no_write:  # the figure and traces belong to the BENCHMARKS.md section: written with it
        FIGURES.mkdir(parents=True, exist_ok=True)
        plot_landscape(landscape, str(FIGURES / "evolq_landscape.png"))
        with open(FIGURES / "evolq_landscape.json", "w") as f:
            json.dump(landscape, f, indent=1)
        with open(FIGURES / "evolq_runs.json", "w") as f:
            json.dump(details, f, indent=1, default=str)

    lo, hi = min(landscape["infonce"]), max(landscape["infonce"])
    ag = landscape["agreement"]
    total_min = (time.perf_counter() - t_start) / 60
    md = [
        "## Evol-Q / CPT-V on the real DeiT-Tiny (issue 3)",
        "",
        f"Command: `{command()}`  ",
        f"{environment()}  ",
        f"Whole script: {total_min:.1f} min.",
        "",
        "**Reduced for CPU time:** "
        f"search on {len(calib_x)} of the 250 `calib/` images (paper: 1,000) in batches of {args.batch_size} "
        f"(paper: 100; infoNCE negatives = the other images of a batch), **{args.passes} pass(es)** over the 12 "
        f"blocks (paper and faithful default: 10), {args.threads} torch thread(s); the improved mode runs "
        f"{args.improved_children} children per generation (its default is 4). The base models are calibrated "
        f"on the same {len(calib_x)} images. Everything else is the faithful setting (population 15, tournament "
        "10, K = 3 cycles, absolute mutation 1e-3 for 3/4-bit weights) and the improved defaults (relative "
        "mutation 2 % of each scale, qkv/proj + fc1/fc2 weight scales + the block's uniform activation scales, "
        "early stop patience 2)." + (" With so few passes these numbers say little about what a full search "
                                     "achieves; they show the machinery and its cost." if args.passes < 10 else ""),
        "",
        f"Evaluation: all {len(val_x)} images of `val/` (float top-1 {float_top1:.2f}). Agreement = top-1 "
        "agreement with float (%), KL = mean KL(float ‖ quant) in nats. Fitness = infoNCE (T = 3) on the "
        "calibration images before → after the search. Evals = fitness evaluations. Eval time = one fitness "
        "evaluation over the calibration images: whole-model forward / mean with the block cache (the search's "
        "own timings in this run), and their ratio. Selection never used the val labels.",
        "",
        table(["scheme", "method", "top-1", "agreement", "KL", "fitness", "evals", "search s",
               "eval s full / cached", "speedup"], rows),
        "",
        f"Landscape ({landscape['state']}, {landscape['block']}, qkv+proj weight scales, "
        f"{landscape['num_calib']} calibration images): scales moved along one random direction, "
        f"relative RMS change from -{100 * landscape['radius']:.0f} % to +{100 * landscape['radius']:.0f} % in "
        f"{landscape['steps']} steps. infoNCE ranges {lo:.4f} .. {hi:.4f} (centre "
        f"{landscape['center']['infonce']:.4f}); agreement {min(ag):.1f} .. {max(ag):.1f} %. Numbers: "
        "`benchmarks/figures/evolq_landscape.json`; per-run traces: `benchmarks/figures/evolq_runs.json`.",
        "",
        "![Evol-Q loss landscape](benchmarks/figures/evolq_landscape.png)",
    ]
    text = "\n".join(md)
    print(text)
    if not args.no_write:
        write_section("evolq", text)
    print(f"done in {total_min:.1f} min", flush=True)


if __name__ == "__main__":
    main()

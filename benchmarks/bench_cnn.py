"""A CNN with vitq (issue 13): the real EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``, BatchNorm folded,
depthwise and TF-'SAME' convolutions) under minmax / omse at W8A8, W6A6, W4A8, W4A4 (weights per output
channel, activations per tensor), and Evol-Q on top of omse (reduced: one pass, 64 fitness images, 3 seeds).
Evaluation on all of val/ (500 images).

    python -m benchmarks.bench_cnn [--num-calib N] [--settings matmul:8/8,fq:8/8,...] [--methods minmax,omse]
                                   [--evolq-bits 4/8,4/4] [--evolq-scheme matmul] [--seeds 0,1,2]

The low-bit chains of issue 22 (cross-layer equalization, bias correction, GPTQ on depthwise convolutions,
block reconstruction) write their own section (``cnn-lowbit``, right after this one):

    python -m benchmarks.bench_cnn --lowbit "minmax;cle;cle::biascorr;cle:gptq:recon,biascorr" [--lowbit-bits 4/8]
                                   [--num-calib 128] [--recon-iters 200] [--lowbit-seeds 0]

A chain is ``METHOD[/BASE]:ROUNDING:REFINERS`` (``cle/omse``: equalization, then omse; rounding ``gptq`` or
empty; refiners comma-separated). Each chain runs once per seed, the seed drawing the calibration images.
"""

from __future__ import annotations

import argparse
import time

import torch

import vitq
from benchmarks.common import SHARED, Bench, head, mean_std, table, write_section
from vitq.calib import CalibData
from vitq.models.loading import sha256_file

WEIGHTS = SHARED / "models" / "tf_efficientnet_lite0.safetensors"
SECTION = "cnn"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-calib", type=int, default=None, help="calibration images (default all 250)")
    p.add_argument("--settings", default="matmul:8/8,matmul:6/6,matmul:4/8,matmul:4/4,fq:8/8,fq:4/4",
                   help="scheme:W/A pairs")
    p.add_argument("--methods", default="minmax,omse")
    p.add_argument("--evolq-bits", default="4/8,4/4")
    p.add_argument("--evolq-scheme", default="matmul")
    p.add_argument("--evolq-images", type=int, default=64)
    p.add_argument("--evolq-passes", type=int, default=1)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--lowbit", default=None, help="chains METHOD[/BASE]:ROUNDING:REFINERS separated by ';' "
                   "(writes the cnn-lowbit section only)")
    p.add_argument("--lowbit-bits", default="4/8")
    p.add_argument("--lowbit-seeds", default="0")
    p.add_argument("--recon-iters", type=int, default=200)
    p.add_argument("--recon-batch", type=int, default=8)
    p.add_argument("--stop-at", default=None, help="UTC HH:MM after which no further low-bit chain starts")
    p.add_argument("--lowbit-overrides", default="", help="scheme overrides for every chain, e.g. "
                   "'conv_stem:w8,classifier:w8' (the first/last-layer convention of the CNN PTQ papers)")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.lowbit:
        from benchmarks.bench_cnn_lowbit import run_lowbit

        run_lowbit(args)
        return

    bench = Bench("tf_efficientnet_lite0", WEIGHTS)
    model = bench.model
    calib_x = bench.calib(args.num_calib, num_workers=2)
    bench.val(num_workers=2)
    print(f"calib {len(calib_x)} images, val {len(bench.val_x)} images", flush=True)
    fl = bench.float_result
    state = {"rows": [["float", "-", "-", "-", fl["top1"], 100.0, "0", "-", "-", f"{bench.float_seconds:.1f}"]],
             "evolq": [], "desc": bench.desc, "calib": len(calib_x), "val": len(bench.val_x),
             "sha": sha256_file(WEIGHTS)}

    def write(partial: bool) -> None:
        if not args.no_write:
            write_section(SECTION, report(state, args, partial))

    bases = {}
    for setting in args.settings.split(","):
        scheme, bits = setting.split(":")
        w, a = map(int, bits.split("/"))
        for method in args.methods.split(","):
            run = bench.row(vitq.Scheme(scheme, w, a), method, batch_size=50)
            r = run.quant
            state["rows"].append([method, "-", scheme, f"W{w}A{a}", r["top1"], r["agreement"], f"{r['kl']:.4f}",
                                  f"{run.info['seconds']:.1f}", "-", f"{run.eval_seconds:.1f}"])
            print(state["rows"][-1], flush=True)
            bases[(scheme, w, a, method)] = run.qmodel
            write(partial=True)

    seeds = [int(s) for s in args.seeds.split(",") if s]
    for bits in [b for b in args.evolq_bits.split(",") if b]:
        w, a = map(int, bits.split("/"))
        base = bases.get((args.evolq_scheme, w, a, "omse"))
        if base is None:
            continue
        runs = []
        for seed in seeds:
            qmodel = vitq.prepare(model, vitq.Scheme(args.evolq_scheme, w, a))
            qmodel.load_state_dict(base.state_dict())
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(len(calib_x), generator=g)[:args.evolq_images]
            fit = CalibData(calib_x[idx], batch_size=args.evolq_images, progress=False, seed=seed)
            t0 = time.perf_counter()
            info = vitq.refine(qmodel, model, fit, "evolq", batch_size=args.evolq_images, seed=seed, progress=False,
                               mode="faithful", passes=args.evolq_passes)
            ref_s = time.perf_counter() - t0
            r = bench.score(qmodel)[0]["quant"]
            runs.append({"seed": seed, **r, "refine_s": ref_s, "fitness": info["fitness"],
                         "config": info["config"], "scales": sum(info["search_space"]["scales_per_block"].values())})
            print(bits, seed, r, f"{ref_s:.1f}s", info["fitness"]["initial"], info["fitness"]["final"], flush=True)
        state["evolq"].append((w, a, runs))
        write(partial=True)
    text = report(state, args, partial=False)
    print(text)
    write(partial=False)


def report(state: dict, args, partial: bool) -> str:
    rows = list(state["rows"])
    for w, a, runs in state["evolq"]:
        rows.append(["omse → evolq", f"{len(runs)} seeds", args.evolq_scheme, f"W{w}A{a}",
                     mean_std([r["top1"] for r in runs]), mean_std([r["agreement"] for r in runs]),
                     mean_std([r["kl"] for r in runs], ".4f"), "-",
                     mean_std([r["refine_s"] for r in runs], ".0f"), "-"])
    evolq_cfg = state["evolq"][0][2][0]["config"] if state["evolq"] else None
    md = [
        *head("A CNN: EfficientNet-Lite0 (issue 13)", partial),
        f"Model: timm `tf_efficientnet_lite0`, weights `../shared/models/tf_efficientnet_lite0.safetensors` (sha256 "
        f"{state['sha'][:12]}…), its timm eval transform ({state['desc']['interpolation']}, crop_pct "
        f"{state['desc']['crop_pct']}, mean = std = 0.5). Every BatchNorm folded into its convolution; weights per "
        "output channel (matmul: int symmetric, fq: uint asymmetric), every conv/linear input per tensor; fq also "
        "quantizes each block's output (the residual stream). ReLU6 and pooling in float. Calibration: "
        f"{state['calib']} images of `calib/` (batches of 50); evaluation: all {state['val']} images of `val/`. "
        "Agreement = top-1 agreement with float (%), KL = mean KL(float ‖ quant) in nats. Times in seconds on "
        "this machine: calibration, Evol-Q search, one quantized forward over `val/` (last column; float row = "
        "float forward).",
        "",
        table(["method", "runs", "scheme", "bits", "top-1", "agreement", "KL", "calibrate s", "refine s", "eval s"],
              rows),
    ]
    if evolq_cfg is not None:
        md += ["", "Evol-Q (reduced, to fit the CPU budget): on top of the omse row of the same setting, "
               f"{args.evolq_passes} pass over the 16 blocks, {args.evolq_images} fitness images (a seeded draw from "
               "`calib/` per seed, one batch, infoNCE), the release's faithful settings otherwise (population 15, "
               f"3 cycles per block, absolute radius {evolq_cfg.get('radius')}); the search vector of a block is "
               "the per-channel weight scales of all its convolutions. mean ± std over seeds "
               f"{args.seeds}. Fitness (initial → final, per seed): "
               + "; ".join(f"W{w}A{a}: " + ", ".join(f"{r['fitness']['initial']:.3f} → {r['fitness']['final']:.3f}"
                                                     for r in runs) for w, a, runs in state["evolq"]) + "."]
    md += ["", PUBLISHED]
    return "\n".join(md)


PUBLISHED = """Published figures for CNNs (other models, other data: the full ImageNet validation set, not these 500
images; for orientation only, not comparable row by row):

- BRECQ (Li et al., ICLR 2021), from its repository's README (`yhhhli/BRECQ`): ResNet-18, W2A4 with channel-wise
  weights, 65.21 % top-1 after block reconstruction (weight-only W2: 66.33 %); MobileNetV2 weight-only W2: 59.49 %.
- The Evol-Q paper (Frumkin et al., ICCV 2023) reports CNN results (ResNet, RegNet, against BRECQ) in a table whose
  figures we could not retrieve with the search tool available here (only the abstract was reachable), so none are
  quoted."""


if __name__ == "__main__":
    main()

"""A CNN with vitq (issue 13): the real EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``, BatchNorm folded,
depthwise and TF-'SAME' convolutions) under minmax / omse at W8A8, W6A6, W4A8, W4A4 (weights per output
channel, activations per tensor), and Evol-Q on top of omse (reduced: one pass, 64 fitness images, 3 seeds).
Evaluation on all of val/ (500 images).

    python -m benchmarks.bench_cnn [--num-calib N] [--settings matmul:8/8,fq:8/8,...] [--methods minmax,omse]
                                   [--evolq-bits 4/8,4/4] [--evolq-scheme matmul] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vitq
from benchmarks.common import CALIB_DIR, SHARED, VAL_DIR, batched_logits, command, environment, load_images, table
from benchmarks.common import write_section as _write_section
from vitq.calib import CalibData
from vitq.data import model_transform
from vitq.evaluate import Metrics
from vitq.models.loading import create_model, sha256_file

WEIGHTS = SHARED / "models" / "tf_efficientnet_lite0.safetensors"
SECTION = "cnn"


def metrics(float_logits, q_logits, labels) -> dict:
    m = Metrics()
    m.update(float_logits, q_logits, labels)
    return m.result()["quant"]


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
    args = p.parse_args()
    torch.manual_seed(0)

    model = create_model("tf_efficientnet_lite0", weights=WEIGHTS)
    transform, desc = model_transform(model)
    calib_x, _ = load_images(CALIB_DIR, args.num_calib, transform, num_workers=2)
    val_x, val_y = load_images(VAL_DIR, None, transform, num_workers=2)
    print(f"calib {len(calib_x)} images, val {len(val_x)} images", flush=True)
    t0 = time.perf_counter()
    float_logits = batched_logits(model, val_x)
    float_s = time.perf_counter() - t0
    ref = Metrics()
    ref.update(float_logits, float_logits, val_y)
    fl = ref.result()["float"]
    state = {"rows": [["float", "-", "-", "-", fl["top1"], 100.0, "0", "-", "-", f"{float_s:.1f}"]],
             "evolq": [], "desc": desc, "calib": len(calib_x), "val": len(val_x), "sha": sha256_file(WEIGHTS)}

    def write(partial: bool) -> None:
        if not args.no_write:
            _write_section(SECTION, report(state, args, partial))

    bases = {}
    for setting in args.settings.split(","):
        scheme, bits = setting.split(":")
        w, a = map(int, bits.split("/"))
        for method in args.methods.split(","):
            qmodel = vitq.prepare(model, vitq.Scheme(scheme, w, a), method=method)
            t0 = time.perf_counter()
            vitq.calibrate(qmodel, CalibData(calib_x, batch_size=50, progress=False), method)
            cal_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            q_logits = batched_logits(qmodel, val_x)
            eval_s = time.perf_counter() - t0
            r = metrics(float_logits, q_logits, val_y)
            state["rows"].append([method, "-", scheme, f"W{w}A{a}", r["top1"], r["agreement"], f"{r['kl']:.4f}",
                                  f"{cal_s:.1f}", "-", f"{eval_s:.1f}"])
            print(state["rows"][-1], flush=True)
            bases[(scheme, w, a, method)] = qmodel
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
            r = metrics(float_logits, batched_logits(qmodel, val_x), val_y)
            runs.append({"seed": seed, **r, "refine_s": ref_s, "fitness": info["fitness"],
                         "config": info["config"], "scales": sum(info["search_space"]["scales_per_block"].values())})
            print(bits, seed, r, f"{ref_s:.1f}s", info["fitness"]["initial"], info["fitness"]["final"], flush=True)
        state["evolq"].append((w, a, runs))
        write(partial=True)
    text = report(state, args, partial=False)
    print(text)
    write(partial=False)


def _ms(values, fmt: str = ".2f") -> str:
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def report(state: dict, args, partial: bool) -> str:
    rows = list(state["rows"])
    for w, a, runs in state["evolq"]:
        rows.append(["omse → evolq", f"{len(runs)} seeds", args.evolq_scheme, f"W{w}A{a}",
                     _ms([r["top1"] for r in runs]), _ms([r["agreement"] for r in runs]),
                     _ms([r["kl"] for r in runs], ".4f"), "-",
                     _ms([r["refine_s"] for r in runs], ".0f"), "-"])
    evolq_cfg = state["evolq"][0][2][0]["config"] if state["evolq"] else None
    md = [
        "## A CNN: EfficientNet-Lite0 (issue 13)",
        "",
        "**Partial: the run had not finished when this was written.**" if partial else "",
        "",
        f"Command: `{command()}`  ",
        f"{environment()}  ",
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

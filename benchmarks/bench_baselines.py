"""Baseline methods on the real DeiT-Tiny (issue 2): float and minmax / percentile / omse / fqvit under both schemes
at W8A8, W6A6, W4A8, W4A4. Calibrates on all of calib/ (250 images), evaluates on all of val/ (500 images).

    python -m benchmarks.bench_baselines [--num-calib N] [--methods a,b] [--bits 8/8,4/4] [--schemes fq,matmul]
"""

from __future__ import annotations

import argparse
from functools import partial

import vitq
from benchmarks.common import Bench, alternated_medians, batched_logits, head, table, write_section


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-calib", type=int, default=None)
    p.add_argument("--methods", default="minmax,percentile,omse,fqvit")
    p.add_argument("--schemes", default="fq,matmul")
    p.add_argument("--bits", default="8/8,6/6,4/8,4/4")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    bench = Bench()
    calib_x = bench.calib(args.num_calib, num_workers=2)
    bench.val(num_workers=2)
    val_x = bench.val_x
    print(f"calib {len(calib_x)} images, val {len(val_x)} images", flush=True)
    float_res = bench.float_result
    rows = [["float", "-", "-", float_res["top1"], float_res["top5"], 100.0, "0", "-", "-"]]

    timing = None
    for scheme in args.schemes.split(","):
        for bits in args.bits.split(","):
            w, a = map(int, bits.split("/"))
            for method in args.methods.split(","):
                row = bench.row(vitq.Scheme(scheme, w, a), method, batch_size=50)
                r = row.quant
                rows.append([method, scheme, f"W{w}A{a}", r["top1"], r["top5"], r["agreement"], f"{r['kl']:.4f}",
                             row.info["seconds"], row.eval_seconds])
                print(rows[-1], flush=True)
                if not args.no_write:  # keep what finished if the run is cut short
                    write_section("baselines", report(rows, None, calib_x, val_x, partial=True))
                if timing is None and scheme == "fq" and (w, a) == (8, 8):
                    # one float and one fake-quantized forward over the 500 images, alternated, medians of 3
                    timing = alternated_medians(partial(batched_logits, bench.model, val_x),
                                                partial(batched_logits, row.qmodel, val_x))

    text = report(rows, timing, calib_x, val_x, partial=False)
    print(text)
    if not args.no_write:
        write_section("baselines", text)


def report(rows, timing, calib_x, val_x, partial: bool) -> str:
    md = [
        *head("Baselines on the real DeiT-Tiny (issue 2)", partial),
        f"Calibration: {len(calib_x)} images of `calib/` (batches of 50); evaluation: all {len(val_x)} images of "
        "`val/`, labels by WordNet id. Agreement = top-1 agreement with the float model (%), KL = mean "
        "KL(float ‖ quant) of the softmax outputs (nats). Times in seconds on this machine (calibration includes "
        "the observation pass; eval = one quantized forward over the val images).",
        "",
        table(["method", "scheme", "bits", "top-1", "top-5", "agreement", "KL", "calibrate s", "eval s"], rows),
    ]
    if timing is not None:
        md += ["", f"Forward over the {len(val_x)} val images, median of 3 alternated runs: float {timing[0]:.1f} s, "
               f"fake-quantized (fq W8A8) {timing[1]:.1f} s, ratio quantized/float = {timing[1] / timing[0]:.2f}."]
    return "\n".join(md)


if __name__ == "__main__":
    main()

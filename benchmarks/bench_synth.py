"""Synthetic calibration images (issue 24): real, synthetic-only and real + synthetic calibration sets on the shared
DeiT-Tiny (PSAQ-ViT) and EfficientNet-Lite0 (bn = ZeroQ-style data-free; FDDA with real images), at matmul W8A8,
W6A6, W4A8 and W4A4 with the best calibration-only recipe of each model, scored on all of val/.

Rows run cheapest first (DeiT-Tiny W4A8 synthetic vs real 32, EfficientNet-Lite0 W8A8 synthetic-only, ...), each
synthetic set is generated once per (model, source, count, seed) into ``--synthetic-dir`` (PNG, reused across bit
widths and reruns), and every finished row is kept in ``benchmarks/synth_rows.json`` so an interrupted run goes on
where it stopped. ``--stop-at HH:MM`` (UTC) stops starting rows; the section names the rows that did not run.

    python -m benchmarks.bench_synth [--counts 32] [--seeds 0,1,2] [--iters 100] [--stop-at 16:20] [--figure]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import vitq
from benchmarks.common import (
    CALIB_DIR,
    DEIT,
    DEIT_WEIGHTS,
    FIGURES,
    ROOT,
    SHARED,
    Bench,
    Budget,
    head,
    load_kept_rows,
    mean_std,
    save_kept_rows,
    table,
    write_section,
)
from vitq.synth import synthesize

SECTION = "synth"
ROWS = ROOT / "benchmarks" / "synth_rows.json"
EFFNET = "tf_efficientnet_lite0"
MODELS = {"deit": (DEIT, DEIT_WEIGHTS), "effnet": (EFFNET, SHARED / "models" / f"{EFFNET}.safetensors")}
# the best calibration-only recipe of each model at these bits (BENCHMARKS.md: recon and cnn sections)
RECIPES = {
    "deit": dict(method="repq", rounding="gptq", softmax_quantizer="adalog", gelu_quantizer="adalog"),
    "effnet": dict(method="omse"),
}
RECIPE_TEXT = {"deit": "repq + adaptive-log softmax/GELU quantizers + GPTQ weight rounding "
                       "(recipe matmul-repq-adalog-gptq)", "effnet": "omse (per-channel weights)"}
SOURCES = {"deit": ("real", "synthetic"), "effnet": ("real", "synthetic", "real+fdda")}


def plan(counts, seeds, bits_list) -> list[tuple]:
    """Rows (model, source, count, bits, seed): those of the targets first (every seed), then the rest."""
    first = [("deit", "synthetic", 32, (4, 8)), ("deit", "real", 32, (4, 8)), ("effnet", "synthetic", 32, (8, 8)),
             ("effnet", "real", 32, (8, 8)), ("effnet", "real", 32, (6, 6)), ("effnet", "real+fdda", 32, (6, 6))]
    rows = [(*r, s) for s in seeds for r in first if r[2] in counts and r[3] in bits_list]
    for count in counts:
        for seed in seeds:
            for model in ("deit", "effnet"):
                for bits in bits_list:
                    for source in SOURCES[model]:
                        r = (model, source, count, bits, seed)
                        if r not in rows:
                            rows.append(r)
    return rows


def key(row) -> str:
    model, source, count, (w, a), seed = row
    return f"{model}|{source}|{count}|W{w}A{a}|{seed}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--counts", default="32,250")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--bits", default="4/8,8/8,6/6,4/4")
    p.add_argument("--models", default="deit,effnet")
    p.add_argument("--iters", type=int, default=100, help="generator steps per batch of 32 images")
    p.add_argument("--set-budget-min", type=float, default=8.0, help="cap on the generation of one set")
    p.add_argument("--synthetic-dir", default="/tmp/vitq-bench-synthetic")
    p.add_argument("--stop-at", default=None, help="UTC HH:MM after which no row starts")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--figure", action="store_true", help="only draw the figure from the kept sets")
    p.add_argument("--render", action="store_true", help="only rewrite the section from the kept rows (give the "
                   "settings of the run that made them)")
    args = p.parse_args()
    torch.set_num_threads(2)
    counts = [int(c) for c in args.counts.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    bits_list = [tuple(int(v) for v in b.split("/")) for b in args.bits.split(",")]
    settings = {"iters": args.iters, "set_budget_min": args.set_budget_min, "recipes": RECIPES}
    kept = load_kept_rows(ROWS, settings, args.fresh)
    if args.figure:
        figure(kept, args)
        return
    budget = Budget(0.0 if args.render else 1e9, args.stop_at)
    benches: dict[str, Bench] = {}
    todo = [r for r in plan(counts, seeds, bits_list) if r[0] in args.models.split(",")]
    for row in todo:
        if key(row) in kept["rows"]:
            continue
        if budget.over(key(row)):
            continue
        model, source, count, (w, a), seed = row
        if model not in benches:
            benches[model] = Bench(*MODELS[model])
            benches[model].val(num_workers=2)
            kept.setdefault("float", {})[model] = benches[model].float_result
        bench = benches[model]
        real = bench.calib(count, seed=seed, num_workers=2) if source != "synthetic" else None
        calib, gen = real, None
        if source != "real":
            images, gen = synthesize(bench.model, count, "fdda" if source == "real+fdda" else "auto",
                                     {"iters": args.iters}, seed=seed, real=real, directory=args.synthetic_dir,
                                     budget_min=args.set_budget_min, progress=False, transform=bench.desc)
            calib = images if real is None else torch.cat([real, images])
        t0 = time.perf_counter()
        run = bench.row(vitq.Scheme("matmul", w, a, softmax_quantizer=RECIPES[model].get("softmax_quantizer"),
                                    gelu_quantizer=RECIPES[model].get("gelu_quantizer")),
                        RECIPES[model]["method"], calib=calib, rounding=RECIPES[model].get("rounding"), seed=seed)
        q = run.quant
        kept["rows"][key(row)] = {
            "top1": q["top1"], "agreement": q["agreement"], "kl": q["kl"], "quantize_s": time.perf_counter() - t0,
            "num_calib": len(calib), "generator": gen and gen["generator"], "gen_s": gen and gen["made"]["seconds"],
            "gen_iters": gen and f"{gen['made']['iterations_run']}/{gen['made']['iterations_asked']}",
            "gen_dir": gen and gen["dir"]}
        print(key(row), kept["rows"][key(row)], flush=True)
        save_kept_rows(ROWS, kept)
        write_section(SECTION, report(kept, todo, budget, args, partial=True))
    write_section(SECTION, report(kept, todo, budget, args, partial=False))
    print(report(kept, todo, budget, args, partial=False))


def report(kept: dict, todo, budget, args, partial: bool) -> str:
    rows, missing = [], []
    groups: dict[tuple, list] = {}
    for row in todo:
        r = kept["rows"].get(key(row))
        if r is None:
            missing.append(key(row))
            continue
        groups.setdefault(row[:4], []).append((row[4], r))
    for (model, source, count, (w, a)), runs in groups.items():
        rs = [r for _, r in runs]
        gen = rs[0]["generator"] or "-"
        gen_s = mean_std([r["gen_s"] for r in rs], ".0f") if rs[0]["gen_s"] is not None else "-"
        rows.append([model, f"W{w}A{a}", source, count, gen, len(rs), mean_std([r["agreement"] for r in rs]),
                     mean_std([r["kl"] for r in rs], ".4f"), mean_std([r["top1"] for r in rs]), gen_s,
                     ", ".join(sorted({r["gen_iters"] for r in rs if r["gen_iters"]})) or "-"])
    rows.sort(key=lambda r: (r[0], r[1], r[3], r[2]))
    fl = kept.get("float", {})
    md = [*head("Synthetic calibration images (issue 24)", partial),
          "Models: the shared DeiT-Tiny and EfficientNet-Lite0, matmul scheme, the best calibration-only recipe of "
          f"each: DeiT-Tiny {RECIPE_TEXT['deit']}; EfficientNet-Lite0 {RECIPE_TEXT['effnet']}. Sources: `real` = a "
          f"seeded draw of N images of `calib/`; `synthetic` = N generated images only (data-free; DeiT-Tiny psaq, "
          f"EfficientNet-Lite0 bn = ZeroQ-style); `real+fdda` = the N real images plus N FDDA images (class "
          f"centres from those real images). Generator: {args.iters} Adam steps per batch of 32 (lr 0.2, cosine), "
          f"each set capped at {args.set_budget_min} min (`gen iters` = steps run / asked), 2 torch threads on a "
          "machine shared with other jobs (times are from a loaded machine). Evaluation: all 500 images of `val/`; "
          "agreement = top-1 agreement with float (%), KL = mean KL(float ‖ quant) (nats). mean ± std over the "
          "seeds given in `runs` (seed = calibration draw and generator seed).",
          "", "Float top-1: " + (", ".join(f"{m} {v['top1']:.2f}" for m, v in fl.items()) or "-"), "",
          table(["model", "bits", "source", "N", "generator", "runs", "agreement", "KL", "top-1", "gen s",
                 "gen iters"], rows)]
    if missing:
        md += ["", f"Rows not run ({len(missing)} of {len(todo)}: the time before `--stop-at` ran out): "
               + ", ".join(missing) + "."]
    md += ["", "Figure: `python -m benchmarks.bench_synth --figure` draws the generated sets next to real `calib/` "
           "images into `benchmarks/figures/synth_grid.png`. It is not committed (git-ignored): it shows thumbnails "
           "of the shared images, which the repository does not carry."]
    return "\n".join(md)


def figure(kept: dict, args) -> None:
    """A grid: real calib images (top), then each kept synthetic set's first images (one row per set)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    sets = sorted({r["gen_dir"] for r in kept["rows"].values() if r.get("gen_dir")})
    real = sorted(p for p in Path(CALIB_DIR).rglob("*.JPEG"))[:8] or sorted(Path(CALIB_DIR).rglob("*.*"))[:8]
    rows = [("real (calib/)", real)] + [(Path(s).name.rsplit("-", 1)[0], sorted(Path(s).glob("*.png"))[:8])
                                         for s in sets]
    fig, axes = plt.subplots(len(rows), 8, figsize=(12, 1.6 * len(rows)))
    for i, (name, files) in enumerate(rows):
        for j in range(8):
            ax = axes[i, j] if len(rows) > 1 else axes[j]
            ax.axis("off")
            if j < len(files):
                with Image.open(files[j]) as im:
                    ax.imshow(im.convert("RGB").resize((112, 112)))
        (axes[i, 0] if len(rows) > 1 else axes[0]).set_title(name, fontsize=8, loc="left")
    FIGURES.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(FIGURES / "synth_grid.png", dpi=80)
    print("wrote", FIGURES / "synth_grid.png")


if __name__ == "__main__":
    main()

"""Synthetic calibration images (issue 24), from a sweep: real, synthetic-only and real + synthetic calibration sets
on the shared DeiT-Tiny (PSAQ-ViT) and EfficientNet-Lite0 (bn = ZeroQ-style data-free; FDDA with real images), at
matmul W8A8, W6A6, W4A8 and W4A4 with the best calibration-only recipe of each model, scored on all of val/.

The grid is ``benchmarks/grids/synth.yaml`` (2 models x their sources x N in {32, 250} x 4 bit widths x seeds
0, 1, 2: 120 jobs); ``vitq sweep`` runs it into the store ``benchmarks/results/synth`` (each synthetic set is made
once per model, source, N and seed, shared by the four bit widths, written as PNGs to
``benchmarks/results/synth/synthetic/`` and read back by later sweeps; the job's record keeps its generation
seconds) and this script renders the section from the store. No loop, kept-row file or lock of its own: the sweep
skips finished jobs and reruns killed ones. The rows measured before sweeps (``benchmarks/synth_rows.json``) were
imported into the store by ``python -m benchmarks.import_kept_rows synth FILE``; the sweep does not know them as
done (their keys are ``imported-…``), so skip their settings with ``--only``.

The targets first (as the script's loop ran them: every seed of the target rows, then the rest), one command at
a time, each followed by the renderer:

    S="vitq sweep benchmarks/grids/synth.yaml --store benchmarks/results/synth"
    $S --only model=deit_tiny_patch16_224 --only num_calib=32 --only w_bits=4 --only a_bits=8 --only seed=1
    $S --only model=tf_efficientnet_lite0 --only num_calib=32 --only w_bits=8 --only label=real,synthetic --only seed=1
    $S --only model=tf_efficientnet_lite0 --only num_calib=32 --only w_bits=6 --only label=real,real+fdda --only seed=1
    (the same three with --only seed=2; seed 0 of these six rows is imported), then the rest:
    $S --only num_calib=32 --only seed=0     # then seed=1, seed=2, and --only num_calib=250 likewise
    python -m benchmarks.bench_synth [--store DIR] [--run [--only KEY=VALUE]] [--no-write]
    python -m benchmarks.bench_synth --figure    # only the figure of the generated sets the store's rows used

The data-free sets the script's loop generated (``/tmp/vitq-bench-synthetic`` by default) were keyed on the same
fields a sweep's are (the model's weights, the resolved generator and its full options, seed, count, input size and
normalisation; their manifests say psaq / bn, iters 100, seeds 0 and 1, N 32), so ``$S --set
synthetic_dir=/tmp/vitq-bench-synthetic`` should read them instead of generating them again (the row's
``record.calib_source.synthetic.reused`` says whether it did; its ``made.seconds`` stays the original generation
time). An FDDA set is keyed by its real images too: reused only where the sweep's draw equals the script's.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.common import CALIB_DIR, FIGURES, ROOT, environment, mean_std, table
from benchmarks.sweep_section import after_table, arguments, emit, grid_jobs, latest, provenance, setting_key

SECTION = "synth"
GRID = ROOT / "benchmarks" / "grids" / "synth.yaml"
STORE = ROOT / "benchmarks" / "results" / "synth"
SHORT = {"deit_tiny_patch16_224": "deit", "tf_efficientnet_lite0": "effnet"}
RECIPE_TEXT = {"deit": "repq + adaptive-log softmax/GELU quantizers + GPTQ weight rounding "
                       "(recipe matmul-repq-adalog-gptq)", "effnet": "omse (per-channel weights)"}
GENERATED = ("Rows not run", "Figure:", "**Partial")  # lines after the table this script writes itself


def row_key(cfg: dict, label: str) -> str:
    """A row's name in the section and in the kept rows before sweeps: ``model|source|N|WwAa|seed``."""
    model = SHORT.get(cfg["model"]["name"], cfg["model"]["name"])
    return f"{model}|{label}|{cfg['num_calib']}|W{cfg['w_bits']}A{cfg['a_bits']}|{cfg['seed']}"


def made(row: dict) -> dict:
    """The generation record of a row's synthetic set ({} for real-only rows)."""
    return ((row["record"].get("calib_source") or {}).get("synthetic") or {}).get("made") or {}


def collect(store: Path):
    """(groups {(model, source, N, (w, a)): [rows over seeds]}, the keys of the grid's jobs the store lacks, rows)."""
    found, missing = latest(store, GRID)
    groups: dict = {}
    for job in grid_jobs(GRID):
        row = found.get(setting_key(job.config, job.label))
        if row is not None:
            c = job.config
            groups.setdefault((SHORT[c["model"]["name"]], job.label, c["num_calib"], (c["w_bits"], c["a_bits"])),
                              []).append(row)
    return groups, [row_key(j.config, j.label) for j in missing], list(found.values())


def render(store: Path) -> str:
    groups, missing, rows = collect(store)
    synth = next((j.config["synthetic"] for j in grid_jobs(GRID) if j.config.get("synthetic")), {})
    lines = []
    for (model, source, count, (w, a)), rs in groups.items():
        gen = [made(r) for r in rs]
        secs = [g["seconds"] for g in gen if g.get("seconds") is not None]
        lines.append([model, f"W{w}A{a}", source, count, rs[0]["config"].get("synthetic", {}).get("generator", "-"),
                      len(rs), mean_std([r["agreement"] for r in rs]), mean_std([r["kl"] for r in rs], ".4f"),
                      mean_std([r["top1"] for r in rs]), mean_std(secs, ".0f") if secs else "-",
                      ", ".join(sorted({f"{g['iterations_run']}/{g['iterations_asked']}" for g in gen if g})) or "-"])
    lines.sort(key=lambda r: (r[0], r[1], r[3], r[2]))
    floats = {}
    for r in rows:
        floats.setdefault(SHORT[r["config"]["model"]["name"]], []).append(r["float_top1"])
    total = len(grid_jobs(GRID))
    md = ["## Synthetic calibration images (issue 24)", ""]
    if missing:
        md += [f"**Partial: {len(missing)} of the grid's {total} jobs are not in the store yet.**", ""]
    md += [provenance(rows, GRID, store) + "  ", f"Written: {environment()}  ",
           "Models: the shared DeiT-Tiny and EfficientNet-Lite0, matmul scheme, the best calibration-only recipe of "
           f"each: DeiT-Tiny {RECIPE_TEXT['deit']}; EfficientNet-Lite0 {RECIPE_TEXT['effnet']}. Sources: `real` = a "
           "seeded draw of N images of `calib/`; `synthetic` = N generated images only (data-free; DeiT-Tiny psaq, "
           "EfficientNet-Lite0 bn = ZeroQ-style); `real+fdda` = the N real images plus N FDDA images (class "
           f"centres from those real images). Generator: {(synth.get('options') or {}).get('iters', 200)} Adam steps "
           "per batch of 32 (lr 0.2; bn and fdda: one cosine decay; psaq: PSAQ-ViT v1's loop, two rounds each with "
           "a 20 % warm-up and a cosine decay, random shifts and flips, Adam betas 0.5/0.9), each set capped at "
           f"{synth.get('budget_min')} min (`gen iters` = steps "
           "run / asked; `gen s` = the set's generation seconds, made once per model, source, N and seed and shared "
           "by the four bit widths), 2 torch threads on a machine shared with other jobs (times are from a loaded "
           "machine). Evaluation: all 500 images of `val/`; agreement = top-1 agreement with float (%), KL = mean "
           "KL(float ‖ quant) (nats). mean ± std over the seeds given in `runs` (seed = calibration draw and "
           "generator seed).", "",
           "Float top-1: " + (", ".join(f"{m} {statistics.mean(v):.2f}" for m, v in sorted(floats.items())) or "-"),
           "", table(["model", "bits", "source", "N", "generator", "runs", "agreement", "KL", "top-1", "gen s",
                      "gen iters"], lines)]
    if missing:
        md += ["", f"Rows not run ({len(missing)} of {total}; `model|source|N|bits|seed`): " + ", ".join(missing) + "."]
    md += ["", "Figure: `python -m benchmarks.bench_synth --figure` draws the generated sets next to real `calib/` "
           "images into `benchmarks/figures/synth_grid.png`. It is not committed (git-ignored): it shows thumbnails "
           "of the shared images, which the repository does not carry."]
    kept = "\n".join(ln for ln in after_table(SECTION).splitlines() if not ln.startswith(GENERATED)).strip()
    if kept:
        md += ["", kept]
    return "\n".join(md)


def figure(store: Path) -> None:
    """A grid: real calib images (top), then the first images of each generated set the store's rows used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    _, _, rows = collect(store)
    sets = sorted({s["dir"] for r in rows if (s := (r["record"].get("calib_source") or {}).get("synthetic") or {})
                   .get("dir") and Path(s["dir"]).is_dir()})
    real = sorted(p for p in Path(CALIB_DIR).rglob("*.JPEG"))[:8] or sorted(Path(CALIB_DIR).rglob("*.*"))[:8]
    panels = [("real (calib/)", real)] + [(Path(s).name.rsplit("-", 1)[0], sorted(Path(s).glob("*.png"))[:8])
                                          for s in sets]
    fig, axes = plt.subplots(len(panels), 8, figsize=(12, 1.6 * len(panels)), squeeze=False)
    for i, (name, files) in enumerate(panels):
        for j in range(8):
            axes[i, j].axis("off")
            if j < len(files):
                with Image.open(files[j]) as im:
                    axes[i, j].imshow(im.convert("RGB").resize((112, 112)))
        axes[i, 0].set_title(name, fontsize=8, loc="left")
    FIGURES.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(FIGURES / "synth_grid.png", dpi=80)
    print("wrote", FIGURES / "synth_grid.png")


def main() -> int:
    args = arguments(GRID, STORE, __doc__, extra=lambda ap: ap.add_argument(
        "--figure", action="store_true", help="only draw the figure of the generated sets the store's rows used"))
    if args.figure:
        figure(args.store)
        return 0
    md = render(args.store)
    emit(args, (SECTION, md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

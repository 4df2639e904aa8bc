"""Low-bit base (issue 10) on the real DeiT-Tiny, from a sweep: the grid is ``benchmarks/grids/lowbit.yaml`` (repq,
repq + GPTQ, the adaptive-log variant + GPTQ and the best existing method of each setting, over three calibration
draws); ``vitq sweep`` runs it into a results store and this script renders the BENCHMARKS.md section from the
store. No loop, kept-row file or lock of its own: the sweep skips finished jobs, reruns killed ones and keeps one
row per job in the store.

    vitq sweep benchmarks/grids/lowbit.yaml --store benchmarks/results/lowbit    # or: this script with --run
    python -m benchmarks.bench_lowbit --store benchmarks/results/lowbit            # writes the section

A (setting, config) whose draws are not all in the store shows the numbers of the previous run of this
benchmark (``benchmarks/figures/lowbit_runs.json``, written by the loop this script had before sweeps), marked †;
every job the store holds is also compared, draw by draw, with that previous run.
"""

from __future__ import annotations

import json
import os
import statistics

from benchmarks.common import DEIT_WEIGHTS, FIGURES, ROOT, command, environment, mean_std, table
from benchmarks.sweep_section import arguments, emit

GRID = ROOT / "benchmarks" / "grids" / "lowbit.yaml"
STORE = ROOT / "benchmarks" / "results" / "lowbit"
PREVIOUS = FIGURES / "lowbit_runs.json"  # the previous run's rows (read-only now)
SETTINGS = ["matmul W4A4", "matmul W6A6", "matmul W3A3", "fq W4A8", "fq W3A8"]
CONFIGS = ["repq", "repq (percentile ranges)", "repq (half fold)", "repq (quantile ranges)", "repq (RepQ-ViT's ranges)",
           "repq (head balance)", "repq (sequential order)", "repq + GPTQ", "repq-adalog",
           "repq-adalog (per-head q/k/v)", "repq-adalog (head balance)", "repq-adalog (shifted GELU)",
           "repq-adalog (sequential order)", "repq-adalog (output search)", "repq-adalog + GPTQ",
           "ptq4vit (reference)", "fqvit (reference)"]
# RepQ-ViT's official code on the same DeiT-Tiny and val/ images (issue 10; its own transform, float top-1 77.8)
REPQ_EXTERNAL = {"matmul W4A4": "top-1 60.8 (drop 17.0), agreement 68.2 (65.0–68.2 over 3 draws), KL 0.76",
                 "matmul W6A6": "top-1 77.2 (drop 0.6), agreement 91.0, KL 0.053"}
TARGETS = {"matmul W4A4": "agreement ≥ 72, drop ≤ 12", "matmul W6A6": "agreement ≥ 94, drop ≤ 0.8",
           "fq W4A8": "GPTQ agreement ≥ 90", "fq W3A8": "GPTQ agreement ≥ 70"}
# hand-written readings of the reproduction and of the sweep's overhead (from the runs they name)
READINGS = """Readings of issue 26's W4A4 rows (2026-12-07, three draws each, all from the store; the machine was
loaded by test runs beside them, so their seconds are indicative only). RepQ-ViT's public code gave 65.0–68.2
agreement over its three draws on these images (68.2 is the issue's target for plain `repq`):

- **plain `repq` 65.5 ± 0.3** (KL 0.760): within RepQ-ViT's spread, below its 68.2. Of the RepQ-ViT details tried,
  only the per-channel percentile search of the folded ranges moved it: **66.9 ± 1.1** (KL 0.738; draws 65.8,
  66.8, 68.0). RepQ-ViT's quantile range rule for activations and weights gave 65.3 ± 1.4 (KL 0.778), and all of
  its range rules together 65.8 ± 1.1 (KL 0.753); a half fold 64.5 ± 1.3 (KL 0.816, worse). So the target is not
  shown met; the best variant is 1.3 points short of it on the mean.
- **RepQ-ViT's calibration order** (`--repq-order sequential`, 2026-12-07 second session: each unit's quantizers
  observed with every upstream quantizer active, as RepQ-ViT's one quantized forward does): plain repq 65.5 →
  **66.1 ± 0.9** (KL 0.760 → 0.766; draws 65.4, 67.2, 65.8), within the draws' spread, still short of 68.2; on the
  adaptive-log base 71.4 → 70.5 ± 1.5 (KL 0.537 → 0.534, draws 72.2, 70.2, 69.2), no gain. At W3A3 both orders
  collapse: repq-adalog 1.1 ± 0.3 agreement (KL 4.72), sequential 1.2 ± 0.3 (KL 4.76). Cost: 40–50 s of
  calibration against 18–37 s (one partial pass per block). Not tried: RepQ-ViT keeps the folded quantizer at
  the mean of the per-channel steps (vitq searches it again after the fold).
- **AdaLog-style output search** (`--repq-search output`, experimental, draw 0 only): every one of the 74 searched
  operations lowered its own output error (mean relative error 0.40 → 0.35), yet the model's agreement fell from
  71.4 to **15.4** (KL 3.98); with the class token always among the searched tokens 22.4 (KL 3.57). On tiny
  random-init DeiTs the same search brings the logits closer to float. The cause is not found; the option warns
  when it runs. Cost: 24 s of search on 32 images.
- **head balance** (`--repq-head-balance qkv`, exact, exportable): plain repq 65.5 → **66.8 ± 1.3** (KL 0.760 →
  0.742); on the adaptive-log base 71.4 → 71.3 ± 1.1 (KL 0.537 → 0.523). One scale per head
  (`--attn-granularity head`, not an integer kernel in onnxruntime) gave 71.9 ± 0.3 (KL 0.528) there.
- **shifted post-GELU log quantizer** (AdaLog's, `adalog_shift`): 70.8 ± 1.2 against 71.4 ± 0.2 for the signed
  `adalog`; its KL is lower (0.520 against 0.537). Neither is a clear win at one draw's noise (1.2 points).
- The quantile rule calibrates in 4–5 s against 18–41 s for the `mse` search (column calib s above, loaded
  machine; 3 candidates per quantizer instead of a coordinate search), at the same accuracy within the draws'
  spread.

Readings of the reproduction (2026-12-06, issue 23): `vitq sweep benchmarks/grids/lowbit.yaml --store
benchmarks/results/lowbit --only seed=0 --only w_bits=4 --only scheme=matmul --only method=repq` (5 jobs, 47–63 s
each, run alone on the 2 cores at code version 5cb821924e66). The other draws were not rerun (CPU time went to
issues 24 and 25), so the rows above marked † are still the previous run's.

- **matmul W4A4 repq, draw 0: agreement 62.0 → 65.8** (KL 0.873 → 0.766). Not the sweep (tests/sweep checks every
  job of a grid against the standalone `vitq quantize`, bit for bit) but the method: commit 2349550 (issue 26)
  made repq's weights asymmetric per channel by default (all 2^b levels, as RepQ-ViT's code), which the previous
  run (2026-11-23) did not have. An earlier sweep of the same job before that commit (its record has no
  `asym_weights` option) gave 61.4 (KL 0.862), 3 images from the previous run's 62.0.
- **repq + GPTQ** 70.8 → 69.4 (KL 0.626 → 0.615) and **repq-adalog + GPTQ** 75.0 → 75.2 (KL 0.413 → 0.365): the
  same change under GPTQ; the KL improves in both, the agreement moves by 7 and 1 images of 500.
- **New rows of the grid (draw 0 only, so not in the table, which needs all three):** `repq (percentile ranges)`
  (RepQ-ViT's per-channel percentile search of the folded ranges) 65.8 % agreement, KL 0.729, top-1 59.8; `repq
  (half fold)` 66.0 %, KL 0.768, top-1 60.6; plain repq 65.8 %, KL 0.766, top-1 59.6 on the same draw. RepQ-ViT's
  public code gave 65.0–68.2 over its three draws on these images.
- **Time:** 47–63 s per job on a quiet machine (calibration 18–32 s of it); the earlier 1,202 s job ran at a load
  of 10–15 with Ray's workers at nice 15.
- **The sweep's own overhead**, measured without the shared data on the tests' tiny random-init DeiT (8 jobs: fq,
  W4A8 and W8A8, minmax, 4 draws, 80 evaluation images; same load): 8 standalone `vitq quantize` commands 124.1 s
  (each a fresh process: imports, model, images); `vitq sweep` of the same 8 jobs with a fresh local Ray instance
  (2 CPUs) 48.5 s, of which Ray's start 12.0 s and the jobs' own work 2.9 s: a fixed cost of about 35–45 s (Ray,
  and two workers importing torch/timm/vitq), then, with Ray and its workers up, 0.07 s per job over 16 jobs
  (wall 5.0 s against 3.9 s of job time on 2 slots) to 1.3 s per job over 8 jobs of a new store (which makes its
  calibration draws and float logits first). All 8 jobs had the standalone commands' metrics exactly."""


def setting_of(row: dict) -> str:
    return f"{row['scheme']} W{row['w_bits']}A{row['a_bits']}"


def grid_seeds() -> dict:
    """(setting, config) -> the seeds the grid asks for."""
    from vitq.sweep.grid import expand, read_grid

    out: dict = {}
    for job in expand(read_grid(str(GRID)), str(GRID.parent)):
        c = job.config
        out.setdefault((f"{c['scheme']} W{c['w_bits']}A{c['a_bits']}", job.label), set()).add(c["seed"])
    return out


def store_rows(store) -> list[dict]:
    from vitq.sweep.report import results

    if not (store / "results.sqlite").exists():
        return []
    rows = results(str(store))
    for r in rows:
        r["setting"], r["config"], r["calib_s"] = setting_of(r), r["label"], r["quantize_s"]
    return rows


def render(store) -> str:
    previous = json.loads(PREVIOUS.read_text())
    old = {(r["setting"], r["config"], r["seed"]): r for r in previous["runs"]}
    new = {}
    for r in store_rows(store):  # the latest row of each job (a rerun with newer code replaces an older one)
        new[(r["setting"], r["config"], r["seed"])] = r
    wanted = grid_seeds()
    lines, marked = [], False
    for setting in SETTINGS:
        for config in CONFIGS:
            seeds = sorted(wanted.get((setting, config), ()))
            if not seeds:
                continue
            from_store = all((setting, config, s) in new for s in seeds)
            src = new if from_store else old
            rs = [src[(setting, config, s)] for s in seeds if (setting, config, s) in src]
            if not rs:
                continue
            marked |= not from_store
            float_top1 = statistics.mean(r["float_top1"] for r in rs)
            top1 = [r["top1"] for r in rs]
            lines.append([setting, config + ("" if from_store else " †"), len(rs), mean_std(top1, ".1f"),
                          f"{float_top1 - statistics.mean(top1):.1f}", mean_std([r["agreement"] for r in rs], ".1f"),
                          mean_std([r["kl"] for r in rs], ".3f"), f"{statistics.mean(r['calib_s'] for r in rs):.0f}",
                          ", ".join(sorted({r["code_version"].split("+")[-1] for r in rs})) if from_store else "–"])
        if setting in REPQ_EXTERNAL:
            lines.append([setting, "RepQ-ViT official code (external, issue 10)", 3, "–", "see →",
                          REPQ_EXTERNAL[setting], "", "", ""])
    repro = []
    for key, r in sorted(new.items(), key=lambda kv: (SETTINGS.index(kv[0][0]), CONFIGS.index(kv[0][1]), kv[0][2])):
        o = old.get(key)
        if o is None:
            continue
        repro.append([key[0], key[1], key[2], f"{o['top1']:.1f} → {r['top1']:.1f}",
                      f"{o['agreement']:.1f} → {r['agreement']:.1f}", f"{o['kl']:.3f} → {r['kl']:.3f}",
                      f"{o['calib_s']:.0f} / {r['calib_s']:.0f}", f"{r['job_s']:.0f}", r["code_version"]])
    note = ("† = not all draws of this row are in the store yet: the previous run's numbers "
            f"(`{PREVIOUS.relative_to(ROOT)}`, command `{previous['command']}`, made by this script's loop before "
            "sweeps, 2026-11-23)." if marked else "Every row comes from the store.")
    repro_md = table(["setting", "config", "seed", "top-1 before → sweep", "agreement", "KL",
                      "calib s before / sweep", "job s", "code version"], repro) if repro else "(none yet)"
    shown = store.relative_to(ROOT) if store.is_relative_to(ROOT) else store
    return f"""## Low-bit base: RepQ-ViT reparameterization, log√2 / adaptive-log quantizers, GPTQ (issue 10)

Grid: `{GRID.relative_to(ROOT)}` run by `vitq sweep` into the store `{shown}`; section written by
`{command()}`.

{environment()}; 1-minute load average {os.getloadavg()[0]:.1f} when written.

Model `deit_tiny_patch16_224` ({DEIT_WEIGHTS.name}), vitq's transform (crop 0.9, bicubic). Calibration: 32
images of `calib/`, a seeded draw per seed (RepQ-ViT uses 32); every config of a draw sees the same images.
Evaluation: all 500 `val/` images in batches of 50, float logits computed once per model (the sweep's cache).
Cells are mean ± std over the draws (n = column `n`); drop = float top-1 − mean quantized top-1; agreement = top-1
agreement with float (%); KL = mean KL(float ‖ quant) in nats; calib s = wall seconds of calibration (+ GPTQ where
named) on 2 shared CPU cores (indicative only); code = the code version(s) of the row's jobs (`vitq results`).

Configs: `repq` = `--method repq` (reparameterization + log√2 softmax with a searched scale + `mse` activation
ranges (each end clipped on its own) + per-channel OMSE weights); `+ GPTQ` = `--weight-rounding gptq` (damp 0.01,
act-order, block 128); `repq-adalog + GPTQ` = `--method repq --softmax-quantizer adalog --gelu-quantizer adalog
--weight-rounding gptq`. Issue 26's W4A4 rows (three draws, no GPTQ): `repq (percentile ranges)` =
`--repq-channel-range percentile` (RepQ-ViT's per-channel percentile search of the folded ranges); `repq (half fold)`
= `--repq-fold-power 0.5`; `repq (quantile ranges)` = `--repq-act quantiles --repq-weights quantiles` (RepQ-ViT's
own range rule: the least-error of the 0.999 / 0.9999 / 0.99999 quantile ranges); `repq (RepQ-ViT's ranges)` = both
of those; `(head balance)` = `--repq-head-balance qkv` (per-head q/k/v ranges balanced by an exact rescaling folded
into qkv/proj); `repq-adalog` = `--softmax-quantizer adalog --gelu-quantizer adalog`; `(per-head q/k/v)` =
`--attn-granularity head` (one scale per head: not an integer kernel in onnxruntime, exported as float);
`(shifted GELU)` = `--gelu-quantizer adalog_shift`. Reference rows: the best existing method of the setting in
BENCHMARKS.md that fits the budget: `ptq4vit` at the apq section's reduced search (candidates 16, 2 rounds, 20 % of
token rows; `apq` was 1.2 points better at W4A4 there but twice as slow), on the first draw only (reduction for CPU
time); `fqvit` for `fq` (all draws). Every layer, head and patch embedding included, is quantized at the setting's
bits (image input 8 bits), as in the other sections.
RepQ-ViT rows: the figures issue 10 reports for RepQ-ViT's official code on the same model and val images with its
own transform (crop 0.875, float top-1 77.8): compare drops, agreement and KL, not absolute top-1.
Targets (issue 10): {"; ".join(f"{k}: {v}" for k, v in TARGETS.items())}.

{table(["setting", "config", "n", "top-1", "drop", "agreement", "KL", "calib s", "code"], lines)}

{note}

### Reproduction through `vitq sweep` (each job of the store next to the same draw of the previous run)

{repro_md}

{READINGS}
"""


def main() -> int:
    args = arguments(GRID, STORE, __doc__)
    store = args.store
    md = render(store)
    emit(args, ("lowbit", md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

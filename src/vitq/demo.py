"""``vitq demo``: the main job on an embedded default, with no network and no files to fetch.

A small ViT (timm's VisionTransformer, 8x8 single-channel input, 2x2 patches) is trained for a few seconds on
the handwritten digits that ship inside scikit-learn, then quantized with every registered method under both
schemes at bit widths where the methods part ways (W8A8 as the reference, W4A4, W2A4). It prints a table of
top-1 agreement with the float model (and top-1), draws the agreement per method and bit width
(``demo.png``), and prints and saves a short reading of the result. Methods run with their ``quick_options``
(a reduced search, from their registry entry) or, without one, their defaults; a method defined for the other
regime gets ``n/a``, and a method that fails gets ``failed`` in the table and a warning, without stopping the
demo. Training always runs on one thread, so the model is the same whatever ``--threads``; the whole demo runs
on one thread by default.

The output goes to a folder outside the repository by default (see :func:`default_demo_dir`).
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from vitq.errors import VitqError
from vitq.scheme import Scheme

log = logging.getLogger("vitq")

DEMO_MARKER = "demo_results.json"
SCHEMES = ("fq", "matmul")
BITS_FULL = ((8, 8), (4, 4), (2, 4))
BITS_QUICK = ((8, 8), (2, 4))
TRAIN_EPOCHS = 12
TRAIN_BATCH = 64
TRAIN_LR = 3e-3
SLOW_CELL_S = 20.0  # a method using more CPU seconds per setting, without quick_options, gets a warning


def default_demo_dir() -> str:
    """``$VITQ_DEMO_DIR``, else ``$XDG_CACHE_HOME/vitq/demo`` (``~/.cache/vitq/demo``): never the repository."""
    if os.environ.get("VITQ_DEMO_DIR"):
        return os.path.abspath(os.environ["VITQ_DEMO_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "vitq", "demo")


def digits_data(seed: int = 0):
    """(train_x, train_y, calib_x, test_x, test_y): 1,797 8x8 digits, standardised, split 1200/100/397 (the
    calibration images are 100 of the 200 between train and test, as many as the searches need here)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:1200], y[:1200], x[1200:1300], x[1400:], y[1400:]


def digits_vit(seed: int = 0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4,
                             num_heads=4, mlp_ratio=2.0)


class one_thread:
    """Run a block on one torch thread (then restore): the digits ViT is too small to gain from more, and one
    thread makes its training bit-identical whatever ``--threads`` says."""

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, progress: bool,
          batch: int = TRAIN_BATCH, lr: float = TRAIN_LR) -> None:
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * -(-len(y) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    with one_thread(), tqdm(total=steps, desc="train digits ViT", disable=not progress, leave=False,
                            dynamic_ncols=True) as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), batch):
                idx = perm[i:i + batch]
                xb = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=g)  # light noise augmentation
                loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.05)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
    model.eval()


def regime_refusal(method: str, scheme: Scheme, options: dict) -> str | None:
    """Why the method refuses the scheme's regime (e.g. ptq4vit and apq are defined for matmul only), or None."""
    from vitq.registry import get_method

    try:
        get_method(method).adjust(scheme, options)
    except VitqError as e:
        return str(e)
    return None


def demo_options(method: str) -> dict:
    """The method's own quick setting (registry ``quick_options``), else its defaults."""
    from vitq.registry import get_method

    return dict(get_method(method).quick_options)


def run_cell(model, method: str, scheme: Scheme, options: dict, calib_x, test_x, test_y, seed: int,
             float_logits: torch.Tensor) -> dict:
    import vitq.api as api
    from vitq.evaluate import Metrics

    t0, c0 = time.perf_counter(), time.process_time()
    qmodel, _ = api.quantize(model, calib_x, scheme, method, options=options, batch_size=100, seed=seed,
                             progress=False)
    cal_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    metrics = Metrics()
    with torch.no_grad():
        metrics.update(float_logits, qmodel.eval()(test_x), test_y)  # float logits computed once for the grid
    return {"calibrate_s": cal_s, "calibrate_cpu_s": cpu_s, **metrics.result()}


def reading(records: list[dict], float_top1: float, bits: tuple, n_test: int) -> str:
    """A one-paragraph reading of the grid, computed from its numbers."""
    ok = [r for r in records if r.get("status") == "ok"]
    parts = [f"Float top-1 of the digits ViT is {float_top1:.1f} % on {n_test} test images (one image = "
             f"{100 / n_test:.2f} points; one seed, so differences of a point or two are noise)."]
    for scheme in SCHEMES:
        rows = [r for r in ok if r["scheme"] == scheme]
        if not rows:
            continue
        by_bits = {}
        for r in rows:
            by_bits.setdefault((r["w_bits"], r["a_bits"]), []).append(r)
        ref = by_bits.get((8, 8), [])
        sent = f"Under {scheme}"
        if ref:
            lo = min(r["quant"]["agreement"] for r in ref)
            sent += f", every method keeps at least {lo:.1f} % agreement at W8A8"
        spread = {k: max(r["quant"]["agreement"] for r in v) - min(r["quant"]["agreement"] for r in v)
                  for k, v in by_bits.items() if len(v) > 1}
        if spread:
            w, a = max(spread, key=lambda k: (spread[k], -k[0]))
            cell = sorted(by_bits[(w, a)], key=lambda r: -r["quant"]["agreement"])
            best, worst = cell[0], cell[-1]
            sent += (f"; the methods part most at W{w}A{a}, from {best['method']} ({best['quant']['agreement']:.1f} %)"
                     f" to {worst['method']} ({worst['quant']['agreement']:.1f} %)")
        parts.append(sent + ".")
    na = sorted({r["method"] for r in records if r.get("status") == "n/a"})
    if na:
        parts.append(f"{', '.join(na)} {'is' if len(na) == 1 else 'are'} defined for one regime only (n/a in the "
                     "other).")
    failed = sorted({r["method"] for r in records if r.get("status") == "failed"})
    if failed:
        parts.append(f"{', '.join(failed)} failed on some settings (see the warnings).")
    parts.append("Searching methods run a reduced search here, and the numbers of two regimes must not be ranked "
                 "against each other; BENCHMARKS.md has the real DeiT-Tiny on ImageNet images.")
    return " ".join(parts)


def plot(records: list[dict], methods: list[str], bits: tuple, path: str, float_top1: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"W{w}A{a}" for w, a in bits]
    fig, axes = plt.subplots(1, len(SCHEMES), figsize=(5.5 * len(SCHEMES), 4.2), sharey=True)
    markers = "os^vD<>pXh*"
    handles: dict = {}
    for ax, scheme in zip(axes, SCHEMES, strict=True):
        for i, method in enumerate(methods):
            ys = []
            for w, a in bits:
                r = next((r for r in records if (r["method"], r["scheme"], r["w_bits"], r["a_bits"]) ==
                          (method, scheme, w, a) and r.get("status") == "ok"), None)
                ys.append(r["quant"]["agreement"] if r else float("nan"))
            if any(y == y for y in ys):  # not all NaN; colour and marker fixed per method across the panels
                ax.plot(range(len(bits)), ys, marker=markers[i % len(markers)], color=f"C{i % 10}", lw=1.2,
                        label=method if method not in handles else None)
                handles.setdefault(method, ax.lines[-1])
        ax.set_xticks(range(len(bits)), labels)
        ax.set_title(f"scheme {scheme}")
        ax.set_xlabel("bit width (weights / activations)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 agreement with the float model (%)")
    order = [m for m in methods if m in handles]
    fig.legend([handles[m] for m in order], order, fontsize=8, loc="center right")
    fig.suptitle(f"vitq demo: digits ViT (float top-1 {float_top1:.1f} %), agreement per method and bit width",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out: str | None = None, overwrite: bool = False, quick: bool = False, seed: int = 0,
             progress: bool = True, methods: list[str] | None = None, threads: int | None = None) -> int:
    from tqdm.auto import tqdm

    from vitq.registry import METHODS
    from vitq.state import OutputDir, write_json

    t_start, cpu_start = time.perf_counter(), time.process_time()
    out = os.path.abspath(out or default_demo_dir())
    folder = OutputDir(out, overwrite, command="demo", replace_own=True)
    for name in methods or []:
        if name not in METHODS:
            raise VitqError(f"--methods: unknown method {name!r} (expected some of {', '.join(sorted(METHODS))})")
    methods = list(methods or sorted(METHODS))
    bits = BITS_QUICK if quick else BITS_FULL
    log.info("demo: writing to %s", out)

    torch.manual_seed(seed)
    train_x, train_y, calib_x, test_x, test_y = digits_data(seed)
    model = digits_vit(seed)
    t0 = time.perf_counter()
    train(model, train_x, train_y, epochs=TRAIN_EPOCHS, seed=seed, progress=progress)
    train_s = time.perf_counter() - t0

    with torch.no_grad():
        float_logits = model(test_x)
    cells = [(m, s, w, a) for m in methods for s in SCHEMES for w, a in bits]
    records: list[dict] = []
    float_top1 = None
    bar = tqdm(cells, desc="demo grid", disable=not progress, dynamic_ncols=True)
    for method, scheme_name, w, a in bar:
        bar.set_postfix_str(f"{method} {scheme_name} W{w}A{a}")
        options = demo_options(method)
        scheme = Scheme(scheme_name, w, a)
        rec = {"method": method, "options": options, "scheme": scheme_name, "w_bits": w, "a_bits": a}
        why = regime_refusal(method, scheme, options)
        if why is not None:
            records.append({**rec, "status": "n/a", "reason": why})
            continue
        try:
            m = run_cell(model, method, scheme, options, calib_x, test_x, test_y, seed, float_logits)
        except Exception as e:  # a method that fails on this tiny model must not stop the whole demo
            msg = " ".join(str(e).split())[:200]
            log.warning("demo: %s failed at %s W%dA%d (%s: %s)", method, scheme_name, w, a, type(e).__name__, msg)
            records.append({**rec, "status": "failed", "reason": f"{type(e).__name__}: {msg}"})
            continue
        float_top1 = m["float"]["top1"]
        records.append({**rec, "status": "ok", **m})
        if m["calibrate_cpu_s"] > SLOW_CELL_S and not options:  # CPU time: a busy machine does not count
            log.warning("demo: %s took %.0f s of CPU at %s W%dA%d with its defaults; a quick_options entry in its "
                        "registration would make the demo faster", method, m["calibrate_cpu_s"], scheme_name, w, a)
    bar.close()
    if float_top1 is None:
        raise VitqError("--methods: none of the chosen methods could run on the demo model (see the warnings)")

    def cell(method, scheme_name, w, a) -> str:
        r = next(r for r in records if (r["method"], r["scheme"], r["w_bits"], r["a_bits"]) ==
                 (method, scheme_name, w, a))
        if r["status"] != "ok":
            return r["status"]
        return f"{r['quant']['agreement']:.1f} ({r['quant']['top1']:.1f})"

    headers = ["method"] + [f"{s} W{w}A{a}" for s in SCHEMES for w, a in bits]
    opts = "; ".join(f"{m} {demo_options(m)}" for m in methods if demo_options(m))
    lines = [f"vitq demo: ViT (4 blocks, dim 64) trained {train_s:.0f} s on scikit-learn digits; float test top-1 "
             f"{float_top1:.1f} % on {len(test_y)} images; {len(calib_x)} calibration images",
             "cells: top-1 agreement with the float model % (quantized top-1 %); n/a: the method is defined for "
             "the other regime" + (f"; reduced settings: {opts}" if opts else ""), "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join([m] + [cell(m, s, w, a) for s in SCHEMES for w, a in bits]) + " |" for m in methods]
    table = "\n".join(lines)
    text = reading(records, float_top1, bits, len(test_y))
    total_s, total_cpu_s = time.perf_counter() - t_start, time.process_time() - cpu_start
    with folder:
        with open(folder.file("table.md"), "w") as f:
            f.write(table + "\n")
        with open(folder.file("reading.txt"), "w") as f:
            f.write(text + "\n")
        plot(records, methods, bits, folder.file("demo.png"), float_top1)
        write_json(folder.file(DEMO_MARKER), {"float_top1": float_top1, "train_s": train_s, "seed": seed,
                                              "threads": threads, "train_threads": 1, "total_s": total_s,
                                              "total_cpu_s": total_cpu_s,
                                              "bits": [list(b) for b in bits], "results": records,
                                              "reading": text})
        folder.commit()
    print(table)
    print()
    print(text)
    print(f"\nwrote {out}/: table.md, demo.png (agreement per method and bit width), reading.txt, {DEMO_MARKER} "
          f"({total_s:.0f} s in all, {total_cpu_s:.0f} s of CPU)")
    return 0

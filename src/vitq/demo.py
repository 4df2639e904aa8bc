"""``vitq demo``: the main job on an embedded default, with no network and no files to fetch.

A small ViT (timm's VisionTransformer, 8x8 single-channel input, 2x2 patches) is trained for about a minute on
the handwritten digits that ship inside scikit-learn, then quantized with every registered method under both
schemes at a few bit widths; the table of test accuracy and agreement with the float model is printed and
written to the output folder.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from vitq.errors import VitqError
from vitq.scheme import Scheme

DEMO_MARKER = "demo_results.json"
BITS_FULL = ((8, 8), (6, 6), (4, 8), (4, 4))
BITS_QUICK = ((8, 8), (4, 8))
# the search methods with smaller grids than their defaults, so the whole table takes minutes on a laptop CPU
DEMO_OPTIONS = {"ptqvit": {"candidates": 20, "rounds": 3}, "ptq4vit": {"candidates": 20},
                "apq": {"candidates": 20, "bbc_candidates": 5}, "easyquant": {"candidates": 20, "rounds": 2},
                "lapq": {"max_evals": 100, "p_values": "2,3,4"}}


def digits_data(seed: int = 0):
    """(train_x, train_y, calib_x, test_x, test_y): 1,797 8x8 digits, standardised, split 1200/200/397."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:1200], y[:1200], x[1200:1400], x[1400:], y[1400:]


def digits_vit(seed: int = 0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4,
                             num_heads=4, mlp_ratio=2.0)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = epochs * -(-len(y) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in tqdm(range(epochs), desc="train digits ViT", disable=not progress, leave=False):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            xb = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=g)  # light noise augmentation
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def _fits_regime(method: str, scheme: Scheme, options: dict) -> bool:
    """False when the method refuses the scheme's regime (e.g. ptq4vit and apq are defined for matmul only)."""
    from vitq.registry import get_method

    entry = get_method(method)
    if entry.adjust_scheme is None:
        return True
    try:
        entry.adjust_scheme(scheme, options)
    except VitqError:
        return False
    return True


def run_demo(out: str = "vitq-demo", overwrite: bool = False, quick: bool = False, seed: int = 0,
             progress: bool = True, methods: list[str] | None = None) -> int:
    from vitq import api
    from vitq.evaluate import evaluate
    from vitq.registry import METHODS, load_builtin

    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite and not os.path.exists(os.path.join(out, DEMO_MARKER)):
        raise VitqError(f"output folder {out} exists and is not a vitq demo folder (pass --overwrite to replace it)")
    load_builtin()
    torch.manual_seed(seed)
    train_x, train_y, calib_x, test_x, test_y = digits_data(seed)
    model = digits_vit(seed)
    t0 = time.perf_counter()
    train(model, train_x, train_y, epochs=15 if quick else 40, seed=seed, progress=progress)
    train_s = time.perf_counter() - t0
    bits = BITS_QUICK if quick else BITS_FULL
    rows, records = [], []
    float_top1 = None
    for name in methods or []:
        if name not in METHODS:
            raise VitqError(f"unknown method {name!r} (expected some of {', '.join(sorted(METHODS))})")
    for method in methods or sorted(METHODS):
        row = [method]
        options = DEMO_OPTIONS.get(method, {})
        for scheme_name in ("fq", "matmul"):
            for w, a in bits:
                scheme = Scheme(scheme_name, w, a)
                if not _fits_regime(method, scheme, options):
                    row.append("n/a")
                    continue
                qmodel = api.prepare(model, scheme, method=method, options=options)
                t0 = time.perf_counter()
                api.calibrate(qmodel, calib_x, method, batch_size=100, seed=seed, progress=False, **options)
                cal_s = time.perf_counter() - t0
                m = evaluate(qmodel, model, [(test_x, test_y)], progress=False)
                float_top1 = m["float"]["top1"]
                row.append(f"{m['quant']['top1']:.1f} ({m['quant']['agreement']:.0f})")
                records.append({"method": method, "options": options, "scheme": scheme_name, "w_bits": w,
                                "a_bits": a, "calibrate_s": cal_s, **m})
        rows.append(row)
        if progress:
            print(f"  {method}: done", flush=True)
    headers = ["method"] + [f"{s} W{w}A{a}" for s in ("fq", "matmul") for w, a in bits]
    lines = [f"vitq demo: ViT (4 blocks, dim 64) on scikit-learn digits; trained {train_s:.0f} s; "
             f"float test top-1 {float_top1:.1f} % on {len(test_y)} images",
             "cells: quantized top-1 % (top-1 agreement with float %); n/a: the method is defined for the "
             "other regime; reduced search grids: "
             + "; ".join(f"{k} {v}" for k, v in DEMO_OPTIONS.items() if k in [r[0] for r in rows]), "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    tmp = os.path.join(out, DEMO_MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"float_top1": float_top1, "train_s": train_s, "seed": seed, "results": records}, f, indent=2)
    os.replace(tmp, os.path.join(out, DEMO_MARKER))
    print(f"wrote {out}/table.md and {out}/{DEMO_MARKER}")
    return 0

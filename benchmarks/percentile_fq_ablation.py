"""Why `percentile` fails under `fq` (baselines section of BENCHMARKS.md): which quantizers' clipping hurts.

Calibrates DeiT-Tiny fq W8A8 with `percentile` and with `minmax` (100 calib/ images), then, one group of
quantizers at a time (the same quantizer in every block), gives a minmax model that group's percentile ranges
and prints the top-1 agreement with the float model on 150 val/ images. Prints only; writes nothing.

    python -m benchmarks.percentile_fq_ablation
"""

from __future__ import annotations

import copy
import os
import re

import torch

import vitq
from benchmarks.common import (
    CALIB_DIR,
    DEIT_WEIGHTS,
    VAL_DIR,
    batched_logits,
    load_images,
)
from vitq.data import model_transform
from vitq.models.loading import create_model


def predictions(model, x):
    return batched_logits(model, x).argmax(1)


def main() -> None:
    model = create_model("deit_tiny_patch16_224", weights=DEIT_WEIGHTS).eval()
    transform, _ = model_transform(model)
    calib_x, val_x = load_images(CALIB_DIR, 100, transform)[0], load_images(VAL_DIR, 150, transform)[0]
    reference = predictions(model, val_x)

    def agreement(q) -> float:
        return float((predictions(q, val_x) == reference).float().mean() * 100)

    states = {}
    for method in ("percentile", "minmax"):
        q = vitq.prepare(model, vitq.Scheme("fq", 8, 8), method=method)
        vitq.calibrate(q, calib_x, method, batch_size=50, progress=False)
        states[method] = q.state_dict()
        print(f"{method}: agreement {agreement(q):.1f} %", flush=True)
    pct, mm = states["percentile"], states["minmax"]
    groups: dict[str, set[str]] = {}
    for key in pct:
        if not torch.equal(pct[key], mm[key]):
            owner = key.rsplit(".", 1)[0]
            groups.setdefault(re.sub(r"blocks\.\d+\.", "blocks.*.", owner), set()).add(owner)
    print("minmax model with one group's percentile ranges:")
    for group, owners in groups.items():
        q = vitq.prepare(model, vitq.Scheme("fq", 8, 8), method="minmax")
        mixed = copy.copy(mm)
        mixed.update({k: pct[k] for k in pct if k.rsplit(".", 1)[0] in owners})
        q.load_state_dict(mixed)
        print(f"  {group:32s} agreement {agreement(q):.1f} %", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()

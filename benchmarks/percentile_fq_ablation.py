"""Why `percentile` fails under `fq` (baselines section of BENCHMARKS.md): which quantizers' clipping hurts.

Calibrates DeiT-Tiny fq W8A8 with `percentile` and with `minmax` (100 calib/ images), then, one group of
quantizers at a time (the same quantizer in every block), gives a minmax model that group's percentile ranges
and prints the top-1 agreement with the float model on 150 val/ images. Prints only; writes nothing.

    python -m benchmarks.percentile_fq_ablation

Not a grid (issue 23): a one-off diagnosis, not quantize jobs. Its rows are one minmax model with another
calibration's ranges loaded into one group of quantizers (a state-dict splice no grid key expresses); it keeps no
rows and writes no section.
"""

from __future__ import annotations

import copy
import re

import torch

import vitq
from benchmarks.common import Bench, batched_logits


def main() -> None:
    bench = Bench()
    calib_x = bench.calib(100)
    bench.val(150)
    reference = bench.float_logits.argmax(1)

    def agreement(q) -> float:
        return float((batched_logits(q, bench.val_x).argmax(1) == reference).float().mean() * 100)

    states = {}
    for method in ("percentile", "minmax"):
        q = bench.quantize(vitq.Scheme("fq", 8, 8), method, calib_x, batch_size=50).qmodel
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
        q = vitq.prepare(bench.model, vitq.Scheme("fq", 8, 8), method="minmax")
        mixed = copy.copy(mm)
        mixed.update({k: pct[k] for k in pct if k.rsplit(".", 1)[0] in owners})
        q.load_state_dict(mixed)
        print(f"  {group:32s} agreement {agreement(q):.1f} %", flush=True)


if __name__ == "__main__":
    main()

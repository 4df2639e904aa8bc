"""Why did APQ's BBC lose to its own base? An ablation of the BBC interpretation on the real DeiT-Tiny (issue 15).

For each bit width the PTQ4ViT-style per-layer search (apq's base, MPQ softmax) runs once; every BBC variant then
starts from a copy of that base, so the rows differ only in BBC. ``ptq4vit`` (twin softmax, no BBC) is the
reference apq must match. Every row reports, next to the val/ metrics, the label-free agreement and KL to the
float model on the calibration images the methods did NOT use (the other 218 of calib/): that is what the
defaults are chosen on; val/ is reported as a measurement only.

    python -m benchmarks.bench_apq_bbc [--bits 4 6] [--variants old,same,same+guard,...] [--threads 2]

Not a grid (issue 23): a one-off study of apq's internals, not quantize jobs. The variants are interpretations of
BBC that ``--method apq`` does not offer as options (they call ``bbc_search`` and PTQ4ViT's ``setup`` directly, on
a copy of one shared base per bit width), and the label-free score is on the calibration images the methods did
not use, which a sweep job does not evaluate on. It keeps no rows: one invocation prints the table and writes its
raw numbers to ``runs/bench_apq_bbc.json`` (git-ignored); it writes no BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import vitq
from benchmarks.common import (
    CALIB_DIR,
    ROOT,
    Bench,
    batched_logits,
    command,
    environment,
    load_records,
    metrics,
    select,
    table,
    write_json,
)
from vitq.calib import CalibData
from vitq.methods.apq import ApqOptions
from vitq.methods.bbc import bbc_search
from vitq.methods.hessian import Grids, layerwise_search, linear_grid
from vitq.methods.ptq4vit import grids_from, setup
from vitq.models.trunk import Trunk

VARIANTS = {  # name -> BBC options (on top of the apq defaults)
    "old": {"bbc_target": "float", "bbc_guard": False},  # the interpretation before issue 15
    "same": {"bbc_target": "same_input", "bbc_guard": False},
    "same+guard": {"bbc_target": "same_input", "bbc_guard": True},
    "old+guard": {"bbc_target": "float", "bbc_guard": True},
    "same+guard+keep1": {"bbc_target": "same_input", "bbc_guard": True, "keep_fraction": 1.0},
    "same+guard+tokens1": {"bbc_target": "same_input", "bbc_guard": True, "bbc_token_fraction": 1.0},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bits", type=int, nargs="+", default=[4, 6])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--num-calib", type=int, default=32)
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--token-fraction", type=float, default=0.2)
    p.add_argument("--bbc-candidates", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_apq_bbc.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    bench = Bench()
    model = bench.model
    used = select(CALIB_DIR, args.num_calib)
    used_paths = {r.path for r in used}
    held = [r for r in select(CALIB_DIR, None) if r.path not in used_paths]
    calib_x, _ = load_records(used, bench.transform)
    held_x, _ = load_records(held, bench.transform)
    bench.val()
    f_held = batched_logits(model, held_x)
    print(f"calib {len(calib_x)}, held-out calib {len(held_x)}, val {len(bench.val_x)}", flush=True)
    shared = {"num_calib": args.num_calib, "candidates": args.candidates, "rounds": args.rounds,
              "token_fraction": args.token_fraction, "bbc_candidates": args.bbc_candidates}
    rows, raw = [], []

    def record(bits, label, q, seconds, extra=None):
        v = bench.score(q)[0]["quant"]
        h = metrics(f_held, batched_logits(q, held_x), f_held.argmax(1))["quant"]
        r = {"bits": bits, "config": label, "held_agree": h["agreement"], "held_kl": h["kl"], "top1": v["top1"],
             "agree": v["agreement"], "kl": v["kl"], "seconds": seconds, "extra": extra}
        raw.append(r)
        rows.append([f"W{bits}A{bits}", label, f"{h['agreement']:.2f}", f"{h['kl']:.4f}", f"{v['top1']:.2f}",
                     f"{v['agreement']:.2f}", f"{v['kl']:.4f}", f"{seconds:.0f}"])
        print(rows[-1], flush=True)

    for bits in args.bits:
        scheme = vitq.Scheme("matmul", w_bits=bits, a_bits=bits)
        popts = {k: shared[k] for k in ("num_calib", "candidates", "rounds", "token_fraction")}
        run = bench.quantize(scheme, "ptq4vit", calib_x, options=popts, batch_size=32)
        record(bits, "ptq4vit", run.qmodel, run.info["seconds"])
        # apq's base once: the same code path as vitq.methods.apq.apq up to BBC
        o = ApqOptions.build(dict(shared), "apq")
        base = vitq.prepare(model, scheme, method="apq", options=o)
        calib = CalibData(calib_x, batch_size=32, progress=False, seed=0)
        t0 = time.perf_counter()
        sub, cap, _ = setup(base, calib, o, "mpq", blocks=[n for _, n, _ in Trunk(base).blocks()])
        layerwise_search(base, cap, grids_from(o), o.rounds, calib.device)
        base_s = time.perf_counter() - t0
        record(bits, "apq w/o BBC (base)", base, base_s)
        bgrids = Grids(linear_grid(o.bbc_alpha, o.bbc_beta, o.bbc_candidates),
                       grids_from(o).twin_shifts, grids_from(o).mpq_thresholds)
        for name in args.variants.split(","):
            qq = copy.deepcopy(base)
            t0 = time.perf_counter()
            trace = bbc_search(qq, cap, sub.images, bgrids, o.replace(**VARIANTS[name]), calib.device, calib.seed)
            guard = [b.get("guard", {}).get("kept") for b in trace.values()]
            record(bits, f"apq BBC {name}", qq, base_s + time.perf_counter() - t0,
                   {"options": VARIANTS[name], "guard_kept": guard})
        write_json(args.out, {"command": command(), "environment": environment(), "rows": raw})
    print(table(["bits", "config", "held-out calib agree", "held-out calib KL", "val top-1", "val agree", "val KL",
                 "calib s"], rows))
    print(f"{command()}\n{environment()}\nwhole script {(time.perf_counter() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()

"""Exported vitq models per deployment target next to the runtimes' own quantizers, on the real DeiT-Tiny, all in
one process: accuracy against the float model (agreement, KL, top-1) and against vitq's own fake-quantized model,
latency at batch 1 and 32 as a ratio to the float model in the same runtime (alternated rounds, medians), file
size, and the kernels each runtime actually ran (:mod:`vitq.export.kernels`).

vitq rows are made as a user makes them: ``vitq quantize --recipe best --target X`` into a state folder, then
``vitq export`` of the reloaded state (ONNX for onnxruntime, OpenVINO IR for openvino). Reference rows
(benchmarks/export_refs.py): onnxruntime ``quantize_dynamic`` / ``quantize_static`` (two settings), NNCF PTQ
(TRANSFORMER, with and without SmoothQuant) -> OpenVINO, and OpenVINO's default-precision float model.

Run it alone on the machine (its latency columns are meaningless beside other work): ``python -m
benchmarks.bench_export``. It is not a grid of quantize jobs (one process times the runtimes against each other), so
it keeps its own structure; it keeps no rows across runs and takes no lock.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from benchmarks.common import (
    BENCHMARKS_MD,
    CALIB_DIR,
    DEIT,
    DEIT_WEIGHTS,
    FIGURES,
    Bench,
    batched_logits,
    command,
    environment,
    git_commit,
    metrics,
    table,
    write_section,
)
from benchmarks.export_figure import lines as plane_lines
from benchmarks.export_figure import plot as plane_plot
from benchmarks.export_refs import file_bytes, nncf_references, ort_references
from vitq.export.kernels import describe, kernels
from vitq.export.runtimes import require

THREADS = 2
# label, target, extra flags of vitq quantize (besides --recipe best --target TARGET)
# the hago search (vitq.search.hago): which of the target's groups to quantize, timed at the benchmark's batch 32
HAGO = ["--search", "hago", "--search-batch", "32", "--search-rounds", "7"]
VITQ_CONFIGS = [
    ("vitq --recipe best --target onnxruntime", "onnxruntime", []),
    ("vitq --recipe best --target openvino", "openvino", []),
    # the accuracy target as the search's constraint (on calibration images): the fastest configuration
    # that keeps it (a --min-speedup asks for what an AVX2-only CPU cannot give: no INT8 model beats float there)
    ("vitq --recipe best --target onnxruntime --search hago --min-agreement 98.5", "onnxruntime",
     [*HAGO, "--min-agreement", "98.5"]),
    ("vitq --recipe best --target openvino --search hago --min-agreement 98.5", "openvino",
     [*HAGO, "--min-agreement", "98.5"]),
]
if os.environ.get("VITQ_BENCH_MORE"):  # softmax·v integer too (slower to run the whole benchmark)
    VITQ_CONFIGS.append(("vitq --recipe best --target onnxruntime --keep-float ''", "onnxruntime",
                         ["--keep-float", ""]))
FLOAT = "float"
OV_DEFAULT = "OpenVINO float, default precision"


def ort_session(path):
    ort = require("onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = THREADS, 1, 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def ov_session(path, precision: str = "f32"):
    """OpenVINO with one stream, the latency hint and f32 inference precision (int8 parts stay int8);
    ``precision=""``: the CPU's default precision."""
    core = require("openvino").Core()
    cfg = {"INFERENCE_NUM_THREADS": THREADS, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        cfg["INFERENCE_PRECISION_HINT"] = precision
    req = core.compile_model(core.read_model(str(path)), "CPU", cfg).create_infer_request()
    return lambda x: np.array(req.infer([x])[0])


def run_quantize(argv: list[str], out: str) -> tuple[dict, float]:
    """``vitq quantize ARGV`` in this process: its results.json (in ``out``) and its wall seconds."""
    from vitq.cli import main as vitq_main

    t0 = time.perf_counter()
    if vitq_main(argv) != 0:
        raise SystemExit(f"vitq {' '.join(argv)} failed")
    seconds = time.perf_counter() - t0
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f), seconds


def quantize_cli(model, label: str, target: str, extra: list[str], out: str, ir: bool, tmp: str) -> dict:
    """``vitq quantize --recipe best --target T`` then ``vitq export`` (ONNX, and IR for openvino)."""
    from vitq.cli import main as vitq_main
    from vitq.state import load

    res, seconds = run_quantize(["quantize", "--model", DEIT, "--weights", str(DEIT_WEIGHTS), "--calib",
                                 str(CALIB_DIR), "--recipe", "best", "--target", target, *extra, "--out", out,
                                 "--threads", str(THREADS), "--quiet"], out)
    files = {}
    for fmt in ("onnx", "openvino") if ir else ("onnx",):
        path = os.path.join(tmp, f"{os.path.basename(out)}{'-ir.xml' if fmt == 'openvino' else '.onnx'}")
        if vitq_main(["export", "--model", DEIT, "--weights", str(DEIT_WEIGHTS), "--state", out, "--out", path,
                      "--format", fmt, "--target", target]) != 0:
            raise SystemExit(f"vitq export of {label} failed")
        files[fmt] = path
    rec = res["recipe"]
    how = f"recipe {rec['name']} ({', '.join(f'{k} {v}' for k, v in rec['applied'].items())})"
    if res.get("search"):
        c = res["search"]["chosen"]
        how += (f"; hago kept float: {', '.join(c['float']) or 'nothing'} (searched {c['speedup']:.2f}× float, "
                f"calibration KL {c['kl']:.4f}, {res['search']['seconds']:.0f} s)")
    return {"qmodel": load(model, out).eval(), "files": files, "seconds": seconds, "num_calib": res["num_calib"],
            "how": how,
            "float": sorted({n for names in res["target_report"]["float"].values() for n in names})}


def time_runners(runners: dict, xs: np.ndarray, rounds: int, reps1: int) -> dict:
    b1, b32 = xs[:1].copy(), xs[:32].copy()
    times = {n: ([], []) for n in runners}
    for run in runners.values():  # warm-up
        run(b1)
        run(b32)
    for _ in range(rounds):
        for n, run in runners.items():
            t0 = time.perf_counter()
            for _ in range(reps1):
                run(b1)
            times[n][0].append((time.perf_counter() - t0) / reps1)
            t0 = time.perf_counter()
            run(b32)
            times[n][1].append(time.perf_counter() - t0)
    return {n: (statistics.median(t1), statistics.median(t32)) for n, (t1, t32) in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-calib", type=int, default=64, help="calibration images of the reference quantizers")
    ap.add_argument("--rounds", type=int, default=5, help="alternated timing rounds")
    ap.add_argument("--reps1", type=int, default=10, help="batch-1 calls per timing")
    ap.add_argument("--num-val", type=int, default=None, help="smoke runs only (the section needs all 500)")
    ap.add_argument("--no-nncf", action="store_true", help="skip the NNCF rows (smoke runs)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="vitq-bench-export.")

    bench = Bench()
    model = bench.model
    calib_x = bench.calib(args.num_calib)
    bench.val(args.num_val)
    val_x, val_y, float_logits = bench.val_x, bench.val_y, bench.float_logits
    log = lambda what: print(f"{what} ({time.perf_counter() - t_start:.0f}s)", flush=True)  # noqa: E731
    log("data ready")

    float_onnx = os.path.join(tmp, "float.onnx")
    torch.onnx.export(model, (val_x[:1],), float_onnx, dynamo=False, opset_version=20, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    # model label -> {runtime: file}
    models: dict[str, dict[str, str]] = {FLOAT: {"onnxruntime": float_onnx, "openvino": float_onnx}}
    vitq_rows, fake = {}, {}
    failed = {}
    for i, (label, target, extra) in enumerate(VITQ_CONFIGS):
        try:
            row = quantize_cli(model, label, target, extra, os.path.join(tmp, f"state{i}"),
                               target == "openvino", tmp)
        except (SystemExit, Exception) as e:  # e.g. a search whose constraint nothing reaches: the row says so
            failed[label] = str(e).splitlines()[-1] if str(e) else type(e).__name__
            log(f"{label}: FAILED: {failed[label]}")
            continue
        vitq_rows[label] = row
        fake[label] = batched_logits(row["qmodel"], val_x)
        models[label] = {"onnxruntime": row["files"]["onnx"], "openvino": row["files"].get("openvino",
                                                                                             row["files"]["onnx"])}
        log(f"{label}: {row['how']}, {row['seconds']:.0f}s")
    more = bool(os.environ.get("VITQ_BENCH_MORE"))
    for label, path in ort_references(float_onnx, calib_x.numpy(), tmp, more).items():
        models[label] = {"onnxruntime": path, "openvino": path}
    nncf_files, nncf_version = ({}, "not run") if args.no_nncf else nncf_references(float_onnx, calib_x.numpy(), tmp)
    for label, path in nncf_files.items():
        models[label] = {"openvino": path}
    log("references done")

    xs = val_x.numpy()
    res: dict[tuple[str, str], dict] = {}
    for runtime in ("onnxruntime", "openvino"):
        runners = {n: (ort_session(f[runtime]) if runtime == "onnxruntime" else ov_session(f[runtime]))
                   for n, f in models.items() if runtime in f}
        if runtime == "openvino":
            runners[OV_DEFAULT] = ov_session(float_onnx, precision="")
        for n, run in runners.items():
            logits = torch.from_numpy(np.concatenate([run(xs[i:i + 50]) for i in range(0, len(xs), 50)]))
            m = metrics(float_logits, logits, val_y)["quant"]
            r = {"top1": m["top1"], "agreement": m["agreement"], "kl": m["kl"]}
            if n in fake:
                r["agree_fake"] = 100.0 * float((logits.argmax(1) == fake[n].argmax(1)).float().mean())
            path = models.get(n, models[FLOAT])[runtime]
            r["MB"] = file_bytes(path) / 1e6
            r["kernels"] = describe(kernels(path, runtime)) if n != OV_DEFAULT else "default precision (f32 here)"
            res[(runtime, n)] = r
        log(f"{runtime}: accuracy done")
        med = time_runners(runners, xs, args.rounds, args.reps1)
        for n in runners:
            res[(runtime, n)].update({"ms1": 1e3 * med[n][0], "ms32": 1e3 * med[n][1],
                                      "x1": med[FLOAT][0] / med[n][0], "x32": med[FLOAT][1] / med[n][1]})
        log(f"{runtime}: latency done")

    fake_m = {n: metrics(float_logits, fl, val_y)["quant"] for n, fl in fake.items()}
    text = render(args, res, vitq_rows, fake_m, nncf_version, float_logits, val_y, load_before, os.getloadavg(),
                  time.perf_counter() - t_start, failed)
    print(text)
    if not args.no_write and args.num_val is None:
        write_section("export", text)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def render(args, res, vitq_rows, fake_m, nncf_version, float_logits, val_y, load_before, load_after,
           seconds, failed=None) -> str:
    float_top1 = 100.0 * float((float_logits.argmax(1) == val_y).float().mean())
    lines = [
        "## ONNX QDQ export (`vitq export`) on DeiT-Tiny: deployment targets against the runtimes' own quantizers",
        "",
        f"Command: `{command()}` (commit {git_commit()})",
        "",
        environment(),
        "",
        f"onnxruntime {_version('onnxruntime')}, OpenVINO {_version('openvino')}, NNCF {nncf_version}, onnx "
        f"{_version('onnx')}; {THREADS} threads everywhere. Load average (1/5/15 min) {load_before[0]:.1f}/"
        f"{load_before[1]:.1f}/{load_before[2]:.1f} at the start, {load_after[0]:.1f}/{load_after[1]:.1f}/"
        f"{load_after[2]:.1f} at the end"
        + (". **Timings from a loaded machine** (other work ran on the 2 cores): the speed ratios are noisy; "
           "rerun quiet with the command above." if max(load_before[0], load_after[0]) > 3.0 else
           " (no other job ran beside it)."),
        "",
        f"Model `deit_tiny_patch16_224` ({DEIT_WEIGHTS.name}); {len(val_y)} images of val/ (float top-1 "
        f"{float_top1:.2f} %). vitq rows: `vitq quantize --recipe best --target T` (the recipe it chose is named "
        "below), then `vitq export` of the saved state (`--format openvino` for the openvino target). Reference "
        f"quantizers calibrated on {args.num_calib} images of calib/. Float ONNX: torch.onnx TorchScript exporter, "
        "opset 20. Agreement = top-1 agreement with the float PyTorch model; KL = mean KL(float ‖ model); vs "
        "fake-quant = agreement with vitq's own fake-quantized PyTorch model. Speed = float latency / model "
        f"latency in the same runtime (median of {args.rounds} alternated rounds; batch 1: {args.reps1} calls per "
        "round; batch 32: one call). OpenVINO runs every model with INFERENCE_PRECISION_HINT f32 (int8 parts stay "
        "int8), plus its default-precision float row. Kernels: per quantizer group, integer kernels / all, "
        "read from onnxruntime's optimized graph and OpenVINO's compiled graph (vitq.export.kernels).",
        "",
        "### vitq's models (fake-quantized in PyTorch)",
        "",
        table(["model", "how", "top-1", "agreement", "KL", "quantizers left float", "quantize s"],
              [[n, r["how"], f"{fake_m[n]['top1']:.1f}", f"{fake_m[n]['agreement']:.1f}", f"{fake_m[n]['kl']:.4f}",
                str(len(r["float"])), f"{r['seconds']:.0f}"] for n, r in vitq_rows.items()]),
        "",
    ]
    for runtime in ("onnxruntime", "openvino"):
        rows = []
        for (rt, n), r in res.items():
            if rt != runtime:
                continue
            rows.append([n, f"{r['top1']:.1f}", f"{r['agreement']:.1f}", f"{r['kl']:.4f}",
                         f"{r['agree_fake']:.1f}" if "agree_fake" in r else "-", f"{r['MB']:.2f}",
                         f"{r['ms1']:.1f} / {r['ms32']:.0f}", f"{r['x1']:.2f} / {r['x32']:.2f}"])
        lines += [f"### {runtime}", "", table(["model", "top-1", "agreement", "KL", "vs fake-quant", "file MB",
                                               "ms batch 1 / 32", "speed ×float, batch 1 / 32"], rows), "",
                  "Kernels run:", ""]
        lines += [f"- {n}: {r['kernels']}" for (rt, n), r in res.items() if rt == runtime]
        lines.append("")
    lines += [f"- **{n}: failed**: {why}" for n, why in (failed or {}).items()]
    is_vitq = lambda n: n.startswith("vitq")  # noqa: E731
    figure = plane_plot(res, is_vitq, FIGURES / "export_plane.png") if args.num_val is None else None
    lines += plane_lines(res, is_vitq, figure.relative_to(FIGURES.parent.parent) if figure else None)
    lines += [f"Whole script: {seconds / 60:.1f} min."]
    reading = hand_reading("export")
    return "\n".join(lines + ([reading] if reading else []))


READING = "Reading (written by hand after the run"


def hand_reading(section: str) -> str:
    """The hand-written reading at the end of BENCHMARKS.md's ``section`` (from its first line starting with
    READING), kept by a rerun so that the rerun's author can update it instead of writing it again."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else ""
    body = text.split(f"<!-- BEGIN {section} -->", 1)[-1].split(f"<!-- END {section} -->", 1)[0]
    at = body.find(READING)
    return body[at:].strip() if at >= 0 else ""


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "missing"


if __name__ == "__main__":
    sys.exit(main())

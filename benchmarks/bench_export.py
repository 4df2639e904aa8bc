"""Exported vitq models (ONNX QDQ) on the real DeiT-Tiny in onnxruntime and OpenVINO: accuracy against the float
model and against vitq's own fake-quantized model, file size, and latency as a ratio to the float model in the
same runtime, with onnxruntime's own quantize_static / quantize_dynamic as reference rows from the same run.

The vitq rows are made the way a user makes them: ``vitq quantize --recipe best`` (or a named method) into a
state folder, then :func:`vitq.export.export` of the reloaded state. Run it alone on the machine
(``python -m benchmarks.bench_export``): other work on the 2 cores moves the speed ratios.
"""

from __future__ import annotations

import argparse
import collections
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
    CALIB_DIR,
    DEIT,
    DEIT_WEIGHTS,
    Bench,
    batched_logits,
    command,
    environment,
    metrics,
    table,
    write_section,
)
from vitq.export import export
from vitq.export.runtimes import Runner, require

THREADS = 2
VITQ_CONFIGS = [  # label, scheme, w bits, a bits, how: "recipe NAME" or "method NAME"
    ("vitq matmul W8A8, best recipe", "matmul", 8, 8, "recipe best"),
    ("vitq matmul W8A8, omse", "matmul", 8, 8, "method omse"),
    ("vitq matmul W8A8, repq, uniform softmax (every quantizer QDQ)", "matmul", 8, 8,
     "method repq --softmax-quantizer uniform"),
    ("vitq fq W8A8, best recipe", "fq", 8, 8, "recipe best"),
    ("vitq matmul W6A6, best recipe", "matmul", 6, 6, "recipe best"),
    ("vitq matmul W4A8 (INT4 weights), best recipe", "matmul", 4, 8, "recipe best"),
    ("vitq matmul W4A4 (INT4 weights), best recipe", "matmul", 4, 4, "recipe best"),
]


def ort_session(path, optimized: str | None = None):
    return Runner(str(path), "onnxruntime", threads=THREADS, optimized_path=optimized)


def ov_session(path, precision: str = "f32"):
    """OpenVINO with one stream, the latency hint and (by default) f32 inference precision: settings
    vitq.export's Runner does not take."""
    core = require("openvino").Core()
    cfg = {"INFERENCE_NUM_THREADS": THREADS, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        cfg["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(core.read_model(str(path)), "CPU", cfg)
    req = compiled.create_infer_request()
    return lambda x: np.array(req.infer([x])[0])


def fused_ops(path, tmp) -> dict:
    """Node types of onnxruntime's optimized graph that tell whether QDQ groups became integer kernels."""
    import onnx

    opt = os.path.join(tmp, "opt.onnx")
    ort_session(path, opt)
    counts = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
    os.remove(opt)
    keys = ("MatMulIntegerToFloat", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul", "MatMulInteger",
            "QLinearSoftmax", "MatMul", "Gemm", "DequantizeLinear", "QuantizeLinear")
    return {k: counts[k] for k in keys if counts[k]}


def quantize_cli(model, scheme: str, w: int, a: int, how: str, out: str, num_calib: int):
    """``vitq quantize`` as a user runs it (a recipe or a method, on calib/), then the saved state reloaded."""
    from vitq.cli import main as vitq_main
    from vitq.state import load

    kind, name, *extra = how.split()
    argv = ["quantize", "--model", DEIT, "--weights", str(DEIT_WEIGHTS), "--calib", str(CALIB_DIR),
            "--scheme", scheme, "--w-bits", str(w), "--a-bits", str(a), "--out", out, "--threads", str(THREADS),
            "--quiet", f"--{kind}", name, *extra]
    if kind == "method":
        argv += ["--num-calib", str(num_calib)]
    if vitq_main(argv) != 0:
        raise SystemExit(f"vitq {' '.join(argv)} failed")
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    rec = res.get("recipe") or {}
    what = f"recipe {rec['name']}" if rec else " ".join(["method", name, *extra])
    return load(model, out).eval(), f"{what}, {res['num_calib']} calibration images"


@torch.no_grad()
def roundoff_floor(q, x, logits32) -> float:
    """Top-1 agreement between the fake-quantized model in float32 and the same model in float64: how far
    round-off alone moves its decisions (each quantizer rounds, so a last-bit difference in its input can flip a
    code, and the flips spread through the later layers). An exported graph computes in another order than
    PyTorch, so its agreement with the fake-quantized model is not expected above this."""
    import copy

    q64 = copy.deepcopy(q).double()
    logits64 = torch.cat([q64(x[i:i + 50].double()) for i in range(0, len(x), 50)])
    return 100.0 * float((logits64.argmax(1) == logits32.argmax(1)).float().mean())


def calib_reader(calib_x: np.ndarray, batch: int = 16):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib_x[i:i + batch]} for i in range(0, len(calib_x), batch)])

        def get_next(self):
            return next(self.it, None)

    return Reader()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-calib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="alternated timing rounds")
    ap.add_argument("--reps1", type=int, default=10, help="batch-1 calls per timing")
    ap.add_argument("--num-val", type=int, default=None, help="smoke runs only (the section needs all 500)")
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
    print(f"data ready ({time.perf_counter() - t_start:.0f}s)", flush=True)

    files = {"float": os.path.join(tmp, "float.onnx")}
    torch.onnx.export(model, (val_x[:1],), files["float"], dynamo=False, opset_version=20, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    fake_logits, infos, calib_s, floor, recipes = {}, {}, {}, {}, {}
    for label, scheme, w, a, how in VITQ_CONFIGS:
        t0 = time.perf_counter()
        state = os.path.join(tmp, f"state{len(files)}")
        q, recipes[label] = quantize_cli(model, scheme, w, a, how, state, args.num_calib)
        calib_s[label] = time.perf_counter() - t0
        fake_logits[label] = batched_logits(q, val_x)
        floor[label] = roundoff_floor(q, val_x, fake_logits[label])
        files[label] = os.path.join(tmp, f"m{len(files)}.onnx")
        infos[label] = export(q, files[label], float_model=model)
        print(f"{label}: {recipes[label]}, quantized {calib_s[label]:.0f}s, exported "
              f"{infos[label]['file_bytes'] / 1e6:.2f} MB ({time.perf_counter() - t_start:.0f}s)", flush=True)

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    ref_static = "ort quantize_static (QDQ, u8 act, s8 per-channel W, MatMul/Gemm/Conv, MinMax)"
    ref_dynamic = "ort quantize_dynamic (u8 act per batch, s8 W)"
    files[ref_static] = os.path.join(tmp, "static.onnx")
    quantize_static(files["float"], files[ref_static], calib_reader(calib_x.numpy()), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"], calibrate_method=CalibrationMethod.MinMax)
    files[ref_dynamic] = os.path.join(tmp, "dynamic.onnx")
    quantize_dynamic(files["float"], files[ref_dynamic], weight_type=QuantType.QInt8)
    print(f"reference quantizations done ({time.perf_counter() - t_start:.0f}s)", flush=True)

    names = list(files)
    results = {n: {"MB": os.path.getsize(files[n]) / 1e6} for n in names}
    for n in names:
        results[n]["ops"] = fused_ops(files[n], tmp)
    xs = val_x.numpy()
    lat = {}
    for runtime in ("onnxruntime", "openvino"):
        runners = {n: (ort_session(files[n]) if runtime == "onnxruntime" else ov_session(files[n])) for n in names}
        if runtime == "openvino":
            runners["OpenVINO float, default precision (bf16 here)"] = ov_session(files["float"], precision="")
        for n, run in runners.items():
            logits = torch.from_numpy(np.concatenate([run(xs[i:i + 50]) for i in range(0, len(xs), 50)]))
            r = metrics(float_logits, logits, val_y)["quant"]
            res = results.setdefault(n, {"MB": os.path.getsize(files["float"]) / 1e6, "ops": {}})
            res[runtime] = {"top1": r["top1"], "agreement": r["agreement"], "kl": r["kl"]}
            if n in fake_logits:
                same = logits.argmax(1) == fake_logits[n].argmax(1)
                res[runtime]["agree_fake"] = 100.0 * float(same.float().mean())
        print(f"{runtime}: accuracy done ({time.perf_counter() - t_start:.0f}s)", flush=True)
        b1, b32 = xs[:1].copy(), xs[:32].copy()
        times = {n: ([], []) for n in runners}
        for run in runners.values():  # warm-up
            run(b1)
            run(b32)
        for _ in range(args.rounds):
            for n, run in runners.items():
                t0 = time.perf_counter()
                for _ in range(args.reps1):
                    run(b1)
                times[n][0].append((time.perf_counter() - t0) / args.reps1)
                t0 = time.perf_counter()
                run(b32)
                times[n][1].append(time.perf_counter() - t0)
        med = {n: (statistics.median(t1), statistics.median(t32)) for n, (t1, t32) in times.items()}
        for n in runners:
            lat[(runtime, n)] = {"ms1": 1e3 * med[n][0], "ms32": 1e3 * med[n][1],
                                 "x1": med["float"][0] / med[n][0], "x32": med["float"][1] / med[n][1]}
        print(f"{runtime}: latency done ({time.perf_counter() - t_start:.0f}s)", flush=True)

    fake_agree = {n: metrics(float_logits, fl, val_y)["quant"] for n, fl in fake_logits.items()}
    text = render(args, results, lat, infos, calib_s, recipes, fake_agree, floor, float_logits, val_y,
                  load_before, os.getloadavg(),
                  time.perf_counter() - t_start)
    print(text)
    if not args.no_write and args.num_val is None:
        write_section("export", text)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def render(args, results, lat, infos, calib_s, recipes, fake_agree, floor, float_logits, val_y, load_before,
           load_after, seconds) -> str:
    float_top1 = 100.0 * float((float_logits.argmax(1) == val_y).float().mean())
    lines = [
        "## ONNX QDQ export (`vitq export`) on DeiT-Tiny: onnxruntime and OpenVINO",
        "",
        f"Command: `{command()}`",
        "",
        environment(),
        "",
        f"onnxruntime {_version('onnxruntime')}, OpenVINO {_version('openvino')}, onnx {_version('onnx')}; "
        f"{THREADS} threads everywhere (torch, onnxruntime intra_op_num_threads, OpenVINO INFERENCE_NUM_THREADS). "
        f"Load average (1/5/15 min) {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f} at the start, "
        f"{load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f} at the end: the lock keeps other benchmarks "
        "out, but other people's tests may have run on the 2 cores at the same time, so the speed ratios are noisy.",
        "",
        f"Model `deit_tiny_patch16_224` ({DEIT_WEIGHTS.name}); all 500 images of val/ (float top-1 "
        f"{float_top1:.2f} %). Each vitq model is made as a user makes it: `vitq quantize --recipe best` (or "
        f"`--method omse --num-calib {args.num_calib}` for the cheap reference row) into a state folder, reloaded, "
        "and exported with `vitq.export` at opset 21 (export details below name the recipe each `best` chose). "
        "The reference rows quantize the float ONNX file with onnxruntime's own tools (quantize_static "
        f"calibrated on {args.num_calib} images of calib/). NNCF is not installed in this environment, so its "
        "reference row is skipped. Float ONNX: torch.onnx TorchScript exporter, opset 20.",
        "",
        "Agreement = top-1 agreement with the float PyTorch model; vs fake-quant = with vitq's own fake-quantized "
        "PyTorch model; KL = mean KL(float ‖ model). Speed = float latency / model latency in the same runtime "
        f"(median of {args.rounds} alternated rounds; batch 1: {args.reps1} calls per round; batch 32: one call); "
        "OpenVINO runs with INFERENCE_PRECISION_HINT f32 (the int8 parts stay int8), plus its default-precision "
        "float row for reference.",
        "",
        "### vitq's fake-quantized models in PyTorch (what each export is compared with)",
        "",
        "Round-off floor = top-1 agreement between the fake-quantized model run in float32 and the same model run "
        "in float64: every quantizer rounds, so a last-bit difference in its input can flip a code, and the flips "
        "spread through the later layers. An exported graph sums in another order than PyTorch, so its agreement "
        "with the fake-quantized model is not expected above this floor.",
        "",
        table(["model", "how (vitq quantize)", "top-1", "agreement", "KL", "round-off floor", "quantize s"],
              [[n, recipes[n], f"{m['top1']:.1f}", f"{m['agreement']:.1f}", f"{m['kl']:.4f}", f"{floor[n]:.1f}",
                f"{calib_s[n]:.0f}"] for n, m in fake_agree.items()]),
        "",
    ]
    for runtime in ("onnxruntime", "openvino"):
        rows = []
        for n, r in results.items():
            if runtime not in r:
                continue
            m, t = r[runtime], lat[(runtime, n)]
            rows.append([n, f"{m['top1']:.1f}", f"{m['agreement']:.1f}", f"{m['kl']:.4f}",
                         f"{m['agree_fake']:.1f}" if "agree_fake" in m else "-", f"{r['MB']:.2f}",
                         f"{t['ms1']:.1f} / {t['ms32']:.0f}", f"{t['x1']:.2f} / {t['x32']:.2f}"])
        lines += [f"### {runtime}", "", table(["model", "top-1", "agreement", "KL", "vs fake-quant", "file MB",
                                               "ms batch 1 / 32", "speed ×float, batch 1 / 32"], rows), ""]
    lines += ["### What onnxruntime made of each graph (node counts of its optimized graph)", ""]
    lines += [f"- {n}: " + ", ".join(f"{k} {v}" for k, v in r["ops"].items()) for n, r in results.items() if r["ops"]]
    lines += ["", "Export details:", ""]
    for n, info in infos.items():
        lines.append(f"- {n}: {len(info['quantizers_qdq'])} quantizers as QDQ, {len(info['quantizers_float'])} as "
                     f"float ops ({', '.join(info['float_kinds']) or 'none'}); weights {info['weight_storage']}")
    lines += ["", f"Whole script: {seconds / 60:.1f} min."]
    return "\n".join(lines)


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "missing"


if __name__ == "__main__":
    sys.exit(main())

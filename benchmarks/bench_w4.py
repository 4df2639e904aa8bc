"""The W4 path in onnxruntime on the real DeiT-Tiny (issue 25): whether 4-bit weights give a speed-up over float on
this CPU, and what they give instead (file size, session memory), all in one process.

vitq rows are made as a user makes them: ``vitq quantize --recipe best --w-bits 4 --target onnxruntime`` (W4A8),
and the same with ``--keep-float image,linear_input,qk,attn_v`` (W4 weight-only: every activation float), then
``vitq export`` of the saved state in each weight form: INT4 DequantizeLinear -> MatMul (``--matmulnbits off``;
onnxruntime fuses it into MatMulNBits itself for the weight-only model), and MatMulNBits written by vitq with float
or int8 compute (``--matmulnbits float|int8``). Reference: onnxruntime's own ``matmul_nbits_quantizer`` (RTN,
blocks of 32, symmetric) on the float file, with int8 and float compute (it needs ``onnx-ir``; the rows are left
out, and the section says so, without it). Float: the torch.onnx file, as in benchmarks/bench_export.py (the
speed-ups are over it), and vitq's own export of the float model (prepared, nothing calibrated: every quantizer
the identity), the layout ``--search hago`` timed its speed-ups against before it took the torch.onnx file.

Per model: agreement / KL / top-1 against the float PyTorch model, agreement with vitq's fake-quantized model,
latency at batch 1 and 32 over float in the same runtime (alternated rounds, medians), file size, the session's
memory (a fresh process per file: resident-set growth after loading it, and its peak over a batch-1 and a
batch-32 call, from /proc/self/status with the peak reset after the imports), and the kernels onnxruntime ran
(its optimized graph).

Run it alone on the machine: ``python -m benchmarks.bench_w4``. Smoke run on a tiny random model (no section
written): ``python -m benchmarks.bench_w4 --model-args '{...}' --weights W --calib DIR --val DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from benchmarks.bench_export import hand_reading, ort_session, run_quantize, time_runners
from benchmarks.common import (
    CALIB_DIR,
    DEIT,
    DEIT_WEIGHTS,
    VAL_DIR,
    Bench,
    batched_logits,
    command,
    environment,
    git_commit,
    metrics,
    select,
    table,
    write_section,
)
from vitq.export.kernels import describe, kernels
from vitq.export.runtimes import cpu_int8_support, int8_note

THREADS = 2
WEIGHT_ONLY = "image,linear_input,qk,attn_v"  # every activation group of the matmul scheme left float
# label, extra flags of vitq quantize (besides --recipe best --w-bits 4 --target onnxruntime), export forms
VITQ = [("vitq W4 weight-only", ["--keep-float", WEIGHT_ONLY], ("off", "float", "int8")),
        ("vitq W4A8", [], ("off", "float"))]
FORM = {"off": "INT4 DequantizeLinear -> MatMul", "float": "MatMulNBits, float compute",
        "int8": "MatMulNBits, int8 compute"}
FLOAT = "float"
VITQ_FLOAT = "float, vitq's own export (no quantizer calibrated)"
MEMORY = r"""
import resource, sys
import numpy as np, onnxruntime as ort
path, threads, c, h, w = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:6])
x = np.random.default_rng(0).standard_normal((32, c, h, w)).astype(np.float32)
so = ort.SessionOptions()
so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

try:  # reset the peak (VmHWM) to the current resident set: the imports' own peak is not the session's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    how = "VmHWM reset"
except OSError:
    how = "ru_maxrss"
base = status("VmRSS")
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
loaded = status("VmRSS")
name = s.get_inputs()[0].name
s.run(None, {name: x[:1]})
s.run(None, {name: x})
peak = status("VmHWM") if how == "VmHWM reset" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base, loaded, peak, how)
"""


def session_memory(path: str, shape) -> tuple[float, float]:
    """MB the session adds in a fresh process (Linux /proc): its resident set after loading ``path``, and its peak
    over a batch-1 and a batch-32 call (VmHWM, reset after onnxruntime is imported and the input allocated)."""
    out = subprocess.run([sys.executable, "-c", MEMORY, path, str(THREADS), *map(str, shape)], capture_output=True,
                         text=True, check=True)
    base, loaded, peak = (int(v) for v in out.stdout.split()[:3])
    return (loaded - base) / 1024, (peak - base) / 1024


def vitq_cli(args, label: str, extra: list[str], forms, folder: str) -> dict:
    """``vitq quantize --recipe best --w-bits 4 --target onnxruntime`` and ``vitq export`` of each form."""
    from vitq.cli import main as vitq_main

    model = ["--model", DEIT, "--weights", str(args.weights)]  # export reads --model-args from the state
    state = os.path.join(folder, "state")
    tiny = ["--model-args", args.model_args] if args.model_args else []
    res, seconds = run_quantize(["quantize", *model, *tiny, "--calib", str(args.calib), "--recipe", "best",
                                 "--w-bits", "4", "--target", "onnxruntime", *extra, "--out", state, "--threads",
                                 str(THREADS), "--quiet"], state)
    files = {}
    for form in forms:
        path = os.path.join(folder, f"{form}.onnx")
        if vitq_main(["export", *model, "--state", state, "--out", path, "--matmulnbits", form]) != 0:
            raise SystemExit(f"vitq export --matmulnbits {form} of {label} failed")
        files[form] = path
    rec = res["recipe"]
    how = f"recipe {rec['name']} ({', '.join(f'{k} {v}' for k, v in rec['applied'].items())})"
    return {"state": state, "files": files, "seconds": seconds, "how": how}


def ort_nbits_references(float_onnx: str, folder: str) -> tuple[dict[str, str], str]:
    """onnxruntime's own W4 quantizer (RTN, blocks of 32, symmetric) on the float file, int8 and float compute:
    label -> file, and a note (why the rows are missing, when they are)."""
    import onnx

    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:
        return {}, f"onnxruntime's matmul_nbits_quantizer did not import ({e}; `pip install onnx-ir`)"
    files = {}
    for compute, level in (("int8", 4), ("float", 1)):
        q = MatMulNBitsQuantizer(onnx.load(float_onnx), bits=4, block_size=32, is_symmetric=True,
                                 accuracy_level=level)
        q.process()
        path = os.path.join(folder, f"ort_rtn_{compute}.onnx")
        q.model.save_model_to_file(path)
        files[f"ort matmul_nbits_quantizer (RTN, block 32, symmetric), {compute} compute"] = path
    return files, ""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5, help="alternated timing rounds")
    ap.add_argument("--reps1", type=int, default=10, help="batch-1 calls per timing")
    ap.add_argument("--num-val", type=int, default=None, help="smoke runs only (the section needs all 500)")
    ap.add_argument("--model-args", default=None, help="timm keywords as JSON (smoke runs on a tiny model)")
    ap.add_argument("--weights", default=str(DEIT_WEIGHTS))
    ap.add_argument("--calib", default=str(CALIB_DIR))
    ap.add_argument("--val", default=str(VAL_DIR))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="vitq-bench-w4.")
    log = lambda what: print(f"{what} ({time.perf_counter() - t_start:.0f}s)", flush=True)  # noqa: E731

    from vitq.models.loading import create_model

    model = create_model(DEIT, weights=args.weights, **(json.loads(args.model_args) if args.model_args else {}))
    bench = Bench(DEIT, args.weights, model=model.eval())
    bench.val(records=select(args.val, args.num_val))
    val_x, val_y, float_logits = bench.val_x, bench.val_y, bench.float_logits
    float_onnx = os.path.join(tmp, "float.onnx")
    torch.onnx.export(model, (val_x[:1],), float_onnx, dynamo=False, opset_version=20, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    models: dict[str, str] = {FLOAT: float_onnx}
    form_of = {FLOAT: "torch.onnx, opset 20"}
    vitq_rows, fake = {}, {}
    from vitq import Scheme, prepare
    from vitq.export.onnx import export
    from vitq.state import load

    for i, (label, extra, forms) in enumerate(VITQ):
        folder = os.path.join(tmp, f"vitq{i}")
        os.makedirs(folder)
        row = vitq_cli(args, label, extra, forms, folder)
        vitq_rows[label] = row
        qmodel = load(model, row["state"]).eval()
        fake[label] = batched_logits(qmodel, val_x)
        if VITQ_FLOAT not in models:  # the float graph the hago search used to time against, beside torch.onnx's
            models[VITQ_FLOAT] = os.path.join(tmp, "vitq_float.onnx")
            export(prepare(model, Scheme("matmul")), models[VITQ_FLOAT], example=val_x[:1], float_model=model)
            form_of[VITQ_FLOAT] = "vitq's export layout (patchify MatMul, scale folded into q)"
        for form, path in row["files"].items():
            name = f"{label}, {FORM[form]}"
            models[name], form_of[name], fake[name] = path, f"vitq export --matmulnbits {form}", fake[label]
        log(f"{label}: {row['how']}, {row['seconds']:.0f}s")
    refs, ref_note = ort_nbits_references(float_onnx, tmp)
    models.update(refs)
    form_of.update({n: "MatMulNBits (onnxruntime's quantizer)" for n in refs})
    log("models ready" + (f"; {ref_note}" if ref_note else ""))

    xs = val_x.numpy()
    runners = {n: ort_session(p) for n, p in models.items()}
    res: dict[str, dict] = {}
    for n, run in runners.items():
        logits = torch.from_numpy(np.concatenate([run(xs[i:i + 50]) for i in range(0, len(xs), 50)]))
        m = metrics(float_logits, logits, val_y)["quant"]
        r = {"top1": m["top1"], "agreement": m["agreement"], "kl": m["kl"], "MB": os.path.getsize(models[n]) / 1e6,
             "kernels": describe(kernels(models[n], "onnxruntime"))}
        if n in fake and n not in vitq_rows:
            r["agree_fake"] = 100.0 * float((logits.argmax(1) == fake[n].argmax(1)).float().mean())
        r["mem_load"], r["mem_peak"] = session_memory(models[n], tuple(val_x.shape[1:]))
        res[n] = r
    log("accuracy and memory done")
    med = time_runners(runners, xs, args.rounds, args.reps1)
    for n in runners:
        res[n].update({"ms1": 1e3 * med[n][0], "ms32": 1e3 * med[n][1], "x1": med[FLOAT][0] / med[n][0],
                       "x32": med[FLOAT][1] / med[n][1]})
    log("latency done")
    fake_m = {n: metrics(float_logits, fake[n], val_y)["quant"] for n in vitq_rows}
    text = render(args, res, form_of, vitq_rows, fake_m, ref_note, float_logits, val_y, load_before,
                  os.getloadavg(), time.perf_counter() - t_start)
    print(text)
    if not args.no_write and args.num_val is None and args.model_args is None:
        write_section("w4", text)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def render(args, res, form_of, vitq_rows, fake_m, ref_note, float_logits, val_y, load_before, load_after,
           seconds) -> str:
    import onnxruntime

    float_top1 = 100.0 * float((float_logits.argmax(1) == val_y).float().mean())
    cpu = int8_note(cpu_int8_support()) or "CPU flags unknown (no /proc/cpuinfo)"
    loaded = max(load_before[0], load_after[0]) > 3.0
    lines = [
        "## W4 weights in onnxruntime on DeiT-Tiny: MatMulNBits against float (issue 25)",
        "",
        f"Command: `{command()}` (commit {git_commit()})",
        "",
        environment(),
        "",
        f"onnxruntime {onnxruntime.__version__}; {THREADS} threads. {cpu[0].upper() + cpu[1:]}. Load average "
        f"(1 min) {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end"
        + (": **timings from a loaded machine**, rerun quiet." if loaded else " (no other job ran beside it)."),
        "",
        f"Model `{DEIT}` ({os.path.basename(str(args.weights))}); {len(val_y)} images of {args.val} (float top-1 "
        f"{float_top1:.2f} %). vitq rows: `vitq quantize --recipe best --w-bits 4 --target onnxruntime` (W4A8) and "
        f"the same with `--keep-float {WEIGHT_ONLY}` (W4 weight-only), each exported in the forms named (`vitq "
        "export --matmulnbits off|float|int8`). Agreement / KL: against the float PyTorch model; vs fake-quant: "
        "top-1 agreement with vitq's own fake-quantized model. Speed = float latency / model latency (the torch.onnx "
        f"float file, median of {args.rounds} alternated rounds; batch 1: {args.reps1} calls per round; batch 32: "
        "one call). Session MB: resident-set growth of a fresh process after loading the file / at its peak over a "
        "batch-1 and a batch-32 call. Kernels: onnxruntime's optimized graph (MatMulNBits int8 = accuracy_level 4, "
        "its activations quantized to int8 per block at run time).",
        "",
        "### vitq's models (fake-quantized in PyTorch)",
        "",
        table(["model", "how", "top-1", "agreement", "KL", "quantize s"],
              [[n, r["how"], f"{fake_m[n]['top1']:.1f}", f"{fake_m[n]['agreement']:.1f}", f"{fake_m[n]['kl']:.4f}",
                f"{r['seconds']:.0f}"] for n, r in vitq_rows.items()]),
        "",
        "### onnxruntime",
        "",
        table(["model", "file", "top-1", "agreement", "KL", "vs fake-quant", "file MB", "session MB load / peak",
               "ms batch 1 / 32", "speed ×float, batch 1 / 32"],
              [[n, form_of[n], f"{r['top1']:.1f}", f"{r['agreement']:.1f}", f"{r['kl']:.4f}",
                f"{r['agree_fake']:.1f}" if "agree_fake" in r else "-", f"{r['MB']:.2f}",
                f"{r['mem_load']:.0f} / {r['mem_peak']:.0f}", f"{r['ms1']:.1f} / {r['ms32']:.0f}",
                f"{r['x1']:.2f} / {r['x32']:.2f}"] for n, r in res.items()]),
        "",
        "Kernels run:",
        "",
        *[f"- {n}: {r['kernels']}" for n, r in res.items()],
        "",
    ]
    if ref_note:
        lines += [f"onnxruntime's own W4 quantizer: not run ({ref_note}).", ""]
    lines.append(f"Whole script: {seconds / 60:.1f} min.")
    reading = hand_reading("w4")
    return "\n".join(lines + ([reading] if reading else []))


if __name__ == "__main__":
    sys.exit(main())

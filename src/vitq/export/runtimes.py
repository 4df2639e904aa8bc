"""The runtimes an exported file is meant for (onnxruntime and OpenVINO on the CPU): loading them, running a
file in them, checking it against vitq's own model, and what the graph writer has to do about their kernels.

The work-arounds are named here, each with the runtime behaviour it answers, so that :mod:`vitq.export.forms`
asks for them instead of carrying runtime knowledge of its own.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch
from torch import nn

from vitq.errors import VitqError

INSTALL_HINT = "pip install -e '.[export]'"
RUNTIMES = ("onnxruntime", "openvino")

# ----------------------------------------------------------------------------------------------- work-arounds
# The second operand (B) of an integer MatMul: on x86 CPUs without VNNI (AVX2 only) onnxruntime's MLAS kernels
# and OpenVINO's add two byte products a1*b1 + a2*b2 into a saturating int16 (vpmaddubsw), so with int8 B codes
# a pair above 32767 is silently clipped, for uint8 and int8 A alike (measured with onnxruntime 1.32's
# MatMulIntegerToFloat and QLinearMatMul and OpenVINO 2026.4: errors of 10-20 % of the output range for
# full-range codes, none for B codes in this range). Signed B codes within it cannot reach the limit
# (255 * 64 * 2 = 32640); a wider signed range goes as uint8 codes shifted by 128 with the zero point shifted
# alike (the same dequantized values), which those kernels multiply exactly.
# The same holds for integer convolutions (onnxruntime's QLinearConv, uint8 input x int8 weights): measured on
# the tiny EfficientNet-Lite's stem (input zero point 131), errors of up to 1.02 on outputs of range 3.09 (about
# 84 steps of the next quantizer); so integer conv weights
# wider than 7 bits go as uint8 codes shifted by 128 too (tests/export/test_export_cnn.py).
MATMUL_B_SAFE_SIGNED_CODES = (-64, 63)
UNSIGNED_SHIFT = 128

# onnxruntime 1.32 fuses a per-axis (per-head) QDQ pair at an attention MatMul input into a
# MatMulIntegerToFloat kernel that then fails at run time: such quantizers go as float operations.
PER_AXIS_QDQ_AT_ATTENTION_MATMUL = False

# Whether a convolution's weights may be a DequantizeLinear with per-channel zero points (fq: uint8 codes,
# asymmetric). Measured with onnxruntime 1.32 (DequantizeLinear -> Conv fused into QLinearConv with uint8
# per-channel zero points; tests/export/test_export_cnn.py) and OpenVINO 2026.4: both run it and agree with
# vitq; so no restriction. A weight bias correction is exported as a constant added to the dequantized weight.
CONV_QDQ_WEIGHTS_NEED_SYMMETRIC = False


def matmul_b_needs_unsigned(qmin: int, qmax: int, signed: bool) -> bool:
    """Whether codes in [qmin, qmax] feeding a MatMul's second input must be stored / quantized as uint8 (see
    ``MATMUL_B_SAFE_SIGNED_CODES``)."""
    lo, hi = MATMUL_B_SAFE_SIGNED_CODES
    return bool(signed) and (int(qmin) < lo or int(qmax) > hi)


def conv_weights_as_qdq(symmetric: bool) -> bool:
    """Whether a (non-patchify) convolution's weights may be a DequantizeLinear feeding the Conv."""
    return not CONV_QDQ_WEIGHTS_NEED_SYMMETRIC or symmetric


# ----------------------------------------------------------------------------------------------- running
def require(module: str):
    """Import an optional dependency of the export extra, or fail with one line saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise VitqError(f"vitq export needs {module.split('.')[0]} (missing; install the extra: "
                        f"{INSTALL_HINT})") from None


class Runner:
    """An exported file in onnxruntime (CPU) or OpenVINO (CPU), called on NCHW float32 batches."""

    def __init__(self, path: str, runtime: str = "onnxruntime", threads: int | None = None,
                 optimized_path: str | None = None):
        self.runtime = runtime
        if runtime == "onnxruntime":
            ort = require("onnxruntime")
            so = ort.SessionOptions()
            if threads:
                so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            if optimized_path:
                so.optimized_model_filepath = optimized_path
            so.log_severity_level = 3
            self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            self.input = self.session.get_inputs()[0].name
        elif runtime == "openvino":
            ov = require("openvino")
            core = ov.Core()
            cfg = {"INFERENCE_NUM_THREADS": threads} if threads else {}
            self.compiled = core.compile_model(core.read_model(path), "CPU", cfg)
            self.request = self.compiled.create_infer_request()
        else:
            raise VitqError(f"--runtime {runtime!r} is not supported (expected {' or '.join(RUNTIMES)})")

    def __call__(self, x) -> np.ndarray:
        x = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
        if self.runtime == "onnxruntime":
            return self.session.run(None, {self.input: x})[0]
        return np.array(self.request.infer([x])[0])


def check(path: str, qmodel: nn.Module, float_model: nn.Module, batches, runtime: str = "onnxruntime",
          progress: bool = True) -> dict:
    """Top-1 of the exported file on labelled batches, its top-1 agreement with the float model and with
    vitq's fake-quantized model, and the largest logit difference from the latter."""
    from tqdm.auto import tqdm

    run = Runner(path, runtime)
    n = top1 = agree_f = agree_q = 0
    q_top1 = 0
    maxdiff = 0.0
    qmodel.eval()
    float_model.eval()
    with torch.no_grad():
        for x, y in tqdm(batches, desc=f"check ({runtime})", disable=not progress, leave=False):
            out = torch.from_numpy(run(x))
            ref, fl = qmodel(x), float_model(x)
            pred = out.argmax(1)
            n += len(y)
            top1 += int((pred == y).sum())
            q_top1 += int((ref.argmax(1) == y).sum())
            agree_f += int((pred == fl.argmax(1)).sum())
            agree_q += int((pred == ref.argmax(1)).sum())
            maxdiff = max(maxdiff, float((out - ref).abs().max()))
    if n == 0:
        raise VitqError("no images to check")
    pct = 100.0 / n
    return {"runtime": runtime, "num_images": n, "top1": top1 * pct, "fake_quant_top1": q_top1 * pct,
            "agreement_float": agree_f * pct, "agreement_fake_quant": agree_q * pct,
            "max_abs_logit_diff": maxdiff}


# ----------------------------------------------------------------------------------------------- the CPU
# /proc/cpuinfo flags of the instructions that make int8 matmuls fast: VNNI (a 4-way int8 dot product into int32,
# AVX-512 or AVX forms) and AMX tiles. Without them (AVX2 only) the runtimes' int8 kernels multiply-add through
# saturating 16-bit pairs, and on such a CPU no INT8 model was measured faster than float (BENCHMARKS.md export).
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")
AMX_FLAGS = ("amx_int8", "amx_tile")


def cpu_int8_support(cpuinfo: str = "/proc/cpuinfo") -> dict | None:
    """What this CPU offers int8 kernels, read from the Linux ``/proc/cpuinfo`` flags: ``{"cpu", "avx2",
    "avx512", "vnni", "amx", "int8_dot", "source"}`` (``int8_dot``: VNNI or AMX). None where the file is missing
    or has no flags (another OS, another architecture)."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return None
    flags: set[str] = set()
    name = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "model name" and name is None:
            name = value.strip()
    if not flags:
        return None
    vnni, amx = any(f in flags for f in VNNI_FLAGS), any(f in flags for f in AMX_FLAGS)
    return {"cpu": name, "avx2": "avx2" in flags, "avx512": "avx512f" in flags, "vnni": vnni, "amx": amx,
            "int8_dot": vnni or amx, "source": cpuinfo}


def int8_note(info: dict | None) -> str:
    """One sentence on the CPU's int8 instructions for an error or a report ('' when unknown)."""
    if info is None:
        return ""
    if info["int8_dot"]:
        have = ", ".join(n for n, k in (("VNNI", "vnni"), ("AMX", "amx"), ("AVX-512", "avx512")) if info[k])
        return f"this CPU ({info['cpu']}) has {have} (from {info['source']})"
    has = [n for n, k in (("AVX2", "avx2"), ("AVX-512", "avx512")) if info[k]] or ["neither AVX2 nor AVX-512"]
    lacks = ["VNNI", *([] if info["avx512"] else ["AVX-512"]), "AMX"]
    return (f"this CPU ({info['cpu']}) has {' and '.join(has)} but no {', '.join(lacks[:-1])} or {lacks[-1]} (from "
            f"{info['source']}): the runtimes' int8 kernels have no int8 dot-product instruction here (on an "
            "AVX2-only CPU no INT8 model measured faster than float), so a speed-up over float may be out of reach")

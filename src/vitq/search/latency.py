"""The latency side of the hardware-aware search: a configuration (which quantizer groups are float) is exported
with vitq's own ONNX QDQ writer and timed in the target's runtime on this machine.

Speed-ups are over the float file a user compares against (:func:`export_reference`: ``torch.onnx`` of the float
model, the float row of benchmarks/bench_export.py), timed in the same rounds; vitq's own all-float export (its
fused layout: patchify MatMul instead of Conv, the attention scale folded into q) is timed beside it and is what
the additive latency model starts from.

Timing: every file of one stage is loaded into its own session first; each session is called twice to warm up;
then ``rounds`` rounds call every session once on the same batch (the order rotated each round, so no file always
runs first or last; a call under 20 ms is repeated within the round, up to 50 times, and averaged), and a file's
latency is the median of its rounds. Short by default (batch 8, 5 rounds): the
ratios of a loaded machine are noisy, and the search re-measures what it chooses.

Latency model (:class:`LatencyModel`), additive per group: leaving group ``u`` float costs ``c_u`` seconds over the
all-quantized model, measured twice, relative to the all-quantized model (u alone float) and relative to the float
model (u alone quantized), and ``c_u`` is the mean of the two. The predicted latency of a configuration is the
all-quantized latency plus the costs of its float groups; :meth:`LatencyModel.residual` says how far the sum of all
costs is from the measured float − all-quantized difference (zero when the groups add up exactly). No prediction
goes below the fastest latency measured.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vitq.errors import VitqError
from vitq.export.onnx import export
from vitq.export.runtimes import require
from vitq.quant.base import quantizers_of
from vitq.quant.keep_float import KeptFloat

log = logging.getLogger("vitq")
TIMED_RUNTIMES = ("onnxruntime", "openvino")
MIN_ROUND_S, MAX_REPS = 0.02, 50  # a call shorter than 20 ms is repeated within its round (tiny models)


@contextmanager
def floated(model: nn.Module, names: Iterable[str]):
    """The named quantizers replaced by ``float`` ones (the identity, exported as nothing) inside the block, the
    originals put back after it."""
    quants = quantizers_of(model)
    saved = []
    try:
        for name in names:
            q = quants[name]
            if isinstance(q, KeptFloat):
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            saved.append((parent, attr, q))
            setattr(parent, attr, KeptFloat(q.bits, q.role))
        yield model
    finally:
        for parent, attr, q in reversed(saved):
            setattr(parent, attr, q)


def export_config(qmodel: nn.Module, names: Iterable[str], path: str, example: torch.Tensor,
                  float_model: nn.Module | None = None) -> str:
    """Write ``qmodel`` with the quantizers ``names`` float as ONNX QDQ at ``path`` (replaced if there)."""
    with floated(qmodel, names):
        export(qmodel, path, overwrite=True, example=example, float_model=float_model)
    return path


REFERENCE_GRAPH = "torch.onnx export (TorchScript exporter, opset 20) of the float model"
REFERENCE_OPSET = 20


def export_reference(float_model: nn.Module, path: str, example: torch.Tensor) -> str | None:
    """The float model as a user exports it to compare against (what benchmarks/bench_export.py times as float):
    ``torch.onnx.export`` at opset 20 with a dynamic batch. Returns :data:`REFERENCE_GRAPH`, or None where the
    exporter fails on this model (the search then measures against vitq's own float export, and says so)."""
    import warnings

    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(float_model.eval(), (example,), path, dynamo=False, opset_version=REFERENCE_OPSET,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as e:  # noqa: BLE001  (any exporter failure: fall back, recorded in the search's record)
        log.warning("the float model did not export with torch.onnx (%s: %s); speed-ups are over vitq's own float "
                    "export", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    return REFERENCE_GRAPH


def session(path: str, runtime: str, threads: int | None):
    """A callable running the exported file on a float32 NCHW batch: onnxruntime's CPU provider, or OpenVINO's
    CPU plugin with one stream, the latency hint and f32 inference precision (its int8 parts stay int8; as the
    export benchmark runs it)."""
    if runtime == "onnxruntime":
        ort = require("onnxruntime")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]
    if runtime == "openvino":
        core = require("openvino").Core()
        cfg = {"NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = threads
        req = core.compile_model(core.read_model(path), "CPU", cfg).create_infer_request()
        return lambda x: np.array(req.infer([x])[0])
    raise VitqError(f"the search times models in onnxruntime or OpenVINO, not {runtime!r} (expected --target "
                    f"{' or '.join(TIMED_RUNTIMES)})")


def time_files(paths: dict, runtime: str, x: np.ndarray, rounds: int, threads: int | None) -> dict:
    """Median latency in seconds of each file (key -> path) on the batch ``x``, in alternated rounds."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    runs = {k: session(p, runtime, threads) for k, p in paths.items()}
    reps = {}
    for k, run in runs.items():
        run(x)
        t0 = time.perf_counter()
        run(x)
        reps[k] = min(max(1, math.ceil(MIN_ROUND_S / max(time.perf_counter() - t0, 1e-6))), MAX_REPS)
    keys = list(runs)
    times: dict = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.perf_counter()
            for _ in range(reps[k]):
                runs[k](x)
            times[k].append((time.perf_counter() - t0) / reps[k])
    return {k: statistics.median(v) for k, v in times.items()}


@dataclass
class LatencyModel:
    """Additive per-group latency (see the module's docstring). Seconds per batch."""

    t_float: float  # every quantizer float (the float model as vitq exports it)
    t_all: float  # every searched group quantized
    t_none: float  # every searched group float (t_float unless the search was limited to some groups)
    alone_float: dict  # group -> latency with that group alone float
    alone_quant: dict  # group -> latency with that group alone quantized

    def saving_vs_all(self, g: str) -> float:
        return self.alone_float[g] - self.t_all

    def saving_vs_float(self, g: str) -> float:
        return self.t_none - self.alone_quant[g]

    def cost(self, g: str) -> float:
        """Seconds leaving ``g`` float adds to a configuration (mean of the two measurements)."""
        return 0.5 * (self.saving_vs_all(g) + self.saving_vs_float(g))

    @property
    def floor(self) -> float:
        """The fastest latency measured: no prediction goes below it (negative costs of a noisy measurement
        could otherwise add up to a latency near zero)."""
        return min(self.t_float, self.t_all, self.t_none, *self.alone_float.values(), *self.alone_quant.values())

    def predict(self, float_groups: Iterable[str]) -> float:
        return max(self.t_all + sum(self.cost(g) for g in float_groups), self.floor)

    def residual(self) -> float:
        """Measured (t_none − t_all) minus the sum of the per-group costs, as a fraction of t_none − t_all."""
        span = self.t_none - self.t_all
        total = sum(self.cost(g) for g in self.alone_float)
        return (span - total) / span if abs(span) > 1e-12 else float("nan")

    def table(self) -> list[dict]:
        return [{"group": g, "ms_alone_float": 1e3 * self.alone_float[g],
                 "ms_alone_quantized": 1e3 * self.alone_quant[g],
                 "saving_vs_all_ms": 1e3 * self.saving_vs_all(g), "saving_vs_float_ms": 1e3 * self.saving_vs_float(g),
                 "cost_ms": 1e3 * self.cost(g)} for g in self.alone_float]


def file_name(folder: str, index: int) -> str:
    return os.path.join(folder, f"config{index}.onnx")

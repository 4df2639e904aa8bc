"""The ONNX writer: the export forms of :mod:`vitq.export.forms` traced into an ONNX QDQ graph, weight codes of
4 bits or fewer packed into INT4/UINT4 initializers (opset >= 21; otherwise int8/uint8 codes restricted to the
narrower range), unused nodes pruned, and a preprocessing JSON (resize, crop, mean, std, interpolation) written
beside the model. :func:`export` is the whole step, the function behind ``vitq.export`` and ``vitq export``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import torch
from torch import nn

from vitq.errors import VitqError
from vitq.export.forms import DEFAULT_OPSET, MIN_OPSET, export_module, record_input_sizes
from vitq.export.nbits import COMPUTE, to_matmulnbits
from vitq.export.runtimes import require
from vitq.quant.base import quantizers_of
from vitq.state import check_output_parent, make_parents, remove_created

TORCHSCRIPT_MAX_OPSET = 20  # newer opsets: exported at 20, then converted by onnx.version_converter
OPSET_RANGE = (10, 23)


def _int4_weights(model_proto) -> int:
    """Give each weight DequantizeLinear whose codes fit in 4 bits its own INT4/UINT4 codes and zero point
    (the TorchScript exporter shares equal initializers through Identity nodes; those left unused go).
    The codes are packed two per byte (ONNX's raw INT4 layout), so the file holds half a byte per weight.

    onnxruntime 1.32 fuses this per-axis form with its MatMul into MatMulNBits itself when the MatMul's other input
    is float (a weight-only model), not when it is a DequantizeLinear output (W4A8); ``export(nbits=...)`` writes
    MatMulNBits nodes for both (:mod:`vitq.export.nbits`) before this runs."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model_proto.graph
    inits = {t.name: t for t in graph.initializer}
    ident = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def const(name: str):
        while name in ident:
            name = ident[name]
        return inits.get(name)

    count = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        codes_t, zero_t = const(node.input[0]), const(node.input[2])
        if codes_t is None or zero_t is None:
            continue
        codes = numpy_helper.to_array(codes_t)
        if codes.dtype not in (np.int8, np.uint8) or codes.size == 0:
            continue
        signed = codes.dtype == np.int8
        lo, hi = (-8, 7) if signed else (0, 15)
        if codes.min() < lo or codes.max() > hi:
            continue
        dtype = TensorProto.INT4 if signed else TensorProto.UINT4
        zero = numpy_helper.to_array(zero_t)
        for k, arr in ((0, codes), (2, zero)):
            new = helper.make_tensor(f"{node.name}_{'codes' if k == 0 else 'zero'}_4bit", dtype, arr.shape,
                                     _pack_nibbles(arr), raw=True)
            graph.initializer.append(new)
            node.input[k] = new.name
        count += 1
    _prune(graph)
    return count


def _pack_nibbles(arr: np.ndarray) -> bytes:
    """4-bit values as ONNX stores INT4/UINT4 raw data: two per byte, the first in the low nibble (half the
    size of the int32 list ``helper.make_tensor`` would otherwise write as varints)."""
    flat = (arr.astype(np.int16).reshape(-1) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def _prune(graph) -> None:
    """Drop Identity nodes and initializers nothing reads any more."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Identity" and n.output[0] not in used]
        for n in dead:
            graph.node.remove(n)
        if not dead:
            break
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def to_onnx(emodel: nn.Module, example: torch.Tensor, path: str, opset: int) -> None:
    torch_opset = min(opset, TORCHSCRIPT_MAX_OPSET)
    import warnings

    record_input_sizes(emodel, example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(emodel, (example,), path, dynamo=False, opset_version=torch_opset,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=True)


def preprocessing(model: nn.Module) -> dict:
    """The eval preprocessing as plain numbers: resize the shorter side, center crop, normalize."""
    from vitq.data import model_transform

    _, d = model_transform(model)
    h, w = d["input_size"][1:]
    resize = int(np.floor(min(h, w) / d["crop_pct"])) if d["crop_mode"] == "center" else [int(h / d["crop_pct"]),
                                                                                          int(w / d["crop_pct"])]
    return {"input_size": d["input_size"], "resize": resize, "resize_mode": "shorter side", "crop": [h, w],
            "crop_mode": d["crop_mode"], "crop_pct": d["crop_pct"], "interpolation": d["interpolation"],
            "mean": d["mean"], "std": d["std"], "layout": "NCHW, RGB, float32 in [0, 1] before normalizing",
            "timm_transform": d["repr"]}


def sidecar_path(path: str) -> str:
    root, _ = os.path.splitext(path)
    return root + ".preprocess.json"


def export(qmodel: nn.Module, path: str | os.PathLike, opset: int = DEFAULT_OPSET, int4: bool = True,
           overwrite: bool = False, example: torch.Tensor | None = None, float_model: nn.Module | None = None,
           metadata: dict | None = None, nbits: str | None = None) -> dict:
    """Write ``qmodel`` (a prepared, calibrated vitq model) as ONNX QDQ to ``path`` and its preprocessing JSON
    beside it (``NAME.preprocess.json``). Returns what was done: quantizers as QDQ / float / identity, weight
    storage, opset, file size. ``float_model`` (default: ``qmodel``) gives the preprocessing description.
    ``nbits`` ("float" or "int8" compute): linear weights of 4 bits or fewer as onnxruntime's MatMulNBits
    (:mod:`vitq.export.nbits`; the file then runs in onnxruntime only)."""
    onnx = require("onnx")
    path = os.path.abspath(os.fspath(path))
    side = sidecar_path(path)
    if not path.endswith(".onnx"):
        raise VitqError(f"--out {path}: expected a file name ending in .onnx")
    for p in (path, side):
        if os.path.exists(p) and not overwrite:
            raise VitqError(f"output file {p} already exists (expected a new path, or pass --overwrite)")
    lo, hi = OPSET_RANGE
    if not lo <= opset <= hi:
        raise VitqError(f"--opset {opset} is not supported (expected {lo}..{hi}; per-channel QDQ needs {MIN_OPSET}, "
                        "INT4 weights 21)")
    if nbits is not None and nbits not in COMPUTE:
        raise VitqError(f"--nbits-compute {nbits!r} is not supported (expected {' or '.join(COMPUTE)})")
    check_output_parent(path)
    t0 = time.perf_counter()
    emodel, plan = export_module(qmodel, opset)
    if plan.problems:
        more = f" and {len(plan.problems) - 4} more" if len(plan.problems) > 4 else ""
        raise VitqError(f"quantizers not exportable at opset {opset}: {', '.join(plan.problems[:4])}{more} "
                        f"(per-channel QuantizeLinear/DequantizeLinear need --opset {MIN_OPSET} or newer)")
    if example is None:
        c, h, w = preprocessing(float_model if float_model is not None else qmodel)["input_size"]
        example = torch.zeros(1, c, h, w)
    created = make_parents(path)
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".onnx", dir=folder)
    os.close(fd)
    tmp_side = tmp + ".json"
    try:
        with torch.no_grad():
            to_onnx(emodel, example, tmp, opset)
        proto = onnx.load(tmp)
        if opset > TORCHSCRIPT_MAX_OPSET:
            from onnx import version_converter

            proto = version_converter.convert_version(proto, opset)
        n_nbits = to_matmulnbits(proto, nbits) if nbits is not None else 0
        if n_nbits:
            _prune(proto.graph)
        n_int4 = _int4_weights(proto) if (int4 and opset >= 21) else 0
        narrow = {n: w["bits"] for n, w in plan.weights.items() if w["bits"] < 8}
        storage = ("INT4/UINT4 initializers" if n_int4 else "int8/uint8 codes") if narrow else "int8/uint8 codes"
        n_le4 = sum(1 for b in narrow.values() if b <= 4)
        if narrow and n_int4 + n_nbits < n_le4 or any(b > 4 for b in narrow.values()):
            storage += "; weights of 5-7 bits (or 4 bits below opset 21) as int8/uint8 codes in their narrower range"
        if n_nbits:
            storage = (f"{n_nbits} linear weights as MatMulNBits (4-bit blocks, {nbits} compute)"
                       + (f"; the other weights: {storage}" if len(plan.weights) > n_nbits else ""))
        by = plan.summary()
        info = {"format": "vitq-onnx-1", "opset": opset, "int4_weight_tensors": n_int4, "weight_storage": storage,
                "matmulnbits": n_nbits, "nbits_compute": nbits if n_nbits else None,
                "weight_bits": sorted({w["bits"] for w in plan.weights.values()}),
                "quantizers_qdq": by["qdq"], "quantizers_float": by["float"], "quantizers_identity": by["identity"],
                "float_kinds": sorted({type(q).kind for n, q in quantizers_of(qmodel).items() if n in by["float"]}),
                "modules_own_forward": plan.own_forward,
                **(metadata or {})}
        for k, v in {"vitq": json.dumps({k: info[k] for k in ("format", "opset", "weight_storage", "float_kinds")}),
                     "vitq_quantizers_float": ",".join(by["float"])}.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)
        info["file_bytes"] = os.path.getsize(tmp)
        info["seconds"] = time.perf_counter() - t0
        pre = preprocessing(float_model if float_model is not None else qmodel)
        with open(tmp_side, "w") as f:
            json.dump({"preprocessing": pre, "input": "input", "output": "logits", "export": info}, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
        os.replace(tmp_side, side)
    except BaseException:
        for p in (tmp, tmp_side):
            if os.path.exists(p):
                os.remove(p)
        remove_created(created)
        raise
    info["path"], info["preprocess_json"] = path, side
    return info

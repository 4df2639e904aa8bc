"""Which kernels a runtime actually runs for an exported file: onnxruntime's optimized graph
(``SessionOptions.optimized_model_filepath``) and OpenVINO's compiled CPU graph
(``compiled_model.get_runtime_model()``, each node's ``layerType`` and ``runtimePrecision``).

Every matmul / convolution of the exported graph is classified as an integer kernel or a float one, and put in
the quantizer group (:data:`vitq.targets.GROUPS`) whose tensors feed it, so the declarations of
:mod:`vitq.targets` can be checked against what runs (tests/export/test_targets.py) and the export benchmark
can say which kernels ran.
"""

from __future__ import annotations

import collections
import os
import re
import tempfile

from vitq.export.runtimes import require

# onnxruntime CPU: node types of an integer matmul / convolution after its QDQ fusions, and of a float one
ORT_INTEGER = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "QLinearConv", "ConvInteger",
               "DynamicQuantizeMatMul", "MatMulNBits")
ORT_FLOAT = ("MatMul", "Gemm", "Conv", "FusedMatMul", "FusedConv", "FusedGemm", "Attention")
# OpenVINO CPU: layer types that do the multiply-accumulate work (Subgraph: a fused snippet, e.g. the whole MHA)
OV_WORK = ("FullyConnected", "MatMul", "Convolution", "GroupConvolution", "Subgraph", "ScaledDotProductAttention")
OV_INTEGER_PRECISIONS = ("u8", "i8", "i4", "u4")
NBITS_INT8_LEVEL = 4  # MatMulNBits' accuracy_level of int8 compute (A quantized per block at run time)

# the exporter's node names (vitq.export.forms, traced by torch.onnx): the attention's first MatMul is q·kᵀ and
# its second softmax·v; every other MatMul / Gemm / Conv belongs to a linear or convolution layer
_ATTN_QK = re.compile(r"/attn/MatMul$")
_ATTN_V = re.compile(r"/attn/MatMul_1$")


def group_of(node_name: str) -> str:
    """The quantizer group whose tensors feed the exported node ``node_name`` (a MatMul / Gemm / Conv)."""
    if _ATTN_QK.search(node_name):
        return "qk"
    if _ATTN_V.search(node_name):
        return "attn_v"
    if "patch_embed" in node_name or node_name.startswith("/conv_stem"):
        return "image"
    return "linear_input"


def onnxruntime_kernels(path: str) -> list[dict]:
    """Each matmul / convolution node of onnxruntime's optimized graph: name, op type, integer or not, group."""
    ort, onnx = require("onnxruntime"), require("onnx")
    fd, opt = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        so = ort.SessionOptions()
        so.optimized_model_filepath = opt
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(opt).graph
    finally:
        os.remove(opt)
    out = []
    for n in graph.node:
        if n.op_type in ORT_INTEGER or n.op_type in ORT_FLOAT:
            name = re.sub(r"(/[A-Za-z]+Fusion)+/?$", "", n.name)  # a fused node: source name + "/...Fusion"
            op, integer = n.op_type, n.op_type in ORT_INTEGER
            if op == "MatMulNBits":  # int8 compute only at accuracy_level 4; otherwise A stays float
                level = next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
                integer = level == NBITS_INT8_LEVEL
                op = f"MatMulNBits {'int8' if integer else 'float'}"
            out.append({"name": name, "op": op, "integer": integer, "groups": [group_of(name)]})
    return out


def openvino_kernels(path: str) -> list[dict]:
    """Each working node of OpenVINO's compiled CPU graph (f32 inference precision, as the export benchmark
    runs it): its layer type, runtime precision, integer or not, and the groups of the source nodes it fused."""
    ov = require("openvino")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                                      "INFERENCE_NUM_THREADS": 1})
    out = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        kind = rt["layerType"].astype(str)
        if kind not in OV_WORK:
            continue
        precision = rt["runtimePrecision"].astype(str)
        sources = [s for s in rt["originalLayersNames"].astype(str).split(",") if s]
        work = [s for s in sources if re.search(r"(MatMul|Gemm|Conv)(_\d+)?$", s)] or sources[:1]
        groups = {group_of(s) for s in work}
        if any("Softmax" in s for s in sources):  # an MHA snippet (its nodes may be renamed by the converter)
            groups = {"qk", "attn_v"}
        elif kind == "MatMul":  # two activations (linears become FullyConnected): attention, by what feeds it
            fed = [i.get_source_output().get_node().get_rt_info()["layerType"].astype(str) for i in op.inputs()]
            groups = {"attn_v" if "Softmax" in fed else "qk"}
        out.append({"name": op.get_friendly_name(), "op": f"{kind} {precision}",
                    "integer": precision in OV_INTEGER_PRECISIONS, "groups": sorted(groups)})
    return out


def kernels(path: str, runtime: str) -> list[dict]:
    if runtime == "onnxruntime":
        return onnxruntime_kernels(path)
    if runtime == "openvino":
        return openvino_kernels(path)
    raise ValueError(f"no graph reader for runtime {runtime!r}")


def summary(nodes: list[dict]) -> dict:
    """Per group: integer and float kernel counts, and the op types seen (``{"qk": {"integer": 2, "float": 0,
    "ops": {"MatMulIntegerToFloat": 2}}}``)."""
    out: dict[str, dict] = {}
    for n in nodes:
        for g in n["groups"]:
            s = out.setdefault(g, {"integer": 0, "float": 0, "ops": collections.Counter()})
            s["integer" if n["integer"] else "float"] += 1
            s["ops"][n["op"]] += 1
    for s in out.values():
        s["ops"] = dict(s["ops"])
    return out


def describe(nodes: list[dict]) -> str:
    """One line: per group, integer / all kernels and their op types."""
    parts = []
    for g, s in summary(nodes).items():
        ops = ", ".join(f"{k} {v}" for k, v in s["ops"].items())
        parts.append(f"{g}: {s['integer']}/{s['integer'] + s['float']} integer ({ops})")
    return "; ".join(parts)

"""W4 weights as onnxruntime's MatMulNBits (vitq.export.nbits): the packed blocks hold vitq's weight exactly, the
optimized graph of a tiny DeiT runs every linear layer as MatMulNBits (weight-only and W4A8), and the file
computes what vitq's fake-quantized model computes."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY, make_image_folder, tiny_images, tiny_model
from ort_helpers import run_ort

import vitq
from vitq.export.kernels import onnxruntime_kernels
from vitq.export.nbits import block_size, nbits_weights
from vitq.export.onnx import export

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHT_ONLY = ("image", "linear_input", "qk", "attn_v")  # every activation group of the matmul scheme in float


def _unpack(b: np.ndarray, zeros, N: int, K: int, blocks: int, block: int):
    lo, hi = b & 0xF, b >> 4
    u = np.stack([lo, hi], -1).reshape(N, blocks * block)[:, :K].astype(np.int16)
    if zeros is None:
        z = np.full(N, 8, np.int16)
    else:
        zb = zeros.reshape(N, -1)
        z = (zb[:, 0] & 0xF).astype(np.int16)
    return u, z


def test_block_size():
    assert [block_size(k, "float") for k in (192, 768, 40, 512)] == [64, 256, 16, 256]
    assert block_size(768, "int8") == 32


@pytest.mark.parametrize("signed,K,block", [(True, 64, 32), (False, 40, 16), (True, 192, 64)])
def test_packed_blocks_dequantize_to_vitqs_weight_and_run(signed, K, block):
    g = np.random.default_rng(K)
    N = 5
    lo, hi = (-8, 7) if signed else (0, 15)
    codes = g.integers(lo, hi + 1, (K, N)).astype(np.int8 if signed else np.uint8)
    scale = g.random(N).astype(np.float32) + 0.1
    zero = np.zeros(N) if signed else g.integers(3, 12, N).astype(np.float32)
    b, scales, zeros = nbits_weights(codes, scale, zero, block)
    blocks = -(-K // block)
    assert b.shape == (N, blocks, block // 2) and scales.shape == (N * blocks,)
    assert (zeros is None) == signed  # symmetric int4: the kernel's default zero point 8
    u, z = _unpack(b, zeros, N, K, blocks, block)
    expect = (codes.astype(np.float32) - zero[None, :]) * scale[None, :]  # [K, N], as DequantizeLinear axis 1
    got = ((u - z[:, None]) * scales.reshape(N, blocks)[:, :1]).T
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-6)

    # the node itself in onnxruntime, float compute: x @ W exactly as numpy
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(scales, "s")]
    names = ["a", "b", "s"]
    if zeros is not None:
        inits.append(numpy_helper.from_array(zeros, "z"))
        names.append("z")
    node = helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=K, N=N, bits=4,
                            block_size=block, accuracy_level=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, N])], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    x = g.standard_normal((3, K)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": x})[0]
    np.testing.assert_allclose(y, x @ expect, rtol=1e-5, atol=1e-4)


def _w4(keep_float=()):
    m, x = tiny_model("deit"), tiny_images("deit", 8)
    q = vitq.prepare(m, vitq.Scheme("matmul", 4, 8, keep_float=keep_float), method="minmax")
    vitq.calibrate(q, x, method="minmax", progress=False)
    with torch.no_grad():
        ref = q(x).numpy()
    return m, q, x, ref


def _linear_kernels(path):
    return [n for n in onnxruntime_kernels(str(path)) if n["groups"][0] in ("image", "linear_input")]


def test_weight_only_w4_runs_matmulnbits_and_matches_vitq(tmp_path):
    m, q, x, ref = _w4(WEIGHT_ONLY)
    n_linear = sum(isinstance(mod, torch.nn.Linear) for mod in m.modules()) + 1  # + the patch embedding
    info = export(q, tmp_path / "f.onnx", float_model=m, nbits="float")
    assert info["matmulnbits"] == n_linear and "MatMulNBits" in info["weight_storage"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "f.onnx")).graph.node]
    assert ops.count("MatMulNBits") == n_linear and "DequantizeLinear" not in ops
    linear = _linear_kernels(tmp_path / "f.onnx")
    assert len(linear) == n_linear and {k["op"] for k in linear} == {"MatMulNBits float"}
    assert not any(k["integer"] for k in linear)
    for optimize in (False, True):  # float compute: vitq's weight-only model up to float round-off
        np.testing.assert_allclose(run_ort(tmp_path / "f.onnx", x, optimize), ref, rtol=0, atol=1e-4)

    export(q, tmp_path / "i.onnx", float_model=m, nbits="int8")  # A quantized to int8 per block at run time
    linear = _linear_kernels(tmp_path / "i.onnx")
    assert {k["op"] for k in linear} == {"MatMulNBits int8"} and all(k["integer"] for k in linear)
    out = run_ort(tmp_path / "i.onnx", x)
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max() and np.abs(out - ref).max() > 1e-5
    plain = export(q, tmp_path / "p.onnx", float_model=m)  # the default form: INT4 DequantizeLinear -> MatMul
    assert plain["matmulnbits"] == 0 and info["file_bytes"] < 1.1 * plain["file_bytes"]


def test_w4a8_matmulnbits_takes_the_quantized_activation(tmp_path):
    m, q, x, ref = _w4()
    info = export(q, tmp_path / "m.onnx", float_model=m, nbits="float")
    linear = _linear_kernels(tmp_path / "m.onnx")
    assert info["matmulnbits"] == len(linear) and {k["op"] for k in linear} == {"MatMulNBits float"}
    # unoptimized: the QDQ pairs of the activations then MatMulNBits, exactly vitq's values
    np.testing.assert_allclose(run_ort(tmp_path / "m.onnx", x, optimize=False), ref, rtol=0, atol=1e-4)
    # without the rewrite onnxruntime dequantizes the INT4 weights before a float MatMul (no fusion)
    export(q, tmp_path / "p.onnx", float_model=m)
    assert not any(k["op"].startswith("MatMulNBits") for k in _linear_kernels(tmp_path / "p.onnx"))


def test_cli_target_onnxruntime_writes_matmulnbits_for_w4(tmp_path, capsys):
    from safetensors.torch import save_file

    from vitq.cli import main

    name, kw = TINY["deit"]
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model("deit").state_dict().items()}, str(weights))
    calib = make_image_folder(tmp_path / "calib", per_class=2, seed=1)
    state = tmp_path / "state"
    assert main(["quantize", "--model", name, "--model-args", json.dumps(kw), "--weights", str(weights),
                 "--calib", str(calib), "--scheme", "matmul", "--method", "minmax", "--w-bits", "4",
                 "--target", "onnxruntime", "--keep-float", ",".join(WEIGHT_ONLY), "--batch-size", "4",
                 "--num-workers", "0", "--quiet", "--out", str(state)]) == 0
    res = json.loads((state / "results.json").read_text())
    assert "MatMulNBits" in res["target_report"]["weights"]
    capsys.readouterr()
    args = ["export", "--model", name, "--weights", str(weights), "--state", str(state)]
    assert main([*args, "--out", str(tmp_path / "m.onnx"), "--target", "onnxruntime"]) == 0
    text = capsys.readouterr().out
    assert "linear weights as MatMulNBits" in text and "MatMulNBits float" in text
    assert main([*args, "--out", str(tmp_path / "m.xml"), "--format", "openvino", "--matmulnbits", "float"]) == 2
    assert "onnxruntime-only node" in capsys.readouterr().err and not (tmp_path / "m.xml").exists()

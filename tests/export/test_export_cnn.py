"""ONNX export of the CNN family: TensorFlow-'SAME' padding is in the graph (one Conv with the pads of the file's
input size), conv weights are stored as integer codes under both schemes (``fq``'s asymmetric uint8 codes with
per-channel zero points too, and a weight bias correction as a constant added to the dequantized weight), and
integer conv weights cannot saturate the int16 pair sums of x86 kernels without VNNI. The real
EfficientNet-Lite0 file agrees with vitq's fake-quantized model (``-m real``)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, tiny_images, tiny_model
from ort_helpers import cosine, run_ort

import vitq
from vitq.export.onnx import export
from vitq.quant.modules import QConv2d, QWeighted

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def calibrated(key, scheme, method="minmax", n=8, **kw):
    m, x = tiny_model(key), tiny_images(key, n)
    q = vitq.prepare(m, vitq.Scheme(scheme, **kw), method=method)
    vitq.calibrate(q, x, method=method, progress=False)
    return m, q, x


def weight_initializers(path):
    """{(shape): dtype name} of the integer initializers feeding a DequantizeLinear, and the float ones."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    ident = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}  # shared constants

    def source(name):
        while name in ident:
            name = ident[name]
        return name

    dq_inputs = {source(n.input[0]) for n in model.graph.node if n.op_type == "DequantizeLinear"}
    ints = [t for name, t in inits.items() if name in dq_inputs and t.data_type != onnx.TensorProto.FLOAT]
    floats = [t for t in inits.values() if t.data_type == onnx.TensorProto.FLOAT]
    return ints, floats


@pytest.mark.parametrize("size", [32, 35])
def test_same_padding_is_in_the_graph(tmp_path, size):
    """timm's Conv2dSame pads by the input size (odd totals: one more at the end); the file holds one Conv per
    layer with the pads of its static input size, and the file reproduces vitq up to round-off."""
    m, q, _ = calibrated("effnet", "matmul")
    same = [n for n, mod in q.named_modules() if type(mod).__name__ == "QConv2dSame"]
    assert len(same) >= 4
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(3))
    info = export(q, tmp_path / "m.onnx", float_model=m, example=x[:1])
    assert info["modules_own_forward"] == []  # every SAME conv rebuilt, none kept with a traced Pad subgraph
    model = onnx.load(str(tmp_path / "m.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "Pad" not in ops and "Ceil" not in ops
    pads = [tuple(a.ints) for n in model.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "pads"]
    # the stem, a stride-2 3x3 'SAME' conv: 32 px pads 0 at the start and 1 at the end, 35 px 1 and 1
    assert pads[0] == ((0, 0, 1, 1) if size == 32 else (1, 1, 1, 1))
    with torch.no_grad():
        ref = q(x).numpy()
    scale = np.abs(ref).max()
    # reference kernels: float round-off in another summation order flips a code now and then
    out = run_ort(tmp_path / "m.onnx", x, optimize=False)
    assert cosine(out, ref).min() > 0.999 and np.abs(out - ref).max() <= 0.05 * scale
    # onnxruntime's fused integer kernels (QLinearConv requantizes in integers: a code flips now and then, and a
    # random tiny network amplifies flips) stay close
    out = run_ort(tmp_path / "m.onnx", x)
    assert cosine(out, ref).min() > 0.99 and np.abs(out - ref).mean() <= 0.02 * scale


@pytest.mark.parametrize("key,scheme,method", [("resnet", "fq", "minmax"), ("resnet", "fq", "fqvit"),
                                                ("effnet", "fq", "fqvit"), ("resnet", "matmul", "minmax")])
def test_conv_weights_are_integer_codes_in_both_schemes(tmp_path, key, scheme, method):
    """fq conv weights (uint8, per-channel zero points; fqvit adds a weight bias correction) are stored as codes:
    no float initializer as large as a conv weight, and a file about a byte per weight."""
    m, q, x = calibrated(key, scheme, method)
    info = export(q, tmp_path / "m.onnx", float_model=m, example=x[:1])
    convs = {n: mod for n, mod in q.named_modules() if isinstance(mod, QConv2d)}
    assert not any(f"{n}.weight_quant" in info["quantizers_float"] for n in convs)
    ints, floats = weight_initializers(tmp_path / "m.onnx")
    int_shapes = [tuple(t.dims) for t in ints]
    for mod in convs.values():  # a 1x1 stride-1 conv is a MatMul over pixels: stored [in, out]
        o, i, kh, kw = mod.weight.shape
        assert tuple(mod.weight.shape) in int_shapes or (kh * kw == 1 and (i, o) in int_shapes)
    assert all(t.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8) for t in ints)
    biggest_float = max(int(np.prod(t.dims)) for t in floats)
    assert biggest_float < min(mod.weight.numel() for mod in convs.values() if mod.weight.numel() > 1000)
    n_weights = sum(mod.weight.numel() for mod in q.modules() if isinstance(mod, QWeighted))
    assert info["file_bytes"] < 1.3 * n_weights + 4 * sum(int(np.prod(t.dims)) for t in floats) + 30_000
    with torch.no_grad():
        ref = q(x).numpy()
    out = run_ort(tmp_path / "m.onnx", x, optimize=False)
    assert cosine(out, ref).min() > 0.999 and np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()
    out = run_ort(tmp_path / "m.onnx", x)
    assert cosine(out, ref).min() > 0.99


def test_integer_conv_weights_cannot_saturate(tmp_path):
    """Signed conv weight codes beyond [-64, 63] go as uint8 shifted by 128 (zero point 128), as a MatMul's
    second input does: onnxruntime's QLinearConv (uint8 x int8) saturates int16 pair sums on x86 without VNNI
    (the tiny EfficientNet's stem, input zero point 131, was off by up to 1.02 on outputs of range 3.09)."""
    m, q, x = calibrated("effnet", "matmul")
    export(q, tmp_path / "m.onnx", float_model=m, example=x[:1])
    ints, _ = weight_initializers(tmp_path / "m.onnx")
    for t in ints:
        arr = numpy_helper.to_array(t)
        assert t.data_type == onnx.TensorProto.UINT8 or (arr.min() >= -64 and arr.max() <= 63)
    stem = onnx.load(str(tmp_path / "m.onnx"))
    assert any(n.op_type == "Conv" for n in stem.graph.node)
    # the stem alone in the fused kernels: at most one code of its output quantizer off
    sub = torch.nn.Sequential(q.conv_stem, q.bn1, q.blocks[0][0].conv_dw.input_quant)
    x224 = tiny_images("effnet", 2)
    export(sub, tmp_path / "stem.onnx", float_model=m, example=x224[:1])
    with torch.no_grad():
        ref = sub(x224).numpy()
    step = float(q.blocks[0][0].conv_dw.input_quant.scale)
    assert np.abs(run_ort(tmp_path / "stem.onnx", x224) - ref).max() <= step * 1.01


# ----------------------------------------------------------------------------------------------- real model
REAL = Path(os.environ.get("VITQ_SHARED", SHARED))  # as benchmarks/common.py: ../shared unless set
WEIGHTS = REAL / "models" / "tf_efficientnet_lite0.safetensors"
VAL = REAL / "data" / "imagenet-sample" / "val"
CALIB = REAL / "data" / "imagenet-sample" / "calib"


@pytest.mark.real
@pytest.mark.skipif(not WEIGHTS.exists(), reason="../shared lacks EfficientNet-Lite0")
@pytest.mark.parametrize("scheme", ["matmul", "fq"])
def test_real_efficientnet_lite0_file_agrees_with_vitq(tmp_path, scheme):
    """The README's CNN example (224 px, 'SAME' padding in the stem and every stride-2 depthwise conv):
    W8A8 minmax on 16 calibration images, the file on 16 val images. Bounds: onnxruntime's reference
    kernels compute the same codes up to float summation order, so logits agree to within a few code flips
    (cosine > 0.999); the fused integer kernels requantize each layer in integers, flipping more codes, yet
    the logits keep cosine > 0.99 and the same top-1 where the top-2 margin exceeds the difference. (The
    file without the padding agreed at cosine 0.81, issue 22.)"""
    from vitq.data import model_transform, read_images, scan_image_folder, select_records
    from vitq.models import create_model

    m = create_model("tf_efficientnet_lite0", weights=str(WEIGHTS))
    t, _ = model_transform(m)
    xc, _, _ = read_images(select_records(scan_image_folder(CALIB, labels="folder"), 16, 0), t)
    xv, _, _ = read_images(select_records(scan_image_folder(VAL), 16, 0), t)
    q = vitq.prepare(m, vitq.Scheme(scheme), method="minmax")
    vitq.calibrate(q, xc, method="minmax", progress=False)
    export(q, tmp_path / "m.onnx", float_model=m)
    with torch.no_grad():
        ref = q(xv).numpy()
    for optimize, bound in ((False, 0.999), (True, 0.99)):
        out = run_ort(tmp_path / "m.onnx", xv, optimize=optimize)
        assert cosine(out, ref).min() > bound, (optimize, cosine(out, ref).min())
        top2 = np.sort(ref, 1)[:, -2:]
        decided = (top2[:, 1] - top2[:, 0]) > 2 * np.abs(out - ref).max(1)
        assert (out.argmax(1) == ref.argmax(1))[decided].all()

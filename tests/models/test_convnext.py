"""timm ConvNeXt (family timm-convnext): every convolution (depthwise included) and linear quantized, LayerNorm
inputs (channels-first LayerNorm2d too) and the residual stream quantized under fq, units for block-wise
methods, and the exported file reproducing vitq's model."""

import pytest
import torch
import torch.nn.functional as F
from zoo import tiny_images, tiny_model

import vitq
from vitq.models.convnext import QLayerNorm2d
from vitq.models.trunk import Trunk
from vitq.quant.base import quantizers_of
from vitq.quant.modules import QConv2d, QLayerNorm, QLinear

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ("convnext", "convnext_convmlp")  # MLP as Linear on channels-last / as 1x1 convolutions


def cosine(a, b) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("key", KEYS)
def test_every_weight_and_norm_input_quantized(key):
    model = tiny_model(key)
    qmodel = vitq.prepare(model, vitq.Scheme("fq"))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(isinstance(m, QConv2d) for m in qmodel.modules()) == len(convs)
    assert sum(isinstance(m, QLinear) for m in qmodel.modules()) == sum(
        isinstance(m, torch.nn.Linear) for m in model.modules())
    norms = [m for m in qmodel.modules() if isinstance(m, (QLayerNorm, QLayerNorm2d))]
    assert len(norms) == sum(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert qmodel.stem[0].input_quant.role == "image"
    assert any(m.groups > 1 for m in qmodel.modules() if isinstance(m, QConv2d))  # the depthwise ones


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("regime,floor", [("matmul", 0.999), ("fq", 0.998)])
def test_convnext_end_to_end(tmp_path, key, regime, floor):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = tiny_model(key)
    x = tiny_images(key, 16, seed=1)
    qmodel, _ = vitq.quantize(model, x[:8], regime, "minmax", batch_size=8, progress=False, w_bits=8, a_bits=8)
    assert all(bool(q.initialized) for q in quantizers_of(qmodel).values())
    with torch.no_grad():
        out, ref = qmodel(x), model(x)
    assert cosine(out, ref) > floor  # measured: matmul 0.9997 / 0.9996, fq 0.9989 / 0.9991
    (tmp_path / "state").mkdir()
    vitq.save(qmodel, tmp_path / "state")
    again = vitq.load(model, tmp_path / "state")
    with torch.no_grad():
        assert torch.equal(again(x), out)
    info = vitq.export(again, tmp_path / "m.onnx", float_model=model, example=x[:2])  # timm says 224: any size works
    # under fq the depthwise convolutions' uint weights go into the file as float (an export limitation of issue
    # 22 for every CNN, handled in vitq.export); nothing else may
    assert all(n.endswith("conv_dw.weight_quant") for n in info["quantizers_float"]) and (
        regime == "fq" or not info["quantizers_float"])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = torch.from_numpy(ort.InferenceSession(str(tmp_path / "m.onnx"), so, providers=["CPUExecutionProvider"])
                           .run(None, {"input": x.numpy()})[0])
    assert cosine(got, out) > 0.999 and (got - out).abs().max() <= 0.05 * out.abs().max()


def test_convnext_units_are_downsamples_and_blocks():
    model = tiny_model("convnext")
    x = tiny_images("convnext", 4, seed=1)
    qmodel, _ = vitq.quantize(model, x, "fq", "minmax", batch_size=4, progress=False)
    trunk = Trunk(qmodel)
    names = [n for n, _ in trunk.units]
    assert names[0] == "stages.0.blocks.0" and "stages.1.downsample" in names and len(trunk.blocks()) == 5
    with torch.no_grad():
        assert torch.equal(trunk.forward_from(0, trunk.stem(x)), qmodel(x))
        assert torch.equal(trunk.forward_from(3, trunk.input_of(3, x)), qmodel(x))

"""Cross-layer equalization (``--method cle``) and empirical bias correction (``--refine biascorr``) on tiny CNNs."""

import pytest
import torch
from conftest import tiny_images, tiny_model

import vitq
from vitq.errors import VitqError
from vitq.methods.equalize import equalize
from vitq.quant.base import passthrough
from vitq.quant.modules import QConv2d
from vitq.scheme import Scheme

pytestmark = pytest.mark.usefixtures("one_thread")


def _balanced(q, pair):
    """Fraction of channels of a pair a -> b (a depthwise, b 1x1) whose ranges are equal: r_a,c = r_b,c."""
    a_name, b_name = pair.split(" -> ")
    a, b = q.get_submodule(a_name), q.get_submodule(b_name)
    ra = a.weight.detach().abs().amax((1, 2, 3))
    rb = b.weight.detach().abs().amax((0, 2, 3))
    return float(((ra - rb).abs() <= 1e-4 * ra).double().mean())


def test_cle_keeps_the_float_model_and_evens_the_ranges():
    model, x = tiny_model("effnet"), tiny_images("effnet", 8)
    q = vitq.prepare(model, Scheme("matmul", 4, 8))
    with torch.no_grad():
        ref = model(x)
    info = equalize(q, vitq.api.as_calib(x, 8, "cpu", 0, False))
    acts = {p["activation"] for p in info["pairs"]}
    assert len(info["pairs"]) > 10 and acts <= {"relu6", "relu", "identity"} and "relu6" in acts
    with torch.no_grad(), passthrough(q):
        after = q(x)
    assert float((after - ref).abs().max()) <= 1e-3 * float(ref.abs().max())
    # the last pair of each block (depthwise -> 1x1) is left with equal ranges r_a,c = r_b,c, except the
    # channels whose ReLU6 clip bounds the scale
    last = [p["pair"] for p in info["pairs"] if p["pair"].endswith("conv_pwl")]
    assert last and min(_balanced(q, p) for p in last) > 0.5


def test_cle_skips_hardswish_pairs_and_resnet_pairs_are_relu():
    model, x = tiny_model("mbv3"), tiny_images("mbv3", 4)
    q = vitq.prepare(model, Scheme("matmul", 8, 8))
    info = equalize(q, vitq.api.as_calib(x, 4, "cpu", 0, False))
    # blocks 2-4 of MobileNetV3-Small: Hardswish after conv_pw and conv_dw, so no pair there but the
    # squeeze-excite's own conv_reduce -> ReLU -> conv_expand; blocks 0-1 use ReLU (read as ReLU6 when no value
    # reaches 6: the cautious reading)
    paired = {p["pair"] for p in info["pairs"]}
    assert "blocks.1.0.conv_pw -> blocks.1.0.conv_dw" in paired
    assert "blocks.2.0.conv_pw -> blocks.2.0.conv_dw" not in paired
    assert any(p["pair"] == "blocks.2.0.conv_pw -> blocks.2.0.conv_dw" for p in info["not_equalized"])
    assert not any("conv_dw -> " in p and "se.conv_reduce" in p for p in paired)  # pooled: not elementwise
    model, x = tiny_model("resnet"), tiny_images("resnet", 4)
    q = vitq.prepare(model, Scheme("matmul", 8, 8))
    info = equalize(q, vitq.api.as_calib(x, 4, "cpu", 0, False))
    assert info["pairs"] and {p["activation"] for p in info["pairs"]} == {"relu"}
    assert not any("downsample" in p["pair"] for p in info["pairs"])


def test_cle_method_calibrates_with_its_base_and_refuses_itself():
    model, x = tiny_model("effnet"), tiny_images("effnet", 8)
    q, rec = vitq.quantize(model, x, "matmul", method="cle", options={"base": "percentile"}, w_bits=4, a_bits=8,
                           progress=False)
    cal = rec["calibration"]
    assert cal["base"] == "percentile" and cal["activations"] == "percentile" and cal["equalization"]["pairs"]
    assert all(bool(m.weight_quant.initialized) for m in q.modules() if isinstance(m, QConv2d))
    with pytest.raises(VitqError, match="base"):
        vitq.quantize(model, x, "matmul", method="cle", options={"base": "cle"}, progress=False)


def _err(q, model, x):
    with torch.no_grad():
        return float((q(x) - model(x)).pow(2).mean())


def test_bias_correction_removes_the_mean_shift_and_lowers_the_error(tmp_path):
    model, x = tiny_model("effnet"), tiny_images("effnet", 8)
    q, _ = vitq.quantize(model, x, "matmul", method="minmax", w_bits=4, a_bits=8, progress=False)
    before = _err(q, model, x)
    info = vitq.refine(q, model, x, "biascorr", progress=False)
    assert info["layers_corrected"] == sum(isinstance(m, QConv2d) for m in q.modules()) + 1  # + classifier
    assert _err(q, model, x) < before
    # the last layer's mean output per class now equals the float one on these images
    with torch.no_grad():
        gap = (q(x).mean(0) - model(x).mean(0)).abs().max()
    assert float(gap) < 1e-3
    vitq.save(q, tmp_path)
    with torch.no_grad():
        assert torch.equal(vitq.load(model, tmp_path)(x), q(x))


def test_bias_correction_on_a_vit():
    model, x = tiny_model("deit"), tiny_images("deit", 8)
    q, _ = vitq.quantize(model, x, "matmul", method="minmax", w_bits=3, a_bits=8, progress=False)
    before = _err(q, model, x)
    info = vitq.refine(q, model, x, "biascorr", progress=False)
    assert info["layers_corrected"] == 10  # patch embedding, 2 x (qkv, proj, fc1, fc2), head
    assert _err(q, model, x) < before


def test_cle_keeps_relu6_exact_where_channels_reach_the_clip():
    model, x = tiny_model("effnet"), tiny_images("effnet", 8)
    with torch.no_grad():  # blocks.1: expansion outputs far above 6, so many channels saturate in ReLU6
        for name, m in model.named_modules():
            if name.startswith("blocks.1") and name.endswith("conv_pw"):
                m.weight.mul_(30)
        ref = model(x)
    q = vitq.prepare(model, Scheme("matmul", 4, 8))
    info = equalize(q, vitq.api.as_calib(x, 8, "cpu", 0, False))
    assert any(p["pair"].startswith("blocks.1.0.conv_pw") and p["activation"] == "relu6" for p in info["pairs"])
    with torch.no_grad(), passthrough(q):
        assert float((q(x) - ref).abs().max()) <= 1e-3 * float(ref.abs().max())

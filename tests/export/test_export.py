"""ONNX QDQ export: onnxruntime reproduces vitq's fake-quantized models, the file stores the quantizers' integer
codes, and the command line refuses bad input with one line."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import TINY, make_image_folder, tiny_images, tiny_model
from ort_helpers import run_ort
from torch import nn

import vitq
from vitq.errors import VitqError
from vitq.export.forms import export_module, weight_codes
from vitq.export.onnx import export, to_onnx
from vitq.quant.base import QUANTIZER_KINDS, make_quantizer
from vitq.quant.modules import QConv2d, QLinear
from vitq.quant.uniform import PTFQuantizer, UniformQuantizer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402


def same_top1_where_decided(out, ref):
    """Top-1 must match on every image whose top-2 margin exceeds twice its largest logit difference (a nearer
    tie may flip by round-off)."""
    top2 = np.sort(ref, 1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2 * np.abs(out - ref).max(1)
    assert decided.mean() >= 0.5 and (out.argmax(1) == ref.argmax(1))[decided].all()


def calibrated(family, scheme, method="minmax", n=8, **kw):
    m = tiny_model(family)
    x = tiny_images(family, n)
    q = vitq.prepare(m, vitq.Scheme(scheme, **kw), method=method)
    vitq.calibrate(q, x, method=method, progress=False)
    return m, q, x


# ----------------------------------------------------------------------------------------------- one quantizer
def _export_one(quantizer, x, path, opset=21):
    emodel, plan = export_module(nn.Sequential(quantizer), opset)
    to_onnx(emodel, x, str(path), opset)
    return plan


@pytest.mark.parametrize("signed,bits,axis", [(False, 8, None), (True, 8, None), (False, 4, None), (True, 6, None),
                                              (False, 8, 1), (True, 5, 1)])
def test_uniform_quantizer_is_an_exact_qdq_pair(tmp_path, signed, bits, axis):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 4, 5, 6, generator=g) * 3
    q = UniformQuantizer(bits, "linear_input", signed=signed, channel_axis=axis, num_channels=4 if axis else 1)
    lo, hi = torch.full(q.scale.shape, -2.5), torch.linspace(1.0, 4.0, q.scale.numel()).reshape(q.scale.shape)
    q.set_range(lo, hi)
    plan = _export_one(q, x, tmp_path / "q.onnx")
    assert plan.how == {"0": "qdq"}
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    expect = q(x).numpy()
    for optimize in (False, True):
        np.testing.assert_allclose(run_ort(tmp_path / "q.onnx", x, optimize), expect, rtol=0, atol=1e-6)


def test_ptf_quantizer_is_a_per_channel_qdq_pair(tmp_path):
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 4, 16)
    q = PTFQuantizer(8, "norm_input", num_channels=16)
    q.set_range(x.min(), x.max(), channel_min=x.amin((0, 1)), channel_max=x.amax((0, 1)))
    assert int(q.shift.max()) > 0  # several channel scales
    plan = _export_one(q, x, tmp_path / "p.onnx")
    assert plan.how == {"0": "qdq"}
    np.testing.assert_allclose(run_ort(tmp_path / "p.onnx", x), q(x).numpy(), rtol=0, atol=1e-6)


def _plain_kinds():
    """Registered kinds that are built from (bits, role) alone (any kind a method adds later included)."""
    kinds = []
    for kind in sorted(QUANTIZER_KINDS):
        try:
            make_quantizer(kind, 8, "softmax")
        except TypeError:
            continue
        if kind not in ("base", "uniform", "float"):  # float: never initialized, exported as nothing (test_targets)
            kinds.append(kind)
    return kinds


@pytest.mark.parametrize("kind", _plain_kinds())
def test_kinds_without_qdq_form_export_their_exact_float_fake_quant(tmp_path, kind):
    x = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(1)) ** 3  # softmax-like values in [0, 1)
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.5])
    q = make_quantizer(kind, 4, "softmax")
    if hasattr(q, "set_range"):
        q.set_range(x.min(), x.max())
    q.mark_initialized()
    plan = _export_one(q, x, tmp_path / "k.onnx")
    assert plan.how == {"0": "float"}
    np.testing.assert_allclose(run_ort(tmp_path / "k.onnx", x), q(x).numpy(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------- whole models
CONFIGS = {
    "matmul-w8a8": ("deit", "matmul", "minmax", dict(w_bits=8, a_bits=8)),
    "fq-w8a8-fqvit": ("deit", "fq", "fqvit", dict(w_bits=8, a_bits=8)),  # PTF, uint weights, bias correction
    "matmul-w4a4": ("deit", "matmul", "minmax", dict(w_bits=4, a_bits=4)),  # INT4 weights, narrow activations
    "matmul-w6a6-head": ("vit", "matmul", "omse", dict(w_bits=6, a_bits=6, attn_granularity="head")),
    "swin-fq-w4a8": ("swin", "fq", "minmax", dict(w_bits=4, a_bits=8)),
    **{f"softmax-{k}": ("deit", "matmul", "minmax", dict(softmax_quantizer=k)) for k in ("log2", "twin", "mpq")},
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_model_matches_fake_quant_in_onnxruntime(tmp_path, config):
    family, scheme, method, kw = CONFIGS[config]
    m, q, x = calibrated(family, scheme, method, **kw)
    info = export(q, tmp_path / "m.onnx", float_model=m)
    with torch.no_grad():
        ref = q(x).numpy()
    scale = np.abs(ref).max()
    # onnxruntime's reference QDQ kernels (ONNX semantics): the same up to round-off (float sums in another
    # order may move a value across a rounding boundary now and then)
    out = run_ort(tmp_path / "m.onnx", x, optimize=False)
    diff = np.abs(out - ref)
    assert diff.max() <= 0.05 * scale and diff.mean() <= 0.005 * scale, (config, diff.max(), diff.mean(), scale)
    same_top1_where_decided(out, ref)
    # its fused integer kernels: QLinearSoftmax (fq) computes exp from a lookup table and rounds on its own, so
    # attention probabilities move by a code now and then (a random tiny model is sensitive to that)
    out = run_ort(tmp_path / "m.onnx", x, optimize=True)
    diff = np.abs(out - ref)
    assert diff.max() <= 0.25 * scale and diff.mean() <= 0.05 * scale, (config, diff.max(), diff.mean(), scale)
    same_top1_where_decided(out, ref)
    # dynamic batch
    assert run_ort(tmp_path / "m.onnx", x[:3]).shape == (3, ref.shape[1])
    kinds = {type(qq).kind for n, qq in vitq.quant.base.quantizers_of(q).items() if n in info["quantizers_float"]}
    assert kinds == set(info["float_kinds"])
    side = json.loads((tmp_path / "m.preprocess.json").read_text())
    assert {"resize", "crop", "mean", "std", "interpolation"} <= set(side["preprocessing"])
    assert side["preprocessing"]["crop"] == [TINY[family][1]["img_size"]] * 2


def _dq_weights(path):
    """(codes, scale, zero) of every DequantizeLinear that reads a constant (through Identity nodes)."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    ident = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}

    def const(name):
        while name in ident:
            name = ident[name]
        return inits.get(name)

    out = []
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and const(n.input[0]) is not None:
            t = const(n.input[0])
            out.append((t.data_type, np.asarray(numpy_helper.to_array(t)).astype(np.int32),
                        numpy_helper.to_array(const(n.input[1])), np.asarray(numpy_helper.to_array(
                            const(n.input[2]))).astype(np.int32)))
    return out


@pytest.mark.parametrize("w_bits,opset,int4", [(8, 21, True), (4, 21, True), (4, 20, True), (3, 21, False),
                                                (6, 21, True)])
def test_file_holds_the_quantizers_integer_codes(tmp_path, w_bits, opset, int4):
    m, q, x = calibrated("deit", "matmul", w_bits=w_bits, a_bits=8)
    info = export(q, tmp_path / "m.onnx", opset=opset, int4=int4, float_model=m)
    stored = _dq_weights(tmp_path / "m.onnx")
    use_int4 = w_bits <= 4 and opset >= 21 and int4
    # signed codes wider than 7 bits go as uint8 shifted by 128, zero point alike (a MatMul's second input: see
    # test_matmul_second_inputs_cannot_saturate)
    shift = 128 if w_bits == 8 else 0
    expect_type = onnx.TensorProto.INT4 if use_int4 else onnx.TensorProto.UINT8 if shift else onnx.TensorProto.INT8
    weighted = [mod for mod in q.modules() if isinstance(mod, (QLinear, QConv2d))]
    assert len(stored) == len(weighted) and info["int4_weight_tensors"] == (len(weighted) if use_int4 else 0)
    for mod in weighted:
        codes = weight_codes(mod.weight_quant, mod.weight.detach()).to(torch.int32)
        expect = codes.reshape(codes.shape[0], -1).t().numpy() + shift  # stored as [in, out] for the MatMul
        hits = [s for s in stored if s[1].shape == expect.shape and np.array_equal(s[1], expect)]
        assert len(hits) == 1
        dtype, stored_codes, scale, zero = hits[0]
        assert dtype == expect_type
        lo, hi = mod.weight_quant.qmin + shift, mod.weight_quant.qmax + shift
        assert stored_codes.min() >= lo and stored_codes.max() <= hi
        np.testing.assert_array_equal(scale, mod.weight_quant.scale.numpy())
        np.testing.assert_array_equal(zero, mod.weight_quant.zero_point.numpy().astype(np.int32) + shift)
    # the file is small: about one byte (or half) per quantized weight, besides the float parameters (biases,
    # norms, embeddings) and the per-channel scales
    n_weights = sum(mod.weight.numel() for mod in weighted)
    float_bytes = 4 * (sum(p.numel() for p in q.parameters()) - n_weights)
    assert os.path.getsize(tmp_path / "m.onnx") < n_weights * (0.55 if use_int4 else 1.05) + float_bytes + 30_000


def _const_or_producer(model, name):
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    while name in producer and producer[name].op_type == "Identity":
        name = producer[name].input[0]
    return inits.get(name), producer.get(name)


@pytest.mark.parametrize("config", ["matmul-w8a8", "fq-w8a8-fqvit", "matmul-w6a6-head", "swin-fq-w4a8"])
def test_matmul_second_inputs_cannot_saturate(tmp_path, config):
    """x86 CPUs without VNNI run onnxruntime's and OpenVINO's integer MatMuls with int16 pair sums that saturate
    for int8 second-operand codes beyond [-64, 63] (a wrong result, not an error): every quantized MatMul's second
    input must be uint8 codes or signed codes of at most 7 bits."""
    family, scheme, method, kw = CONFIGS[config]
    m, q, x = calibrated(family, scheme, method, **kw)
    export(q, tmp_path / "m.onnx", float_model=m)
    model = onnx.load(str(tmp_path / "m.onnx"))
    checked = 0
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        _, dq = _const_or_producer(model, node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        codes, q_node = _const_or_producer(model, dq.input[0])
        if codes is not None:  # stored weight codes
            arr = numpy_helper.to_array(codes)
            ok = codes.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.UINT4, onnx.TensorProto.INT4) or (
                arr.min() >= -64 and arr.max() <= 63)
        else:  # an activation QuantizeLinear: its zero point's type is the code type; signed ones of fewer than
            # 8 bits are clipped to their range first
            zero, _ = _const_or_producer(model, q_node.input[2])
            _, clip = _const_or_producer(model, q_node.input[0])
            ok = zero.data_type == onnx.TensorProto.UINT8 or (clip is not None and clip.op_type in ("Clip", "Min"))
        assert ok, (config, node.name, dq.name)
        checked += 1
    assert checked > 0


def test_layers_with_a_forward_of_their_own_keep_it_and_match(tmp_path):
    """A weighted layer or attention whose computation export does not rebuild (a subclass with its own
    forward / core) keeps its forward with its quantizers in their export forms: the same values, and named."""
    from vitq.quant.modules import QAttentionBase

    m, q, x = calibrated("deit", "matmul", w_bits=8, a_bits=8)
    attn, fc = q.blocks[0].attn, q.blocks[1].mlp.fc1
    attn.__class__ = type("OwnCore", (type(attn),), {"_qkv": lambda self, x: QAttentionBase._qkv(self, x)})
    fc.__class__ = type("OwnLinear", (QLinear,), {"forward": lambda self, x: QLinear.forward(self, x) + 0.0})
    with torch.no_grad():
        fc.weight_correction.fill_(True)
        ref = q(x).numpy()
    info = export(q, tmp_path / "m.onnx", float_model=m)
    assert info["modules_own_forward"] == ["blocks.0.attn (OwnCore)", "blocks.1.mlp.fc1 (OwnLinear)"]
    assert "blocks.1.mlp.fc1.weight_quant" in info["quantizers_float"]
    out = run_ort(tmp_path / "m.onnx", x, optimize=False)
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() <= 0.05 * scale and np.abs(out - ref).mean() <= 0.005 * scale
    same_top1_where_decided(out, ref)


def test_opset_too_old_names_the_quantizers(tmp_path):
    m, q, x = calibrated("deit", "matmul")
    with pytest.raises(VitqError, match=r"not exportable at opset 12: .*weight_quant"):
        export(q, tmp_path / "m.onnx", opset=12, float_model=m)
    assert os.listdir(tmp_path) == []


def test_existing_output_refused_and_nothing_half_written(tmp_path, monkeypatch):
    m, q, x = calibrated("deit", "matmul")
    path = tmp_path / "sub" / "m.onnx"
    export(q, path, float_model=m)
    before = path.read_bytes()
    with pytest.raises(VitqError, match="already exists"):
        export(q, path, float_model=m)

    def broken(*a, **k):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(sys.modules["vitq.export.onnx"], "to_onnx", broken)  # vitq.export.onnx is also the function
    with pytest.raises(RuntimeError):
        export(q, path, overwrite=True, float_model=m)
    assert path.read_bytes() == before and sorted(os.listdir(path.parent)) == ["m.onnx", "m.preprocess.json"]
    with pytest.raises(RuntimeError):
        export(q, tmp_path / "new" / "m.onnx", float_model=m)
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_export_from_saved_state_and_check(tmp_path, capsys):
    from safetensors.torch import save_file

    from vitq.cli import main

    name, kw = TINY["deit"]
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model("deit").state_dict().items()}, str(weights))
    calib = make_image_folder(tmp_path / "calib", per_class=2, seed=1)
    val = make_image_folder(tmp_path / "val", per_class=2, seed=2)
    state = tmp_path / "state"
    assert main(["quantize", "--model", name, "--model-args", json.dumps(kw), "--weights", str(weights),
                 "--calib", str(calib), "--scheme", "matmul", "--method", "minmax", "--softmax-quantizer", "log2",
                 "--batch-size", "4", "--num-workers", "0", "--quiet", "--out", str(state)]) == 0
    capsys.readouterr()
    out = tmp_path / "m.onnx"
    args = ["export", "--model", name, "--weights", str(weights), "--state", str(state), "--out", str(out)]
    assert main([*args, "--check", "--val", str(val), "--batch-size", "4", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "log2" in text and "float operations" in text and "blocks.0.attn.softmax_quant" in text
    assert "agreement with float" in text and "fake-quantized model 100.00 %" in text
    assert out.exists() and (tmp_path / "m.preprocess.json").exists()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--opset", "11"]) == 2
    assert "not exportable at opset 11" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--check"]) == 2
    assert "--check needs --val" in capsys.readouterr().err


@pytest.mark.parametrize("scheme,method", [
    ("matmul", "minmax"),
    pytest.param("fq", "fqvit", marks=pytest.mark.xfail(
        reason="known defect (issue 12): OpenVINO runs the fq graph (PTF division/QDQ/multiply) with errors of "
               "about 4 % of the logit range; onnxruntime matches vitq", strict=False)),
])
def test_openvino_runs_the_export(tmp_path, scheme, method):
    pytest.importorskip("openvino")
    from vitq.export.runtimes import Runner

    m, q, x = calibrated("deit", scheme, method)
    export(q, tmp_path / "m.onnx", float_model=m)
    out = Runner(str(tmp_path / "m.onnx"), "openvino")(x)
    with torch.no_grad():
        ref = q(x).numpy()
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.85
    assert np.abs(out - ref).mean() <= 0.02 * np.abs(ref).max()

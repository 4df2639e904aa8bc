"""``vitq export --format openvino``: OpenVINO IR (.xml/.bin) converted by OpenVINO from the QDQ ONNX file, running
as vitq's fake-quantized model does, and the command line around it (targets, --check, refusals)."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY, make_image_folder
from zoo import tiny_images, tiny_model

import vitq
from vitq.errors import VitqError

pytest.importorskip("onnx")
ov = pytest.importorskip("openvino")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_ir_runs_like_the_fake_quantized_model_and_like_its_onnx(tmp_path):
    from vitq.export import export
    from vitq.export.openvino_ir import export_openvino
    from vitq.export.runtimes import Runner

    m, x = tiny_model("deit"), tiny_images("deit", 16)
    q, _ = vitq.quantize(m, x[:8], vitq.Scheme("matmul", target="openvino"), "minmax", progress=False)
    info = export_openvino(q, tmp_path / "m.xml", float_model=m)
    assert (tmp_path / "m.xml").exists() and (tmp_path / "m.bin").exists()
    assert json.loads((tmp_path / "m.preprocess.json").read_text())["export"]["format"].startswith("openvino")
    float_bytes = 4 * sum(p.numel() for p in m.parameters())
    assert (tmp_path / "m.bin").stat().st_size < 0.4 * float_bytes  # the weights stay 8-bit codes in the IR
    assert info["file_bytes"] == (tmp_path / "m.bin").stat().st_size + (tmp_path / "m.xml").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.preprocess.json", "m.xml"]  # no leftovers
    ir = Runner(str(tmp_path / "m.xml"), "openvino")(x)
    (tmp_path / "onnx").mkdir()
    export(q, tmp_path / "onnx" / "m.onnx", float_model=m)
    via_onnx = Runner(str(tmp_path / "onnx" / "m.onnx"), "openvino")(x)
    # the same graph up to OpenVINO's conversion-time rewrites (a last-bit change may move one activation code)
    assert np.abs(ir - via_onnx).mean() <= 5e-3 * np.abs(via_onnx).max()
    assert (ir.argmax(1) == via_onnx.argmax(1)).mean() >= 0.9
    with torch.no_grad():
        ref = q(x).numpy()
    assert (ir.argmax(1) == ref.argmax(1)).mean() >= 0.85
    assert np.abs(ir - ref).mean() <= 0.02 * np.abs(ref).max()
    with pytest.raises(VitqError, match="ending in .xml"):
        export_openvino(q, tmp_path / "m.onnx", float_model=m)
    with pytest.raises(VitqError, match="already exists"):
        export_openvino(q, tmp_path / "m.xml", float_model=m)


def test_cli_quantize_for_a_target_then_export_ir_and_check(tmp_path, capsys):
    from safetensors.torch import save_file

    from vitq.cli import main

    name, kw = TINY["deit"]
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model("deit").state_dict().items()}, str(weights))
    calib = make_image_folder(tmp_path / "calib", per_class=2, seed=1)
    val = make_image_folder(tmp_path / "val", per_class=2, seed=2)
    state = tmp_path / "state"
    assert main(["quantize", "--model", name, "--model-args", json.dumps(kw), "--weights", str(weights),
                 "--calib", str(calib), "--method", "minmax", "--target", "openvino", "--batch-size", "4",
                 "--num-workers", "0", "--quiet", "--out", str(state)]) == 0
    res = json.loads((state / "results.json").read_text())
    assert res["scheme_config"]["target"] == "openvino" and res["target_report"]["float"]
    capsys.readouterr()
    args = ["export", "--model", name, "--weights", str(weights), "--state", str(state)]
    assert main([*args, "--out", str(tmp_path / "m.xml"), "--format", "openvino", "--target", "openvino",
                 "--check", "--val", str(val), "--batch-size", "4", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "kernels openvino runs: " in text and "linear_input: 9/9 integer" in text and "qk: 2/2 integer" in text
    assert "openvino on 6 images" in text and "fake-quantized model 100.00 %" in text
    assert main([*args, "--out", str(tmp_path / "n.xml"), "--format", "openvino", "--runtime", "onnxruntime"]) == 2
    assert "cannot run" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "n.onnx"), "--target", "onnxruntime"]) == 2
    assert "quantized for --target openvino" in capsys.readouterr().err

"""Deployment targets: what prepare builds under each one, and whether the kernels each target declares are the
kernels its runtime actually runs (onnxruntime's optimized graph, OpenVINO's compiled graph) on a tiny DeiT."""

import pytest
import torch
from zoo import tiny_images, tiny_model

import vitq
from vitq.errors import VitqError
from vitq.prepare import prepare, target_groups
from vitq.quant.base import quantizers_of
from vitq.quant.keep_float import KeptFloat
from vitq.recipes import choose
from vitq.scheme import Scheme
from vitq.state import load, save
from vitq.targets import GROUPS, TARGETS, get_target

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_target_declares_every_group_once():
    for t in TARGETS.values():
        assert set(t.integer) | set(t.floating) == set(GROUPS)
        assert not set(t.integer) & set(t.floating)
    with pytest.raises(VitqError, match="unknown target 'tflite'"):
        Scheme("matmul", target="tflite")
    with pytest.raises(VitqError, match="keep_float group 'softmax'"):
        Scheme("matmul", keep_float=("softmax",))


@pytest.mark.parametrize("target", list(TARGETS))
def test_prepare_builds_only_what_the_target_runs_as_integer(target):
    t = get_target(target)
    q = prepare(tiny_model("deit"), Scheme("fq", target=target, softmax_quantizer="uniform"))
    counts = target_groups(q)
    for g in GROUPS:
        if g in t.floating:
            assert counts[g] == 0, (target, g)
    assert counts["linear_input"] > 0 and counts["weight"] > 0
    report = q.vitq_target_report
    assert report["target"] == target
    float_names = {n for names in report["float"].values() for n in names}
    assert float_names == {n for n, m in quantizers_of(q).items() if isinstance(m, KeptFloat)}
    if not t.simulation:  # symmetric weights; TensorRT also symmetric activations
        assert q.vitq_scheme.signed_weights
        acts = [m for m in quantizers_of(q).values() if not isinstance(m, KeptFloat) and m.role != "weight"]
        assert all(m.signed for m in acts) == bool(t.symmetric_activations)
        qk = [m for m in acts if m.role in ("q", "k")]
        assert all(m.signed for m in qk) == bool(t.symmetric_activations or t.symmetric_qk)


def test_kind_without_kernel_and_its_partner_stay_float_and_say_why():
    q = prepare(tiny_model("deit"), Scheme("matmul", target="onnxruntime", softmax_quantizer="log2"))
    reasons = q.vitq_target_report["float"]
    assert any("'log2' has no integer kernel" in why for why in reasons)
    assert any(why.startswith("its partner softmax_quant is float") for why in reasons)
    assert target_groups(q)["attn_v"] == 0 and target_groups(q)["qk"] > 0


def test_float_quantizers_stay_float_through_calibration_and_a_saved_state(tmp_path):
    m, x = tiny_model("deit"), tiny_images("deit", 8)
    q, _ = vitq.quantize(m, x, Scheme("matmul", target="onnxruntime", softmax_quantizer="uniform",
                                      keep_float="attn_v"), "minmax", progress=False)
    kept = [n for n, p in quantizers_of(q).items() if isinstance(p, KeptFloat)]
    assert kept and all(n.endswith(("softmax_quant", "v_quant")) for n in kept)
    assert not any(bool(quantizers_of(q)[n].initialized) for n in kept)
    (tmp_path / "s").mkdir()
    save(q, tmp_path / "s", model="tiny")
    q2 = load(m, tmp_path / "s")
    assert q2.vitq_scheme == q.vitq_scheme
    assert torch.equal(q(x), q2(x))


def test_recipe_best_under_a_target_is_deployable():
    for target in ("onnxruntime", "openvino", "tensorrt"):
        recipe, why = choose("best", None, 8, 8, target=target)
        assert target in recipe.targets and "made for --target" in why
        assert recipe.flags.get("softmax_quantizer", "uniform") == "uniform" and "gelu_quantizer" not in recipe.flags
    with pytest.raises(VitqError, match="no integer kernel in openvino"):
        choose("matmul-repq-adalog", "matmul", 8, 8, target="openvino")
    recipe, _ = choose("best", "matmul", 8, 8)  # no target: the simulation ranking, unchanged
    assert not recipe.targets


# ------------------------------------------------------------------------------------------ runtime graphs
def _exported(tmp_path, target, **scheme):
    from vitq.export import export

    m, x = tiny_model("deit"), tiny_images("deit", 8)
    q, _ = vitq.quantize(m, x, Scheme("matmul", target=target, softmax_quantizer="uniform", **scheme), "minmax",
                         progress=False)
    path = tmp_path / f"{target}.onnx"
    export(q, path, float_model=m)
    return str(path)


def _check_declared(nodes, target):
    """Every kernel of a group the target runs as integer is an integer one of a declared op type, except a
    linear on a 2-D input (the classifier head; onnxruntime turns MatMul+Add into a float Gemm first); every
    kernel of a float group is a float one."""
    t = get_target(target)
    seen = set()
    for n in nodes:
        for g in n["groups"]:
            seen.add(g)
            if g in t.integer and not n["name"].startswith("/head/"):
                assert n["integer"] and n["op"].split()[0] in t.integer[g], (target, g, n)
            elif g in t.floating:
                assert not n["integer"], (target, g, n)
    return seen


def test_onnxruntime_runs_what_the_target_declares(tmp_path):
    pytest.importorskip("onnxruntime")
    from vitq.export.kernels import onnxruntime_kernels, summary

    nodes = onnxruntime_kernels(_exported(tmp_path, "onnxruntime"))
    assert _check_declared(nodes, "onnxruntime") >= {"image", "linear_input", "qk", "attn_v"}
    s = summary(nodes)
    assert s["qk"]["integer"] == 2 and s["attn_v"]["integer"] == 2  # both attention matmuls of both blocks
    kept = onnxruntime_kernels(_exported(tmp_path / "kf", "onnxruntime", keep_float="attn_v"))
    assert summary(kept)["attn_v"] == {"integer": 0, "float": 2, "ops": {"MatMul": 2}}


def test_openvino_runs_what_the_target_declares(tmp_path):
    pytest.importorskip("openvino")
    from vitq.export.kernels import openvino_kernels, summary

    nodes = openvino_kernels(_exported(tmp_path, "openvino"))
    assert _check_declared(nodes, "openvino") >= {"image", "linear_input", "qk"}
    s = summary(nodes)
    assert s["linear_input"]["integer"] == 9 and s["qk"] == {"integer": 2, "float": 0, "ops": {"MatMul i8": 2}}
    # why the target makes q and k symmetric and leaves softmax·v float: with every quantizer of the scheme
    # (asymmetric uint8 q, k, v, softmax; no target) OpenVINO runs the whole attention as one f32 MHA snippet
    every = summary(openvino_kernels(_exported(tmp_path / "all", "none")))
    assert every["qk"]["integer"] == 0 and every["attn_v"]["integer"] == 0 and every["linear_input"]["integer"] == 9


def test_cli_recipe_best_for_a_target_alone_gives_the_deployable_model(tmp_path, capsys):
    import json

    from conftest import TINY, make_image_folder
    from safetensors.torch import save_file

    from vitq.cli import main

    name, kw = TINY["deit"]
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model("deit").state_dict().items()}, str(weights))
    calib = make_image_folder(tmp_path / "calib", per_class=2, seed=1)
    out = tmp_path / "s"
    assert main(["quantize", "--model", name, "--model-args", json.dumps(kw), "--weights", str(weights), "--calib",
                 str(calib), "--recipe", "best", "--target", "onnxruntime", "--method", "minmax",  # (fast here)
                 "--batch-size", "4", "--num-workers", "0", "--quiet", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["recipe"]["name"] == "ship-repq-gptq" and res["scheme"] == "matmul"
    assert res["recipe"]["overridden_by_flags"] == {"method": "minmax"}
    assert res["scheme_config"]["target"] == "onnxruntime" and res["scheme_config"]["keep_float"] == ["attn_v"]
    assert res["weight_rounding"]["weight_rounding"] == "gptq"
    assert main(["recipes", "--target", "openvino"]) == 0
    text = capsys.readouterr().out
    assert "qk            integer: MatMul i8" in text
    assert "--recipe best --target openvino for matmul W8A8: ship-repq-gptq" in text

"""The hardware-aware search (vitq.search.hago) on a tiny random-init DeiT with generated images, timed in
onnxruntime with few rounds on small batches: sensitivities, the latency model, the solver under each
constraint, the Pareto front, the choice applied as keep_float (save / reload / export), and the CLI path."""

import json
import math
import re

import pytest
import torch
from zoo import tiny_images, tiny_model

import vitq
from vitq.errors import VitqError
from vitq.export.runtimes import cpu_int8_support, int8_note
from vitq.prepare import prepare, quantizer_units
from vitq.quant.base import quantizers_of
from vitq.quant.keep_float import KeptFloat
from vitq.scheme import Scheme
from vitq.search.hago import apply
from vitq.search.solve import Constraint, choose, constraint_of, dominates, pareto, recheck_set
from vitq.state import load, save

pytestmark = pytest.mark.usefixtures("one_thread")
GROUPS = ("linear_input.post_gelu", "qk")
FAST = {"rounds": 2, "batch": 2}


def _calibrated(a_bits: int = 8):
    m, x = tiny_model("deit"), tiny_images("deit", 16)
    q, _ = vitq.quantize(m, x, Scheme("matmul", w_bits=8, a_bits=a_bits, target="onnxruntime",
                                      softmax_quantizer="uniform"), "minmax", progress=False)
    return m, x, q


@pytest.fixture(scope="module")
def searched(one_thread):
    """A search over two groups: fc2's post-GELU input (made 16 times coarser than calibrated, so that it is the
    group that matters) and q·kᵀ."""
    pytest.importorskip("onnxruntime")
    m, x, q = _calibrated()
    for name, unit in quantizer_units(q).items():
        if unit == "linear_input.post_gelu":
            quantizers_of(q)[name].scale.mul_(16)
    record = vitq.search(q, m, x, max_kl=10.0, groups=",".join(GROUPS), progress=False, **FAST)
    return m, x, q, record


def test_sensitivity_finds_the_coarse_group(searched):
    _, _, _, rec = searched
    sens = {s["group"]: s for s in rec["sensitivity"]}
    assert set(sens) == set(GROUPS) and rec["groups"] == {"linear_input.post_gelu": 2, "qk": 4}
    for s in sens.values():
        assert all(math.isfinite(s[k]) for k in ("kl_alone_float", "kl_gain", "kl_alone_quantized"))
        assert s["kl_alone_float"] >= 0 and s["kl_alone_quantized"] >= 0
    coarse = sens["linear_input.post_gelu"]
    others = [sens["qk"]]
    assert all(coarse["kl_gain"] > 5 * o["kl_gain"] for o in others)
    assert all(coarse["kl_alone_quantized"] > 5 * o["kl_alone_quantized"] for o in others)
    assert rec["already_float"] == {}  # under onnxruntime every group of a uniform matmul scheme is integer


def test_latency_model_is_measured_and_additive_at_its_ends(searched):
    _, _, _, rec = searched
    lm = rec["latency_model"]
    assert all(lm[k] > 0 and math.isfinite(lm[k]) for k in ("ms_float", "ms_all_quantized", "ms_searched_float"))
    assert {g["group"] for g in lm["groups"]} == set(GROUPS)
    for g in lm["groups"]:
        assert g["cost_ms"] == pytest.approx(0.5 * (g["saving_vs_all_ms"] + g["saving_vs_float_ms"]))
    by = {tuple(p["float"]): p for p in rec["measured"]}
    # speed-ups are over the float file a user compares against (torch.onnx of the float model), vitq's own float
    # export timed beside it; the all-quantized configuration is the additive model's anchor: predicted as measured
    ref = rec["float_reference"]
    assert ref["graph"].startswith("torch.onnx export") and len(ref["ms"]) == len(ref["ms_vitq_float_export"]) == 2
    assert ref["ms_vitq_float_export"][0] == pytest.approx(lm["ms_float"])
    assert by[()]["predicted_speedup"] == pytest.approx(ref["ms"][0] / lm["ms_all_quantized"])
    stage1 = [p for p in rec["measured"] if p["stage"] == 1]
    for p in stage1:
        assert p["speedup"] / p["speedup_vs_vitq_float"] == pytest.approx(ref["ms"][0] / ref["ms_vitq_float_export"][0])
    assert rec["timing"] == {**rec["timing"], "batch": 2, "rounds": 2}
    assert rec["additivity"]["configurations"] >= 1


def test_solver_respects_each_constraint_and_names_the_best_when_infeasible(searched):
    pts = [{**p, "float": tuple(p["float"])} for p in searched[3]["measured"]]
    assert len(pts) == 2 ** len(GROUPS)  # two groups: every subset measured
    for kind, field in (("min_speedup", "speedup"), ("max_kl", "kl"), ("min_agreement", "agreement")):
        value = sorted(p[field] for p in pts)[len(pts) // 2]
        c = Constraint(kind, value)
        best = choose(pts, c, "onnxruntime")
        assert c.ok(best)
        ok = [p for p in pts if c.ok(p)]
        if kind == "min_speedup":
            assert best["kl"] == min(p["kl"] for p in ok)
        else:
            assert best["speedup"] == max(p["speedup"] for p in ok)
    fastest = max(p["speedup"] for p in pts)
    with pytest.raises(VitqError, match=rf"meets --min-speedup 1000: the fastest runs at {fastest:.2f}× float"):
        choose(pts, Constraint("min_speedup", 1000.0), "onnxruntime")
    note = "this CPU (X) has AVX2 but no VNNI"
    with pytest.raises(VitqError, match=rf"{fastest:.2f}× float \(.*\); this CPU \(X\) has AVX2 but no VNNI; ask"):
        choose(pts, Constraint("min_speedup", 1000.0), "onnxruntime", note=note)
    few = [{"float": ("qk",), "kl": 0.2, "agreement": 91.0, "speedup": 1.9},
           {"float": (), "kl": 0.3, "agreement": 88.0, "speedup": 2.1}]
    with pytest.raises(VitqError, match=r"meets --min-agreement 95: the highest agreement measured is 91.00 % "
                                        r"\(float: qk\); ask"):
        choose(few, Constraint("min_agreement", 95.0), "openvino", note=note)  # the CPU explains speed only
    with pytest.raises(VitqError, match=r"the lowest KL measured is 0.2 \(float: qk\)"):
        choose(few, Constraint("max_kl", 0.1), "openvino")
    with pytest.raises(VitqError, match="exactly one of --min-speedup, --max-kl, --min-agreement"):
        constraint_of(min_speedup=1.5, max_kl=0.1)
    with pytest.raises(VitqError, match="--min-agreement 101 is out of range"):
        Constraint("min_agreement", 101)


def test_pareto_front_is_non_dominated_and_covers_the_rest(searched):
    rec = searched[3]
    front, pts = rec["pareto_front"], rec["measured"]
    assert front and rec["chosen"]["float"] in [p["float"] for p in pts]
    for a in front:
        assert not any(dominates(b, a) for b in pts)
    for p in pts:
        assert p in front or any(dominates(f, p) or (f["kl"], f["speedup"]) == (p["kl"], p["speedup"]) for f in front)
    # the re-check picks the predicted choice and its neighbours first, and never more than asked
    line = [{"float": (str(i),), "kl": 0.1 * i, "speedup": 1.0 + i, "agreement": 90.0} for i in range(10)]
    worse = {"float": ("x",), "kl": 0.35, "speedup": 3.5, "agreement": 90.0}
    front = pareto([*line, worse])
    assert front == sorted(line, key=lambda p: -p["speedup"])
    picked = recheck_set(front, Constraint("max_kl", 0.2), 4)  # predicted choice: kl 0.2 at 3×
    assert len(picked) == 4 and {p["speedup"] for p in picked} >= {2.0, 3.0, 4.0}


def test_choice_is_the_keep_float_set_and_round_trips(searched, tmp_path):
    m, x, q, rec = searched
    chosen = tuple(rec["chosen"]["float"])
    assert q.vitq_scheme.search_float == chosen and set(chosen) <= set(q.vitq_scheme.keep_float)
    units = quantizer_units(q)
    for name, quant in quantizers_of(q).items():
        if units[name] in chosen:
            assert isinstance(quant, KeptFloat)
    # a split group chosen by hand: only fc2's post-GELU inputs become float, with the search's reason
    m2, x2, q2 = _calibrated()
    apply(q2, ("linear_input.post_gelu", "qk"), "hago search (test)")
    floats = {n for n, p in quantizers_of(q2).items() if isinstance(p, KeptFloat)}
    assert floats == {n for n, u in quantizer_units(q2).items() if u in ("linear_input.post_gelu", "qk")}
    assert all(n.endswith(("fc2.input_quant", "q_quant", "k_quant")) for n in floats)
    reasons = q2.vitq_target_report["float"]
    assert set(reasons) == {"group linear_input.post_gelu kept float by the hago search (test)",
                            "group qk kept float by the hago search (test)"}
    save(q2, tmp_path, model="tiny")
    q3 = load(m2, tmp_path)
    assert q3.vitq_scheme == q2.vitq_scheme
    assert {w: sorted(n) for w, n in q3.vitq_target_report["float"].items()} == \
        {w: sorted(n) for w, n in reasons.items()}
    assert torch.equal(q2(x2), q3(x2))
    ort = pytest.importorskip("onnxruntime")
    outs = []
    for i, model in enumerate((q2, q3)):
        path = tmp_path / f"m{i}.onnx"
        vitq.export(model, path, float_model=m2)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {"input": x2[:4].numpy()})[0])
    assert (outs[0] == outs[1]).all()


def test_keep_float_names_split_groups():
    q = prepare(tiny_model("deit"), Scheme("matmul", target="onnxruntime", keep_float="linear_input.head"))
    floats = [n for n, p in quantizers_of(q).items() if isinstance(p, KeptFloat)]
    assert "head.input_quant" in floats and "head.weight_quant" not in floats
    assert not any(n.startswith("blocks.") and n.endswith("input_quant") for n in floats)
    with pytest.raises(VitqError, match="keep_float group 'linear_input.fc2' is unknown"):
        Scheme("matmul", keep_float="linear_input.fc2")
    with pytest.raises(VitqError, match="search_float"):
        Scheme("matmul", keep_float="qk", search_float=("attn_v",), search_why="x")


def test_search_refuses_what_it_cannot_measure():
    m, x = tiny_model("deit"), tiny_images("deit", 4)
    q, _ = vitq.quantize(m, x, Scheme("matmul"), "minmax", progress=False)
    with pytest.raises(VitqError, match="--target none has none"):
        vitq.search(q, m, x, min_speedup=1.2, progress=False)
    q.vitq_scheme = Scheme("matmul", target="tensorrt")
    with pytest.raises(VitqError, match="tensorrt has no runtime"):
        vitq.search(q, m, x, min_speedup=1.2, progress=False)
    q.vitq_scheme = Scheme("matmul", target="onnxruntime")
    with pytest.raises(VitqError, match="'image.x' is not a group this model quantizes"):
        vitq.search(q, m, x, min_speedup=1.2, groups="image.x", progress=False)
    with pytest.raises(VitqError, match="search option rounds = 0"):
        vitq.search(q, m, x, min_speedup=1.2, rounds=0, progress=False)
    with pytest.raises(VitqError, match="unknown search 'evo'"):
        vitq.search(q, m, x, how="evo", min_speedup=1.2, progress=False)


def test_an_unreachable_constraint_is_an_error_that_leaves_the_model_as_it_was():
    pytest.importorskip("onnxruntime")
    m, x, q = _calibrated()
    before = {n: type(p) for n, p in quantizers_of(q).items()}
    with pytest.raises(VitqError, match=r"meets --min-speedup 1000: the fastest runs at [0-9.]+× float \((float: qk|"
                                        r"every searched group quantized)\)") as e:
        vitq.search(q, m, x, min_speedup=1000, groups="qk", rounds=1, batch=1, progress=False)
    assert {n: type(p) for n, p in quantizers_of(q).items()} == before and q.vitq_scheme.keep_float == ()
    cpu = cpu_int8_support()
    if cpu is not None and not cpu["int8_dot"]:  # this machine says what it lacks (Linux, x86 without VNNI/AMX)
        assert re.search(r"× float \(.*\); this CPU \(.*\) has .* but no VNNI", str(e.value))


CPUINFO = "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx fma {}\n\nprocessor\t: 1\n"


@pytest.mark.parametrize("flags,dot,lacks", [("avx2", False, "no VNNI, AVX-512 or AMX"),
                                             ("avx2 avx512f avx512bw", False, "no VNNI or AMX"),
                                             ("avx2 avx512f avx512_vnni", True, None), ("avx2 avx_vnni", True, None),
                                             ("avx2 amx_tile amx_int8", True, None)])
def test_cpu_int8_instructions_from_cpuinfo(tmp_path, flags, dot, lacks):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(flags))
    info = cpu_int8_support(str(path))
    assert info["cpu"] == "Test CPU 9000" and info["avx2"] and info["int8_dot"] == dot
    note = int8_note(info)
    assert note.startswith("this CPU (Test CPU 9000) has ")
    assert (lacks in note) if lacks else "but no" not in note
    assert cpu_int8_support(str(tmp_path / "missing")) is None and int8_note(None) == ""
    path.write_text("processor\t: 0\nvendor\t: x\n")  # no flags line (another architecture)
    assert cpu_int8_support(str(path)) is None


def test_cli_recipe_best_target_search(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from conftest import TINY, make_image_folder
    from safetensors.torch import save_file

    from vitq.cli import main

    name, kw = TINY["deit"]
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model("deit").state_dict().items()}, str(weights))
    calib = make_image_folder(tmp_path / "calib", per_class=2, seed=1)
    base = ["quantize", "--model", name, "--model-args", json.dumps(kw), "--weights", str(weights), "--calib",
            str(calib), "--recipe", "best", "--target", "onnxruntime", "--method", "minmax", "--batch-size", "4",
            "--num-workers", "0", "--threads", "1", "--weight-rounding", "nearest", "--quiet"]
    assert main([*base, "--max-kl", "1", "--out", str(tmp_path / "x")]) != 0
    assert "--max-kl needs --search hago" in capsys.readouterr().err
    out = tmp_path / "s"
    assert main([*base, "--search", "hago", "--max-kl", "10", "--search-groups", "qk", "--search-rounds", "2",
                 "--search-batch", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "hago search, --max-kl 10 on onnxruntime" in text and "chosen:" in text
    res = json.loads((out / "results.json").read_text())
    s = res["search"]
    assert res["recipe"]["name"] == "ship-repq-gptq"
    assert res["recipe"]["applied"]["keep_float_left_to_search"] == "attn_v"
    assert res["scheme_config"]["keep_float"] == s["chosen"]["float"] == res["scheme_config"]["search_float"]
    assert len(s["measured"]) == 2 and s["plot"] == "hago_pareto.png" and (out / "hago_pareto.png").stat().st_size
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", "--model", name, "--weights", str(weights), "--state", str(out), "--out", str(onnx_path),
                 "--target", "onnxruntime", "--quiet"]) == 0
    from vitq.export.kernels import onnxruntime_kernels, summary

    ran = summary(onnxruntime_kernels(str(onnx_path)))  # what onnxruntime runs is what the search chose
    for group in ("qk", "attn_v"):
        assert ran[group]["integer"] == (0 if group in s["chosen"]["float"] else 2), (group, ran)

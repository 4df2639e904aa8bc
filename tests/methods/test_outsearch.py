"""repq's output-aware search (``--repq-search output``, vitq.methods.outsearch): no searched operation's output
error rises, the model's output moves closer to the float model's, the result reaches results.json, and the
state saves, reloads and exports like any other.

Speed (CI): repq's default activation ranges (``act: mse``, a per-channel coordinate search over histograms) cost
seconds per calibration even on the tiny DeiT, far more than the output search; these tests calibrate with the
min/max ranges (FAST) and search 2-8 images, which the search's properties do not depend on."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_image_folder, tiny_images, tiny_model
from safetensors.torch import save_file

import vitq
from vitq.calib import as_calib
from vitq.cli import main
from vitq.methods.outsearch import candidates, fast_log, output_search
from vitq.quant.base import passthrough
from vitq.quant.log import AdaLogQuantizer, AdaLogShiftQuantizer
from vitq.quant.modules import QAttentionBase, QWeighted
from vitq.quant.uniform import UniformQuantizer
from vitq.scheme import Scheme

SCHEME = Scheme("matmul", 4, 4, softmax_quantizer="adalog", gelu_quantizer="adalog")
FAST = {"act": "minmax", "weights": "minmax"}  # repq without its range searches (mse / omse cost seconds here)


def _repq(model, x, scheme=SCHEME, **kw):
    q = vitq.prepare(model, scheme, method="repq")
    info = vitq.calibrate(q, x, method="repq", progress=False, **{**FAST, **kw})
    return q, info


@torch.no_grad()
def _operation_errors(q, x) -> dict[str, float]:
    """Every searched operation's squared output error on the float operands of ``x``, computed here from the
    modules' own forward (not the search's code): a weighted layer's quantized forward against its float forward
    on its float input; q·kᵀ and attn·V with their quantizers against the float products."""
    seen: dict[str, dict] = {}
    hooks = []
    for name, m in q.named_modules():
        if isinstance(m, QWeighted):
            hooks.append(m.register_forward_pre_hook(lambda mod, a, n=name: seen.setdefault(n, {}).update(x=a[0])))
        if isinstance(m, QAttentionBase):
            for attr in ("q_quant", "k_quant", "v_quant", "softmax_quant"):
                hooks.append(getattr(m, attr).register_forward_pre_hook(
                    lambda mod, a, n=name, k=attr: seen.setdefault(n, {}).update({k: a[0]})))
    with passthrough(q):
        q(x)
    for h in hooks:
        h.remove()
    mods = dict(q.named_modules())
    errs = {}
    for name, d in seen.items():
        m = mods[name]
        if isinstance(m, QWeighted):
            with passthrough(m):
                ref = m(d["x"])
            errs[name] = float((m(d["x"]) - ref).double().pow(2).sum())
        else:
            qk = (d["q_quant"] @ d["k_quant"].transpose(-2, -1)) * m.scale
            qk_hat = (m.q_quant(d["q_quant"]) @ m.k_quant(d["k_quant"]).transpose(-2, -1)) * m.scale
            errs[f"{name}.matmul_qk"] = float((qk_hat - qk).double().pow(2).sum())
            av = d["softmax_quant"] @ d["v_quant"]
            av_hat = m.softmax_quant(d["softmax_quant"]) @ m.v_quant(d["v_quant"])
            errs[f"{name}.matmul_av"] = float((av_hat - av).double().pow(2).sum())
    return errs


@pytest.mark.parametrize("gelu,rounds", [("adalog", 2), (None, 1)])
def test_search_never_raises_an_operation_output_error(gelu, rounds):
    """Float operands, every token cached (the tiny DeiT has 17 tokens < 64): each operation's output error,
    computed independently, is at most its start, most fall, and the trace reports exactly those errors."""
    model, x = tiny_model("deit"), tiny_images("deit", 2)
    scheme = Scheme("matmul", 4, 4, softmax_quantizer="adalog" if gelu else None, gelu_quantizer=gelu)
    q, _ = _repq(model, x, scheme)
    before = _operation_errors(q, x)
    info = output_search(q, as_calib(x, progress=False), inputs="float", rounds=rounds, tokens=64)
    after = _operation_errors(q, x)
    trace = {t["layer"]: t for t in info["search_layers"]}
    assert set(trace) == set(before) == set(after) and info["search_operations"] == len(before) == 14
    for name in before:
        assert after[name] <= before[name] * (1 + 1e-6), (name, before[name], after[name])
        ref = trace[name]["after"] / trace[name]["before"] if trace[name]["before"] > 0 else 1.0
        got = after[name] / before[name] if before[name] > 0 else 1.0
        assert got == pytest.approx(ref, rel=1e-3, abs=1e-9), name
    assert info["search_improved"] >= 10 and info["search_mean_error_after"] < info["search_mean_error_before"]
    assert any(".fc2.input_quant" in s for t in info["search_layers"] for s in t["searched"])
    assert any(".attn.softmax_quant" in s for t in info["search_layers"] for s in t["searched"])


def test_candidates_start_with_the_current_state_and_cover_both_ends():
    q = UniformQuantizer(4, "linear_input")
    q.set_range(torch.tensor(-1.0), torch.tensor(3.0))
    for stage in (0, 1, 2):
        states = candidates(q, stage)
        assert torch.equal(states[0]["scale"], q.scale) and torch.equal(states[0]["zero_point"], q.zero_point)
    fine = candidates(q, 1)
    assert len(fine) == 25 and len({(float(s["scale"]), float(s["zero_point"])) for s in fine}) > 15
    a = AdaLogQuantizer(4, "softmax")
    a.set_range(0.0, 1.0)
    coarse = candidates(a, 0)
    assert float(coarse[0]["base_exp"]) == 2.0 and len(coarse) > 30
    assert all(float(s["scale"]) <= 1.0 for s in coarse)  # softmax: top levels at or below 1


@pytest.mark.parametrize("kind,role", [(AdaLogQuantizer, "softmax"), (AdaLogQuantizer, "linear_input"),
                                       (AdaLogShiftQuantizer, "linear_input")])
def test_fast_log_quantizes_as_the_quantizer(kind, role):
    """The search's precomputed log quantization gives the quantizer's own values for every candidate (a
    rounding tie may fall the other way: at most a few values in 10^4 differ)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4000, generator=g) ** 4 if role == "softmax" else F.gelu(torch.randn(4000, generator=g) * 3)
    q = kind(4, role)
    q.set_range(float(x.min()), float(x.max()))
    quantize = fast_log(q, x)
    for stage in (0, 1):
        for st in candidates(q, stage)[::7]:
            for k, v in st.items():
                getattr(q, k).copy_(v)
            diff = (quantize() - q.fake_quant(x)).abs()
            assert (diff > 1e-5 * float(x.abs().max())).float().mean() < 1e-3, (st, float(diff.max()))


def test_search_brings_the_model_output_closer_to_float():
    """Tiny DeiT, W4A4 with the adaptive-log softmax and GELU quantizers: KL and squared error to the float
    logits on held-out images are not above repq's without the search (the default: quantized inputs)."""
    model = tiny_model("deit")
    x, held = tiny_images("deit", 8, seed=3), tiny_images("deit", 8, seed=4)
    with torch.no_grad():
        ref = model(held)
    scores = {}
    for search in ("none", "output"):
        q, info = _repq(model, x, search=search)
        with torch.no_grad():
            out = q(held)
        kl = F.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="batchmean")
        scores[search] = (float(kl), float((out - ref).pow(2).mean()))
        assert ("search_layers" in info) == (search == "output")
    assert scores["output"][0] <= scores["none"][0] and scores["output"][1] <= scores["none"][1], scores


def test_cli_flag_results_json_reload_and_export(tmp_path, capsys):
    name, kw = TINY["deit"]
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model("deit").state_dict().items()}, str(weights))
    calib = make_image_folder(tmp_path / "calib", per_class=1, seed=1)  # 3 images each
    val = make_image_folder(tmp_path / "val", per_class=1, seed=2)
    common = ["--model", name, "--model-args", json.dumps(kw), "--weights", str(weights), "--val", str(val),
              "--batch-size", "4", "--num-workers", "0", "--quiet"]
    with pytest.raises(SystemExit):
        main(["quantize", "--method", "repq", "--help"])
    helptext = capsys.readouterr().out
    assert "--repq-search" in helptext and "--repq-search-inputs" in helptext
    out = tmp_path / "out"
    assert main(["quantize", *common, "--calib", str(calib), "--scheme", "matmul", "--w-bits", "4", "--a-bits", "4",
                 "--method", "repq", "--softmax-quantizer", "adalog", "--gelu-quantizer", "adalog_shift",
                 "--repq-search", "output", "--repq-search-rounds", "1", "--repq-search-tokens", "4",
                 "--repq-act", FAST["act"], "--repq-weights", FAST["weights"], "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    cal = r["calibration"]
    assert cal["search"] == "output" and cal["effective_options"]["search"] == "output"
    assert cal["search_rounds"] == 1 and cal["search_tokens"] == 4 and cal["search_images"] == 3
    assert cal["effective_options"]["act"] == "minmax" and cal["search_seconds"] > 0 and len(cal["search_layers"]) == 14
    assert all(t["after"] <= t["before"] for t in cal["search_layers"])
    assert main(["evaluate", *common, "--state", str(out), "--out", str(tmp_path / "ev.json")]) == 0
    assert json.loads((tmp_path / "ev.json").read_text())["quant"] == r["quant"]
    # the API's save / load round trip and the ONNX export of a searched state
    model, x = tiny_model("deit"), tiny_images("deit", 2)
    q, _ = _repq(model, x, search="output", search_rounds=1, search_tokens=4)
    (tmp_path / "state").mkdir()
    vitq.save(q, tmp_path / "state")
    back = vitq.load(model, tmp_path / "state")
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    ort = pytest.importorskip("onnxruntime")
    from vitq.export.onnx import export

    export(q, tmp_path / "m.onnx", float_model=model)
    # without graph optimizations onnxruntime runs the QDQ graph as written: the searched state exports exactly
    # (its fused integer kernels round on their own, 15-27 % of the logits' scale on this tiny random model, with
    # or without the search)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = q(x).numpy()
    assert abs(got - want).max() <= 1e-4 * abs(want).max()

"""repq's per-head balance of q/k/v ranges (issue 26, item 2b): an exact rescaling folded into the float weights
(qkv's output rows, proj's input columns). Tiny random-init models, generated images."""

import json

import numpy as np
import pytest
import timm
import torch
from conftest import ZOO, tiny_images, tiny_model

import vitq
from vitq.api import as_calib
from vitq.errors import VitqError
from vitq.methods.head_balance import balance_heads, head_ranges, sources, spread
from vitq.methods.reparam import reparameterize
from vitq.quant.modules import QAttentionBase
from vitq.scheme import Scheme

pytestmark = pytest.mark.usefixtures("one_thread")


def attentions(q):
    return {n: m for n, m in q.named_modules() if isinstance(m, QAttentionBase)}


def rewritten(model, x, mode, fold=False, regime="matmul"):
    """(logits before, logits after, info, prepared model, calib) of balance_heads on a prepared float model."""
    q = vitq.prepare(model, Scheme(regime, 4, 4))
    calib = as_calib(x, batch_size=3, progress=False)
    if fold:
        reparameterize(q, calib)
    with torch.no_grad():
        before = q(x)
    info = balance_heads(q, calib, mode)
    with torch.no_grad():
        after = q(x)
    return before, after, info, q, calib


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("key,regime", [("deit", "matmul"), ("deit", "fq"), ("swin", "matmul"), ("eva02", "matmul"),
                                        ("cait", "matmul"), ("hf_vit", "matmul")])
def test_float_rewrite_is_exact_and_balances_every_head(key, regime):
    """After RepQ's fold (deit), as repq runs it, or alone; both regimes."""
    before, after, info, q, calib = rewritten(tiny_model(key), tiny_images(key, 6), "qkv", fold=key == "deit",
                                              regime=regime)
    assert rel(after, before) < 1e-5
    assert info["head_balance_layers"] == len(attentions(q)) and info["head_balance_skipped"] == {}
    assert info["seconds_head_balance"] > 0
    ranges, _ = head_ranges(q, calib)  # measured again on the rewritten model
    for name, r in ranges.items():
        assert spread(r["v"]) < 1 + 1e-4, name  # every head of v has the same range
        assert torch.allclose(r["q"], r["k"], rtol=1e-4), name  # q and k of each head have the same range
        rec = info["head_balance_factors"][name]
        assert rec["v_spread_after"] == pytest.approx(1.0) and rec["qk_spread_after"] >= 1.0


def test_v_mode_leaves_q_and_k_as_they_are():
    model, x = tiny_model("vit"), tiny_images("vit", 6)
    q0 = vitq.prepare(model, Scheme("matmul", 4, 4))
    r0, _ = head_ranges(q0, as_calib(x, progress=False))
    before, after, info, q, calib = rewritten(model, x, "v")
    assert rel(after, before) < 1e-5
    r1, _ = head_ranges(q, calib)
    for name in r0:
        assert torch.allclose(r1[name]["q"], r0[name]["q"]) and torch.allclose(r1[name]["k"], r0[name]["k"])
        assert spread(r1[name]["v"]) < 1 + 1e-4 < spread(r0[name]["v"])
        assert "qk_factor_min" not in info["head_balance_factors"][name]


def test_fused_and_separate_projections_are_told_apart():
    """timm ViT/Swin: one fused qkv; EVA: fused qkv plus separate q/v biases, or q/k/v_proj; CaiT: a fused qkv
    (talking heads) and separate q/k/v (class attention); Hugging Face: q/k/v_proj; LeViT (per-head [q, k, v]
    split): refused."""
    cases = {"deit": "fused", "swin": "fused", "eva02": "fused+bias", "hf_vit": "separate", "cait": None}
    eva_sep = timm.create_model(ZOO["eva02"].name, pretrained=False, **ZOO["eva02"].kwargs, qkv_fused=False).eval()
    models = {k: tiny_model(k) for k in cases} | {"eva_sep": eva_sep}
    cases["eva_sep"] = "separate"
    for key, model in models.items():
        for name, attn in attentions(vitq.prepare(model, Scheme("matmul", 4, 4))).items():
            src = sources(attn)
            kind = cases[key] or ("separate" if name.startswith("blocks_token_only") else "fused")
            if kind.startswith("fused"):
                n = attn.qkv.weight.shape[0] // 3
                assert [(t is attn.qkv.weight, first) for t, first, _ in (s[0] for s in src.values())] == [
                    (True, 0), (True, n), (True, 2 * n)], (key, name)
                assert all(len(s) == 2 for s in src.values())  # the weight and one bias
                if kind == "fused+bias":
                    assert src["q"][1][0] is attn.q_bias and src["v"][1][0] is attn.v_bias
            else:
                lin = {r: getattr(attn, p, None) or getattr(attn, r) for r, p in zip("qkv", ("q_proj", "k_proj",
                                                                                      "v_proj"))}
                assert all(src[r][0][0] is lin[r].weight and src[r][0][1] == 0 for r in "qkv"), (key, name)
    before, after, info, _, _ = rewritten(eva_sep, tiny_images("eva02", 6), "qkv")
    assert rel(after, before) < 1e-5 and info["head_balance_skipped"] == {}
    levit = vitq.prepare(tiny_model("levit"), Scheme("matmul", 4, 4))
    assert all(isinstance(sources(a), str) for a in attentions(levit).values())
    with pytest.raises(VitqError, match="no attention module of LevitDistilled could be rescaled"):
        balance_heads(levit, as_calib(tiny_images("levit", 2), progress=False), "qkv")


def test_a_norm_before_proj_keeps_v_and_balances_q_k():
    """EVA with scale_attn_inner (a LayerNorm over all heads before proj): v's factors would not be undone by
    proj, the check catches it and only q/k are rescaled."""
    model = timm.create_model(ZOO["eva02"].name, pretrained=False, **ZOO["eva02"].kwargs,
                              scale_attn_inner=True).eval()
    before, after, info, q, calib = rewritten(model, tiny_images("eva02", 6), "qkv")
    assert rel(after, before) < 1e-5
    assert sorted(info["head_balance_skipped"]) == ["blocks.0.attn (v)", "blocks.1.attn (v)"]
    assert "not exact" in info["head_balance_skipped"]["blocks.0.attn (v)"]
    for name, r in head_ranges(q, calib)[0].items():
        assert torch.allclose(r["q"], r["k"], rtol=1e-4)
        assert "v_factor_min" not in info["head_balance_factors"][name]
    with pytest.raises(VitqError, match="could be rescaled exactly"):  # v alone: nothing left to do
        rewritten(model, tiny_images("eva02", 6), "v")


def test_refusals():
    model, x = tiny_model("deit"), tiny_images("deit", 4)
    q = vitq.prepare(model, Scheme("matmul", 4, 4))
    with pytest.raises(VitqError, match="expected one of"):
        balance_heads(q, as_calib(x, progress=False), "heads")
    assert balance_heads(q, as_calib(x, progress=False), "none") == {"head_balance": "none"}
    vitq.calibrate(q, x, method="minmax", progress=False)
    with pytest.raises(VitqError, match="already has calibrated quantizers"):
        balance_heads(q, as_calib(x, progress=False), "v")
    cnn = vitq.prepare(tiny_model("resnet"), Scheme("matmul", 4, 4))
    with pytest.raises(VitqError, match="no quantized attention"):
        balance_heads(cnn, as_calib(tiny_images("resnet", 2), progress=False), "v")


def imbalanced(model, seed=5):
    """The same function with very different per-head ranges: q·a, k/a and v·c per head (c's product 1),
    proj's columns / c (what a trained ViT's heads look like, in a random model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "qkv") and hasattr(m, "num_heads"):
                n = m.qkv.weight.shape[0] // 3
                d = n // m.num_heads
                a, c = torch.exp(torch.randn(2, m.num_heads, generator=g) * 1.5)
                c = c / c.log().mean().exp()
                for i, f in enumerate((a, 1 / a, c)):
                    m.qkv.weight[i * n:(i + 1) * n] *= f.repeat_interleave(d)[:, None]
                    m.qkv.bias[i * n:(i + 1) * n] *= f.repeat_interleave(d)
                m.proj.weight /= c.repeat_interleave(d)[None, :]
    return model


def repq_error(model, xc, xe, mode):
    """repq at W4A4 matmul with adalog softmax/GELU (min/max ranges here: the default least-squares search takes
    seconds per run) and ``head_balance=mode``: (quantized logits, KL(float‖quant), relative MSE, info)."""
    q = vitq.prepare(model, Scheme("matmul", 4, 4, softmax_quantizer="adalog", gelu_quantizer="adalog"),
                     method="repq")
    info = vitq.calibrate(q, xc, method="repq", progress=False, batch_size=16, head_balance=mode, act="minmax",
                          weights="minmax")
    with torch.no_grad():
        f, o = model(xe), q(xe)
    kl = torch.nn.functional.kl_div(o.log_softmax(-1), f.log_softmax(-1), log_target=True, reduction="batchmean")
    return o, float(kl), float(((o - f) ** 2).mean() / (f ** 2).mean()), info


def test_w4a4_repq_with_head_balance_measured_and_invariant_to_head_scales(capsys):
    """A tiny DeiT and the same function with imbalanced heads. Asserted: what is exact (after balancing both
    have the same weights, so the same quantized model up to float round-off; without it they differ) and the
    records; the errors are printed (-s) for the report. Measured: 29 of the 32 images identical with balance,
    none without."""
    xc, xe = tiny_images("deit", 16, seed=10), tiny_images("deit", 32, seed=20)
    base, imb = tiny_model("deit"), imbalanced(tiny_model("deit"))
    with torch.no_grad():
        assert rel(imb(xe), base(xe)) < 1e-5
    out = {}
    for label, model in (("random-init", base), ("imbalanced", imb)):
        for mode in ("none", "qkv"):
            out[label, mode], kl, mse, info = repq_error(model, xc, xe, mode)
            # the fold's pass, the range pass, logsqrt2's histogram pass and the balance's
            assert info["calibration_passes"] == 3 + (mode != "none") and np.isfinite(kl)
            line = f"{label} {mode}: KL {kl:.5f} rel MSE {mse:.4f}"
            if mode != "none":
                assert info["head_balance"] == mode and info["head_balance_layers"] == 2
                line += (f" v spread {info['head_balance_v_spread_max']:.2f} proj weight error ratio "
                         f"{info['head_balance_proj_weight_error_ratio_mean']:.3f}")
            with capsys.disabled():
                print("\n" + line)
    same = {m: float(((out["imbalanced", m] - out["random-init", m]).abs().amax(1) < 1e-5).float().mean())
            for m in ("none", "qkv")}
    assert same["qkv"] >= 0.75 and same["none"] <= 0.1, same  # (an image may differ where round-off moved a code)


def test_state_saves_loads_and_exports_to_onnx(tmp_path):
    """Saved and loaded bit for bit; onnxruntime computes what vitq computes. W8A8 (at 4 bits one v value on a
    rounding boundary, moved by onnxruntime's other summation order, shifts a tiny model's logits by several
    percent: the export's round-off, not the rescaling's, which changes float weights only)."""
    ort = pytest.importorskip("onnxruntime")
    from vitq.export.onnx import export

    model, x = tiny_model("deit"), tiny_images("deit", 8)
    q = vitq.prepare(model, Scheme("matmul", 8, 8), method="repq")
    info = vitq.calibrate(q, x, method="repq", progress=False, head_balance="qkv", act="minmax",
                          weights="minmax")
    assert json.loads(json.dumps(info))["head_balance_layers"] == 2  # results.json can hold it
    vitq.save(q, tmp_path)
    back = vitq.load(model, tmp_path)
    with torch.no_grad():
        ref = q(x)
        assert torch.equal(back(x), ref)
    export(back, tmp_path / "m.onnx", float_model=model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    out = ort.InferenceSession(str(tmp_path / "m.onnx"), so, providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    diff, scale = np.abs(out - ref.numpy()), float(ref.abs().max())
    assert diff.max() <= 0.05 * scale and diff.mean() <= 0.005 * scale

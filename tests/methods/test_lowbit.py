"""Low-bit building blocks: scale reparameterization (exact), log√2 / adaptive-log quantizers, GPTQ rounding."""

import json

import pytest
import torch
from conftest import SHARED, TINY, make_image_folder, tiny_images, tiny_model
from safetensors.torch import save_file

import vitq
from vitq.api import as_calib
from vitq.cli import main
from vitq.errors import VitqError
from vitq.methods.reparam import reparameterize, targets
from vitq.quant.base import quantizers_of
from vitq.quant.log import R_GRID, AdaLogQuantizer, LogSqrt2Quantizer
from vitq.quant.observers import Observer
from vitq.quant.uniform import UniformQuantizer
from vitq.refine.gptq import gptq_rows, grid_quant
from vitq.scheme import Scheme

WEIGHTS = SHARED / "models" / "deit_tiny_patch16_224.safetensors"
DATA = SHARED / "data" / "imagenet-sample"


# ------------------------------------------------------------------------------------------ reparameterization
def _assert_rewrite_exact(model, images, regime):
    qmodel = vitq.prepare(model, Scheme(regime, 4, 4))  # quantizers uncalibrated: the float function
    with torch.no_grad():
        before = qmodel(images)
    norms_before = {n: lin.weight.clone() for n, (_, lin) in targets(qmodel).items()}
    info = reparameterize(qmodel, as_calib(images, batch_size=4, progress=False))
    with torch.no_grad():
        after = qmodel(images)
    rel = float((after - before).abs().max() / before.abs().max())
    assert rel < 1e-5, rel
    assert info["reparam_layers"] == len(norms_before) > 0
    # the rewrite really changed the parameters (not a no-op)
    assert any(not torch.equal(lin.weight, norms_before[n]) for n, (_, lin) in targets(qmodel).items())
    return qmodel, info


@pytest.mark.parametrize("family", ["deit", "swin"])
@pytest.mark.parametrize("regime", ["fq", "matmul"])
def test_reparam_leaves_float_outputs_unchanged(family, regime):
    model = tiny_model(family)
    # exaggerate a few LayerNorm channels, like the outlier channels of real ViTs
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight[:2] *= 20.0
                m.bias[:2] += 3.0
    _, info = _assert_rewrite_exact(model, tiny_images(family, 8), regime)
    assert info["reparam_r1_max"] > 2.0  # the outlier channels got their own factor


@pytest.mark.real
@pytest.mark.skipif(not WEIGHTS.exists(), reason="../shared with the real DeiT-Tiny is not present")
def test_reparam_exact_on_real_deit_tiny():
    from vitq.data import model_transform, scan_image_folder, select_records
    from vitq.models.loading import create_model

    model = create_model("deit_tiny_patch16_224", weights=WEIGHTS)
    tf, _ = model_transform(model)
    recs = select_records(scan_image_folder(DATA / "calib"), 8, 0)
    images = torch.stack([tf(__import__("PIL.Image", fromlist=["Image"]).open(r.path).convert("RGB")) for r in recs])
    _, info = _assert_rewrite_exact(model, images, "matmul")
    assert info["reparam_r1_max"] > 2.0  # DeiT-Tiny's post-LayerNorm outlier channels


def test_reparam_near_constant_channel_keeps_the_tensor_centred():
    """A LayerNorm channel with γ ≈ 0 (the real DeiT-Tiny has some) must not drag the shared zero point: after the
    fold every value of X' lies within one mean channel range of 0, so the per-tensor grid holds 0 and the
    rounding error of the widened weight columns is not multiplied by a large constant offset."""
    from vitq.methods.reparam import LEVELS, fold
    from vitq.quant.modules import QLinear

    g = torch.Generator().manual_seed(0)
    norm = torch.nn.LayerNorm(16)
    lin = QLinear(torch.nn.Linear(16, 8), 8, 8, True)  # quantizers uncalibrated: the float function
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(16, generator=g))
        norm.weight[0], norm.bias[0] = 1e-7, 0.8  # near-constant channel far from 0
        norm.weight[1] *= 20.0  # an outlier channel
    x = torch.randn(64, 16, generator=g)
    with torch.no_grad():
        h = norm(x)
        before = lin(h)
        lo, hi = h.min(0).values, h.max(0).values
        mean_width = float((hi.clamp(min=0) - lo.clamp(max=0)).mean())
        stats = fold(norm, lin, lo, hi)
        h2 = norm(x)
        after = torch.nn.functional.linear(h2.double(), lin.weight.double(), lin.bias.double())
    assert float((after - before.double()).abs().max()) < 1e-4 * float(before.abs().max())
    assert float(h2.abs().max()) <= mean_width * (1 + 1e-4), (float(h2.abs().max()), mean_width)
    assert stats["r1_max"] > 2.0 and LEVELS == 255


def test_repq_calibrates_both_regimes_and_records():
    model, x = tiny_model("deit"), tiny_images("deit", 8)
    for regime in ("fq", "matmul"):
        q = vitq.prepare(model, Scheme(regime, 4, 4), method="repq")
        info = vitq.calibrate(q, x, method="repq", progress=False)
        assert info["softmax_quantizer"] == "logsqrt2" and info["reparam_layers"] == 4
        assert all(bool(qq.initialized) for qq in quantizers_of(q).values())
        with pytest.raises(VitqError, match="repq"):
            vitq.calibrate(vitq.prepare(model, Scheme(regime, 4, 4), method="repq"), x, method="repq", bogus=1)


# ------------------------------------------------------------------------------------------ log quantizers
def _check_log_quantizer(q, x, levels):
    y = q.fake_quant(x)
    xs, order = torch.sort(x)
    ys = q.fake_quant(xs)
    assert bool((ys[1:] >= ys[:-1]).all()), "not monotone"
    assert bool(torch.isin(y, levels).all()), "an output is not a level"
    assert torch.equal(q.fake_quant(levels), levels), "a level does not map to itself"
    assert float(y.min()) >= float(levels.min()) and float(y.max()) <= float(levels.max())
    return y


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_logsqrt2_levels_bounds_monotone(bits):
    q = LogSqrt2Quantizer(bits, "softmax")
    levels = q.level_set()
    assert levels.numel() == 2**bits  # 2^b - 1 levels and 0: exactly b bits
    assert float(levels.max()) == 1.0 and float(levels.min()) == 0.0
    expect = torch.pow(torch.tensor(2.0, dtype=torch.float64), -torch.arange(2**bits - 1, dtype=torch.float64) / 2)
    assert torch.allclose(torch.sort(levels[levels > 0], descending=True).values.double(), expect, rtol=1e-6)
    x = torch.cat([torch.rand(5000) ** 6, torch.tensor([0.0, 1.0, 1e-30])])
    y = _check_log_quantizer(q, x, levels)
    assert float(q.fake_quant(torch.tensor([1.0]))) == 1.0
    # the hardware form: a log2 code and a parity bit decode to the same value
    codes = q.encode(x)
    back = torch.where(codes > q.max_code, torch.zeros(()), q.hardware_decode(codes.clamp(max=q.max_code)))
    assert torch.equal(back, y)


def test_logsqrt2_scale_search_and_old_states():
    g = torch.Generator().manual_seed(1)
    soft = torch.softmax(torch.randn(64, 197, generator=g) * 1.5, -1)  # mostly ≈ 1/197: below 4-bit's 2^-7
    obs = Observer()
    obs.update(soft)
    obs.start_error_pass()
    obs.update(soft)
    q = LogSqrt2Quantizer(4, "softmax")
    chosen = q.fit(obs)
    from vitq.quant.log import LOGSQRT2_SCALES

    assert chosen["scale"] in LOGSQRT2_SCALES and chosen["scale"] < 1.0 and bool(q.initialized)
    unit = LogSqrt2Quantizer(4, "softmax")
    unit.mark_initialized()
    err = float((q.fake_quant(soft) - soft).pow(2).sum())
    assert err < float((unit.fake_quant(soft) - soft).pow(2).sum())
    levels = q.level_set()
    assert levels.numel() == 16 and abs(float(levels.max()) - chosen["scale"]) < 1e-6
    _check_log_quantizer(q, soft.flatten(), levels)
    # a state saved before the scale existed loads with scale 1
    old = {k: v for k, v in unit.state_dict().items() if k != "scale"}
    fresh = LogSqrt2Quantizer(4, "softmax")
    fresh.scale.fill_(0.3)
    fresh.load_state_dict(old)
    assert float(fresh.scale) == 1.0


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("r", [1.0, 1.75, 3.5])
def test_adalog_softmax_levels_bounds_monotone(bits, r):
    q = AdaLogQuantizer(bits, "softmax")
    q.base_exp.fill_(r)
    q.mark_initialized()
    levels = q.level_set()
    assert levels.numel() == min(2**bits, int(64 * r) + 2) and float(levels.max()) == 1.0
    _check_log_quantizer(q, torch.cat([torch.rand(5000) ** 5, torch.tensor([0.0, 1.0])]), levels)
    assert float(q(torch.tensor([1.0]))) == 1.0


def test_adalog_fit_searches_base_and_handles_gelu_negatives():
    g = torch.Generator().manual_seed(0)
    soft = torch.softmax(torch.randn(64, 50, generator=g) * 3, -1)
    q = AdaLogQuantizer(4, "softmax")
    obs = Observer()
    obs.update(soft)
    obs.start_error_pass()
    obs.update(soft)
    chosen = q.fit(obs)
    assert chosen["base_exp"] in R_GRID and bool(q.initialized) and float(q.scale) == 1.0
    err = float((q.fake_quant(soft) - soft).pow(2).sum())
    for r in (R_GRID[0], R_GRID[-1]):  # the search is never worse than the grid ends it considered
        other = AdaLogQuantizer(4, "softmax")
        other.base_exp.fill_(r)
        assert err <= float((other.fake_quant(soft) - soft).pow(2).sum()) + 1e-9
    gelu = torch.nn.functional.gelu(torch.randn(20000, generator=g) * 2)
    qg = AdaLogQuantizer(4, "linear_input")
    obs = Observer()
    obs.update(gelu)
    obs.start_error_pass()
    obs.update(gelu)
    qg.fit(obs)
    assert qg.signed and float(qg.neg_scale) > 0
    levels = qg.level_set()
    assert levels.numel() == 2**4
    _check_log_quantizer(qg, gelu, levels)


def test_scheme_gelu_quantizer_round_trip_and_old_configs():
    s = Scheme("matmul", 4, 4, softmax_quantizer="adalog", gelu_quantizer="adalog")
    assert Scheme.from_dict(s.to_dict()) == s
    old = Scheme("fq", 4, 8).to_dict()
    del old["gelu_quantizer"]  # a config saved before the field existed
    assert Scheme.from_dict(old).gelu_quantizer is None
    q = vitq.prepare(tiny_model("deit"), s)
    assert q.blocks[0].mlp.fc2.input_quant.kind == "adalog" and q.blocks[0].mlp.fc1.input_quant.kind == "uniform"
    assert Scheme("matmul", 3, 3).a_bits == 3


# ------------------------------------------------------------------------------------------ GPTQ
def _weight_quantizer(w, bits, signed=True):
    q = UniformQuantizer(bits, "weight", signed=signed, channel_axis=0, num_channels=w.shape[0])
    q.set_range(w.min(1).values, w.max(1).values)
    return q


@pytest.mark.parametrize("seed", range(8))
def test_gptq_output_error_never_above_nearest(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 40, generator=g, dtype=torch.float64)
    x = torch.randn(300, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 40, generator=g,
                                                                                dtype=torch.float64)  # correlated
    h = 2 * x.t() @ x / x.shape[0]
    for bits, signed in ((3, True), (4, False)):
        quant = grid_quant(_weight_quantizer(w.float(), bits, signed))
        for act_order in (False, True):
            qg = gptq_rows(w, h, quant, damp=0.01, act_order=act_order, block_size=16)
            assert torch.allclose(quant(qg), qg, atol=1e-12)  # on the grid
            e_gptq = float(((qg - w) @ x.t()).pow(2).sum())
            e_near = float(((quant(w) - w) @ x.t()).pow(2).sum())
            assert e_gptq <= e_near, (bits, act_order, e_gptq, e_near)


def _reference_gptq(w, h, quant, order):
    """Hand-written sequential OBQ/GPTQ: round the columns in ``order``; after each, update the remaining
    columns F by -(w_i - q_i) / [H_F^-1]_ii · [H_F^-1]_i,F with the inverse of the remaining sub-Hessian."""
    w = w.clone()
    q = torch.zeros_like(w)
    remaining = list(order)
    while remaining:
        i = remaining[0]
        hinv = torch.linalg.inv(h[remaining][:, remaining])
        q[:, i] = quant(w[:, i])
        err = (w[:, i] - q[:, i]) / hinv[0, 0]
        for j, col in enumerate(remaining[1:], start=1):
            w[:, col] -= err * hinv[0, j]
        remaining = remaining[1:]
    return q


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [1, 2, 3])
def test_gptq_equals_direct_computation_on_three_columns(act_order, block_size):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 3, generator=g, dtype=torch.float64)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    x[:, 1] = 0.3 * x[:, 1] + 2.0 * x[:, 0]  # correlated columns: errors are worth compensating
    x[:, 2] += x[:, 0]
    h = 2 * x.t() @ x / 50
    quant = grid_quant(_weight_quantizer(w.float(), 3))
    got = gptq_rows(w, h, quant, damp=0.0, act_order=act_order, block_size=block_size)
    order = torch.argsort(torch.diag(h), descending=True).tolist() if act_order else [0, 1, 2]
    assert torch.allclose(got, _reference_gptq(w, h, quant, order), atol=1e-10)
    assert not torch.allclose(got, quant(w))  # the compensation did change some code


def test_gptq_state_saves_and_reloads_bit_for_bit(tmp_path):
    model, x = tiny_model("deit"), tiny_images("deit", 12)
    for regime, method in (("fq", "fqvit"), ("matmul", "repq")):
        q = vitq.prepare(model, Scheme(regime, 3, 8), method=method)
        vitq.calibrate(q, x, method=method, progress=False)
        with torch.no_grad():
            nearest = q(x)
        info = vitq.round_weights(q, x, how="gptq", progress=False)
        assert info["gptq"]["layers_rounded"] == 10  # patch embed, 2 x (qkv, proj, fc1, fc2), head
        with torch.no_grad():
            rounded = q(x)
            ref = model(x)
        assert float((rounded - ref).pow(2).mean()) < float((nearest - ref).pow(2).mean())
        for m in q.modules():
            if hasattr(m, "weight_quant"):
                assert torch.equal(m.weight_quant(m.weight), m.weight) and not bool(m.weight_correction)
        vitq.save(q, tmp_path)
        back = vitq.load(model, tmp_path)
        with torch.no_grad():
            assert torch.equal(back(x), rounded)
        batches = [(x, torch.arange(12) % 10)]
        assert vitq.evaluate(back, model, batches, progress=False) == vitq.evaluate(q, model, batches, progress=False)
    with pytest.raises(VitqError, match="weight-rounding"):
        vitq.round_weights(q, x, how="stochastic")


def test_cli_weight_rounding_gptq_recorded_and_reloads(tmp_path):
    name, kw = TINY["deit"]
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model("deit").state_dict().items()}, str(weights))
    calib = make_image_folder(tmp_path / "calib", per_class=3, seed=1)
    val = make_image_folder(tmp_path / "val", per_class=3, seed=2)
    out = tmp_path / "out"
    common = ["--model", name, "--model-args", json.dumps(kw), "--weights", str(weights), "--val", str(val),
              "--batch-size", "4", "--num-workers", "0", "--quiet"]
    assert main(["quantize", *common, "--calib", str(calib), "--scheme", "matmul", "--w-bits", "3", "--a-bits", "4",
                 "--method", "repq", "--softmax-quantizer", "adalog", "--gelu-quantizer", "adalog",
                 "--weight-rounding", "gptq", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["weight_rounding"]["weight_rounding"] == "gptq" and r["weight_rounding"]["gptq"]["layers_rounded"] == 10
    assert r["calibration"]["reparam_layers"] == 4 and r["scheme_config"]["gelu_quantizer"] == "adalog"
    assert main(["evaluate", *common, "--state", str(out), "--out", str(tmp_path / "ev.json")]) == 0
    assert json.loads((tmp_path / "ev.json").read_text())["quant"] == r["quant"]


# ------------------------------------------------------------------------------------------ mse range search
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_mse_range_search_keeps_the_short_side_and_beats_omse(bits):
    """Post-GELU-like values ([-0.17, long positive tail]): the per-end search keeps GELU's negative side,
    clips the tail, and its squared error is never above OMSE's or min/max's on the values it searched."""
    from vitq.quant.observers import apply_range

    g = torch.Generator().manual_seed(bits)
    pre = torch.randn(50000, generator=g)
    pre[:4] = pre[:4].abs() * 15 + 10  # a few massive activations, as in real ViT MLPs
    x = torch.nn.functional.gelu(pre)
    obs = Observer()
    obs.update(x)
    obs.start_error_pass()
    obs.update(x)
    errs = {}
    for how in ("mse", "omse", "minmax"):
        q = UniformQuantizer(bits, "linear_input")
        apply_range(q, obs, how)
        errs[how] = float((q.fake_quant(x) - x).pow(2).sum())
        if how == "mse":
            lo = float(-q.zero_point * q.scale)
            hi = float((q.qmax - q.zero_point) * q.scale)
    assert errs["mse"] <= errs["omse"] * (1 + 1e-5) and errs["mse"] <= errs["minmax"] * (1 + 1e-5), errs
    if bits <= 4:
        assert hi < float(x.max()) * 0.5  # the long tail is clipped
    if bits >= 4:
        assert lo < -0.05  # GELU's negative side is kept
    # signed (symmetric) quantizers search one bound
    w = torch.randn(8, 300, generator=g) * torch.rand(8, 1, generator=g)
    q = UniformQuantizer(bits, "weight", signed=True, channel_axis=0, num_channels=8)
    from vitq.quant.observers import weight_range

    weight_range(q, w, "mse")
    e_mse = (q.fake_quant(w) - w).pow(2).sum(1)
    weight_range(q, w, "minmax")
    e_mm = (q.fake_quant(w) - w).pow(2).sum(1)
    assert bool((e_mse <= e_mm * (1 + 1e-5)).all())


def test_quantiles_rule_picks_one_of_repq_vits_three_ranges():
    """RepQ-ViT's rule (activations from the histogram, weights from their values): the range is one of the
    [q(1-p), q(p)] ranges for p in 0.999 / 0.9999 / 0.99999, the one of least squared error; so at 4 bits a few
    massive values are clipped (mse may clip further, never less error), and at 8 bits less is clipped."""
    from vitq.quant.observers import QUANTILES, apply_range, weight_range

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200000, generator=g)
    x[:30] = 40.0 + torch.rand(30, generator=g)  # 0.015 % massive values
    obs = Observer()
    obs.update(x)
    obs.start_error_pass()
    obs.update(x)
    cands = [(float(torch.quantile(x, 1 - p)), float(torch.quantile(x, p))) for p in QUANTILES]
    errs, ranges = {}, {}
    for bits in (4, 8):
        for how in ("quantiles", "mse", "minmax"):
            q = UniformQuantizer(bits, "linear_input")
            apply_range(q, obs, how)
            errs[bits, how] = float((q.fake_quant(x) - x).pow(2).sum())
            ranges[bits, how] = (float(-q.zero_point * q.scale), float((q.qmax - q.zero_point) * q.scale))
        lo, hi = ranges[bits, "quantiles"]
        step = (hi - lo) / (2**bits - 1)
        assert any(abs(hi - c_hi) < 2 * step + 0.05 and abs(lo - c_lo) < 2 * step + 0.05 for c_lo, c_hi in cands)
        assert errs[bits, "mse"] <= errs[bits, "quantiles"] * (1 + 1e-4) < errs[bits, "minmax"]
    assert ranges[4, "quantiles"][1] < 10 < 40 < ranges[8, "quantiles"][1]  # 4 bits clip the massive values
    # weights: exact quantiles per row; each row's error is the least of its three candidates
    w = torch.randn(6, 4000, generator=g)
    w[:, 0] = 12.0
    q = UniformQuantizer(4, "weight", signed=False, channel_axis=0, num_channels=6)
    weight_range(q, w, "quantiles")
    got = (q.fake_quant(w) - w).pow(2).sum(1)
    for p in QUANTILES:
        c = UniformQuantizer(4, "weight", signed=False, channel_axis=0, num_channels=6)
        c.set_range(torch.quantile(w, 1 - p, dim=1).clamp(max=0), torch.quantile(w, p, dim=1))
        assert bool((got <= (c.fake_quant(w) - w).pow(2).sum(1) * (1 + 1e-3)).all())

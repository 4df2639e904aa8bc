"""Every registered method on tiny models of each family, under both schemes; observers; state round trip."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, tiny_images, tiny_model

import vitq
from vitq.methods.baselines import weighted_modules
from vitq.quant.base import quantizers_of
from vitq.quant.observers import OMSE_FACTORS, Observer, apply_range, weight_range
from vitq.quant.uniform import UniformQuantizer
from vitq.registry import METHODS
from vitq.scheme import Scheme

BASELINES = ["minmax", "percentile", "omse", "fqvit"]


def kl(p_logits, q_logits):
    lp, lq = F.log_softmax(p_logits, 1), F.log_softmax(q_logits, 1)
    return float((lp.exp() * (lp - lq)).sum(1).mean())


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("scheme", ["fq", "matmul"])
@pytest.mark.parametrize("method", BASELINES)
def test_baselines_calibrate_every_quantizer(family, scheme, method):
    model = tiny_model(family)
    calib, x = tiny_images(family, 16, seed=1), tiny_images(family, 8, seed=2)
    q = vitq.prepare(model, Scheme(scheme, 8, 8), method=method)
    info = vitq.calibrate(q, calib, method, batch_size=8, progress=False)
    assert info["method"] == method and info["seconds"] >= 0
    assert all(bool(qz.initialized) for qz in quantizers_of(q).values())
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)  # it does quantize
    assert kl(ref, out) < 0.05  # and at 8 bits stays close to float


def test_fewer_bits_hurt_more():
    model, calib, x = tiny_model("deit"), tiny_images("deit", 16, 1), tiny_images("deit", 16, 2)
    errs = []
    for bits in (8, 6, 4):
        q = vitq.prepare(model, Scheme("matmul", bits, bits))
        vitq.calibrate(q, calib, "omse", progress=False)
        with torch.no_grad():
            errs.append(float((q(x) - model(x)).pow(2).mean()))
    assert errs[0] < errs[1] < errs[2]


def test_observer_sees_all_batches_and_ranges():
    obs = Observer()
    obs.update(torch.tensor([0.0, 1.0, 2.0]))
    obs.update(torch.tensor([-3.0, 0.5]))
    assert (obs.min, obs.max, obs.batches) == (-3.0, 2.0, 2)
    q = UniformQuantizer(8, "x")
    apply_range(q, obs, "minmax")
    assert torch.isclose(q.scale, torch.tensor(5.0 / 255))


def _observe_twice(obs: Observer, batches, q=None) -> None:
    """Both observer passes over the same data: ranges first, then the errors the searches need."""
    for b in batches:
        obs.update(b)
    obs.start_error_pass(q)
    for b in batches:
        obs.update(b)


def test_omse_never_worse_than_minmax_on_all_values():
    torch.manual_seed(0)
    batches = [torch.randn(4000) ** 3 for _ in range(3)]  # heavy tails: clipping pays off
    obs = Observer()
    _observe_twice(obs, batches)
    x = torch.cat(batches)
    errs = {}
    for how in ("minmax", "omse"):
        q = UniformQuantizer(4, "x")
        apply_range(q, obs, how)
        errs[how] = float((q(x) - x).pow(2).sum())
    assert errs["omse"] < errs["minmax"]


def test_omse_histogram_search_matches_the_exact_search():
    """The histogram over every value picks the shrink factor an exact search over all values picks."""
    torch.manual_seed(1)
    batches = [torch.randn(20000) * torch.rand(20000) ** 4 * 6 for _ in range(2)]
    obs = Observer()
    _observe_twice(obs, batches)
    q = UniformQuantizer(6, "x")
    apply_range(q, obs, "omse")
    x = torch.cat(batches)
    exact = []
    for f in OMSE_FACTORS:
        ref = UniformQuantizer(6, "x")
        ref.set_range(x.min() * f, x.max() * f)
        exact.append(float((ref(x) - x).pow(2).sum()))
    got = float((q(x) - x).pow(2).sum())
    assert got <= min(exact) * 1.01


def test_residual_quantizers_follow_the_fqvit_rule():
    """fq residual / LayerNorm-input (PTF) quantizers: global min/max over every calibration value, so a rare
    massive-activation token is never clipped, and each channel's shift has the lowest squared error over all
    values. The old sampled OMSE shrank the range whenever the sample missed the rare token."""
    model = tiny_model("deit")
    calib = tiny_images("deit", 16, seed=1)
    with torch.no_grad():  # one token of one image carries a massive activation in the residual stream
        model.pos_embed[0, 3, 5] += 60.0
    q = vitq.prepare(model, Scheme("fq", 8, 8))
    info = vitq.calibrate(q, calib, "omse", batch_size=8, progress=False)
    assert "FQ-ViT rule" in info["ptf"] and info["calibration_passes"] == 2
    rq = q.blocks[0].res_quant1
    rq = getattr(rq, "token_quant", rq)  # the patch tokens' quantizer (the class token has its own, PrefixSplit)
    captured = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        model(calib)
    hook.remove()
    x = captured[0].reshape(-1, captured[0].shape[-1])
    lo, hi = float(x.min()), float(x.max())
    scale, zero = rq.global_params(lo, hi)
    assert torch.isclose(rq.scale, torch.tensor(scale)) and float(rq.zero_point) == zero
    assert (rq.qmax - zero) * scale >= hi * (1 - 1e-6)  # the outlier token lies inside the range
    errs = torch.stack([((torch.clamp(torch.round(x / (scale * 2.0**-k)) + zero, rq.qmin, rq.qmax) - zero)
                         * scale * 2.0**-k - x).pow(2).sum(0) for k in range(rq.max_shift + 1)])
    assert torch.equal(rq.shift, errs.argmin(0).float())
    assert len(set(rq.shift.tolist())) > 1  # the outlier channel keeps shift 0, quiet channels shift finer


def test_percentile_is_mean_of_batch_percentiles():
    obs = Observer(percentile=0.99)
    obs.update(torch.arange(100.0))
    obs.update(torch.arange(100.0) * 2)
    q = UniformQuantizer(8, "x")
    apply_range(q, obs, "percentile")
    assert obs.pct_hi == [98.0, 196.0]
    assert obs.pct_lo == [1.0, 2.0]
    assert torch.isclose(q.scale, torch.tensor((98.0 + 196.0) / 2 / 255))  # lo is clamped to 0


def test_weight_omse_per_channel_and_bias_correction():
    torch.manual_seed(0)
    w = torch.randn(6, 50) * torch.arange(1, 7)[:, None]
    q = UniformQuantizer(3, "weight", signed=True, channel_axis=0, num_channels=6)
    weight_range(q, w, "omse")
    e_omse = (q(w) - w).pow(2).sum(1)
    weight_range(q, w, "minmax")
    e_mm = (q(w) - w).pow(2).sum(1)
    assert torch.all(e_omse <= e_mm + 1e-6)

    model = tiny_model("deit")
    qm = vitq.prepare(model, Scheme("fq", 3, 8))
    vitq.calibrate(qm, tiny_images("deit", 8), "fqvit", progress=False)
    m = weighted_modules(qm)["blocks.0.mlp.fc1"]
    assert bool(m.weight_correction)
    w, w_hat = m.weight, m.quantized_weight()
    assert torch.allclose(w_hat.mean(1), w.mean(1), atol=1e-5) and torch.allclose(w_hat.std(1), w.std(1), atol=1e-5)


@pytest.mark.parametrize("family", ["deit", "swin"])
def test_save_load_round_trip(tmp_path, family):
    model, calib, x = tiny_model(family), tiny_images(family, 8, 1), tiny_images(family, 4, 2)
    q = vitq.prepare(model, Scheme("fq", 4, 8, softmax_quantizer="log2"))
    vitq.calibrate(q, calib, "fqvit", progress=False)
    vitq.save(q, tmp_path, model="tiny")
    q2 = vitq.load(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


def test_registry_lists_the_baselines():
    assert set(BASELINES) <= set(METHODS)


@pytest.mark.parametrize("method", BASELINES)
def test_per_head_attention_quantizers(method):
    model, calib = tiny_model("swin"), tiny_images("swin", 8, 1)
    q = vitq.prepare(model, Scheme("matmul", 8, 8, attn_granularity="head"))
    vitq.calibrate(q, calib, method, progress=False)
    attn = q.layers[1].blocks[0].attn
    assert attn.k_quant.scale.shape == (attn.num_heads,) and attn.k_quant.channel_axis == 1
    assert len(set(attn.k_quant.scale.tolist())) == attn.num_heads  # each head has its own range
    with torch.no_grad():
        assert kl(model(calib), q(calib)) < 0.05


def test_per_head_minmax_matches_each_heads_range():
    obs = Observer(channel_axis=1)
    x = torch.randn(2, 3, 5, 4) * torch.tensor([1.0, 5.0, 0.1])[None, :, None, None]
    obs.update(x)
    q = UniformQuantizer(8, "k", channel_axis=1, num_channels=3)
    apply_range(q, obs, "minmax")
    lo = x.transpose(0, 1).reshape(3, -1).min(1).values.clamp(max=0)
    hi = x.transpose(0, 1).reshape(3, -1).max(1).values.clamp(min=0)
    assert torch.allclose(q.scale, (hi - lo) / 255)

"""What reconstruction learns beyond AdaRound and LSQ (issue 26): log-quantizer scales through a straight-through
estimator, PTF scales, biases; the held-out early stop, GPTQ's compensated start and the budget-to-steps rule.
Tiny random-init models."""

import math

import pytest
import torch
from conftest import tiny_images, tiny_model

import vitq
from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.quant.log import AdaLogQuantizer, LogSqrt2Quantizer
from vitq.quant.modules import QWeighted
from vitq.quant.uniform import PTFQuantizer
from vitq.refine.gptq import CONTINUOUS
from vitq.refine.recon_budget import plan_iters
from vitq.refine.recon_learn import Dropper, LogScaleQuantizer, PtfLsqQuantizer, Rounding, kl_loss
from vitq.refine.recon_pieces import Cache, pieces_of

FAST = {"iters": 12, "batch": 4, "lr": 0.05, "scale_lr": 0.01}
pytestmark = pytest.mark.usefixtures("one_thread")


def _calibrated(scheme="matmul", method=None, w_bits=3, a_bits=4, n=8, **kinds):
    model = tiny_model("deit")
    images = tiny_images("deit", n, seed=1)
    method = method or ("fqvit" if scheme == "fq" else "repq")
    q = vitq.prepare(model, vitq.Scheme(scheme, w_bits=w_bits, a_bits=a_bits, **kinds), method=method)
    vitq.calibrate(q, images, method=method, batch_size=4, progress=False)
    return q, model, images


def _recon(q, model, images, **options):
    return vitq.refine(q, model, images, "recon", batch_size=4, progress=False, **{**FAST, **options})


def _state(q, keyword):
    return {k: v.clone() for k, v in q.state_dict().items() if keyword(k)}


def test_log_scale_ste_has_the_quantizer_values_and_the_level_gradient():
    q = AdaLogQuantizer(4, "post_gelu")
    q.base_exp.fill_(1.5)
    q.scale.fill_(2.0)
    q.neg_scale.fill_(0.03)
    q.mark_initialized()
    x = torch.linspace(-0.2, 3.0, 301).requires_grad_(True)
    q.scale.requires_grad_(True)
    q.neg_scale.requires_grad_(True)
    wrapped = LogScaleQuantizer(q, Dropper([], 0.0))
    y = wrapped(x)
    assert torch.equal(y.detach(), q.fake_quant(x.detach()))
    g = torch.randn(301, generator=torch.Generator().manual_seed(0))
    (y * g).sum().backward()
    yq = y.detach()
    assert float(q.scale.grad) == pytest.approx(float((g * torch.where(yq > 0, yq / 2.0, 0.0)).sum()), rel=1e-5)
    assert float(q.neg_scale.grad) == pytest.approx(float((g * torch.where(yq < 0, yq / 0.03, 0.0)).sum()),
                                                    rel=1e-5)
    # straight through below the top level, nothing above it
    assert torch.equal(x.grad, torch.where(x.detach() <= 2.0, g, torch.zeros_like(g)))
    s = LogSqrt2Quantizer(4, "softmax")
    s.mark_initialized()
    p = torch.rand(50).requires_grad_(True)
    assert torch.equal(LogScaleQuantizer(s, Dropper([], 0.0))(p).detach(), s.fake_quant(p.detach()))


@pytest.mark.parametrize("learn", [True, False])
def test_recon_learns_the_log_scales_only_when_asked(learn):
    q, model, images = _calibrated(softmax_quantizer="adalog", gelu_quantizer="adalog")
    logs = _state(q, lambda k: (".softmax_quant." in k or "fc2.input_quant." in k) and "scale" in k)
    assert logs
    info = _recon(q, model, images, learn_log=learn, iters=20)
    after = q.state_dict()
    changed = [k for k in logs if not torch.equal(logs[k], after[k])]
    accepted = {e["piece"] for e in info["trace"] if not e["kept_start"]}
    if learn:
        assert changed and all(k.split(".")[0] + "." + k.split(".")[1] in accepted for k in changed)
    else:
        assert not changed
    assert all(bool(v.isfinite().all()) and float(v.min()) >= 0 for k, v in after.items() if k in logs)


def test_ptf_lsq_matches_the_quantizer_and_recon_learns_ptf_scales_and_biases():
    q = PTFQuantizer(4, "norm_input", num_channels=6)
    q.set_range(-1.0, 3.0, channel_min=-torch.rand(6), channel_max=torch.rand(6) * 3)
    x = torch.randn(2, 5, 6)
    q.scale.requires_grad_(True)
    y = PtfLsqQuantizer(q, Dropper([], 0.0))(x)
    assert torch.allclose(y, q.fake_quant(x), atol=1e-6)
    y.sum().backward()
    assert q.scale.grad is not None and q.scale.grad.shape == ()
    q.scale.requires_grad_(False)

    qm, model, images = _calibrated(scheme="fq", w_bits=3, a_bits=4)
    ptf = _state(qm, lambda k: k.endswith(".scale") and any(  # (the final norm's under a PrefixSplit)
        isinstance(m, PTFQuantizer) for n, m in qm.named_modules() if k == n + ".scale"))
    biases = _state(qm, lambda k: k.endswith(".bias") and "norm" not in k)
    assert ptf and biases
    _recon(qm, model, images, iters=20, bias_lr=1e-2, learn_bias=True, learn_ptf=True)
    after = qm.state_dict()
    assert any(not torch.equal(ptf[k], after[k]) for k in ptf)
    assert any(not torch.equal(biases[k], after[k]) for k in biases)
    q2, model2, images2 = _calibrated(scheme="fq", w_bits=3, a_bits=4)
    b2 = _state(q2, lambda k: k.endswith(".bias") and "norm" not in k)
    p2 = _state(q2, lambda k: k in ptf)
    _recon(q2, model2, images2, iters=20)  # off by default
    assert all(torch.equal(b2[k], q2.state_dict()[k]) for k in b2)
    assert all(torch.equal(p2[k], q2.state_dict()[k]) for k in p2)


def test_kl_head_loss_and_normalized_loss_are_recorded():
    q, model, images = _calibrated()
    info = _recon(q, model, images, iters=4, head_loss="kl", normalize=True)
    errors = _errors_kl_head(q, model, images)
    assert info["trace"][-1]["mse_after"] == pytest.approx(errors[-1], rel=1e-5)
    assert info["trace"][-1]["metric"] == "kl" and all(e["metric"] == "mse" for e in info["trace"][:-1])
    assert all(e["output_energy"] > 0 for e in info["trace"])
    t = torch.randn(3, 10)
    assert float(kl_loss(t, t)) == pytest.approx(0.0, abs=1e-6) and float(kl_loss(t + torch.randn(3, 10), t)) > 0
    q, model, images = _calibrated()
    info = _recon(q, model, images, iters=4)  # the defaults: MSE everywhere, not normalized
    assert info["trace"][-1]["metric"] == "mse"


def _errors_kl_head(q, model, images) -> list[float]:
    cache = Cache(CalibData(images, batch_size=4, progress=False))
    pieces, out = pieces_of(q, model), []
    for p in pieces:
        t = cache.targets(p)
        out.append(cache.error(p, t, kl_loss if p is pieces[-1] else None))
        cache.advance(p, t)
    return out


def test_held_out_early_stop_keeps_the_best_checked_state():
    q, model, images = _calibrated(n=10)
    info = _recon(q, model, images, iters=60, holdout=0.3, check_every=2, patience=1, lr=5.0, scale_lr=2.0)
    stopped = [e for e in info["trace"] if e["iters"] < 60]
    assert stopped, "an absurd learning rate should stop some piece early"
    for e in info["trace"]:
        if e["layers"] or e["step_sizes"] or e["biases"]:
            assert e["held_out"] and len(e["held_out"]) <= 60 // 2
    assert info["steps_taken"] == [e["iters"] for e in info["trace"]]


def test_gptq_start_uses_the_compensated_weights_and_needs_gptq():
    q, model, images = _calibrated(w_bits=3)
    with pytest.raises(VitqError, match="--recon-start gptq"):
        _recon(q, model, images, start="gptq", iters=2)
    q, model, images = _calibrated(w_bits=3)
    vitq.round_weights(q, images, how="gptq", progress=False)
    layers = [m for m in q.modules() if isinstance(m, QWeighted)]
    assert all(getattr(m, CONTINUOUS).shape == m.weight.shape for m in layers)
    m = layers[1]
    r = Rounding(m, getattr(m, CONTINUOUS))
    # the start is GPTQ's own result: nearest rounding of the compensated weights is the GPTQ weight
    assert torch.allclose(m.weight_quant.fake_quant(getattr(m, CONTINUOUS)), m.weight, atol=1e-6)
    assert r.on_grid < 0.5 and torch.allclose(r.hard(), m.weight, atol=1e-6)
    info = _recon(q, model, images, start="gptq", iters=8)
    assert sum(e["layers_on_grid"] for e in info["trace"]) == 0


def test_budget_turns_into_steps_by_the_stated_rule():
    q, model, images = _calibrated()
    pieces = pieces_of(q, model)
    calib = CalibData(images, batch_size=4, progress=False)
    iters, info = plan_iters(pieces, calib.images, 4, 0.05)
    expect = math.floor((0.05 * 60 - info["fixed_seconds"]) / (len(pieces) * info["seconds_per_step"]))
    assert iters == info["iters"] == max(0, expect) and iters > 0
    assert plan_iters(pieces, calib.images, 4, 1e-6)[0] == 0
    out = _recon(q, model, images, budget_min=0.02)
    assert out["budget"]["budget_min"] == 0.02 and out["config"]["iters"] == out["budget"]["iters"]
    assert all(e["iters"] == out["budget"]["iters"] for e in out["trace"] if e["layers"])

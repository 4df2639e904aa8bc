"""Block reconstruction refiner (recon) and refiner chains, on tiny random-init timm models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import tiny_images, tiny_model

import vitq
from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.quant.modules import QWeighted
from vitq.quant.uniform import UniformQuantizer
from vitq.refine.recon import make_config
from vitq.refine.recon_learn import Dropper, LsqQuantizer, keep_mask, kl_loss
from vitq.refine.recon_pieces import Cache, pieces_of
from vitq.state import load, save

FAST = {"iters": 12, "batch": 4, "lr": 0.05, "scale_lr": 0.01}


pytestmark = pytest.mark.usefixtures("one_thread")


def _calibrated(family="deit", scheme="matmul", method=None, w_bits=3, a_bits=4, n=8):
    model = tiny_model(family)
    images = tiny_images(family, n, seed=1)
    method = method or ("fqvit" if scheme == "fq" else "omse")
    q = vitq.prepare(model, vitq.Scheme(scheme, w_bits=w_bits, a_bits=a_bits), method=method)
    vitq.calibrate(q, images, method=method, batch_size=4, progress=False)
    return q, model, images


def _recon(q, model, images, **options):
    opts = {**FAST, **options}
    return vitq.refine(q, model, images, "recon", batch_size=4, progress=False, **opts)


def _piece_errors(q, model, images, kl_head=False) -> dict[str, float]:
    """Each piece's output MSE against the float piece (with ``kl_head`` the head's: KL of its logits, as
    --recon-head-loss kl measures it), inputs from the quantized model as it is now."""
    cache = Cache(CalibData(images, batch_size=4, progress=False))
    out = {}
    pieces = pieces_of(q, model)
    for p in pieces:
        t = cache.targets(p)
        out[p.name] = cache.error(p, t, kl_loss if kl_head and p is pieces[-1] else None)
        cache.advance(p, t)
    return out


@pytest.mark.parametrize("family,scheme", [("deit", "matmul"), ("deit", "fq"), ("swin", "fq")])
def test_reconstruction_never_increases_the_block_error(family, scheme):
    q, model, images = _calibrated(family, scheme)
    info = _recon(q, model, images)
    assert [e["piece"] for e in info["trace"]] == [p.name for p in pieces_of(q, model)]
    for e in info["trace"]:
        assert e["mse_after"] <= e["mse_before"], e
    # the recorded errors are the errors of the final model (each block's input from the reconstructed ones)
    errors = _piece_errors(q, model, images)
    for e in info["trace"]:
        assert errors[e["piece"]] == pytest.approx(e["mse_after"], rel=1e-5, abs=1e-9)
    assert sum(e["mse_after"] < e["mse_before"] for e in info["trace"]) >= len(info["trace"]) // 2


def test_a_worse_learned_block_is_rejected_and_the_start_restored():
    q, model, images = _calibrated()
    start = {k: v.clone() for k, v in q.state_dict().items()}
    info = _recon(q, model, images, lr=50.0, scale_lr=20.0, weight=0.0, drop_prob=0.0, iters=6)
    kept = [e for e in info["trace"] if e["kept_start"]]
    assert kept, "an absurd learning rate should make some block worse"
    for e in kept:
        assert e["mse_learned"] > e["mse_before"] and e["mse_after"] == e["mse_before"]
    first = info["trace"][0]
    if first["kept_start"]:  # stem: its input is the images, so its state must be exactly the start again
        assert torch.equal(q.state_dict()["patch_embed.proj.weight"], start["patch_embed.proj.weight"])


@pytest.mark.parametrize("scheme", ["matmul", "fq"])
def test_hardened_weights_lie_exactly_on_the_grid(scheme):
    q, model, images = _calibrated(scheme=scheme)
    info = _recon(q, model, images)
    accepted = {e["piece"] for e in info["trace"] if not e["kept_start"]}
    assert accepted
    checked = 0
    for p in pieces_of(q, model):
        if p.name not in accepted:
            continue
        for _, m in p.weighted:
            w = m.weight.detach()
            assert not bool(m.weight_correction)
            assert torch.equal(m.weight_quant(w), w)  # the quantizer maps the stored weight onto itself
            wq = m.weight_quant
            codes = w / wq._view(wq.scale, w) + wq._view(wq.zero_point, w)
            assert torch.allclose(codes, codes.round(), atol=1e-3)
            assert codes.round().min() >= wq.qmin and codes.round().max() <= wq.qmax
            checked += 1
    assert checked > 0


def test_weights_already_on_the_grid_are_counted_and_warned_about(caplog):
    q, model, images = _calibrated(scheme="matmul")
    info = _recon(q, model, images, iters=2)
    assert sum(e["layers_on_grid"] for e in info["trace"]) == 0  # round-to-nearest start: weights off the grid
    q, model, images = _calibrated(scheme="matmul")
    vitq.round_weights(q, images, how="gptq", progress=False)
    n_layers = sum(1 for m in q.modules() if isinstance(m, QWeighted))
    with caplog.at_level("WARNING", logger="vitq"):
        info = _recon(q, model, images, iters=2)
    assert sum(e["layers_on_grid"] for e in info["trace"]) == n_layers
    assert "already on the quantizer grid" in caplog.text


def test_learns_rounding_and_step_sizes_but_not_other_kinds():
    q, model, images = _calibrated(scheme="matmul", method="ptq4vit")  # twin softmax / GELU quantizers
    before = {k: v.clone() for k, v in q.state_dict().items()}
    w_rtn = {n: m.weight_quant(m.weight).detach().clone() for n, m in q.named_modules() if isinstance(m, QWeighted)}
    info = _recon(q, model, images, iters=20)
    after = q.state_dict()
    accepted = [e for e in info["trace"] if not e["kept_start"]]
    assert accepted
    twin = [k for k in before if ".softmax_quant." in k or ".fc2.input_quant." in k]
    assert twin and all(torch.equal(before[k], after[k]) for k in twin)
    scales = [k for k in before if k.endswith("input_quant.scale") and "fc2" not in k]
    assert any(not torch.equal(before[k], after[k]) for k in scales)
    flipped = sum(int((m.weight.detach() != w_rtn[n]).sum()) for n, m in q.named_modules()
                  if isinstance(m, QWeighted))
    assert flipped > 0  # some weights no longer rounded to nearest


def test_resume_equals_uninterrupted_run(tmp_path):
    q0, model, images = _calibrated(scheme="fq")
    full = load_copy(q0, model, tmp_path / "start")
    _recon(full, model, images, seed=3)

    part = load_copy(q0, model, tmp_path / "start")
    ckpt = str(tmp_path / "recon.ckpt")

    def kill_after_second(event):
        if event["index"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _recon(part, model, images, seed=3, checkpoint_path=ckpt, on_block_end=kill_after_second)
    resumed = load_copy(q0, model, tmp_path / "start")
    info = _recon(resumed, model, images, seed=3, checkpoint_path=ckpt)
    assert info["checkpoint"]["resumed"] == {"from_piece": 2} and info["checkpoint"]["runs"] == 2
    assert len(info["trace"]) == len(pieces_of(resumed, model))
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(VitqError, match="another run"):
        _recon(load_copy(q0, model, tmp_path / "start"), model, images, seed=4, checkpoint_path=ckpt)


def load_copy(q, model, folder):
    if not folder.exists():
        folder.mkdir()
        save(q, folder)
    return load(model, folder)


def test_save_load_reproduces_the_recon_state_bit_for_bit(tmp_path):
    q, model, images = _calibrated(scheme="fq")
    _recon(q, model, images)
    save(q, tmp_path)
    q2 = load(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(q(images), q2(images))


@pytest.mark.parametrize("signed,axis", [(False, None), (True, None), (False, 1)])
def test_fused_lsq_matches_autograd_through_the_quantizer(signed, axis):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 4, generator=g) * 2
    q = UniformQuantizer(4, "q", signed=signed, channel_axis=axis, num_channels=3 if axis else 1)
    per = x.transpose(0, 1).reshape(3, -1)
    lo, hi = (per.min(1).values, per.max(1).values) if axis else (x.min(), x.max())
    q.set_range(lo * 0.7, hi * 0.6)  # some values clipped
    codes = torch.round(x / q._view(q.scale, x)) + q._view(q.zero_point, x)
    x = torch.where((codes == q.qmin) | (codes == q.qmax), torch.zeros_like(x), x)  # exactly on the edge, the
    # straight-through gradient of autograd depends on float round-off; the fused op counts the edge as inside
    assert ((codes < q.qmin) | (codes > q.qmax)).any()
    grad_out = torch.randn(x.shape, generator=g)
    x1 = x.clone().requires_grad_(True)
    q.scale.requires_grad_(True)
    (q(x1) * grad_out).sum().backward()
    ref_out, ref_dx, ref_ds = q(x).detach(), x1.grad.clone(), q.scale.grad.clone()
    q.scale.grad = None
    x2 = x.clone().requires_grad_(True)
    out = LsqQuantizer(q, Dropper([], 0.0))(x2)
    (out * grad_out).sum().backward()
    assert torch.equal(out.detach(), ref_out)
    assert torch.allclose(x2.grad, ref_dx) and torch.allclose(q.scale.grad, ref_ds, rtol=1e-4, atol=1e-5)


def test_options_are_validated():
    assert make_config({}).iters == 20000 and make_config({}).drop_prob == 0.5
    with pytest.raises(VitqError, match="--recon-drop-prob"):
        make_config({"drop_prob": 1.5})
    with pytest.raises(VitqError, match="recon: unknown options"):
        make_config({"iterations": 3})


def test_uncalibrated_model_is_refused():
    model = tiny_model("deit")
    q = vitq.prepare(model, vitq.Scheme("matmul", w_bits=4, a_bits=4))
    with pytest.raises(VitqError, match="not calibrated"):
        _recon(q, model, tiny_images("deit", 4))


# ------------------------------------------------------------------------------------------------- chains

def test_chain_records_both_refiners_in_order():
    q, model, images = _calibrated(scheme="fq", w_bits=4, a_bits=8)
    info = vitq.refine(q, model, images, "recon,evolq", batch_size=4, progress=False,
                       recon=dict(FAST), evolq={"passes": 1})
    assert info["refiner"] == "recon,evolq"
    steps = info["chain"]
    assert [s["refiner"] for s in steps] == ["recon", "evolq"]
    assert steps[0]["trace"][0]["piece"] == "stem" and steps[1]["trace"][0]["block"] == "blocks.1"
    for s in steps:
        assert s["seconds"] > 0 and set(s["calib_kl"]) == {"before", "after", "gain"}
    assert steps[0]["calib_kl"]["after"] == pytest.approx(steps[1]["calib_kl"]["before"])
    assert info["calib_kl"]["before"] == steps[0]["calib_kl"]["before"]
    assert info["calib_kl"]["after"] == steps[1]["calib_kl"]["after"]
    assert steps[0]["options"]["iters"] == FAST["iters"] and steps[1]["options"]["passes"] == 1


def test_chain_options_must_name_a_refiner_of_the_chain():
    q, model, images = _calibrated()
    with pytest.raises(VitqError, match="per refiner"):
        vitq.refine(q, model, images, ["recon", "evolq"], progress=False, iters=3)
    with pytest.raises(VitqError, match="unknown refiner"):
        vitq.refine(q, model, images, "recon,nope", progress=False)
    with pytest.raises(VitqError, match="empty"):
        vitq.refine(q, model, images, "recon,,", progress=False)


def test_single_refiner_takes_options_per_refiner_too():
    """Evol-Q's batch_size shares its name with refine()'s calibration batch size: given per refiner it reaches
    Evol-Q, and the calibration batches stay what batch_size= says."""
    q, model, images = _calibrated(scheme="fq", w_bits=4, a_bits=8)
    info = vitq.refine(q, model, images, "evolq", batch_size=4, progress=False,
                       evolq={"passes": 1, "batch_size": 6})
    assert info["refiner"] == "evolq"
    assert info["options"]["batch_size"] == 6 and info["options"]["passes"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_recon_chain_runs_on_cuda():
    q, model, images = _calibrated(scheme="fq", w_bits=4, a_bits=8)
    info = vitq.refine(q, model, images, "recon,evolq", batch_size=4, device="cuda", progress=False,
                       recon=dict(FAST), evolq={"passes": 1})
    assert [s["refiner"] for s in info["chain"]] == ["recon", "evolq"]
    assert all(t.device.type == "cuda" for t in q.state_dict().values())


def test_keep_mask_rate_shape_and_seed():
    shape = (3, 5, 7, 11)
    for p in (0.0, 0.25, 0.5, 1.0):
        m = keep_mask((200, *shape[1:]), p, torch.Generator().manual_seed(0))
        assert m.dtype == torch.bool and m.shape == (200, *shape[1:])
        assert abs(float(m.float().mean()) - p) < 0.01
    a, b = (keep_mask(shape, 0.5, torch.Generator().manual_seed(s)) for s in (1, 1))
    assert torch.equal(a, b) and not torch.equal(a, keep_mask(shape, 0.5, torch.Generator().manual_seed(2)))

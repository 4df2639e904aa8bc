"""Sequential calibration (repq --repq-order sequential, RepQ-ViT's order). Tiny random-init models."""

import pytest
import torch
from conftest import tiny_images, tiny_model

import vitq
from vitq.api import as_calib
from vitq.errors import VitqError
from vitq.methods.sequential import call_order, groups_of, unit_of
from vitq.quant.base import quantizers_of
from vitq.scheme import Scheme

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEME = dict(softmax_quantizer="adalog", gelu_quantizer="adalog")


def _calibrated(order, x, act="minmax"):
    q = vitq.prepare(tiny_model("deit"), Scheme("matmul", 4, 4, **SCHEME), method="repq")
    info = vitq.calibrate(q, x, method="repq", progress=False, batch_size=8, act=act, weights="minmax", order=order)
    return q, info


def _ranges(q):
    return {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in quantizers_of(q).items()
            if m.role != "weight"}


def test_units_and_groups_follow_the_call_order():
    assert unit_of("blocks.3.attn.qkv.input_quant") == "blocks.3"
    assert unit_of("stages.1.blocks.0.mlp.fc1.input_quant") == "stages.1"
    assert unit_of("head.input_quant") == "head"
    assert groups_of(["a.x", "blocks.0.p", "blocks.0.q", "blocks.1.p", "head.x"]) == [
        ["a.x"], ["blocks.0.p", "blocks.0.q"], ["blocks.1.p"], ["head.x"]]
    q = vitq.prepare(tiny_model("deit"), Scheme("matmul", 4, 4, **SCHEME), method="repq")
    order = call_order(q, as_calib(tiny_images("deit", 2), progress=False))
    acts = {n for n, m in quantizers_of(q).items() if m.role != "weight"}
    assert set(order) == acts and len(order) == len(acts)
    units = [unit_of(g[0]) for g in groups_of(order)]
    assert units[units.index("blocks.0"):][:2] == ["blocks.0", "blocks.1"]  # the tiny DeiT has two blocks
    assert len(units) == len(set(units))  # each unit is one run of the order


def test_first_unit_matches_the_float_order_and_later_units_see_quantized_inputs():
    x = tiny_images("deit", 16, seed=3)
    qf, info_f = _calibrated("float", x)
    qs, info_s = _calibrated("sequential", x)
    assert info_s["order"] == "sequential" and info_s["groups"] >= 3
    assert 0 < info_s["calibration_passes"] - 1 < info_s["groups"]  # the reparam pass + partial passes
    rf, rs = _ranges(qf), _ranges(qs)
    order = call_order(qs, as_calib(x[:1], progress=False))
    first = groups_of(order)[0]
    for name in first:  # nothing upstream of the first unit is quantized: the same ranges
        for k in rf[name]:
            assert torch.equal(rf[name][k], rs[name][k]), (name, k)
    later = [n for n in order if unit_of(n) == "blocks.1"]
    assert any(not torch.equal(rf[n][k], rs[n][k]) for n in later for k in rf[n])
    assert all(bool(m.initialized) for m in quantizers_of(qs).values())
    with torch.no_grad():
        assert torch.isfinite(qs(x)).all()


def test_a_pass_stops_at_the_unit_it_needs_and_stale_ranges_are_cleared():
    x = tiny_images("deit", 8, seed=4)
    q, _ = _calibrated("float", x)  # every range set: a second, sequential calibration must start from scratch
    seen = []
    hook = q.head.register_forward_hook(lambda *_: seen.append(1))
    passes = vitq.calibrate(q, x, method="repq", progress=False, batch_size=8, act="mse", weights="minmax",
                            order="sequential", reparam=False)["calibration_passes"]
    hook.remove()
    groups = len(groups_of(call_order(q, as_calib(x[:1], progress=False))))
    # the last pass stops at the head's input quantizer: the head's matmul runs only in the call-order probe
    assert len(seen) == 1 and passes < 2 * groups
    fresh, _ = _calibrated("sequential", x, act="mse")
    assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), fresh.state_dict().values(), strict=True))


def test_unknown_order_is_refused():
    with pytest.raises(VitqError, match="order"):
        _calibrated("backwards", tiny_images("deit", 2))

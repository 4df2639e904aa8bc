"""repq's fold options and weights (issue 26): RepQ-ViT's per-channel percentile search, a partial fold, and
asymmetric per-channel weights. Tiny random-init models."""

import pytest
import torch
from conftest import tiny_images, tiny_model

import vitq
from vitq.api import as_calib
from vitq.errors import VitqError
from vitq.methods.reparam import (
    PERCENTILES,
    _quantile_from_top,
    channel_ranges,
    reparameterize,
    searched_ranges,
    targets,
)
from vitq.quant.modules import QWeighted
from vitq.scheme import Scheme

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quantiles_from_the_kept_extremes_equal_torch_quantile():
    x = torch.randn(5000, 7) * torch.rand(7)
    top = x.topk(12, dim=0).values
    for p in PERCENTILES:
        assert torch.allclose(_quantile_from_top(top, 5000, p), torch.quantile(x, p, dim=0), atol=1e-4)
        assert torch.allclose(-_quantile_from_top((-x).topk(12, dim=0).values, 5000, p),
                              torch.quantile(x, 1 - p, dim=0), atol=1e-4)


@pytest.mark.parametrize("channel_range,power", [("percentile", 1.0), ("minmax", 0.5), ("percentile", 0.0)])
def test_percentile_and_partial_folds_leave_the_float_function_unchanged(channel_range, power):
    model, x = tiny_model("deit"), tiny_images("deit", 6)
    q = vitq.prepare(model, Scheme("matmul", 4, 4))
    with torch.no_grad():
        before = q(x)
    w0 = {n: lin.weight.clone() for n, (_, lin) in targets(q).items()}
    info = reparameterize(q, as_calib(x, batch_size=3, progress=False), channel_range, power)
    with torch.no_grad():
        after = q(x)
    assert float((after - before).abs().max()) < 1e-4 * float(before.abs().max())
    changed = any(not torch.equal(lin.weight, w0[n]) for n, (_, lin) in targets(q).items())
    assert changed == (power > 0)
    assert info["reparam_power"] == power and info["reparam_channel_range"] == channel_range
    if channel_range == "percentile":
        assert sum(info["reparam_percentiles"].values()) == sum(lin.in_features for _, lin in targets(q).values())
    with pytest.raises(VitqError, match="fold power"):
        reparameterize(q, as_calib(x, progress=False), "minmax", 1.5)


def test_percentile_search_clips_an_outlier_channel():
    """A channel with one large value among 6,400: the searched range clips it at 4 bits, min/max does not; a
    well-behaved channel keeps (nearly) its full range."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    x = torch.randn(64, 100, 3)
    x[5, 7, 0] = 12.0  # clipping it costs (12 - 3.3)^2; keeping it coarsens the grid of 6,399 values
    calib = as_calib(x, batch_size=16, progress=False)
    lo_mm, hi_mm = channel_ranges(model, calib, ["0"])["0"]
    assert float(hi_mm[0]) == 12.0
    lo, hi, chosen = searched_ranges(model, calib, ["0"], {"0": 4})["0"]
    assert float(hi[0]) < 5.0 and float(chosen[0]) < 1.0
    assert torch.all(hi <= hi_mm) and torch.all(lo >= lo_mm)
    assert float(hi[1]) > 0.8 * float(hi_mm[1])


def test_repq_weights_asymmetric_unless_the_scheme_says_signed():
    model, x = tiny_model("deit"), tiny_images("deit", 4)
    q = vitq.prepare(model, Scheme("matmul", 4, 4), method="repq")
    vitq.calibrate(q, x, method="repq", progress=False)
    layers = [m for m in q.modules() if isinstance(m, QWeighted)]
    assert all(not m.weight_quant.signed and m.weight_quant.qmax == 15 for m in layers)
    assert q.vitq_scheme.weight_signed is False
    q = vitq.prepare(model, Scheme("matmul", 4, 4, weight_signed=True), method="repq")
    assert all(m.weight_quant.signed for m in q.modules() if isinstance(m, QWeighted))
    q = vitq.prepare(model, Scheme("matmul", 4, 4), method="repq", options={"asym_weights": False})
    assert all(m.weight_quant.signed for m in q.modules() if isinstance(m, QWeighted))

"""Fisher-weighted reconstruction loss (``loss_weight="fisher"``, issue 26) on a tiny random-init DeiT."""

import pytest
import torch
from conftest import tiny_images, tiny_model

import vitq
from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.refine.recon import make_config
from vitq.refine.recon_fisher import fisher_weights
from vitq.refine.recon_learn import rec_loss
from vitq.refine.recon_pieces import Cache, frozen_parameters, pieces_of

pytestmark = pytest.mark.usefixtures("one_thread")


def _calibrated(n=12):
    model = tiny_model("deit")
    images = tiny_images("deit", n, seed=1)
    q = vitq.prepare(model, vitq.Scheme("matmul", w_bits=3, a_bits=4))
    vitq.calibrate(q, images, method="minmax", batch_size=4, progress=False)
    return q, model, images


def test_fisher_weights_are_the_normalized_squared_gradients_of_the_own_prediction():
    q, model, images = _calibrated()
    calib = CalibData(images, batch_size=5, progress=False)  # uneven batches: 5 + 5 + 2
    pieces = pieces_of(q, model, probe=images[:1])
    with frozen_parameters(q, model):
        weights, info = fisher_weights(pieces, calib)
    assert len(weights) == len(pieces) and info["images"] == 12
    cache = Cache(calib)
    for p, w in zip(pieces, weights, strict=True):
        targets = cache.targets(p)
        assert [t.shape for t in targets] == [x.shape for x in w]
        flat = torch.cat([x.float().reshape(-1) for x in w])
        assert float(flat.min()) >= 0 and float(flat.max()) > 0
        assert float(flat.mean()) == pytest.approx(1.0, rel=1e-2)  # (bfloat16)
        cache.advance(p, targets)
    # the head's logits: d CE(z, argmax z) / dz = softmax(z) - onehot(argmax z), squared and normalized
    with torch.no_grad():
        z = model(images)
    g2 = (z.softmax(-1) - torch.nn.functional.one_hot(z.argmax(-1), z.shape[-1])).pow(2)
    assert torch.allclose(torch.cat(weights[-1]).float(), g2 / g2.mean(), rtol=2e-2, atol=1e-4)
    # the last block feeds the head through the class token only: its patch tokens get weight 0
    last_block = torch.cat(weights[-2]).float()
    assert float(last_block[:, 1:].abs().max()) == 0.0 and float(last_block[:, 0].abs().max()) > 0


def test_fisher_weights_change_the_loss_and_the_reconstruction():
    q, model, images = _calibrated()
    out, target = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    w = torch.rand(4, 5, 8) * 2
    assert float(rec_loss(out, target, w)) != pytest.approx(float(rec_loss(out, target)))
    assert float(rec_loss(out, target, torch.ones_like(w))) == pytest.approx(float(rec_loss(out, target)))
    opts = {"iters": 8, "batch": 4, "lr": 0.05, "scale_lr": 0.01, "seed": 0}
    results = {}
    for weight in ("none", "fisher"):
        qq = vitq.prepare(model, vitq.Scheme("matmul", w_bits=3, a_bits=4))
        qq.load_state_dict(q.state_dict())
        info = vitq.refine(qq, model, images, "recon", batch_size=4, progress=False, loss_weight=weight, **opts)
        results[weight] = (info, {k: v.clone() for k, v in qq.state_dict().items()})
    fisher, plain = results["fisher"][0], results["none"][0]
    assert fisher["fisher"]["images"] == 12 and plain["fisher"] is None
    assert {e["metric"] for e in fisher["trace"][:-1]} == {"fisher-mse"}
    assert [e["mse_before"] for e in fisher["trace"]] != [e["mse_before"] for e in plain["trace"]]
    a, b = results["fisher"][1], results["none"][1]
    assert any(not torch.equal(a[k], b[k]) for k in a)  # a different reconstruction


def test_loss_weight_option_is_checked():
    assert make_config({}).loss_weight == "none"
    assert make_config({"loss_weight": "fisher"}).loss_weight == "fisher"
    with pytest.raises(VitqError, match="loss-weight"):
        make_config({"loss_weight": "hessian"})

"""Block reconstruction (recon) on CNNs: the pieces of a timm CNN (its stem found by running it, every
residual / inverted-residual block, the head) and reconstruction through them."""

import pytest
import torch
from conftest import tiny_images, tiny_model

import vitq
from vitq.refine.recon_pieces import pieces_of

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"iters": 12, "batch": 4, "lr": 0.05, "scale_lr": 0.01}
STEM = {"effnet": "conv_stem", "resnet": "conv1"}


@pytest.mark.parametrize("key", ["effnet", "resnet"])
def test_cnn_pieces_own_their_layers(key):
    model, x = tiny_model(key), tiny_images(key, 2)
    q = vitq.prepare(model, vitq.Scheme("matmul", 4, 8))
    vitq.calibrate(q, x, method="minmax", progress=False)
    pieces = pieces_of(q, model, probe=x[:1])
    stem, tail = pieces[0], pieces[-1]
    assert [n for n, _ in stem.weighted] == [STEM[key]]  # the first convolution, found by running the stem
    assert all(not n.startswith(STEM[key]) for n, _ in tail.weighted)
    owned = [n for p in pieces for n, _ in p.weighted]
    assert len(owned) == len(set(owned)) == sum(hasattr(m, "weight_quant") for m in q.modules())


@pytest.mark.parametrize("key", ["effnet", "resnet"])
def test_recon_on_a_cnn_lowers_the_output_error(key):
    model, x = tiny_model(key), tiny_images(key, 8, seed=1)
    q = vitq.prepare(model, vitq.Scheme("matmul", 4, 8))
    vitq.calibrate(q, x, method="minmax", batch_size=4, progress=False)
    with torch.no_grad():
        ref = model(x)
        before = float((q(x) - ref).pow(2).mean())
    info = vitq.refine(q, model, x, "recon", batch_size=4, progress=False, **FAST)
    trace = info["trace"]
    assert trace[0]["piece"] == "stem" and trace[0]["layers"] == 1 and trace[-1]["piece"] == "tail"
    assert all(e["mse_after"] <= e["mse_before"] for e in trace)
    assert sum(e["mse_after"] < e["mse_before"] for e in trace) >= len(trace) // 2
    with torch.no_grad():
        assert float((q(x) - ref).pow(2).mean()) < before
    learned = {e["piece"] for e in trace if not e["kept_start"]}
    for p in pieces_of(q, model, probe=x[:1]):
        for _, m in p.weighted if p.name in learned else []:
            assert torch.equal(m.weight_quant(m.weight), m.weight)  # hardened onto the grid

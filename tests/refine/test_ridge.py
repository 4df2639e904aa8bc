"""ERQ-style closed-form ridge refiner (ridge, issue 26): the solve, the held-out guard, the layer-by-layer order,
the head, the options, a chain and the saved state."""

import copy

import pytest
import torch
from conftest import tiny_images, tiny_model
from torch import nn

import vitq
from vitq.errors import VitqError
from vitq.quant.base import passthrough
from vitq.quant.modules import QLinear
from vitq.refine.ridge import Moments, refit_layer, ridge_solve, split_images
from vitq.state import load, save

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_moments_error_and_solve_are_the_ridge_problem():
    g = _gen()
    x = torch.randn(300, 6, generator=g, dtype=F64)
    # a quantized input with a systematic error (a gain and an offset) beside noise: what a linear refit can undo
    xq = 0.8 * x + 0.3 + 0.02 * torch.randn(300, 6, generator=g, dtype=F64)
    w, b = torch.randn(4, 6, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    y = x @ w.T + b
    m = Moments()
    m.add(xq[:100], y[:100])
    m.add(xq[100:], y[100:])
    direct = lambda w2, b2: float((xq @ w2.T + b2 - y).pow(2).mean())  # noqa: E731
    assert m.mse(w, b) == pytest.approx(direct(w, b), rel=1e-10)
    sol, lam = ridge_solve(m, w, b, 0.05)
    assert lam == pytest.approx(0.05 * float((xq * xq).sum(0).mean()))
    # the stacked least-squares problem [X̃ 1; √λ I] [W' b']ᵀ = [Y; √λ [W b]ᵀ]
    xa = torch.cat([xq, torch.ones(300, 1, dtype=F64)], 1)
    lhs = torch.cat([xa, lam**0.5 * torch.eye(7, dtype=F64)])
    rhs = torch.cat([y, lam**0.5 * torch.cat([w, b[:, None]], 1).T])
    assert torch.allclose(sol, torch.linalg.lstsq(lhs, rhs).solution.T, atol=1e-8)
    assert direct(sol[:, :6], sol[:, 6]) < 0.1 * direct(w, b)
    no_bias, _ = ridge_solve(m, w, None, 0.05)
    assert no_bias.shape == w.shape


def _layer(w: torch.Tensor, b: torch.Tensor, bits: int = 8) -> QLinear:
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    layer = QLinear(lin, bits, bits, True)
    layer.weight_quant.set_range(w.min(1).values * 1.5, w.max(1).values * 1.5)
    return layer


def _moments(x, y):
    m = Moments()
    m.add(x, y)
    return m


@pytest.mark.parametrize("rounding", ["gptq", "nearest"])
def test_held_out_guard_keeps_a_fit_that_generalizes_and_restores_one_that_does_not(rounding):
    g = _gen(1)
    w, b = torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    delta = 0.3 * torch.randn(8, 16, generator=g)
    x_train, x_held = torch.randn(400, 16, generator=g), torch.randn(100, 16, generator=g)
    train = _moments(x_train, x_train @ (w + delta).T + b)  # the train images ask for W + Δ
    # held-out images that agree: the update is kept, on the weight grid, and lowers both errors
    layer = _layer(w, b)
    e = refit_layer(layer, train, _moments(x_held, x_held @ (w + delta).T + b), (0.01, 3.0), rounding)
    assert e["accepted"] and e["damp"] == 0.01  # the weaker penalty reaches W + Δ: lower held-out error
    assert e["mse_held_by_damp"]["0.01"] < e["mse_held_by_damp"]["3.0"]
    assert e["mse_held_after"] < 0.2 * e["mse_held_before"] and e["mse_train_after"] < 0.2 * e["mse_train_before"]
    if rounding == "gptq":
        assert torch.equal(layer.weight_quant(layer.weight), layer.weight)
    assert not torch.equal(layer.weight, w)
    # held-out images that ask for W − Δ: the same update raises their error, so the layer is restored exactly
    layer = _layer(w, b)
    start = copy.deepcopy(layer.state_dict())
    e = refit_layer(layer, train, _moments(x_held, x_held @ (w - delta).T + b), (0.01,), rounding)
    assert not e["accepted"] and e["mse_held_after"] >= e["mse_held_before"]
    assert e["mse_train_after"] < e["mse_train_before"]  # the train images alone would have taken it
    assert all(torch.equal(v, start[k]) for k, v in layer.state_dict().items())


def _quantized(n=40):
    model, x = tiny_model("deit"), tiny_images("deit", n, seed=1)
    q, _ = vitq.quantize(model, x, "matmul", "minmax", w_bits=4, a_bits=4, progress=False)
    return q, model, x


@torch.no_grad()
def _layer_mse(q, start, name, images):
    """The layer's output MSE in the final model on ``images``: its quantized input in ``q`` against the output
    of the same layer in the float function of the starting model (``start`` with its quantizers passed
    through)."""
    seen = {}
    layer, twin = q.get_submodule(name), start.get_submodule(name)
    hooks = [layer.register_forward_hook(lambda m, i, out: seen.__setitem__("q", out)),
             twin.register_forward_hook(lambda m, i, out: seen.__setitem__("f", out))]
    q(images)
    with passthrough(start):
        start(images)
    for h in hooks:
        h.remove()
    return float((seen["q"].double() - seen["f"].double()).pow(2).mean())


def test_ridge_refits_layer_by_layer_with_the_corrected_upstream_inputs():
    q, model, x = _quantized()
    start = copy.deepcopy(q)
    info = vitq.refine(q, model, x, "ridge", batch_size=8, progress=False, seed=3)
    layers = info["layers"]
    solved = [n for n, e in layers.items() if "accepted" in e]
    assert len(solved) == 8 and info["layers_accepted"] and info["num_held"] == 8
    assert info["reference_logit_gap"] < 1e-4  # the targets are the float model's
    train_idx, held_idx = split_images(len(x), 0.2, 3)
    final, begin = q.state_dict(), start.state_dict()
    for n in solved:
        e = layers[n]
        if not e["accepted"]:
            assert all(torch.equal(final[f"{n}.{k}"], begin[f"{n}.{k}"]) for k in ("weight", "bias"))
            continue
        assert e["mse_held_after"] < e["mse_held_before"]
        w = q.get_submodule(n).weight
        assert torch.equal(q.get_submodule(n).weight_quant(w), w)  # on the grid, its scales kept
        assert torch.equal(final[f"{n}.weight_quant.scale"], begin[f"{n}.weight_quant.scale"])
        # the recorded errors are those of the final model: each layer was solved on its inputs as every
        # upstream layer left them (a solve from inputs captured once, before, would not match)
        assert _layer_mse(q, start, n, x[train_idx]) == pytest.approx(e["mse_train_after"], rel=1e-4)
        assert _layer_mse(q, start, n, x[held_idx]) == pytest.approx(e["mse_held_after"], rel=1e-4)


def test_the_head_is_left_alone_unless_asked():
    q, model, x = _quantized(n=12)
    q2 = copy.deepcopy(q)
    info = vitq.refine(q, model, x, "ridge", batch_size=12, progress=False, damp=0.1)
    assert info["layers"]["head"] == {"skipped": "head (--ridge-head refits it)"}
    assert torch.equal(q.head.weight, q2.head.weight) and torch.equal(q.head.bias, q2.head.bias)
    info = vitq.refine(q2, model, x, "ridge", batch_size=12, progress=False, head=True, damp=0.1)
    assert "accepted" in info["layers"]["head"] and info["config"]["head"] is True


@pytest.mark.parametrize("options,flag", [({"damp": 0}, "--ridge-damp"), ({"damp": "0.1,-1"}, "--ridge-damp"),
                                          ({"damp": ""}, "--ridge-damp"), ({"holdout": 1.0}, "--ridge-holdout"),
                                          ({"holdout": 0}, "--ridge-holdout"),
                                          ({"rounding": "floor"}, "--ridge-rounding"), ({"lamda": 1}, "unknown")])
def test_bad_options_are_refused_naming_the_flag(options, flag):
    q, model, x = _quantized(n=4)  # options are checked before anything runs
    with pytest.raises(VitqError, match=flag):
        vitq.refine(q, model, x, "ridge", batch_size=4, progress=False, **options)


def test_a_holdout_that_leaves_no_image_to_solve_on_is_refused():
    q, model, x = _quantized(n=2)
    with pytest.raises(VitqError, match="leaves none to solve on"):
        vitq.refine(q, model, x, "ridge", batch_size=2, progress=False, holdout=0.9)


def test_ridge_then_recon_chain_and_the_saved_state_reloads_exactly(tmp_path):
    q, model, x = _quantized(n=12)
    info = vitq.refine(q, model, x, "ridge,recon", batch_size=4, progress=False,
                       ridge={"rounding": "nearest"}, recon={"iters": 3, "batch": 4})
    assert [s["refiner"] for s in info["chain"]] == ["ridge", "recon"]
    assert "layers_accepted" in info["chain"][0]
    save(q, tmp_path)
    q2 = load(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


def test_targets_that_are_not_the_float_model_are_reported(caplog):
    q, model, x = _quantized(n=5)
    with torch.no_grad():  # weights changed by an earlier step (as GPTQ or recon do): no longer the float model
        q.blocks[0].mlp.fc1.weight.mul_(1.2)
    with caplog.at_level("WARNING", logger="vitq"):
        info = vitq.refine(q, model, x, "ridge", batch_size=5, progress=False, damp=0.1, rounding="nearest")
    assert info["reference_logit_gap"] > 1e-3 and "differs from the float model" in caplog.text


def test_first_token_weight_counts_its_rows_that_many_times():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 2, generator=g)
    weighted, repeated = Moments(first_token=4.0), Moments()
    weighted.add(x, y)
    repeated.add(torch.cat([x, x[:, :1].repeat(1, 3, 1)], 1), torch.cat([y, y[:, :1].repeat(1, 3, 1)], 1))
    assert weighted.n == repeated.n == 3 * 8
    assert torch.allclose(weighted.a, repeated.a) and torch.allclose(weighted.c, repeated.c)
    w, b = torch.randn(2, 4, generator=g), torch.randn(2, generator=g)
    assert weighted.mse(w, b) == pytest.approx(repeated.mse(w, b))
    plain = Moments()
    plain.add(x, y)
    assert plain.n == 15 and not torch.allclose(plain.a, weighted.a)


def test_first_token_weight_reaches_the_model_s_rows():
    q, model, x = _quantized(n=12)
    plain = vitq.refine(copy.deepcopy(q), model, x, "ridge", batch_size=6, progress=False, damp=0.1)
    info = vitq.refine(q, model, x, "ridge", batch_size=6, progress=False, damp=0.1, first_token=5)
    name = "blocks.0.attn.qkv"
    n_img = plain["num_train"]
    tokens = plain["layers"][name]["rows_train"] / n_img  # the class token and the patch tokens of one image
    assert tokens > 1 and info["layers"][name]["rows_train"] == pytest.approx(n_img * (tokens + 4))

"""EasyQuant, ACIQ and LAPQ (issue 14): clipping constants, bit allocation, the searches' guarantees, the mixed
per-channel-bits quantizer, and every method end to end from the API and the CLI under both regimes."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_image_folder, tiny_images, tiny_model
from safetensors.torch import save_file

import vitq
from vitq.cli import main
from vitq.errors import VitqError
from vitq.methods import lapq as lapq_mod
from vitq.methods.aciq import GAUSSIAN_K, LAPLACE_K, allocate_bits, clip_constant, expected_mse, fit_clip
from vitq.quant.base import quantizers_of
from vitq.quant.mixed import MixedUniformQuantizer
from vitq.quant.observers import observing, start_error_pass
from vitq.scheme import Scheme

pytestmark = pytest.mark.usefixtures("one_thread")


FAST = {"aciq": {}, "lapq": {"p_values": "2,4", "max_evals": 30, "loss_images": 8}, "easyquant": {"candidates": 10}}


def _sample_optimum(absx: torch.Tensor, unit: float, bits: int) -> float:
    """k minimizing, on the samples, the clipping error mean((|x| - α)²; |x| > α) plus the rounding noise model
    α²/(3·4^bits), for α = k·unit (prefix sums over the sorted |x|, fine grid)."""
    xs = absx.double().sort().values
    n = xs.numel()
    c1 = torch.cat([xs.new_zeros(1), xs.cumsum(0)])
    c2 = torch.cat([xs.new_zeros(1), (xs * xs).cumsum(0)])
    ks = torch.arange(1.0, 12.0, 0.002, dtype=torch.float64)
    alpha = ks * unit
    i = torch.searchsorted(xs, alpha)  # values above alpha: i..n-1
    cnt, s1, s2 = n - i, c1[-1] - c1[i], c2[-1] - c2[i]
    err = (s2 - 2 * alpha * s1 + alpha * alpha * cnt) / n + alpha * alpha / (3 * 4.0**bits)
    return float(ks[err.argmin()])


@pytest.mark.parametrize("dist", ["laplace", "gaussian"])
def test_aciq_constants_reproduce_the_table_on_samples(dist):
    gen = torch.Generator().manual_seed(0)
    n = 1_000_000
    if dist == "laplace":
        u = torch.rand(n, generator=gen, dtype=torch.float64) - 0.5
        x = -torch.sign(u) * torch.log1p(-2 * u.abs())
        unit = float((x - x.mean()).abs().mean())
        table = LAPLACE_K
    else:
        x = torch.randn(n, generator=gen, dtype=torch.float64)
        unit = float(x.std())
        table = GAUSSIAN_K
    for bits, k in table.items():
        k_hat = _sample_optimum((x - x.mean()).abs(), unit, bits)
        assert abs(k_hat - k) / k < 0.02, (dist, bits, k_hat, k)
        # the closed form used above 8 bits agrees with the table where both exist
        from scipy.optimize import minimize_scalar

        k_formula = minimize_scalar(lambda t, b=bits: expected_mse(t, b, dist), bounds=(0.5, 40), method="bounded").x
        assert abs(k_formula - k) / k < 0.01, (dist, bits, k_formula, k)
    assert clip_constant(10, dist) > table[8]  # more bits, wider clipping


def test_fit_clip_uses_mean_abs_deviation_and_stays_inside_the_data():
    x = torch.cat([torch.tensor([-1.0, 1.0]).repeat(500), torch.tensor([100.0])]).reshape(1, -1)
    lo, hi = fit_clip(x, 4, "laplace")
    mu = float(x.mean())
    b = float((x - mu).abs().mean())
    assert torch.isclose(hi, torch.tensor([mu + 5.03 * b])) and float(hi) < 10  # the outlier is clipped
    assert float(lo) == -1.0  # μ − α lies below the data: the observed min


@pytest.mark.parametrize("avg,lo,hi", [(4, 2, 8), (6, 2, 8), (8, 2, 8), (3, 2, 5), (4, 4, 4)])
def test_allocation_keeps_the_average_exactly(avg, lo, hi):
    gen = torch.Generator().manual_seed(avg)
    ranges = torch.rand(301, generator=gen) ** 4 * 10 + 1e-3
    bits = allocate_bits(ranges, avg, lo, hi)
    assert int(bits.sum()) == avg * 301 and int(bits.min()) >= lo and int(bits.max()) <= hi
    order = ranges.argsort()
    assert bool((bits[order].diff() >= 0).all())  # a wider channel never gets fewer bits
    if lo < avg < hi:
        assert int(bits.min()) < int(bits.max())
    with pytest.raises(VitqError):
        allocate_bits(ranges, 9, 2, 8)


def test_mixed_quantizer_has_its_channel_levels():
    q = MixedUniformQuantizer(4, "weight", signed=True, channel_axis=0, num_channels=3)
    q.set_channel_bits(torch.tensor([2, 4, 6]))
    x = torch.linspace(-1, 1, 1001).repeat(3, 1)
    q.set_range(x.min(1).values, x.max(1).values)
    levels = [int(q(x)[c].unique().numel()) for c in range(3)]
    assert levels == [3, 15, 63]  # signed symmetric: 2^(b-1) - 1 levels each side of zero
    assert float(q(x)[2].sub(x[2]).abs().max()) < float(q(x)[0].sub(x[0]).abs().max())


def test_aciq_allocates_records_and_round_trips(tmp_path):
    model, calib, x = tiny_model("deit"), tiny_images("deit", 16, 1), tiny_images("deit", 8, 2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random init gives every channel the same range: spread them as trained weights do
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(torch.exp(torch.randn(m.weight.shape[0], 1, generator=gen)))
    q = vitq.prepare(model, Scheme("matmul", 4, 8), method="aciq")
    info = vitq.calibrate(q, calib, "aciq", batch_size=8, progress=False)
    mixed = [m for m in q.modules() if isinstance(m, MixedUniformQuantizer)]
    assert mixed and info["average_weight_bits"] == pytest.approx(4.0)
    for name, rec in info["layers"].items():
        assert sum(b * c for b, c in rec["bits"].items()) == 4 * rec["channels"], name
    assert all(bool(m.weight_correction) for m in q.modules() if hasattr(m, "weight_correction"))
    vitq.save(q, tmp_path)
    q2 = vitq.load(model, tmp_path)
    assert sum(isinstance(m, MixedUniformQuantizer) for m in q2.modules()) == len(mixed)
    with torch.no_grad():
        assert torch.equal(q2(x), q(x))


@pytest.mark.parametrize("scheme", ["fq", "matmul"])
def test_easyquant_never_lowers_a_layer_cosine(scheme):
    model, calib = tiny_model("deit"), tiny_images("deit", 16, 1)
    q = vitq.prepare(model, Scheme(scheme, 4, 4), method="easyquant")
    info = vitq.calibrate(q, calib, "easyquant", batch_size=8, progress=False, candidates=20, rounds=2)
    layers = info["layers"]
    kinds = {t["kind"] for t in layers}
    assert kinds == {"linear", "qk", "av"}
    assert all(t["cosine"] >= t["init_cosine"] for t in layers)
    assert sum(t["cosine"] > t["init_cosine"] + 1e-4 for t in layers) >= len(layers) // 2  # the search does work


@pytest.mark.parametrize("scheme", ["fq", "matmul"])
def test_lapq_joint_step_never_ends_above_its_lp_init(scheme):
    model, calib = tiny_model("deit"), tiny_images("deit", 16, 1)
    q = vitq.prepare(model, Scheme(scheme, 4, 4), method="lapq")
    info = vitq.calibrate(q, calib, "lapq", batch_size=8, progress=False, p_values="2,3", max_evals=40,
                           loss_images=8)
    assert info["p"] in (2.0, 3.0) and set(info["p_sweep_loss"]) == {"2.0", "3.0"}
    assert info["evaluations"] == 40 and info["final_loss"] <= info["init_loss"]
    assert info["init_loss"] == pytest.approx(min(info["p_sweep_loss"].values()))
    # the state written back is the point whose loss was reported (recomputed independently)
    x = calib[:8]
    with torch.no_grad():
        lp, lq = F.log_softmax(model(x), 1), F.log_softmax(q(x), 1)
    assert float((lp.exp() * (lp - lq)).sum(1).mean()) == pytest.approx(info["final_loss"], rel=1e-4, abs=1e-7)


def test_lapq_block_cache_matches_a_full_forward():
    model, calib = tiny_model("deit"), tiny_images("deit", 8, 1)
    q = vitq.prepare(model, Scheme("matmul", 4, 8))
    vitq.calibrate(q, calib, "minmax", progress=False)
    with observing(q) as obs:
        q(calib)
        assert start_error_pass(q, obs, "omse")
        q(calib)
    clips = lapq_mod._clips(q, obs)
    for c in clips:
        c.init_lp(2.0)
    ev = lapq_mod.LossEvaluator(q, clips, [calib], "kl")
    x = np.ones(len(clips))
    ev(x)
    x[len(clips) // 2] = 0.7  # a quantizer in a middle block: only later blocks are recomputed
    cached = ev(x)
    ev.cache = None
    assert ev(x) == pytest.approx(cached, rel=1e-6)


def test_lapq_interrupt_leaves_nothing(tmp_path, monkeypatch):
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model("deit").state_dict().items()}, str(weights))
    calib = make_image_folder(tmp_path / "calib", per_class=3, seed=1)
    calls = {"n": 0}
    original = lapq_mod.LossEvaluator.__call__

    def interrupted(self, x):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return original(self, x)

    monkeypatch.setattr(lapq_mod.LossEvaluator, "__call__", interrupted)
    out = tmp_path / "runs" / "lapq"
    args = ["quantize", "--model", TINY["deit"][0], "--model-args", json.dumps(TINY["deit"][1]), "--weights",
            str(weights), "--calib", str(calib), "--scheme", "matmul", "--method", "lapq", "--num-workers", "0",
            "--quiet", "--out", str(out), "--lapq-p-values", "2"]
    assert main(args) == 130
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("scheme", ["fq", "matmul"])
@pytest.mark.parametrize("method", sorted(FAST))
def test_cli_end_to_end_and_state_reloads(tmp_path, method, scheme):
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model("deit").state_dict().items()}, str(weights))
    calib = make_image_folder(tmp_path / "calib", per_class=3, seed=1)
    val = make_image_folder(tmp_path / "val", per_class=2, seed=2)
    flags = []
    for k, v in FAST[method].items():
        flags += [f"--{method}-{k.replace('_', '-')}", str(v)]
    out = tmp_path / "out"
    base = ["--model", TINY["deit"][0], "--model-args", json.dumps(TINY["deit"][1]), "--weights", str(weights),
            "--batch-size", "4", "--num-workers", "0", "--quiet"]
    assert main(["quantize", *base, "--calib", str(calib), "--val", str(val), "--scheme", scheme, "--w-bits", "4",
                 "--a-bits", "8", "--method", method, "--out", str(out), *flags]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["method"] == method and r["scheme"] == scheme
    assert main(["evaluate", *base, "--state", str(out), "--val", str(val), "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["quant"] == r["quant"]


def test_bad_options_are_one_line_errors(tmp_path):
    model = tiny_model("deit")
    for method, opts in (("aciq", {"distribution": "cauchy"}), ("lapq", {"p_values": "2,x"}),
                         ("easyquant", {"low": 1.5, "high": 1.2}), ("lapq", {"max_evals": 0})):
        q = vitq.prepare(model, Scheme("matmul", 8, 8))
        with pytest.raises(VitqError):
            vitq.calibrate(q, tiny_images("deit", 4), method, progress=False, **opts)
    assert os.listdir(tmp_path) == []
    assert all(bool(z.initialized) is False for z in quantizers_of(vitq.prepare(model, Scheme("fq", 8, 8))).values())


def test_moment_observer_fit_equals_the_fit_of_all_values():
    from vitq.methods.aciq import MomentObserver

    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 5, 6, generator=gen) * torch.arange(1.0, 7.0) for _ in range(3)]
    for axis, pooled in ((None, False), (-1, False), (-1, True)):
        obs = MomentObserver(axis, pooled)
        for b in batches:
            obs.update(b)
        obs.start_second_pass()
        for b in batches:
            obs.update(b)
        allx = torch.cat(batches).reshape(-1, 6)
        rows = allx.reshape(1, -1) if axis is None or pooled else allx.t()
        for dist in ("laplace", "gaussian"):
            lo, hi = obs.fit(6, dist)
            lo2, hi2 = fit_clip(rows, 6, dist)
            assert torch.allclose(lo, lo2, atol=1e-5) and torch.allclose(hi, hi2, atol=1e-5), (axis, pooled, dist)

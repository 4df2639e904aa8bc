"""Evol-Q's knob search (``mode="discrete"``, issue 26) on tiny random-init models: log bases and top levels,
per-head gains, PTF shifts, weight scales re-rounding the continuous weights; the KL fitness over every image."""

import copy

import pytest
import torch
from conftest import tiny_images, tiny_model

import vitq
from vitq.api import as_calib
from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.quant.log import R_GRID, AdaLogQuantizer
from vitq.quant.modules import QWeighted
from vitq.quant.uniform import PTFQuantizer
from vitq.refine.evolq import split_calibration
from vitq.refine.evolq_discrete import GainKnob, KnobSpace, LogKnob, ShiftKnob, knob_space, search_knobs
from vitq.refine.evolq_options import make_config
from vitq.refine.fitness import FitnessEvaluator, kl_loss
from vitq.refine.gptq import CONTINUOUS, round_weights
from vitq.refine.recon_learn import UNROUNDED

pytestmark = pytest.mark.usefixtures("one_thread")
ADALOG = {"softmax_quantizer": "adalog", "gelu_quantizer": "adalog"}


def _calibrated(scheme="matmul", w_bits=4, a_bits=4, n=24, **kinds):
    model = tiny_model("deit")
    images = tiny_images("deit", n, seed=1)
    method = "fqvit" if scheme == "fq" else "minmax"  # (repq: the same knobs, 30x the calibration time)
    q = vitq.prepare(model, vitq.Scheme(scheme, w_bits=w_bits, a_bits=a_bits, **kinds), method=method)
    vitq.calibrate(q, images, method=method, batch_size=8, progress=False)
    return q, model, images


def _evolq(q, model, images, **options):
    return vitq.refine(q, model, images, "evolq", batch_size=8, progress=False, **{"mode": "discrete", **options})


def _fitness(q, model, images):
    ev = FitnessEvaluator(q, model, as_calib(images, 8, progress=False), "kl")
    return ev.evaluate(None)


def test_discrete_preset_and_groups():
    cfg = make_config({"mode": "discrete"})
    assert cfg.search == ("logq", "heads", "ptf", "wscale_pre") and cfg.loss == cfg.check_loss == "kl"
    assert cfg.mutation == "relative" and cfg.radius == 0.02 and cfg.check_fraction == 0.2 and cfg.passes == 1
    assert make_config({"mode": "discrete", "passes": 3, "search": "logq"}).passes == 3  # a user option wins
    assert make_config({}).search == ("attn",) and make_config({"mode": "faithful"}).check_fraction == 0.0
    with pytest.raises(VitqError, match="search"):
        make_config({"search": "logq,nope"})
    with pytest.raises(VitqError, match="wscale_pre without attn"):
        make_config({"search": "attn,wscale_pre"})


def test_kl_fitness_is_the_mean_over_every_image():
    """KL over uneven batches (8 + 8 + 4 images) is the mean over all 20 images, not over the batches."""
    q, model, images = _calibrated(**ADALOG)
    images = images[:20]
    ev = FitnessEvaluator(q, model, as_calib(images, 8, progress=False), "kl")
    with torch.no_grad():
        whole = float(kl_loss(q(images), model(images)))
    assert ev.evaluate(None) == pytest.approx(whole, rel=1e-5)
    for unit, _, _ in ev.trunk.blocks():
        assert ev.evaluate(unit) == pytest.approx(whole, rel=1e-5)


def test_knob_search_moves_a_bad_log_quantizer_and_lowers_the_fitness():
    """The post-GELU adalog of the last block gets a top level 4x too low (most GELU outputs clipped); the knob
    search over that quantizer alone moves its base / top level / negative step on their grids and lowers the
    fitness, and leaves the best member applied."""
    q, model, images = _calibrated(**ADALOG)
    target = q.blocks[1].mlp.fc2.input_quant
    assert isinstance(target, AdaLogQuantizer) and target.signed
    target.scale.mul_(0.25)
    start = LogKnob("t", target).genes()
    ev = FitnessEvaluator(q, model, as_calib(images, 8, progress=False), "kl")
    space = KnobSpace([LogKnob("blocks.1.mlp.fc2.input_quant", target)], {}, {})
    before, after, n = search_knobs(ev, 1, space, make_config({"mode": "discrete", "cycles": 4}),
                                    torch.Generator().manual_seed(0))
    assert after < before and n == 1 + 4 * 4
    now = LogKnob("t", target).genes()
    assert not torch.equal(now, start) and float(now[0]) in R_GRID
    assert ev.evaluate(None) == pytest.approx(after, rel=1e-6)


def test_discrete_search_of_the_log_quantizers_lowers_the_fitness_and_touches_nothing_else():
    q, model, images = _calibrated(**ADALOG)
    q.blocks[1].mlp.fc2.input_quant.scale.mul_(0.25)
    before = _fitness(q, model, images)
    start = {k: v.clone() for k, v in q.state_dict().items()}
    info = _evolq(q, model, images, search="logq", cycles=4, seed=0)
    assert info["fitness"]["final"] < info["fitness"]["initial"]
    assert info["check"]["final"] <= info["check"]["initial"]
    assert _fitness(q, model, images) < before
    moved = {k for k, v in q.state_dict().items() if not torch.equal(v, start[k])}
    assert moved and all(k.endswith(("softmax_quant.scale", "softmax_quant.base_exp", "input_quant.scale",
                                     "input_quant.base_exp", "input_quant.neg_scale")) for k in moved), moved
    assert all(".fc2.input_quant" in k or "softmax_quant" in k for k in moved)
    assert info["search_space"]["knobs_per_block"]["blocks.1"] == ["blocks.1.attn.softmax_quant",
                                                                  "blocks.1.mlp.fc2.input_quant"]


def test_discrete_never_accepts_a_block_worse_on_the_check_part():
    """The check images come from another distribution (4x the amplitude) than the search images, so some
    children that fit the search images better are worse on the check part: those blocks are reverted, the
    check curve never rises, and each reverted block leaves the state bit for bit as it was."""
    q, model, images = _calibrated(**ADALOG, n=16)
    _, check = split_calibration(as_calib(torch.arange(16.0).reshape(16, 1, 1, 1), 8, progress=False),
                                 make_config({"check_fraction": 0.25}), seed=0)
    images[check.images.reshape(-1).long()] *= 4.0
    snaps = []
    start = copy.deepcopy(q.state_dict())
    info = vitq.refine(q, model, images, "evolq", batch_size=8, progress=False, mode="discrete", check_fraction=0.25,
                       passes=3, patience=0, cycles=3, radius=0.3, seed=0,
                       on_block_end=lambda ev: snaps.append(copy.deepcopy(q.state_dict())))
    steps = info["trace"]
    snaps = [start] + snaps
    check = info["curves"]["check"]
    assert all(b <= a for a, b in zip(check, check[1:]))
    assert info["check"]["final"] <= info["check"]["initial"] + 1e-9
    rejected = [i for i, st in enumerate(steps) if not st["kept"]]
    assert rejected, [(st["check_before"], st["check_candidate"]) for st in steps]
    for i in rejected:
        st = steps[i]
        assert st["check_candidate"] > st["check_before"] and st["check"] == st["check_before"]
        assert all(torch.equal(snaps[i][k], snaps[i + 1][k]) for k in snaps[i])
    for st in steps:
        assert st["candidate"] <= st["before"]


def test_discrete_search_is_reproducible_with_a_seed():
    q, model, images = _calibrated(**ADALOG)
    runs = []
    for seed in (3, 3, 4):
        qq = copy.deepcopy(q)
        info = _evolq(qq, model, images, seed=seed, cycles=1)
        runs.append((qq.state_dict(), [e["after"] for e in info["trace"]]))
    (a, ta), (b, tb), (c, tc) = runs
    assert ta == tb and all(torch.equal(a[k], b[k]) for k in a)
    assert ta != tc or any(not torch.equal(a[k], c[k]) for k in a)


def test_weight_scales_round_the_continuous_weights_again():
    """After GPTQ the weights are on their grid: ``wscale_pre`` rounds GPTQ's compensated weights again with the
    mutated scale, keeping GPTQ's rounding, and its start scale gives the start weights bit for bit."""
    q, model, images = _calibrated(w_bits=3, **ADALOG)
    round_weights(q, images, "gptq")
    space = knob_space("blocks.0", q.blocks[0], make_config({"mode": "discrete", "search": "wscale_pre"}))
    assert len(space.knobs) == 4 and set(space.sources.values()) == {"GPTQ's compensated weights"}
    knob = space.knobs[0]
    layer = q.blocks[0].attn.qkv
    w0, genes = layer.weight.detach().clone(), knob.genes()
    knob.apply(genes)
    assert torch.equal(layer.weight, w0)
    child = genes * 1.1
    knob.apply(child)
    assert torch.equal(layer.weight_quant.fake_quant(layer.weight), layer.weight)  # on the new grid
    assert not torch.equal(layer.weight, w0)
    wq = layer.weight_quant
    s, z = wq.scale[:, None], wq.zero_point[:, None]
    codes = torch.round(layer.weight.detach() / s) + z
    nearest = torch.clamp(torch.round(getattr(layer, CONTINUOUS) / s) + z, wq.qmin, wq.qmax)
    assert torch.equal(codes, nearest)  # GPTQ rounds each compensated weight to its nearest level
    # a layer on its grid with no continuous weights is left out, and said so
    for m in q.modules():
        if isinstance(m, QWeighted) and hasattr(m, CONTINUOUS):
            delattr(m, CONTINUOUS)
    knob.apply(genes)
    space = knob_space("blocks.0", q.blocks[0], make_config({"mode": "discrete", "search": "wscale_pre"}))
    assert not space.knobs and len(space.skipped) == 4


def test_recon_leaves_its_continuous_weights_for_wscale_pre():
    q, model, images = _calibrated(**ADALOG, n=8)
    vitq.refine(q, model, images, "recon", batch_size=4, progress=False, iters=4, batch=4)
    space = knob_space("blocks.1", q.blocks[1], make_config({"mode": "discrete", "search": "wscale_pre"}))
    layers = [m for m in q.blocks[1].modules() if isinstance(m, QWeighted)]
    kept = [m for m in layers if hasattr(m, UNROUNDED)]
    assert kept and all(not torch.equal(getattr(m, UNROUNDED), m.weight) for m in kept)
    assert "reconstruction's continuous start" in space.sources.values()


def test_ptf_shift_and_head_gain_moves_stay_legal():
    q, model, images = _calibrated("fq", a_bits=8, attn_granularity="head")
    space = knob_space("blocks.0", q.blocks[0], make_config({"mode": "discrete", "search": "ptf,heads"}))
    shifts = [k for k in space.knobs if isinstance(k, ShiftKnob)]
    gains = [k for k in space.knobs if isinstance(k, GainKnob)]
    assert shifts and len(gains) == 3 and all(k.genes().numel() == 3 for k in gains)  # 3 heads each
    gen = torch.Generator().manual_seed(0)
    for k in shifts:
        g = k.genes()
        moved = k.mutate(g, gen)
        assert not torch.equal(moved, g) and float(moved.min()) >= 0 and float(moved.max()) <= k.q.max_shift
        assert set((moved - g).unique().tolist()) <= {-1.0, 0.0, 1.0}
    for k in gains:
        g = k.genes()
        ratio = k.mutate(g, gen) / g
        assert all(min(abs(float(r) - v) for v in (2 ** (-1 / 8), 1.0, 2 ** (1 / 8))) < 1e-9 for r in ratio)
    # the search itself: fitness never rises on the search images
    ev = FitnessEvaluator(q, model, CalibData(images, batch_size=8, progress=False), "kl")
    before, after, n = search_knobs(ev, 1, knob_space("blocks.1", q.blocks[1], make_config({"mode": "discrete",
                                                                                           "search": "ptf"})),
                                    make_config({"mode": "discrete", "search": "ptf"}), gen)
    assert after <= before and n == 1 + 2 * 4
    assert ev.evaluate(None) == pytest.approx(after, rel=1e-5)
    assert any(isinstance(m, PTFQuantizer) for m in q.blocks[1].modules())


def test_log_knob_moves_one_gene_on_the_grid():
    q = AdaLogQuantizer(4, "post_gelu")
    q.base_exp.fill_(4.0)
    q.scale.fill_(2.0)
    q.neg_scale.fill_(0.03)
    q.mark_initialized()
    k = LogKnob("x", q)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        g = k.genes()
        m = k.mutate(g, gen)
        diff = (m != g).nonzero().flatten().tolist()
        assert len(diff) == 1 and float(m[0]) in R_GRID
        if diff == [1]:  # the top level moves by half a level of the current base
            half = 2.0 ** (1 / (2 * float(g[0])))
            assert float(m[1] / g[1]) in (pytest.approx(half, rel=1e-9), pytest.approx(1 / half, rel=1e-9))
        if diff == [0]:
            assert abs(float(m[0] - g[0])) == 0.25
        k.apply(m)


def test_a_search_with_nothing_to_search_is_refused():
    q, model, images = _calibrated("matmul")  # the matmul regime has no PTF quantizer
    with pytest.raises(VitqError, match="finds nothing to search"):
        _evolq(q, model, images, search="ptf")


def test_discrete_cli_flags_parse():
    import argparse

    from vitq.cli.flags import add_entry_flags, entry_options
    from vitq.registry import get_refiner

    entry = get_refiner("evolq")
    parser = argparse.ArgumentParser()
    add_entry_flags(parser.add_argument_group("evolq"), entry)
    args = parser.parse_args(["--evolq-mode", "discrete", "--evolq-search", "logq,wscale_pre",
                              "--evolq-radius", "0.05"])
    opts = entry_options(args, entry)
    cfg = entry.make_config(opts)
    assert cfg.mode == "discrete" and cfg.search == ("logq", "wscale_pre") and cfg.radius == 0.05
    assert cfg.loss == "kl" and cfg.children == 4


def test_discrete_resume_equals_uninterrupted_run(tmp_path):
    """Killed after its first block, the knob search restarted with the same options from the same GPTQ model
    ends with the same state (scales, bases, re-rounded weights) as an uninterrupted run."""
    q0, model, images = _calibrated(**ADALOG, n=16)
    round_weights(q0, images, "gptq")
    opts = dict(mode="discrete", cycles=1, seed=5)
    full = copy.deepcopy(q0)
    _evolq(full, model, images, checkpoint_path=str(tmp_path / "a.ckpt"), **opts)

    class Killed(Exception):
        pass

    def kill(event):
        raise Killed

    ckpt = str(tmp_path / "b.ckpt")
    with pytest.raises(Killed):
        _evolq(copy.deepcopy(q0), model, images, checkpoint_path=ckpt, on_block_end=kill, **opts)
    again = copy.deepcopy(q0)
    for a, b in zip(again.modules(), q0.modules(), strict=True):  # (GPTQ's continuous weights: not saved state)
        if hasattr(b, CONTINUOUS):
            setattr(a, CONTINUOUS, getattr(b, CONTINUOUS))
    res = _evolq(again, model, images, checkpoint_path=ckpt, **opts)
    assert res["checkpoint"]["resumed"]["from_position"] == 1
    a, b = full.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

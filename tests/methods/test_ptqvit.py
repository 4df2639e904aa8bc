import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import tiny_model  # noqa: E402

import vitq  # noqa: E402
from vitq.cli.allocation import add_command, allocation_from_config  # noqa: E402
from vitq.cli.flags import add_entry_flags, entry_options
from vitq.errors import VitqError  # noqa: E402
from vitq.methods import layerwise as L  # noqa: E402
from vitq.methods import ptqvit_mp as MP  # noqa: E402
from vitq.methods import ptqvit_problem as P  # noqa: E402
from vitq.methods.ptqvit_options import PtqvitOptions  # noqa: E402
from vitq.quant.base import passthrough, quantizers_of  # noqa: E402
from vitq.quant.uniform import UniformQuantizer
from vitq.registry import get_method  # noqa: E402

FAST = {"candidates": 10, "rounds": 2, "tokens": 8, "rows": 6, "pairs": 40, "mp_candidates": 6}


def tiny_deit():
    return tiny_model("deit")


def tiny_swin():
    return tiny_model("swin")


@pytest.fixture(scope="module")
def deit():
    return tiny_deit()


def images(n=8, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- objective pieces

def test_pearson_matches_direct():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(3, 20, generator=g)
    hat = torch.randn(4, 3, 20, generator=g) + out
    got = P.pearson(hat, out)
    for c in range(4):
        for s in range(3):
            ref = torch.corrcoef(torch.stack([hat[c, s], out[s]]))[0, 1]
            assert torch.isclose(got[c, s], ref, atol=1e-5)
    assert torch.allclose(P.pearson(out, out), torch.ones(3), atol=1e-6)


def test_ranking_loss_matches_direct_loops():
    g = torch.Generator().manual_seed(0)
    S, H, R, N = 2, 3, 2, 5
    a = torch.randn(S, H, R, N, generator=g)
    a_hat = a + 0.3 * torch.randn(S, H, R, N, generator=g)
    pi, pj = P.sample_pairs(N, 0, g)  # all pairs
    assert len(pi) == N * (N - 1) // 2
    theta = 0.2
    total = 0.0
    for h in range(H):
        acc = []
        for s, r in itertools.product(range(S), range(R)):
            for i, j in itertools.combinations(range(N), 2):
                sgn = (a[s, h, r, i] - a[s, h, r, j]).sign()
                acc.append(max(theta - float((a_hat[s, h, r, i] - a_hat[s, h, r, j]) * sgn), 0.0))
        total += sum(acc) / len(acc)
    got = P.ranking_loss(a_hat, a, pi, pj, theta)
    assert abs(float(got) - total) < 1e-5
    # stacked candidates give one value each
    stacked = P.ranking_loss(torch.stack([a_hat, a]), a, pi, pj, theta)
    assert stacked.shape == (2,) and abs(float(stacked[0]) - total) < 1e-5


def test_sample_pairs_distinct_and_ordered():
    i, j = P.sample_pairs(30, 50, torch.Generator().manual_seed(3))
    assert len(i) == 50 and bool((i < j).all())
    assert len({(int(a), int(b)) for a, b in zip(i, j)}) == 50


def test_sym_quant_matches_uniform_quantizer():
    x = torch.randn(50) * 3
    for signed in (True, False):
        q = UniformQuantizer(4, "linear_input", signed=signed)
        q.scale.fill_(0.37)
        q.mark_initialized()
        assert torch.equal(q(x), P.sym_quant(x, 0.37, 4, signed))
        stacked = P.sym_quant(x, torch.tensor([0.37, 0.5]), 4, signed)
        assert stacked.shape == (2, 50) and torch.equal(stacked[0], q(x))


def test_sym_quant_with_zero_point_matches_uniform_quantizer():
    x = torch.randn(50) * 3
    q = UniformQuantizer(4, "linear_input", signed=False)
    q.scale.fill_(0.37)
    q.zero_point.fill_(5)
    q.mark_initialized()
    assert torch.equal(q(x), P.sym_quant(x, 0.37, 4, False, zero_point=5))
    assert torch.equal(P.sym_quant(x, torch.tensor([0.37, 0.5]), 4, False, zero_point=5)[0], q(x))


def _fc2_problem(model, grid: str, bits: int = 4):
    """fc2 of block 0 (its input is a GELU output, >= -0.17) with a searched input of the given grid."""
    qm = vitq.prepare(model, vitq.Scheme("matmul", bits, bits), method="ptqvit")
    opts = PtqvitOptions.build(dict(FAST, calibration="parallel", bias_corr=False, input_grid=grid), "ptqvit")
    layers = L.find_layers(qm)
    fc2 = next(la for la in layers if la.name == "blocks.0.mlp.fc2")
    P.swap_layer_quantizers(fc2, weight_granularity="channel", input_grid=grid)
    with L.Recorder([fc2], "float", torch.Generator().manual_seed(0), stop=False, tokens=opts.tokens,
                    rows=opts.rows), passthrough(qm):
        qm(images())
    prob = P.problem_of(fc2, "float", opts, torch.Generator().manual_seed(0))
    return fc2, prob, prob.search(opts.candidates, opts.rounds, bias_corr=False)


def test_asymmetric_input_grid_on_a_gelu_output(deit):
    """An input that is almost non-negative (post-GELU): the asymmetric grid puts its zero point near the bottom
    (all codes but a few on the positive side), scores higher than the signed symmetric grid at 4 bits, and the
    written quantizer reproduces the objective the search scored."""
    _, p_sym, r_sym = _fc2_problem(deit, "symmetric")
    fc2, p_asym, r_asym = _fc2_problem(deit, "asymmetric")
    store_min = float(p_asym.A.min())
    assert store_min < 0 and r_sym["a_zero"] == 0
    assert 0 < r_asym["a_zero"] <= 3  # GELU's floor -0.17 is a few steps below zero
    assert r_asym["objective"] > r_sym["objective"]
    P.write_result(fc2, r_asym)
    q = fc2.a_quant
    assert not q.signed and int(q.zero_point) == r_asym["a_zero"]
    assert torch.equal(q(p_asym.A), P.sym_quant(p_asym.A, r_asym["a_scale"], 4, False, r_asym["a_zero"]))
    with pytest.raises(VitqError, match="input grid"):
        PtqvitOptions.build({"input_grid": "both"}, "ptqvit")


# ----------------------------------------------------------------------------------------- search

@pytest.mark.parametrize("bias_corr,granularity,search", [(True, "channel", "shared"), (False, "channel", "own"),
                                                         (True, "channel", "own"), (True, "tensor", "shared")])
def test_search_never_worse_than_init(deit, bias_corr, granularity, search):
    qm = vitq.prepare(deit, vitq.Scheme("matmul", 4, 4), method="ptqvit")
    info = vitq.calibrate(qm, images(), "ptqvit", batch_size=4, progress=False, bias_corr=bias_corr,
                          weight_granularity=granularity, channel_search=search, **FAST)
    assert info["options"]["bias_corr"] is bias_corr
    assert info["weight_granularity"] == granularity
    kinds = {t["kind"] for t in info["layers"]}
    assert kinds == {"linear", "qk", "av"}
    # patch embed, 2 blocks x (qkv, qk, av, proj, fc1, fc2), head
    assert len(info["layers"]) == 1 + 2 * 6 + 1
    for t in info["layers"]:
        assert t["objective"] >= t["init_objective"] - 1e-7, t
        assert 1 <= t["rounds"] <= FAST["rounds"]
    assert info["mean_objective"] > info["mean_init_objective"]
    assert info["options"]["calibration"] == "sequential"
    for name, q in quantizers_of(qm).items():
        unsigned = q.role in ("softmax", "linear_input", "image")  # softmax [0, 1]; asymmetric layer inputs
        assert isinstance(q, UniformQuantizer) and q.signed == (not unsigned), name
        per_channel = granularity == "channel" and name.endswith("weight_quant")
        assert q.channel_axis == (0 if per_channel else None), name
        assert bool(q.initialized), name
        if per_channel:  # one searched interval per output channel, not one value repeated
            assert q.scale.numel() == qm.get_submodule(name.rpartition(".")[0]).weight.shape[0] > 1
            assert len(torch.unique(q.scale)) > 1, name


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_written_intervals_reproduce_the_searched_objective(deit, granularity):
    """The quantizers written into the model give the same layer output the search scored."""
    qm = vitq.prepare(deit, vitq.Scheme("matmul", 6, 6), method="ptqvit")
    opts = PtqvitOptions.build(dict(FAST, calibration="parallel", bias_corr=False), "ptqvit")
    layers = L.find_layers(qm)
    for la in layers:
        P.swap_layer_quantizers(la, weight_granularity=granularity)
    fc1 = next(la for la in layers if la.name == "blocks.0.mlp.fc1")
    x = torch.randn(3, 17, 192)
    with L.Recorder([fc1], "float", torch.Generator().manual_seed(0), stop=False, tokens=opts.tokens,
                    rows=opts.rows):
        fc1.module(x)
    prob = P.problem_of(fc1, "float", opts, torch.Generator().manual_seed(0))
    res = prob.search(opts.candidates, opts.rounds, bias_corr=False)
    P.write_result(fc1, res)
    with torch.no_grad():
        out = fc1.module(x)[:, fc1.idx]
    assert prob.b_channel is (granularity == "channel")
    ref = prob.apply(prob._quant_a(torch.tensor([res["a_scale"]])), prob._quant_b(prob.b_stack(res["b_scale"])),
                     prob.bias)[0]
    assert torch.allclose(out, ref, atol=1e-5)
    assert abs(float(P.pearson(out.reshape(1, 3, -1), prob.target).mean()) - res["objective"]) < 1e-5


def test_per_channel_weights_beat_one_interval_on_uneven_rows():
    """A layer whose output channels have weights of very different size: one interval per tensor rounds the
    small rows to zero at 4 bits, one per channel keeps them. The per-channel search scores no worse, its small
    channels come out far more accurate, and the written intervals follow each row's own range."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight.mul_((10.0 ** -torch.linspace(0, 2, 16)).unsqueeze(1))
    model = torch.nn.Sequential(lin)
    x = torch.randn(6, 10, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = lin(x)
    results = {}
    for gran in ("tensor", "channel"):
        qm = vitq.prepare(model, vitq.Scheme("matmul", 4, 8), method="ptqvit")
        (la,) = L.find_layers(qm)
        P.swap_layer_quantizers(la, weight_granularity=gran)
        opts = PtqvitOptions.build(dict(FAST, candidates=20, rounds=4), "ptqvit")
        with L.Recorder([la], "float", torch.Generator().manual_seed(0), stop=False, tokens=opts.tokens,
                        rows=opts.rows):
            la.module(x)
        prob = P.problem_of(la, "float", opts, torch.Generator().manual_seed(0))
        res = prob.search(opts.candidates, opts.rounds, bias_corr=True)
        P.write_result(la, res)
        assert res["b_search"] in (("tensor",) if gran == "tensor" else ("max", "shared", "per-channel"))
        with torch.no_grad():
            err = (la.module(x) - ref).pow(2).mean((0, 1)) / ref.pow(2).mean((0, 1))  # relative, per channel
        results[gran] = (res, la.b_quant.scale.clone(), err)
    (r_t, s_t, e_t), (r_c, s_c, e_c) = results["tensor"], results["channel"]
    assert s_t.dim() == 0 and s_c.shape == (16,)
    assert r_c["objective"] >= r_t["objective"]
    assert float(e_c[8:].mean()) < 0.25 * float(e_t[8:].mean())  # the small half of the channels
    ratio = s_c / (lin.weight.detach().abs().amax(1) / 7)  # the written Δ_c over each channel's own Δ₀
    assert bool(((ratio >= 0.5 - 1e-6) & (ratio <= 1.2 + 1e-6)).all())
    assert float(s_c[0] / s_c[-1]) > 20  # intervals follow the 100x spread of the rows


def test_bias_correction_changes_bias_and_records(deit):
    qm = vitq.prepare(deit, vitq.Scheme("matmul", 4, 4), method="ptqvit")
    vitq.calibrate(qm, images(), "ptqvit", batch_size=8, progress=False, **FAST)
    assert not torch.equal(qm.blocks[0].mlp.fc1.bias, deit.blocks[0].mlp.fc1.bias)
    qm2 = vitq.prepare(deit, vitq.Scheme("matmul", 4, 4), method="ptqvit")
    info = vitq.calibrate(qm2, images(), "ptqvit", batch_size=8, progress=False, no_bias_corr=True, **FAST)
    assert info["options"]["bias_corr"] is False
    assert torch.equal(qm2.blocks[0].mlp.fc1.bias, deit.blocks[0].mlp.fc1.bias)


def test_parallel_no_ranking_and_fq():
    m = tiny_deit()
    qm = vitq.prepare(m, vitq.Scheme("matmul", 6, 6), method="ptqvit")
    info = vitq.calibrate(qm, images(), "ptqvit", batch_size=8, progress=False, calibration="parallel",
                          no_ranking=True, **FAST)
    assert info["options"]["calibration"] == "parallel" and info["options"]["ranking"] is False
    assert "parallel" in info["calibration_inputs"]
    qf = vitq.prepare(m, vitq.Scheme("fq", 8, 8), method="ptqvit")
    info = vitq.calibrate(qf, images(), "ptqvit", batch_size=8, progress=False, **FAST)
    assert info["regime"] == "fq" and "fq_only_quantizers" in info
    qs = quantizers_of(qf)
    assert all(bool(q.initialized) for q in qs.values())
    assert any(q.kind == "ptf" for q in qs.values())
    with torch.no_grad():
        out, ref = qf(images()), m(images())
    assert torch.isfinite(out).all()
    assert float(torch.nn.functional.cosine_similarity(out, ref).mean()) > 0.9


def test_swin_runs():
    m = tiny_swin()
    qm = vitq.prepare(m, vitq.Scheme("matmul", 8, 8), method="ptqvit")
    info = vitq.calibrate(qm, images(4, 56), "ptqvit", batch_size=4, progress=False,
                          calibration="parallel", **FAST)
    assert any(t["layer"].endswith("downsample.reduction") for t in info["layers"])
    with torch.no_grad():
        assert torch.isfinite(qm(images(2, 56))).all()


def test_bad_options(deit):
    qm = vitq.prepare(deit, vitq.Scheme("matmul", 8, 8), method="ptqvit")
    with pytest.raises(VitqError, match="calibration"):
        vitq.calibrate(qm, images(), "ptqvit", progress=False, calibration="diagonal")
    with pytest.raises(VitqError, match="mixed precision"):
        vitq.calibrate(qm, images(), "ptqvit", progress=False, mixed_precision=12)
    with pytest.raises(VitqError, match="unknown options"):
        vitq.calibrate(qm, images(), "ptqvit", progress=False, candidatez=3)
    with pytest.raises(VitqError, match="weight granularity"):
        vitq.calibrate(qm, images(), "ptqvit", progress=False, weight_granularity="row")
    with pytest.raises(VitqError, match="per-channel weight search"):
        vitq.calibrate(qm, images(), "ptqvit", progress=False, channel_search="each")
    with pytest.raises(VitqError, match="sensitivity"):
        vitq.calibrate(qm, images(), "ptqvit", progress=False, mp_sensitivity="frobenius")


def test_cli_arguments_follow_the_registry_contract():
    entry = get_method("ptqvit")
    parser = argparse.ArgumentParser()
    add_entry_flags(parser.add_argument_group("ptqvit"), entry)
    args = parser.parse_args(["--ptqvit-no-ranking", "--mixed-precision", "6", "--ptqvit-candidates", "50",
                              "--ptqvit-calibration", "parallel", "--ptqvit-weight-granularity", "tensor",
                              "--ptqvit-mp-sensitivity", "softmax", "--ptqvit-mp-no-check"])
    assert entry_options(args, entry) == {"ranking": False, "mixed_precision": 6, "candidates": 50,
                                             "calibration": "parallel", "weight_granularity": "tensor",
                                             "mp_sensitivity": "softmax", "mp_no_check": True}
    assert PtqvitOptions.build({}, "ptqvit").weight_granularity == "channel"
    assert PtqvitOptions.build({}, "ptqvit").channel_search == "shared"
    assert PtqvitOptions.build({"mp_no_check": True}, "ptqvit").mp_no_check is True
    assert entry_options(parser.parse_args([]), entry) == {}


# ----------------------------------------------------------------------------------------- mixed precision

def test_allocation_is_optimal_and_meets_budget_bruteforce():
    g = torch.Generator().manual_seed(5)
    cand = MP.mp_candidates(6)
    assert cand == [4, 5, 6, 7, 8] and MP.mp_candidates(8) == [6, 7, 8, 9, 10]
    sizes = [300, 120, 500, 80]
    # errors that fall with more bits, with random module sensitivities
    omega = [[float(torch.rand((), generator=g) * 2.0 ** (-2 * b) * 1e3) for b in cand] for _ in sizes]
    for target in (5.0, 6.0, 6.5):
        budget = target * sum(sizes)
        got = MP.solve_allocation(omega, sizes, cand, budget)
        best_cost = float("inf")
        for combo in itertools.product(range(len(cand)), repeat=len(sizes)):
            if sum(n * cand[k] for n, k in zip(sizes, combo)) <= budget:
                cost = sum(omega[m][k] for m, k in enumerate(combo))
                if cost < best_cost:
                    best_cost = cost
        assert sum(n * cand[k] for n, k in zip(sizes, got)) <= budget
        assert abs(sum(omega[m][k] for m, k in enumerate(got)) - best_cost) <= 1e-9 * max(1.0, best_cost)
    with pytest.raises(VitqError, match="budget"):
        MP.solve_allocation(omega, sizes, cand, 3.0 * sum(sizes))


def test_mixed_precision_save_load_roundtrip(deit, tmp_path):
    qm = vitq.prepare(deit, vitq.Scheme("matmul", 8, 8), method="ptqvit")
    info = vitq.calibrate(qm, images(), "ptqvit", batch_size=8, progress=False, mixed_precision=8, **FAST)
    mp = info["mixed_precision"]
    assert set(mp["bits"]) == {"blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"}
    assert mp["average_weight_bits"] <= 8 + 1e-9
    summary = MP.weight_bits_summary(qm)
    assert abs(summary["model_size_mb"] - mp["model_size_mb"]) < 1e-9
    assert abs(summary["average_weight_bits"] - mp["average_weight_bits"]) < 1e-9
    for name, bits in mp["bits"].items():
        mod = qm.get_submodule(name)
        for q in quantizers_of(mod).values():
            assert q.bits == bits
    vitq.save(qm, tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"calibration": info}, default=str))
    alloc = allocation_from_config(json.loads((tmp_path / "config.json").read_text()))
    assert {k: v[0] for k, v in alloc["groups"].items()} == mp["bits"]
    assert set(alloc["other"]) == {"patch_embed.proj", "head"}
    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers())
    args = parser.parse_args(["allocation", "--state", str(tmp_path), "--plot", str(tmp_path / "alloc.png")])
    assert args.func(args) == 0
    assert (tmp_path / "alloc.png").stat().st_size > 0
    loaded = vitq.load(deit, tmp_path)
    x = images(4, seed=9)
    with torch.no_grad():
        assert torch.equal(qm(x), loaded(x))
    for name, q in quantizers_of(loaded).items():
        ref = quantizers_of(qm)[name]
        assert q.bits == ref.bits and torch.equal(q.scale, ref.scale)


def test_save_load_roundtrip_plain(deit, tmp_path):
    qm = vitq.prepare(deit, vitq.Scheme("matmul", 4, 4), method="ptqvit")
    vitq.calibrate(qm, images(), "ptqvit", batch_size=8, progress=False, **FAST)
    vitq.save(qm, tmp_path)
    loaded = vitq.load(deit, tmp_path)
    x = images(3, seed=4)
    with torch.no_grad():
        assert torch.equal(qm(x), loaded(x))


def test_relative_sensitivity_puts_msa_and_mlp_on_one_scale():
    raw_qk = [1000.0, 3000.0, 400.0, 600.0]  # MSA (QK^T) norms ~5x the MLP output norms
    parts = ["msa", "msa", "mlp", "mlp"]
    rel = MP.module_sensitivity(raw_qk, [30.0, 90.0, 400.0, 600.0], parts, "relative")
    assert rel == pytest.approx([0.5, 1.5, 0.8, 1.2])
    assert MP.module_sensitivity(raw_qk, [30.0, 90.0, 400.0, 600.0], parts, "raw") == raw_qk
    assert MP.module_sensitivity(raw_qk, [30.0, 90.0, 400.0, 600.0], parts, "softmax") == [30.0, 90.0, 400.0, 600.0]


@pytest.mark.parametrize("sensitivity", ["relative", "softmax"])
def test_allocation_no_worse_than_uniform(deit, sensitivity):
    """Omega of the chosen allocation never exceeds the uniform one's, and the model check is recorded: when the
    program's allocation is kept its composed KL is no larger than uniform's."""
    qm = vitq.prepare(deit, vitq.Scheme("matmul", 6, 6), method="ptqvit")
    info = vitq.calibrate(qm, images(), "ptqvit", batch_size=8, progress=False, mixed_precision=6,
                          mp_sensitivity=sensitivity, **FAST)
    mp = info["mixed_precision"]
    chk = mp["check"]
    omega_of = sum(mp["omega"][name][str(b)] for name, b in mp["bits"].items())
    omega_uniform = sum(row["6"] for row in mp["omega"].values())
    assert chk["omega_uniform"] == pytest.approx(omega_uniform)
    assert omega_of <= omega_uniform * (1 + 1e-9)
    assert mp["sensitivity"] == sensitivity and mp["average_weight_bits"] <= 6 + 1e-9
    assert chk["kl_check"] and chk["kl_chosen"] >= 0 and chk["kl_uniform"] >= 0
    if chk["fallback_to_uniform"]:
        assert set(mp["bits"].values()) == {6} and chk["kl_chosen"] > chk["kl_uniform"]
    else:
        assert mp["bits"] == mp["program_bits"] and chk["kl_chosen"] <= chk["kl_uniform"]
    if sensitivity == "relative":
        for part in ("attn", "mlp"):
            vals = [v for k, v in mp["sensitivity_nuclear_norm"].items() if k.endswith(part)]
            assert sum(vals) / len(vals) == pytest.approx(1.0)


def test_allocation_falls_back_to_uniform(deit, monkeypatch):
    """A program answer worse than uniform (here: every module at the lowest width, forced) is replaced by the
    uniform allocation, and the record says why."""
    monkeypatch.setattr(MP, "solve_allocation", lambda omega, sizes, cand, budget: [0] * len(sizes))
    qm = vitq.prepare(deit, vitq.Scheme("matmul", 6, 6), method="ptqvit")
    info = vitq.calibrate(qm, images(), "ptqvit", batch_size=8, progress=False, mixed_precision=6, **FAST)
    mp = info["mixed_precision"]
    assert set(mp["program_bits"].values()) == {4}
    assert set(mp["bits"].values()) == {6} and mp["check"]["fallback_to_uniform"]
    assert "Omega" in mp["check"]["reason"]
    assert mp["check"]["kl_chosen"] > mp["check"]["kl_uniform"]
    for name in mp["bits"]:
        for q in quantizers_of(qm.get_submodule(name)).values():
            assert q.bits == 6

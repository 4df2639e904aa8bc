"""PTQ4ViT / APQ-ViT: twin-uniform and MPQ quantizers, bottom elimination, the Hessian-guided distance, and
both methods end to end on tiny random-init models (with a save/load round trip)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import tiny_model  # noqa: E402

import vitq  # noqa: E402
import vitq.methods  # noqa: E402,F401  (registers the quantizer kinds)
from vitq.methods.bbc import BlockPieces, bbc_distance, bottom_elimination_mask, keep_count  # noqa: E402
from vitq.methods.hessian import hessian_distance, linear_grid  # noqa: E402
from vitq.quant.base import make_quantizer, quantizers_of  # noqa: E402
from vitq.quant.twin import MPQQuantizer, TwinGeluQuantizer, TwinSoftmaxQuantizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


FAST = {"candidates": 4, "rounds": 1, "twin_max_shift": 3, "mpq_candidates": 4}


def _check_quantizer(q, xs, lo, hi):
    y = q.fake_quant(xs)
    assert float(y.min()) >= lo - 1e-7 and float(y.max()) <= hi + 1e-7
    assert bool((y[1:] >= y[:-1]).all()), "not monotone"
    levels = q.level_set()
    assert torch.equal(q.fake_quant(levels), levels), "a level is not represented exactly"
    # every output is a level
    assert bool(torch.isin(y, levels).all())


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("shift", [0, 2, 5])
def test_twin_softmax(bits, shift):
    q = TwinSoftmaxQuantizer(bits, "softmax")
    q.small_scale.fill_(q.small_scale_for_shift(shift))
    q.mark_initialized()
    xs = torch.linspace(-0.2, 1.3, 20001)
    _check_quantizer(q, xs, 0.0, 1.0)
    assert float(q(torch.tensor([1.0]))) == 1.0
    L = 2 ** (bits - 1) - 1
    assert q.level_set().numel() <= 2 * (L + 1)  # fits in b bits
    # the fine range: values below its top are quantized with step s_small
    s = float(q.small_scale)
    x = torch.rand(1000) * s * L
    assert float((q(x) - x).abs().max()) <= s / 2 + 1e-7


@pytest.mark.parametrize("bits", [4, 8])
def test_twin_gelu(bits):
    q = TwinGeluQuantizer(bits, "linear_input")
    q.set_range(-0.17, 3.0)
    L = 2 ** (bits - 1) - 1
    xs = torch.linspace(-1.0, 4.0, 20001)
    _check_quantizer(q, xs, -0.17, 3.0)
    assert abs(float(q.neg_scale) * L - 0.17) < 1e-6 and abs(float(q.pos_scale) * L - 3.0) < 1e-5
    assert float(q(torch.tensor([0.0]))) == 0.0


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("t", [0.7, 0.3, 2.0**-3, 0.01])
def test_mpq(bits, t):
    q = MPQQuantizer(bits, "softmax")
    q.threshold.fill_(t)
    q.mark_initialized()
    xs = torch.cat([torch.linspace(-0.1, 1.2, 20001), torch.logspace(-12, 0, 5001)]).sort().values
    _check_quantizer(q, xs, 0.0, 1.0)
    assert float(q(torch.tensor([1.0]))) == 1.0
    L = 2 ** (bits - 1) - 1
    levels = q.level_set()
    assert levels.numel() <= 2 * (L + 1)
    base = float(levels[levels >= t - 1e-6].min())
    assert abs(base - t) < 1e-6
    # large region: uniform, step (1 - t)/L; small region: log2 below t
    big = levels[levels >= base]
    assert big.numel() == L + 1
    assert torch.allclose(big.diff(), torch.full((L,), (1 - t) / L), atol=1e-6)
    small = levels[(levels > 0) & (levels < base)].sort(descending=True).values
    depth = min(L, 64)
    assert torch.allclose(small, base * 2.0 ** -torch.arange(1, depth + 1, dtype=torch.float32), rtol=1e-6, atol=0)


def test_quantizer_gradients_pass_straight_through():
    for q in (TwinSoftmaxQuantizer(4, "softmax"), MPQQuantizer(4, "softmax"), TwinGeluQuantizer(4, "x")):
        q.mark_initialized()
        x = torch.rand(50, requires_grad=True)
        q(x).sum().backward()
        assert torch.equal(x.grad, torch.ones(50))


@pytest.mark.parametrize("n,frac", [(10, 0.5), (100, 0.5), (7, 0.3), (64, 0.25), (9, 1.0), (5, 0.01)])
def test_bottom_elimination_drops_the_configured_fraction(n, frac):
    err = torch.randperm(n).float() + 1.0  # distinct values
    mask = bottom_elimination_mask(err, frac)
    kept = int(mask.sum())
    assert kept == keep_count(n, frac)
    if frac * n == int(frac * n):
        assert n - kept == int(round((1 - frac) * n))  # exactly the configured fraction is dropped
    assert float(err[mask].min()) > float(err[~mask].max()) if kept < n else True
    o = torch.zeros(n)
    assert float(bbc_distance(o, err.sqrt(), torch.ones(n), frac)) == pytest.approx(float(err[mask].sum()))


def test_hessian_distance_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    o, o_hat, grad = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    direct = 0.0
    for n in range(5):
        d = (o[n] - o_hat[n])[:, None]
        direct += float(d.T @ torch.diag(grad[n] ** 2) @ d)
    assert float(hessian_distance(o, o_hat, grad)) == pytest.approx(direct / 5, rel=1e-12)


def test_linear_grid():
    assert linear_grid(0.0, 1.2, 100)[0] == pytest.approx(0.012) and linear_grid(0.0, 1.2, 100)[-1] == 1.2
    g = linear_grid(0.8, 1.2, 9)
    assert len(g) == 9 and 1.0 in [round(v, 12) for v in g]


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("deit")
    images = torch.randn(10, 3, 32, 32)
    return model, images


def test_block_pieces_equal_block(tiny):
    model, images = tiny
    q = vitq.prepare(model, vitq.Scheme("matmul", 4, 4), method="apq")
    vitq.calibrate(q, images, method="minmax", progress=False)
    block = q.blocks[1]
    h = torch.randn(3, 17, 192)
    idx = torch.tensor([0, 3, 16])
    with torch.no_grad():
        assert torch.allclose(BlockPieces(block).full(h, idx), block(h)[:, idx], atol=1e-6)


def test_methods_refuse_fq_and_set_softmax_kind(tiny):
    model, _ = tiny
    with pytest.raises(vitq.VitqError, match="matmul"):
        vitq.prepare(model, vitq.Scheme("fq", 8, 8), method="ptq4vit")
    kinds = {m: {a.softmax_quant.kind for a in (q.blocks[0].attn, q.blocks[1].attn)}
             for m, q in ((m, vitq.prepare(model, vitq.Scheme("matmul", 8, 8), method=m,
                                           options={"mpq": False} if m == "apq" else {}))
                          for m in ("ptq4vit", "apq"))}
    assert kinds == {"ptq4vit": {"twin"}, "apq": {"twin"}}
    q = vitq.prepare(model, vitq.Scheme("matmul", 8, 8), method="apq")
    assert q.blocks[0].attn.softmax_quant.kind == "mpq"
    q = vitq.prepare(model, vitq.Scheme("matmul", 8, 8, softmax_quantizer="log2"), method="apq")
    assert q.blocks[0].attn.softmax_quant.kind == "log2"


@pytest.mark.parametrize("method,options,softmax", [
    ("ptq4vit", {}, None),
    ("apq", {}, None),
    ("apq", {"bbc": False, "token_fraction": 0.5}, None),
    ("apq", {"mpq": False, "keep_fraction": 0.3, "token_fraction": 0.5, "bbc_inputs": "float"}, None),
    ("ptq4vit", {}, "mpq"),
    ("apq", {}, "uniform"),
])
def test_end_to_end_and_save_load(tiny, tmp_path, method, options, softmax):
    model, images = tiny
    options = {**FAST, **options}
    scheme = vitq.Scheme("matmul", w_bits=4, a_bits=4, softmax_quantizer=softmax)
    q = vitq.prepare(model, scheme, method=method, options=options)
    info = vitq.calibrate(q, images, method=method, batch_size=4, progress=False, **options)
    assert info["num_calib_used"] == 10 and info["regime"] == "matmul"
    assert info["effective_options"]["candidates"] == 4
    expected_softmax = softmax or ("twin" if method == "ptq4vit" or options.get("mpq") is False else "mpq")
    assert info["softmax_quantizer"] == expected_softmax
    assert info["twin_gelu_swapped"] == 2
    assert all(bool(qq.initialized) for qq in quantizers_of(q).values())
    assert type(q.blocks[0].mlp.fc2.input_quant) is TwinGeluQuantizer
    if method == "apq" and options.get("bbc", True):
        assert set(info["bbc_blocks"]) == {"blocks.0", "blocks.1"}
        for b in info["bbc_blocks"].values():
            assert b["bbc_distance_ratio"] <= 1.0 + 1e-9  # 1.0 is on the BBC grid
    with torch.no_grad():
        out = q(images)
        assert torch.isfinite(out).all()
        assert not torch.equal(out, model(images))
    vitq.save(q, tmp_path)
    q2 = vitq.load(model, tmp_path)
    assert type(q2.blocks[1].mlp.fc2.input_quant) is TwinGeluQuantizer
    assert q2.blocks[0].attn.softmax_quant.kind == expected_softmax
    with torch.no_grad():
        assert torch.equal(q2(images), out)


def test_num_calib_limits_the_images(tiny):
    model, images = tiny
    q = vitq.prepare(model, vitq.Scheme("matmul", 8, 8), method="ptq4vit")
    info = vitq.calibrate(q, images, method="ptq4vit", progress=False, num_calib=4, **FAST)
    assert info["num_calib_used"] == 4 and info["num_calib_given"] == 10
    with pytest.raises(vitq.VitqError, match="unknown options"):
        vitq.calibrate(q, images, method="ptq4vit", progress=False, bogus=1)
    with pytest.raises(vitq.VitqError, match="keep_fraction"):
        vitq.calibrate(q, images, method="apq", progress=False, keep_fraction=0.0)


def test_any_method_can_use_any_softmax_kind(tiny):
    model, images = tiny
    for kind in ("uniform", "log2", "twin", "mpq"):
        q = vitq.prepare(model, vitq.Scheme("matmul", 8, 8, softmax_quantizer=kind))
        vitq.calibrate(q, images, method="minmax", progress=False)
        assert q.blocks[0].attn.softmax_quant.kind == kind
        assert make_quantizer(kind, 8, "softmax").kind == kind
        with torch.no_grad():
            assert torch.isfinite(q(images)).all()


def test_apq_on_swin_blocks():
    model = tiny_model("swin")
    images = torch.randn(4, 3, 56, 56)
    opts = {**FAST, "bbc_candidates": 3}
    q = vitq.prepare(model, vitq.Scheme("matmul", 6, 6), method="apq", options=opts)
    info = vitq.calibrate(q, images, method="apq", progress=False, **opts)
    assert len(info["bbc_blocks"]) == 4 and all(b["rows"] == "all tokens" for b in info["bbc_blocks"].values())
    with torch.no_grad():
        assert torch.isfinite(q(images)).all()

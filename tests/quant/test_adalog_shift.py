"""The shifted post-GELU log quantizer (adalog_shift, issue 26)."""

import pytest
import torch
from conftest import tiny_images, tiny_model

import vitq
from vitq.quant.log import AdaLogQuantizer, AdaLogShiftQuantizer
from vitq.quant.observers import Observer

pytestmark = pytest.mark.usefixtures("one_thread")


def _observed(x):
    obs = Observer()
    obs.update(x)
    obs.start_error_pass()
    obs.update(x)
    return obs


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_shifted_levels_codes_monotone_and_gelu_minimum_exact(bits):
    g = torch.Generator().manual_seed(0)
    gelu = torch.nn.functional.gelu(torch.randn(20000, generator=g) * 2)
    q = AdaLogShiftQuantizer(bits, "linear_input")
    info = q.fit(_observed(gelu))
    assert info["shift"] == pytest.approx(-float(gelu.min()), rel=1e-3) and not q.signed
    levels = q.level_set()
    assert levels.numel() == 2**bits  # every code used: 2^b - 1 log levels and the shifted zero
    y = q.fake_quant(gelu)
    assert bool(torch.isin(y, levels).all())
    xs = torch.sort(gelu).values
    ys = q.fake_quant(xs)
    assert bool((ys[1:] >= ys[:-1]).all())
    assert torch.allclose(q.fake_quant(levels), levels, atol=1e-6)
    assert float(y.min()) == pytest.approx(-float(q.shift))


def test_shift_beats_the_sign_bit_at_4_bits_on_gelu_outputs():
    g = torch.Generator().manual_seed(1)
    gelu = torch.nn.functional.gelu(torch.randn(50000, generator=g) * 1.5)
    signed, shifted = AdaLogQuantizer(4, "linear_input"), AdaLogShiftQuantizer(4, "linear_input")
    obs = _observed(gelu)
    signed.fit(obs)
    shifted.fit(obs)
    e_signed = float((signed.fake_quant(gelu) - gelu).pow(2).mean())
    e_shift = float((shifted.fake_quant(gelu) - gelu).pow(2).mean())
    assert e_shift < e_signed, (e_shift, e_signed)


def test_scheme_kind_calibrates_and_saves(tmp_path):
    model, x = tiny_model("deit"), tiny_images("deit", 4)
    q, _ = vitq.quantize(model, x, "matmul", "repq", w_bits=4, a_bits=4, gelu_quantizer="adalog_shift",
                         progress=False)
    kinds = {type(m.mlp.fc2.input_quant).kind for m in q.modules() if hasattr(m, "mlp")}
    assert kinds == {"adalog_shift"}
    vitq.save(q, tmp_path)
    r = vitq.load(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(q(x), r(x))

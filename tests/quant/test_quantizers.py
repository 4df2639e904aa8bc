"""Property tests of the quantizers: bounds, idempotence, round-half-to-even, log2 levels, PTF shifts."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitq.quant.base import int_range, make_quantizer
from vitq.quant.uniform import Log2Quantizer, PTFQuantizer, UniformQuantizer

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def uniform(bits, signed, lo, hi):
    q = UniformQuantizer(bits, "x", signed=signed)
    q.set_range(lo, hi)
    return q


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(2, 8), signed=st.booleans(), lo=st.floats(-100, 0), hi=st.floats(1e-3, 100),
       xs=st.lists(finite, min_size=1, max_size=64))
def test_uniform_bounds_idempotence_and_grid(bits, signed, lo, hi, xs):
    q = uniform(bits, signed, lo, hi)
    x = torch.tensor(xs)
    y = q(x)
    qmin, qmax = int_range(bits, signed)
    s, z = q.scale, q.zero_point
    assert torch.all(y >= (qmin - z) * s - 1e-4) and torch.all(y <= (qmax - z) * s + 1e-4)
    codes = y / s + z
    assert torch.allclose(codes, torch.round(codes), atol=1e-3)  # on the integer grid
    assert torch.equal(q(y), y) or torch.allclose(q(y), y, atol=1e-6 * float(s) * 2**bits)
    inside = (x >= (qmin - z) * s) & (x <= (qmax - z) * s)
    assert torch.all((y - x)[inside].abs() <= s / 2 + 1e-5)  # rounding error at most half a step


@settings(max_examples=100, deadline=None)
@given(bits=st.integers(2, 8), k=st.integers(-8, 7), e=st.integers(-6, 3))
def test_round_half_to_even(bits, k, e):
    scale = 2.0**e  # exact in float, so x / scale is exactly k + 0.5
    q = UniformQuantizer(bits, "x", signed=True)
    q.scale.fill_(scale)
    q.mark_initialized()
    qmin, qmax = int_range(bits, True)
    x = torch.tensor([(k + 0.5) * scale])
    code = round(k + 0.5)  # Python rounds half to even
    expected = min(max(code, qmin), qmax) * scale
    assert torch.allclose(q(x), torch.tensor([expected], dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_signed_and_unsigned_ranges():
    assert int_range(8, True) == (-128, 127)
    assert int_range(4, False) == (0, 15)
    q = uniform(8, False, -1.0, 3.0)
    assert 0 <= q.zero_point <= 255 and q(torch.tensor([0.0])).item() == 0.0  # zero is exact
    q = uniform(4, True, -2.0, 1.0)
    assert q.zero_point == 0 and torch.isclose(q.scale, torch.tensor(2.0 / 7))


def test_uncalibrated_is_identity_and_ste_gradient():
    q = UniformQuantizer(4, "x")
    x = torch.linspace(-0.8, 0.8, 10, requires_grad=True)
    assert torch.equal(q(x), x)
    q.set_range(-1, 1)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(10))  # straight-through inside the range
    x.grad = None
    q(torch.tensor([5.0]) * x[:1]).sum().backward()  # clipped: no gradient
    assert x.grad[0] == 0


def test_per_channel_weight_scales():
    q = UniformQuantizer(8, "weight", signed=True, channel_axis=0, num_channels=3)
    w = torch.tensor([[1.0, -2.0], [0.1, 0.05], [10.0, 3.0]])
    q.set_range(w.min(1).values, w.max(1).values)
    assert torch.allclose(q.scale, torch.tensor([2.0, 0.1, 10.0]) / 127)
    assert torch.allclose(q(w), w, atol=0.04)


@settings(max_examples=100, deadline=None)
@given(bits=st.integers(2, 8), xs=st.lists(st.floats(0, 1, width=32), min_size=1, max_size=64))
def test_log2_levels(bits, xs):
    q = Log2Quantizer(bits, "softmax")
    q.mark_initialized()
    x = torch.tensor(xs)
    y = q(x)
    nz = y[y > 0]
    exps = -torch.log2(nz)
    assert torch.allclose(exps, torch.round(exps)) and torch.all(exps <= 2**bits - 1)  # powers of two in range
    assert torch.all(y <= 1.0) and torch.equal(q(y), y)  # idempotent
    assert torch.all(y[x < 2.0 ** -(2**bits - 0.5)] == 0)  # below the smallest level -> 0
    assert q(torch.tensor([1.0])).item() == 1.0


def test_ptf_shift_covers_each_channel_and_is_idempotent():
    torch.manual_seed(0)
    x = torch.randn(500, 6) * torch.tensor([20.0, 1.0, 0.5, 3.0, 0.1, 8.0])
    q = PTFQuantizer(8, "norm_input", num_channels=6)
    q.set_range(x.min(), x.max(), channel_min=x.min(0).values, channel_max=x.max(0).values)
    assert q.shift.tolist()[0] == 0 and q.shift[4] == 3  # widest channel coarse, narrow ones fine
    s = q.channel_scale()
    # every channel's own range is covered (up to half a step lost to the integer zero point)
    assert torch.all((q.qmin - q.zero_point) * s <= x.min(0).values + s / 2)
    assert torch.all((q.qmax - q.zero_point) * s >= x.max(0).values - s / 2)
    y = q(x)
    assert torch.allclose(q(y), y, atol=1e-5) and torch.all((y - x).abs() <= s / 2 + 1e-5)
    err_ptf = (y - x)[:, 4].abs().mean()
    q.shift.zero_()
    assert (q(x) - x)[:, 4].abs().mean() > err_ptf  # the shift helps the narrow channel


def test_make_quantizer_unknown_kind():
    import pytest

    from vitq.errors import VitqError

    with pytest.raises(VitqError, match="unknown quantizer kind 'nope'"):
        make_quantizer("nope", 8, "x")

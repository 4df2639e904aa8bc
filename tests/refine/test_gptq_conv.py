"""GPTQ on grouped and depthwise convolutions (one Hessian per group) and on a CNN's stem."""

import pytest
import torch
from conftest import tiny_images, tiny_model

import vitq
from vitq.quant.modules import QConv2d
from vitq.quant.uniform import UniformQuantizer
from vitq.refine.gptq import gptq_groups, gptq_rows, grid_quant
from vitq.scheme import Scheme

pytestmark = pytest.mark.usefixtures("one_thread")


def _quantizer(w2, bits):
    q = UniformQuantizer(bits, "weight", signed=True, channel_axis=0, num_channels=w2.shape[0])
    q.set_range(w2.min(1).values, w2.max(1).values)
    return q


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_groups_is_gptq_rows_per_group(act_order):
    g = torch.Generator().manual_seed(1)
    groups, rows, cols = 5, 2, 9
    w = torch.randn(groups * rows, cols, generator=g, dtype=torch.float64)
    x = torch.randn(groups, 200, cols, generator=g, dtype=torch.float64)
    x = x @ torch.randn(groups, cols, cols, generator=g, dtype=torch.float64)  # correlated per group
    h = 2 * x.transpose(1, 2) @ x / 200
    q = _quantizer(w.float(), 4)
    got = gptq_groups(w.reshape(groups, rows, cols), h, grid_quant(q, groups), act_order=act_order)
    for j in range(groups):
        sub = _quantizer(w[j * rows:(j + 1) * rows].float(), 4)
        want = gptq_rows(w[j * rows:(j + 1) * rows], h[j], grid_quant(sub), act_order=act_order, block_size=4)
        assert torch.allclose(got[j], want, atol=1e-10)
    assert not torch.allclose(got.reshape(w.shape), grid_quant(q)(w))  # compensation changed some codes


def _depthwise_layers(q):
    return [(n, m) for n, m in q.named_modules() if isinstance(m, QConv2d) and m.groups > 1]


def test_gptq_on_a_depthwise_cnn_lowers_the_output_error_and_rounds_the_stem():
    model, x = tiny_model("effnet"), tiny_images("effnet", 8)
    q = vitq.prepare(model, Scheme("matmul", 4, 8))
    vitq.calibrate(q, x, method="minmax", progress=False)
    dws = _depthwise_layers(q)
    assert dws and all(m.groups == m.weight.shape[0] for _, m in dws)  # depthwise
    with torch.no_grad():
        ref = model(x)
        nearest = q(x)
    info = vitq.round_weights(q, x, how="gptq", progress=False)["gptq"]
    layers = info["layers"]
    n_weighted = sum(isinstance(m, QConv2d) or hasattr(m, "weight_quant") for m in q.modules())
    assert info["layers_rounded"] == n_weighted  # nothing skipped: the stem too (it is outside every unit)
    assert "proxy_error_gptq" in layers["conv_stem"]
    for name, m in dws:
        assert layers[name]["proxy_error_gptq"] <= layers[name]["proxy_error_nearest"] * (1 + 1e-6), name
        assert torch.equal(m.weight_quant(m.weight), m.weight)  # on the grid
    assert sum(layers[n]["proxy_error_gptq"] for n, _ in dws) < sum(layers[n]["proxy_error_nearest"] for n, _ in dws)
    with torch.no_grad():
        rounded = q(x)
    assert float((rounded - ref).pow(2).mean()) < float((nearest - ref).pow(2).mean())


def test_gptq_on_a_grouped_cnn():
    model, x = tiny_model("regnet"), tiny_images("regnet", 8)
    q = vitq.prepare(model, Scheme("matmul", 4, 8))
    vitq.calibrate(q, x, method="minmax", progress=False)
    grouped = [(n, m) for n, m in q.named_modules() if isinstance(m, QConv2d) and 1 < m.groups < m.weight.shape[0]]
    assert grouped  # RegNetX: grouped 3x3 convolutions with several channels per group
    with torch.no_grad():
        ref, nearest = model(x), q(x)
    info = vitq.round_weights(q, x, how="gptq", progress=False)["gptq"]
    for name, _ in grouped:
        e = info["layers"][name]
        assert e["proxy_error_gptq"] <= e["proxy_error_nearest"] * (1 + 1e-6), name
    with torch.no_grad():
        assert float((q(x) - ref).pow(2).mean()) < float((nearest - ref).pow(2).mean())

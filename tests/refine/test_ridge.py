"""ERQ-style closed-form ridge compensation refiner (ridge, issue 26)."""

import pytest
import torch
from conftest import tiny_images, tiny_model

import vitq
from vitq.refine.ridge import _solve

pytestmark = pytest.mark.usefixtures("one_thread")


def test_solve_is_the_ridge_minimiser():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    xq = x + 0.1 * torch.randn(200, 6, generator=g, dtype=torch.float64)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    a, c = xq.T @ xq, x.T @ xq
    w2 = _solve(w, a, c, 0.05).double()
    lam = 0.05 * float(torch.diagonal(a).mean())
    # the stacked least-squares problem [X̂; √λ I] W'ᵀ = [X Wᵀ; √λ Wᵀ]
    lhs = torch.cat([xq, lam**0.5 * torch.eye(6, dtype=torch.float64)])
    rhs = torch.cat([x @ w.T, lam**0.5 * w.T])
    ref = torch.linalg.lstsq(lhs, rhs).solution.T
    assert torch.allclose(w2, ref, atol=1e-8)
    err = lambda m: float((xq @ m.T - x @ w.T).pow(2).sum())  # noqa: E731
    assert err(w2) < err(w)


@pytest.mark.parametrize("scheme", ["matmul", "fq"])
def test_ridge_never_increases_a_piece_error_and_lowers_some(scheme):
    model, x = tiny_model("deit"), tiny_images("deit", 8, seed=1)
    q, _ = vitq.quantize(model, x, scheme, "repq" if scheme == "matmul" else "fqvit", w_bits=8, a_bits=4,
                         progress=False)
    info = vitq.refine(q, model, x, "ridge", batch_size=4, progress=False)
    pieces = [e for e in info["trace"] if e["layers"]]
    assert pieces and all(e["mse_after"] <= e["mse_before"] for e in pieces)
    assert any(e["mse_after"] < e["mse_before"] for e in pieces)
    assert info["calib_kl"]["after"] <= info["calib_kl"]["before"] + 1e-3

"""PSAQ-ViT v1 as the paper defines it, on tiny random-init transformers: the patch features at the attention
output (head-averaged, prefix tokens dropped), the kernel-density entropy over all pairs, DeepInversion's loop
(seeded shift and flip, warm-up + cosine per round) and the set key of the new options."""

import math

import pytest
import torch
from conftest import ZOO, tiny_model

from vitq.synth import synthesize
from vitq.synth.base import InputHooks, LoopOptions, augment, learning_rate
from vitq.synth.psaq import (
    GaussianKde,
    PsaqOptions,
    differential_entropy,
    pair_similarities,
    patch_features,
    probes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def layer_entropies(model, x, point):
    """The entropy of each self-attention layer of ``model`` on images ``x`` at ``point``."""
    layers = probes(model, point)
    with InputHooks([p.module for p in layers]) as hooks, torch.no_grad():
        model.eval()(x)
        feats = [patch_features(a, p) for a, p in zip(hooks.inputs, layers, strict=True)]
    return [float(differential_entropy(pair_similarities(f, len(x)))) for f in feats]


def test_features_are_the_head_averaged_attention_output_without_the_class_token():
    model = tiny_model("deit")  # 16 patches + a class token, 3 heads of 64
    layers = probes(model)
    assert [p.module for p in layers] == [b.attn.proj for b in model.blocks]
    with InputHooks([layers[0].module]) as hooks, torch.no_grad():
        model.eval()(torch.randn(2, 3, 32, 32))
        a = hooks.inputs[0]
    f = patch_features(a, layers[0])
    assert f.shape == (2, 16, 64)
    assert torch.allclose(f, a[:, 1:].reshape(2, 16, 3, 64).mean(2))
    old = probes(model, "attention-input")
    assert [p.module for p in old] == [b.attn.qkv for b in model.blocks] and old[0].heads == 1


@pytest.mark.parametrize("key,tokens", [("deit", 16), ("dinov2_reg", 16), ("cait", 16), ("hf_deit", 16),
                                        ("swin", 49)])
def test_only_patch_tokens_are_kept(key, tokens):
    """Class, distillation and register tokens are dropped where a layer carries them (CaiT's self-attention
    layers carry none; Swin's windows have 49 patches)."""
    model, z = tiny_model(key), ZOO[key]
    layers = probes(model)
    with InputHooks([p.module for p in layers]) as hooks, torch.no_grad():
        model.eval()(torch.randn(2, 3, z.size, z.size))
        assert {patch_features(a, p).shape[1] for a, p in zip(hooks.inputs, layers, strict=True)} == {tokens}


def test_the_value_path_moves_the_attention_output_entropy_and_not_the_input_one():
    model, x = tiny_model("deit"), torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = {p: layer_entropies(model, x, p) for p in ("attention-output", "attention-input")}
    with torch.no_grad():  # the last block's V projection (rows 2C..3C of qkv) only
        c = model.embed_dim
        model.blocks[-1].attn.qkv.weight[2 * c:] += torch.randn(c, c, generator=torch.Generator().manual_seed(2))
    after = {p: layer_entropies(model, x, p) for p in ("attention-output", "attention-input")}
    assert after["attention-input"] == before["attention-input"]
    assert abs(after["attention-output"][-1] - before["attention-output"][-1]) > 1e-3
    assert after["attention-output"][0] == before["attention-output"][0]


def naive_entropy(feats, images, h=0.01, k=10):
    """The estimate written out plainly (every one of the N x N similarities a sample, autograd throughout)."""
    t = torch.nn.functional.normalize(feats, dim=-1)
    sims = (t @ t.transpose(1, 2)).reshape(images, -1)
    xs = torch.linspace(float(sims.detach().min()), float(sims.detach().max()), k, dtype=feats.dtype)
    p = torch.exp(-0.5 * ((xs[:, None] - sims[:, None, :]) / h) ** 2).mean(2) / (h * math.sqrt(2 * math.pi))
    return torch.trapezoid(-(p + 1e-4) * (p + 1e-4).log(), xs, dim=-1).mean()


@pytest.mark.parametrize("rows,images,h", [(3, 3, 0.01), (8, 2, 0.01), (3, 3, 0.3)])
def test_entropy_equals_the_plain_all_pairs_estimate(rows, images, h):
    """Half the pairs weighted twice, the band of grid points and the custom backward change nothing: value and
    gradient as the plain estimate over all N x N pairs (rows > images: Swin's windows pooled per image; h=0.3:
    the band covers the grid, every point is evaluated)."""
    g = torch.Generator().manual_seed(rows)
    a = torch.randn(rows, 12, 6, generator=g, dtype=torch.double).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    ours = differential_entropy(pair_similarities(a, images), h)
    plain = naive_entropy(b, images, h)
    ours.backward()
    plain.backward()
    assert float(ours.detach()) == pytest.approx(float(plain.detach()), rel=1e-6, abs=1e-9)
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("h", [0.05, 0.2])  # a band of 3 of the 5 grid points; all of them
def test_kde_gradient_and_chunks(monkeypatch, h):
    g = torch.Generator().manual_seed(0)
    sims = torch.rand(2, 40, generator=g, dtype=torch.double).requires_grad_(True)
    grid = torch.linspace(0, 1, 5, dtype=torch.double)
    torch.autograd.gradcheck(lambda s: GaussianKde.apply(s, grid, h), (sims,))
    direct = torch.exp(-0.5 * ((grid[None, :, None] - sims[:, None, :]) / h) ** 2).sum(2)
    whole = GaussianKde.apply(sims, grid, h)
    monkeypatch.setattr(GaussianKde, "CHUNK", 7)  # several chunks of samples
    assert torch.allclose(whole, direct) and torch.allclose(GaussianKde.apply(sims, grid, h), direct)


def test_differential_entropy_is_larger_for_a_wider_spread():
    g = torch.Generator().manual_seed(0)
    uniform = torch.rand(4, 20000, generator=g) * 0.5  # the entropy of U(0, 0.5) is -log 2
    assert abs(float(differential_entropy(uniform)) + math.log(2)) < 0.1
    narrow, wide = (torch.randn(4, 5000, generator=g) * s for s in (0.05, 0.3))
    assert float(differential_entropy(wide)) > float(differential_entropy(narrow)) + 1.0


def test_psaq_loss_falls_and_the_entropy_rises_on_a_tiny_vit():
    x, rec = synthesize(tiny_model("deit"), 4, "psaq", {"iters": 20, "batch_size": 4}, progress=False)
    b = rec["made"]["batches"][0]
    assert b["last_loss"]["total"] < b["first_loss"]["total"]
    assert b["last_loss"]["entropy"] > b["first_loss"]["entropy"] + 0.3
    made = rec["made"]
    assert made["point"] == "attention-output" and made["heads_averaged"] == [3] and made["prefix_tokens"] == 1
    assert rec["options"]["jitter"] == 15 and rec["options"]["flip"] and rec["options"]["rounds"] == 2


def test_jitter_and_flip_are_seeded_and_used():
    def run(seed, **opts):
        return synthesize(tiny_model("deit"), 2, "psaq", {"iters": 8, **opts}, seed=seed, progress=False)
    (a, ra), (b, rb) = run(3, jitter=4), run(3, jitter=4)
    assert torch.equal(a, b) and ra["made"]["batches"][0]["augment"] == rb["made"]["batches"][0]["augment"]
    aug = ra["made"]["batches"][0]["augment"]
    assert aug["shifted"] > 0 and 0 < aug["flipped"] < 8 and aug["largest_shift"] <= 8
    plain, rp = run(3, jitter=0, flip=False)
    assert not torch.equal(a, plain) and "augment" not in rp["made"]["batches"][0]
    assert not torch.equal(a, run(4, jitter=4)[0])


def test_augment_draws_from_the_batch_generator_and_widens_with_the_round():
    cfg = LoopOptions(iters=10, rounds=2, jitter=1, flip=True)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    def draws(seed):
        gen = torch.Generator().manual_seed(seed)
        return [augment(x, cfg, s, gen)[1] for s in range(10)]
    assert draws(5) == draws(5) and draws(5) != draws(6)
    gen = torch.Generator().manual_seed(0)
    shifts = [augment(x, cfg, s, gen)[1]["shift"] for s in range(10) for _ in range(20)]
    assert max(map(abs, shifts[:100])) == 1 and max(map(abs, shifts[100:])) == 2
    y, d = augment(x, LoopOptions(jitter=3), 0, torch.Generator().manual_seed(1))
    assert torch.equal(y, torch.roll(x, (d["shift"], d["shift"]), (2, 3)))
    assert augment(x, LoopOptions(), 0, gen) == (x, {})


def test_learning_rate_warms_up_and_restarts_each_round():
    cfg = LoopOptions(iters=20, lr=0.2, rounds=2, warmup=0.2)
    lrs = [learning_rate(cfg, s) for s in range(20)]
    assert lrs[0] == pytest.approx(0.1) and lrs[1] == pytest.approx(0.2) and lrs[2] == pytest.approx(0.2)
    assert lrs[9] < 0.05 and lrs[10] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.2)
    plain = LoopOptions(iters=7, lr=0.3)
    assert [learning_rate(plain, s) for s in range(7)] == \
        [0.3 * 0.5 * (1 + math.cos(math.pi * s / 7)) for s in range(7)]


def test_set_key_changes_with_the_psaq_options_and_keeps_plain_loop_keys(tmp_path):
    model = tiny_model("deit")

    def key(generator="psaq", **opts):
        return synthesize(model, 1, generator, {"iters": 1, **opts}, directory=tmp_path, progress=False)[1]["key"]
    base = key()
    for change in ({"jitter": 0}, {"flip": False}, {"rounds": 1}, {"warmup": 0.0}, {"beta1": 0.9},
                   {"point": "attention-input"}, {"bandwidth": 0.02}, {"prior_rms": (0.1, 0.2)}):
        assert key(**change) != base, change
    from vitq.synth.store import key_options
    plain = key_options(LoopOptions().to_dict())
    assert set(plain) == {"iters", "lr", "batch_size", "ce_weight", "tv_weight"}  # keyed as before the loop options
    assert "jitter" in key_options(PsaqOptions().to_dict())

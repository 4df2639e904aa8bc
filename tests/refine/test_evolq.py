"""Evol-Q refiner and `vitq landscape` on tiny random-init timm models."""

import argparse
import copy
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

import vitq
from vitq.api import as_calib
from vitq.cli.flags import add_entry_flags, entry_options
from vitq.cli.landscape import add_command
from vitq.errors import VitqError
from vitq.quant.base import quantizers_of
from vitq.refine.evolq import int_layernorm_teacher, split_calibration
from vitq.refine.evolq_options import default_radius, make_config
from vitq.refine.evolq_search import search_space
from vitq.refine.fitness import FitnessEvaluator, infonce_loss, kl_loss
from vitq.refine.landscape import compute_landscape, write_outputs
from vitq.registry import get_refiner

pytestmark = pytest.mark.usefixtures("one_thread")


def _deit():
    return tiny_model("deit")


def _swin():
    return tiny_model("swin")


def _images(model, n=16, seed=1):
    size = model.patch_embed.img_size
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _calibrated(model, scheme, w_bits=4, method=None):
    images = _images(model)
    q = vitq.prepare(model, vitq.Scheme(scheme, w_bits=w_bits, a_bits=8))
    method = method or ("fqvit" if scheme == "fq" else "omse")
    vitq.calibrate(q, images, method=method, batch_size=8, progress=False)
    return q, images


def _refine(q, model, images, **options):
    options.setdefault("passes", 1)
    return vitq.refine(q, model, images, "evolq", batch_size=8, progress=False, **options)


def _scales(q):
    return {k: v.clone() for k, v in q.state_dict().items() if k.endswith(".scale")}


def test_infonce_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    zq, zf = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    T = 3.0
    total = 0.0
    for i in range(5):
        qi = zq[i] / zq[i].norm()
        sims = [float(qi @ (zf[j] / zf[j].norm())) / T for j in range(5)]
        total += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
    direct = total / 5 * 2 * T
    assert float(infonce_loss(zq, zf, T)) == pytest.approx(direct, rel=1e-5)
    # a perfect match scores lower than a mismatch; temperature is honoured
    assert float(infonce_loss(zf, zf, T)) < float(infonce_loss(zq, zf, T))
    assert float(infonce_loss(zq, zf, 1.0)) != pytest.approx(float(infonce_loss(zq, zf, T)))
    kl = float((F.softmax(zf, 1) * (F.log_softmax(zf, 1) - F.log_softmax(zq, 1))).sum(1).mean())
    assert float(kl_loss(zq, zf)) == pytest.approx(kl, rel=1e-5)


def test_fitness_averages_over_batches():
    model = _deit()
    q, images = _calibrated(model, "fq")
    ev = FitnessEvaluator(q, model, as_calib(images, 8, progress=False))
    with torch.no_grad():
        per_batch = [float(infonce_loss(q(images[i:i + 8]), model(images[i:i + 8]))) for i in (0, 8)]
    assert ev.evaluate(None) == pytest.approx(sum(per_batch) / 2, rel=1e-5)


@pytest.mark.parametrize("scheme", ["fq", "matmul"])
@pytest.mark.parametrize("make", [_deit, _swin], ids=["deit", "swin"])
def test_block_cache_equals_full_forward(scheme, make):
    model = make()
    q, images = _calibrated(model, scheme)
    ev = FitnessEvaluator(q, model, as_calib(images, 8, progress=False))
    full = ev.evaluate(None)
    for unit, _, _ in ev.trunk.blocks():
        assert ev.evaluate(unit) == pytest.approx(full, rel=1e-6, abs=1e-6)
    # and after perturbing every searchable scale (weights and activations) of every block: the cache of a
    # block's input is rebuilt from the perturbed upstream blocks, and the cached path still equals the full one
    g = torch.Generator().manual_seed(3)
    for _unit, name, block in ev.trunk.blocks():
        for _, qz in search_space(name, block, ("attn", "mlp", "act")):
            qz.scale.mul_(1 + 0.3 * (torch.rand(qz.scale.shape, generator=g) - 0.5))
    perturbed = ev.evaluate(None)
    assert abs(perturbed - full) > 1e-4  # the perturbation moved the fitness
    for unit, _, _ in ev.trunk.blocks():
        ev.cache_inputs(unit)
        assert ev.evaluate(unit) == pytest.approx(perturbed, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("scheme", ["fq", "matmul"])
def test_best_fitness_never_gets_worse(scheme):
    model = _deit()
    q, images = _calibrated(model, scheme, w_bits=3)
    info = _refine(q, model, images, passes=2, mode="improved", patience=0)
    assert len(info["trace"]) == 2 * 2  # 2 passes x 2 blocks, none skipped
    prev = info["fitness"]["initial"]
    for step in info["trace"]:
        assert step["after"] <= step["before"]
        assert step["before"] == pytest.approx(prev, rel=1e-6)  # the next block starts where the last ended
        prev = step["after"]
    assert info["fitness"]["final"] == pytest.approx(prev, rel=1e-6)
    assert info["fitness"]["final"] <= info["fitness"]["initial"]


@pytest.mark.parametrize("scheme", ["fq", "matmul"])
@pytest.mark.parametrize("make", [_deit, _swin], ids=["deit", "swin"])
def test_faithful_touches_only_attention_weight_scales(scheme, make):
    model = make()
    q, images = _calibrated(model, scheme)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    info = _refine(q, model, images, mode="faithful", radius=2e-4, cycles=5)  # random-init scales are small
    after = q.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the search changed nothing"
    allowed = (".attn.qkv.weight_quant.scale", ".attn.proj.weight_quant.scale")
    assert all(k.endswith(allowed) for k in changed), sorted(changed)
    assert info["config"]["mode"] == "faithful" and info["config"]["search"] == ["attn"]
    assert info["select_on_val"] is False


def test_resume_equals_uninterrupted_run(tmp_path):
    model = _deit()
    q0, images = _calibrated(model, "fq")
    opts = dict(passes=2, cycles=2, population=6, sample=4, radius=0.02, seed=7)
    full = copy.deepcopy(q0)
    ref = _refine(full, model, images, checkpoint_path=str(tmp_path / "a.ckpt"), **opts)

    class Killed(Exception):
        pass

    seen = []

    def kill_after_third(event):
        seen.append(event)
        if len(seen) == 3:  # pass 1, first block (blocks.1) done: killed mid-pass
            raise Killed

    ckpt = str(tmp_path / "b.ckpt")
    part = copy.deepcopy(q0)
    with pytest.raises(Killed):
        _refine(part, model, images, checkpoint_path=ckpt, on_block_end=kill_after_third, **opts)
    assert os.path.exists(ckpt)
    again = copy.deepcopy(q0)  # the restarted command recalibrates from scratch
    res = _refine(again, model, images, checkpoint_path=ckpt, **opts)
    assert res["checkpoint"]["resumed"] == {"from_pass": 1, "from_position": 1, "done": False}
    a, b = _scales(full), _scales(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [(t["pass"], t["block"], t["after"]) for t in res["trace"]] == \
        [(t["pass"], t["block"], t["after"]) for t in ref["trace"]]
    # a checkpoint of another search is refused
    with pytest.raises(VitqError, match="another search"):
        _refine(copy.deepcopy(q0), model, images, checkpoint_path=ckpt, **{**opts, "cycles": 3})


def test_options_defaults_and_validation():
    cfg = make_config({})
    assert (cfg.population, cfg.sample, cfg.cycles, cfg.passes, cfg.temperature) == (15, 10, 3, 10, 3.0)
    assert cfg.mode == "checked" and cfg.batch_size == 100 and cfg.check_fraction == 0.2 and cfg.search == ("attn",)
    assert make_config({"mode": "faithful"}).check_fraction == 0.0
    imp = make_config({"mode": "improved", "children": 2})
    assert imp.mutation == "relative" and imp.children == 2 and "mlp" in imp.search
    assert make_config({"search": "attn,act"}).search == ("attn", "act")
    assert default_radius(3) == 1e-3 and default_radius(4) == 1e-3 and default_radius(8) == 1e-4
    assert default_radius(5) == default_radius(6) == default_radius(7) == 1e-3  # the release: 1e-4 only at 8
    for bad in ({"mode": "x"}, {"loss": "l1"}, {"children": 15}, {"search": "attn,foo"}, {"bogus": 1},
                {"temperature": 0}, {"batch_size": 1}, {"check_fraction": 1.0}, {"teacher": "x"},
                {"check_loss": "l1"}):
        with pytest.raises(VitqError):
            make_config(bad)


def test_results_record_effective_options_and_timings():
    model = _deit()
    q, images = _calibrated(model, "matmul")
    info = _refine(q, model, images, mode="improved", loss="mse")
    cfg = info["config"]
    assert cfg["loss"] == "mse" and cfg["children"] == 4 and cfg["seed"] == 0 and cfg["patience"] == 2
    t = info["fitness_eval_seconds"]
    assert set(t["per_block"]) == {"blocks.0", "blocks.1"} and t["full_forward"] > 0
    json.dumps(info)  # JSON-able as it is


def test_faithful_radius_by_bits_is_recorded():
    model = _deit()
    q, images = _calibrated(model, "fq", w_bits=8)
    info = _refine(q, model, images, cycles=1)
    assert info["config"]["radius"] == {"8-bit": 1e-4}


def test_select_on_val_is_explicit_and_recorded():
    model = _deit()
    q, images = _calibrated(model, "fq")
    with pytest.raises(VitqError, match="select_on_val"):
        _refine(copy.deepcopy(q), model, images, select_on_val=True)
    labels = torch.arange(16) % 10
    val = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    info = _refine(q, model, images, select_on_val=True, val_batches=val)
    assert info["select_on_val"] is True and "WARNING" in info["val_selection"]
    assert len(info["val_selection"]["top1_trace"]) == 2
    # without the flag, validation batches are never read
    info = _refine(copy.deepcopy(q), model, images, val_batches=lambda: (_ for _ in ()).throw(AssertionError))
    assert info["select_on_val"] is False


def test_select_on_val_follows_the_release_rule():
    """Every block of pass 0 is saved unconditionally, later blocks only when val top-1 beats the saved one;
    the saved state is returned."""
    model = _deit()
    q, images = _calibrated(model, "fq", w_bits=3)
    val_x = _images(model, n=32, seed=5)
    with torch.no_grad():  # labels the float model gets 50 % right: top-1 moves with the scales
        pred = model(val_x).argmax(1)
    labels = torch.where(torch.arange(32) % 2 == 0, pred, (pred + 1) % 10)
    val = [(val_x[:16], labels[:16]), (val_x[16:], labels[16:])]
    snaps = []
    info = _refine(q, model, images, mode="faithful", passes=3, mutation="relative", radius=0.3, seed=1,
                   select_on_val=True, val_batches=val, on_block_end=lambda e: snaps.append(_scales(q)))
    sel = info["val_selection"]
    top1, steps = sel["top1_trace"], info["trace"]
    assert len(top1) == len(steps) == len(snaps) == 6
    best, chosen = None, None
    for i, (t, st) in enumerate(zip(top1, steps)):
        if st["pass"] == 0 or t > best:
            best, chosen = t, i
    assert chosen >= 1  # at least the last block of pass 0
    assert sel["selected_after"] == {"pass": steps[chosen]["pass"], "block": steps[chosen]["block"]}
    assert sel["best_top1"] == best
    final = _scales(q)
    assert all(torch.equal(final[k], snaps[chosen][k]) for k in final)
    assert "pass 0" in sel["rule"]


def _split_run(model, images, **options):
    snaps = []
    q, _ = _calibrated(model, "fq", w_bits=3)
    snaps.append(_scales(q))
    info = _refine(q, model, images, on_block_end=lambda e: snaps.append(_scales(q)), **options)
    return info, snaps


def test_check_part_rejects_block_changes_that_make_it_worse():
    """Constructed: the 4 check images (the seeded split's, found first) come from another distribution (4x the
    amplitude) than the 12 search images, and a large relative mutation always finds scales that fit the search
    images better; some of those make the check images worse, and those blocks must be reverted."""
    model = _deit()
    images = _images(model)
    _, check = split_calibration(as_calib(torch.arange(16.0).reshape(16, 1, 1, 1), 8, progress=False),
                                 make_config({"check_fraction": 0.25}), seed=0)
    images[check.images.reshape(-1).long()] *= 4.0
    info, snaps = _split_run(model, images, mode="checked", check_fraction=0.25, mutation="relative",
                             radius=0.5, passes=3, seed=0)
    steps = info["trace"]
    assert info["check"]["num_images"] == 4 and info["fitness"]["search_images"] == 12
    rejected = [i for i, st in enumerate(steps) if not st["kept"]]
    accepted = [i for i, st in enumerate(steps) if st["kept"] and st["check_candidate"] is not None]
    assert rejected and accepted, [(st["check_before"], st["check_candidate"]) for st in steps]
    for i in rejected:
        st = steps[i]
        assert st["candidate"] < st["before"]  # the search part improved ...
        assert st["check_candidate"] > st["check_before"]  # ... the check part got worse ...
        assert st["after"] == st["before"] and st["check"] == st["check_before"]  # ... so it was undone
        assert all(torch.equal(snaps[i][k], snaps[i + 1][k]) for k in snaps[i])
    for i in accepted:
        st = steps[i]
        assert st["check_candidate"] <= st["check_before"] and st["after"] == st["candidate"]
        assert any(not torch.equal(snaps[i][k], snaps[i + 1][k]) for k in snaps[i])
    check, search = info["curves"]["check"], info["curves"]["search"]
    assert len(check) == len(search) == len(steps) + 1
    assert all(b <= a for a, b in zip(check, check[1:]))  # the check curve never rises
    assert info["check"]["rejected_steps"] == len(rejected)
    assert info["check"]["final"] == pytest.approx(check[-1], rel=1e-5)
    # the release's behaviour (faithful: no check part) keeps every improvement of the search fitness
    info_f, _ = _split_run(model, images, mode="faithful", mutation="relative", radius=0.5, passes=1, seed=0)
    assert "check" not in info_f and "check" not in info_f["curves"] and info_f["fitness"]["search_images"] == 16
    assert all(st["after"] == st["candidate"] for st in info_f["trace"])


def test_split_is_seeded_disjoint_and_validated():
    images = torch.arange(20.0).reshape(20, 1, 1, 1)
    calib = as_calib(images, 8, progress=False)
    cfg = make_config({"check_fraction": 0.25, "batch_size": 6})
    s1, c1 = split_calibration(calib, cfg, seed=0)
    s2, c2 = split_calibration(calib, cfg, seed=0)
    s3, c3 = split_calibration(calib, cfg, seed=1)
    ids = lambda part: sorted(int(v) for v in part.images.reshape(-1))  # noqa: E731
    assert len(c1) == 5 and len(s1) == 15 and s1.batch_size == 6 and c1.batch_size == 5
    assert sorted(ids(s1) + ids(c1)) == list(range(20))
    assert ids(c1) == ids(c2) and ids(c1) != ids(c3)
    s, c = split_calibration(calib, make_config({"mode": "faithful"}), seed=0)
    assert c is None and len(s) == 20 and s.batch_size == 20  # default batch 100 > 20 images: one batch
    with pytest.raises(VitqError, match="check_fraction"):
        split_calibration(as_calib(images[:5], 8, progress=False), cfg, seed=0)


def test_int_layernorm_teacher():
    model = _deit()
    q, images = _calibrated(model, "fq")
    teacher = int_layernorm_teacher(q)
    with torch.no_grad():
        zf, zt, zq = model(images), teacher(images), q(images)
    assert teacher.vitq_ptf_quantizers > 0
    assert not torch.allclose(zt, zf, atol=1e-5)  # the PTF quantizers act ...
    assert float(kl_loss(zt, zf)) < float(kl_loss(zq, zf))  # ... but nothing else does
    assert all(qz.observer is None for qz in quantizers_of(q).values())  # the model itself is untouched
    info = _refine(q, model, images, mode="faithful", teacher="int_layernorm", cycles=1)
    assert info["teacher"].startswith("int_layernorm") and info["config"]["teacher"] == "int_layernorm"
    # matmul has no LayerNorm-input quantizers: the teacher is the float model
    qm, _ = _calibrated(model, "matmul")
    with torch.no_grad():
        assert torch.allclose(int_layernorm_teacher(qm)(images), zf, atol=1e-5)


def test_refiner_registered_with_cli_flags():
    entry = get_refiner("evolq")
    parser = argparse.ArgumentParser()
    add_entry_flags(parser.add_argument_group("evolq"), entry)
    args = parser.parse_args(["--evolq-mode", "improved", "--evolq-passes", "2", "--evolq-cycles", "4",
                              "--evolq-loss", "kl", "--evolq-temperature", "2", "--evolq-select-on-val"])
    opts = entry_options(args, entry)
    assert opts == {"mode": "improved", "passes": 2, "cycles": 4, "loss": "kl", "temperature": 2.0,
                    "select_on_val": True}
    assert entry_options(parser.parse_args([]), entry) == {}


@pytest.mark.parametrize("dims", [1, 2])
def test_landscape_writes_png_and_json(tmp_path, dims):
    model = _deit()
    q, images = _calibrated(model, "fq")
    before = _scales(q)
    res = compute_landscape(q, model, as_calib(images, 8, progress=False), block="0", dims=dims, steps=3,
                            radius=0.1)
    assert all(torch.equal(before[k], v) for k, v in _scales(q).items())  # scales restored
    assert res["block"] == "blocks.0"
    mid = res["infonce"][1] if dims == 1 else res["infonce"][1][1]
    assert mid == pytest.approx(res["center"]["infonce"], rel=1e-6)
    out = tmp_path / "land"
    write_outputs(res, str(out))
    assert (out / "landscape.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "landscape.json").read_text())
    assert data["dims"] == dims and len(data["coordinates"]) == 3
    with pytest.raises(VitqError, match="already exists"):
        write_outputs(res, str(out))
    write_outputs(res, str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["land"]


def test_landscape_command_parses():
    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["landscape", "--model", "m", "--state", "s", "--calib", "c", "--out", "o",
                              "--block", "blocks.3", "--dims", "2"])
    assert args.func.__name__ == "run" and args.dims == 2 and args.block == "blocks.3"


def test_landscape_command_end_to_end(tmp_path, monkeypatch):
    from PIL import Image

    import vitq.models.loading
    from vitq.cli.landscape import run

    model = _deit()
    q, _ = _calibrated(model, "matmul")
    state = tmp_path / "state"
    state.mkdir()
    vitq.save(q, str(state), model="deit_tiny_patch16_224")
    g = torch.Generator().manual_seed(0)
    for cls in ("a", "b"):
        (tmp_path / "calib" / cls).mkdir(parents=True)
        for i in range(3):
            pix = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pix).save(tmp_path / "calib" / cls / f"{i}.png")
    monkeypatch.setattr(vitq.models.loading, "create_model", lambda name, weights=None, **kw: _deit())
    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers(dest="command"))
    argv = ["landscape", "--model", "deit_tiny_patch16_224", "--state", str(state), "--calib",
            str(tmp_path / "calib"), "--num-calib", "4", "--batch-size", "2", "--steps", "3", "--quiet",
            "--out", str(tmp_path / "land")]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    data = json.loads((tmp_path / "land" / "landscape.json").read_text())
    assert data["num_calib"] == 4 and len(data["infonce"]) == 3 and len(data["calib_images"]) == 4
    assert (tmp_path / "land" / "landscape.png").stat().st_size > 0
    with pytest.raises(VitqError, match="already exists"):
        run(parser.parse_args(argv))
    with pytest.raises(VitqError, match="made for model"):
        run(parser.parse_args([*argv[:2], "vit_small_patch16_224", *argv[3:], "--overwrite"]))


@pytest.fixture
def _precision_restored():
    """Whatever a test does to torch's float32-precision flags is undone (new API parents before children,
    then a legacy flag only where it no longer reads as before)."""
    from vitq.precision import _LEGACY, _new_api_objects, _read_legacy

    new = [(o, o.fp32_precision) for _, o in _new_api_objects()]
    legacy = [(p, _read_legacy(p)) for p in _LEGACY]
    yield
    for o, v in new:
        o.fp32_precision = v
    for p, v in legacy:
        if v is not None and _read_legacy(p) != v:
            target = torch.backends.cudnn if p == "cudnn" else torch.backends.cuda.matmul
            target.allow_tf32 = v


def _search_and_evaluate_recording_precision():
    from vitq.evaluate import evaluate
    from vitq.precision import precision_settings

    model = _deit()
    q, images = _calibrated(model, "fq")
    inside = []
    before = precision_settings()
    _refine(q, model, images, mode="faithful", cycles=1, on_block_end=lambda event: inside.append(precision_settings()))
    after_refine = precision_settings()
    h = model.register_forward_hook(lambda m, i, o: inside.append(precision_settings()))
    try:
        evaluate(q, model, [(images, torch.zeros(16, dtype=torch.long))], progress=False)
    finally:
        h.remove()
    assert len(inside) == 3  # two blocks searched, one evaluation batch
    for st in inside:
        assert set(st["fp32_precision"].values()) == {"ieee"}, st
        assert not any(st["allow_tf32"].values()), st
    return before, after_refine, precision_settings()


def test_search_and_evaluation_run_without_tf32_with_the_new_api(_precision_restored):
    """Real torch flags set through the new fp32_precision API, after which reading ``allow_tf32`` raises a
    RuntimeError (the case that used to stop the refiner): inside the search and the evaluation everything is
    IEEE float32, and every setting is as before afterwards (the fixture restores this process's flags)."""
    b = torch.backends
    b.fp32_precision = "tf32"
    b.cuda.matmul.fp32_precision = "tf32"
    b.cudnn.conv.fp32_precision = "tf32"
    b.mkldnn.matmul.fp32_precision = "bf16"
    with pytest.raises(RuntimeError):
        b.cuda.matmul.allow_tf32  # noqa: B018  (the real torch behaviour this handles)
    before, after_refine, after = _search_and_evaluate_recording_precision()
    assert before == after_refine == after
    assert before["allow_tf32"]["cuda.matmul"] is None  # unreadable before, and still after
    assert before["fp32_precision"]["cuda.matmul"] == "tf32" and before["fp32_precision"]["mkldnn.matmul"] == "bf16"


def test_search_and_evaluation_run_without_tf32_with_the_legacy_api(_precision_restored):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    before, after_refine, after = _search_and_evaluate_recording_precision()
    assert before["allow_tf32"] == {"cudnn": True, "cuda.matmul": True}
    assert before == after_refine == after

"""Synthetic calibration images on tiny random-init models: shape and count, falling losses, seeded repeats, the
PNG folder and its reuse, the budget, refusals, and data-free quantize -> save -> reload."""

import json
import os

import pytest
import torch
from conftest import ZOO, tiny_images, tiny_model

import vitq
from vitq.calib import calib_source, synthetic_count
from vitq.errors import VitqError
from vitq.evaluate import evaluate
from vitq.synth import synthesize

pytestmark = pytest.mark.usefixtures("one_thread")

CNN_INPUT = {"input_size": [3, 32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def cnn():
    return tiny_model("resnet")


def losses(record, key):
    """(first, last) value of a loss part in the first batch of a run."""
    b = record["made"]["batches"][0]
    return b["first_loss"][key], b["last_loss"][key]


def test_bn_images_have_the_shape_and_count_asked_and_the_loss_falls():
    x, rec = synthesize(cnn(), 5, "bn", {"iters": 25, "batch_size": 2}, progress=False, transform=CNN_INPUT)
    assert x.shape == (5, 3, 32, 32) and torch.isfinite(x).all()
    assert rec["generator"] == "bn" and [b["images"] for b in rec["made"]["batches"]] == [2, 2, 1]
    first, last = losses(rec, "bn")
    assert last < 0.7 * first


def test_psaq_images_raise_the_patch_similarity_entropy():
    x, rec = synthesize(tiny_model("deit"), 4, "psaq", {"iters": 25, "batch_size": 4}, progress=False)
    assert x.shape == (4, 3, 32, 32)
    first, last = losses(rec, "entropy")
    assert last > first + 0.3
    assert rec["made"]["attention_layers"] == 2


@pytest.mark.parametrize("key,generator", [("swin", "psaq"), ("hf_vit", "psaq"), ("levit", "psaq"), ("levit", "bn")])
def test_generators_run_on_the_other_families(key, generator):
    size = ZOO[key].size
    shape = {"input_size": [3, size, size], "mean": [0.5] * 3, "std": [0.5] * 3}
    x, rec = synthesize(tiny_model(key), 2, generator, {"iters": 4}, progress=False, transform=shape)
    assert x.shape == (2, 3, size, size) and rec["made"]["iterations_run"] == 4
    parts = rec["made"]["batches"][0]["last_loss"]
    assert all(v == v for v in parts.values())  # finite, not NaN


def test_fdda_pulls_images_toward_their_class_centres():
    model = cnn()
    real = tiny_images("resnet", 6, seed=3)
    x, rec = synthesize(model, 4, "fdda", {"iters": 25, "batch_size": 4}, real=real, progress=False,
                        transform=CNN_INPUT)
    assert x.shape == (4, 3, 32, 32)
    first, last = losses(rec, "central")
    assert last < 0.7 * first
    with torch.no_grad():
        real_classes = set(model(real).argmax(1).tolist())
    assert len(rec["labels"]) == 4 and set(rec["labels"]) <= real_classes
    assert rec["made"]["classes"] == len(real_classes)


def test_seeded_runs_repeat_and_other_seeds_differ():
    def run(seed):
        return synthesize(cnn(), 3, "bn", {"iters": 5}, seed=seed, progress=False, transform=CNN_INPUT)[0]
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sets_are_written_as_png_and_reused(tmp_path):
    model = tiny_model("deit")
    x, rec = synthesize(model, 3, "psaq", {"iters": 5}, seed=4, directory=tmp_path, progress=False)
    folder = rec["dir"]
    assert not rec["reused"] and sorted(os.listdir(folder))[-1] == "manifest.json"
    assert sum(f.endswith(".png") for f in os.listdir(folder)) == 3
    manifest = json.loads(open(os.path.join(folder, "manifest.json")).read())
    assert manifest["seed"] == 4 and manifest["options"]["iters"] == 5 and len(manifest["labels"]) == 3
    y, rec2 = synthesize(model, 3, "psaq", {"iters": 5}, seed=4, directory=tmp_path, progress=False)
    assert rec2["reused"] and rec2["dir"] == folder and torch.equal(x, y)
    # the layout of a loaded image batch (a channels-last view runs other kernels: last-bit different outputs)
    assert x.is_contiguous() and y.is_contiguous()
    _, rec3 = synthesize(model, 3, "psaq", {"iters": 6}, seed=4, directory=tmp_path, progress=False)
    assert not rec3["reused"] and rec3["dir"] != folder


def test_budget_stops_generation_and_says_how_far_it_got():
    _, rec = synthesize(cnn(), 2, "bn", {"iters": 100000}, budget_min=0.002, progress=False, transform=CNN_INPUT)
    made = rec["made"]
    assert made["cut_by_budget"] and 1 <= made["iterations_run"] < 100000 and made["seconds"] < 10


@pytest.mark.parametrize("key,generator,words", [
    ("deit", "fdda", ["fdda", "deit_tiny_patch16_224", "BatchNorm"]),
    ("deit", "bn", ["bn", "deit_tiny_patch16_224", "BatchNorm"]),
    ("resnet", "psaq", ["psaq", "resnet18", "self-attention"]),
])
def test_a_generator_that_does_not_apply_is_refused_in_one_line(key, generator, words):
    with pytest.raises(VitqError) as e:
        synthesize(tiny_model(key), 2, generator, real=tiny_images(key, 2), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_fdda_without_real_images_and_bad_counts_are_refused():
    with pytest.raises(VitqError, match="augment-synthetic"):
        synthesize(cnn(), 2, "fdda", progress=False, transform=CNN_INPUT)
    with pytest.raises(VitqError, match="synthetic:N"):
        synthetic_count("synthetic:zero")
    assert synthetic_count("synthetic") == 32 and synthetic_count("synthetic:7") == 7 and synthetic_count("d") is None
    with pytest.raises(VitqError, match="augment-synthetic"):
        calib_source(cnn(), "synthetic:4", augment_synthetic=2)


def test_auto_picks_fdda_with_real_images_and_keeps_them_first():
    model, real = cnn(), tiny_images("resnet", 4)
    both, rec = calib_source(model, real, augment_synthetic=2, synthetic={"options": {"iters": 3},
                                                                          "transform": CNN_INPUT}, progress=False)
    assert rec["kind"] == "real+synthetic" and rec["synthetic"]["generator"] == "fdda"
    assert both.shape == (6, 3, 32, 32) and torch.equal(both[:4], real)


def test_data_free_quantize_save_reload_gives_identical_metrics(tmp_path):
    model = tiny_model("deit")
    val = tiny_images("deit", 8, seed=9)
    batches = [(val, torch.arange(8) % 10)]
    qmodel, record = vitq.quantize(model, "synthetic:6", "fq", "fqvit", w_bits=4, a_bits=8, progress=False,
                                   synthetic={"options": {"iters": 4}, "directory": tmp_path})
    src = record["calib_source"]
    assert src["kind"] == "synthetic" and src["synthetic"]["generator"] == "psaq" and record["num_calib"] == 6
    before = evaluate(qmodel, model, batches)
    (tmp_path / "state").mkdir()
    vitq.save(qmodel, tmp_path / "state")
    after = evaluate(vitq.load(model, tmp_path / "state"), model, batches)
    assert before == after
    again, rec2 = vitq.quantize(model, "synthetic:6", "fq", "fqvit", w_bits=4, a_bits=8, progress=False,
                                synthetic={"options": {"iters": 4}, "directory": tmp_path})
    assert rec2["calib_source"]["synthetic"]["reused"] and evaluate(again, model, batches) == before

"""Synthetic calibration images in a sweep's jobs (in-process, no Ray): a job on ``calib: synthetic:N`` (psaq, tiny
random-init DeiT) and one on real + FDDA images (tiny ResNet) give the metrics of ``vitq quantize
--calib synthetic:N`` / ``--augment-synthetic N`` on the same set; the job key covers the generator and its options
and a real-only job's config has no synthetic key; bad settings are refused in one line. (The set made once for
two bit widths of one sweep: tests/sweep/test_sweep.py, on Ray.)"""

import json

import pytest
from conftest import ZOO, make_image_folder, tiny_model
from safetensors.torch import save_file

from vitq.cli import main
from vitq.errors import VitqError
from vitq.sweep.grid import assign_keys, expand
from vitq.sweep.job import eval_data, run_job
from vitq.sweep.synthetic import calib_with_synthetic

pytest.importorskip("yaml")
pytestmark = pytest.mark.usefixtures("one_thread")
GEN = {"iters": 2, "batch_size": 4}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synthetic")
    for key in ("deit", "resnet"):
        save_file({k: v.contiguous() for k, v in tiny_model(key).state_dict().items()},
                  str(tmp / f"{key}.safetensors"))
    make_image_folder(tmp / "calib", per_class=2, seed=1)
    make_image_folder(tmp / "val", per_class=2, seed=2)
    return tmp


def grid(key: str, **keys) -> dict:
    name, kw = ZOO[key].name, ZOO[key].kwargs
    return {"models": [{"name": name, "weights": f"{key}.safetensors", "model_args": kw}], "calib": "calib",
            "val": "val", "scheme": "fq" if key == "deit" else "matmul", "bits": "4/8", "method": "minmax",
            "batch_size": 4, **keys}


def standalone(folder, key: str, cfg: dict, out: str, *flags) -> dict:
    name, kw = ZOO[key].name, ZOO[key].kwargs
    assert main(["quantize", "--model", name, "--model-args", json.dumps(kw), "--weights",
                 str(folder / f"{key}.safetensors"), "--val", str(folder / "val"), "--seed", str(cfg["seed"]),
                 "--scheme", cfg["scheme"], "--w-bits", str(cfg["w_bits"]), "--a-bits", str(cfg["a_bits"]),
                 "--method", cfg["method"], "--batch-size", "4", "--num-workers", "0", "--threads", "1", "--quiet",
                 "--synthetic-iters", "2", "--synthetic-batch-size", "4", "--synthetic-dir", str(folder / "sets"),
                 "--out", str(folder / out), *flags]) == 0
    return json.loads((folder / out / "results.json").read_text())


@pytest.mark.parametrize("key,keys,flags", [
    ("deit", {"calib": "synthetic:4", "synthetic": {"generator": "psaq", "options": GEN}},
     ["--calib", "synthetic:4", "--synthetic-generator", "psaq"]),
    ("resnet", {"num_calib": 3, "augment_synthetic": 3, "synthetic": {"generator": "fdda", "options": GEN}},
     ["--calib", "CALIB", "--num-calib", "3", "--augment-synthetic", "3", "--synthetic-generator", "fdda"]),
])
def test_a_synthetic_job_equals_the_standalone_command(folder, key, keys, flags):
    (job,) = expand(grid(key, **keys), str(folder))
    cfg = job.config
    calib = calib_with_synthetic(cfg["model"], cfg, str(folder / "sets"))
    out = run_job(cfg, calib, eval_data(cfg["model"], cfg))
    assert "error" not in out, out.get("error")
    source = out["record"]["calib_source"]
    assert source["synthetic"]["generator"] == keys["synthetic"]["generator"]
    assert source["synthetic"]["made"]["seconds"] > 0 and not source["synthetic"]["reused"]
    assert source["synthetic"]["made"]["iterations_run"] == 2  # one batch
    ref = standalone(folder, key, cfg, f"cli-{key}", *[str(folder / "calib") if f == "CALIB" else f for f in flags])
    assert ref["calib_source"]["synthetic"]["reused"]  # the command read the job's set back from its folder
    assert ref["calib_source"]["synthetic"]["key"] == source["synthetic"]["key"]
    assert ref["calib_source"]["num_real"] == source["num_real"] == (3 if key == "resnet" else 0)
    assert out["metrics"]["quant"] == {k: ref["quant"][k] for k in out["metrics"]["quant"]}
    assert out["metrics"]["float"]["top1"] == ref["float"]["top1"]
    if key == "resnet":
        assert calib["files"] and len(calib["images"]) == 6  # 3 real images, then 3 FDDA images


def test_the_job_key_covers_the_generator_and_its_options(folder):
    base = dict(calib="synthetic:4", synthetic={"generator": "psaq", "options": GEN})
    variants = [base, {**base, "synthetic": {"generator": "psaq", "options": {**GEN, "iters": 3}}},
                {**base, "synthetic": {"generator": "psaq", "options": GEN, "budget_min": 1}},
                {**base, "synthetic": {"generator": "auto", "options": GEN}}, {**base, "calib": "synthetic:5"},
                {"num_calib": 4}]
    jobs = [j for v in variants for j in expand(grid("deit", **v), str(folder))]
    keys = [j.key for j in assign_keys(jobs, code="test")]
    assert len(set(keys)) == len(variants)
    (default,) = expand(grid("deit", calib="synthetic", synthetic={"generator": "psaq", "options": GEN}), str(folder))
    assert default.config["calib"] == "synthetic:32" and default.config["num_calib"] == 32
    # the folder the sets go to is not part of the key; synthetic:N gives num_calib N and no calibration files
    moved = expand(grid("deit", **base, synthetic_dir="elsewhere"), str(folder))
    assert assign_keys(moved, code="test")[0].key == keys[0] and moved[0].run["synthetic_dir"].endswith("elsewhere")
    assert jobs[0].config["num_calib"] == 4 and jobs[0].calib_files == []
    assert jobs[0].label == "fq W4A8 minmax (synthetic:4 psaq)" and jobs[-1].label == "fq W4A8 minmax"
    assert "synthetic" not in jobs[-1].config and "augment_synthetic" not in jobs[-1].config


@pytest.mark.parametrize("keys,message", [
    ({"synthetic": {"generator": "psaq"}}, "no job image is synthetic"),
    ({"calib": "synthetic:4", "num_calib": 8}, "leave num_calib out"),
    ({"calib": "synthetic:4", "augment_synthetic": 4}, "every image is synthetic already"),
    ({"calib": "synthetic:4", "synthetic": {"generator": "fdda"}}, "learns from real images"),
    ({"calib": "synthetic:4", "synthetic": {"generator": "psaq", "options": {"iters": 0}}}, "iters"),
    ({"calib": "synthetic:4", "synthetic": {"options": {"nosuch": 1}}}, "not an option of any generator"),
    ({"calib": "synthetic:4", "synthetic": {"generator": "psaq", "seed": 1}}, "expected a mapping of"),
    ({"augment_synthetic": -2}, "augment_synthetic"),
    ({"calib": "synthetic:x"}, "synthetic:x is invalid"),
])
def test_bad_synthetic_settings_are_refused_in_one_line(folder, keys, message):
    with pytest.raises(VitqError, match=message) as e:
        expand(grid("deit", **keys), str(folder))
    assert "\n" not in str(e.value)

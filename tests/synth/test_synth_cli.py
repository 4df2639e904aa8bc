"""``vitq quantize --calib synthetic:N`` / ``--augment-synthetic N`` end to end on a tiny model."""

import json

import pytest
from conftest import TINY, make_image_folder, tiny_model
from safetensors.torch import save_file

from vitq.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

NAME, KW = TINY["deit"]


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model("deit").state_dict().items()}, str(path))
    return path


def args(weights, calib, out, *extra):
    return ["quantize", "--model", NAME, "--model-args", json.dumps(KW), "--weights", str(weights), "--calib", calib,
            "--scheme", "fq", "--w-bits", "4", "--a-bits", "8", "--method", "fqvit", "--batch-size", "4", "--quiet",
            "--out", str(out), "--synthetic-iters", "3", "--threads", "1", *extra]


def test_data_free_run_records_its_generator_and_reuses_the_png_set(weights, tmp_path):
    val = make_image_folder(tmp_path / "val", per_class=2, seed=2)
    synth = tmp_path / "synth"
    common = ("--val", str(val), "--synthetic-dir", str(synth), "--seed", "5")
    assert main(args(weights, "synthetic:5", tmp_path / "a", *common)) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    src = a["calib_source"]
    assert src["kind"] == "synthetic" and a["num_calib"] == 5 and a["calib_dir"] is None
    rec = src["synthetic"]
    assert rec["generator"] == "psaq" and rec["seed"] == 5 and rec["options"]["iters"] == 3 and not rec["reused"]
    assert len(list(synth.glob("*/*.png"))) == 5 and a["timings"]["synthesize_s"] > 0
    assert main(args(weights, "synthetic:5", tmp_path / "b", *common)) == 0
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert b["calib_source"]["synthetic"]["reused"] and b["quant"] == a["quant"]


def test_augment_adds_synthetic_images_to_real_ones(weights, tmp_path):
    calib = make_image_folder(tmp_path / "calib", per_class=1, seed=1)
    out = tmp_path / "o"
    assert main(args(weights, str(calib), out, "--augment-synthetic", "2", "--synthetic-dir",
                     str(tmp_path / "s"))) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["calib_source"]["kind"] == "real+synthetic" and r["num_calib"] == 5 and len(r["calib_files"]) == 3


@pytest.mark.parametrize("extra,words", [
    (("--synthetic-generator", "fdda"), "no BatchNorm"),
    (("--num-calib", "3"), "--num-calib"),
    (("--budget-min", "0"), "--budget-min"),
    (("--synthetic-option", "noise"), "NAME=VALUE"),
])
def test_bad_synthetic_flags_are_one_line_errors(weights, tmp_path, capsys, extra, words):
    assert main(args(weights, "synthetic:2", tmp_path / "o", "--synthetic-dir", str(tmp_path / "s"), *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_synthetic_flags_are_listed_when_synthetic_images_are_asked_for(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    short = capsys.readouterr().out
    assert "--augment-synthetic" in short and "--synthetic-lr" not in short
    with pytest.raises(SystemExit):
        main(["quantize", "--calib", "synthetic:8", "--help"])
    full = capsys.readouterr().out
    assert "--synthetic-lr" in full and "--budget-min" in full and "--synthetic-generator" in full

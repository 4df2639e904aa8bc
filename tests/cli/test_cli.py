"""The command line end to end on a tiny model and generated image folders; bad input gives one-line errors."""

import json
import os

import pytest
from conftest import TINY, make_image_folder, tiny_model
from safetensors.torch import save_file

from vitq.cli import main
from vitq.errors import VitqError
from vitq.state import OutputDir

NAME, KW = TINY["deit"]
MODEL_ARGS = json.dumps(KW)


@pytest.fixture
def setup(tmp_path):
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model("deit").state_dict().items()}, str(weights))
    calib = make_image_folder(tmp_path / "calib", per_class=3, seed=1)
    val = make_image_folder(tmp_path / "val", per_class=3, seed=2)
    return tmp_path, weights, calib, val


def quantize_args(weights, calib, val, out, *extra):
    return ["quantize", "--model", NAME, "--model-args", MODEL_ARGS, "--weights", str(weights), "--calib", str(calib),
            "--val", str(val), "--scheme", "fq", "--w-bits", "4", "--a-bits", "8", "--method", "fqvit",
            "--batch-size", "4", "--num-workers", "0", "--quiet", "--out", str(out), *extra]


def test_quantize_then_evaluate_gives_identical_metrics(setup, capsys):
    tmp, weights, calib, val = setup
    out = tmp / "out"
    assert main(quantize_args(weights, calib, val, out, "--num-calib", "7", "--seed", "3")) == 0
    assert sorted(os.listdir(out)) == [".vitq-output.json", "config.json", "quant_state.safetensors", "results.json"]
    r = json.loads((out / "results.json").read_text())
    for key in ("model", "weights_sha256", "scheme", "method", "refine", "w_bits", "a_bits", "seed", "calib_files",
                "transform", "versions", "float", "quant", "timings"):
        assert key in r, key
    assert len(r["calib_files"]) == 7 and r["num_val"] == 9 and r["scheme"] == "fq" and r["w_bits"] == 4
    assert set(r["quant"]) >= {"top1", "top5", "agreement", "kl"} and set(r["timings"]) == {
        "calibrate_s", "refine_s", "eval_s"}
    assert len(r["weights_sha256"]) == 64

    ev = tmp / "reports" / "eval.json"  # missing folders above an output are created
    assert main(["evaluate", "--model", NAME, "--weights", str(weights), "--state", str(out), "--val", str(val),
                 "--batch-size", "4", "--num-workers", "0", "--quiet", "--out", str(ev)]) == 0
    r2 = json.loads(ev.read_text())
    assert r2["quant"] == r["quant"] and r2["float"] == r["float"]
    assert "agreement" in capsys.readouterr().out


def test_same_seed_same_calibration_files(setup):
    tmp, weights, calib, val = setup
    files = []
    for i in range(2):
        main(quantize_args(weights, calib, val, tmp / f"o{i}", "--num-calib", "5", "--seed", "11"))
        files.append(json.loads((tmp / f"o{i}" / "results.json").read_text())["calib_files"])
    assert files[0] == files[1]


def test_corrupt_image_is_skipped_and_counted(setup):
    tmp, weights, calib, val = setup
    (val / "n01440764" / "broken.jpg").write_bytes(b"not an image at all")
    assert main(quantize_args(weights, calib, val, tmp / "out")) == 0
    r = json.loads((tmp / "out" / "results.json").read_text())
    assert r["num_val"] == 9 and len(r["val_skipped"]) == 1 and r["val_skipped"][0].endswith("broken.jpg")


def error_of(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("vitq: error:"), err
    return err


def test_bad_input_gives_one_line_errors_and_no_output(setup, capsys):
    tmp, weights, calib, val = setup
    out = tmp / "out"
    cases = {
        "does not exist": quantize_args(weights, tmp / "missing", val, out),
        "contains no images": quantize_args(weights, make_image_folder(tmp / "empty", classes=()), val, out),
        "out of range": quantize_args(weights, calib, val, out, "--w-bits", "9"),
        "unknown method": [a if a != "fqvit" else "nope" for a in quantize_args(weights, calib, val, out)],
        "unknown model": ["quantize", "--model", "no_such_model", "--calib", str(calib), "--method", "omse",
                          "--out", str(out)],
        "--weights": quantize_args(tmp / "nope.safetensors", calib, val, out),
    }
    (tmp / "empty").mkdir(exist_ok=True)
    for expected, argv in cases.items():
        assert expected in error_of(capsys, argv)
        assert not out.exists()
    assert not [p for p in os.listdir(tmp) if p.startswith(".out")]  # no temporary leftovers


def test_weights_that_do_not_match_and_existing_output(setup, capsys):
    tmp, weights, calib, val = setup
    other = tmp / "other.safetensors"
    save_file({"foo": tiny_model("deit").head.weight.detach().contiguous()}, str(other))
    assert "does not match" in error_of(capsys, quantize_args(other, calib, val, tmp / "o"))
    (tmp / "exists").mkdir()
    assert "already exists" in error_of(capsys, quantize_args(weights, calib, val, tmp / "exists"))
    assert main(quantize_args(weights, calib, val, tmp / "exists", "--overwrite")) == 0


def test_methods_lists_everything(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("fq", "matmul", "minmax", "percentile", "omse", "fqvit", "log2", "ptf"):
        assert name in out


def test_export_command_keeps_its_flags_and_refuses_bad_combinations(tmp_path, capsys):
    """vitq export's parser lives in vitq.cli.export; its flags and defaults are those the README names, and a
    --val without --check (or the reverse) is one line before anything is loaded."""
    from vitq.cli import build_parser

    base = ["export", "--model", NAME, "--state", str(tmp_path / "s"), "--out", str(tmp_path / "m.onnx")]
    args = build_parser(base).parse_args(base)
    assert args.func.__module__ == "vitq.cli.export"
    assert (args.opset, args.no_int4, args.overwrite, args.check, args.val, args.num_val, args.labels, args.runtime,
            args.batch_size, args.seed, args.quiet, args.weights) == (21, False, False, False, None, None, "wnid",
                                                                      None, 50, 0, False, None)
    assert (args.format, args.target) == ("onnx", None)  # runtime None: the target's, else onnxruntime
    full = [*base, "--weights", "w.safetensors", "--opset", "17", "--no-int4", "--overwrite", "--check", "--val",
            "v", "--num-val", "3", "--labels", "folder", "--runtime", "openvino", "--batch-size", "2", "--seed",
            "1", "--quiet"]
    assert build_parser(full).parse_args(full).runtime == "openvino"
    assert "--check needs --val" in error_of(capsys, [*base, "--check"])
    assert "--val is only used with --check" in error_of(capsys, [*base, "--val", str(tmp_path)])
    assert not (tmp_path / "m.onnx").exists()


def test_demo_quick_runs_offline(tmp_path, capsys):
    argv = ["demo", "--quick", "--quiet", "--methods", "minmax,omse,ptq4vit", "--out", str(tmp_path / "demo")]
    assert main(argv) == 0
    res = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    assert res["float_top1"] > 85  # the digits ViT really learned
    w8 = [r for r in res["results"] if r["w_bits"] == 8 and r["scheme"] == "matmul"]
    assert all(r["quant"]["agreement"] > 90 for r in w8)
    assert {r["method"] for r in res["results"]} == {"minmax", "omse", "ptq4vit"}  # ptq4vit: matmul only
    assert "| method |" in capsys.readouterr().out


def test_init_state_starts_from_a_saved_state(setup, capsys):
    tmp, weights, calib, val = setup
    assert main(quantize_args(weights, calib, val, tmp / "a")) == 0
    full = quantize_args(weights, calib, val, tmp / "b", "--init-state", str(tmp / "a"))
    assert main([a for a in full if a not in ("--method", "fqvit")]) == 2  # scheme flags the state overrides
    assert "--scheme, --w-bits, --a-bits would be ignored" in capsys.readouterr().err and not (tmp / "b").exists()
    argv = full[:full.index("--scheme")] + full[full.index("--method") + 2:]
    assert main(argv) == 0
    a, b = (json.loads((tmp / d / "results.json").read_text()) for d in ("a", "b"))
    assert b["quant"] == a["quant"] and b["calibration"]["init_state"] == str(tmp / "a")
    assert b["method"] == "fqvit" and b["scheme_config"] == a["scheme_config"]


def test_refine_evolq_from_the_cli_records_search_and_val_selection(setup):
    tmp, weights, calib, val = setup
    base = quantize_args(weights, calib, val, tmp / "r", "--refine", "evolq", "--evolq-passes", "1",
                         "--evolq-cycles", "1")
    assert main(base) == 0
    r = json.loads((tmp / "r" / "results.json").read_text())["refinement"]
    assert r["refiner"] == "evolq" and r["select_on_val"] is False and r["trace"]
    assert not [p for p in os.listdir(tmp) if "ckpt" in p]  # the resume checkpoint is removed after success
    assert main([a if a != str(tmp / "r") else str(tmp / "s") for a in base] + ["--evolq-select-on-val"]) == 0
    s = json.loads((tmp / "s" / "results.json").read_text())["refinement"]
    assert s["select_on_val"] is True and "val_batches" not in s["options"]


def test_output_folder_creates_missing_parents_and_removes_them_on_failure(tmp_path):
    target = tmp_path / "runs" / "deit" / "w4a8"
    with pytest.raises(RuntimeError), OutputDir(str(target), overwrite=False):
        raise RuntimeError("calibration failed")
    assert not (tmp_path / "runs").exists()
    with OutputDir(str(target), overwrite=False) as out:
        with open(out.file("results.json"), "w") as f:
            f.write("{}")
        out.commit()
    assert (target / "results.json").read_text() == "{}"
    (tmp_path / "file").write_text("")
    with pytest.raises(VitqError, match="is not a folder"):
        OutputDir(str(tmp_path / "file" / "run"), overwrite=False)

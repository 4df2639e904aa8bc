"""Every bad input of a newcomer's first hour (issue 9), through the command line in-process on a tiny generated
model and generated image folders: non-zero exit, exactly one line on stderr naming the input (the flag as
typed) and what was expected, no traceback, nothing written and nothing removed. Checks meant to run before the
model is loaded run with model creation made to fail loudly, so a late check shows up as a wrong error."""

import json
import os
import stat

import numpy as np
import pytest
from conftest import TINY, make_image_folder, tiny_model
from PIL import Image
from safetensors.torch import save_file

import vitq.models.loading
from vitq.cli import main
from vitq.state import MARKER_FILE

NAME, KW = TINY["deit"]
MODEL_ARGS = json.dumps(KW)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Weights, image folders and one saved state, shared by every test of this module."""
    root = tmp_path_factory.mktemp("bad")
    weights = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model("deit").state_dict().items()}, str(weights))
    calib = make_image_folder(root / "calib", per_class=2, seed=1)
    val = make_image_folder(root / "val", per_class=2, seed=2)
    plain = make_image_folder(root / "plain", classes=("cats", "dogs"), per_class=3, seed=3)
    (root / "notes.txt").write_text("not weights\n")
    state = root / "state"
    assert main(quantize(root, weights, calib, val, state)) == 0
    return {"root": root, "weights": weights, "calib": calib, "val": val, "plain": plain, "state": state,
            "text": root / "notes.txt"}


def quantize(root, weights, calib, val, out, *extra):
    argv = ["quantize", "--model", NAME, "--model-args", MODEL_ARGS, "--weights", str(weights), "--calib", str(calib),
            "--scheme", "fq", "--w-bits", "4", "--a-bits", "8", "--method", "minmax", "--batch-size", "4",
            "--num-workers", "0", "--threads", "1", "--quiet", "--out", str(out), *extra]
    return argv + (["--val", str(val)] if val is not None else [])


def snapshot(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, ds, fs in os.walk(root) for f in fs + ds)


def one_line_error(capsys, argv, root, *expected):
    """Run argv; assert the failure contract; return the message."""
    before = snapshot(root)
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code != 0, f"exit 0 for {argv}"
    assert "Traceback" not in captured.err + captured.out
    assert len(err.splitlines()) == 1 and err.startswith("vitq: error:"), err
    for word in expected:
        assert word in err, (word, err)
    assert snapshot(root) == before  # nothing written (no partial output, no .tmp), nothing removed
    return err


@pytest.fixture
def no_model(monkeypatch):
    """Creating a model fails loudly: for inputs that must be refused before the model is loaded."""
    def refuse(*a, **kw):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(vitq.models.loading, "create_model", refuse)


def test_refused_before_the_model_is_loaded(world, capsys, no_model):
    w, root = world, world["root"]
    out = root / "new-out"

    def q(*extra, val=w["val"], calib=w["calib"]):
        return quantize(root, w["weights"], calib, val, out, *extra)

    cases = [
        (q(val=root / "missing"), "--val", "does not exist"),
        (q(val=w["plain"]), "--val", "not an ImageNet-1k WordNet id", "--labels folder"),
        (q(calib=root / "missing"), "--calib", "does not exist"),
        (q("--num-val", "0"), "--num-val 0", "positive"),
        (q("--num-calib", "0"), "--num-calib 0", "positive"),
        (q("--batch-size", "0"), "--batch-size 0", "positive"),
        (q("--num-workers", "-1"), "--num-workers -1"),
        (q("--w-bits", "1"), "--w-bits 1", "2..8"),
        (q("--a-bits", "2"), "--a-bits 2", "3..8"),  # 3-bit activations exist since the low-bit base (W3A3)
        (q("--refine", "evolq", "--evolq-population", "0"), "--evolq-population 0", "expected"),
        (q("--refine", "evolq", "--evolq-passes", "0"), "--evolq-passes 0", ">= 1"),
        (q("--refine", "evolq", "--evolq-checkpoint-path", str(root)), "--evolq-checkpoint-path", "folder"),
        ([a if a != "minmax" else "percentile" for a in q("--percentile-value", "2")], "--percentile-value 2",
         "(0.5, 1]"),
        (q("--percentile-value", "0.99"), "--percentile-value", "method percentile", "--method minmax"),
        (q("--evolq-passes", "2"), "--evolq-passes", "refiner evolq", "--refine"),
        ([a if a != "minmax" else "ptq4vit" for a in q()], "ptq4vit", "matmul"),
        (q("--override", "head"), "--override 'head'", "PATTERN:wBaB"),
        (q("--override", "head:w12"), "--override 'head:w12'", "2..8"),
        (q("--weights", w["text"]), "--weights", "neither a safetensors file nor a torch checkpoint"),
        (q("--weights", root / "missing.safetensors"), "--weights", "does not exist"),
        (q("--model-args", "{not json"), "--model-args", "JSON object"),
        (q("--labels", "folder", "--class-map", root / "missing.json"), "--class-map", "not a file"),
        (q("--class-map", w["text"]), "--class-map", "--labels folder"),
        (q("--threads", "0"), "--threads 0", "positive"),
        (q("--softmax-quantizer", "nope"), "--softmax-quantizer 'nope'", "log2"),
        (q("--init-state", w["text"], "--method", "minmax"), "--init-state"),
        (q("--out", "."), "--out .", "current folder"),
        (q("--out", root), "--out", "already exists"),
    ]
    for argv, *expected in cases:
        one_line_error(capsys, argv, root, *expected)
    assert not out.exists()


def test_refused_once_the_model_is_built_but_before_calibrating(world, capsys):
    w, root = world, world["root"]
    out = root / "o2"

    def q(*extra):
        return quantize(root, w["weights"], w["calib"], w["val"], out, *extra)

    def model_args(text):
        argv = q()
        argv[argv.index("--model-args") + 1] = text
        return argv

    one_line_error(capsys, model_args('{"foo": 1}'), root, "--model-args", "foo")
    one_line_error(capsys, model_args('{"depth": "ten"}'), root, "--model-args")
    one_line_error(capsys, q("--override", "nothing_here*:w8"), root, "--override 'nothing_here*:w8'",
                   "matches no module")
    no_head = root / "map.json"
    no_head.write_text(json.dumps({"cats": 3, "dogs": 12}))  # the tiny model has 10 classes
    argv = q("--labels", "folder", "--class-map", no_head)
    argv[argv.index("--val") + 1] = str(w["plain"])
    one_line_error(capsys, argv, root, "--class-map", "10 classes")
    one_line_error(capsys, ["quantize", "--model", "deit_tiny_patch16_22", "--calib", w["calib"], "--method", "minmax",
                            "--out", out], root, "unknown model", "similar:", "deit_tiny_patch16_224")
    no_head.unlink()


def test_evaluate_landscape_allocation_bad_input(world, capsys, no_model):
    w, root = world, world["root"]
    existing = root / "calib"

    def ev(*extra, out=root / "eval.json", state=w["state"]):
        return ["evaluate", "--model", NAME, "--weights", w["weights"], "--state", state, "--val", w["val"],
                "--batch-size", "4", "--num-workers", "0", "--quiet", "--out", out, *extra]

    one_line_error(capsys, ev("--overwrite", out=existing), root, "--out", "is a folder")
    one_line_error(capsys, ev(out=w["text"]), root, "--out", "already exists")
    one_line_error(capsys, ev("--overwrite", out=w["text"]), root, "--out", "not a results file vitq wrote")
    one_line_error(capsys, ev(state=w["text"]), root, "--state", "is a file, not a folder")
    one_line_error(capsys, ev("--num-val", "0"), root, "--num-val 0")

    def land(*extra):
        return ["landscape", "--model", NAME, "--weights", w["weights"], "--state", w["state"], "--calib", w["calib"],
                "--quiet", "--out", root / "land", *extra]

    one_line_error(capsys, land("--temperature", "0"), root, "--temperature 0", "positive")
    one_line_error(capsys, land("--radius", "1e30"), root, "--radius 1e+30", "(0, 1.0]")
    one_line_error(capsys, land("--num-calib", "0"), root, "--num-calib 0")
    one_line_error(capsys, ["allocation", "--state", w["state"], "--plot", root / "missing" / "p.png"], root,
                   "--plot", "does not exist")
    one_line_error(capsys, ["allocation", "--state", w["state"], "--plot", w["text"]], root, "--plot", ".png")


def test_truncated_state_is_called_a_state_file(world, capsys, tmp_path):
    w = world
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "quant_state.safetensors"):
        data = (w["state"] / name).read_bytes()
        (broken / name).write_bytes(data if name == "config.json" else data[: len(data) // 2])
    argv = ["evaluate", "--model", NAME, "--weights", w["weights"], "--state", broken, "--val", w["val"],
            "--batch-size", "4", "--num-workers", "0", "--quiet", "--out", tmp_path / "e.json"]
    err = one_line_error(capsys, argv, tmp_path, "state file", "truncated")
    assert "weights file" not in err


def test_overwrite_replaces_only_what_vitq_wrote(world, capsys, tmp_path):
    w = world
    project = tmp_path / "myproject"
    (project / "src").mkdir(parents=True)
    (project / "src" / "notes.txt").write_text("mine")
    (project / "thesis.tex").write_text("mine")

    def q(out):
        return quantize(tmp_path, w["weights"], w["calib"], None, out, "--overwrite")

    one_line_error(capsys, q(project), tmp_path, "--out", "which vitq did not write")
    assert (project / "thesis.tex").read_text() == "mine" and (project / "src" / "notes.txt").exists()

    run = tmp_path / "run"
    assert main(q(run)) == 0  # a new folder, then the same folder again: vitq's own, so it is replaced
    first = (run / "results.json").read_text()
    assert main(q(run)) == 0 and (run / MARKER_FILE).exists() and (run / "results.json").read_text() != ""
    assert json.loads(first)["command"][0] == "vitq"
    (run / "extra.txt").write_text("added by the user")  # now it holds something vitq did not write
    one_line_error(capsys, q(run), tmp_path, "--out", "'extra.txt'", "which vitq did not write")
    assert (run / "extra.txt").exists()

    legacy = tmp_path / "legacy"  # a state written before folders carried a marker: only vitq's file names
    legacy.mkdir()
    for name in ("results.json", "config.json", "quant_state.safetensors"):
        (legacy / name).write_bytes((w["state"] / name).read_bytes())
    assert main(q(legacy)) == 0 and (legacy / MARKER_FILE).exists()
    theirs = tmp_path / "theirs"  # vitq's file names alone do not make a folder vitq's
    theirs.mkdir()
    (theirs / "results.json").write_text('{"my": "own results"}')
    one_line_error(capsys, q(theirs), tmp_path, "--out", "'results.json'", "which vitq did not write")

    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o777 & ~mask  # the umask, not a private temp folder
    assert stat.S_IMODE(os.stat(run / "results.json").st_mode) == 0o666 & ~mask


def test_folder_labels_give_no_accuracy_unless_mapped(world, capsys, tmp_path):
    w = world
    base = quantize(tmp_path, w["weights"], w["calib"], w["plain"], tmp_path / "f", "--labels", "folder")
    assert main(base) == 0
    r = json.loads((tmp_path / "f" / "results.json").read_text())
    assert r["quant"]["top1"] is None and r["float"]["top1"] is None and r["quant"]["agreement"] is not None
    out = capsys.readouterr().out
    assert "top-1 n/a" in out and "--class-map" in out
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"cats": 3, "dogs": 7}))
    argv = [a if a != str(tmp_path / "f") else str(tmp_path / "g") for a in base] + ["--class-map", str(cmap)]
    assert main(argv) == 0
    r = json.loads((tmp_path / "g" / "results.json").read_text())
    assert isinstance(r["quant"]["top1"], float) and r["class_map"] == str(cmap)


def test_odd_images_are_reported_once_per_kind(world, capsys, tmp_path):
    w = world
    val = make_image_folder(tmp_path / "val", per_class=2, seed=5)
    folder = val / "n01440764"
    (folder / "broken.jpg").write_bytes(b"not an image")
    Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16)).save(folder / "gray16.png")
    for i in range(2):
        Image.fromarray(np.full((40, 40, 4), 200, dtype=np.uint8), "RGBA").save(folder / f"alpha{i}.png")
    Image.fromarray(np.full((3, 3, 3), 90, dtype=np.uint8)).save(folder / "tiny.png")
    assert main(quantize(tmp_path, w["weights"], w["calib"], val, tmp_path / "o")) == 0
    err = capsys.readouterr().err
    assert err.count("unreadable evaluation image") == 1 and "broken.jpg" in err
    assert err.count("alpha channel") == 1 and "2 evaluation image(s) have an alpha channel" in err
    assert err.count("16 or 32 bits per pixel") == 1 and err.count("smaller than the model input") == 1

    from vitq.data import to_rgb

    rgb, notes = to_rgb(Image.open(folder / "gray16.png"))
    assert notes == ("16bit",) and np.asarray(rgb)[0, 0].tolist() == [128, 128, 128]  # not near-white


def test_help_is_short_and_shows_one_method(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    short = capsys.readouterr().out
    assert len(short.splitlines()) < 110 and "--evolq-passes" not in short and "--method NAME" in short
    with pytest.raises(SystemExit):
        main(["quantize", "--method", "percentile", "--help"])
    one = capsys.readouterr().out
    assert "options of method percentile" in one and "--percentile-value" in one and "--ptqvit-rounds" not in one


def test_methods_lists_whole_sentences_and_times(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert out.count("time:") >= 8  # every built-in method and refiner says what a run costs
    assert "Evol-Q" in out and "1.5 h" in out


def test_ctrl_c_keeps_a_visible_checkpoint_and_the_rerun_resumes(world, capsys, tmp_path, monkeypatch):
    import vitq.api

    w = world
    out = tmp_path / "run"
    argv = quantize(tmp_path, w["weights"], w["calib"], None, out, "--refine", "evolq", "--evolq-mode", "faithful",
                    "--evolq-passes", "2",
                    "--evolq-cycles", "1", "--evolq-population", "4", "--evolq-sample", "2")
    real = vitq.api.refine

    def interrupted(*a, **kw):  # the real search, with Ctrl-C arriving after its first block
        def stop(event):
            raise KeyboardInterrupt

        return real(*a, on_block_end=stop, **kw)

    monkeypatch.setattr(vitq.api, "refine", interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err
    ckpt = tmp_path / "run.evolq-ckpt"
    assert ckpt.is_file() and not out.exists()
    assert "resumable evolq checkpoint" in err and str(ckpt) in err and "rerun the same command" in err
    monkeypatch.setattr(vitq.api, "refine", real)
    assert main(argv) == 0
    r = json.loads((out / "results.json").read_text())["refinement"]
    assert r["checkpoint"]["resumed"]["from_position"] == 1 and not ckpt.exists()

"""Grid files: the issue's exact form, sub-grids, recipes, job keys (config, calibration files, code version),
and one-line errors; the SQLite store round-trips. No Ray needed."""

import json

import pytest
from conftest import make_image_folder

from vitq.errors import VitqError
from vitq.sweep.grid import assign_keys, expand, load_jobs, read_grid
from vitq.sweep.store import Store

pytest.importorskip("yaml")


@pytest.fixture
def folders(tmp_path):
    make_image_folder(tmp_path / "calib", per_class=3, seed=1)
    make_image_folder(tmp_path / "val", per_class=2, seed=2)
    (tmp_path / "deit_tiny.safetensors").write_bytes(b"weights")
    return tmp_path


ISSUE_GRID = """
models: [{name: deit_tiny_patch16_224, weights: deit_tiny.safetensors}]
calib: calib        # image folder
val: val            # image folder
scheme: [matmul, fq]
bits: ["8/8", "4/4"]        # weights/activations
method: [minmax, omse]      # or recipe: [best], with refine/options where wanted
num_calib: 32
seed: [0, 1]
"""


def test_the_issue_grid_is_every_combination(folders):
    (folders / "grid.yaml").write_text(ISSUE_GRID)
    jobs = load_jobs(str(folders / "grid.yaml"))
    assert len(jobs) == 16 and len({j.key for j in jobs}) == 16
    combos = {(j.config["scheme"], j.config["w_bits"], j.config["a_bits"], j.config["method"], j.config["seed"])
              for j in jobs}
    assert ("fq", 4, 4, "omse", 1) in combos and ("matmul", 8, 8, "minmax", 0) in combos
    j = jobs[0]
    assert j.config["model"]["weights"] == str(folders / "deit_tiny.safetensors")  # relative to the grid file
    assert j.config["calib"] == str(folders / "calib") and j.config["num_calib"] == 32
    assert len(j.calib_files) == 9  # 32 asked, the folder holds 9: all of them, as vitq quantize takes them


def test_keys_follow_config_calibration_files_and_code(folders):
    grid = read_grid_text(folders, ISSUE_GRID)
    base = {j.config["scheme"] + str(j.config["seed"]) + j.config["method"] + str(j.config["w_bits"]): j.key
            for j in assign_keys(expand(grid, str(folders)), code="v1")}
    again = assign_keys(expand(grid, str(folders)), code="v1")
    assert {j.key for j in again} == set(base.values())  # deterministic
    assert not {j.key for j in assign_keys(expand(grid, str(folders)), code="v2")} & set(base.values())
    make_image_folder(folders / "calib", classes=("n01440764",), per_class=4, seed=5)  # one more file
    changed = {j.key for j in assign_keys(expand(grid, str(folders)), code="v1")}
    assert not changed & set(base.values())
    labelled = assign_keys(expand({**grid, "label": "x", "resources": {"num_cpus": 2}}, str(folders)), code="v1")
    assert {j.key for j in labelled} == changed  # labels and resources do not change what a job computes


def read_grid_text(folders, text):
    (folders / "g.yaml").write_text(text)
    return read_grid(str(folders / "g.yaml"))


def test_sub_grids_recipes_and_model_forms(folders):
    grid = {"models": ["deit_tiny.safetensors", "hf:some/dir", {"name": "resnet18", "model_args": {"num_classes": 3}}],
            "calib": "calib", "grids": [{"scheme": "fq", "bits": "4/8", "recipe": "best"},
                                        {"scheme": "matmul", "bits": ["4/4", "6/6"], "method": "repq",
                                         "rounding": "gptq", "softmax_quantizer": "adalog"}]}
    jobs = expand(grid, str(folders))
    assert len(jobs) == 3 * 3
    names = {j.config["model"]["name"] for j in jobs}
    assert names == {"deit_tiny", f"hf:{folders}/some/dir", "resnet18"}
    fq = [j for j in jobs if j.config["scheme"] == "fq"][0]
    assert fq.config["recipe"]["asked"] == "best" and fq.config["method"]  # the recipe resolved to its settings
    mm = [j for j in jobs if j.config["scheme"] == "matmul"][0]
    assert mm.config["softmax_quantizer"] == "adalog" and mm.label == "matmul W4A4 repq+gptq"


@pytest.mark.parametrize("grid, message", [
    ({"calib": "calib", "method": "minmax"}, "needs 'models' and 'calib'"),
    ({"models": ["m"], "calib": "calib", "method": "minmax", "bits": "4-8"}, "is not W/A"),
    ({"models": ["m"], "calib": "calib", "method": "minmax", "bits": "1/8"}, "not supported"),
    ({"models": ["m"], "calib": "calib", "method": "nosuch"}, "nosuch"),
    ({"models": ["m"], "calib": "calib", "method": "minmax", "seeds": []}, "empty list"),
    ({"models": ["m"], "calib": "calib", "method": "minmax", "colour": 1}, "unknown"),
    ({"models": ["m"], "calib": "calib"}, "needs a 'method'"),
    ({"models": ["m"], "calib": "calib", "method": "minmax", "refine_options": {"evolq": {}}}, "not in the refiner"),
])
def test_bad_grids_are_refused_in_one_line(folders, grid, message):
    with pytest.raises(VitqError, match=message) as e:
        expand(grid, str(folders))
    assert "\n" not in str(e.value)


def test_store_round_trips(tmp_path):
    db = Store(str(tmp_path / "s"))
    config = {"model": {"name": "m", "weights": None, "model_args": {}}, "options": {"a": [1, 2]}}
    db.put("k1", state="done", label="fq W4A8 minmax", scheme="fq", w_bits=4, a_bits=8, method="minmax", seed=3,
           top1=12.5, top5=50.0, agreement=99.25, kl=0.0123456789, config=config, calib_files=["/a", "/b"],
           versions={"vitq": "0.1.0"}, record={"calibration": {"seconds": 1.5}}, job_s=2.0)
    db.put("k2", state="failed", error="VitqError: bad")
    db.close()
    again = Store(str(tmp_path / "s"), create=False)
    [row] = again.rows()
    assert row["key"] == "k1" and row["config"] == config and row["calib_files"] == ["/a", "/b"]
    assert (row["top1"], row["top5"], row["agreement"], row["kl"], row["seed"]) == (12.5, 50.0, 99.25, 0.0123456789, 3)
    assert row["record"] == {"calibration": {"seconds": 1.5}} and row["versions"] == {"vitq": "0.1.0"}
    assert [r["error"] for r in again.rows(states=("failed",))] == ["VitqError: bad"]
    assert again.rows({"w_bits": [4, 6]}) and not again.rows({"method": "omse"})
    with pytest.raises(VitqError, match="not a column"):
        again.rows({"colour": "red"})
    again.close()
    with pytest.raises(VitqError, match="holds no results"):
        Store(str(tmp_path / "empty"), create=False)
    assert json.loads(json.dumps(row["config"])) == config


def test_set_overrides_every_job_over_its_sub_grid(folders):
    from vitq.sweep.grid import parse_overrides

    grid = read_grid_text(folders, ISSUE_GRID + "grids: [{resources: {num_cpus: 2}}, {seed: 3}]\n")
    plain = assign_keys(expand(grid, str(folders)), code="v1")
    sets = parse_overrides(["resources={num_cpus: 4, num_gpus: 1}", "batch_size=25"])
    assert sets == {"resources": {"num_cpus": 4, "num_gpus": 1}, "batch_size": 25}
    moved = assign_keys(expand(grid, str(folders), sets), code="v1")
    assert len(moved) == len(plain) == 24
    assert all(j.run["resources"] == {"num_cpus": 4, "num_gpus": 1} and j.config["batch_size"] == 25 for j in moved)
    only_resources = assign_keys(expand(grid, str(folders), {"resources": {"num_gpus": 1}}), code="v1")
    assert [j.key for j in only_resources] == [j.key for j in plain]  # where a job runs is not what it computes
    assert not {j.key for j in moved} & {j.key for j in plain}  # another batch size: other jobs
    with pytest.raises(VitqError, match="--set 'device'"):
        parse_overrides(["device"])

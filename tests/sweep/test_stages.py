"""``eval_steps``: one job of a refiner chain also evaluates the base and every refiner but the last, with the
numbers of the jobs that stop at that stage; the evaluations in between leave the chain's result unchanged, and
the job record keeps each refiner's seconds, calibration KL and (recon) trace. In-process, no Ray."""

import json

import pytest
from conftest import TINY, make_image_folder, tiny_model
from safetensors.torch import save_file

from vitq.sweep.grid import expand
from vitq.sweep.job import calib_data, eval_data, run_job

pytest.importorskip("yaml")
NAME, KW = TINY["deit"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    save_file({k: v.contiguous() for k, v in tiny_model("deit").state_dict().items()}, str(tmp / "tiny.safetensors"))
    make_image_folder(tmp / "calib", per_class=2, seed=1)
    make_image_folder(tmp / "val", per_class=3, seed=2)
    return tmp


def jobs_of(folder, **keys):
    grid = {"models": [{"name": NAME, "weights": "tiny.safetensors", "model_args": KW}], "calib": "calib",
            "val": "val", "scheme": "fq", "bits": "4/8", "method": "minmax", "num_calib": 4, "batch_size": 4,
            "refine_options": {"recon": {"iters": 3, "batch": 2}}, **keys}
    return {(j.config["refine"], j.config["eval_steps"]): j.config for j in expand(grid, str(folder))}


def test_eval_steps_gives_every_stage_of_one_chain(folder):
    cfgs = jobs_of(folder, grids=[{"refine": "recon,biascorr", "eval_steps": [True, False]},
                                  {"refine": "recon"}, {"refine": None, "refine_options": None}])
    first = next(iter(cfgs.values()))
    calib = calib_data(first["model"], first["calib"], first["num_calib"], first["seed"], first["batch_size"])
    evald = eval_data(first["model"], first)
    out = {k: run_job(c, calib, evald) for k, c in cfgs.items()}
    assert not [o["error"] for o in out.values() if "error" in o]
    staged = out[("recon,biascorr", True)]
    stages = staged["record"]["stages"]
    assert [s["after"] for s in stages] == ["base", "recon", "biascorr"]
    same = {"base": out[(None, False)], "recon": out[("recon", False)], "biascorr": out[("recon,biascorr", False)]}
    for s in stages:  # each stage has the numbers of the job that stops there
        assert s["quant"] == same[s["after"]]["metrics"]["quant"], s["after"]
    assert staged["metrics"] == same["biascorr"]["metrics"]  # evaluating in between changed nothing
    assert stages[1]["calib_kl"]["gain"] == pytest.approx(
        staged["record"]["refinement"]["chain"][0]["calib_kl"]["gain"])
    assert stages[0]["calib_kl"] is None and all(s["step_s"] >= 0 and s["eval_s"] > 0 for s in stages)
    recon = staged["record"]["refinement"]["chain"][0]
    assert len(recon["trace"]) > 1 and "mse_before" in recon["trace"][0]  # the per-piece trace is in the record
    json.dumps(staged["record"], default=str)  # the store keeps it as JSON
    assert "stages" not in same["biascorr"]["record"]
    # the store keeps the stages, and vitq results --format json prints them
    from vitq.sweep.report import render
    from vitq.sweep.store import Store

    db = Store(str(folder / "store"))
    for k, o in (("staged", staged), ("plain", same["biascorr"])):
        q = o["metrics"]["quant"]
        db.put(k, state="done", label=k, config=cfgs[("recon,biascorr", k == "staged")], record=o["record"],
               top1=q["top1"], agreement=q["agreement"], kl=q["kl"])
    db.close()
    printed = {r["key"]: r for r in map(json.loads, render(str(folder / "store"), "json").splitlines())}
    assert [s["after"] for s in printed["staged"]["stages"]] == ["base", "recon", "biascorr"]
    assert printed["staged"]["stages"][0]["quant"] == stages[0]["quant"] and "stages" not in printed["plain"]


def test_eval_steps_must_be_a_boolean(folder):
    from vitq.errors import VitqError

    with pytest.raises(VitqError, match="eval_steps"):
        jobs_of(folder, refine="recon", eval_steps="yes")

"""vitq sweep end to end on a local Ray instance limited to 2 CPUs: a tiny random-init DeiT (saved to a weights
file) and generated image folders; 2 methods x 2 bit widths x 2 seeds."""

import json
import os
import sqlite3
import sys

import pytest
from conftest import TINY, make_image_folder, tiny_model
from safetensors.torch import save_file

from vitq.cli import main

ray = pytest.importorskip("ray")

NAME, KW = TINY["deit"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def local_ray():
    from vitq.sweep.cluster import start_ray

    start_ray(num_cpus=2)  # what vitq sweep starts, limited to 2 CPUs; every sweep of the module joins it
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    save_file({k: v.contiguous() for k, v in tiny_model("deit").state_dict().items()}, str(tmp / "tiny.safetensors"))
    make_image_folder(tmp / "calib", per_class=3, seed=1)
    make_image_folder(tmp / "val", per_class=5, seed=2)  # 15 images: 4 batches of 4 (the last one short)
    return tmp


def write_grid(tmp, name="grid.yaml", **extra) -> str:
    grid = {"models": [{"name": NAME, "weights": "tiny.safetensors", "model_args": KW}], "calib": "calib",
            "val": "val", "scheme": "fq", "bits": ["4/8", "8/8"], "method": ["minmax", "percentile"],
            "num_calib": 5, "seed": [0, 1], "batch_size": 4, **extra}
    path = tmp / name
    path.write_text(json.dumps(grid))  # JSON is YAML
    return str(path)


def standalone(tmp, row) -> dict:
    c = row["config"]
    out = tmp / f"standalone-{row['key']}"
    assert main(["quantize", "--model", NAME, "--model-args", json.dumps(KW), "--weights",
                 str(tmp / "tiny.safetensors"), "--calib", str(tmp / "calib"), "--val", str(tmp / "val"),
                 "--num-calib", str(c["num_calib"]),
                 "--seed", str(c["seed"]), "--scheme", c["scheme"], "--w-bits", str(c["w_bits"]), "--a-bits",
                 str(c["a_bits"]), "--method", c["method"], "--batch-size", "4", "--num-workers", "0",
                 "--threads", "1", "--quiet", "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def test_every_job_equals_the_standalone_command_and_sharded_equals_unsharded(local_ray, data, capsys):
    from vitq.sweep import sweep
    from vitq.sweep.report import results

    grid = write_grid(data)
    summary = sweep(grid, str(data / "store"), progress=False)
    assert summary["done"] == 8 and summary["failed"] == 0 and summary["skipped"] == 0
    rows = results(str(data / "store"))
    assert len(rows) == 8 and len({r["key"] for r in rows}) == 8
    for row in rows:
        ref = standalone(data, row)
        assert row["num_val"] == ref["num_val"] == 15
        assert (row["top1"], row["top5"], row["agreement"], row["kl"]) == tuple(
            ref["quant"][k] for k in ("top1", "top5", "agreement", "kl")), row["label"]
        assert row["float_top1"] == ref["float"]["top1"]
        assert [os.path.relpath(p, data / "calib") for p in row["calib_files"]] == ref["calib_files"]
    # jobs of the same grid with their evaluation in 3 Ray tasks each: the same numbers (another store)
    summary = sweep(grid, str(data / "store-sharded"), shards=3, max_jobs=2, progress=False)
    assert summary["done"] == 2
    sharded = {r["key"]: r for r in results(str(data / "store-sharded"))}
    for row in (r for r in rows if r["key"] in sharded):
        s = sharded[row["key"]]
        assert (s["top1"], s["top5"], s["agreement"], s["kl"]) == (row["top1"], row["top5"], row["agreement"],
                                                                    row["kl"])
    # vitq results: one JSON record per job, filters, groups over the seeds
    capsys.readouterr()
    assert main(["results", "--store", str(data / "store"), "--where", "method=minmax"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(recs) == 4 and {r["method"] for r in recs} == {"minmax"}
    assert all({"top1", "agreement", "kl", "config", "timings", "versions", "machine"} <= set(r) for r in recs)
    assert main(["results", "--store", str(data / "store"), "--format", "markdown", "--group-by", "method,w_bits",
                 "--plot", str(data / "agreement.png")]) == 0
    table = capsys.readouterr().out
    assert table.count("\n| minmax |") == 2 and " ± " in table and (data / "agreement.png").stat().st_size > 0


def test_a_killed_sweep_reruns_only_unfinished_jobs(local_ray, data):
    from vitq.sweep import sweep
    from vitq.sweep.report import results, status

    grid, store = write_grid(data, "grid2.yaml"), str(data / "store-kill")
    first = sweep(grid, store, max_jobs=3, progress=False)  # stops after 3 jobs, as a sweep killed there
    assert first["done"] == 3
    done = {r["key"]: r for r in results(store)}
    # a job killed while running stays 'running' in the store
    killed = next(iter(done))
    with sqlite3.connect(f"{store}/results.sqlite") as db:
        db.execute("UPDATE jobs SET state = 'running' WHERE key = ?", (killed,))
    s = status(store)
    assert (s["done"], s["interrupted"], s["left"], s["failed"]) == (2, 1, 5, 0)
    second = sweep(grid, store, progress=False)
    assert (second["jobs"], second["skipped"], second["done"]) == (8, 2, 6)
    after = {r["key"]: r for r in results(store)}
    assert len(after) == 8
    for key, row in done.items():
        if key != killed:  # finished jobs were not rerun: the same row, stamps included
            assert after[key]["finished"] == row["finished"] and after[key]["job_s"] == row["job_s"]
    third = sweep(grid, store, progress=False)
    assert (third["skipped"], third["done"]) == (8, 0)


def test_a_failing_job_is_recorded_and_the_others_finish(local_ray, data, capsys):
    from vitq.sweep import sweep
    from vitq.sweep.report import results, status

    (data / "broken.safetensors").write_bytes(b"not a safetensors file" * 10)
    grid = {"models": [{"name": NAME, "weights": "tiny.safetensors", "model_args": KW}], "calib": "calib",
            "val": "val", "bits": "8/8", "num_calib": 4, "batch_size": 4,
            "grids": [{"method": ["minmax", "percentile"]},
                      {"models": [{"name": NAME, "weights": "broken.safetensors", "model_args": KW}],
                       "method": "minmax"}]}
    (data / "grid3.yaml").write_text(json.dumps(grid))
    store = str(data / "store-fail")
    summary = sweep(str(data / "grid3.yaml"), store, progress=False)
    assert (summary["done"], summary["failed"]) == (2, 1)
    s = status(store)
    assert s["failed"] == 1 and s["done"] == 2 and len(s["errors"]) == 1
    assert len(results(store)) == 2
    failed = [r for r in _all_rows(store) if r["state"] == "failed"]
    assert len(failed) == 1 and "\n" not in failed[0]["error"] and "broken.safetensors" in failed[0]["error"]
    assert main(["sweep", "--status", "--store", store]) == 0
    assert "1 failed" in capsys.readouterr().out


def _all_rows(store):
    from vitq.sweep.store import Store

    db = Store(store, create=False)
    try:
        return db.rows(states=None)
    finally:
        db.close()


def test_sharded_evaluate_equals_single_process(local_ray, data):
    state = data / "state"
    assert main(["quantize", "--model", NAME, "--model-args", json.dumps(KW), "--weights",
                 str(data / "tiny.safetensors"), "--calib", str(data / "calib"), "--scheme", "fq", "--w-bits", "4",
                 "--a-bits", "8", "--method", "minmax", "--batch-size", "4", "--num-workers", "0", "--quiet",
                 "--out", str(state)]) == 0
    results = {}
    for shards in (None, 2, 3):
        out = data / f"eval-{shards}.json"
        assert main(["evaluate", "--model", NAME, "--weights", str(data / "tiny.safetensors"), "--state", str(state),
                     "--val", str(data / "val"), "--batch-size", "4", "--num-workers", "0", "--threads", "1",
                     "--quiet", "--out", str(out), *(["--shards", str(shards)] if shards else [])]) == 0
        results[shards] = json.loads(out.read_text())
    for shards in (2, 3):
        assert results[shards]["quant"] == results[None]["quant"] and results[shards]["float"] == results[None]["float"]
        assert results[shards]["num_val"] == 15 and results[shards]["shards"] == shards


def test_without_ray_the_error_names_the_extra_and_quantize_still_works(data, monkeypatch, capsys):
    from conftest import tiny_images

    import vitq

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as when the extra is not installed
    assert main(["sweep", write_grid(data, "grid4.yaml"), "--store", str(data / "store-noray"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'vitq[sweep]'" in err
    qmodel, _ = vitq.quantize(tiny_model("deit"), tiny_images("deit", 4), "fq", "minmax", progress=False)
    assert qmodel.vitq_scheme.name == "fq"


def test_a_synthetic_set_is_made_once_for_the_jobs_that_share_it(local_ray, data):
    """Two bit widths on one psaq set: one generation (both jobs record the same, not reused, run), one PNG folder
    in the store; a later sweep of another bit width reads that folder back."""
    from vitq.sweep import sweep
    from vitq.sweep.report import record, results

    synth = {"calib": "synthetic:4", "num_calib": None, "method": "minmax", "seed": 0,
             "synthetic": {"generator": "psaq", "options": {"iters": 2, "batch_size": 4}}}
    store = data / "store-synth"
    assert sweep(write_grid(data, "grid5.yaml", **synth), str(store), progress=False)["done"] == 2
    rows = results(str(store))
    made = [r["record"]["calib_source"]["synthetic"] for r in rows]
    assert len(made) == 2 and made[0]["made"] == made[1]["made"] and made[0]["key"] == made[1]["key"]
    assert not made[0]["reused"] and not made[1]["reused"]
    assert [p.name for p in (store / "synthetic").iterdir()] == [f"{NAME}-psaq-{made[0]['key']}"]
    assert record(rows[0])["timings"]["synthesize_s"] == made[0]["made"]["seconds"] > 0
    again = sweep(write_grid(data, "grid6.yaml", **{**synth, "bits": ["4/8", "8/8", "6/6"]}), str(store),
                  progress=False)
    assert (again["skipped"], again["done"]) == (2, 1)
    new = next(r for r in results(str(store)) if r["a_bits"] == 6)["record"]["calib_source"]["synthetic"]
    assert new["reused"] and new["key"] == made[0]["key"] and new["made"] == made[0]["made"]

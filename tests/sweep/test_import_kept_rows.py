"""benchmarks/import_kept_rows.py's per-row kinds: the kept rows of a benchmark's old loop land on the jobs of its
grid (where the section's renderer finds them), and a rerun on a file that has gained rows adds only those. No
model runs: the rows are written here."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("yaml")


@pytest.fixture
def importer(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("VITQ_SHARED", "/nonexistent/shared")
    import benchmarks.import_kept_rows as mod

    return mod


def run(mod, monkeypatch, capsys, *argv) -> str:
    monkeypatch.setattr(sys, "argv", ["import_kept_rows", *argv])
    assert mod.main() == 0
    return capsys.readouterr().out


def synth_row(agreement, generator=None):
    return {"top1": 70.0, "agreement": agreement, "kl": 0.2, "quantize_s": 10.0, "num_calib": 32,
            "generator": generator, "gen_s": 5.0 if generator else None,
            "gen_iters": "100/100" if generator else None, "gen_dir": None}


def test_synth_rows_import_once_and_a_rerun_adds_only_new_rows(importer, monkeypatch, capsys, tmp_path):
    from benchmarks.bench_synth import collect

    kept = {"settings": {"iters": 100, "set_budget_min": 30.0},
            "float": {"deit": {"top1": 78.2}, "effnet": {"top1": 86.0}},
            "rows": {"deit|synthetic|32|W4A8|0": synth_row(75.6, "psaq"), "deit|real|32|W4A8|0": synth_row(87.0)}}
    path, store = tmp_path / "synth_rows.json", tmp_path / "store"
    path.write_text(json.dumps(kept))
    assert "imported 2 rows" in run(importer, monkeypatch, capsys, "synth", str(path), "--store", str(store))
    kept["rows"]["effnet|real+fdda|32|W6A6|1"] = synth_row(87.2, "fdda")
    path.write_text(json.dumps(kept))
    out = run(importer, monkeypatch, capsys, "synth", str(path), "--store", str(store))
    assert "imported 1 rows" in out and "(2 were there already)" in out
    groups, missing, rows = collect(store)
    assert len(rows) == 3 and len(missing) == 117
    fdda = groups[("effnet", "real+fdda", 32, (6, 6))][0]
    assert fdda["agreement"] == 87.2 and fdda["float_top1"] == 86.0 and fdda["seed"] == 1
    assert fdda["record"]["calib_source"]["synthetic"]["made"]["seconds"] == 5.0
    assert fdda["record"]["calib_source"]["num_real"] == 32
    assert groups[("deit", "real", 32, (4, 8))][0]["record"]["calib_source"]["kind"] == "real"
    kept["rows"]["deit|synthetic|32|W5A5|0"] = synth_row(1.0, "psaq")  # not a job of the grid
    path.write_text(json.dumps(kept))
    with pytest.raises(SystemExit, match=r"W5A5\|0 have no job"):
        run(importer, monkeypatch, capsys, "synth", str(path), "--store", str(store))


def test_evolq_runs_and_seed_rows_share_the_seed_0_job(importer, monkeypatch, capsys, tmp_path):
    from benchmarks.bench_evolq import render as render_main
    from benchmarks.bench_evolq_seeds import render

    def info(seed, search_s):
        return {"seconds": search_s + 1, "search_seconds": search_s, "evaluations": 49, "check": {
            "rejected_steps": seed, "steps": 12, "initial": 2.0, "final": 1.0, "num_images": 50},
            "fitness": {"initial": 3.0, "final": 2.5, "search_images": 200}, "curves": {"search": [3.0, 2.5]}}

    def row(seed, agree):
        return {"seed": seed, "base_agree": 84.6, "base_kl": 0.19, "agree": agree, "kl": 0.18,
                "run": "abc1234 2026-11-24 02:57-03:18", "info": info(seed, 380.0 + seed)}

    metrics = {"top1": 73.0, "top5": 92.0, "agreement": 84.0, "kl": 0.18}
    runs = {"fq W4A8 fqvit": {"base": {"metrics": {"top1": 74.4, "top5": 91.0, "agreement": 84.6, "kl": 0.19},
                                       "calibrate_seconds": 15.0},
                              "checked": {"metrics": metrics, "info": info(0, 369.0)},
                              "faithful": {"metrics": {**metrics, "agreement": 84.8},
                                           "info": {**info(0, 416.0), "check": None}}}}
    seeds = {"settings": {"num_calib": 250, "passes": 1, "num_val": 500},
             "rows": {f"fq:4/8:fqvit | checked | seed {s}": row(s, 84.0 + s) for s in (0, 1)}}
    store = tmp_path / "store"
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    (tmp_path / "seeds.json").write_text(json.dumps(seeds))
    assert "imported 2 rows" in run(importer, monkeypatch, capsys, "evolq", str(tmp_path / "runs.json"),
                                    "--store", str(store))
    out = run(importer, monkeypatch, capsys, "evolq-seeds", str(tmp_path / "seeds.json"), "--store", str(store))
    assert "imported 1 rows" in out and "(1 were there already)" in out  # seed 0: the same job, kept once
    out = run(importer, monkeypatch, capsys, "evolq-seeds", str(tmp_path / "seeds.json"), "--store", str(store))
    assert "imported 0 rows" in out
    cells = {ln.split("|")[2].strip(): [c.strip() for c in ln.strip("|").split("|")]
             for ln in render_main(store).splitlines() if ln.startswith("| fq W4A8")}
    assert cells["fqvit"][2:5] == ["74.40", "84.60", "0.1900"]
    assert cells["fqvit + evolq checked"][2:7] == ["73.00", "84.00", "0.1800", "-0.60", "-0.0100"]
    assert cells["fqvit + evolq faithful"][-1] == "416" and cells["fqvit + evolq checked"][-1] == "369"
    line = next(ln for ln in render(store).splitlines() if ln.startswith("| fq W4A8"))
    seeds_cells = [c.strip() for c in line.strip("|").split("|")]
    assert seeds_cells[1:6] == ["fqvit + evolq checked", "2", "84.60 ± 0.00", "84.50 ± 0.71", "-0.10 ± 0.71"]
    assert seeds_cells[10:] == ["0 / 1", "375"]  # seed 0's search seconds are the section run's (369)


def test_synth_rows_of_other_generator_settings_are_refused(importer, monkeypatch, capsys, tmp_path):
    kept = {"settings": {"iters": 200, "set_budget_min": 8.0}, "float": {},
            "rows": {"deit|synthetic|32|W4A8|0": synth_row(75.6, "psaq")}}
    (tmp_path / "rows.json").write_text(json.dumps(kept))
    with pytest.raises(SystemExit, match="not the same jobs"):
        run(importer, monkeypatch, capsys, "synth", str(tmp_path / "rows.json"), "--store", str(tmp_path / "s"))

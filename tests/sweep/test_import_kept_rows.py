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


def test_evolq_seed_rows_become_jobs_with_their_base_stage(importer, monkeypatch, capsys, tmp_path):
    from benchmarks.bench_evolq_seeds import render

    def row(seed, base, agree):
        return {"seed": seed, "base_agree": base, "base_kl": 0.19, "agree": agree, "kl": 0.18, "run": "abc1234 "
                "2026-11-24 02:57-03:18", "info": {"seconds": 400.0, "search_seconds": 380.0 + seed,
                                                   "check": {"rejected_steps": seed}}}

    kept = {"settings": {"num_calib": 250, "passes": 1, "num_val": 500},
            "rows": {f"fq:4/8:fqvit | checked | seed {s}": row(s, 84.6, 84.0 + s) for s in (0, 1)}}
    path, store = tmp_path / "evolq_seed_rows.json", tmp_path / "store"
    path.write_text(json.dumps(kept))
    assert "imported 2 rows" in run(importer, monkeypatch, capsys, "evolq-seeds", str(path), "--store", str(store))
    out = run(importer, monkeypatch, capsys, "evolq-seeds", str(path), "--store", str(store))
    assert "imported 0 rows" in out and "(2 were there already)" in out
    md = render(store)
    line = next(ln for ln in md.splitlines() if ln.startswith("| fq W4A8"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2:6] == ["2", "84.60 ± 0.00", "84.50 ± 0.71", "-0.10 ± 0.71"] and cells[10:] == ["0 / 1", "380"]
    assert "**Partial" in md and "on 2026-11-24" in md


def test_synth_rows_of_other_generator_settings_are_refused(importer, monkeypatch, capsys, tmp_path):
    kept = {"settings": {"iters": 200, "set_budget_min": 8.0}, "float": {},
            "rows": {"deit|synthetic|32|W4A8|0": synth_row(75.6, "psaq")}}
    (tmp_path / "rows.json").write_text(json.dumps(kept))
    with pytest.raises(SystemExit, match="not the same jobs"):
        run(importer, monkeypatch, capsys, "synth", str(tmp_path / "rows.json"), "--store", str(tmp_path / "s"))

"""One-off: the rows the benchmark scripts kept in JSON files before sweeps (``benchmarks/recon_rows.json``,
``benchmarks/ptqvit_baselines_rows.json``, ``benchmarks/ptqvit_rows.json``), or only wrote into their BENCHMARKS.md
table (sections baselines, apq, cnn, cnn-lowbit: the numbers as the table shows them, rounded), imported into the
sweep stores their grids now run into, so the measured numbers stay in the sections the renderers write from the
stores.

Each kept row becomes a finished job of the store whose config is the grid's job of the same setting and draw (so
the renderer finds it where a sweep's row would be), with key ``imported-…``, code version ``imported from FILE``
and its original record (traces, notes, when and by which command it ran). A later sweep row of the same setting and
draw replaces it in the section (the renderers take the latest). Run once; it refuses to import a file twice into
the same store, except the kinds ``synth``, ``evolq`` and ``evolq-seeds``, which are keyed per row (the key hashes
the row's name in the file): a rerun on a file that has gained rows adds only those, and says how many it found
there already.

    python -m benchmarks.import_kept_rows recon benchmarks/recon_rows.json
    python -m benchmarks.import_kept_rows ptqvit-baselines benchmarks/ptqvit_baselines_rows.json
    python -m benchmarks.import_kept_rows ptqvit benchmarks/ptqvit_rows.json
    python -m benchmarks.import_kept_rows baselines      # (apq, cnn, cnn-lowbit): from the section's table
    python -m benchmarks.import_kept_rows synth benchmarks/synth_rows.json            # rerunnable
    python -m benchmarks.import_kept_rows evolq benchmarks/figures/evolq_runs.json     # rerunnable
    python -m benchmarks.import_kept_rows evolq-seeds benchmarks/evolq_seed_rows.json  # rerunnable
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

from benchmarks.common import ROOT

MACHINE = "AMD EPYC x2 (2 shared CPU cores), torch threads 2 (the benchmark machine; from the section)"


def grid_jobs(name: str) -> list:
    from vitq.sweep.grid import expand, read_grid

    path = ROOT / "benchmarks" / "grids" / f"{name}.yaml"
    return expand(read_grid(str(path)), str(path.parent))


def imported_key(source: str, ident: str) -> str:
    return "imported-" + hashlib.sha256(f"{source}|{ident}".encode()).hexdigest()[:11]


def _put(db, source: str, ident: str, cfg: dict, label: str, metrics: dict, timings: dict, record: dict,
         when: str, float_top1, num_val, key: str | None = None) -> None:
    key = key or imported_key(source, ident)
    db.put(key, state="done", label=label, model=cfg["model"]["name"], scheme=cfg["scheme"], w_bits=cfg["w_bits"],
           a_bits=cfg["a_bits"], method=cfg["method"], rounding=cfg["rounding"], refine=cfg["refine"],
           recipe=None, num_calib=cfg["num_calib"], seed=cfg["seed"], top1=metrics["top1"],
           top5=metrics.get("top5"), agreement=metrics["agreement"], kl=metrics["kl"], float_top1=float_top1,
           num_val=num_val, quantize_s=timings.get("quantize_s"), eval_s=timings.get("eval_s"),
           job_s=timings.get("job_s"), started=when, finished=when, error=None,
           code_version=f"imported from {source}", versions=None, machine=MACHINE, state_path=None, config=cfg,
           calib_files=None, record={**record, "imported_from": source}, sweep_id=None)


def spec_of(cfg: dict, label: str) -> str:
    """The old script's key of a setting: ``scheme:W/A:label``."""
    return f"{cfg['scheme']}:{cfg['w_bits']}/{cfg['a_bits']}:{label}"


def import_recon(db, path: Path) -> int:
    kept = json.loads(path.read_text())
    jobs = {(spec_of(j.config, j.label), j.config["seed"]): j for j in grid_jobs("recon")}
    n = 0
    for ident, row in kept["rows"].items():
        spec, seed = ident.rsplit("|", 1)
        job = jobs.get((spec, int(seed)))
        if job is None:
            raise SystemExit(f"{path}: row {ident} has no job in benchmarks/grids/recon.yaml")
        pipes = row["pipelines"]
        stages, chain = [], []
        for name, after in (("", "base"), ("recon", "recon"), ("recon,evolq", "evolq")):
            p = pipes[name]
            stages.append({"after": after, "quant": {k: p[k] for k in ("top1", "top5", "agreement", "kl")},
                           "float": {"top1": kept["float_top1"], "top5": None}, "num_images": kept["num_val"],
                           "step_s": p["step_seconds"], "calib_kl": p.get("calib_kl"), "eval_s": p["eval_seconds"]})
            if after != "base":
                chain.append({"refiner": after, "seconds": p["step_seconds"], "calib_kl": p.get("calib_kl"),
                              **{k: p[k] for k in ("pieces_kept_start", "steps_taken", "budget", "trace") if k in p}})
        last = pipes["recon,evolq"]
        record = {"stages": stages, "refinement": {"refiner": "recon,evolq", "chain": chain},
                  "command": row["command"], "settings": kept["settings"]}
        _put(db, str(path.relative_to(ROOT)), ident, job.config, job.label, last,
             {"quantize_s": last["seconds"], "eval_s": last["eval_seconds"],
              "job_s": last["seconds"] + sum(p["eval_seconds"] for p in pipes.values())},
             record, row["when"], kept["float_top1"], kept["num_val"])
        n += 1
    return n


def import_ptqvit_baselines(db, path: Path) -> int:
    kept = json.loads(path.read_text())
    jobs = {}
    for j in grid_jobs("ptqvit_baselines"):
        c = j.config
        jobs[(f"{c['scheme']} W{c['w_bits']}A{c['a_bits']}", j.label)] = j
    n = 0
    for ident, row in kept["rows"].items():
        setting, name, top1, agreement, kl, calib_s, run = row["row"]
        job = jobs.get((setting, name))
        if job is None:
            raise SystemExit(f"{path}: row {ident} has no job in benchmarks/grids/ptqvit_baselines.yaml")
        commit, when = run.split(" ", 1)
        _put(db, str(path.relative_to(ROOT)), ident, job.config, job.label,
             {"top1": top1, "agreement": agreement, "kl": kl}, {"quantize_s": calib_s},
             {"note": row["note"], "commit": commit, "settings": kept["settings"],
              "command": "python -m benchmarks.bench_ptqvit_baselines"}, when.replace(" ", "T") + "Z",
             kept["float_top1"], kept["num_val"])
        n += 1
    return n


def section_text(name: str) -> str:
    text = (ROOT / "BENCHMARKS.md").read_text()
    return text.split(f"<!-- BEGIN {name} -->", 1)[1].split(f"<!-- END {name} -->", 1)[0]


def section_table(name: str) -> tuple[list[dict], str, str]:
    """The first table of BENCHMARKS.md's section ``name`` as dicts (header -> cell), the section's command and
    the date it names (UTC)."""
    body = section_text(name)
    lines = [ln.strip() for ln in body.splitlines()]
    rows, header = [], None
    for ln in lines:
        if not ln.startswith("|"):
            if header is not None:
                break
            continue
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if header is None:
            header = cells
        elif not set(ln) <= set("|-"):
            rows.append(dict(zip(header, cells, strict=True)))
    command = next((ln.split("`")[1] for ln in lines if ln.startswith("Command") and "`" in ln), "")
    when = next((ln.rsplit(";", 1)[1].strip().rstrip(".").removesuffix("UTC").strip() for ln in lines
                 if ln.startswith("machine:")), "")
    return rows, command, when


def _num(text: str):
    return None if text in ("-", "", "n/a") else float(text)


def _import_section(db, section: str, grid: str, key_of_job, key_of_row, fields, skip=None,
                    float_top1=None) -> int:
    """Rows of a section's table onto the grid's jobs: ``key_of_job(job)`` and ``key_of_row(cells)`` match
    them, ``fields(cells)`` -> (metrics, timings, calibration record); the float row gives float top-1."""
    rows, command, when = section_table(section)
    jobs = {key_of_job(j): j for j in grid_jobs(grid)}
    float_row = next((r for r in rows if next(iter(r.values())) == "float"), None)
    float_top1 = _num(float_row.get("top-1")) if float_row else float_top1
    n = 0
    for cells in rows:
        if cells is float_row or (skip and skip(cells)):
            continue
        job = jobs.get(key_of_row(cells))
        if job is None:
            raise SystemExit(f"BENCHMARKS.md section {section}: row {cells} has no job in benchmarks/grids/{grid}.yaml")
        metrics, timings, calibration = fields(cells)
        _put(db, f"BENCHMARKS.md section {section}", json.dumps(cells, sort_keys=True), job.config, job.label,
             metrics, timings, {"calibration": calibration, "command": command, "table_row": cells,
                                "float_row": float_row},
             when.replace(" ", "T") + "Z" if when else None, float_top1, 500)
        n += 1
    return n


def _bits(c: dict) -> str:
    return f"W{c['w_bits']}A{c['a_bits']}"


def import_baselines(db, path: Path | None) -> int:
    return _import_section(
        db, "baselines", "baselines", lambda j: (j.config["method"], j.config["scheme"], _bits(j.config)),
        lambda r: (r["method"], r["scheme"], r["bits"]),
        lambda r: ({"top1": _num(r["top-1"]), "top5": _num(r["top-5"]), "agreement": _num(r["agreement"]),
                    "kl": _num(r["KL"])}, {"quantize_s": _num(r["calibrate s"]), "eval_s": _num(r["eval s"])},
                   {"seconds": _num(r["calibrate s"])}))


def import_apq(db, path: Path | None) -> int:
    return _import_section(
        db, "apq", "apq", lambda j: (_bits(j.config), j.label), lambda r: (r["bits"], r["config"]),
        lambda r: ({"top1": _num(r["top-1"]), "agreement": _num(r["agree"]), "kl": _num(r["KL"])},
                   {"quantize_s": _num(r["calib s"])},
                   {"seconds": _num(r["calib s"]), "softmax_quantizer": r["softmax q."]}),
        float_top1=float(re.search(r"Float top-1 here: \*\*([0-9.]+)\*\*", section_text("apq")).group(1)))


def import_cnn(db, path: Path | None) -> int:
    """The minmax / omse rows (the Evol-Q row of the section had another setting than the grid's: base on all
    250 images, fitness on a 64-image draw; it is not imported, the renderer quotes it)."""
    return _import_section(
        db, "cnn", "cnn", lambda j: (j.config["method"], j.config["scheme"], _bits(j.config))
        if j.config["num_calib"] is None else None, lambda r: (r["method"], r["scheme"], r["bits"]),
        lambda r: ({"top1": _num(r["top-1"]), "agreement": _num(r["agreement"]), "kl": _num(r["KL"])},
                   {"quantize_s": _num(r["calibrate s"]), "eval_s": _num(r["eval s"])},
                   {"seconds": _num(r["calibrate s"])}), skip=lambda r: r["method"] == "omse → evolq")


def import_cnn_lowbit(db, path: Path | None) -> int:
    return _import_section(
        db, "cnn-lowbit", "cnn", lambda j: j.label.removesuffix(" (lowbit)") if j.config["num_calib"] == 128
        else None, lambda r: r["chain"],
        lambda r: ({"top1": _num(r["top-1"]), "agreement": _num(r["agreement"]), "kl": _num(r["KL"])},
                   {"quantize_s": _num(r["quantize s"])}, {"seconds": None}))


def import_ptqvit(db, path: Path) -> int:
    kept = json.loads(path.read_text())
    jobs = {j.label: j for j in grid_jobs("ptqvit")}
    n = 0
    for label, row in kept["rows"].items():
        job = jobs.get(label)
        if job is None:
            raise SystemExit(f"{path}: row {label} has no job in benchmarks/grids/ptqvit.yaml")
        _, top1, agreement, kl, calib_s, _size, run = row["row"]
        _put(db, str(path.relative_to(ROOT)), label, job.config, label, {"top1": top1, "agreement": agreement,
                                                                           "kl": kl}, {"quantize_s": calib_s},
             {"note": row["note"], "table_row": row["row"], "run": run, "settings": kept["settings"],
              "command": "python -m benchmarks.bench_ptqvit"}, None, row["float_top1"], 500)
        n += 1
    return n


def import_synth(db, path: Path) -> tuple[int, int]:
    """The rows of ``benchmarks/synth_rows.json`` (bench_synth's loop before sweeps, ``model|source|N|WwAa|seed``)
    onto the jobs of ``benchmarks/grids/synth.yaml``; the generation seconds and iterations go where a sweep job
    keeps them (``record.calib_source.synthetic.made``). Keyed per row: a rerun adds only rows not imported yet."""
    from benchmarks.bench_synth import row_key

    kept = json.loads(path.read_text())
    source = "benchmarks/synth_rows.json"  # the key's source, wherever the file is read from
    jobs = {row_key(j.config, j.label): j for j in grid_jobs("synth")}
    stray = [ident for ident in kept["rows"] if ident not in jobs]
    if stray:  # nothing is written then
        raise SystemExit(f"{path}: row(s) {', '.join(stray)} have no job in benchmarks/grids/synth.yaml")
    gen = next(j.config["synthetic"] for j in jobs.values() if j.config.get("synthetic"))
    grid_settings = {"iters": gen["options"].get("iters"), "set_budget_min": gen["budget_min"]}
    ran = {k: kept["settings"].get(k) for k in grid_settings}
    if ran != grid_settings:
        raise SystemExit(f"{path}: its rows ran with {ran}, the grid's jobs have {grid_settings}: not the same jobs")
    have = db.states()
    added = skipped = 0
    for ident, row in kept["rows"].items():
        job = jobs[ident]
        if imported_key(source, ident) in have:
            skipped += 1
            continue
        n = job.config["num_calib"]
        calib_source = {"kind": "real", "num_real": n, "num_synthetic": 0}
        if row.get("generator"):
            run, asked = (int(v) for v in row["gen_iters"].split("/"))
            real = job.config.get("augment_synthetic") is not None
            calib_source = {"kind": "real+synthetic" if real else "synthetic", "num_real": n if real else 0,
                            "num_synthetic": n, "synthetic": {
                                "generator": row["generator"], "dir": row.get("gen_dir"),
                                "made": {"seconds": row["gen_s"], "iterations_run": run, "iterations_asked": asked}}}
        model = ident.split("|", 1)[0]
        _put(db, source, ident, job.config, job.label, row, {"quantize_s": row.get("quantize_s")},
             {"calib_source": calib_source, "num_calib": row.get("num_calib"), "kept_row": row,
              "settings": kept["settings"], "command": "python -m benchmarks.bench_synth"}, None,
             kept.get("float", {}).get(model, {}).get("top1"), 500)
        added += 1
    return added, skipped


IMPORTERS = {"recon": import_recon, "ptqvit-baselines": import_ptqvit_baselines, "ptqvit": import_ptqvit}
def import_evolq_seeds(db, path: Path) -> tuple[int, int]:
    """The rows of ``benchmarks/evolq_seed_rows.json`` (``bench_evolq.py --seeds`` before sweeps, ``fq:4/8:fqvit |
    checked | seed 0``) onto the jobs of ``benchmarks/grids/evolq.yaml``: the base's numbers as the job's
    ``eval_steps`` stage, the search's record as its refinement. Keyed per row, as :func:`import_synth`."""
    kept = json.loads(path.read_text())
    source = "benchmarks/evolq_seed_rows.json"
    jobs = evolq_jobs()
    stray = [ident for ident in kept["rows"] if ident not in jobs]
    if stray:
        raise SystemExit(f"{path}: row(s) {', '.join(stray)} have no job in benchmarks/grids/evolq.yaml")
    found = re.search(r"float top-1 ([0-9.]+)", section_text("evolq-seeds")) if "evolq-seeds" in \
        (ROOT / "BENCHMARKS.md").read_text() else None
    float_top1 = float(found.group(1)) if found else None
    have = db.states()
    added = skipped = 0
    for ident, row in kept["rows"].items():
        if imported_key("evolq", ident) in have:
            skipped += 1
            continue
        job, info = jobs[ident], row["info"]
        commit, day, clock = (row["run"].split(" ") + ["", ""])[:3]
        when = f"{day}T{clock[:5]}:00Z" if day else None
        base = {"top1": None, "top5": None, "agreement": row["base_agree"], "kl": row["base_kl"]}
        refined = {"top1": None, "top5": None, "agreement": row["agree"], "kl": row["kl"]}
        stages = [{"after": "base", "quant": base, "float": {"top1": float_top1, "top5": None},
                   "num_images": kept["settings"]["num_val"], "step_s": None, "calib_kl": None, "eval_s": None},
                  {"after": "evolq", "quant": refined, "float": {"top1": float_top1, "top5": None},
                   "num_images": kept["settings"]["num_val"], "step_s": info.get("seconds"),
                   "calib_kl": info.get("calib_kl"), "eval_s": None}]
        _put(db, source, ident, job.config, job.label, refined, {"quantize_s": info.get("seconds")},
             {"stages": stages, "refinement": info, "commit": commit, "settings": kept["settings"],
              "command": "python -m benchmarks.bench_evolq --seeds"}, when, float_top1, kept["settings"]["num_val"],
             key=imported_key("evolq", ident))
        added += 1
    return added, skipped


def evolq_jobs() -> dict:
    """The jobs of ``benchmarks/grids/evolq.yaml`` by the old script's name of a run: ``fq:4/8:fqvit | checked |
    seed 0``. Both evolq importers key a row by that name alone (not by its file): the section's seed-0 checked
    runs and the seed loop's are the same job, and whichever file is imported first gives its row."""
    jobs = {}
    for j in grid_jobs("evolq"):
        c = j.config
        spec = f"{c['scheme']}:{c['w_bits']}/{c['a_bits']}:{c['method']}"
        jobs[f"{spec} | {c['refine_options']['evolq']['mode']} | seed {c['seed']}"] = j
    return jobs


def import_evolq_runs(db, path: Path) -> tuple[int, int]:
    """The runs of section "evolq" before sweeps (``benchmarks/figures/evolq_runs.json``: per config the base and one
    search per mode, seed 0, made by ``python -m benchmarks.bench_evolq --threads 2`` on 2026-11-23) onto the
    grid's seed-0 jobs, the base's metrics as each job's ``eval_steps`` stage."""
    runs = json.loads(path.read_text())
    jobs = evolq_jobs()
    text = section_text("evolq") if "<!-- BEGIN evolq -->" in (ROOT / "BENCHMARKS.md").read_text() else ""
    found = re.search(r"float top-1 ([0-9.]+)", text)
    when = re.search(r"(\d{4}-\d\d-\d\d) (\d\d:\d\d) UTC", text)
    float_top1 = float(found.group(1)) if found else None
    have = db.states()
    todo = []
    for tag, per in runs.items():
        m = re.fullmatch(r"(\w+) W(\d+)A(\d+) (\w+)", tag)
        if m is None:
            raise SystemExit(f"{path}: run {tag!r} is not 'scheme WxAy method'")
        for mode in (k for k in per if k != "base"):
            ident = f"{m.group(1)}:{m.group(2)}/{m.group(3)}:{m.group(4)} | {mode} | seed 0"
            if ident not in jobs:
                raise SystemExit(f"{path}: run {tag} {mode} has no job in benchmarks/grids/evolq.yaml")
            todo.append((ident, per["base"], per[mode]))
    added = skipped = 0
    for ident, base, run in todo:
        if imported_key("evolq", ident) in have:
            skipped += 1
            continue
        job, info = jobs[ident], run["info"]
        stage = {"float": {"top1": float_top1, "top5": None}, "num_images": 500, "eval_s": None}
        stages = [{"after": "base", "quant": base["metrics"], "step_s": base["calibrate_seconds"], "calib_kl": None,
                   **stage},
                  {"after": "evolq", "quant": run["metrics"], "step_s": info.get("seconds"),
                   "calib_kl": info.get("calib_kl"), **stage}]
        _put(db, "benchmarks/figures/evolq_runs.json", ident, job.config, job.label, run["metrics"],
             {"quantize_s": base["calibrate_seconds"] + info.get("seconds", 0.0)},
             {"stages": stages, "refinement": info, "command": "python -m benchmarks.bench_evolq --threads 2"},
             f"{when.group(1)}T{when.group(2)}:00Z" if when else None, float_top1, 500,
             key=imported_key("evolq", ident))
        added += 1
    return added, skipped


# keyed per row: rerunnable on a file that has gained rows
INCREMENTAL = {"synth": import_synth, "evolq-seeds": import_evolq_seeds, "evolq": import_evolq_runs}
SECTIONS = {"baselines": import_baselines, "apq": import_apq, "cnn": import_cnn, "cnn-lowbit": import_cnn_lowbit}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=sorted({*IMPORTERS, *INCREMENTAL, *SECTIONS}))
    ap.add_argument("rows", nargs="?", default=None, help="the kept-rows JSON file (recon, ptqvit-baselines, ptqvit, "
                                                          "synth, evolq-seeds)")
    ap.add_argument("--store", default=None, help="default benchmarks/results/GRID (the grid's name)")
    args = ap.parse_args()
    from vitq.sweep.store import Store

    grid = {"ptqvit-baselines": "ptqvit_baselines", "cnn-lowbit": "cnn", "evolq-seeds": "evolq"}.get(args.kind,
                                                                                                  args.kind)
    store = args.store or str(ROOT / "benchmarks" / "results" / grid)
    if args.kind in INCREMENTAL:
        if args.rows is None:
            raise SystemExit(f"{args.kind}: give the kept-rows JSON file")
        db = Store(store)
        try:
            added, skipped = INCREMENTAL[args.kind](db, Path(args.rows).resolve())
        finally:
            db.close()
        print(f"imported {added} rows of {args.rows} into {store} ({skipped} were there already)")
        return 0
    if args.kind in IMPORTERS:
        if args.rows is None:
            raise SystemExit(f"{args.kind}: give the kept-rows JSON file")
        path = Path(args.rows).resolve()
        source = str(path.relative_to(ROOT))
    else:
        path, source = None, f"BENCHMARKS.md section {args.kind}"
    db = Store(store)
    try:
        if any(r["code_version"] == f"imported from {source}" for r in db.rows()):
            raise SystemExit(f"{store} already holds the rows of {source}")
        n = (IMPORTERS.get(args.kind) or SECTIONS[args.kind])(db, path)
    finally:
        db.close()
    print(f"imported {n} rows of {source} into {store}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What the renderers of sweep-made sections share: run a grid's unfinished jobs (``--run``), read the latest
row of each job setting from its store, and say which rows ran where and how (imported rows included)."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import ROOT


def emit(args: argparse.Namespace, *sections: tuple[str, str]) -> None:
    """Each (section name, markdown) into BENCHMARKS.md, or, with ``--no-write``, all of them printed."""
    from benchmarks.common import write_section

    if args.no_write:
        print("\n\n".join(md for _, md in sections))
        return
    for name, md in sections:
        write_section(name, md)


def arguments(grid: Path, store: Path, description: str, extra=None) -> argparse.Namespace:
    """The renderer's flags (``extra(parser)`` adds a script's own); with ``--run``, first the grid's sweep."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra is not None:
        extra(ap)
    ap.add_argument("--store", default=str(store), help="results store of the grid (default %(default)s)")
    ap.add_argument("--run", action="store_true", help="first run the grid's unfinished jobs with vitq sweep")
    ap.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                    help="with --run: only these jobs of the grid (as vitq sweep --only)")
    ap.add_argument("--address", default=None, help="with --run: a Ray cluster (default: a local instance)")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = ap.parse_args()
    args.store = Path(args.store).resolve()
    if args.run:
        import vitq
        from vitq.cli.results import parse_where

        print(vitq.sweep(str(grid), str(args.store), address=args.address, where=parse_where(args.only, "--only")))
    return args


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def grid_jobs(grid: Path) -> list:
    from vitq.sweep.grid import expand, read_grid

    return expand(read_grid(str(grid)), str(grid.parent))


def latest(store: Path, grid: Path) -> tuple[dict, list]:
    """{job setting (the config without its paths' machine-specific parts): the store's latest row} for the
    grid's jobs, and the jobs the store has no row of."""
    from vitq.sweep.report import results

    rows = results(str(store)) if (store / "results.sqlite").exists() else []
    by = {}
    for r in rows:
        by[setting_key(r["config"], r["label"])] = r
    jobs = grid_jobs(grid)
    found = {setting_key(j.config, j.label): by[setting_key(j.config, j.label)] for j in jobs
             if setting_key(j.config, j.label) in by}
    return found, [j for j in jobs if setting_key(j.config, j.label) not in by]


def setting_key(cfg: dict, label: str) -> tuple:
    """What identifies a row of a grid across machines and code versions: the label and the config but its
    paths (the shared data may live elsewhere)."""
    import json

    c = {k: v for k, v in cfg.items() if k not in ("calib", "val", "class_map", "device")}
    c["model"] = {k: v for k, v in cfg["model"].items() if k != "weights"}
    return label, json.dumps(c, sort_keys=True, default=str)


def provenance(rows: list[dict], grid: Path, store: Path) -> str:
    """Which commands made the rows (sweep jobs, or imported rows with their original command) and where."""
    imported = [r for r in rows if r["record"].get("imported_from")]
    parts = [f"Grid: `{shown(grid)}`, run by `vitq sweep {shown(grid)} --store {shown(store)}` (a rerun runs only "
             "the jobs the store lacks)."]
    if imported:
        cmds = ", ".join(dict.fromkeys(f"`{r['record']['command']}`" for r in imported))
        dates = [r["finished"] for r in imported if r["finished"]]
        parts.append(f"{len(imported)} of the {len(rows)} rows were measured before sweeps by {cmds}"
                     f"{' on ' + min(dates)[:10] if dates else ''} and imported into the store from "
                     f"{', '.join(sorted({r['record']['imported_from'] for r in imported}))} "
                     "(`benchmarks/import_kept_rows.py`; the numbers as that table showed them).")
    machines = "; ".join(dict.fromkeys(r["machine"] or "?" for r in rows if not r["record"].get("imported_from")))
    if machines:
        parts.append(f"Sweep rows ran on: {machines}.")
    return " ".join(parts)


def _name(job) -> str:
    c = job.config
    setting = f"{c['scheme']} W{c['w_bits']}A{c['a_bits']}"
    return f"{'' if job.label.startswith(setting) else setting + ' '}{job.label} (seed {c['seed']})"


PARTIAL = "**Partial:"


def missing_line(missing: list) -> str:
    if not missing:
        return ""
    return (f"{PARTIAL} {len(missing)} job(s) of the grid are not in the store yet** ("
            + ", ".join(_name(j) for j in missing[:12])
            + (", …" if len(missing) > 12 else "") + ").")


def after_table(section: str) -> str:
    """The text of BENCHMARKS.md's ``section`` after its first table (hand-written readings, and lines an
    earlier version of the script computed outside the grid's jobs), kept as it is by a renderer."""
    from benchmarks.common import BENCHMARKS_MD

    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else ""
    begin = f"<!-- BEGIN {section} -->"
    if begin not in text:
        return ""
    body = text.split(begin, 1)[1].split(f"<!-- END {section} -->", 1)[0]
    lines = body.splitlines()
    first = next((i for i, ln in enumerate(lines) if ln.startswith("|")), None)
    if first is None:
        return ""
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    # the line missing_line() wrote is computed again by the renderer, not kept
    return "\n".join(ln for ln in lines[end:] if not ln.startswith(PARTIAL)).strip()

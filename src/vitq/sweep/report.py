"""Reading the results store: filtered rows, groups with mean ± std over seeds (draws), tables (JSON, markdown,
CSV), the grid's progress (done / running / failed / left, ETA) and a plot of agreement against bits."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import statistics

from vitq.errors import VitqError
from vitq.sweep.store import Store

METRICS = ("top1", "top5", "agreement", "kl")
CONFIG_COLUMNS = ("label", "model", "scheme", "w_bits", "a_bits", "method", "rounding", "refine", "recipe",
                  "num_calib", "seed")
# a group's key by default: every config column but the seed, so groups are the draws of one setting
DEFAULT_GROUP = tuple(c for c in CONFIG_COLUMNS if c != "seed")


def results(store: str, where: dict | None = None) -> list[dict]:
    """One record per finished job: its key, config columns, metrics, timings, versions, machine, state path
    and full config."""
    db = Store(store, create=False)
    try:
        return db.rows(where)
    finally:
        db.close()


def record(row: dict) -> dict:
    """The public shape of a job's row (what ``vitq results --format json`` prints per job)."""
    out = {"key": row["key"], **{c: row[c] for c in CONFIG_COLUMNS}, **{m: row[m] for m in METRICS},
           "float_top1": row["float_top1"], "num_val": row["num_val"],
           "timings": {**{k: row[k] for k in ("quantize_s", "eval_s", "job_s")},
                       **synthetic_timing(row.get("record"))}, "machine": row["machine"],
           "versions": row["versions"], "code_version": row["code_version"], "state_path": row["state_path"],
           "finished": row["finished"], "config": row["config"]}
    stages = (row.get("record") or {}).get("stages")
    if stages:  # eval_steps: the metrics after the base and after each refiner of the chain
        out["stages"] = stages
    return out


def synthetic_timing(record: dict | None) -> dict:
    """``{"synthesize_s": seconds}`` (the generation of the job's synthetic set) where it has one."""
    from vitq.sweep.synthetic import synthesize_seconds

    seconds = synthesize_seconds(record)
    return {} if seconds is None else {"synthesize_s": seconds}


def _stats(values: list) -> dict:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "std": None}
    return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}


def group(rows: list[dict], by: tuple[str, ...] = DEFAULT_GROUP) -> list[dict]:
    """Rows grouped on the columns ``by`` (in first-seen order): n, seeds, mean and std of each metric and of
    the job seconds."""
    groups: dict = {}
    for r in rows:
        for c in by:
            if c not in r:
                raise VitqError(f"--group-by {c}: not a column (expected some of {', '.join(CONFIG_COLUMNS)})")
        groups.setdefault(tuple(r[c] for c in by), []).append(r)
    out = []
    for k, rs in groups.items():
        g = {**dict(zip(by, k)), "n": len(rs), "seeds": sorted({r["seed"] for r in rs})}
        for m in (*METRICS, "float_top1", "quantize_s", "job_s"):
            g[m] = _stats([r[m] for r in rs])
        out.append(g)
    return out


def cell(stats: dict, fmt: str, n: int = 2) -> str:
    """``mean ± std`` (the mean alone for one value, ``n/a`` for none)."""
    if stats["mean"] is None:
        return "n/a"
    if n < 2:
        return format(stats["mean"], fmt)
    return f"{format(stats['mean'], fmt)} ± {format(stats['std'], fmt)}"


def markdown(items: list[dict], grouped: bool) -> str:
    fmts = {"top1": ".2f", "top5": ".2f", "agreement": ".2f", "kl": ".4f", "quantize_s": ".1f", "job_s": ".1f"}
    if grouped:
        cols = [c for c in items[0] if c not in (*fmts, "float_top1", "seeds")] if items else []
        head = [*cols, *fmts]
        lines = [[*(str(g[c]) for c in cols), *(cell(g[m], f, g['n']) for m, f in fmts.items())] for g in items]
    else:
        head = [*CONFIG_COLUMNS, *METRICS, "job_s"]
        lines = [[*(str(r[c]) for c in CONFIG_COLUMNS), *(("n/a" if r[m] is None else format(r[m], fmts[m]))
                                                          for m in (*METRICS, "job_s"))] for r in items]
    text = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(text + ["| " + " | ".join(line) + " |" for line in lines]) + "\n"


def csv_text(items: list[dict], grouped: bool) -> str:
    buf = io.StringIO()
    flat = []
    for it in items:
        row = {}
        for k, v in it.items():
            if isinstance(v, dict) and grouped:
                row[f"{k}_mean"], row[f"{k}_std"] = v["mean"], v["std"]
            elif k not in ("config", "versions", "timings"):
                row[k] = v if not isinstance(v, list) else " ".join(map(str, v))
            elif k == "timings":
                row.update(v)
        flat.append(row)
    if flat:
        w = csv.DictWriter(buf, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    return buf.getvalue()


def render(store: str, fmt: str = "json", where: dict | None = None, group_by: tuple[str, ...] | None = None) -> str:
    """``vitq results``: the store's finished jobs (or their groups) as json, markdown or csv."""
    rows = results(store, where)
    items = group(rows, group_by) if group_by else [record(r) for r in rows]
    if fmt == "json":
        return "\n".join(json.dumps(it, default=str) for it in items) + ("\n" if items else "")
    if fmt == "markdown":
        return markdown(items, bool(group_by))
    if fmt == "csv":
        return csv_text(items, bool(group_by))
    raise VitqError(f"--format {fmt}: expected json, markdown or csv")


def plot(store: str, path: str, where: dict | None = None, metric: str = "agreement") -> None:
    """``metric`` (mean ± std over seeds) against weight bits, one line per method (and scheme, act bits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(results(store, where), ("scheme", "method", "rounding", "refine", "a_bits", "w_bits"))
    lines: dict = {}
    for g in groups:
        name = f"{g['scheme']} {g['method']}" + ("+gptq" if g["rounding"] == "gptq" else "") + \
               (f"+{g['refine']}" if g["refine"] else "") + f" A{g['a_bits']}"
        if g[metric]["mean"] is not None:
            lines.setdefault(name, []).append((g["w_bits"], g[metric]["mean"], g[metric]["std"]))
    if not lines:
        raise VitqError(f"--plot: no finished job with a {metric} in the store")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in sorted(lines.items()):
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=name)
    ax.set_xlabel("weight bits")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _alive(driver: str | None) -> bool:
    if not driver or ":" not in driver:
        return False
    host, pid = driver.rsplit(":", 1)
    if host != socket.gethostname():
        return True  # another machine's driver: take its word
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True


def status(store: str, keys: list[str] | None = None) -> dict:
    """Progress of the grid (``keys``; default the store's last sweep): done / running / failed / left, the
    failures' errors and an ETA from the mean job time and the sweep's parallel slots."""
    db = Store(store, create=False)
    try:
        last = db.last_sweep()
        if keys is None:
            if last is None:
                raise VitqError(f"--store {store}: no sweep has run into it yet")
            keys = last["keys"]
        rows = {r["key"]: r for r in db.rows(states=None)}
    finally:
        db.close()
    live = last is not None and not last.get("finished") and _alive(last.get("driver"))
    count = {"done": 0, "running": 0, "failed": 0, "interrupted": 0, "left": 0}
    errors = []
    for k in keys:
        r = rows.get(k)
        state = r["state"] if r else "left"
        if state == "running" and not live:
            state = "interrupted"  # its sweep was killed: the next run reruns it
        count[state] += 1
        if state == "failed":
            errors.append(f"{k} {r['label']}: {r['error']}")
    done_s = [rows[k]["job_s"] for k in keys if k in rows and rows[k]["state"] == "done" and rows[k]["job_s"]]
    remaining = count["left"] + count["running"] + count["interrupted"]
    slots = (last or {}).get("slots") or 1
    eta = statistics.mean(done_s) * remaining / slots if done_s and remaining else (0.0 if not remaining else None)
    return {"total": len(keys), **count, "eta_s": eta, "sweep_running": live, "errors": errors}


def status_line(s: dict) -> str:
    eta = "n/a" if s["eta_s"] is None else f"{s['eta_s'] / 60:.1f} min"
    line = (f"{s['total']} jobs: {s['done']} done, {s['running']} running, {s['failed']} failed, "
            f"{s['interrupted']} interrupted, {s['left']} left; ETA {eta}"
            + ("" if s["sweep_running"] else " (no sweep running)"))
    return "\n".join([line, *(f"failed: {e}" for e in s["errors"])])

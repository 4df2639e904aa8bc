"""The results store of sweeps: one SQLite file, ``DIR/results.sqlite``, one row per job.

Why SQLite: it is in Python's standard library (no extra dependency for the core), one file that any SQL tool
reads (``sqlite3``, DuckDB's ``sqlite_scan``, pandas ``read_sql``, DB Browser), it appends a row per finished job
atomically (a killed sweep never leaves a half-written table, unlike a Parquet file rewritten per row) and its
write-ahead log lets ``vitq results`` / ``vitq sweep --status`` read while a sweep writes. Only the sweep's
driver writes (jobs return their rows to it), so appends never contend.

Table ``jobs``: the job key, its state (``running`` / ``done`` / ``failed``), the full config as JSON plus its
main fields as columns (model, scheme, w_bits, a_bits, method, rounding, refine, recipe, num_calib, seed,
label), the metrics (top1, top5, agreement, kl, float_top1, float_top5, num_val), timings (quantize_s, eval_s,
job_s), the error line of a failed job, versions, machine, the saved state's path and vitq's record of the run.
Table ``sweeps``: each run of a grid (its file, its job keys, when, which driver), for ``--status``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time

from vitq.errors import VitqError

STORE_FILE = "results.sqlite"
COLUMNS = {  # column -> SQL type (after key)
    "state": "TEXT", "label": "TEXT", "model": "TEXT", "scheme": "TEXT", "w_bits": "INTEGER", "a_bits": "INTEGER",
    "method": "TEXT", "rounding": "TEXT", "refine": "TEXT", "recipe": "TEXT", "num_calib": "INTEGER",
    "seed": "INTEGER", "top1": "REAL", "top5": "REAL", "agreement": "REAL", "kl": "REAL", "float_top1": "REAL",
    "float_top5": "REAL", "num_val": "INTEGER", "quantize_s": "REAL", "eval_s": "REAL", "job_s": "REAL",
    "started": "TEXT", "finished": "TEXT", "error": "TEXT", "code_version": "TEXT", "versions": "TEXT",
    "machine": "TEXT", "state_path": "TEXT", "config": "TEXT", "calib_files": "TEXT", "record": "TEXT",
    "sweep_id": "INTEGER",
}
JSON_COLUMNS = ("versions", "config", "calib_files", "record")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def versions() -> dict:
    import platform

    import numpy
    import timm
    import torch

    from vitq._version import __version__

    return {"vitq": __version__, "torch": torch.__version__, "timm": timm.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


class Store:
    """The SQLite store of a sweep folder (made when missing)."""

    def __init__(self, directory: str, create: bool = True):
        self.dir = os.path.abspath(directory)
        self.path = os.path.join(self.dir, STORE_FILE)
        if not create and not os.path.isfile(self.path):
            raise VitqError(f"--store {directory} holds no results ({STORE_FILE} missing; run vitq sweep GRID "
                            f"--store {directory} first)")
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            raise VitqError(f"--store {directory} is a file (expected a folder for the results store)")
        os.makedirs(self.dir, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        cols = ", ".join(f"{c} {t}" for c, t in COLUMNS.items())
        self.db.execute(f"CREATE TABLE IF NOT EXISTS jobs (key TEXT PRIMARY KEY, {cols})")
        self.db.execute("CREATE TABLE IF NOT EXISTS sweeps (id INTEGER PRIMARY KEY AUTOINCREMENT, grid TEXT, "
                        "keys TEXT, started TEXT, finished TEXT, driver TEXT, address TEXT, ray_start_s REAL, "
                        "slots INTEGER)")

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------------------------------- writing
    def begin_sweep(self, grid: str, keys: list[str], address: str | None) -> int:
        import socket

        cur = self.db.execute("INSERT INTO sweeps (grid, keys, started, driver, address) VALUES (?, ?, ?, ?, ?)",
                              (grid, json.dumps(keys), now(), f"{socket.gethostname()}:{os.getpid()}", address))
        return int(cur.lastrowid)

    def update_sweep(self, sweep_id: int, **fields) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE sweeps SET {sets} WHERE id = ?", (*fields.values(), sweep_id))

    def put(self, key: str, **fields) -> None:
        """Insert or update the row of ``key`` (dicts/lists go in as JSON)."""
        bad = sorted(set(fields) - set(COLUMNS))
        if bad:
            raise ValueError(f"unknown store columns {bad}")
        vals = {k: json.dumps(v, default=str) if k in JSON_COLUMNS and v is not None else v
                for k, v in fields.items()}
        names = ", ".join(["key", *vals])
        marks = ", ".join("?" * (len(vals) + 1))
        update = ", ".join(f"{k} = excluded.{k}" for k in vals)
        self.db.execute(f"INSERT INTO jobs ({names}) VALUES ({marks}) ON CONFLICT(key) DO UPDATE SET {update}",
                        (key, *vals.values()))

    # ------------------------------------------------------------------------------------------- reading
    def states(self) -> dict[str, str]:
        return {r["key"]: r["state"] for r in self.db.execute("SELECT key, state FROM jobs")}

    def rows(self, where: dict | None = None, states=("done",)) -> list[dict]:
        """Rows as dicts (JSON columns decoded), optionally filtered on column = value (or value in a list)."""
        clauses, params = [], []
        if states:
            clauses.append(f"state IN ({', '.join('?' * len(states))})")
            params += list(states)
        for col, val in (where or {}).items():
            if col not in COLUMNS and col != "key":
                raise VitqError(f"--where {col}: not a column of the store (expected one of key, "
                                f"{', '.join(COLUMNS)})")
            vals = val if isinstance(val, list | tuple) else [val]
            clauses.append(f"CAST({col} AS TEXT) IN ({', '.join('?' * len(vals))})")
            params += [str(v) for v in vals]
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY rowid"
        out = []
        for r in self.db.execute(sql, params):
            d = dict(r)
            for c in JSON_COLUMNS:
                if d.get(c) is not None:
                    d[c] = json.loads(d[c])
            out.append(d)
        return out

    def last_sweep(self) -> dict | None:
        r = self.db.execute("SELECT * FROM sweeps ORDER BY id DESC LIMIT 1").fetchone()
        if r is None:
            return None
        d = dict(r)
        d["keys"] = json.loads(d["keys"])
        return d

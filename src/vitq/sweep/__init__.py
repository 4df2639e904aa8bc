"""Sweeps: a grid of quantization jobs (models × regimes × bits × methods / recipes × draws) run as Ray tasks,
resumable per job, with one row per job in a queryable SQLite store.

    summary = vitq.sweep("grid.yaml", store="runs/")      # or: vitq sweep grid.yaml --store runs/
    from vitq.sweep.report import results; rows = results("runs/", where={"method": "omse"})

:mod:`vitq.sweep.grid` (grid files and job keys), :mod:`vitq.sweep.job` (one job, no Ray),
:mod:`vitq.sweep.runner` (the Ray driver), :mod:`vitq.sweep.store` (SQLite), :mod:`vitq.sweep.report` (queries,
tables, plots), :mod:`vitq.sweep.shard` (evaluation sharded over Ray workers). Ray and PyYAML come with the
``sweep`` extra (``pip install 'vitq[sweep]'``); without them the rest of vitq works and a sweep says what to
install.
"""

from vitq.sweep.runner import sweep

__all__ = ["sweep"]

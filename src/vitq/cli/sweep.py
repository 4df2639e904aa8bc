"""``vitq sweep``: run a grid file of quantization jobs on Ray into a results store, or show its progress."""

from __future__ import annotations

import json
import logging

from vitq.errors import VitqError

log = logging.getLogger("vitq")


def add_command(sub) -> None:
    s = sub.add_parser("sweep", help="run a grid of jobs (models x regimes x bits x methods x seeds) on Ray, "
                                     "resumable, into a results store",
                       epilog="Grid file: YAML keys with one value or a list (every combination is a job): "
                              "models, calib, val, scheme, bits (\"W/A\"), method or recipe, options, rounding, "
                              "refine, refine_options, num_calib, num_val, seed, batch_size, device, label, "
                              "resources {num_cpus, num_gpus, memory}, save_state, eval_shards; calib synthetic:N or "
                              "augment_synthetic N with synthetic {generator, options, budget_min} and "
                              "synthetic_dir (generated calibration images); 'grids' lists sub-grids. Needs the sweep "
                              "extra: pip install 'vitq[sweep]'.")
    s.add_argument("grid", nargs="?", default=None, help="grid file (YAML)")
    s.add_argument("--store", required=True, metavar="DIR", help="results store folder (made when missing)")
    s.add_argument("--status", action="store_true",
                   help="show done / running / failed / left with an ETA (of GRID, or of the store's last sweep)")
    s.add_argument("--address", default=None,
                   help="an existing Ray cluster (auto, host:6379 or ray://host:10001); default: start a local one")
    s.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default all)")
    s.add_argument("--num-gpus", type=int, default=None, help="GPUs of the local Ray instance (default all)")
    s.add_argument("--job-threads", type=int, default=None,
                   help="torch threads per job (default: the CPUs each job declares, 1 unless resources say)")
    s.add_argument("--shards", type=int, default=None,
                   help="evaluate each job's images in this many Ray tasks (default the grid's eval_shards, 1)")
    s.add_argument("--only", action="append", default=[], metavar="KEY=VALUE[,VALUE...]",
                   help="run only the grid's jobs whose KEY (a grid key, or label) has one of the values, e.g. "
                        "seed=0 or w_bits=4 (repeatable)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="set a grid key on every job, over the grid's own (value in YAML; repeatable), e.g. "
                        "device=cuda or 'resources={num_cpus: 4, num_gpus: 1}' for another machine")
    s.add_argument("--max-jobs", type=int, default=None, help="start at most this many of the unfinished jobs")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sweep)


def cmd_sweep(args) -> int:
    import vitq.cli.validate as validate
    from vitq.sweep.report import status, status_line

    for flag, value in (("--num-cpus", args.num_cpus), ("--num-gpus", args.num_gpus),
                        ("--job-threads", args.job_threads), ("--shards", args.shards),
                        ("--max-jobs", args.max_jobs)):
        validate.positive(flag, value)
    from vitq.cli.results import parse_where
    from vitq.sweep.grid import parse_overrides

    where = parse_where(args.only, "--only")
    overrides = parse_overrides(args.overrides) if args.overrides else None
    if args.status:
        keys = None
        if args.grid is not None:
            from vitq.sweep.grid import load_jobs

            keys = [j.key for j in load_jobs(args.grid, where=where, overrides=overrides)]
        print(status_line(status(args.store, keys)))
        return 0
    if args.grid is None:
        raise VitqError("vitq sweep needs a GRID file (or --status to show a store's progress)")
    from vitq.sweep.runner import sweep

    summary = sweep(args.grid, args.store, address=args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                    threads=args.job_threads, progress=not args.quiet, max_jobs=args.max_jobs, shards=args.shards,
                    where=where, overrides=overrides)
    print(json.dumps(summary))
    print(status_line(status(args.store)))
    return 1 if summary["failed"] else 0

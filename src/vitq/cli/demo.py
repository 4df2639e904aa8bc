"""``vitq demo``: the main job on an embedded default (a small ViT trained on scikit-learn digits), no network."""

from __future__ import annotations


def add_command(sub) -> None:
    from vitq.cli.validate import add_threads_flag
    from vitq.demo import default_demo_dir

    d = sub.add_parser("demo", help="train a small ViT on scikit-learn digits and compare every method (no network)")
    d.add_argument("--out", default=None,
                   help=f"folder for the table, plot and results (default {default_demo_dir()}, outside the "
                        "repository)")
    d.add_argument("--quick", action="store_true", help="fewer bit widths and a shorter training run")
    d.add_argument("--methods", default=None, help="comma-separated methods (default: every registered one)")
    d.add_argument("--seed", type=int, default=0)
    add_threads_flag(d, 1, ": the demo model is too small to gain from more, and a shared CPU loses a lot "
                           "with more threads than free cores")
    d.add_argument("--overwrite", action="store_true", help="replace an existing folder vitq wrote")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from vitq.demo import run_demo

    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    return run_demo(out=args.out, overwrite=args.overwrite, quick=args.quick, seed=args.seed,
                    progress=not args.quiet, methods=methods, threads=args.threads)



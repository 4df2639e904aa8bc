"""The flags of synthetic calibration images (``vitq quantize --calib synthetic[:N]`` / ``--augment-synthetic N``)."""

from __future__ import annotations

import argparse
import os

from vitq.errors import VitqError


def add_synthetic_flags(q, argv) -> None:
    """The synthetic-image flags; their help is shown only when the command line asks for synthetic images (as a
    method's options are shown only with its --method), so ``vitq quantize --help`` stays short."""
    argv = [str(a) for a in argv or ()]
    shown = any(a.startswith(("synthetic", "--synthetic", "--augment-synthetic", "--budget-min")) for a in argv)

    def helped(text: str) -> str:
        return text if shown else argparse.SUPPRESS

    g = q.add_argument_group("synthetic calibration images (--calib synthetic[:N], or --augment-synthetic N)") \
        if shown else q
    g.add_argument("--augment-synthetic", type=int, default=None, metavar="N",
                   help="add N synthetic images to the real --calib images (vitq quantize --calib synthetic --help "
                        "lists the generator flags)")
    g.add_argument("--synthetic-generator", default="auto",
                   help=helped("auto (default: fdda with real images and BatchNorm, bn for other CNNs, psaq for "
                               "transformers), bn, fdda or psaq"))
    g.add_argument("--synthetic-iters", type=int, default=None,
                   help=helped("optimisation steps per batch (default 200)"))
    g.add_argument("--synthetic-lr", type=float, default=None,
                   help=helped("Adam learning rate on the pixels (default 0.2)"))
    g.add_argument("--synthetic-batch-size", type=int, default=None,
                   help=helped("images optimised together (default 32)"))
    g.add_argument("--synthetic-option", action="append", default=[], metavar="NAME=VALUE",
                   help=helped("another generator option, e.g. noise=0.5 (fdda) or jitter=0 (psaq) (repeatable)"))
    g.add_argument("--synthetic-dir", default=None, metavar="DIR",
                   help=helped("where generated sets are written as PNG files and reused from when the same set is "
                               "asked again (default $XDG_CACHE_HOME/vitq/synthetic, i.e. ~/.cache/vitq/synthetic)"))
    g.add_argument("--budget-min", type=float, default=None, metavar="MIN",
                   help=helped("cap on the generation time in minutes (results.json says how many iterations ran)"))


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def default_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "vitq", "synthetic")


def synthetic_settings(args, data_free: bool) -> dict | None:
    """``synthetic=`` of :func:`vitq.quantize` from the flags, checked before any model is loaded (None when no
    synthetic image is asked for)."""
    from vitq.synth import check_options

    wanted = data_free or bool(args.augment_synthetic)
    if args.augment_synthetic is not None and args.augment_synthetic < 0:
        raise VitqError(f"--augment-synthetic {args.augment_synthetic} is invalid (expected a number of images >= 0)")
    if args.budget_min is not None and not args.budget_min > 0:
        raise VitqError(f"--budget-min {args.budget_min} is invalid (expected a positive number of minutes)")
    options = {"iters": args.synthetic_iters, "lr": args.synthetic_lr, "batch_size": args.synthetic_batch_size}
    for item in args.synthetic_option:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise VitqError(f"--synthetic-option {item!r} is invalid (expected NAME=VALUE, e.g. noise=0.5)")
        options[name.strip().replace("-", "_")] = _value(text.strip())
    options = {k: v for k, v in options.items() if v is not None}
    if not wanted:
        used = [f for f, v in (("--synthetic-dir", args.synthetic_dir), ("--budget-min", args.budget_min)) if v]
        if options or args.synthetic_generator != "auto" or used:
            raise VitqError("synthetic-image flags given, but no synthetic image is asked for (use --calib "
                            "synthetic[:N] or --augment-synthetic N)")
        return None
    check_options(args.synthetic_generator, options, "--synthetic-option")
    return {"generator": args.synthetic_generator, "options": options, "budget_min": args.budget_min,
            "directory": args.synthetic_dir or default_dir()}

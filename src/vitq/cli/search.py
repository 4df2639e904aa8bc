"""The flags of the hardware-aware search (``vitq quantize --search hago``, :mod:`vitq.search`)."""

from __future__ import annotations

import argparse

from vitq.errors import VitqError

FLAGS = ("--search", "--min-speedup", "--max-kl", "--min-agreement")


def add_search_flags(q, argv) -> None:
    """The search flags; all but --search show their help only when the command line names the search (as the
    synthetic flags do), so ``vitq quantize --help`` stays short."""
    shown = any(str(a).startswith(FLAGS) for a in argv or ())

    def helped(text: str) -> str:
        return text if shown else argparse.SUPPRESS

    g = q.add_argument_group("hardware-aware search (--search hago, under a --target)") if shown else q
    g.add_argument("--search", choices=("hago",), default=None,
                   help="choose which of the --target's quantizer groups to quantize from their calibration "
                        "sensitivity and measured latency (vitq quantize --search hago --help lists its flags)")
    g.add_argument("--min-speedup", type=float, default=None, metavar="S",
                   help=helped("the most accurate configuration at least S times faster than float"))
    g.add_argument("--max-kl", type=float, default=None, metavar="K",
                   help=helped("the fastest configuration with KL(float ‖ model) <= K on the calibration images"))
    g.add_argument("--min-agreement", type=float, default=None, metavar="A",
                   help=helped("the fastest configuration with >= A %% top-1 agreement with float on the calibration "
                               "images"))
    g.add_argument("--search-groups", default=None, metavar="GROUPS",
                   help=helped("comma-separated groups to search (default every group the model quantizes, e.g. "
                               "linear_input.post_gelu, qk, attn_v, weight)"))
    g.add_argument("--search-batch", type=int, default=8, help=helped("batch of the latency measurements (default 8)"))
    g.add_argument("--search-rounds", type=int, default=5,
                   help=helped("alternated timing rounds (default 5; medians)"))
    g.add_argument("--search-checks", type=int, default=8,
                   help=helped("configurations of the predicted front re-measured before choosing (default 8)"))


def search_settings(args) -> tuple[str | None, dict | None]:
    """(search name, its options) from the flags, checked before any model is loaded (None, None without
    --search; the constraint flags without --search are refused)."""
    constraint = {"min_speedup": args.min_speedup, "max_kl": args.max_kl, "min_agreement": args.min_agreement}
    if args.search is None:
        given = [f"--{k.replace('_', '-')}" for k, v in constraint.items() if v is not None]
        if given or args.search_groups is not None:
            raise VitqError(f"{', '.join(given) or '--search-groups'} needs --search hago")
        return None, None
    if args.init_state is None and args.target in (None, "none"):
        raise VitqError("--search hago measures latency in a deployment target's runtime: give --target "
                        "onnxruntime or openvino")
    from vitq.search.hago import HagoOptions

    opts = {**{k: v for k, v in constraint.items() if v is not None}, "groups": args.search_groups,
            "batch": args.search_batch, "rounds": args.search_rounds, "checks": args.search_checks,
            "threads": args.threads}
    HagoOptions(**opts)  # every option checked now
    return args.search, opts

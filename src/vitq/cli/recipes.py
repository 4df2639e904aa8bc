"""``vitq recipes``: the recipes of ``--recipe`` with their measured agreement and cost, and (``--target``) what a
deployment target runs as integer kernels and which recipe ``--recipe best --target`` picks for it."""

from __future__ import annotations

from vitq.recipes import choose, format_table
from vitq.scheme import DEFAULT_A_BITS, DEFAULT_W_BITS
from vitq.targets import TARGETS, describe, get_target


def cmd_recipes(args) -> int:
    print(format_table())
    deploy = args.target not in (None, "none")
    if deploy:
        print()
        print(describe(get_target(args.target)))
    if args.scheme is not None or deploy:
        recipe, why = choose("best", args.scheme, args.w_bits, args.a_bits, target=args.target)
        where = f" --target {args.target}" if deploy else ""
        print(f"\n--recipe best{where} for {args.scheme or recipe.scheme} W{args.w_bits}A{args.a_bits}: "
              f"{recipe.name} ({why})")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("recipes", help="list the recipes of --recipe with their measured agreement and cost")
    p.add_argument("--scheme", choices=("fq", "matmul"), default=None, help="also say what --recipe best picks")
    p.add_argument("--w-bits", type=int, default=DEFAULT_W_BITS)
    p.add_argument("--a-bits", type=int, default=DEFAULT_A_BITS)
    p.add_argument("--target", choices=tuple(TARGETS), default=None,
                   help="a deployment target: its integer kernels, and the recipe --recipe best picks for it")
    p.set_defaults(func=cmd_recipes)

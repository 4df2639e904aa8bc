"""``vitq recipes``: the recipes of ``--recipe`` with their measured agreement and cost."""

from __future__ import annotations

from vitq.recipes import choose, format_table
from vitq.scheme import DEFAULT_A_BITS, DEFAULT_W_BITS


def cmd_recipes(args) -> int:
    print(format_table())
    if args.scheme is not None:
        recipe, why = choose("best", args.scheme, args.w_bits, args.a_bits)
        print(f"\n--recipe best for {args.scheme} W{args.w_bits}A{args.a_bits}: {recipe.name} ({why})")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("recipes", help="list the recipes of --recipe with their measured agreement and cost")
    p.add_argument("--scheme", choices=("fq", "matmul"), default=None, help="also say what --recipe best picks")
    p.add_argument("--w-bits", type=int, default=DEFAULT_W_BITS)
    p.add_argument("--a-bits", type=int, default=DEFAULT_A_BITS)
    p.set_defaults(func=cmd_recipes)

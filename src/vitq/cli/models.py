"""``vitq models``: list the supported model families and what each quantizes under each scheme."""

from __future__ import annotations

import argparse

from vitq.models.family import FAMILIES


def add_command(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the supported model families and what each quantizes")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    print("model families (tried in this order; --model NAME is a timm model name, --model hf:DIR a local "
          "Hugging Face folder):")
    for fam in FAMILIES.values():
        print(f"\n  {fam.name}: {fam.description}")
        for scheme, what in fam.quantizes.items():
            print(f"    {scheme:<7} {what}")
    return 0

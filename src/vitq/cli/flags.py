"""Command-line flags generated from an entry's options dataclass (:class:`vitq.options.Options`).

Each field becomes ``--<entry>-<field>`` (or the field's own ``flag`` name, plus its ``aliases``), parsed to
None when not given so that a recipe or a preset can fill it; a bool that defaults to True becomes
``--<entry>-no-<field>``, one that defaults to False ``--<entry>-<field>``; a tuple field takes ``a,b,c``. The
values are checked when the config is built (:meth:`Options.build`), before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from vitq.options import SCALAR_TYPES, Options, field_type


def dest_of(entry: str, field_name: str) -> str:
    return f"{entry.replace('-', '_')}_{field_name}"


def add_option_flags(group, config: type[Options], entry: str) -> None:
    """One flag per field of ``config`` for the registered ``entry``."""
    for f in dataclasses.fields(config):
        meta = f.metadata
        name, is_tuple, _ = field_type(str(f.type))
        dest = dest_of(entry, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = ", ".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f"{entry}: {meta.get('help', '')}".rstrip() + f" (default {shown})"
        flag = config.flag(entry, f.name)
        if name == "bool":
            if default:
                flag = "--" + f"{entry}-no-{(meta.get('flag') or f.name).replace('_', '-')}"
            group.add_argument(flag, *meta.get("aliases", ()), dest=dest, action="store_const",
                               const=not default, default=None, help=help_text)
            continue
        kw: dict[str, Any] = {"dest": dest, "default": None, "help": help_text}
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        if is_tuple:
            kw["type"] = str
            kw.setdefault("metavar", "A,B,...")
        else:
            kw["type"] = SCALAR_TYPES.get(name, str)
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
        group.add_argument(flag, *meta.get("aliases", ()), **kw)


def options_from_args(args: argparse.Namespace, config: type[Options], entry: str) -> dict:
    """The options given on the command line (flags made by :func:`add_option_flags`)."""
    return {n: getattr(args, dest_of(entry, n)) for n in config.field_names()
            if getattr(args, dest_of(entry, n), None) is not None}


def add_entry_flags(group, entry) -> None:
    """The flags of a registered method or refiner (:class:`vitq.registry.Entry`)."""
    add_option_flags(group, entry.config, entry.name)


def entry_options(args: argparse.Namespace, entry) -> dict:
    """The options of ``entry`` given on the command line."""
    return options_from_args(args, entry.config, entry.name)

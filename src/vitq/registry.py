"""Registries of calibration methods and refiners by name, so new ones plug in without touching the core.

A *method* fills every quantizer of a prepared model from calibration data; a *refiner* improves an
already-calibrated model (e.g. Evol-Q). Each entry may add its own command-line flags (named
``--<name>-<option>``; they reach the function as keyword ``option``) and may adjust the scheme it needs
(e.g. a softmax quantizer kind) before the model is prepared.

Optional hooks and facts an entry may carry (all keyword arguments of the register decorators):

- ``validate(options)``: raise ``VitqError`` for bad options (named by their flag, ``--<name>-<option>``);
  the CLI calls it before loading the model, so a bad option never costs a calibration;
- ``quick_options``: a smaller setting for quick runs (``vitq demo``); entries without it run their defaults;
- ``expected_time``: one line on what a run costs (DeiT-Tiny at the defaults on CPU / GPU), for ``vitq methods``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

from vitq.errors import VitqError


@dataclass
class Entry:
    name: str
    fn: Callable
    description: str
    add_arguments: Callable[[argparse._ArgumentGroup], None] | None = None
    adjust_scheme: Callable | None = None  # (Scheme, options) -> Scheme
    defaults: dict = field(default_factory=dict)
    validate: Callable[[dict], None] | None = None  # raise VitqError for bad options, before any work
    quick_options: dict = field(default_factory=dict)  # smaller setting for the demo / quick runs
    expected_time: str = ""  # e.g. "DeiT-Tiny, defaults: ~10 s on 2 CPU cores"

    def flag(self, option: str) -> str:
        """The command-line flag of an option (``--<name>-<option>``)."""
        return f"--{self.name}-{option.replace('_', '-')}"

    def check_options(self, options: dict) -> None:
        """Run the entry's own ``validate`` hook (no-op without one)."""
        if self.validate is not None:
            self.validate(dict(options))

    def options_from_args(self, args: argparse.Namespace) -> dict:
        """Keyword options from parsed CLI flags ``--<name>-x`` (dest ``<name>_x``), for flags given."""
        prefix = self.name.replace("-", "_") + "_"
        return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


METHODS: dict[str, Entry] = {}
REFINERS: dict[str, Entry] = {}


def _register(table: dict, kind: str, name: str, description: str, **kw):
    def deco(fn: Callable) -> Callable:
        if name in table:
            raise ValueError(f"{kind} {name!r} registered twice")
        table[name] = Entry(name, fn, description, **kw)
        return fn

    return deco


def register_method(name: str, description: str, **kw):
    """Decorator for ``fn(model, calib: CalibData, **options) -> dict`` (the dict goes into the results)."""
    return _register(METHODS, "method", name, description, **kw)


def register_refiner(name: str, description: str, **kw):
    """Decorator for ``fn(model, float_model, calib: CalibData, **options) -> dict``."""
    return _register(REFINERS, "refiner", name, description, **kw)


def _lookup(table: dict, kind: str, name: str) -> Entry:
    if name not in table:
        raise VitqError(f"unknown {kind} {name!r} (expected one of {', '.join(sorted(table))})")
    return table[name]


def get_method(name: str) -> Entry:
    return _lookup(METHODS, "method", name)


def get_refiner(name: str) -> Entry:
    return _lookup(REFINERS, "refiner", name)


def merge_options(name: str, options: dict, defaults: dict, negated: dict[str, str] | None = None) -> dict:
    """A method's options over its ``defaults``: unknown keys are refused; a value of None means "not given";
    ``negated`` maps a switch-off flag (``no_ranking``) to the option it sets False (``ranking``)."""
    negated = negated or {}
    unknown = set(options) - set(defaults) - set(negated)
    if unknown:
        raise VitqError(f"{name}: unknown options {sorted(unknown)} (expected some of {sorted(defaults)})")
    merged = dict(defaults)
    merged.update({k: v for k, v in options.items() if k in defaults and v is not None})
    for flag, key in negated.items():
        if options.get(flag):
            merged[key] = False
    return merged

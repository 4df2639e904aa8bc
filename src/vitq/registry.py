"""Registries of calibration methods and refiners by name, so new ones plug in without touching the core.

A *method* fills every quantizer of a prepared model from calibration data; a *refiner* improves an
already-calibrated model (e.g. Evol-Q). Each entry names its options dataclass (``config=``, a subclass of
:class:`vitq.options.Options`), from which its command-line flags ``--<name>-<option>``, its checks (run before
any model is loaded) and its record in ``results.json`` are generated, and may adjust the scheme it needs (e.g.
a softmax quantizer kind) before the model is prepared (``adjust_scheme(scheme, cfg)``).

Other facts an entry may carry (keyword arguments of the register decorators):

- ``quick_options``: a smaller setting for quick runs (``vitq demo``); entries without it run their defaults;
- ``expected_time``: one line on what a run costs (DeiT-Tiny at the defaults on CPU / GPU), for ``vitq methods``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from vitq.errors import VitqError
from vitq.options import Options


@dataclass
class Entry:
    """A registered method or refiner. ``config`` is its options dataclass (:class:`vitq.options.Options`):
    its flags, checks and record come from it. The function is called as ``fn(model, calib, cfg)`` (a
    method) or ``fn(model, float_model, calib, cfg, **context)`` (a refiner; ``context`` holds run-time
    objects that are not options, e.g. evaluation batches)."""

    name: str
    fn: Callable
    description: str
    config: type[Options] = Options
    adjust_scheme: Callable | None = None  # (Scheme, cfg) -> Scheme
    quick_options: dict = field(default_factory=dict)  # smaller setting for the demo / quick runs
    expected_time: str = ""  # e.g. "DeiT-Tiny, defaults: ~10 s on 2 CPU cores"
    regimes: tuple[str, ...] = ("fq", "matmul")  # the schemes it is defined for

    def flag(self, option: str) -> str:
        """The command-line flag of an option (``--<name>-<option>``)."""
        return self.config.flag(self.name, option)

    def make_config(self, options: dict | Options | None = None) -> Options:
        """The checked config from keyword options (refused naming the flag); raises before any work."""
        return self.config.build(options, self.name)

    def check_options(self, options: dict) -> None:
        self.make_config(options)

    @property
    def has_options(self) -> bool:
        return bool(self.config.field_names())

    def split(self, options: dict | None) -> tuple[dict, dict]:
        """(options, run-time context): keys of the function's own keyword parameters that are not config
        fields (e.g. a refiner's ``val_batches``) are context; every other key is an option."""
        options = dict(options or {})
        params = inspect.signature(self.fn).parameters
        fields = set(self.config.field_names())
        context = {k: options.pop(k) for k in list(options)
                   if k not in fields and k in params and params[k].kind is inspect.Parameter.KEYWORD_ONLY}
        return options, context

    def call(self, *args, options: dict | Options | None = None, **context):
        """Run the entry with its options (checked first) and any run-time context."""
        if isinstance(options, dict):
            options, more = self.split(options)
            context = {**more, **context}
        cfg = self.make_config(options)
        if not self.config.field_names():  # an entry without options takes none
            return self.fn(*args, **context)
        return self.fn(*args, cfg, **context)

    def check_regime(self, scheme) -> None:
        """Refuse a scheme of a regime the entry is not defined for (its ``regimes``)."""
        if scheme is not None and scheme.name not in self.regimes:
            raise VitqError(f"{self.name} is defined for the {' and '.join(self.regimes)} regime (METHODS.md §0), "
                            f"not {scheme.name!r}; use --scheme {self.regimes[0]}")

    def adjust(self, scheme, options: dict | Options | None = None):
        """The scheme this entry needs (e.g. its softmax quantizer kind), given its options; a scheme of a
        regime the entry is not defined for is refused."""
        self.check_regime(scheme)
        if self.adjust_scheme is None:
            return scheme
        return self.adjust_scheme(scheme, self.make_config(options))


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
    """Decorator for ``fn(model, calib: CalibData, cfg) -> dict`` (the dict goes into the results); ``config=``
    names the options dataclass."""
    return _register(METHODS, "method", name, description, **kw)


def register_refiner(name: str, description: str, **kw):
    """Decorator for ``fn(model, float_model, calib: CalibData, cfg, **context) -> dict``."""
    return _register(REFINERS, "refiner", name, description, **kw)


def _lookup(table: dict, kind: str, name: str) -> Entry:
    if name not in table:
        raise VitqError(f"unknown {kind} {name!r} (expected one of {', '.join(sorted(table))})")
    return table[name]


def get_method(name: str) -> Entry:
    return _lookup(METHODS, "method", name)


def get_refiner(name: str) -> Entry:
    return _lookup(REFINERS, "refiner", name)

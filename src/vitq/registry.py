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
    # legacy hooks, used only by entries that have no config class yet
    add_arguments_fn: Callable | None = None
    validate: Callable[[dict], None] | None = None

    @property
    def legacy(self) -> bool:
        return self.config is Options and (self.add_arguments_fn is not None or self.validate is not None)

    def flag(self, option: str) -> str:
        """The command-line flag of an option (``--<name>-<option>``)."""
        return self.config.flag(self.name, option)

    def make_config(self, options: dict | Options | None = None) -> Options | dict:
        """The checked config from keyword options (refused naming the flag); raises before any work."""
        if self.legacy:
            if self.validate is not None:
                self.validate(dict(options or {}))
            return dict(options or {})
        return self.config.build(options, self.name)

    def check_options(self, options: dict) -> None:
        self.make_config(options)

    @property
    def has_options(self) -> bool:
        return self.add_arguments_fn is not None if self.legacy else bool(self.config.field_names())

    def split(self, options: dict | None) -> tuple[dict, dict]:
        """(options, run-time context): keys of the function's own keyword parameters that are not config
        fields (e.g. a refiner's ``val_batches``) are context; every other key is an option."""
        options = dict(options or {})
        if self.legacy:
            return options, {}
        params = inspect.signature(self.fn).parameters
        fields = set(self.config.field_names())
        context = {k: options.pop(k) for k in list(options)
                   if k not in fields and k in params and params[k].kind is inspect.Parameter.KEYWORD_ONLY}
        return options, context

    def call(self, *args, options: dict | Options | None = None, **context):
        """Run the entry with its options (checked first) and any run-time context."""
        if self.legacy:  # checked by the caller (check_options), as before configs
            return self.fn(*args, **dict(options or {}), **context)
        if isinstance(options, dict):
            options, more = self.split(options)
            context = {**more, **context}
        cfg = self.make_config(options)
        if isinstance(cfg, dict):
            return self.fn(*args, **cfg, **context)
        if not self.config.field_names():  # an entry without options takes none
            return self.fn(*args, **context)
        return self.fn(*args, cfg, **context)

    def adjust(self, scheme, options: dict | Options | None = None):
        """The scheme this entry needs (e.g. its softmax quantizer kind), given its options."""
        if self.adjust_scheme is None:
            return scheme
        return self.adjust_scheme(scheme, self.make_config(options))


METHODS: dict[str, Entry] = {}
REFINERS: dict[str, Entry] = {}


def _register(table: dict, kind: str, name: str, description: str, **kw):
    if "add_arguments" in kw:
        kw["add_arguments_fn"] = kw.pop("add_arguments")
    kw.pop("defaults", None)

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

"""One options style for every method and refiner: a frozen, versioned dataclass of its options.

A config class subclasses :class:`Options` and declares each option as a field made with :func:`opt`, which
carries the option's help text and its checks (``choices``, ``minimum``, ...). From the fields come:

- the command-line flags ``--<entry>-<field>`` (made by :mod:`vitq.cli.flags`; a bool that defaults to True
  gets ``--<entry>-no-<field>``), all parsed to ``None`` when not given, so that a recipe or a preset can fill
  them;
- the checks, which run when the config is built (:meth:`Options.build`), so the CLI refuses a bad option
  before any model is loaded; cross-field rules go in :meth:`Options.check`;
- the record in ``results.json`` (:meth:`Options.to_dict`, with the class's ``VERSION``).

Errors name the option as a user typed it: :meth:`Options.build` is given the entry name and turns an
:class:`OptionError` into ``--<entry>-<field> VALUE (expected ...)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vitq.errors import VitqError

SCALAR_TYPES = {"int": int, "float": float, "str": str}


class OptionError(VitqError):
    """A bad option value; ``field`` names the option so that the caller can name its flag."""

    def __init__(self, field_name: str, value: Any, expected: str):
        self.field, self.value, self.expected = field_name, value, expected
        super().__init__(f"{field_name} {value!r} (expected {expected})")


def opt(default: Any = None, help: str = "", *, choices: tuple | None = None, minimum: float | None = None,
        maximum: float | None = None, above: float | None = None, below: float | None = None,
        metavar: str | None = None, flag: str | None = None, aliases: tuple[str, ...] = ()) -> Any:
    """A config field: its default, help text and checks (``minimum``/``maximum`` inclusive, ``above``/``below``
    exclusive; None passes every check, so optional fields default to None). ``flag`` replaces the field name
    in its flag (``--<entry>-<flag>``) where an older flag must keep its name; ``aliases`` are further flags."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum, "above": above,
            "below": below, "metavar": metavar, "flag": flag, "aliases": tuple(aliases)}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for a sequence default (configs are frozen)")
    return field(default=default, metadata=meta)


def field_type(annotation: str) -> tuple[str, bool, bool]:
    """(scalar type name, is a tuple of it, may be None) from a field's annotation string."""
    text = annotation.replace(" ", "")
    optional = text.endswith("|None") or text.startswith("None|")
    text = text.replace("|None", "").replace("None|", "")
    if text.startswith("tuple[") and text.endswith(",...]"):
        return text[len("tuple["):-len(",...]")], True, optional
    return text, False, optional


@dataclass(frozen=True)
class Options:
    """Base of every method's and refiner's config (an entry without options uses it as it is)."""

    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            name, is_tuple, _ = field_type(str(f.type))
            if is_tuple and isinstance(value, (list, str)):  # "a,b" or a list from JSON / Python
                items = value.split(",") if isinstance(value, str) else value
                try:
                    value = tuple(SCALAR_TYPES.get(name, str)(v.strip() if isinstance(v, str) else v)
                                  for v in items if not (isinstance(v, str) and not v.strip()))
                except (TypeError, ValueError):
                    kind = {"int": "integers", "float": "numbers"}.get(name, "values")
                    raise OptionError(f.name, getattr(self, f.name), f"comma-separated {kind}, e.g. 2,3,4") from None
                object.__setattr__(self, f.name, value)
            elif name == "float" and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
            _check_field(f, getattr(self, f.name))
        self.check()

    def check(self) -> None:
        """Rules between fields; raise :class:`OptionError` naming one field."""

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def record(self) -> dict:
        """What goes into a results file: the options and the config's version."""
        return {**self.to_dict(), "config_version": self.VERSION}

    def replace(self, **changes) -> Options:
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def build(cls, options: dict | Options | None, entry: str) -> Options:
        """A checked config from keyword options (None = not given; ``no_<x>=True`` means ``x=False``);
        unknown names and bad values are refused naming the flag ``--<entry>-<field>``."""
        if isinstance(options, cls):
            return options
        if isinstance(options, Options):
            raise VitqError(f"{entry}: options of type {type(options).__name__} (expected {cls.__name__})")
        given = {}
        names = set(cls.field_names())
        unknown = []
        for k, v in (options or {}).items():
            if k.startswith("no_") and k[3:] in names and isinstance(v, bool):
                if v:
                    given[k[3:]] = False
            elif k in names:
                if v is not None:
                    given[k] = v
            else:
                unknown.append(k)
        if unknown:
            expected = ", ".join(sorted(names)) or "none"
            raise VitqError(f"{entry}: unknown options {sorted(unknown)} (expected some of: {expected})")
        try:
            return cls(**cls.preset(given))
        except OptionError as e:
            raise VitqError(f"{cls.flag(entry, e.field)} {e.value!r} is invalid (expected {e.expected})") from None

    @classmethod
    def preset(cls, given: dict) -> dict:
        """Options given -> constructor arguments; a config with presets (e.g. a ``mode``) fills them here."""
        return given

    @classmethod
    def flag(cls, entry: str, field_name: str) -> str:
        """The command-line flag of a field: ``--<entry>-<field>``, or the field's own ``flag`` name."""
        meta = {f.name: f.metadata for f in dataclasses.fields(cls)}.get(field_name, {})
        return flag_of(entry, meta.get("flag") or field_name)


def flag_of(entry: str, field_name: str) -> str:
    return f"--{entry}-{field_name.replace('_', '-')}"


def _check_field(f: dataclasses.Field, value: Any) -> None:
    if value is None:
        return
    meta = f.metadata
    name, is_tuple, _ = field_type(str(f.type))
    values = value if is_tuple else (value,)
    for v in values:
        if name == "int" and (not isinstance(v, int) or isinstance(v, bool)):
            raise OptionError(f.name, value, "an integer")
        if name == "float" and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise OptionError(f.name, value, "a number")
        if name == "bool" and not isinstance(v, bool):
            raise OptionError(f.name, value, "true or false")
        if meta.get("choices") and v not in meta["choices"]:
            raise OptionError(f.name, value, "one of " + ", ".join(map(str, meta["choices"])))
        lo = meta.get("minimum") if meta.get("minimum") is not None else meta.get("above")
        hi = meta.get("maximum") if meta.get("maximum") is not None else meta.get("below")
        low_ok = lo is None or (v >= lo if meta.get("minimum") is not None else v > lo)
        high_ok = hi is None or (v <= hi if meta.get("maximum") is not None else v < hi)
        if not (low_ok and high_ok):
            kind = "a number" if name == "float" else "an integer"
            if lo is not None and hi is not None:
                left = "[" if meta.get("minimum") is not None else "("
                right = "]" if meta.get("maximum") is not None else ")"
                raise OptionError(f.name, value, f"{kind} in {left}{_num(lo)}, {_num(hi)}{right}")
            if lo is not None:
                raise OptionError(f.name, value, f"{kind} {'>=' if meta.get('minimum') is not None else '>'} "
                                                 f"{_num(lo)}")
            raise OptionError(f.name, value, f"{kind} {'<=' if meta.get('maximum') is not None else '<'} {_num(hi)}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)

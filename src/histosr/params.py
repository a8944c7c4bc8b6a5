"""Declarative parameter validation (scikit-learn's ``_parameter_constraints`` idea).

Every method and encoder declares its parameters once: the type comes from the dataclass
field's annotation (``int``, ``float``, ``bool``, ``str``, ``X | None``, ``tuple[float, ...]``,
``dict``), ranges and choices from a ``constraints`` mapping of :class:`Interval` /
:class:`Options`. :func:`validate` checks (and normalises: ``3`` for a float, a list for a
tuple) every value before any heavy work and raises :class:`ParameterError` with a message
of the form "the 'epochs' parameter of istar must be an int >= 1, got -3".
"""

from __future__ import annotations

import difflib
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Any

from .errors import InputError


class ParameterError(InputError):
    """A parameter has the wrong type or value; the message says what was expected."""


@dataclass(frozen=True)
class Interval:
    """A number in a range: ``Interval(int, 1)`` is "an int >= 1"; ``closed`` says which ends
    are included ("both", "left", "right", "neither")."""

    kind: type
    low: float | None = None
    high: float | None = None
    closed: str = "both"

    def check(self, v) -> str | None:
        lo_ok = self.low is None or (v >= self.low if self.closed in ("both", "left")
                                     else v > self.low)
        hi_ok = self.high is None or (v <= self.high if self.closed in ("both", "right")
                                      else v < self.high)
        return None if lo_ok and hi_ok else self.describe()

    def describe(self) -> str:
        name = "an int" if self.kind is int else "a float"
        lo = ">=" if self.closed in ("both", "left") else ">"
        hi = "<=" if self.closed in ("both", "right") else "<"
        if self.low is not None and self.high is not None:
            lb = "[" if lo == ">=" else "("
            rb = "]" if hi == "<=" else ")"
            return f"{name} in {lb}{self.low:g}, {self.high:g}{rb}"
        if self.low is not None:
            return f"{name} {lo} {self.low:g}"
        if self.high is not None:
            return f"{name} {hi} {self.high:g}"
        return name


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values (``Options("hr", "off", "shuffled")``)."""

    values: tuple

    def __init__(self, *values):
        object.__setattr__(self, "values", tuple(values))

    def check(self, v) -> str | None:
        return None if v in self.values else self.describe()

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


@dataclass(frozen=True)
class Pattern:
    """Text matching a regular expression (``Pattern(r"auto|cpu|cuda(:\\d+)?", "...")``)."""

    regex: str
    text: str

    def check(self, v) -> str | None:
        import re

        return None if isinstance(v, str) and re.fullmatch(self.regex, v) else self.text

    def describe(self) -> str:
        return self.text


@dataclass(frozen=True)
class MultipleOf:
    """An int that is a positive multiple of another parameter (``MultipleOf("heads")``:
    attention widths split evenly over heads)."""

    other: str
    kind: type = int

    def check(self, v, others: dict | None = None) -> str | None:
        m = (others or {}).get(self.other)
        if not isinstance(v, int) or v < 1:
            return self.describe(m)
        return None if not m or v % m == 0 else self.describe(m)

    def describe(self, m=None) -> str:
        return f"a multiple of {self.other!r}" + (f" ({m})" if m else "")


#: the device parameter of every learned method and encoder
DEVICE = Pattern(r"auto|cpu|cuda(:\d+)?", "'auto', 'cpu', 'cuda' or 'cuda:<index>'")


def _type_name(t) -> str:
    names = {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a string",
             dict: "a mapping", list: "a list", tuple: "a list"}
    if t is type(None):
        return "None"
    origin = typing.get_origin(t)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(t) if a is not Ellipsis]
        inner = _type_name(args[0]).split(" ", 1)[-1] + "s" if args else "values"
        return f"a list of {inner}"
    if origin is dict:
        return "a mapping"
    return names.get(t, getattr(t, "__name__", str(t)))


def _coerce(t, v) -> tuple[bool, Any]:
    """(ok, normalised value) of ``v`` against annotation ``t``."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(t):
            ok, out = _coerce(arm, v)
            if ok:
                return True, out
        return False, v
    if t is type(None):
        return v is None, v
    if t is Any:
        return True, v
    if t is bool:
        return isinstance(v, (bool, __import__("numpy").bool_)), bool(v) if v is not None else v
    if t is int:
        ok = isinstance(v, numbers.Integral) and not isinstance(v, bool)
        return ok, int(v) if ok else v
    if t is float:
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool)
        return ok, float(v) if ok else v
    if t is str:
        return isinstance(v, str), v
    if origin in (tuple, list) or t in (tuple, list):
        if not isinstance(v, (list, tuple)):
            return False, v
        args = [a for a in typing.get_args(t) if a is not Ellipsis]
        out = []
        for x in v:
            ok, y = _coerce(args[0], x) if args else (True, x)
            if not ok:
                return False, v
            out.append(y)
        return True, tuple(out) if (origin or t) is tuple else out
    if origin is dict or t is dict:
        return isinstance(v, dict), v
    return isinstance(v, t) if isinstance(t, type) else True, v


def describe(t, constraint=None) -> str:
    if constraint is not None:
        return constraint.describe()
    return _type_name(t)


def check_value(owner: str, name: str, t, value, constraint=None):
    """The normalised ``value`` of parameter ``name`` of ``owner`` (annotation ``t``), or
    :class:`ParameterError`."""
    ok, v = _coerce(t, value)
    allows_none = _coerce(t, None)[0]
    if ok and v is None and allows_none:
        return v
    msg = None
    if not ok:
        msg = describe(t, constraint)
    elif constraint is not None:
        msg = constraint.check(v)
    if msg and allows_none and "None" not in msg:
        msg += " or None"
    if msg:
        raise ParameterError(f"the {name!r} parameter of {owner} must be {msg}, got {value!r}")
    return v


def suggest(word: str, options) -> str:
    """``" (did you mean 'x'?)"`` when ``word`` is close to one of ``options``, else ``""``."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_names(owner: str, given, known, what: str = "parameter") -> None:
    """Unknown keys of ``given`` are an error naming the nearest known one."""
    bad = [k for k in given if k not in known]
    if bad:
        k = bad[0]
        raise ParameterError(f"{owner} has no {what} {k!r}{suggest(k, known)}: expected some of "
                             f"{', '.join(sorted(known))}")


def validate_fields(obj, constraints: dict | None = None, owner: str | None = None) -> None:
    """Check and normalise, in place, every init field of dataclass ``obj`` against its
    annotation and ``constraints`` (default ``obj.constraints``)."""
    import dataclasses

    hints = typing.get_type_hints(type(obj))
    cons = getattr(obj, "constraints", {}) if constraints is None else constraints
    owner = owner or getattr(obj, "name", type(obj).__name__)
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        c = cons.get(f.name)
        v = check_value(owner, f.name, hints.get(f.name, Any), getattr(obj, f.name),
                        None if isinstance(c, MultipleOf) else c)
        object.__setattr__(obj, f.name, v)
    for name, c in cons.items():  # rules that relate two parameters, once both are checked
        if isinstance(c, MultipleOf):
            v = getattr(obj, name)
            msg = c.check(v, {c.other: getattr(obj, c.other)})
            if msg:
                raise ParameterError(f"the {name!r} parameter of {owner} must be {msg}, "
                                     f"got {v!r}")


def validate_kwargs(owner: str, kwargs: dict, spec: dict) -> dict:
    """Check keyword parameters against ``spec`` = ``{name: (annotation, constraint)}``;
    returns the normalised dict."""
    check_names(owner, kwargs, spec)
    return {k: check_value(owner, k, spec[k][0], v, spec[k][1]) for k, v in kwargs.items()}


__all__ = ["ParameterError", "Interval", "Options", "Pattern", "MultipleOf", "DEVICE", "check_value", "check_names", "suggest",
           "validate_fields", "validate_kwargs"]

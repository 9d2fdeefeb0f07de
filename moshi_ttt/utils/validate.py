"""The field checks of every config dataclass (the TTT configs, the training YAML, the checkpoint flags).

A check raises `InvalidField`, a ValueError reading `invalid <kind>: <field>=<value!r>: <why>`: it names the
offending field and value. `Checks(kind)` binds the kind; `Checks(kind, InvalidFlag)` words its errors as a
command prints a bad flag, `--<field> <why>, got <value!r>` (the `serve` flags). `Checks.build` makes a
dataclass from a mapping: unknown keys are refused, lists become tuples, numeric strings become floats for float
fields (YAML 1.1 reads `1e-4` as a string), and a field error of a nested dataclass of another kind is
re-labelled with its place in this config (`invalid train config: model.hf_repo=...`).
"""

from __future__ import annotations

import dataclasses
import math
import typing as tp


class InvalidField(ValueError):
    """`invalid <kind>: <field>=<value!r>: <why>`; the parts are attributes."""

    def __init__(self, kind: str, field: str, value: tp.Any, why: str):
        super().__init__(self.describe(kind, field, value, why))
        self.kind, self.field, self.value, self.why = kind, field, value, why

    @staticmethod
    def describe(kind: str, field: str, value: tp.Any, why: str) -> str:
        return f"invalid {kind}: {field}={value!r}: {why}"

    def __reduce__(self):  # picklable across processes despite the 4-argument constructor
        return type(self), (self.kind, self.field, self.value, self.why)


class InvalidFlag(InvalidField):
    """`--<field> <why>, got <value!r>`, the field in its flag spelling (`max_delay` → `--max-delay`)."""

    @staticmethod
    def describe(kind: str, field: str, value: tp.Any, why: str) -> str:
        return f"--{field.replace('_', '-')} {why}, got {value!r}"


def is_int(v: tp.Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: tp.Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Checks:
    """Field checks whose errors say `invalid <kind>` (or are `error`s, e.g. `InvalidFlag`)."""

    def __init__(self, kind: str, error: type[InvalidField] = InvalidField):
        self.kind = kind
        self._error = error

    def error(self, field: str, value: tp.Any, why: str) -> InvalidField:
        return self._error(self.kind, field, value, why)

    def number(self, field: str, v: tp.Any, *, lo: float | None = None, lo_open: bool = False,
               hi: float | None = None, integer: bool = False, optional: bool = False, unit: str = "") -> None:
        """A finite number (an int with `integer`), ≥ lo (> lo with `lo_open`), ≤ hi; None too with `optional`.
        `unit` ("seconds") follows the bound in the error."""
        if v is None and optional:
            return
        if not (is_int(v) if integer else is_number(v)):
            raise self.error(field, v, "must be an integer" if integer else "must be a finite number")
        unit = f" {unit}" if unit else ""
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise self.error(field, v, f"must be {'>' if lo_open else '>='} {lo}{unit}")
        if hi is not None and v > hi:
            raise self.error(field, v, f"must be <= {hi}{unit}")

    def flag(self, field: str, v: tp.Any) -> None:
        if not isinstance(v, bool):
            raise self.error(field, v, "must be true or false")

    def choice(self, field: str, v: tp.Any, choices: tuple, *, optional: bool = False) -> None:
        if not (v in choices or (optional and v is None)):
            raise self.error(field, v, f"must be one of {choices}{' or null' if optional else ''}")

    def text(self, field: str, v: tp.Any, *, optional: bool = False) -> None:
        """A non-empty string; None too with `optional`."""
        if not ((isinstance(v, str) and v) or (optional and v is None)):
            raise self.error(field, v, "must be a non-empty string" + (" or null" if optional else ""))

    def texts(self, field: str, v: tp.Any) -> None:
        """A tuple of non-empty strings."""
        if not (isinstance(v, tuple) and all(isinstance(x, str) and x for x in v)):
            raise self.error(field, v, "must be a tuple of non-empty strings")

    def path(self, field: str, v: tp.Any) -> None:
        if v is not None and not isinstance(v, str):
            raise self.error(field, v, "must be a string (a path) or null")

    def mapping(self, cls: type, d: tp.Any, where: str) -> None:
        """`d` is a mapping whose keys are all fields of dataclass `cls`."""
        if not isinstance(d, tp.Mapping):
            raise ValueError(f"invalid {self.kind}: {where} must be a mapping, got {d!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"invalid {self.kind}: unknown key(s) {unknown} in {where}; known: {sorted(names)}")

    def build(self, cls: type, d: tp.Any, where: str, **built: tp.Any) -> tp.Any:
        """`cls(**d, **built)` after `mapping`, with the conversions of the module doc; `built` holds fields
        already made (nested sections)."""
        self.mapping(cls, d, where)
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        kw = {k: _coerce(v, types[k]) for k, v in d.items()}
        try:
            return cls(**kw, **built)
        except InvalidField as e:
            if e.kind == self.kind:
                raise
            raise self.error(f"{where}.{e.field}", e.value, e.why) from None


def _coerce(v: tp.Any, type_str: str) -> tp.Any:
    if isinstance(v, list):
        return tuple(_coerce(x, type_str) for x in v)
    if isinstance(v, str) and "float" in type_str:
        try:
            return float(v)
        except ValueError:
            return v
    return v

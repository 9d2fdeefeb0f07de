"""The field checks of every config dataclass (the TTT configs, the training YAML, the checkpoint flags).

A check raises `InvalidField`, a ValueError reading `invalid <kind>: <field>=<value!r>: <why>`: it names the
offending field and value. `Checks(kind)` binds the kind. `Checks.build` makes a dataclass from a mapping:
unknown keys are refused, lists become tuples, numeric strings become floats for float fields (YAML 1.1
reads `1e-4` as a string), and a field error of a nested dataclass of another kind is re-labelled with its
place in this config (`invalid train config: model.hf_repo=...`).
"""

from __future__ import annotations

import dataclasses
import math
import typing as tp


class InvalidField(ValueError):
    """`invalid <kind>: <field>=<value!r>: <why>`; the parts are attributes."""

    def __init__(self, kind: str, field: str, value: tp.Any, why: str):
        super().__init__(f"invalid {kind}: {field}={value!r}: {why}")
        self.kind, self.field, self.value, self.why = kind, field, value, why

    def __reduce__(self):  # picklable across processes despite the 4-argument constructor
        return type(self), (self.kind, self.field, self.value, self.why)


def is_int(v: tp.Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: tp.Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Checks:
    """Field checks whose errors say `invalid <kind>`."""

    def __init__(self, kind: str):
        self.kind = kind

    def error(self, field: str, value: tp.Any, why: str) -> InvalidField:
        return InvalidField(self.kind, field, value, why)

    def number(self, field: str, v: tp.Any, *, lo: float | None = None, lo_open: bool = False,
               integer: bool = False, optional: bool = False) -> None:
        """A finite number (an int with `integer`), ≥ lo (> lo with `lo_open`); None too with `optional`."""
        if v is None and optional:
            return
        if not (is_int(v) if integer else is_number(v)):
            raise self.error(field, v, "must be an integer" if integer else "must be a finite number")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise self.error(field, v, f"must be {'>' if lo_open else '>='} {lo}")

    def flag(self, field: str, v: tp.Any) -> None:
        if not isinstance(v, bool):
            raise self.error(field, v, "must be true or false")

    def choice(self, field: str, v: tp.Any, choices: tuple, *, optional: bool = False) -> None:
        if not (v in choices or (optional and v is None)):
            raise self.error(field, v, f"must be one of {choices}{' or null' if optional else ''}")

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

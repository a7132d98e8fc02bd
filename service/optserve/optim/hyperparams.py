"""Declarative hyperparameter specs: torch's names, defaults and ranges, checked in one place."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import HyperparameterError


@dataclass(frozen=True)
class Real:
    """A finite real number within optional bounds (inclusive `ge`/`le`, exclusive `gt`/`lt`)."""

    ge: float | None = None
    gt: float | None = None
    lt: float | None = None
    le: float | None = None

    def describe(self) -> str:
        parts = []
        if self.ge is not None:
            parts.append(f">= {self.ge:g}")
        if self.gt is not None:
            parts.append(f"> {self.gt:g}")
        if self.lt is not None:
            parts.append(f"< {self.lt:g}")
        if self.le is not None:
            parts.append(f"<= {self.le:g}")
        return "a finite number" + (" " + " and ".join(parts) if parts else "")

    def coerce(self, field: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise HyperparameterError(field, value, self.describe())
        number = float(value)
        ok = math.isfinite(number)
        ok = ok and (self.ge is None or number >= self.ge)
        ok = ok and (self.gt is None or number > self.gt)
        ok = ok and (self.lt is None or number < self.lt)
        ok = ok and (self.le is None or number <= self.le)
        if not ok:
            raise HyperparameterError(field, value, self.describe())
        return number


@dataclass(frozen=True)
class Flag:
    """A JSON boolean (no 0/1 or strings: a typo should not silently mean False)."""

    def describe(self) -> str:
        return "true or false"

    def coerce(self, field: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise HyperparameterError(field, value, self.describe())
        return value


@dataclass(frozen=True)
class Pair:
    """Two reals, each checked by `item` (torch's `betas`); returned as a tuple."""

    item: Real

    def describe(self) -> str:
        return f"a pair of numbers, each {self.item.describe().removeprefix('a finite number ')}"

    def coerce(self, field: str, value: Any) -> tuple[float, float]:
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise HyperparameterError(field, value, self.describe())
        return (
            self.item.coerce(f"{field}[0]", value[0]),
            self.item.coerce(f"{field}[1]", value[1]),
        )


Kind = Real | Flag | Pair


@dataclass(frozen=True)
class Hyperparameter:
    """One named hyperparameter with its torch default."""

    name: str
    default: Any
    kind: Kind


NON_NEGATIVE = Real(ge=0.0)
UNIT_INTERVAL = Real(ge=0.0, lt=1.0)


def validate(
    algorithm: str,
    spec: tuple[Hyperparameter, ...],
    options: Mapping[str, Any],
    check: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every hyperparameter of `spec` with defaults filled; raises naming the first bad field."""
    known = {h.name: h for h in spec}
    for name in options:
        if name not in known:
            allowed = ", ".join(sorted(known))
            raise HyperparameterError(
                name, options[name], f"not an option of {algorithm}: {allowed}"
            )
    values = {h.name: h.kind.coerce(h.name, options.get(h.name, h.default)) for h in spec}
    if check is not None:
        check(values)
    return values

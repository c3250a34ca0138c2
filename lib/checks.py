"""The one check of a numeric setting, shared by the methods' hyperparameters and the runner's sizes.

Kept free of torch so that `python -m lib.runner` can check its arguments before the heavy imports.
"""
import math
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Number:
    """The values a numeric setting may take: a finite real (an int when `integer`) between low and high,
    each end open or closed, or None when `none_ok`; `why` says what the setting means (shown on an error)."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    none_ok: bool = False
    why: str = ""

    def describe(self):
        kind = "an integer" if self.integer else "a finite number"
        if (self.low, self.high) == (-math.inf, math.inf):
            where = ""
        elif self.high == math.inf:
            where = f" {'>' if self.low_open else '>='} {self.low:g}"
        elif self.low == -math.inf:
            where = f" {'<' if self.high_open else '<='} {self.high:g}"
        else:
            where = f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return kind + where + (" or None" if self.none_ok else "")

    def accepts(self, value):
        if value is None:
            return self.none_ok
        kind = numbers.Integral if self.integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


def check_number(owner, name, value, rule):
    """Raise a ValueError naming `owner` (a method, "runner", ...), the setting, the allowed values and why,
    unless `rule` (a Number) accepts `value`."""
    if not rule.accepts(value):
        why = f" ({rule.why})" if rule.why else ""
        raise ValueError(f"{owner}: {name} must be {rule.describe()}{why}; got {value!r}.")

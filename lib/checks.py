"""The checks of settings shared by the methods' hyperparameters, the runner's grids and the notebooks' parameters:
numbers (sizes, rates), seeds and prompt templates; and how a value given on a command line is read (parse_value).

Kept free of torch so that `python -m lib.runner` can check its arguments before the heavy imports.
"""
import ast
import json
import math
import numbers
import string
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
            where = f" {'>' if self.low_open else '>='} {_show(self.low)}"
        elif self.low == -math.inf:
            where = f" {'<' if self.high_open else '<='} {_show(self.high)}"
        else:
            where = (f" in {'(' if self.low_open else '['}{_show(self.low)}, {_show(self.high)}"
                     f"{')' if self.high_open else ']'}")
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


def _show(bound):
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def check_number(owner, name, value, rule):
    """Raise a ValueError naming `owner` (a method, "runner", ...), the setting, the allowed values and why,
    unless `rule` (a Number) accepts `value`."""
    if not rule.accepts(value):
        why = f" ({rule.why})" if rule.why else ""
        raise ValueError(f"{owner}: {name} must be {rule.describe()}{why}; got {value!r}.")


# numpy's and torch's seeds: lib.train.set_seed seeds both, and numpy takes 0 <= seed < 2**32 only.
SEED = Number(0, 2**32, high_open=True, integer=True, why="a random seed; numpy takes 0 <= seed < 2**32")


def check_seeds(owner, seeds):
    """Raise a ValueError naming `owner` unless `seeds` is a non-empty list of valid seeds (SEED)."""
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise ValueError(f"{owner}: seeds must be a non-empty list of integers in [0, 2**32); got {seeds!r}.")
    for seed in seeds:
        check_number(owner, "seed", seed, SEED)


def check_templates(owner, templates):
    """Raise a ValueError naming `owner` unless `templates` is a non-empty list (or tuple) of prompt templates,
    each a string with exactly one `{}` (the class name's place): a template without it prompts every class with
    the same text, and trains a chance-level model without a word."""
    example = "e.g. [\"a photo of a {}.\"]"
    if isinstance(templates, str) or not isinstance(templates, (list, tuple)) or not templates:
        raise ValueError(f"{owner}: templates must be a non-empty list of strings, {example}; got {templates!r}.")
    for template in templates:
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None] \
                if isinstance(template, str) else None
        except ValueError:  # a lone "{" or "}"
            fields = None
        if fields != [""]:
            raise ValueError(f"{owner}: each template needs exactly one {{}} where the class name goes, {example};"
                             f" got {template!r}.")


def parse_value(text):
    """A value given on the command line (a notebook's -p, the runner's --hparam): JSON when it is JSON, else a
    Python literal when it is one (None, True, tuples, single quotes), else the string itself (quote it, '"0"', to
    keep a number a string)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text

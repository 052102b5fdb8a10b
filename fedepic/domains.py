"""The domain of every config key, declared beside its default in the schema (fedepic/config.py) and
checked from one place (:func:`check_domains`) before anything runs.

A key's domain travels in its dataclass field's metadata (``field(default=..., metadata=RANGE)``): the
range of a number (finite always: NaN, +-inf and 1e309 are refused for every float key), the choices of a
name, the shape of a text, applied to each item of a list. Checks that relate two keys (a client id below
``clients.count``, a class id inside the dataset) stay in fedepic.config.validate. tests/test_domains.py
walks every key of the schema, requires a domain for each, and tries the values each domain refuses, so
a key added later is covered without anyone remembering to.

OmegaConf checks the types (an int key refuses 1.5 and "x"); this module checks the values.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from fedepic.errors import ConfigError

INT_LIMIT = 2**31 - 1  # an int key without a declared upper bound stays in a 32-bit signed range
TEXT_LIMIT = 4096  # bytes of a path or a name (PATH_MAX)


@dataclass(frozen=True)
class Domain:
    """What values one key (or each item of a list key) may take.

    Numbers: ``low``/``high`` bounds (``open_low``/``open_high``: excluded); ints are also bounded by
    :data:`INT_LIMIT`, floats must be finite. Names: ``choices`` (a tuple, or a function returning one:
    the registries). Texts: ``text=True``, non-empty unless ``empty``, at most ``max_bytes`` bytes, no
    NUL, and ``pattern`` (fully matched) when given. ``free=True``: any value of the key's type (a flag).
    """

    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False
    open_high: bool = False
    choices: Union[tuple, Callable[[], Sequence[str]], None] = None
    text: bool = False
    empty: bool = False
    max_bytes: int = TEXT_LIMIT
    pattern: Optional[str] = None
    why: str = ""  # what a text must be, said when its pattern fails
    free: bool = False

    def names(self) -> tuple:
        choices = self.choices() if callable(self.choices) else self.choices
        return tuple(choices or ())

    def problem(self, value: Any) -> Optional[str]:
        """Why ``value`` lies outside the domain, or None."""
        if self.free or isinstance(value, bool):
            return None
        if self.choices is not None:
            names = self.names()
            return None if value in names else f"choose one of {', '.join(map(str, names))}"
        if self.text:
            return self._text_problem(str(value))
        if isinstance(value, (int, float)):
            return self._number_problem(value)
        return None

    def _text_problem(self, value: str) -> Optional[str]:
        if not value and not self.empty:
            return "must not be empty"
        if "\x00" in value:
            return "must not hold a NUL character"
        if len(value.encode("utf-8", "surrogatepass")) > self.max_bytes:
            return f"must be at most {self.max_bytes} bytes long"
        if self.pattern is not None and value and not re.fullmatch(self.pattern, value):
            return self.why or f"must match {self.pattern}"
        return None

    def _number_problem(self, value: float) -> Optional[str]:
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        low = self.low if self.low is not None else (-INT_LIMIT if isinstance(value, int) else None)
        low_ok = low is None or (value > low if self.open_low and self.low is not None else value >= low)
        high = self.high if self.high is not None else (INT_LIMIT if isinstance(value, int) else None)
        high_ok = high is None or (value < high if self.open_high and self.high is not None else value <= high)
        if low_ok and high_ok:
            return None
        return self.describe(isinstance(value, int))

    def describe(self, integer: bool = False) -> str:
        """The range in words: "must lie in (0, 1]", "must be > 0", "must lie in [-2147483647, 2147483647]"."""
        low = self.low if self.low is not None else (-INT_LIMIT if integer else None)
        high = self.high if self.high is not None else (INT_LIMIT if integer else None)
        if low is not None and high is not None:
            return (f"must lie in {'(' if self.open_low and self.low is not None else '['}{_fmt(low)}, {_fmt(high)}"
                    f"{')' if self.open_high and self.high is not None else ']'}")
        if low is not None:
            return f"must be {'>' if self.open_low else '>='} {_fmt(low)}"
        if high is not None:
            return f"must be {'<' if self.open_high else '<='} {_fmt(high)}"
        return "must be a finite number"


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() and abs(bound) < 1e15 else repr(bound)


def meta(domain: Domain) -> dict:
    """The metadata of a schema field with this domain: ``field(default=..., metadata=meta(...))``."""
    return {"domain": domain}


# The domains most keys share (metadata dicts, ready for field(metadata=...)).
ANY = meta(Domain(free=True))  # a flag: OmegaConf's type check is the whole domain
FINITE = meta(Domain())
POSITIVE = meta(Domain(low=0, open_low=True))
NON_NEGATIVE = meta(Domain(low=0))
AT_LEAST_ONE = meta(Domain(low=1))
UNIT_OPEN_LOW = meta(Domain(low=0, high=1, open_low=True))  # (0, 1]
UNIT = meta(Domain(low=0, high=1))  # [0, 1]
PATH = meta(Domain(text=True))


def between(low: float, high: float, open_low: bool = False, open_high: bool = False) -> dict:
    return meta(Domain(low=low, high=high, open_low=open_low, open_high=open_high))


def one_of(choices: Union[tuple, Callable[[], Sequence[str]]]) -> dict:
    return meta(Domain(choices=choices))


def domain_of(f: dataclasses.Field) -> Optional[Domain]:
    return f.metadata.get("domain")


def check_domains(section: Any, prefix: str = "") -> None:
    """A one-line ConfigError for the first value of ``section`` (a schema dataclass, walked through its
    sections and lists) outside its key's domain. Mapping keys (``variants``, ``sweep``) are checked
    where they are read (their members and cells are whole configs, checked in turn)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_domains(value, f"{key}.")
        elif isinstance(value, (list, tuple)):
            _check_items(value, key, domain_of(f), hints[f.name])
        elif value is not None and not isinstance(value, dict):
            _check_value(domain_of(f), key, value)


def _check_items(items: Sequence, key: str, domain: Optional[Domain], hint: Any) -> None:
    for i, item in enumerate(items):
        name = f"{key}[{i}]"
        if dataclasses.is_dataclass(item):
            check_domains(item, f"{name}.")
        elif isinstance(item, (list, tuple)):
            _check_items(item, name, domain, hint)
        elif item is not None:
            _check_value(domain, name, item)


def _check_value(domain: Optional[Domain], key: str, value: Any) -> None:
    problem = (domain or Domain()).problem(value)  # no domain declared: a number must still be finite
    if problem is not None:
        raise ConfigError(f"invalid value {value!r} for key '{key}': {problem}")

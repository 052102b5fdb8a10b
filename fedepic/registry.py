"""One registry per extension point: the names the config accepts, what each name builds, where its
parameters come from in the config, and its flags.

Config validation, the runners, the generated config reference and the tests all read these registries, so adding
a peer rule, a server strategy, a model attack, a data attack, a centralized defense, a dataset or a
model is one new module plus one :class:`Entry` line here.

An entry names its target as ``"module:attribute"`` and imports it only when it is built: listing
names stays free of torch and flwr (the CLI reports bad input before torch loads, and the core never
imports flwr). Parameters bind by signature (:meth:`Registry.build`): each constructor parameter is
read from the config key the entry's ``params`` maps it to, else taken from the caller's runtime
values (``context``: for example the number of clients of a round), else it keeps its default; one
with neither is an error, which the registry tests catch for every entry. Positional-only parameters
are the data a built function is called with (an attack's vectors) and are not bound. The classes themselves carry no
defaults for configurable parameters: the config schema (``fedepic/config.py``) is the one place of
defaults.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

ParamSource = Union[str, Callable[[Any, Mapping[str, Any]], Any]]  # a dotted config key, or f(cfg, context)


@dataclass(frozen=True)
class Entry:
    """One name of an extension point.

    Parameters
    ----------
    name : str
        What configs write (``strategies: [gossip]``).
    target : str
        ``"module:attribute"`` of the class or function the name builds.
    summary : str
        One line for the config reference's tables and error messages.
    params : mapping
        Constructor parameter -> dotted config key, or ``f(cfg, context)`` for a derived value.
    flags : frozenset of str
        What runners ask about an entry (``stateful``, ``needs_honest``, ...).
    info : mapping
        Facts the config checks need before the target is imported (a dataset's classes and image side),
        or a second ``"module:attribute"`` a runner loads (a decentralized algorithm's in-process member).
    """

    name: str
    target: str
    summary: str = ""
    params: Mapping[str, ParamSource] = field(default_factory=dict)
    flags: frozenset = frozenset()
    info: Mapping[str, Any] = field(default_factory=dict)

    def load(self) -> Any:
        return load_target(self.target)


def load_target(target: str) -> Any:
    """The attribute ``"module:attribute"`` names, its module imported now."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def config_value(cfg: Any, key: str) -> Any:
    """``cfg.a.b`` for the dotted key ``"a.b"``."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


class Registry:
    """The entries of one extension point, in the order they are listed."""

    def __init__(self, kind: str, entries: Iterable[Entry]) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        for entry in entries:
            if entry.name in self._entries:
                raise ValueError(f"{kind}: {entry.name!r} registered twice")
            self._entries[entry.name] = entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def names(self, flag: Optional[str] = None) -> tuple[str, ...]:
        """Every name, or those whose entry has ``flag``."""
        return tuple(e.name for e in self if flag is None or flag in e.flags)

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}")
        return self._entries[name]

    def has(self, name: str, flag: str) -> bool:
        return flag in self.get(name).flags

    def arguments(self, name: str, cfg: Any, context: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """The keyword arguments ``name``'s target gets: bound by its signature (module docstring). A
        target taking ``**kwargs`` (a subclass passing them to its base) also gets the unbound context."""
        entry, context = self.get(name), dict(context or {})
        kwargs: dict[str, Any] = {}
        forwards = False
        for param in inspect.signature(entry.load()).parameters.values():
            if param.kind == param.VAR_KEYWORD:
                forwards = True
            if param.kind in (param.POSITIONAL_ONLY, param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue  # positional-only parameters are the call's data (vectors), not settings
            source = entry.params.get(param.name)
            if source is not None:
                kwargs[param.name] = source(cfg, context) if callable(source) else config_value(cfg, source)
            elif param.name in context:
                kwargs[param.name] = context[param.name]
            elif param.default is param.empty:
                raise TypeError(f"{self.kind} {name!r}: parameter {param.name!r} has no config key or runtime value")
        if forwards:
            kwargs.update({k: v for k, v in context.items() if k not in kwargs})
        return kwargs

    def build(self, name: str, cfg: Any, context: Optional[Mapping[str, Any]] = None) -> Any:
        """``target(**arguments(name, cfg, context))``."""
        return self.get(name).load()(**self.arguments(name, cfg, context))

    def table(self) -> str:
        """A Markdown table of the names and summaries (the config reference's lists are made from it)."""
        rows = [f"| `{e.name}` | {e.summary} |" for e in self]
        return "\n".join(["| name | what it is |", "|---|---|", *rows]) + "\n"

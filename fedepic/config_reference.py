"""The config reference of the docs site, generated from the schema and the registries.

Every key of :class:`fedepic.config.RunConfig` (and the reserved keys of ``sweep:``,
:class:`fedepic.config.SweepSettings`) becomes one row: its dotted name, its type, its default, the
domain declared beside it (``fedepic/domains.py``) and the comments written beside it in
``fedepic/config.py``. Each registry of ``fedepic/extensions.py`` adds its table
(:meth:`fedepic.registry.Registry.table`). ``docs/hooks.py`` puts :func:`markdown` into
``docs/reference/config.md`` at build time, so the page cannot disagree with the code: a key added to the
schema or an entry added to a registry appears on the next build.

>>> "| `mode` |" in markdown()
True
>>> key, cells = schema_rows()[1]  # the second key: its name and default
>>> key, cells[2]
('seed', '`0`')

Cost: one pass over the schema's fields and one read of ``fedepic/config.py``'s source (``ast``): O(fields +
source length).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from typing import Any, Iterator, Optional

from fedepic import extensions
from fedepic.config import RunConfig, SweepSettings
from fedepic.domains import INT_LIMIT, Domain, domain_of

# each registry with the heading its table gets: what the names are and which key takes them
REGISTRIES = (
    (extensions.PEER_RULES, "Peer rules (`strategies:` in `mode=decentralized`)"),
    (extensions.SERVER_STRATEGIES, "Server strategies (`strategies:` in `mode=federated`)"),
    (extensions.SERVER_RULES, "Server rules (the tensor rules `engine=local` aggregates with, and `engine=ray` too "
                              "for a rule that has no Flower strategy; each rule that has a Flower strategy of the "
                              "same name is tested equal to it: " + ", ".join(
                                  f"`{n}`" for n in extensions.SERVER_RULES.names()
                                  if n in extensions.SERVER_STRATEGIES.names()) + ")"),
    (extensions.SERVER_PROTOCOLS, "Server protocols (`server.protocol` in `mode=federated`; what each flag means "
                                  "and refuses: `fedepic/extensions.py`)"),
    (extensions.PRE_AGGREGATION, "Pre-aggregation steps (`defense.pre_aggregation`, in the order listed)"),
    (extensions.MODEL_ATTACKS, "Model attacks (`attack.model`)"),
    (extensions.DATA_ATTACKS, "Data attacks (`attack.data`)"),
    (extensions.CENTRAL_DEFENSES, "Centralized defenses (`defense.compare`)"),
    (extensions.DATASETS, "Datasets (`data.name`)"),
    (extensions.MODELS, "Models (`model.name`)"),
    (extensions.ALGORITHMS, "Decentralized algorithms (`decentralized.algorithm`; what each flag means and "
                            "refuses: `fedepic/extensions.py`, `fedepic.config.ALGORITHM_NEEDS`)"),
)


def _unwrap(hint: Any) -> Any:
    """``Optional[X]`` -> ``X``; anything else as it is."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _list_item(hint: Any) -> Optional[Any]:
    return typing.get_args(hint)[0] if typing.get_origin(hint) in (list, typing.List) else None


def _comments(schema: type) -> dict[str, str]:
    """Each field's comments in the source: the comment lines just above it and the one at its end."""
    lines, _ = inspect.getsourcelines(schema)
    tree = ast.parse(inspect.cleandoc("\n" + "".join(lines)) if lines[0].startswith(" ") else "".join(lines))
    (cls,) = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    found: dict[str, str] = {}
    previous_end = cls.lineno  # the `class` line; the decorator is above it
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above = [line.strip()[1:].strip() for line in lines[previous_end:node.lineno - 1]
                     if line.strip().startswith("#")]
            statement = "".join(lines[node.lineno - 1:node.end_lineno])
            trailing = statement.rsplit("#", 1)[1].strip() if "#" in _code_tail(statement) else ""
            found[node.target.id] = " ".join(above + ([trailing] if trailing else []))
        previous_end = node.end_lineno
    return found


def _code_tail(statement: str) -> str:
    """The statement's last line outside string literals (a '#' inside a string is not a comment)."""
    last = statement.rstrip().splitlines()[-1]
    quote = None
    for char in last:
        if quote is None and char in "\"'":
            quote = char
        elif char == quote:
            quote = None
        elif quote is None and char == "#":
            return last
    return ""


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return None if dataclasses.is_dataclass(value) else value
    return None


def _type_name(hint: Any) -> str:
    inner = _unwrap(hint)
    name = getattr(inner, "__name__", None) or str(inner).replace("typing.", "")
    if typing.get_origin(inner) in (list, typing.List):
        name = f"list[{_type_name(typing.get_args(inner)[0])}]"
    elif typing.get_origin(inner) in (dict, typing.Dict):
        name = "mapping"
    return f"{name} or null" if inner is not hint else name


def _domain_text(domain: Optional[Domain], hint: Any) -> str:
    if domain is None or domain.free:
        return "any value of its type"
    if domain.choices is not None:
        return "one of " + ", ".join(f"`{n}`" for n in domain.names())
    if domain.text:
        parts = ["text" + ("" if domain.empty else ", not empty"), f"at most {domain.max_bytes} bytes"]
        if domain.why:
            parts.append(domain.why)
        return "; ".join(parts)
    inner = _unwrap(hint)
    item = _list_item(inner)
    integer = (item if item is not None else inner) is int
    text = domain.describe(integer).removeprefix("must ")
    return text.removeprefix("lie in ").removeprefix("be ")


def _format_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{value!r}`".replace("'", "")


def _rows(schema: type, prefix: str) -> Iterator[tuple[str, list[str]]]:
    hints = typing.get_type_hints(schema)
    comments = _comments(schema)
    doc = inspect.cleandoc(schema.__doc__ or "")
    for f in dataclasses.fields(schema):
        hint, key = hints[f.name], f"{prefix}{f.name}"
        inner = _unwrap(hint)
        if dataclasses.is_dataclass(inner):
            yield from _rows(inner, key + ".")
            continue
        meaning = comments.get(f.name, "")
        if not meaning and schema is not RunConfig and len(dataclasses.fields(schema)) == 1:
            meaning = doc.splitlines()[0] if doc else ""
        yield key, [f"`{key}`", _type_name(hint), _format_default(_default(f)), _domain_text(domain_of(f), hint),
                    meaning.replace("|", "\\|")]
        item = _list_item(inner)
        if item is not None and dataclasses.is_dataclass(item):  # a list of sections: data.label_sets
            yield from _rows(item, f"{key}[].")


def schema_rows() -> list[tuple[str, list[str]]]:
    """(dotted key, table cells) of every key: the run's keys, then the reserved keys of ``sweep:``."""
    return list(_rows(RunConfig, "")) + list(_rows(SweepSettings, "sweep."))


def keys_table() -> str:
    """The Markdown table of every config key."""
    header = ["| key | type | default | allowed values | meaning (the schema's comments) |", "|---|---|---|---|---|"]
    return "\n".join(header + ["| " + " | ".join(cells) + " |" for _, cells in schema_rows()]) + "\n"


def registry_tables() -> str:
    """One section per registry: what config key it feeds and its entries' table."""
    return "\n".join(f"### {heading}\n\n{registry.table()}" for registry, heading in REGISTRIES)


def markdown() -> str:
    """The generated part of docs/reference/config.md: every key, then every registry."""
    return (f"## Keys\n\n{len(schema_rows())} keys. Integers without a declared bound lie in "
            f"[-{INT_LIMIT}, {INT_LIMIT}]; every float must be finite.\n\n{keys_table()}\n"
            f"## Registries\n\nThe names the keys above accept, from `fedepic/extensions.py`.\n\n{registry_tables()}")

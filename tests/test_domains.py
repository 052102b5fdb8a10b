"""Every key of the schema, every value its domain refuses: one line naming the key, exit 2, nothing written.

The cases are generated from the schema itself (fedepic/config.py's dataclasses and the domain each
field declares, fedepic/domains.py), so a key added later is covered without anyone remembering to: a
key without a domain fails :func:`test_every_key_declares_a_domain`, and the values tried for it come
from its type and domain (below the low end, above the high end, NaN, +-inf, 1e309, an unknown name,
an empty or too long text, a malformed list item).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Iterator

import pytest

from fedepic.config import RunConfig, SweepSettings
from fedepic.domains import INT_LIMIT, Domain, domain_of
from tests.test_bad_inputs import SMALL, _tree, assert_one_line

# Keys whose domain is "any value of the type" (flags, and what other checks read): the values that
# are still wrong for them, written by hand (each refused by OmegaConf's type check or by validate)
FREE_KEY_VALUES = {
    "data.label_sets": ["[{clients: [-1], labels: [0]}]", "[{clients: [0], labels: [-2]}]", "[{clients: x}]"],
    "variants": ["{x: 1}"],
    "sweep": ["{no_such_key: [1]}"],
    "sweep.zip": ["[[seed]]", "[[seed, no_such_axis]]", "x"],
    "sweep.metrics": ["[no_such_metric]"],
    "sweep.curves": ["[no_such_curve]"],
    "topology.groups": ["{'a-b': [0]}", "{g: []}", "{g: [-1]}", "{g: x}"],
}
SWEEP_CONTEXT = ["sweep.seed=[0]"]  # a sweep with one axis, so that its settings are read
# texts tried against every key with a pattern; each key gets those its pattern refuses
PATTERN_CANDIDATES = ["a/b", "'..'", "/abs", "../up", "a/../b", "cuda:x", "gpu"]


def _leaves(schema: type, prefix: str = "") -> Iterator[tuple[str, Any, dataclasses.Field]]:
    """(dotted key, type hint, field) of every key below ``schema`` (sections walked, not listed)."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        inner = _unwrap(hint)
        if dataclasses.is_dataclass(inner):
            yield from _leaves(inner, f"{prefix}{f.name}.")
            continue
        yield f"{prefix}{f.name}", hint, f
        item = _item(inner)
        if item is not None and dataclasses.is_dataclass(item):  # a list of sections: data.label_sets
            yield from _leaves(item, f"{prefix}{f.name}[].")


def _unwrap(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _item(hint: Any) -> Any:
    return typing.get_args(hint)[0] if typing.get_origin(hint) in (list, typing.List) else None


def all_keys() -> list[tuple[str, Any, dataclasses.Field]]:
    keys = [k for k in _leaves(RunConfig) if k[0] != "sweep"]
    keys += [("sweep", dict, next(f for f in dataclasses.fields(RunConfig) if f.name == "sweep"))]
    return keys + [(f"sweep.{key}", hint, f) for key, hint, f in _leaves(SweepSettings)]


def _scalar_invalid(domain: Domain, scalar: Any) -> list[str]:
    """Values outside ``domain`` for a scalar of type ``scalar`` (as command-line text)."""
    if scalar is bool:
        return ["maybe"]
    if domain.choices is not None:
        return ["no_such_choice"]
    if domain.text:
        values = [] if domain.empty else ["''"]
        values.append("x" * (domain.max_bytes + 1))
        if domain.pattern is not None:  # the candidates the pattern refuses
            values += [v for v in PATTERN_CANDIDATES if not re.fullmatch(domain.pattern, v.strip("'"))]
        return values
    if domain.free:
        return []
    values = ["nan", "inf", "-inf", "1e309", "x"] if scalar is float else ["1.5", "x", "nan"]
    if domain.low is not None:
        values.append(_num(domain.low if domain.open_low else domain.low - 1, scalar))
    else:
        values.append(str(-INT_LIMIT - 1) if scalar is int else None)
    high = domain.high if domain.high is not None else (INT_LIMIT if scalar is int else None)
    if high is not None:
        values.append(_num(high if domain.open_high and domain.high is not None else high + 1, scalar))
    return [v for v in values if v is not None]


def _num(value: float, scalar: Any) -> str:
    return str(int(value)) if scalar is int else repr(float(value))


def invalid_values(key: str, hint: Any, f: dataclasses.Field) -> list[str]:
    if key in FREE_KEY_VALUES:
        return FREE_KEY_VALUES[key]
    domain = domain_of(f)
    inner = _unwrap(hint)
    item = _item(inner)
    if item is None:
        return _scalar_invalid(domain, inner)
    nested = _item(item)
    if nested is not None:  # a list of pairs: topology.edges, attack.flip_map
        return [f"[[{v}, 0]]" for v in _scalar_invalid(domain, nested)]
    return [f"[{v}]" for v in _scalar_invalid(domain, item)]


CASES = [(key, value) for key, hint, f in all_keys() if "[]" not in key for value in invalid_values(key, hint, f)]


def test_every_key_declares_a_domain():
    missing = [key for key, _, f in all_keys() if domain_of(f) is None and key not in FREE_KEY_VALUES
               and not dataclasses.is_dataclass(_unwrap(f.type))]
    assert missing == [], f"keys without a domain (declare one with field(metadata=...)): {missing}"


def test_every_key_gets_an_invalid_value():
    tried = {key for key, _ in CASES}
    untried = [key for key, hint, f in all_keys() if "[]" not in key and key not in tried]
    assert untried == [], f"no invalid value generated for: {untried}"
    assert len(CASES) > 300  # about 110 keys, several values each


def test_non_finite_floats_are_tried_for_every_float_key():
    floats = {key for key, hint, _ in all_keys() if _unwrap(hint) is float or _item(_unwrap(hint)) is float}
    assert floats and all({(k, "nan"), (k, "inf"), (k, "1e309")} <= set(CASES) for k in floats)


@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={v[:20]}" for k, v in CASES])
def test_an_invalid_value_is_one_line_and_writes_nothing(tmp_path: Path, monkeypatch, capsys, data_root,
                                                         key: str, value: str):
    from fedepic.simulate import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDEPIC_DATA", str(data_root))
    monkeypatch.setenv("FEDEPIC_CACHE", str(tmp_path / "cache"))
    before = _tree(tmp_path)
    context = SWEEP_CONTEXT if key.startswith("sweep.") and key != "sweep.seed" else []
    code = main([*SMALL, f"output_dir={tmp_path}/runs", *context, f"{key}={value}"])
    assert_one_line(code, capsys.readouterr().err, [key.split("[")[0]])
    assert _tree(tmp_path) == before, "a refused value wrote files"

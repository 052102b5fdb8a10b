"""Part of a replay: overrides that run fewer of its cells under the same protocol.

A replay's sweep is its members (``strategies:``) times its sweep axes. An override that keeps a
non-empty part of the shipped members (``strategies=[...]``), or of one axis's values
(``sweep.<axis>=[...]``, an axis that is not zipped with another), runs some of the published cells
exactly as shipped and leaves the others out: the comparison then says "missing" for those, and the
cells it has keep their verdict. An override of a key that never changes what a cell computes (where
and how the sweep is written and scheduled: ``fedepic.checkpoint.RESUMABLE_KEYS`` and
``SWEEP_RESUMABLE_KEYS``, e.g. ``sweep.parallel=true`` or ``progress=false``) is neither: the sweep key
ignores it too. Any other override changes the protocol, and the table says so.

This is how a replay that cannot finish in the time a user has ships its reduced version (e.g. one
split of the dumbbell, or two of the bucketing rules) without a second config. Cost: one config load.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import yaml

from fedepic.checkpoint import RESUMABLE_KEYS, SWEEP_RESUMABLE_KEYS
from fedepic.config import load_config
from fedepic.sweep.plan import sweep_section


def shipped_parts(config_path: str, fixed: Sequence[str]) -> tuple[list[str], dict[str, list[Any]], set[str]]:
    """The shipped members, the sweep axes (name -> values) and the names of the zipped axes."""
    cfg = load_config(config_path, list(fixed))
    settings, axes = sweep_section(cfg)
    zipped = {name for group in settings.zip or [] for name in group}
    return list(cfg.strategies), {k: list(v) for k, v in axes.items()}, zipped


def _values(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def _narrows(values: Any, shipped: Sequence[Any]) -> bool:
    """A non-empty list of distinct shipped values."""
    return isinstance(values, list) and bool(values) and len(set(map(repr, values))) == len(values) \
        and all(v in shipped for v in values)


def scheduling_only(key: str) -> bool:
    """True for a key (or a key under a section) that never changes what a sweep cell computes; ``name``
    aside, which names the sweep folder that ``--from`` checks."""
    keys = [k for k in (*RESUMABLE_KEYS, *SWEEP_RESUMABLE_KEYS) if k != "name"]
    return any(key == k or key.startswith(k + ".") for k in keys)


def split_overrides(config_path: str, fixed: Sequence[str], overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(subset, changed): the overrides that only narrow the replay's members or one unzipped sweep axis
    to shipped values, and those that change the protocol; overrides of :func:`scheduling_only` keys are
    in neither."""
    members, axes, zipped = shipped_parts(config_path, fixed)
    subset, changed = [], []
    for item in overrides:
        key, _, text = item.partition("=")
        key = key.lstrip("-")
        values = _values(text)
        if scheduling_only(key):
            continue
        if key == "strategies":
            ok = _narrows(values, members)
        elif key.startswith("sweep.") and key[len("sweep."):] in axes and key[len("sweep."):] not in zipped:
            ok = key != "sweep.seed" and _narrows(values, axes[key[len("sweep."):]])
        else:
            ok = False
        (subset if ok else changed).append(item)
    return subset, changed


def folder_subset(config_path: str, fixed: Sequence[str], folder_strategies: Sequence[str],
                  folder_axes: Mapping[str, Sequence[Any]]) -> list[str]:
    """The narrowing overrides a finished sweep folder ran with, read from its config's members and its
    summary's axes: those that are a proper part of the shipped ones (the seed axis aside)."""
    members, axes, _ = shipped_parts(config_path, fixed)
    out = []
    if list(folder_strategies) != members and _narrows(list(folder_strategies), members):
        out.append(f"strategies={yaml.safe_dump(list(folder_strategies), default_flow_style=True).strip()}")
    for name, values in folder_axes.items():
        if name != "seed" and name in axes and list(values) != axes[name] and _narrows(list(values), axes[name]):
            out.append(f"sweep.{name}={yaml.safe_dump(list(values), default_flow_style=True).strip()}")
    return out

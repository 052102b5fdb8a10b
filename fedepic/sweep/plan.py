"""The cells of a sweep: its axes expanded (zipped axes together), every cell's config validated before
anything runs, and the key that names the sweep folder.

The grid is the product of its dimensions, in the order the axes are given: an axis alone is one
dimension, a ``sweep.zip`` group is one dimension whose axes take their i-th values together. Each
cell is the base config with its axis values set (``fedepic.config.with_values``), checked like a
config given on the command line; the first bad cell is one ConfigError naming the cell, the key and
the value.

The sweep folder is ``output_dir/sweep-<name>-<key>``: ``key`` hashes every cell's resolved config
without the keys that do not change a result (``VOLATILE_KEYS``: where and how it is written and
displayed, and the Ray settings), so running the same sweep again finds its folder, also from another
machine, in parallel or not, while any change to what a cell computes gives a new folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from fedepic.checkpoint import RESUMABLE_KEYS
from fedepic.columns import BY_MODE
from fedepic.config import RunConfig, SweepSettings, sweep_section, values_setter
from fedepic.errors import ConfigError

REPLICATE_AXIS = "seed"  # the cells that differ only in it are replicates: mean +- s.e. over them
# the key that lists the members a run compares, per mode: its axis folds into the member column
MEMBER_KEYS = {"centralized": "defense.compare", "federated": "strategies", "decentralized": "strategies"}
VOLATILE_KEYS = (*RESUMABLE_KEYS, "ray")
CELL_NAME_LENGTH = 80


@dataclass(frozen=True)
class Cell:
    """One run of the grid: ``values`` (axis key -> value) set on the base config give ``config``;
    ``name`` is its folder under ``cells/`` and its run name."""

    index: int
    name: str
    values: dict[str, Any]
    config: RunConfig

    def describe(self) -> str:
        """``key=value, ...``: the cell in messages."""
        return ", ".join(f"{k}={label(v)}" for k, v in self.values.items())


@dataclass
class SweepPlan:
    """A validated sweep: its config as given, the base of its cells (that config without ``sweep``),
    its settings, axes and cells."""

    config: RunConfig
    base: RunConfig
    settings: SweepSettings
    axes: dict[str, list]
    zips: list[list[str]]
    cells: list[Cell]
    key: str

    @property
    def folder_name(self) -> str:
        return f"sweep-{self.base.name}-{self.key}"

    @property
    def member_axis(self) -> str | None:
        """The axis over the mode's member list, if swept: its values become the member column."""
        key = MEMBER_KEYS[self.base.mode]
        return key if key in self.axes else None

    @property
    def row_axes(self) -> list[str]:
        """The axes that tell the rows of a table apart: all but the seed and the member axis."""
        return [a for a in self.axes if a not in (REPLICATE_AXIS, self.member_axis)]


def label(value: Any) -> str:
    """A value as tables and folder names show it: lists joined by "+", mappings as k=v."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return "+".join(label(v) for v in value) if value else "[]"
    if isinstance(value, dict):
        return ",".join(f"{k}={label(v)}" for k, v in value.items())
    return str(value)


def plan_sweep(cfg: RunConfig) -> SweepPlan:
    """Expand and validate ``cfg``'s sweep; a ConfigError (one line) names the first bad cell."""
    settings, axes = sweep_section(cfg)
    if not axes:
        raise ConfigError("invalid value {} for key 'sweep': the config has no sweep axes")
    _check_measures(settings, cfg.mode)
    base = dataclasses.replace(cfg, sweep={})
    combos = list(grid(axes, settings.zip))
    width = max(3, len(str(len(combos) - 1)))
    setter = values_setter(base)
    cells = [_cell(base, setter, settings, i, values, len(combos), width) for i, values in enumerate(combos)]
    digests = [result_digest(c.config) for c in cells]
    _check_distinct(cells, digests)
    plan = SweepPlan(cfg, base, settings, axes, [list(g) for g in settings.zip], cells,
                     hashlib.sha256("".join(digests).encode()).hexdigest()[:10])
    _check_members(plan)
    return plan


def _check_measures(settings: SweepSettings, mode: str) -> None:
    """``sweep.metrics`` must name columns of the mode's comparison, ``sweep.curves`` measures its members
    log per round (fedepic.columns): a typo would otherwise run the whole grid into an empty table."""
    known = BY_MODE[mode]
    allowed = {"sweep.metrics": [c for c in known.columns[1:] if not c.endswith("_se")],
               "sweep.curves": list(known.series)}
    for key, names in (("sweep.metrics", settings.metrics), ("sweep.curves", settings.curves)):
        for name in names or []:
            if name not in allowed[key]:
                raise ConfigError(f"invalid value {name!r} for key '{key}': a {mode} run has "
                                  f"{', '.join(allowed[key])}")


def grid(axes: Mapping[str, list], zips: Sequence[Sequence[str]]) -> Iterator[dict[str, Any]]:
    """Every combination of the axes' values (axis key -> value), the first axis varying slowest; the
    axes of a zip group take their i-th values together."""
    group_of = {name: tuple(group) for group in zips for name in group}
    dimensions: list[list[dict[str, Any]]] = []
    for name in axes:
        group = group_of.get(name, (name,))
        if name != group[0]:
            continue  # a zipped axis: its values were taken with the group's first axis
        dimensions.append([{k: axes[k][i] for k in group} for i in range(len(axes[name]))])
    for combo in itertools.product(*dimensions):
        values: dict[str, Any] = {}
        for part in combo:
            values.update(part)
        yield {k: values[k] for k in axes}


def result_digest(cfg: RunConfig) -> str:
    """sha256 of what ``cfg`` computes: its resolved keys without ``VOLATILE_KEYS``."""
    data = dataclasses.asdict(cfg)
    for key in VOLATILE_KEYS:
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _cell(base: RunConfig, with_values: Callable[[Mapping[str, Any]], RunConfig], settings: SweepSettings,
          index: int, values: dict[str, Any], total: int, width: int) -> Cell:
    name = f"{index:0{width}d}-" + re.sub(r"[^A-Za-z0-9._+=-]", "_", "-".join(label(v) for v in values.values()))
    draft = Cell(index, name[:CELL_NAME_LENGTH], values, base)
    where = f"sweep cell {index + 1} of {total} ({draft.describe()})"
    try:
        config = with_values(values)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    if settings.parallel and config.mode != "centralized" and config.engine == "ray":
        raise ConfigError(f"{where}: invalid value 'ray' for key 'engine': a parallel sweep runs each cell in a Ray "
                          "task, which cannot host the cell's own Flower simulation; set engine=local, or "
                          "sweep.parallel=false to run the cells one at a time in this process")
    # the cell's threads are part of its config, so its numbers do not depend on where it runs
    threads = config.train.threads or max(1, int(settings.cell_cpus))
    config = dataclasses.replace(config, name=draft.name,
                                 figures=dataclasses.replace(config.figures, enabled=settings.cell_figures),
                                 train=dataclasses.replace(config.train, threads=threads))
    return dataclasses.replace(draft, config=config)


def _check_distinct(cells: Sequence[Cell], digests: Sequence[str]) -> None:
    seen: dict[str, Cell] = {}
    for cell, digest in zip(cells, digests):
        if digest in seen:
            first = seen[digest]
            raise ConfigError(f"invalid value for key 'sweep': cells {first.index + 1} ({first.describe()}) and "
                              f"{cell.index + 1} ({cell.describe()}) are the same run; an axis repeats a value")
        seen[digest] = cell


def cell_members(cfg: RunConfig) -> list[str]:
    """The members a cell's run compares (its sub-folders and comparison rows)."""
    if cfg.mode == "centralized":
        from fedepic.centralized import defense_members  # torch: only centralized sweeps need it here

        return defense_members(cfg)
    return list(cfg.strategies)


def _check_members(plan: SweepPlan) -> None:
    """Two cells that differ only in the member axis must not run a member of the same name: the
    tables would hold two values for one seed."""
    if plan.member_axis is None:
        return
    owner: dict[tuple, Cell] = {}
    for cell in plan.cells:
        setting = tuple(label(cell.values[a]) for a in plan.axes if a != plan.member_axis)
        for member in cell_members(cell.config):
            first = owner.setdefault((setting, member), cell)
            if first is not cell:
                raise ConfigError(f"invalid value for key 'sweep.{plan.member_axis}': cells {first.index + 1} and "
                                  f"{cell.index + 1} both run member {member!r} ({cell.describe()}); list each "
                                  "member in one value only")

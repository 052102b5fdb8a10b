"""The numbers of a sweep: for every metric, the mean, standard error and count over seeds of each
(setting, member), from the completed cells' own summaries and metrics; and the best member per row.

A *setting* is a cell's values on the row axes (every axis but the seed and the member axis,
fedepic.sweep.plan); a *member* is a row of a cell's comparison (a strategy or defense). The values of
one (setting, member) over the seeds give ``Stat``: mean, standard error = sample std (ddof 1) /
sqrt(n), and n; with n = 1 the standard error is None (no spread was measured). A value a cell does not
have (null in its summary: a detector figure of a rule without one, a diverged model) is left out, and
n counts the values present. Reading files is the callers' (``CellData``); nothing here draws or writes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from fedepic.metrics import mean_and_se
from fedepic.quantities import HIGHER, LOWER, quantity
from fedepic.sweep.plan import label


@dataclass(frozen=True)
class Stat:
    """One (setting, member)'s values over seeds."""

    mean: float
    se: Optional[float]
    n: int
    seeds: tuple = ()

    @classmethod
    def of(cls, values: Sequence[float], seeds: Sequence[Any] = ()) -> "Stat":
        mean, se = mean_and_se(list(values))
        return cls(mean, None if math.isnan(se) else se, len(values), tuple(seeds))


@dataclass
class CellData:
    """A completed cell as aggregation reads it: its axis values, seed, root summary and folder."""

    values: dict[str, Any]
    seed: Any
    summary: dict[str, Any]
    folder: Path

    @property
    def member_key(self) -> str:
        return self.summary["comparison"]["columns"][0]

    def rows(self) -> list[dict[str, Any]]:
        return list(self.summary.get("rows", []))

    def records(self, member: str) -> list[dict[str, Any]]:
        """The member's metrics.jsonl records."""
        path = self.folder / member / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


@dataclass
class Table:
    """One metric over the grid: ``stats[(row, member)]``, rows in grid order, members as first seen."""

    metric: str
    row_axes: list[str]
    rows: list[tuple[str, ...]] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    stats: dict[tuple[tuple[str, ...], str], Stat] = field(default_factory=dict)

    @property
    def direction(self) -> int:
        return direction(self.metric)

    @property
    def percent(self) -> bool:
        return is_fraction(self.metric)

    def best(self, row: tuple[str, ...]) -> set[str]:
        """The members with the best mean in ``row`` (ties: all of them); none without a direction,
        with fewer than two members to compare, or when every member ties (nothing stands out)."""
        means = {m: s.mean for (r, m), s in self.stats.items() if r == row and not math.isnan(s.mean)}
        if not self.direction or len(means) < 2:
            return set()
        top = max(means.values()) if self.direction > 0 else min(means.values())
        best = {m for m, v in means.items() if math.isclose(v, top, rel_tol=0, abs_tol=1e-12)}
        return best if len(best) < len(means) else set()

    def records(self) -> list[dict[str, Any]]:
        """One dict per (row, member): the row axes' labels, the member, mean, se, n, seeds."""
        out = []
        for row in self.rows:
            for member in self.members:
                stat = self.stats.get((row, member))
                if stat is not None:
                    out.append({**dict(zip(self.row_axes, row)), "member": member, "mean": stat.mean,
                                "se": stat.se, "n": stat.n, "seeds": list(stat.seeds)})
        return out


@dataclass
class CurveSet:
    """One per-round metric: ``panels[row][member]`` is a list of (x, Stat) over the evaluated x."""

    metric: str
    xlabel: str
    row_axes: list[str]
    panels: dict[tuple[str, ...], dict[str, list[tuple[float, Stat]]]] = field(default_factory=dict)


def direction(metric: str) -> int:
    """+1 when higher is better, -1 when lower is, 0 when neither (fedepic.quantities)."""
    return {HIGHER: 1, LOWER: -1}.get(quantity(metric).better, 0)


def is_fraction(metric: str) -> bool:
    """A share in [0, 1], shown in percent (fedepic.quantities)."""
    return quantity(metric).unit == "%"


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
        return None
    return float(value)


def table_metrics(cells: Sequence[CellData]) -> list[str]:
    """The numeric columns of the cells' comparisons (not the member, not a ``*_se`` column), in order."""
    names: list[str] = []
    for cell in cells:
        for column in cell.summary["comparison"]["columns"][1:]:
            if column not in names and not column.endswith("_se") and \
                    any(_number(row.get(column)) is not None for row in cell.rows()):
                names.append(column)
    return names


def curve_metrics(cells: Sequence[CellData]) -> list[str]:
    """The mode's comparison panels (the per-round metrics its plots show)."""
    names: list[str] = []
    for cell in cells:
        names += [p for p in cell.summary["comparison"]["panels"] if p not in names]
    return names


def row_of(cell: CellData, row_axes: Sequence[str]) -> tuple[str, ...]:
    return tuple(label(cell.values[a]) for a in row_axes)


def tables(cells: Sequence[CellData], row_axes: Sequence[str], metrics: Iterable[str]) -> list[Table]:
    """One :class:`Table` per metric over the completed ``cells`` (in grid order)."""
    out = []
    for metric in metrics:
        table = Table(metric, list(row_axes))
        values: dict[tuple[tuple[str, ...], str], list[tuple[Any, float]]] = {}
        for cell in cells:
            row = row_of(cell, row_axes)
            for entry in cell.rows():
                member, value = str(entry[cell.member_key]), _number(entry.get(metric))
                if value is None:
                    continue
                _remember(table.rows, row)
                _remember(table.members, member)
                values.setdefault((row, member), []).append((cell.seed, value))
        table.stats = {k: Stat.of([v for _, v in pairs], [s for s, _ in pairs]) for k, pairs in values.items()}
        out.append(table)
    return out


def curves(cells: Sequence[CellData], row_axes: Sequence[str], metrics: Iterable[str]) -> list[CurveSet]:
    """One :class:`CurveSet` per metric: per setting and member, the mean +- s.e. over seeds at every x
    (``comparison.xlabel``: round or epoch). Within one cell, records at the same x (a centralized
    run's trials) are averaged first."""
    out = []
    per_cell = [(cell, {m: cell.records(m) for m in _members(cell)}) for cell in cells]
    for metric in metrics:
        xlabel = cells[0].summary["comparison"]["xlabel"] if cells else "round"
        curve = CurveSet(metric, xlabel, list(row_axes))
        points: dict[tuple[tuple[str, ...], str], dict[float, list[tuple[Any, float]]]] = {}
        for cell, records in per_cell:
            for member, recs in records.items():
                for x, value in _cell_points(recs, metric, xlabel).items():
                    points.setdefault((row_of(cell, row_axes), member), {}).setdefault(x, []).append((cell.seed, value))
        for (row, member), by_x in points.items():
            curve.panels.setdefault(row, {})[member] = [
                (x, Stat.of([v for _, v in pairs], [s for s, _ in pairs])) for x, pairs in sorted(by_x.items())]
        if curve.panels:
            out.append(curve)
    return out


def _members(cell: CellData) -> list[str]:
    return [str(row[cell.member_key]) for row in cell.rows()]


def _cell_points(records: Sequence[Mapping[str, Any]], metric: str, xlabel: str) -> dict[float, float]:
    sums: dict[float, list[float]] = {}
    for record in records:
        x, value = _number(record.get(xlabel)), _number(record.get(metric))
        if x is not None and value is not None:
            sums.setdefault(x, []).append(value)
    return {x: sum(v) / len(v) for x, v in sums.items()}


def _remember(items: list, item: Any) -> None:
    if item not in items:
        items.append(item)

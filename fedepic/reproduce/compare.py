"""A replay's published cells beside fedepic's figures read from a finished sweep folder.

For every published cell (``fedepic.reproduce.published``) of a replay (``fedepic.reproduce.replays``):
the completed sweep cells whose axis values match the cell's mapping, one value per seed (the column
``metric`` of the comparison row ``member`` in each cell's summary.json, times ``scale``); their mean
and sample std (ddof 1; None for one seed); and the verdict, fedepic issue 33's rule:

    within   |mean - published| <= tolerance,  tolerance = published std + 2 points
             (3 points where the published figure has one seed; a replay may set its own points)
    outside  otherwise
    missing  no value: what fedepic lacks (the mapping's ``needs``), or why the run folder has none
    not comparable  a value, but the replay's protocol cannot reproduce the paper's (``comparable``)

Example (one seed at 91.0 against a one-seed figure of 93.65: tolerance 3, within)::

    >>> from fedepic.reproduce.published import PublishedCell
    >>> cell = PublishedCell("x", {"split": "iid"}, 93.65, (0,), None, None, None)
    >>> verdict(cell, [91.0], 2.0, 3.0, None)
    ('within', 3.0)
    >>> verdict(cell, [90.0, 90.5], 2.0, 3.0, None)
    ('outside', 3.0)

Reading is all it does; nothing here writes (``fedepic.reproduce.output``).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from fedepic.errors import ConfigError
from fedepic.reproduce.published import PublishedCell
from fedepic.reproduce.replays import CellMap, Replay
from fedepic.sweep.plan import label


@dataclass(frozen=True)
class SweepCell:
    """One cell of a sweep folder as its summary.json lists it, with its own summary's rows."""

    values: dict[str, Any]
    status: str
    error: Optional[str]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seed(self) -> Any:
        return self.values.get("seed")


@dataclass
class CellResult:
    """One line of the reproduction table."""

    key: dict[str, str]
    published: float
    published_seeds: list[int]
    published_std: Optional[float]
    member: str
    metric: str
    values: dict[str, Any]
    tolerance: float
    verdict: str  # within | outside | missing | not comparable
    mean: Optional[float] = None
    std: Optional[float] = None
    seeds: list[Any] = field(default_factory=list)
    per_seed: list[float] = field(default_factory=list)
    reason: Optional[str] = None

    @property
    def difference(self) -> Optional[float]:
        return None if self.mean is None else self.mean - self.published

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "difference": self.difference}


def read_sweep(folder: Path) -> tuple[dict[str, Any], list[SweepCell]]:
    """The sweep folder's summary and its cells; a folder that is not a sweep's is a ConfigError."""
    path = Path(folder) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"invalid value '{folder}' for --from: cannot read {path.name} ({err})") from None
    if not isinstance(summary, dict) or summary.get("kind") != "sweep":
        raise ConfigError(f"invalid value '{folder}' for --from: not a sweep folder (summary.json kind is not 'sweep')")
    cells = []
    for entry in summary.get("cells", []):
        rows: list[dict[str, Any]] = []
        if entry.get("status") == "completed" and entry.get("folder"):
            try:
                rows = json.loads((Path(folder) / entry["folder"] / "summary.json").read_text()).get("rows", [])
            except (OSError, ValueError):
                rows = []
        cells.append(SweepCell(dict(entry.get("values", {})), str(entry.get("status")), entry.get("error"), rows))
    return summary, cells


def matches(cell: SweepCell, wanted: Mapping[str, Any]) -> bool:
    """Whether ``cell``'s axis values include ``wanted`` (compared as tables show them; an axis the
    sweep does not have cannot match)."""
    return all(k in cell.values and label(cell.values[k]) == label(v) for k, v in wanted.items())


def _value(cell: SweepCell, member: str, metric: str) -> Optional[float]:
    for row in cell.rows:
        name = row.get("strategy", row.get("defense"))
        if str(name) == member:
            value = row.get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return float(value)
    return None


def verdict(cell: PublishedCell, values: Sequence[float], points: float, single_seed_points: float,
            comparable: Optional[str]) -> tuple[str, float]:
    """(verdict, tolerance) of fedepic's per-seed ``values`` against ``cell`` (module docstring)."""
    tolerance = cell.tolerance(points, single_seed_points)
    if not values:
        return "missing", tolerance
    if comparable is not None:
        return "not comparable", tolerance
    return ("within" if abs(statistics.fmean(values) - cell.value) <= tolerance else "outside"), tolerance


def compare_cell(replay: Replay, cell: PublishedCell, sweep: Sequence[SweepCell]) -> CellResult:
    """One published cell against the sweep's cells."""
    mapping: CellMap = replay.map_cell(cell.key)
    matching = [c for c in sweep if matches(c, mapping.values)]
    found = [(c.seed, v) for c in matching if c.status == "completed"
             and (v := _value(c, mapping.member, mapping.metric)) is not None]
    values = [v * mapping.scale for _, v in found]
    result, tolerance = verdict(cell, values, replay.points, replay.single_seed_points, replay.comparable)
    out = CellResult(dict(cell.key), cell.value, list(cell.seeds), cell.std, mapping.member, mapping.metric,
                     dict(mapping.values), tolerance, result, seeds=[s for s, _ in found], per_seed=values)
    if values:
        out.mean = statistics.fmean(values)
        out.std = statistics.stdev(values) if len(values) > 1 else None
        out.reason = replay.comparable
        if len(values) < len(matching):
            out.reason = "; ".join(filter(None, [out.reason, _missing_seeds(matching, mapping)]))
    else:
        out.reason = _why_missing(mapping, matching)
    return out


def _missing_seeds(matching: Sequence[SweepCell], mapping: CellMap) -> str:
    lost = [f"seed {c.seed}: {c.status}{f' ({c.error})' if c.error else ''}" for c in matching
            if c.status != "completed" or _value(c, mapping.member, mapping.metric) is None]
    return "mean over fewer seeds than ran: " + ", ".join(lost)


def _why_missing(mapping: CellMap, matching: Sequence[SweepCell]) -> str:
    if mapping.needs:
        return f"fedepic cannot run it yet: needs {mapping.needs}"
    if not matching:
        wanted = ", ".join(f"{k}={label(v)}" for k, v in mapping.values.items())
        return f"the run folder has no sweep cell with {wanted or 'any values'}"
    failed = [c for c in matching if c.status != "completed"]
    if failed:
        return "; ".join(f"seed {c.seed}: {c.status}{f' ({c.error})' if c.error else ''}" for c in failed)
    return f"no {mapping.metric} of member {mapping.member!r} in the matching cells"


def compare(replay: Replay, cells: Sequence[PublishedCell], sweep: Sequence[SweepCell]) -> list[CellResult]:
    """Every published cell of the replay, in published order."""
    return [compare_cell(replay, cell, sweep) for cell in cells]

"""The files of a sweep's aggregates (fedepic.sweep.aggregate), in its folder:

- ``tables/<metric>.md``, the paper-ready table: one row per setting, one column per member, each cell
  "mean ± s.e." over seeds (shares in percent), the number of seeds in the caption (and beside a cell
  whose n differs), the best member of each row in bold; ``tables.md`` holds every metric's table;
- ``tables/<metric>.csv``, for analysis: one line per (setting, member) with the setting's axes, the
  member, mean, se, n and the seeds, raw (shares as fractions);
- ``figures/heatmap-<metric>.png``: settings x members, coloured by the mean, best per row in bold;
- ``figures/curves-<metric>.png``: per setting a panel, per member its mean per round with a band of
  +- one standard error (none where n = 1).

PNG at 120 dpi (RunWriter.save_figure).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Optional, Sequence

from fedepic.config import RunConfig
from fedepic.outputs import RunWriter, csv_table
from fedepic.sweep.aggregate import CurveSet, Stat, Table, is_fraction


def setting_text(cfg: RunConfig) -> str:
    """What every cell shares, in one line: the name, mode, data, size and length of the runs."""
    if cfg.mode == "decentralized":
        return (f"{cfg.name}: decentralized ({cfg.decentralized.algorithm}), {cfg.data.name}, {cfg.clients.count} "
                f"nodes, {cfg.rounds} rounds, engine {cfg.engine}")
    if cfg.mode == "federated":
        return (f"{cfg.name}: federated ({cfg.server.protocol}), {cfg.data.name}, {cfg.clients.count} clients, "
                f"{cfg.rounds} rounds, engine {cfg.engine}")
    return f"{cfg.name}: centralized, {cfg.data.name}, {cfg.model.name}, {cfg.train.epochs} epochs"


def write_report(writer: RunWriter, tables: Sequence[Table], curve_sets: Sequence[CurveSet],
                 setting: str) -> dict[str, list[str]]:
    """Write every table and figure (module docstring); returns their paths in the folder."""
    written: dict[str, list[str]] = {"tables": [], "figures": []}
    documents = []
    for table in tables:
        stem = _stem(table.metric)
        documents.append(markdown(table, setting))
        writer.write_text(f"tables/{stem}.md", documents[-1])
        writer.write_text(f"tables/{stem}.csv", csv_table(table.records(),
                                                          [*table.row_axes, "member", "mean", "se", "n", "seeds"]))
        written["tables"] += [f"tables/{stem}.md", f"tables/{stem}.csv"]
        if table.stats:
            written["figures"].append(_save(writer, heatmap(table, setting), f"figures/heatmap-{stem}.png"))
    writer.write_text("tables.md", "\n".join(documents))
    written["tables"].append("tables.md")
    for curve in curve_sets:
        written["figures"].append(_save(writer, band_curves(curve, setting), f"figures/curves-{_stem(curve.metric)}.png"))
    return written


def _save(writer: RunWriter, fig: Any, name: str) -> str:
    from fedepic.plots import close

    try:
        writer.save_figure(fig, name)
    finally:
        close(fig)
    return name


def _stem(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", metric)


def _unit(metric: str) -> str:
    return f"{metric} (%)" if is_fraction(metric) else metric


def common_n(stats: Sequence[Stat]) -> int:
    """The most frequent number of seeds (a caption states it once)."""
    return Counter(s.n for s in stats).most_common(1)[0][0] if stats else 0


def format_stat(stat: Stat, percent: bool, usual_n: Optional[int] = None) -> str:
    """``mean ± se`` (no ± for n = 1), shares in percent; ``(n=k)`` when k differs from ``usual_n``."""
    scale = 100.0 if percent else 1.0
    mean = f"{scale * stat.mean:.1f}" if percent else f"{stat.mean:.4g}"
    text = mean if stat.se is None else f"{mean} ± {scale * stat.se:.1f}" if percent else f"{mean} ± {stat.se:.2g}"
    return text if stat.n == usual_n else f"{text} (n={stat.n})"


def _caption(table: Table, usual_n: int) -> str:
    seeds = sorted({s for stat in table.stats.values() for s in stat.seeds if s is not None})
    over = f"n = {usual_n} seeds ({', '.join(map(str, seeds))})" if usual_n > 1 else \
        "one seed (n = 1): no standard error"
    varies = "; n beside a cell where it differs" if any(s.n != usual_n for s in table.stats.values()) else ""
    best = {1: "; **bold**: the best member of each row (higher is better; none where all tie)",
            -1: "; **bold**: the best member of each row (lower is better; none where all tie)", 0: ""}[table.direction]
    return f"Mean ± standard error over {over}{varies}{best}."


def marked(table: Table, row: tuple[str, ...], usual_n: int) -> set[str]:
    """The members shown as best in ``row``: every one whose shown mean equals the best mean as shown
    (a reader sees 56.8 and 56.8: both or neither), none when that is every member."""
    best = table.best(row)
    if not best:
        return set()
    shown = {m: format_stat(s, table.percent, usual_n).split(" ")[0] for (r, m), s in table.stats.items() if r == row}
    top = shown[next(iter(best))]
    tied = {m for m, text in shown.items() if text == top}
    return tied if len(tied) < len(shown) else set()


def markdown(table: Table, setting: str) -> str:
    """The paper-ready table of one metric (module docstring)."""
    usual_n = common_n(list(table.stats.values()))
    lines = [f"## {_unit(table.metric)}", "", setting + ".", _caption(table, usual_n), ""]
    head = [*(table.row_axes or ["setting"]), *table.members]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in table.rows:
        best = marked(table, row, usual_n)
        cells = []
        for member in table.members:
            stat = table.stats.get((row, member))
            text = "" if stat is None else format_stat(stat, table.percent, usual_n)
            cells.append(f"**{text}**" if member in best else text)
        lines.append("| " + " | ".join([*(row or ("all",)), *cells]) + " |")
    return "\n".join(lines) + "\n"


def heatmap(table: Table, setting: str):
    """settings x members of one metric's means (fedepic.plots.heatmap_figure)."""
    from fedepic.plots import heatmap_figure

    usual_n = common_n(list(table.stats.values()))
    scale = 100.0 if table.percent else 1.0
    values, notes, bold = [], [], set()
    for i, row in enumerate(table.rows):
        best = marked(table, row, usual_n)
        stats = [table.stats.get((row, m)) for m in table.members]
        values.append([math.nan if s is None else scale * s.mean for s in stats])
        notes.append(["" if s is None else format_stat(s, table.percent, usual_n) for s in stats])
        bold |= {(i, j) for j, m in enumerate(table.members) if m in best}
    over = f"mean over {usual_n} seeds" if usual_n > 1 else "one seed"
    return heatmap_figure(values, [", ".join(r) or "all" for r in table.rows], table.members, notes,
                          title=f"{setting}\n{_unit(table.metric)}: {over}; bold: best per row",
                          value_label=_unit(table.metric), ylabel=", ".join(table.row_axes),
                          marked=bold, higher_is_better=table.direction >= 0)


def band_curves(curve: CurveSet, setting: str):
    """One panel per setting of a per-round metric, mean +- s.e. per member (fedepic.plots.band_curves_figure)."""
    from fedepic.plots import band_curves_figure

    scale = 100.0 if is_fraction(curve.metric) else 1.0
    panels = {}
    for row, lines in curve.panels.items():
        name = ", ".join(f"{a}={v}" for a, v in zip(curve.row_axes, row)) or "all settings"
        panels[name] = {member: ([x for x, _ in points], [scale * s.mean for _, s in points],
                                 [None if s.se is None else scale * s.se for _, s in points])
                        for member, points in lines.items()}
    ns = sorted({s.n for lines in curve.panels.values() for points in lines.values() for _, s in points})
    over = f"n = {ns[0]} seeds" if len(ns) == 1 else f"n = {ns[0]}-{ns[-1]} seeds"
    return band_curves_figure(panels, xlabel=curve.xlabel, ylabel=_unit(curve.metric),
                              title=f"{setting}\n{_unit(curve.metric)}: mean, band ± 1 s.e. over {over} "
                                    "(no band where n = 1)")

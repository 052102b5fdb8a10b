"""The files of a sweep's aggregates (fedepic.sweep.aggregate), in its folder:

- ``tables/<metric>.md``, the paper-ready table: one row per setting, one column per member, each cell
  "mean ± s.e." over seeds (shares in percent), the number of seeds in the caption (and beside a cell
  whose n differs), the best member of each row in bold; ``tables.md`` holds every metric's table;
- ``tables/<metric>.csv``, for analysis: one line per (setting, member) with the setting's axes, the
  member, mean, se, n and the seeds, raw (shares as fractions);
- ``figures/heatmap-<metric>.png``: settings x members, coloured by the mean, best per row in bold;
- ``figures/curves-<metric>.png``: per setting a panel, per member its mean per round with a band of
  +- one standard error (none where n = 1).

Figures are drawn with the run figures' primitives and style (fedepic.plots: every member keeps one
line style across the sweep's figures) and saved as PNG at ``figures.dpi`` plus ``figures.vector``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Optional, Sequence

from fedepic.config import FiguresConfig, RunConfig
from fedepic.outputs import RunWriter, csv_table
from fedepic.quantities import axis_label, quantity
from fedepic.report import best_effort
from fedepic.sweep.aggregate import CurveSet, Stat, Table


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
                 setting: str, figures: FiguresConfig) -> dict[str, list[str]]:
    """Write every table, then every figure (module docstring); returns their paths in the folder (the
    PNGs; each has its vector copy beside it). The numbers come first: a figure that cannot be drawn
    is a warning line on stderr (fedepic.report.best_effort) and leaves the tables and the sweep's
    status as they are. ``figures.enabled=false`` draws none."""
    written: dict[str, list[str]] = {"tables": [], "figures": []}
    documents = []
    for table in tables:
        stem = file_stem(table.metric)
        documents.append(markdown(table, setting))
        writer.write_text(f"tables/{stem}.md", documents[-1])
        writer.write_text(f"tables/{stem}.csv", csv_table(table.records(),
                                                          [*table.row_axes, "member", "mean", "se", "n", "seeds"]))
        written["tables"] += [f"tables/{stem}.md", f"tables/{stem}.csv"]
    writer.write_text("tables.md", "\n".join(documents))
    written["tables"].append("tables.md")
    if not figures.enabled:
        return written
    members = list(dict.fromkeys(m for t in tables for m in t.members))
    members += [m for c in curve_sets for lines in c.panels.values() for m in lines if m not in members]
    drawings = [(f"figures/heatmap-{file_stem(t.metric)}", lambda t=t: heatmap(t, setting)) for t in tables if t.stats]
    drawings += [(f"figures/curves-{file_stem(c.metric)}", lambda c=c: band_curves(c, setting, members))
                 for c in curve_sets]
    for stem, draw in drawings:
        if best_effort(f"sweep figure {stem}", lambda: _save(writer, draw(), stem, figures)):
            written["figures"].append(f"{stem}.png")
    return written


def _save(writer: RunWriter, fig: Any, stem: str, figures: FiguresConfig) -> None:
    from fedepic.plots import close, save_figure

    try:
        save_figure(writer, fig, stem, figures.dpi, figures.vector)
    finally:
        close(fig)


def file_stem(metric: str) -> str:
    """``metric`` as a file name's stem (tables/<stem>.md, figures/heatmap-<stem>.png)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", metric)


def _unit(metric: str) -> str:
    """The metric as a reader knows it, with its unit: "mean accuracy of benign nodes (%)"."""
    return axis_label(metric)


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
    if not table.stats:
        return "No completed cell has a value of this metric."
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
    """settings x members of one metric's means (fedepic.plots.heatmap_figure), each cell "mean ± s.e.",
    the best of each row in bold, the bright end of the colours the better one."""
    from fedepic.plots import heatmap_figure

    usual_n = common_n(list(table.stats.values()))
    scale = quantity(table.metric).scale
    values, notes, bold = [], [], set()
    for i, row in enumerate(table.rows):
        best = marked(table, row, usual_n)
        stats = [table.stats.get((row, m)) for m in table.members]
        values.append([math.nan if s is None else scale * s.mean for s in stats])
        notes.append(["" if s is None else format_stat(s, table.percent, usual_n) for s in stats])
        bold |= {(i, j) for j, m in enumerate(table.members) if m in best}
    over = f"mean ± s.e. over {usual_n} seeds" if usual_n > 1 else "one seed"
    return heatmap_figure(values, [", ".join(r) or "all" for r in table.rows], table.members,
                          f"{_unit(table.metric)}: {over}; bold: best per row\n{setting}",
                          quantity(table.metric).unit or "value",  # the title names the metric; a long bar label would be cut
                          row_title=", ".join(table.row_axes), col_title="member", texts=notes,
                          bold=frozenset(bold), lower_is_better=table.direction < 0)


def band_curves(curve: CurveSet, setting: str, members: Sequence[str]):
    """One panel per setting of a per-round metric, mean ± s.e. per member, each member in its sweep-wide
    style (fedepic.plots.panel_grid_figure, its panels named by the settings)."""
    from dataclasses import replace

    from fedepic.plots import SE_SUFFIX, X_SUFFIX, member_styles, panel_grid_figure

    per_member: dict[str, dict[str, list]] = {}
    quantities = {}
    for row, lines in curve.panels.items():
        name = ", ".join(f"{a}={v}" for a, v in zip(curve.row_axes, row)) or "all settings"
        quantities[name] = replace(quantity(curve.metric), label=name)
        for member, points in lines.items():
            series = per_member.setdefault(member, {})
            series[name] = [s.mean for _, s in points]
            series[name + X_SUFFIX] = [x for x, _ in points]
            if any(s.se is not None for _, s in points):  # no band where n = 1
                series[name + SE_SUFFIX] = [s.se for _, s in points]
    ns = sorted({s.n for lines in curve.panels.values() for points in lines.values() for _, s in points})
    over = f"n = {ns[0]} seeds" if len(ns) == 1 else f"n = {ns[0]}-{ns[-1]} seeds"
    order = [m for m in members if m in per_member]
    return panel_grid_figure({m: per_member[m] for m in order}, list(quantities), curve.xlabel,
                             f"{_unit(curve.metric)}: mean, band ± 1 s.e. over {over} (no band where n = 1)\n"
                             f"{setting}", member_styles(list(members)), quantities=quantities)

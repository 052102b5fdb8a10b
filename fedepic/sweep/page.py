"""report.html of a sweep folder: the grid on one self-contained page, built from the folder's own files
with the run report's parts (fedepic.html_report: the same template, the same offline rules).

It shows the setting and the sweep's status (cells that failed or were cut short are named first),
what the grid varies, for every aggregated metric the paper-ready table (one row per setting, one
column per member, "mean ± s.e." over seeds, the best of each row in bold, as ``tables/<metric>.md``)
with its heatmap and its per-round curves, every cell with its axis values, status, time and a link
to its own report, the resolved config, the versions and the lock's hash, and the wall time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

from fedepic.html_report import (
    REPORT, Cell, Page, Section, Table, config_section, embed_figure, environment_section, link, render_page,
)
from fedepic.outputs import RunWriter
from fedepic.quantities import axis_label, with_unit
from fedepic.sweep.aggregate import Stat
from fedepic.sweep.aggregate import Table as Aggregate
from fedepic.sweep.report import common_n, file_stem, format_stat, marked


def write_sweep_report(writer: RunWriter) -> None:
    """report.html of the sweep folder ``writer.dir`` (:func:`sweep_page`), written atomically."""
    writer.write_text(REPORT, render_page(sweep_page(writer.dir)))


def sweep_page(folder: Path) -> Page:
    """The report of a sweep folder, from its summary.json, config.yaml and figures."""
    summary = json.loads((folder / "summary.json").read_text())
    config = (folder / "config.yaml").read_text() if (folder / "config.yaml").is_file() else ""
    cells = summary.get("cells", [])
    page = Page(f"sweep {summary.get('setting') or summary.get('name', folder.name)}", str(summary.get("status")),
                _facts(summary), [_lead(summary)], _notes(cells))
    metrics = [m for m in summary.get("metrics", []) if (summary.get("aggregates") or {}).get(m)]
    page.sections = [Section("Aggregates", [
        "Every completed cell's summary, over the seeds: mean ± standard error (sample standard deviation / "
        "sqrt(n)), n beside a cell where it differs from the usual; bold: the best member of each row."],
        subsections=[_metric_section(folder, summary, m) for m in metrics])]
    page.sections += [_curves_section(folder, summary), _cells_section(cells), config_section(config),
                      environment_section(summary)]
    page.sections = [s for s in page.sections if s.paragraphs and (s.subsections or s.tables or s.figures)
                     or s.code or s.facts]
    return page


def _facts(summary: Mapping[str, Any]) -> list[tuple[str, Any]]:
    counts = summary.get("counts") or {}
    return [("status", summary.get("status")), ("mode", summary.get("mode")),
            ("cells", ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))),
            ("wall time", with_unit("wall_seconds", summary.get("wall_seconds"))),
            ("lock sha256", ((summary.get("lock") or {}).get("sha256") or "n/a")[:16])]


def _lead(summary: Mapping[str, Any]) -> str:
    axes = summary.get("axes") or {}
    grid = " x ".join(f"{key} ({len(values)})" for key, values in axes.items())
    rows = ", ".join(summary.get("row_axes") or []) or "one row"
    return (f"Grid: {grid} = {len(summary.get('cells', []))} cells. Rows: {rows}; columns: "
            f"{summary.get('member_axis') or 'the members of each cell'}; repeats: "
            f"{summary.get('replicate_axis') or 'none'}.")


def _notes(cells: list[Mapping[str, Any]]) -> list[str]:
    out = []
    for cell in cells:
        if cell.get("status") not in ("completed",):
            error = f": {cell['error']}" if cell.get("error") else ""
            out.append(f"Cell {cell.get('name')} is {cell.get('status')}{error}. The aggregates leave it out.")
    return out


def _aggregate(metric: str, records: list[Mapping[str, Any]], row_axes: list[str]) -> Aggregate:
    """The sweep's Table of ``metric`` back from the summary's records (rows and members in order)."""
    table = Aggregate(metric, list(row_axes))
    for record in records:
        row = tuple(str(record.get(axis, "")) for axis in row_axes)
        if row not in table.rows:
            table.rows.append(row)
        if record["member"] not in table.members:
            table.members.append(record["member"])
        table.stats[(row, record["member"])] = Stat(record["mean"], record.get("se"), record["n"],
                                                    tuple(record.get("seeds") or ()))
    return table


def _metric_section(folder: Path, summary: Mapping[str, Any], metric: str) -> Section:
    table = _aggregate(metric, summary["aggregates"][metric], list(summary.get("row_axes") or []))
    usual_n = common_n(list(table.stats.values()))
    header = [(axis, axis) for axis in (table.row_axes or ["setting"])] + [(m, m) for m in table.members]
    rows = []
    for row in table.rows:
        best = marked(table, row, usual_n)
        cells = [Cell(value) for value in (row or ("all",))]
        for member in table.members:
            stat = table.stats.get((row, member))
            cells.append(Cell("" if stat is None else format_stat(stat, table.percent, usual_n),
                              "" if stat is None else repr(stat.mean), member in best))
        rows.append(cells)
    caption = f"{axis_label(metric)}, mean ± s.e. over n = {usual_n} seeds" if usual_n > 1 else \
        f"{axis_label(metric)}, one seed (n = 1): no standard error"
    figures = [embed_figure(folder, name, f"{axis_label(metric)}: settings x members, mean over the seeds.")
               for name in (f"figures/heatmap-{file_stem(metric)}.png",) if (folder / name).is_file()]
    return Section(axis_label(metric), tables=[Table(header, rows, caption)], figures=figures)


def _curves_section(folder: Path, summary: Mapping[str, Any]) -> Section:
    names = [f for f in summary.get("figures", []) if Path(f).name.startswith("curves-") and (folder / f).is_file()]
    return Section("Curves", ["Per round, one panel per setting, one line per member: the mean over the seeds "
                              "with a band of ± one standard error (none where n = 1)."],
                   figures=[embed_figure(folder, name, name) for name in names])


def _cells_section(cells: list[Mapping[str, Any]]) -> Section:
    axes = list(dict.fromkeys(k for cell in cells for k in (cell.get("values") or {})))
    header = [("cell", "cell"), *((a, a) for a in axes), ("status", "status"), ("time (s)", "seconds"),
              ("report", "report")]
    rows = []
    for cell in cells:
        values = cell.get("values") or {}
        folder: Optional[str] = cell.get("folder")
        rows.append([Cell(str(cell.get("name"))), *(Cell(_text(values.get(a))) for a in axes),
                     Cell(str(cell.get("status"))), Cell(with_unit("seconds", cell.get("seconds"))),
                     Cell(link(f"{folder}/{REPORT}", "report") if folder else "")])
    return Section("Cells", ["Each cell is an ordinary run folder under cells/, with its own report.html."],
                   tables=[Table(header, rows, "every cell of the grid, in grid order", numeric=False)],
                   collapsed=True)


def _text(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)

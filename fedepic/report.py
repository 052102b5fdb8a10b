"""The reports of a run folder: the comparison of its members (table and plot) and a member's curves.

Every mode writes them through these two functions (fedepic.lifecycle), so the files have one format:
``comparison.md`` (a title and one row per member), ``comparison.csv`` (the same rows),
``comparison.png`` (one panel per metric, one line per member) and ``<member>/curves.png``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from fedepic.outputs import RunWriter, csv_table, markdown_table

Curves = Mapping[str, Sequence[float]]  # metric name -> one value per round (or evaluation)


def write_comparison(writer: RunWriter, rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                     curves: Mapping[str, Curves], panels: Sequence[str], title: str, xlabel: str = "round",
                     figure: bool = True) -> None:
    """comparison.md / comparison.csv (one row per member) and, with ``figure``, comparison.png (one
    panel per metric of ``panels`` that some member has values for, one line per member, x = ``xlabel``)."""
    writer.write_text("comparison.md", f"# {title}\n\n" + markdown_table(rows, columns))
    writer.write_text("comparison.csv", csv_table(rows, columns))
    present = [p for p in panels if any(len(series.get(p, [])) for series in curves.values())]
    if not present or not figure:
        return
    from fedepic.plots import close, comparison_figure  # matplotlib: not needed by client actors

    fig = comparison_figure(curves, present, xlabel, title)
    try:
        writer.save_figure(fig, "comparison.png")
    finally:
        close(fig)


def write_curves(writer: RunWriter, curves: Curves, xlabel: str, title: str) -> None:
    """curves.png: one panel per non-empty series; nothing when every series is empty."""
    if not any(len(values) for values in curves.values()):
        return
    from fedepic.plots import close, curves_figure

    fig = curves_figure(curves, xlabel, title)
    try:
        writer.save_figure(fig, "curves.png")
    finally:
        close(fig)

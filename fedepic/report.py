"""The reports of a run folder: the comparison of its members (table and figures) and a member's figures.

Every mode writes them through fedepic.lifecycle, so the files have one format (each figure as
``NAME.png`` at ``figures.dpi`` plus ``NAME.pdf`` or ``NAME.svg``, ``figures.vector``):

- ``comparison.md`` (a title and one row per member) and ``comparison.csv`` (the same rows);
- ``comparison``: one panel per metric, one line per member (a band of ± s.e. where a member's curve
  is a mean over repeats);
- ``per_class``: each member's per-class test accuracy at its last evaluation (member x class), and
  ``per_class_rounds``: per-class accuracy over the rounds (epochs), one heatmap per member;
- ``<member>/curves``: one panel per metric; a metric constant over all its points, or with the same
  points as a metric drawn before it, is not drawn but listed under the panels with its value
  (fedepic.plots.curve_panels: "Not drawn: attack success: 0.0 % at every round; ...").

Per-class figures come from the members' metrics.jsonl (records with a ``per_class`` list). Figures
are presentation: one that cannot be drawn is a warning line on stderr, never a lost folder or a
changed status (:func:`best_effort`). The run's report.html is fedepic.html_report.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from fedepic.config import FiguresConfig, RunConfig, malicious_ids
from fedepic.extensions import DATA_ATTACKS, DATASETS, MODEL_ATTACKS
from fedepic.outputs import RunWriter, csv_table, markdown_table

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn: client actors never need it
    from fedepic.plots import LineStyle

Curves = Mapping[str, Sequence[float]]  # metric name -> one value per round (or evaluation); see fedepic.plots
PER_CLASS_VALUE = "test accuracy (%)"


def best_effort(what: str, write: Callable[[], Any]) -> bool:
    """Run ``write``; an exception becomes one warning line on stderr (a figure or the HTML report is
    presentation: the run's results, folder and status stand without it). Returns whether it worked."""
    try:
        write()
        return True
    except Exception as err:  # noqa: BLE001 - reported, and the run goes on to write its status
        print(f"fedepic: warning: {what} not written: {type(err).__name__}: {err}", file=sys.stderr)
        return False


# ------------------------------------------------------------------------------------ the setting


def attack_label(cfg: RunConfig) -> str:
    """The data and model attacks of ``cfg`` joined by "+" (those not flagged ``inactive``), or "none"."""
    parts = [name for name, registry in ((cfg.attack.data, DATA_ATTACKS), (cfg.attack.model, MODEL_ATTACKS))
             if not registry.has(name, "inactive")]
    return "+".join(parts) if parts else "none"


def setting_title(cfg: RunConfig) -> str:
    """The run's name and setting, as every figure and the report state it: mode, dataset, nodes or
    clients (malicious), topology or partition, attack, seed."""
    dataset = DATASETS.get(cfg.data.name)  # a folder dataset is titled by its folder, the others by info["title"]
    data = cfg.data.folder if "folder" in dataset.flags else dataset.info.get("title", cfg.data.name)
    if cfg.data.classes is not None:
        data += f" ({len(cfg.data.classes)} classes)"
    attack = f"attack {attack_label(cfg)}"
    if cfg.mode == "centralized":
        trials = cfg.attack.targets  # every attack trains attack.targets trials (fedepic.centralized.build_trials)
        return (f"{cfg.name}: centralized {data}, {cfg.model.name}, {attack}, "
                f"{trials} trial{'s' if trials != 1 else ''}, seed {cfg.seed}")
    bad = len(malicious_ids(cfg))
    if cfg.mode == "decentralized":
        who, where = "nodes", _topology(cfg)
    else:
        who, where = "clients", _partition(cfg)
    return (f"{cfg.name}: {cfg.mode} {data}, {cfg.clients.count} {who} ({bad} malicious), {where}, {attack}, "
            f"seed {cfg.seed}")


def _topology(cfg: RunConfig) -> str:
    t = cfg.topology
    detail = {"k_regular": f"k={t.k}", "erdos_renyi": f"p={t.p:g}", "small_world": f"k={t.k}, p={t.p:g}",
              "edges": f"{len(t.edges)} edges"}.get(t.name)
    return f"{t.name} ({detail})" if detail else t.name


def _partition(cfg: RunConfig) -> str:
    d = cfg.data
    detail = {"dirichlet": f"alpha={d.alpha:g}", "shards": f"{d.shards_per_client} per client"}.get(d.partition)
    return f"{d.partition} ({detail})" if detail else d.partition


# ---------------------------------------------------------------------------------- per-class data


@dataclass
class PerClass:
    """Per-class accuracy (fractions; NaN: no test row) at each x: ``values[c][j]`` for class c at ``xs[j]``."""

    xs: list[int]
    values: list[list[float]]

    def last(self) -> list[float]:
        return [row[-1] for row in self.values]


def read_per_class(folder: Path, x_key: str) -> Optional[PerClass]:
    """The per-class accuracies in ``folder/metrics.jsonl`` over ``x_key`` ("round", "epoch"); several
    records at one x (the centralized trials) are averaged. None when no record holds them."""
    path = folder / "metrics.jsonl"
    groups: dict[int, list[list[Optional[float]]]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        if isinstance(record.get("per_class"), list) and record.get(x_key) is not None:
            groups.setdefault(int(record[x_key]), []).append(record["per_class"])
    if not groups:
        return None
    xs = sorted(groups)
    classes = max(len(v) for g in groups.values() for v in g)
    return PerClass(xs, [[_mean([v[c] for v in groups[x] if c < len(v)]) for x in xs] for c in range(classes)])


def _mean(values: Sequence[Optional[float]]) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _percent(rows: Sequence[Sequence[float]]) -> list[list[float]]:
    return [[100.0 * v for v in row] for row in rows]


def _class_labels(labels: Optional[Sequence[str]], count: int) -> list[str]:
    return [labels[c] if labels is not None and c < len(labels) else str(c) for c in range(count)]


# ------------------------------------------------------------------------------------------ writers


def write_comparison(writer: RunWriter, rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                     curves: Mapping[str, Curves], panels: Sequence[str], title: str, xlabel: str = "round", *,
                     styles: Optional[Mapping[str, "LineStyle"]] = None, figures: Optional[FiguresConfig] = None,
                     class_labels: Optional[Sequence[str]] = None) -> None:
    """comparison.md / comparison.csv (one row per member), comparison (one panel per metric of
    ``panels`` that some member has values for, one line per member of ``curves``, x = ``xlabel``)
    and the per-class heatmaps of the members (``writer.dir/<member>/metrics.jsonl``)."""
    writer.write_text("comparison.md", f"# {title}\n\n" + markdown_table(rows, columns))
    writer.write_text("comparison.csv", csv_table(rows, columns))
    figures = figures or FiguresConfig()
    if not figures.enabled:
        return
    from fedepic import plots  # matplotlib: not needed by client actors

    styles = styles or plots.member_styles(list(curves))
    if any(plots.has_values(series, p) for series in curves.values() for p in panels):
        best_effort("comparison figure", lambda: _save(writer, "comparison", figures, plots.panel_grid_figure(
            curves, panels, xlabel, title, styles)))
    per_class = {m: pc for m in curves if (pc := read_per_class(writer.dir / m, xlabel)) is not None}
    if per_class:
        best_effort("per-class figures", lambda: _per_class_figures(writer, per_class, title, xlabel, figures,
                                                                    class_labels))


def _per_class_figures(writer: RunWriter, per_class: Mapping[str, PerClass], title: str, xlabel: str,
                       figures: FiguresConfig, class_labels: Optional[Sequence[str]]) -> None:
    from fedepic import plots

    classes = max(len(pc.values) for pc in per_class.values())
    labels = _class_labels(class_labels, classes)
    final = [pc.last() + [math.nan] * (classes - len(pc.values)) for pc in per_class.values()]
    _save(writer, "per_class", figures, plots.heatmap_figure(
        _percent(final), list(per_class), labels, f"Per-class test accuracy at the last {xlabel}\n{title}",
        PER_CLASS_VALUE, row_title="member", col_title="class", vmin=0, vmax=100))
    if any(len(pc.xs) > 1 for pc in per_class.values()):
        panels = [_class_by_x(member, pc, labels, xlabel) for member, pc in per_class.items()]
        _save(writer, "per_class_rounds", figures, plots.heatmap_grid_figure(
            panels, f"Per-class test accuracy per {xlabel}\n{title}", PER_CLASS_VALUE, vmin=0, vmax=100))


def _class_by_x(member: str, pc: PerClass, labels: Sequence[str], xlabel: str):
    from fedepic.plots import Heatmap

    return Heatmap(_percent(pc.values), labels[:len(pc.values)], [str(x) for x in pc.xs], member, "class", xlabel)


def write_curves(writer: RunWriter, curves: Curves, xlabel: str, title: str, *,
                 line: Optional["LineStyle"] = None, figures: Optional[FiguresConfig] = None) -> None:
    """A member's curves: one panel per non-empty series, in the member's ``line`` style (a constant or
    repeated series is a note under the panels: fedepic.plots.curves_figure); nothing when every series
    is empty. (Its per-class accuracy over time is a panel of the root's per_class_rounds.)"""
    figures = figures or FiguresConfig()
    if not figures.enabled:
        return
    from fedepic import plots

    if plots.metric_names(curves):
        best_effort("member curves", lambda: _save(writer, "curves", figures,
                                                   plots.curves_figure(curves, xlabel, title, line)))


def _save(writer: RunWriter, stem: str, figures: FiguresConfig, fig) -> None:
    from fedepic.plots import close, save_figure

    try:
        save_figure(writer, fig, stem, figures.dpi, figures.vector)
    finally:
        close(fig)

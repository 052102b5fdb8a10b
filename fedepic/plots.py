"""The figures of a run, in one style: panel grids of curves, heatmaps, one line style per member, and
one save helper that writes PNG (at a stated dpi) plus PDF or SVG (Agg backend: no display needed).

A member's *series* maps a metric to its values, one per point, with optional companions:
``series["acc@x"]`` holds the x values (e.g. the evaluated rounds; default 1..n) and
``series["acc@se"]`` the standard error of each point, drawn as a band mean ± s.e. (a sweep's repeated
seeds, the centralized trials). Values are stored as the run logs them (fractions); the axes show
them in the unit of fedepic.quantities (accuracies in percent).

Reuse (e.g. a sweep): :func:`member_styles` gives every member one colour, marker and dash that stay
the same in each figure drawn with it; :func:`panel_grid_figure` draws one panel per metric and one
line per member; :func:`heatmap_figure` draws a matrix (per-class accuracy over rounds, attack x
defense); :func:`save_figure` writes both formats atomically through anything with ``write_bytes``
(fedepic.outputs.RunWriter).

Cost (issue 30: figures and report at most 15% of the noniid local run's CPU time; measured with
benchmarks/figure_share.py, docs/results/engines.md): a member's curves draw no panel for a constant
or repeated metric (:func:`curve_panels`); a panel grid without a legend outside its axes is laid out
from measured text sizes (:class:`PanelGridLayout`) instead of constrained layout; a title goes
through matplotlib's automatic placement only where a multiplier or offset can sit above its axes; a
figure is laid out once and each format drawn once (:func:`save_figure`); the PDFs of a process share
their font subsets (:func:`shared_font_subsets`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import textwrap
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Protocol, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.font_manager  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.layout_engine import LayoutEngine  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedepic.config import VECTOR_FORMATS  # noqa: E402
from fedepic.quantities import Quantity, quantity, with_unit  # noqa: E402

X_SUFFIX = "@x"  # series["acc@x"] holds the x values of series["acc"] (e.g. the evaluated rounds)
SE_SUFFIX = "@se"  # series["acc@se"] holds the standard error of each value of series["acc"]
COMPANIONS = (X_SUFFIX, SE_SUFFIX)
MAX_COLUMNS = 3  # panels per row: every panel stays readable
MAX_ASPECT = 2.8  # width / height of a figure at most (a paper's column or a slide, never a sliver)
PANEL_SIZE = (3.4, 2.5)  # inches, one curves panel
CHARS_PER_INCH = 10  # title wrapping at figure.titlesize 11 (DejaVu Sans averages about 12)
STYLE = {  # rc parameters of every figure: small print sizes, Type 42 fonts (journals), stable SVG ids
    "font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9, "legend.fontsize": 8.5,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.titlesize": 11,
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
    "lines.linewidth": 1.6, "lines.markersize": 4, "pdf.fonttype": 42, "svg.hashsalt": "fedepic",
}
# Distinct periods (10 colours, 7 markers, 4 dashes) keep the first 140 members apart, and members
# stay apart in greyscale print by marker and dash
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
DASHES = ("-", "--", "-.", ":")


@dataclass(frozen=True)
class LineStyle:
    """How one member is drawn in every figure of a run."""

    color: str
    marker: str
    linestyle: str


def member_styles(members: Sequence[str]) -> dict[str, LineStyle]:
    """One style per member, by its position in ``members`` (the run's member order): pass the same
    list to every figure of a run (or of a sweep) and each member keeps its style."""
    colors = matplotlib.colormaps["tab10"].colors
    return {m: LineStyle(to_hex(colors[i % len(colors)]), MARKERS[i % len(MARKERS)],
                         DASHES[i % len(DASHES)]) for i, m in enumerate(members)}


@contextlib.contextmanager
def style() -> Iterator[None]:
    """The figures' rc parameters, for drawing and saving alike (never set globally)."""
    with plt.rc_context(STYLE):
        yield


def x_values(series: Mapping[str, Sequence[float]], name: str) -> Sequence[float]:
    """The x values of ``series[name]``: ``series[name + "@x"]`` when given, else 1..len."""
    return series.get(name + X_SUFFIX) or range(1, len(series[name]) + 1)


def metric_names(series: Mapping[str, Sequence[float]]) -> list[str]:
    """The metrics of ``series`` that have a finite value (their "@x" / "@se" companions left out)."""
    return [n for n in series if not n.endswith(COMPANIONS) and has_values(series, n)]


def has_values(series: Mapping[str, Sequence[float]], name: str) -> bool:
    return any(_finite(v) for v in series.get(name, []))


def _finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)


def _wrap(title: str, width_in: float) -> str:
    """``title`` wrapped to the figure's width in lines of about equal length (no lone last word), each
    of its own lines apart (e.g. what the figure shows, then the setting)."""
    width = max(20, int(width_in * CHARS_PER_INCH))
    out = []
    for line in title.splitlines():
        lines = max(1, math.ceil(len(line) / width))
        out += textwrap.wrap(line, min(width, math.ceil(len(line) / lines) + 6)) or [""]
    return "\n".join(out)


def _figsize(width: float, height: float) -> tuple[float, float]:
    """(width, height) in inches, the height raised where the figure would be wider than MAX_ASPECT."""
    return width, max(height, width / MAX_ASPECT)


def _grid(n: int, columns: int = MAX_COLUMNS) -> tuple[int, int]:
    cols = max(1, min(columns, n))
    return math.ceil(max(n, 1) / cols), cols


# ----------------------------------------------------------------------------------------- curves


def panel_grid_figure(per_member: Mapping[str, Mapping[str, Sequence[float]]], panels: Sequence[str],
                      xlabel: str, title: str, styles: Optional[Mapping[str, LineStyle]] = None,
                      legend: bool = True, quantities: Optional[Mapping[str, Quantity]] = None, note: str = ""):
    """One panel per metric of ``panels`` (at most 3 per row), one line per member (its mean; a band
    of ± s.e. where the member's series has ``metric@se``), one shared legend outside the axes.

    ``styles``: the run's :func:`member_styles` (default: by the order of ``per_member``). A metric no
    member has a finite value for gets no panel. ``quantities``: how a panel is labelled and scaled
    when its key is not the metric's name (a sweep's panel per setting); default ``quantity(panel)``.
    ``note``: a line of small print under the panels.
    """
    quantities = quantities or {}
    styles = styles or member_styles(list(per_member))
    shown = [p for p in panels if any(has_values(s, p) for s in per_member.values())]
    rows, cols = _grid(len(shown))
    width = cols * PANEL_SIZE[0]
    place = _legend_place(list(per_member), rows * cols - len(shown), width) if legend and per_member else None
    if place is not None and place.where == "right":
        width += place.inches
    below = place.inches if place is not None and place.where == "below" else 0.0
    # a legend beside or below the panels is placed by constrained layout; else the grid's margins are
    # computed (PanelGridLayout: the same room for every label, at a fraction of the cost)
    layout = "constrained" if place is not None and place.where != "panel" else PanelGridLayout(rows, cols)
    with style():
        fig = plt.figure(figsize=_figsize(width, rows * PANEL_SIZE[1] + 0.6 + below), layout=layout)
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax, panel in zip(axes, shown):
            for member, series in per_member.items():
                if has_values(series, panel):
                    _draw_line(ax, series, panel, member, styles[member], quantities.get(panel))
            _label_axes(ax, panel, xlabel, quantities.get(panel))
        spare = list(axes[len(shown):])
        for ax in spare:
            ax.axis("off")
        if place is not None:
            banded = any(_finite(v) for s in per_member.values() for p in shown for v in s.get(p + SE_SUFFIX) or [])
            _legend(fig, spare, styles, list(per_member), place, "member (shaded: ± s.e.)" if banded else "member")
        fig.suptitle(_wrap(title, width))
        if note:
            fig.supxlabel(_wrap(note, width * 1.4), fontsize="small")  # 7.5 pt: about 14 characters an inch
    return fig


POINT = 1 / 72  # inches
PAD = 3 * POINT  # around each panel and the figure's titles, as constrained layout's default pads


class PanelGridLayout(LayoutEngine):
    """A grid of ``rows`` x ``cols`` equal panels whose margins are computed from what they hold: the
    widest y tick label and the y label on the left, the x tick labels and the x label below, the
    title (and a "×10ⁿ" multiplier) above, the suptitle above the grid and the supxlabel below it.
    A column gets the largest margins of its panels and a row those of its row, and every panel the same
    size, so the axes line up (as constrained layout aligns them).
    Text sizes are measured on the figure's renderer, two passes (the ticks follow the axes' size);
    constrained layout measures every tick label of every panel in each of its passes."""

    _adjust_compatible = False
    _colorbar_gridspec = False

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols

    def execute(self, fig) -> None:
        renderer = fig._get_renderer()
        width, height = fig.get_size_inches()
        top = _text_inches(fig._suptitle, renderer) + 2 * PAD
        bottom = _text_inches(fig._supxlabel, renderer) + 2 * PAD if fig._supxlabel is not None else PAD
        if fig._suptitle is not None:
            fig._suptitle.set_y(1 - PAD / height)
        if fig._supxlabel is not None:
            fig._supxlabel.set_y(PAD / height)
        for _ in range(2):  # the tick labels of the first placement, then of the axes' final size
            left, right = [[PAD] * self.cols for _ in range(2)]  # inches, per column
            above, below = [[PAD] * self.rows for _ in range(2)]  # per row
            for ax in fig.axes:
                if ax.axison:
                    spec = ax.get_subplotspec()
                    row, col = spec.rowspan.start, spec.colspan.start
                    lm, bm, rm, am = _margins(ax, renderer)
                    left[col], right[col] = max(left[col], lm + PAD), max(right[col], rm + PAD)
                    above[row], below[row] = max(above[row], am + PAD), max(below[row], bm + PAD)
            panel_w = max((width - sum(left) - sum(right)) / self.cols, 0.1)  # every panel the same size
            panel_h = max((height - top - bottom - sum(above) - sum(below)) / self.rows, 0.1)
            for ax in fig.axes:
                spec = ax.get_subplotspec()
                row, col = spec.rowspan.start, spec.colspan.start
                x0 = sum(left[:col + 1]) + sum(right[:col]) + col * panel_w
                y0 = bottom + sum(below[row:]) + sum(above[row + 1:]) + (self.rows - 1 - row) * panel_h
                ax.set_position([x0 / width, y0 / height, panel_w / width, panel_h / height])


def _text_inches(text, renderer, across: bool = False) -> float:
    """The height (``across``: the width) of a text artist in inches; 0 for none or an empty one."""
    if text is None or not text.get_text() or not text.get_visible():
        return 0.0
    box = text.get_window_extent(renderer)
    return (box.width if across else box.height) / renderer.points_to_pixels(72)


def _margins(ax, renderer) -> tuple[float, float, float, float]:
    """Inches a panel needs left, below, right and above its axes: tick labels, labels, title."""
    rc = matplotlib.rcParams
    y_labels = _tick_labels(ax.yaxis)
    x_labels = _tick_labels(ax.xaxis)
    y_font = matplotlib.font_manager.FontProperties(size=rc["ytick.labelsize"])
    x_font = matplotlib.font_manager.FontProperties(size=rc["xtick.labelsize"])
    inch = renderer.points_to_pixels(72)
    y_width = max((_extent(renderer, t, y_font)[0] for t in y_labels), default=0.0) / inch
    x_height = max((_extent(renderer, t, x_font)[1] for t in x_labels), default=0.0) / inch
    x_over = max((_extent(renderer, t, x_font)[0] for t in x_labels[-1:]), default=0.0) / inch / 2
    offset = ax.yaxis.get_major_formatter().get_offset() if y_labels else ""
    offset_height = _extent(renderer, offset, y_font)[1] / inch + PAD if offset else 0.0
    left = y_width + (rc["ytick.major.size"] + rc["ytick.major.pad"] + rc["axes.labelpad"]) * POINT
    below = x_height + (rc["xtick.major.size"] + rc["xtick.major.pad"] + rc["axes.labelpad"]) * POINT
    above = _text_inches(ax.title, renderer) + rc["axes.titlepad"] * POINT + offset_height
    return (left + _text_inches(ax.yaxis.label, renderer, across=True),
            below + _text_inches(ax.xaxis.label, renderer), x_over, above)


def _tick_labels(axis) -> list[str]:
    """The major tick labels an axis will draw (those inside its view), as its formatter writes them."""
    locs = axis.get_majorticklocs()
    labels = axis.get_major_formatter().format_ticks(locs)
    low, high = sorted(axis.get_view_interval())
    span = (high - low) * 1e-9
    return [t for loc, t in zip(locs, labels) if low - span <= loc <= high + span and t]


def _extent(renderer, text: str, font) -> tuple[float, float]:
    """(width, height) in pixels of one line of tick text (mathtext where it has "$")."""
    width, height, _ = renderer.get_text_width_height_descent(text, font, ismath="$" in text)
    return width, height


def _label_axes(ax, name: str, xlabel: str, q: Optional[Quantity] = None) -> None:
    """The quantity's label as the panel title, its unit on the y axis; percentages kept near [0, 100]
    (a flat 0 % or 100 % curve does not get an axis from -0.04 to 0.04 or past 100).

    A percentage axis, or one whose values need neither a multiplier nor an offset (:func:`_plain_numbers`;
    offsets off), has no text above it, so its title sits at the top of the axes as matplotlib's
    automatic placement would put it, without that placement's cost (it measures every tick label at
    every draw). Other axes keep the automatic placement: it lifts the title above a multiplier such
    as "×10⁻⁵". Their tick labels go through mathtext only where scientific notation can appear
    (mathtext's parsing is the dearer part of a panel's text)."""
    q = q or quantity(name)
    low, high = _finite_range(ax)
    if q.unit == "%":
        ax.set_title("\n".join(textwrap.wrap(q.label, 38)), y=1.0)
        pad = max(4.0, 0.08 * (high - low))
        ax.set_ylim(max(low - pad, -2.0), min(high + pad, 102.0))
        ax.ticklabel_format(axis="y", useOffset=False)
    elif _plain_numbers(low, high):  # no multiplier, no offset: the title on the axes, as for percentages
        ax.set_title("\n".join(textwrap.wrap(q.label, 38)), y=1.0)
        ax.ticklabel_format(axis="y", useOffset=False)
    else:  # small magnitudes (consensus distances) as "x 1e-4", not six-decimal ticks
        ax.set_title("\n".join(textwrap.wrap(q.label, 38)))
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=_may_be_scientific(low, high))
    ax.set_ylabel("\n".join(textwrap.wrap(q.unit, 24)))
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))


def _plain_numbers(low: float, high: float) -> bool:
    """Whether the tick labels of [low, high] need neither a multiplier nor an offset: magnitudes a
    decade inside [1e-3, 1e4) (:func:`_may_be_scientific`) and a span of at least 1% of them (an
    offset takes a span four decades below the values, matplotlib's ``axes.formatter.offset_threshold``)."""
    return not _may_be_scientific(low, high) and high - low >= 1e-2 * max(abs(low), abs(high))


def _may_be_scientific(low: float, high: float) -> bool:
    """Whether an axis over [low, high] may get a "×10ⁿ" multiplier at scilimits (-3, 4): its largest
    magnitude outside [1e-2, 1e3) (a decade inside the limits either side, for the axis's margins)."""
    top = max(abs(low), abs(high))
    return not 1e-2 <= top < 1e3


def _finite_range(ax) -> tuple[float, float]:
    """The y range of what the panel holds (lines and ± s.e. bands; NaN left out)."""
    low, high = ax.dataLim.y0, ax.dataLim.y1
    return (low, high) if math.isfinite(low) and math.isfinite(high) else (0.0, 100.0)


def _draw_line(ax, series: Mapping[str, Sequence[float]], name: str, member: str, line: LineStyle,
               q: Optional[Quantity] = None) -> None:
    scale = (q or quantity(name)).scale
    xs = list(x_values(series, name))
    ys = [math.nan if v is None else v * scale for v in series[name]]
    ax.plot(xs, ys, color=line.color, marker=line.marker, linestyle=line.linestyle, label=member,
            markevery=max(1, len(xs) // 12))  # a dozen markers at most: they tell members apart, no more
    se = series.get(name + SE_SUFFIX)
    if se and any(_finite(v) for v in se):  # n = 1 everywhere (NaN s.e.): no band
        low = [y - (s or 0.0) * scale for y, s in zip(ys, se)]
        high = [y + (s or 0.0) * scale for y, s in zip(ys, se)]
        ax.fill_between(xs, low, high, color=line.color, alpha=0.18, linewidth=0, label="_band")


@dataclass(frozen=True)
class _LegendPlace:
    where: str  # "panel": in an empty panel; "right": beside one column of panels; "below": under them
    inches: float  # what it adds to the figure's width (right) or height (below)
    columns: int = 1


def _legend_place(members: list[str], spare: int, width: float) -> _LegendPlace:
    entry = 0.6 + 0.075 * max(len(m) for m in members)  # inches of one entry: the line, then the name
    if spare and len(members) <= 10:
        return _LegendPlace("panel", 0.0)
    if width <= PANEL_SIZE[0]:  # a dozen entries a column fit beside one panel's height
        columns = math.ceil(len(members) / 12)
        return _LegendPlace("right", columns * entry + 0.2, columns)
    per_row = max(1, min(len(members), int(width // entry)))
    return _LegendPlace("below", 0.22 * math.ceil(len(members) / per_row) + 0.35, per_row)  # rows and a title


def _legend(fig, spare: list, styles: Mapping[str, LineStyle], members: list[str], place: _LegendPlace,
            title: str) -> None:
    handles = [plt.Line2D([], [], color=styles[m].color, marker=styles[m].marker, linestyle=styles[m].linestyle)
               for m in members]
    if place.where == "panel":
        spare[0].legend(handles, members, loc="center", frameon=False, title=title)
    else:
        loc = "outside right center" if place.where == "right" else "outside lower center"
        fig.legend(handles, members, loc=loc, ncols=place.columns, frameon=False, title=title)


def curves_figure(series: Mapping[str, Sequence[float]], xlabel: str, title: str,
                  line: Optional[LineStyle] = None):
    """One member's curves: one panel per metric with a finite value, in the member's run style.

    A metric whose curve says nothing a line of text cannot is listed under the panels instead of
    drawn (:func:`curve_panels`): one constant over all its points ("attack success: 0.0 % at every
    round") or one with the same points as a metric drawn before it. Every panel is drawn when that
    would leave none."""
    member = "member"
    panels, notes = curve_panels(series, xlabel)
    return panel_grid_figure({member: series}, panels, xlabel, title, {member: line or member_styles([member])[member]},
                             legend=False, note=f"Not drawn: {'; '.join(notes)}." if notes else "")


def curve_panels(series: Mapping[str, Sequence[float]], xlabel: str = "round") -> tuple[list[str], list[str]]:
    """The metrics of ``series`` that get a panel of their own, and one note for each that does not:
    a metric with at least two points, every one finite and all equal, is *constant* ("attack success:
    0.0 % at every round"); one whose x values and values equal those of a metric before it (in the
    same unit) is *the same as* that metric. When that would leave no panel, every metric keeps its own.

    >>> curve_panels({"attack_success": [0.0, 0.0], "mean_accuracy": [0.5, 0.6], "clean_accuracy": [0.5, 0.6]})
    (['mean_accuracy'], ['attack success: 0.0 % at every round', 'accuracy on labels the attack leaves alone: the same as mean accuracy of benign nodes'])
    """
    names = metric_names(series)
    drawn: list[str] = []
    notes: list[str] = []
    for name in names:
        values = list(series[name])
        q = quantity(name)
        if len(values) >= 2 and all(_finite(v) for v in values) and len(set(values)) == 1:
            notes.append(f"{q.label}: {with_unit(name, values[0])} at every {xlabel}")
            continue
        twin = next((d for d in drawn if list(series[d]) == values and list(x_values(series, d)) ==
                     list(x_values(series, name)) and (quantity(d).unit, quantity(d).scale) == (q.unit, q.scale)), None)
        if twin is not None:
            notes.append(f"{q.label}: the same as {quantity(twin).label}")
            continue
        drawn.append(name)
    return (drawn, notes) if drawn else (names, [])


# ---------------------------------------------------------------------------------------- heatmaps


@dataclass
class Heatmap:
    """One matrix panel: ``values[r][c]`` (NaN: no value, drawn blank) with its row and column labels."""

    values: Sequence[Sequence[float]]
    row_labels: Sequence[str]
    col_labels: Sequence[str]
    title: str = ""
    row_title: str = ""
    col_title: str = ""
    texts: Optional[Sequence[Sequence[str]]] = None  # what each cell says (default: its value, ``fmt``)
    bold: frozenset = frozenset()  # (row, column) of the cells written in bold (e.g. the best per row)


def heatmap_figure(values: Sequence[Sequence[float]], row_labels: Sequence[str], col_labels: Sequence[str],
                   title: str, value_label: str, *, row_title: str = "", col_title: str = "",
                   vmin: Optional[float] = None, vmax: Optional[float] = None, fmt: str = "{:.0f}",
                   texts: Optional[Sequence[Sequence[str]]] = None, bold: frozenset = frozenset(),
                   lower_is_better: bool = False):
    """One heatmap (per-class accuracy over rounds, attack x defense, member x class), its colour bar
    labelled ``value_label``; cells large enough to read carry their value (``fmt``) or their ``texts``
    (e.g. "56.8 ± 0.4"), in bold where ``bold`` says. The bright end of the scale is the better one:
    with ``lower_is_better`` the scale runs the other way."""
    heat = Heatmap(values, row_labels, col_labels, "", row_title, col_title, texts, frozenset(bold))
    return heatmap_grid_figure([heat], title, value_label, vmin=vmin, vmax=vmax, fmt=fmt,
                               lower_is_better=lower_is_better)


def heatmap_grid_figure(panels: Sequence[Heatmap], title: str, value_label: str, *,
                        vmin: Optional[float] = None, vmax: Optional[float] = None, fmt: str = "{:.0f}",
                        lower_is_better: bool = False):
    """Several heatmaps on one colour scale (at most 3 per row) and one colour bar."""
    finite = [v for p in panels for row in p.values for v in row if _finite(v)]
    vmin = vmin if vmin is not None else (min(finite) if finite else 0.0)
    vmax = vmax if vmax is not None else (max(finite) if finite else 1.0)
    n_rows = max(len(p.row_labels) for p in panels)
    n_cols = max(len(p.col_labels) for p in panels)
    label_in = 0.065 * max((len(r) for p in panels for r in p.row_labels), default=1)  # row labels' width
    cell = (min(0.42, max(0.03, 3.6 / max(n_cols, 1))), min(0.3, max(0.02, 4.5 / max(n_rows, 1))))
    longest = max((len(t) for p in panels if p.texts is not None for row in p.texts for t in row), default=0)
    if longest:  # cells that say more than a number ("56.8 ± 0.4") are as wide as what they say
        cell = (max(cell[0], 0.062 * longest + 0.12), max(cell[1], 0.3))
    panel = (n_cols * cell[0] + label_in + 0.6, max(n_rows * cell[1] + 0.7, 1.9))  # a colour bar to read
    rows, cols = _grid(len(panels))
    width = max(cols * panel[0] + 1.0, 4.0)
    cmap = matplotlib.colormaps["viridis_r" if lower_is_better else "viridis"].with_extremes(bad="#e6e6e6")  # NaN: grey
    with style():
        fig = plt.figure(figsize=_figsize(width, rows * panel[1] + 0.7), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        image = None
        for ax, heat in zip(axes, panels):
            image = ax.imshow(heat.values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            _label_cells(ax, heat, cell, vmin, vmax, fmt, lower_is_better)
            ax.grid(False)
            ax.set_title(heat.title)
            ax.set_ylabel(heat.row_title)
            ax.set_xlabel(heat.col_title)
        for ax in axes[len(panels):]:
            ax.axis("off")
        if image is not None:
            fig.colorbar(image, ax=list(axes[:len(panels)]), label=value_label, shrink=0.9, aspect=30)
        fig.suptitle(_wrap(title, width))
    return fig


def _label_cells(ax, heat: Heatmap, cell: tuple[float, float], vmin: float, vmax: float, fmt: str,
                 reversed_scale: bool = False) -> None:
    """Tick labels (all of them where they fit, else evenly spaced; slanted where wider than their
    column) and, in cells large enough to read, the values."""
    x_step = max(1, math.ceil(0.3 / cell[0]))
    y_step = max(1, math.ceil(0.16 / cell[1]))
    for axis, labels, step in ((ax.xaxis, heat.col_labels, x_step), (ax.yaxis, heat.row_labels, y_step)):
        ticks = list(range(0, len(labels), step))
        axis.set_ticks(ticks, [labels[i] for i in ticks])
    if max((len(label) for label in heat.col_labels), default=0) * 0.075 > cell[0] * x_step:
        ax.tick_params(axis="x", labelrotation=40)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    ax.tick_params(length=0)
    if cell[0] < 0.3 or cell[1] < 0.17:
        return
    span = (vmax - vmin) or 1.0
    for r, row in enumerate(heat.values):
        for c, value in enumerate(row):
            if _finite(value):  # viridis is dark at the low end (the high end, reversed): light text there
                position = (value - vmin) / span
                dark = (1.0 - position if reversed_scale else position) < 0.6
                text = heat.texts[r][c] if heat.texts is not None else fmt.format(value)
                ax.text(c, r, text, ha="center", va="center", fontsize=7, color="white" if dark else "black",
                        fontweight="bold" if (r, c) in heat.bold else "normal", in_layout=False)


# -------------------------------------------------------------------------------------------- files


class BytesTarget(Protocol):
    """Where figures go: a run folder's writer (fedepic.outputs.RunWriter writes atomically)."""

    def write_bytes(self, name: str, data: bytes) -> None: ...


def save_figure(target: BytesTarget, fig, stem: str, dpi: int, vector: str) -> list[str]:
    """``stem.png`` at ``dpi`` and ``stem.<vector>`` (``pdf`` or ``svg``), each written atomically;
    returns the file names. Dates are left out of the vector files, so a figure's bytes are reproducible.
    A PDF embeds its fonts as Type 42 subsets shared between the figures of a process
    (:func:`shared_font_subsets`).

    The figure is laid out once (:func:`lay_out`, at the PNG's dpi) and each format then drawn once:
    with a layout engine set, matplotlib's ``savefig`` draws the whole figure an extra time before
    each save (without rendering: every tick label and text is measured again) and lays it out in
    both draws."""
    if vector not in VECTOR_FORMATS:
        raise ValueError(f"vector format {vector!r}: choose one of {', '.join(VECTOR_FORMATS)}")
    names = []
    with style(), shared_font_subsets():
        lay_out(fig, dpi)
        for fmt, options in (("png", {"dpi": dpi}), (vector, {"metadata": {"pdf": {"CreationDate": None},
                                                                          "svg": {"Date": None}}[vector]})):
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, **options)
            target.write_bytes(f"{stem}.{fmt}", buf.getvalue())
            names.append(f"{stem}.{fmt}")
    return names


def lay_out(fig, dpi: float) -> None:
    """Run the figure's layout engine once (constrained layout, :class:`PanelGridLayout`) at ``dpi`` and
    remove it: the axes keep their places (in figure fractions) in every later draw."""
    engine = fig.get_layout_engine()
    if engine is None:
        return
    shown = fig.get_dpi()
    fig.set_dpi(dpi)
    try:
        engine.execute(fig)
    finally:
        fig.set_dpi(shown)
    fig.set_layout_engine(None)


def close(fig) -> None:
    plt.close(fig)


# A PDF's fonts. Matplotlib's PDF backend embeds each Type 42 font as the subset of the glyphs the
# figure uses, and makes it with fontTools from the font file, per PDF: about 0.17 s of a member's
# 0.44 s PDF (docs/results/engines.md). The subsets are made here instead, of the glyphs asked for
# plus the printable ASCII ones, so that figures of the same text share one subset: each font is read
# once per process (a memo of a pure function, keyed by what the subset is made of; a few kilobytes
# more per PDF). Anything unexpected (another matplotlib's internals) falls back to matplotlib's own.
ASCII = range(32, 127)
SUBSET_MEMO = 16  # fonts x glyph sets kept: a figure's text uses one to three fonts


@contextlib.contextmanager
def shared_font_subsets() -> Iterator[None]:
    """Within the block, the PDF backend's font subsets come from :func:`font_subset` (restored after)."""
    try:
        from matplotlib.backends import _backend_pdf_ps as pdf_ps
    except ImportError:  # another matplotlib: its own subsetting
        yield
        return
    original = getattr(pdf_ps, "get_glyphs_subset", None)
    if original is None:
        yield
        return

    def subset(fontfile, glyphs):
        try:
            data, index_map = font_subset(fontfile, frozenset(glyphs), original)
        except Exception:  # noqa: BLE001 - matplotlib's own subsetting still embeds the font
            return original(fontfile, glyphs)
        return contextlib.nullcontext(_Subset(_FontBytes(data), index_map))

    pdf_ps.get_glyphs_subset = subset
    try:
        yield
    finally:
        pdf_ps.get_glyphs_subset = original


def font_subset(fontfile, glyphs: frozenset, make) -> tuple[bytes, dict]:
    """The TrueType bytes of ``fontfile``'s subset holding ``glyphs`` and the printable ASCII glyphs, and
    its map from the font's glyph indices to the subset's, made by ``make`` (matplotlib's
    ``get_glyphs_subset``) once for each font and glyph set."""
    from matplotlib.font_manager import get_font

    font = get_font(fontfile)
    return _made_subset(fontfile, glyphs | frozenset(font.get_char_index(c) for c in ASCII) - {0}, make)


@functools.lru_cache(maxsize=SUBSET_MEMO)
def _made_subset(fontfile, glyphs: frozenset, make) -> tuple[bytes, dict]:
    with make(fontfile, set(glyphs)) as made:
        buffer = io.BytesIO()
        made.font.save(buffer, reorderTables=False)  # what matplotlib's font_as_file writes
        return buffer.getvalue(), dict(made.glyph_index_map)


@dataclass(frozen=True)
class _FontBytes:
    """A made subset, as matplotlib's PDF backend reads it (``save`` into a file)."""

    data: bytes

    def save(self, file, reorderTables: bool = False) -> None:  # noqa: N803 - fontTools' name
        file.write(self.data)


@dataclass(frozen=True)
class _Subset:
    font: _FontBytes
    glyph_index_map: dict

"""Matplotlib figures of training curves and strategy comparisons (Agg backend: no display needed)."""

from __future__ import annotations

from typing import Collection, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


X_SUFFIX = "@x"  # series["acc@x"] holds the x values of series["acc"] (e.g. the evaluated rounds)


def x_values(series: Mapping[str, Sequence[float]], name: str) -> Sequence[float]:
    """The x values of ``series[name]``: ``series[name + "@x"]`` when given, else 1..len."""
    return series.get(name + X_SUFFIX) or range(1, len(series[name]) + 1)


def curves_figure(series: Mapping[str, Sequence[float]], xlabel: str, title: str):
    """One panel per series name (e.g. accuracy, loss), x = ``x_values``."""
    names = [n for n, v in series.items() if len(v) and not n.endswith(X_SUFFIX)]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4.2 * max(len(names), 1), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot(x_values(series, name), series[name], marker="o", markersize=2.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def comparison_figure(per_member: Mapping[str, Mapping[str, Sequence[float]]], panels: Sequence[str],
                      xlabel: str, title: str):
    """One panel per metric, one line per member (strategy or defense)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for member, series in per_member.items():
            values = series.get(panel, [])
            if len(values):
                ax.plot(x_values(series, panel), values, marker="o", markersize=2.5, label=member)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)


# --------------------------------------------------------------------------- sweep figures (fedepic/sweep)

MAX_PANELS_PER_ROW = 3
MAX_ASPECT = 3.0  # a figure at most 3 times as wide as high (and the other way round)


def _within_aspect(width: float, height: float) -> tuple[float, float]:
    """Grow the shorter side until neither side exceeds ``MAX_ASPECT`` times the other."""
    return max(width, height / MAX_ASPECT), max(height, width / MAX_ASPECT)


def heatmap_figure(values: Sequence[Sequence[float]], row_labels: Sequence[str], col_labels: Sequence[str],
                   annotations: Sequence[Sequence[str]], *, title: str, value_label: str, ylabel: str = "",
                   marked: Collection[tuple[int, int]] = (), higher_is_better: bool = True):
    """A rows x columns grid of ``values`` (NaN: no value, drawn grey), each cell showing its
    ``annotations`` text (bold where ``marked``), with one colour bar; the colours run from worse (dark)
    to better (bright) whichever way the metric points."""
    import numpy as np

    data = np.ma.masked_invalid(np.asarray(values, dtype=float))
    rows, cols = data.shape
    width, height = _within_aspect(min(16.0, 2.4 + 1.05 * cols), max(2.4, 1.4 + 0.42 * rows))
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    cmap = plt.get_cmap("viridis" if higher_is_better else "viridis_r").with_extremes(bad="#d9d9d9")
    image = ax.imshow(data, cmap=cmap, aspect="auto")
    ax.set_xticks(range(cols), list(col_labels), rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(rows), list(row_labels), fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    for i in range(rows):
        for j in range(cols):
            r, g, b, _ = cmap(image.norm(data[i, j])) if not np.ma.is_masked(data[i, j]) else (1, 1, 1, 1)
            ax.text(j, i, annotations[i][j], ha="center", va="center", fontsize=7,
                    color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white",
                    fontweight="bold" if (i, j) in marked else "normal")
    fig.colorbar(image, ax=ax, label=value_label, shrink=0.9)
    ax.set_title(title, fontsize=9)
    return fig


Band = tuple[Sequence[float], Sequence[float], Optional[Sequence[Optional[float]]]]  # x, mean, s.e. (None: n = 1)


def band_curves_figure(panels: Mapping[str, Mapping[str, Band]], *, xlabel: str, ylabel: str, title: str):
    """One panel per setting (at most 3 per row, y shared), one line per member with a band of +- one
    standard error where there is one; every member keeps its colour and style in every panel, and one
    legend below the panels names them."""
    import math

    names = list(panels)
    members = list(dict.fromkeys(m for lines in panels.values() for m in lines))
    ncols = min(MAX_PANELS_PER_ROW, max(len(names), 1))
    nrows = max(1, math.ceil(len(names) / ncols))
    width, height = _within_aspect(4.0 * ncols, 3.0 * nrows + 0.4 + 0.25 * math.ceil(len(members) / 4))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), sharey=True, squeeze=False, layout="constrained")
    colors = plt.get_cmap("tab10").colors
    styles = ("-", "--", "-.", ":")
    for ax, name in zip(axes.flat, names):
        for k, member in enumerate(members):
            if member not in panels[name]:
                continue
            xs, means, ses = panels[name][member]
            color, style = colors[k % len(colors)], styles[(k // len(colors)) % len(styles)]
            ax.plot(xs, means, style, color=color, marker="o", markersize=2.5, label=member)
            if ses is not None and any(s is not None for s in ses):
                low = [m - (s or 0.0) for m, s in zip(means, ses)]
                high = [m + (s or 0.0) for m, s in zip(means, ses)]
                ax.fill_between(xs, low, high, color=color, alpha=0.18, linewidth=0)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds and epochs are whole numbers
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
    fig.legend([handles[m] for m in members if m in handles], [m for m in members if m in handles],
               loc="outside lower center", ncol=min(4, max(len(members), 1)), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return fig

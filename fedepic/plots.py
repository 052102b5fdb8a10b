"""Matplotlib figures of training curves and strategy comparisons (Agg backend: no display needed)."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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

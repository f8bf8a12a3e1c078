"""Small figure helpers: every figure has a title, labelled axes and a legend where it has series.

Matplotlib runs on the non-interactive Agg backend (no display needed). Typical use:

    from steerlab.report import figures as F
    fig, ax = F.figure(title="Toxicity per round")
    F.errorbar_lines(ax, [1, 2, 3], {"all (n=24)": (means, stds)})
    F.label(ax, "round", "toxicity")
    F.save(fig, run / "figures" / "toxicity.png")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

PALETTE = ("#1b7837", "#b2182b", "#2166ac", "#e08214", "#762a83", "#4d4d4d", "#35978f", "#c51b7d")
"""Colour-blind-friendly enough, distinct in greyscale print order."""


def figure(nrows: int = 1, ncols: int = 1, title: str | None = None, width: float | None = None,
           height: float | None = None, sharey: bool = False) -> tuple[Figure, np.ndarray | Axes]:
    """A figure with a grid of axes and an optional title. The axes come as matplotlib's ``subplots``
    gives them for a grid of more than one cell (squeezed), and as a ``[1, 1]`` array for a single
    plot (use ``axes.flat[0]``)."""
    w = width or 5.2 * ncols + 0.6
    h = height or 3.9 * nrows + (0.5 if title else 0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w, h), squeeze=nrows * ncols > 1, sharey=sharey)
    if title:
        fig.suptitle(title, fontsize=13, fontweight="bold")
    return fig, axes


def label(ax: Axes, xlabel: str, ylabel: str, title: str | None = None, legend: bool = True,
          legend_loc: str = "best") -> Axes:
    """Set axis labels, an optional axes title, a light grid and the legend (when there are labels)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(loc=legend_loc, fontsize=8, framealpha=0.85)
    return ax


def errorbar_lines(ax: Axes, x: Sequence[float], series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                   colors: Sequence[str] = PALETTE, capsize: float = 4, offset: float = 0.0,
                   linestyles: Sequence[str] | None = None) -> Axes:
    """One line with error bars per series ``{label: (y, yerr)}``; successive series are shifted
    by ``offset`` on x so that their bars do not hide each other."""
    x = np.asarray(x, dtype=float)
    for j, (name, (y, err)) in enumerate(series.items()):
        ls = linestyles[j % len(linestyles)] if linestyles else "-"
        ax.errorbar(x + j * offset, np.asarray(y, float), yerr=np.asarray(err, float), label=name, marker="o",
                    capsize=capsize, color=colors[j % len(colors)], linestyle=ls, linewidth=1.6, markersize=5)
    return ax


def band(ax: Axes, x: Sequence[float], mid: Sequence[float], half_width: Sequence[float], label: str,
         color: str = "#888888", alpha: float = 0.25) -> Axes:
    """A shaded band ``mid +- half_width`` with a dashed centre line (for control distributions)."""
    x, mid, hw = (np.asarray(a, float) for a in (x, mid, half_width))
    ax.fill_between(x, mid - hw, mid + hw, color=color, alpha=alpha, linewidth=0, label=label)
    ax.plot(x, mid, color=color, linestyle="--", linewidth=0.9)
    return ax


def arrows(ax: Axes, start: np.ndarray, end: np.ndarray, color: str, label: str | None = None,
           alpha: float = 0.7, width: float = 0.004) -> Axes:
    """Arrows from ``start[i]`` to ``end[i]`` (``[n, 2]`` arrays) in data coordinates."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    d = end - start
    ax.quiver(start[:, 0], start[:, 1], d[:, 0], d[:, 1], angles="xy", scale_units="xy", scale=1,
              color=color, alpha=alpha, width=width, headwidth=4, headlength=5, label=label)
    # quiver does not extend the data limits: do it by hand
    pts = np.concatenate([start, end])
    ax.update_datalim(pts)
    ax.autoscale_view()
    return ax


def bars(ax: Axes, groups: Sequence[str], series: Mapping[str, Sequence[float]],
         colors: Sequence[str] = PALETTE) -> Axes:
    """Grouped bars: one group of bars per entry of ``groups``, one bar per series."""
    n = len(series)
    x = np.arange(len(groups))
    w = 0.8 / max(n, 1)
    for j, (name, vals) in enumerate(series.items()):
        ax.bar(x + (j - (n - 1) / 2) * w, np.asarray(vals, float), w, label=name, color=colors[j % len(colors)])
    ax.set_xticks(x, list(groups))
    ax.axhline(0, color="black", linewidth=0.7)
    return ax


def save(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save as PNG (tight layout), close the figure and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path

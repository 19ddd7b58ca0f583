"""Plot helpers shared by the reports: headless figures, batch-size axes, marks, saving.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no global state, no
display needed), so reports can be written from any thread or a server.

Examples:
    >>> import tempfile, pathlib
    >>> fig, (ax,) = figure()
    >>> plot_series(ax, [Series("samples/s", [1, 2, 4], [10.0, 18.0, 20.0])])
    >>> batch_size_axis(ax, [1, 2, 4])
    >>> path = save(fig, pathlib.Path(tempfile.mkdtemp()) / "demo.png")
    >>> path.stat().st_size > 1000
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

#: Tick labels on a batch-size axis, at most (more overlap on a plot a few inches wide).
MAX_TICKS = 8
#: Colours that stay apart for colour-blind readers (Okabe-Ito).
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")


@dataclass(frozen=True)
class Series:
    """One line: a label, x and y values, and how to draw it."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = "-o"
    color: str | None = None
    lower: Sequence[float] | None = None  # an error band, when given with ``upper``
    upper: Sequence[float] | None = None


def figure(
    panels: int = 1, width: float = 6.4, height: float = 4.0, *, sharey: bool = False
) -> tuple[Figure, list]:
    """A figure with ``panels`` side-by-side axes (``width`` each), on the Agg canvas."""
    fig = Figure(figsize=(width * panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False, sharey=sharey)[0]
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
    return fig, list(axes)


def plot_series(ax, series: Sequence[Series]) -> None:
    """Draw each series (and its band), colours in order, with a legend."""
    for i, s in enumerate(series):
        color = s.color or COLORS[i % len(COLORS)]
        ax.plot(list(s.x), list(s.y), s.style, color=color, label=s.label, markersize=4)
        if s.lower is not None and s.upper is not None:
            ax.fill_between(list(s.x), list(s.lower), list(s.upper), color=color, alpha=0.15)
    if series:
        ax.legend(fontsize="small", loc="best")


def batch_size_ticks(sizes: Sequence[int], most: int = MAX_TICKS) -> list[int]:
    """At most ``most`` of ``sizes`` for tick marks, evenly thinned, the largest always kept in
    place of its neighbour (never next to it: "8192" and "16384" side by side overlap).

    >>> batch_size_ticks([2**i for i in range(15)] + [20000])
    [1, 4, 16, 64, 256, 1024, 4096, 20000]
    """
    ticks = sorted(set(sizes))
    if len(ticks) <= most:
        return ticks
    kept = ticks[:: math.ceil(len(ticks) / most)]
    kept[-1] = ticks[-1]
    return kept


def batch_size_axis(ax, sizes: Sequence[int], label: str = "batch size B") -> None:
    """A log2 x axis ticked at the given sizes (thinned: :func:`batch_size_ticks`), labelled as
    plain numbers (1, 32, 4000)."""
    ax.set_xscale("log", base=2)
    ticks = batch_size_ticks(sizes)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label)


def mark(
    ax, x: float, label: str, color: str = "#555555", style: str = "--", at: float = 1.0
) -> None:
    """A labelled vertical line (the recommendation, a ceiling, a knee); the label hangs from
    ``at`` (a fraction of the axes' height), so that marks at the same x can stay apart."""
    ax.axvline(x, color=color, linestyle=style, linewidth=1)
    ax.annotate(
        label,
        (x, at),
        xycoords=("data", "axes fraction"),
        xytext=(3, -3),
        textcoords="offset points",
        rotation=90,
        va="top",
        fontsize="small",
        color=color,
    )


def titles(ax, title: str, ylabel: str, xlabel: str | None = None) -> None:
    ax.set_title(title, fontsize="medium")
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)


def save(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Write the figure as PNG (folders made as needed) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path

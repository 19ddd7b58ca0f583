"""The sweep's PNG plots, drawn with the shared helpers of :mod:`batchfit.report.plots`.

Each function takes the plain ``sweep.json`` dict and a path, draws one figure and returns the path:
validation curves per batch size (by examples or steps, and by training seconds), the metric against
batch size (best, final, and on training data, so the gap shows), sharpness against batch size,
time to target against batch size and, with a learning-rate grid, the metric against lr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from batchfit.core.sweep_inputs import Target
from batchfit.core.sweep_records import time_to_target
from batchfit.report.plots import batch_size_axis, figure, save

#: The file of each plot in --out (``lr_grid`` only with --lr-grid).
PLOT_FILES = {
    "curves": "sweep_curves.png",
    "metric": "sweep_metric.png",
    "sharpness": "sweep_sharpness.png",
    "time_to_target": "sweep_time_to_target.png",
    "lr_grid": "sweep_lr_grid.png",
}


def _colours(count: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(0.85 * i / max(count - 1, 1)) for i in range(count)]


def _pretty(metric: str) -> str:
    return metric.replace("val_", "validation ").replace("_", " ")


def _number(value: float | None) -> float:
    """A value to plot: a missing one (a diverged run's, ``null`` in JSON) as NaN, a gap."""
    return float("nan") if value is None else value


def _batch_axis(ax, sizes: list[int]) -> None:
    batch_size_axis(ax, sizes, "batch size B (samples per step)")


def plot_curves(result: dict[str, Any], path: Path) -> str:
    """Validation metric per evaluation point, one line per batch size."""
    metric, sizes = result["metric"], result["sizes"]
    by_steps = "steps" in result["settings"]["budget"]
    fig, (left, right) = figure(2, width=5.5, height=4.2, sharey=True)
    for colour, size in zip(_colours(len(sizes)), sizes, strict=True):
        curve = size["curve"]
        label = f"B={size['batch_size']} (lr {size['lr']:.3g})"
        if size.get("diverged"):
            label += f", diverged at step {size['diverged']['step']}"
        xs = [p["step"] if by_steps else p["samples_seen"] for p in curve]
        ys = [_number(p.get(metric)) for p in curve]
        left.plot(xs, ys, marker=".", color=colour, label=label)
        # log time: sizes differ by multiples in speed; the point at 0 s has no place on it
        timed = [(p["train_seconds"], y) for p, y in zip(curve, ys, strict=True) if p["step"]]
        if timed:
            right.plot(*zip(*timed, strict=True), marker=".", color=colour, label=label)
    target = result["target"]
    for ax in (left, right):
        # labelled in the legend, not on the plot, where it would sit on top of the curves
        ax.axhline(
            target["value"],
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"target: {target['text']}",
        )
    left.set_xlabel("optimizer steps" if by_steps else "training examples seen")
    right.set_xscale("log")
    right.set_xlabel("training seconds, log scale (evaluation excluded)")
    left.set_ylabel(_pretty(metric))
    right.legend(fontsize=8, loc="best")
    fig.suptitle(f"{_pretty(metric)} during training, per batch size")
    return str(save(fig, path))


def plot_metric(result: dict[str, Any], path: Path) -> str:
    """Best and final validation metric against batch size, and the same metric on training data."""
    metric, sizes = result["metric"], result["sizes"]
    bs = [s["batch_size"] for s in sizes]
    train_key = metric.replace("val_", "")
    fig, (ax,) = figure(1, width=6.5, height=4.2)
    # a diverged size has no final or training-subset value: NaN leaves a gap in the line
    nan = float("nan")
    best = [s["best"]["value"] if s.get("best") else nan for s in sizes]
    final = [_number(s["final"].get(metric)) for s in sizes]
    on_train = [(s.get("train_subset") or {}).get(train_key, nan) for s in sizes]
    ax.plot(bs, best, marker="o", label="validation, best")
    ax.plot(bs, final, marker="s", label="validation, final")
    ax.plot(bs, on_train, marker="^", linestyle=":", label="training subset, final (eval mode)")
    _batch_axis(ax, bs)
    ax.set_ylabel(_pretty(metric).replace("validation ", ""))
    ax.legend(fontsize=8)
    ax.set_title(
        f"{_pretty(metric)} vs batch size (gap = distance to the dotted line)", fontsize=10
    )
    return str(save(fig, path))


def plot_sharpness(result: dict[str, Any], path: Path) -> str:
    """Top Hessian eigenvalue of the training loss at the end of each run."""
    all_bs = [s["batch_size"] for s in result["sizes"]]
    sizes = [s for s in result["sizes"] if s.get("sharpness")]  # diverged runs have none
    bs = [s["batch_size"] for s in sizes]
    values = [s["sharpness"]["eigenvalue"] for s in sizes]
    fig, (ax,) = figure(1, width=6.5, height=4.2)
    ax.plot(bs, values, color="tab:red", linewidth=1)
    for b, v, s in zip(bs, values, sizes, strict=True):
        done = s["sharpness"]["converged"]
        ax.plot(b, v, marker="o", color="tab:red", markerfacecolor="tab:red" if done else "white")
    for b, v in zip(bs, values, strict=True):
        ax.annotate(
            f"{v:.3g}", (b, v), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8
        )
    _batch_axis(ax, all_bs)
    ax.set_ylim(bottom=min([0.0, *values]), top=max([*values, 0.0]) * 1.15 or 1.0)
    ax.set_ylabel("top Hessian eigenvalue (training loss)")
    note = "" if all(s["sharpness"]["converged"] for s in sizes) else " (hollow: not converged)"
    if len(sizes) < len(all_bs):
        note += "; diverged sizes have none"
    ax.set_title(f"Sharpness of the weights reached vs batch size{note}", fontsize=10)
    return str(save(fig, path))


def time_to_target_points(result: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The time-to-target plot's data: one point per swept size and one for tune's own run (at
    tune's batch size and lr, ``tune: True``), each with ``batch_size``, ``value`` (``key`` of its
    time to target; ``None`` when it missed it) and ``diverged``."""
    points = [
        {
            "batch_size": s["batch_size"],
            "value": None if s.get("diverged") else s["time_to_target"][key],
            "diverged": bool(s.get("diverged")),
            "tune": False,
        }
        for s in result["sizes"]
    ]
    t = result["target"]
    target = Target(t["metric"], t["value"], t["higher_is_better"], t.get("source", "given"))
    for run in result.get("runs", []):
        if run.get("for_tune"):
            reached = time_to_target(run["curve"], target)
            diverged = bool(run.get("diverged"))
            value = None if diverged else reached.to_dict()[key]
            points.append(
                {
                    "batch_size": run["batch_size"],
                    "value": value,
                    "diverged": diverged,
                    "tune": True,
                }
            )
    return points


def plot_time_to_target(result: dict[str, Any], path: Path) -> str:
    """Training seconds and examples (or steps) to the target; sizes that missed it marked x."""
    by_steps = "steps" in result["settings"]["budget"]
    fig, axes = figure(2, width=5.5, height=4.2)
    panels = (("seconds", "training seconds to target"),) + (
        (("steps", "steps to target"),) if by_steps else (("samples_seen", "examples to target"),)
    )
    for ax, (key, label) in zip(axes, panels, strict=True):
        # a diverged size counts as not reached, whatever it passed on its way
        data = time_to_target_points(result, key)
        swept = [(p["batch_size"], p["value"]) for p in data if not p["tune"]]
        reached = [(b, v) for b, v in swept if v is not None]
        if reached:
            ax.plot(*zip(*reached, strict=True), marker="o", color="tab:blue")
        mine = [p for p in data if p["tune"] and p["value"] is not None]
        for p in mine:
            ax.plot(p["batch_size"], p["value"], marker="*", color="tab:green", markersize=14)
            ax.annotate(
                "tune's run",
                (p["batch_size"], p["value"]),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize=8,
                color="tab:green",
            )
        top = max((p["value"] for p in data if p["value"] is not None), default=1.0) or 1.0
        for p in data:
            b, v = p["batch_size"], p["value"]
            if v is None:
                ax.plot(b, top * 1.1, marker="x", color="tab:red", markersize=10)
                ax.annotate(
                    ("tune's run " if p["tune"] else "")
                    + ("diverged" if p["diverged"] else "not reached"),
                    (b, top * 1.1),
                    textcoords="offset points",
                    xytext=(0, 6),
                    ha="center",
                    fontsize=8,
                    color="tab:red",
                )
        _batch_axis(ax, sorted({p["batch_size"] for p in data}))
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0, top=top * 1.25)
    fig.suptitle(f"Time to {result['target']['text']} ({result['target']['source']} target)")
    return str(save(fig, path))


def plot_lr_grid(result: dict[str, Any], path: Path) -> str | None:
    """Best validation metric against learning rate, one line per batch size (grid sweeps only)."""
    sizes = [s for s in result["sizes"] if s.get("lr_grid")]
    if not sizes:
        return None
    fig, (ax,) = figure(1, width=6.5, height=4.2)
    for colour, size in zip(_colours(len(sizes)), sizes, strict=True):
        grid = size["lr_grid"]
        ax.plot(
            [g["lr"] for g in grid],
            [_number(g["best"]) for g in grid],
            marker="o",
            color=colour,
            label=f"B={size['batch_size']}",
        )
        chosen = [g for g in grid if g["chosen"]][0]
        ax.plot(chosen["lr"], _number(chosen["best"]), marker="*", markersize=14, color=colour)
        for g in grid:
            if g.get("diverged") and g["best"] is not None:
                ax.plot(g["lr"], g["best"], marker="x", markersize=10, color="tab:red")
    ax.set_xscale("log")
    # 1, 2, 5 per decade, plainly labelled; matplotlib's default labels the minor ticks of a
    # grid narrower than a decade, and those labels run into each other
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"best {_pretty(result['metric'])}")
    ax.legend(fontsize=8)
    ax.set_title(
        "Learning-rate grid per batch size (star: chosen; red x: diverged, best before it)",
        fontsize=10,
    )
    return str(save(fig, path))


def write_plots(result: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Draw every plot that applies into ``out_dir``; return ``{name: path}``."""
    out_dir = Path(out_dir)
    draw = {
        "curves": plot_curves,
        "metric": plot_metric,
        "sharpness": plot_sharpness,
        "time_to_target": plot_time_to_target,
        "lr_grid": plot_lr_grid,
    }
    drawn = {name: fn(result, out_dir / PLOT_FILES[name]) for name, fn in draw.items()}
    return {k: v for k, v in drawn.items() if v is not None}

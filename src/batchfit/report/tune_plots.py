"""The PNG plots of a tune report: throughput, predicted time to a result, the noise scale and
the batch gradient's error, memory and step time, the lr range test, and the race.

They read the tune result as plain data (``TuneResult.to_dict()``), never the orchestrator's
types, and label numbers as ``report.md`` writes them
(:func:`~batchfit.report.tune_markdown.number`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from batchfit.report import plots
from batchfit.report.tune_json import TuneData
from batchfit.report.tune_markdown import number
from batchfit.report.tune_race_report import race_plot

PLOT_FILES = {
    "throughput": "throughput.png",
    "time_to_result": "time_to_result.png",
    "noise_scale": "noise_scale.png",
    "gradient_error": "gradient_error.png",
    "memory_and_step_time": "memory_and_step_time.png",
    "lr_range": "lr_range.png",
    "race": "race.png",
}


def write_plots(result: TuneData, out: Path) -> list[Path | None]:
    """Write the plots of a tune result into ``out``: each one's path, ``None`` for a plot with
    nothing to show (no noise scale measured, no lr range test, no race)."""
    return [
        _throughput_plot(result, out / PLOT_FILES["throughput"]),
        _time_plot(result, out / PLOT_FILES["time_to_result"]),
        _noise_plot(result, out / PLOT_FILES["noise_scale"]),
        _gradient_error_plot(result, out / PLOT_FILES["gradient_error"]),
        _memory_time_plot(result, out / PLOT_FILES["memory_and_step_time"]),
        _lr_plot(result, out / PLOT_FILES["lr_range"]),
        race_plot(result["race"], out / PLOT_FILES["race"]),
    ]


def _throughput_plot(result: TuneData, path: Path) -> Path:
    throughput = result["throughput"]
    points = throughput["points"]
    sizes = [p["batch_size"] for p in points]
    fig, (ax,) = plots.figure()
    plots.plot_series(
        ax,
        [
            plots.Series(
                "samples/s (median)",
                sizes,
                [p["samples_per_s"] for p in points],
                lower=[p["batch_size"] / p["step_seconds_max"] for p in points],
                upper=[p["batch_size"] / p["step_seconds_min"] for p in points],
            )
        ],
    )
    plots.batch_size_axis(ax, sizes)
    if throughput["flattens_at"]:
        plots.mark(
            ax,
            throughput["flattens_at"],
            "flat: larger B gains < 10%",
            plots.COLORS[2],
            at=0.45,
        )
    plots.mark(ax, result["recommended"]["batch_size"], "recommended", plots.COLORS[1])
    plots.titles(ax, "Throughput: end-to-end training steps", "samples / s")
    ax.set_ylim(bottom=0)
    return plots.save(fig, path)


def _time_plot(result: TuneData, path: Path) -> Path:
    choice = result["batch_size_choice"]
    curve = choice["curve"]
    fig, (ax,) = plots.figure()
    measured = [c for c in curve if c["measured"]]
    extrapolated = [c for c in curve if not c["measured"]]
    series = [
        plots.Series(
            "measured throughput",
            [c["batch_size"] for c in measured],
            [c["relative_time"] for c in measured],
        )
    ]
    if extrapolated:
        series.append(
            plots.Series(
                "throughput extrapolated (accumulation)",
                [c["batch_size"] for c in extrapolated],
                [c["relative_time"] for c in extrapolated],
                style="s--",  # dashed, square markers
            )
        )
    plots.plot_series(ax, series)
    plots.batch_size_axis(ax, [c["batch_size"] for c in curve])
    ax.set_yscale("log")
    plots.mark(ax, result["recommended"]["batch_size"], "recommended", plots.COLORS[1])
    if choice["runner_up"]:
        plots.mark(ax, choice["runner_up"]["batch_size"], "runner-up", plots.COLORS[4], ":")
    ceiling = result["memory"]["max_micro_batch_size"]
    if ceiling < curve[-1]["batch_size"]:
        plots.mark(ax, ceiling, "memory ceiling", plots.COLORS[6], "-.")
    b_simple = choice["b_simple"]
    what = "B_noise not measured" if b_simple is None else f"B_noise = {b_simple:.0f}"
    plots.titles(
        ax,
        f"Predicted time to a result, (B + B_noise) / throughput ({what})",
        "relative time (1 = best)",
    )
    return plots.save(fig, path)


def _middle(window: Mapping[str, Any]) -> float:
    return (window["first_step"] + window["last_step"]) / 2


def _noise_plot(result: TuneData, path: Path) -> Path | None:
    noise = result["noise"]
    if noise is None or not noise["windows"]:
        return None
    windows = noise["windows"]
    finite = [w for w in windows if math.isfinite(w["b_simple"])]
    unbounded = [_middle(w) for w in windows if not math.isfinite(w["b_simple"])]
    cap = max((w["b_simple"] for w in finite), default=1.0) * 4
    fig, (ax,) = plots.figure()
    span = windows[0]["last_step"] - windows[0]["first_step"] + 1
    series = []
    if finite:
        series.append(
            plots.Series(
                f"B_simple per {span} steps",
                [_middle(w) for w in finite],
                [w["b_simple"] for w in finite],
                lower=[min(w["low"], cap) for w in finite],
                upper=[min(w["high"], cap) for w in finite],
            )
        )
    if unbounded:
        # No value to draw: a marker at the top edge, named for what it means.
        ax.plot(
            unbounded,
            [0.97] * len(unbounded),
            "^",
            color=plots.COLORS[3],
            transform=ax.get_xaxis_transform(),
            label=f"unbounded over {span} steps (|G|^2 not resolved)",
        )
    plots.plot_series(ax, series)
    if unbounded and not series:
        ax.legend(fontsize="small", loc="best")
    _mark_the_estimate(ax, noise)
    plots.titles(
        ax, "Gradient noise scale during the warm-up (shaded: measured)", "B_simple", "step"
    )
    ax.set_ylim(0, cap if finite else 1)
    loss_ax = ax.twinx()
    loss_ax.plot(
        [_middle(w) for w in windows],
        [w["loss"] for w in windows],
        ":",
        color=plots.COLORS[6],
        label="training loss",
    )
    loss_ax.set_ylabel("training loss")
    loss_ax.legend(fontsize="small", loc="lower right")
    return plots.save(fig, path)


def _mark_the_estimate(ax: Any, noise: Mapping[str, Any]) -> None:
    """The estimate as a line and a label, and the measured steps shaded."""
    est = noise["estimate"]
    b_simple = est["b_simple"]
    if math.isfinite(b_simple):
        ax.axhline(b_simple, color=plots.COLORS[1], linestyle="--", linewidth=1)
    ax.axvspan(noise["warmup_steps"] + 0.5, noise["steps"] + 0.5, color=plots.COLORS[1], alpha=0.07)
    ax.annotate(
        f"estimate {number(b_simple)} ({number(est['low'])}-{number(est['high'])})",
        (noise["steps"], b_simple if math.isfinite(b_simple) else 0.9),
        xycoords=("data", "data" if math.isfinite(b_simple) else "axes fraction"),
        xytext=(-4, 4),
        textcoords="offset points",
        ha="right",
        fontsize="small",
        color=plots.COLORS[1],
    )


def _gradient_error_plot(result: TuneData, path: Path) -> Path | None:
    noise = result["noise"]
    if noise is None or not noise["gradient_error"]:
        return None
    points = [p for p in noise["gradient_error"] if 0 < p["relative_error"] < math.inf]
    if not points:
        return None
    sizes = [p["batch_size"] for p in points]
    # c / sqrt(B) fitted to every point by least squares in log space: log c is the mean of
    # log(error) + log(B) / 2.
    c = math.exp(
        sum(math.log(p["relative_error"] * math.sqrt(p["batch_size"])) for p in points)
        / len(points)
    )
    series = [
        plots.Series("measured RMS |g_B - G| / |G|", sizes, [p["relative_error"] for p in points]),
        plots.Series(
            "c / sqrt(B), fitted to all points",
            sizes,
            [c / math.sqrt(b) for b in sizes],
            style="--",
        ),
    ]
    if all(p["predicted"] is not None for p in points):
        series.append(
            plots.Series(
                "predicted from B_simple (finite data)",
                sizes,
                [p["predicted"] for p in points],
                style=":",
            )
        )
    fig, (ax,) = plots.figure()
    plots.plot_series(ax, series)
    plots.batch_size_axis(ax, sizes)
    ax.set_yscale("log")
    plots.titles(
        ax,
        "Error of the batch gradient: 4x the batch halves it (the seed's O(sqrt m) law)",
        "relative error of the batch gradient",
    )
    return plots.save(fig, path)


def _memory_time_plot(result: TuneData, path: Path) -> Path:
    fig, (left, right) = plots.figure(panels=2, width=5.2)
    _memory_panel(left, result["memory"])
    _step_time_panel(right, result["throughput"]["points"], result["step_time_fit"])
    return plots.save(fig, path)


def _memory_panel(ax: Any, memory: Mapping[str, Any]) -> None:
    """Peak memory above the idle process per fitting trial, against proportional growth."""
    trials = sorted(
        (t for t in memory["trials"] if t["fits"] and t["peak_bytes"]),
        key=lambda t: t["micro_batch_size"],
    )
    base = memory["baseline_bytes"]
    if trials:
        sizes = [t["micro_batch_size"] for t in trials]
        above = [max(t["peak_bytes"] - base, 1) / 2**20 for t in trials]
        top = trials[-1]
        plots.plot_series(
            ax,
            [
                plots.Series("peak memory above the idle process", sizes, above),
                plots.Series(
                    "proportional to B",
                    sizes,
                    [above[-1] * s / top["micro_batch_size"] for s in sizes],
                    style="--",
                ),
            ],
        )
        plots.batch_size_axis(ax, sizes, "micro-batch size b")
        ax.set_yscale("log")
    plots.titles(ax, "Memory per training iteration: O(B) once activations dominate", "MiB")


def _step_time_panel(
    ax: Any, points: Sequence[Mapping[str, Any]], fit: Sequence[float] | None
) -> None:
    """Measured step times, and the fit ``a + c B`` through them."""
    sizes = [p["batch_size"] for p in points]
    series = [plots.Series("measured step time", sizes, [p["step_seconds"] * 1e3 for p in points])]
    if fit:
        a, c = fit
        series.append(
            plots.Series(
                f"fit {a * 1e3:.2g} ms + {c * 1e6:.2g} us x B",
                sizes,
                [(a + c * b) * 1e3 for b in sizes],
                style="--",
            )
        )
    plots.plot_series(ax, series)
    if sizes:
        plots.batch_size_axis(ax, sizes)
    ax.set_yscale("log")
    plots.titles(ax, "Step time: a fixed cost, then O(B)", "ms per step")


def _lr_plot(result: TuneData, path: Path) -> Path | None:
    r = result["lr_range"]
    if r is None:
        return None
    finite = [
        (lr, loss) for lr, loss in zip(r["lrs"], r["losses"], strict=True) if math.isfinite(loss)
    ]
    fig, (ax,) = plots.figure()
    plots.plot_series(
        ax,
        [
            plots.Series(
                "smoothed training loss", [f[0] for f in finite], [f[1] for f in finite], style="-"
            )
        ],
    )
    ax.set_xscale("log")
    plots.mark(ax, r["lr_at_min_loss"], "lowest loss", plots.COLORS[6], ":")
    if r["pick"] is not None:
        plots.mark(ax, r["pick"], f"pick {r['pick']:.2g}", plots.COLORS[1])
    ax.set_ylim(top=min(max(f[1] for f in finite), finite[0][1] * 1.3))
    verdict = "" if r["pick"] is not None else " (inconclusive: no pick)"
    plots.titles(
        ax,
        f"Learning-rate range test at batch size {r['batch_size']}{verdict}",
        "loss",
        "learning rate",
    )
    return plots.save(fig, path)

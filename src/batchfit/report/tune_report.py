"""The ``tune`` report: ``report.json`` (stable, versioned keys), ``report.md`` and PNG plots.

``report.json`` keys promised by docs/design.md (version 1): ``recommended.batch_size``,
``recommended.micro_batch_size``, ``recommended.lr``, ``memory.max_micro_batch_size``,
``memory.limit_bytes``, ``throughput[] {batch_size, samples_per_s}``, ``noise.b_simple``,
``noise.critical_batch_size``, ``decision[]``, ``version``. Other keys add detail; values that are
not finite (an unbounded noise scale) are ``null``.

Everything here consumes plain data: the tune result as a dict
(:meth:`batchfit.orchestrate.tune.TuneResult.to_dict`: its fields, each probe's result as a dict
of its fields) for :func:`build_report`, :func:`write_report` and the plots, and the
``report.json`` object for :func:`render_markdown`, :func:`headline` and :func:`reasons_line`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from batchfit.core.options import OPTIONS
from batchfit.core.units import format_bytes
from batchfit.errors import space_checked
from batchfit.files import report_staging, write_json, write_text
from batchfit.report import plots
from batchfit.report.markdown import table
from batchfit.report.tune_race_report import (
    batch_size_range,
    markdown_race,
    markdown_warnings,
    race_json,
    race_plot,
)
from batchfit.version import __version__

#: A tune result as plain data: ``TuneResult.to_dict()``.
TuneData = Mapping[str, Any]

REPORT_VERSION = 1
PLOT_FILES = {
    "throughput": "throughput.png",
    "time_to_result": "time_to_result.png",
    "noise_scale": "noise_scale.png",
    "gradient_error": "gradient_error.png",
    "memory_and_step_time": "memory_and_step_time.png",
    "lr_range": "lr_range.png",
    "race": "race.png",
}
#: Every file a tune report may hold: what an earlier run left is removed before a new one.
REPORT_FILES = ("report.json", "report.md", *PLOT_FILES.values())


def build_report(result: TuneData) -> dict[str, Any]:
    """The ``report.json`` object for a tune result given as plain data (``result.to_dict()``)."""
    choice = result["batch_size_choice"]
    throughput = result["throughput"]
    return {
        "version": REPORT_VERSION,
        "batchfit_version": __version__,
        "task": result["task"],
        "device": result["device"],
        "num_samples": result["num_samples"],
        "recommended": _recommended_json(result["recommended"], choice, result["race"]),
        "memory": _memory_json(result["memory"]),
        "throughput": [_throughput_point_json(p) for p in throughput["points"]],
        "throughput_flattens_at": throughput["flattens_at"],
        "step_time_fit": _step_time_fit_json(result["step_time_fit"]),
        "noise": _noise_json(result["noise"]),
        "lr_range": _lr_range_json(result["lr_range"]),
        "race": race_json(result["race"]),
        "machine": dict(result["machine"]),
        "predicted_time": [dict(c) for c in choice["curve"]],
        "decision": list(result["decision"]),
        "skipped": list(result["skipped"]),
        "time_budget_s": result["time_budget_s"],
        "seconds": result["seconds"],
        "phase_seconds": dict(result["phase_seconds"]),
        "files": [Path(f).name for f in result["report_files"]],
        "task_options": _task_options_json(result.get("task_options")),
    }


def _task_options_json(options: Any) -> list[str] | None:
    return None if options is None else list(options)


def _recommended_json(
    recommended: TuneData, choice: TuneData, race: TuneData | None
) -> dict[str, Any]:
    runner = choice["runner_up"]
    return {
        "batch_size": recommended["batch_size"],
        "micro_batch_size": recommended["micro_batch_size"],
        "accumulation": recommended["accumulation"],
        "lr": recommended["lr"],
        "lr_rule": recommended["lr_rule"],
        "optimizer": recommended["optimizer"],
        "provisional": list(choice["provisional"]),
        "batch_size_range": batch_size_range(race, list(choice["batch_size_range"])),
        "runner_up": None
        if runner is None
        else {
            "batch_size": runner["batch_size"],
            "micro_batch_size": runner["micro_batch_size"],
            "relative_time": runner["relative_time"],
        },
    }


def _memory_json(memory: TuneData) -> dict[str, Any]:
    keys = ("micro_batch_size", "fits", "out_of_memory", "peak_bytes", "error")
    return {
        "max_micro_batch_size": memory["max_micro_batch_size"],
        "limit_bytes": memory["limit_bytes"],
        "limit_source": memory["limit_source"],
        "headroom": memory["headroom"],
        "capped_by": memory["capped_by"],
        "peak_bytes": memory["peak_bytes"],
        "baseline_bytes": memory["baseline_bytes"],
        "peak_measure": memory["peak_measure"],
        "confirmed_in_child": memory["confirmed"],
        "confirmation": memory["confirmation"],
        "trials": [{k: t[k] for k in keys} for t in memory["trials"]],
        "per_rank": list(memory.get("per_rank", ())),
    }


def _throughput_point_json(point: TuneData) -> dict[str, Any]:
    keys = (
        "batch_size",
        "micro_batch_size",
        "samples_per_s",
        "step_seconds",
        "timed_steps",
        "gain_from_doubling",
    )
    return {k: point[k] for k in keys}


def _step_time_fit_json(fit: tuple[float, float] | None) -> dict[str, float] | None:
    if fit is None:
        return None
    return {"fixed_s": fit[0], "per_sample_s": fit[1], "knee_batch_size": fit[0] / fit[1]}


def _noise_json(noise: TuneData | None) -> dict[str, Any]:
    """``noise``: every key present, ``None`` (or empty) when the noise scale was not measured.
    ``b_simple`` and ``critical_batch_size`` hold the same number: B_simple is the estimate of
    the critical batch size."""
    est = noise["estimate"] if noise else None
    at_start = noise["at_start"] if noise else None
    return {
        "b_simple": est["b_simple"] if est else None,
        "critical_batch_size": est["b_simple"] if est else None,
        "interval": [est["low"], est["high"]] if est else None,
        "confidence": est["confidence"] if est else None,
        "g2": est["g2"] if est else None,
        "tr_sigma": est["tr_sigma"] if est else None,
        "steps_averaged": est["pairs"] if est else 0,
        "micro_batch_size": est["small_batch_size"] if est else None,
        "batch_size": est["big_batch_size"] if est else None,
        "finite_data_samples": est["num_samples"] if est else None,
        "warmup_steps": noise["warmup_steps"] if noise else None,
        "loss_start": noise["loss_start"] if noise else None,
        "loss_end": noise["loss_end"] if noise else None,
        "lr": noise["lr"] if noise else None,
        "b_simple_at_start": at_start["b_simple"] if at_start else None,
        "start_steps": noise["start_steps"] if noise else None,
        "trajectory": [dict(w) for w in noise["windows"]] if noise else [],
        "gradient_error": [dict(p) for p in noise["gradient_error"]] if noise else [],
        "gradient_error_reference_samples": noise["gradient_error_reference_samples"]
        if noise
        else None,
        "notes": list(noise["notes"]) if noise else [],
    }


def _lr_range_json(lr_range: TuneData | None) -> dict[str, Any] | None:
    if lr_range is None:
        return None
    return {
        "batch_size": lr_range["batch_size"],
        "lrs": list(lr_range["lrs"]),
        "losses": list(lr_range["losses"]),
        "lr_at_min_loss": lr_range["lr_at_min_loss"],
        "pick": lr_range["pick"],
        "rule": lr_range["rule"],
        "verdict": lr_range["verdict"],
        "stopped_by": lr_range["stopped_by"],
    }


def write_report(result: TuneData, out_dir: Path) -> tuple[dict[str, Any], list[Path]]:
    """Write ``report.json``, ``report.md`` and the plots for a tune result given as plain data
    (``result.to_dict()``) into ``out_dir``; return the report object as written and the paths
    (only plots that have something to show are written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(result)
    # Written beside the old report and swapped in whole: an interrupted run leaves the old one.
    with space_checked(out_dir), report_staging(out_dir, REPORT_FILES) as staging:
        written = [p.name for p in _plots(result, staging) if p is not None]
        report["files"] = ["report.json", "report.md", *written]
        write_json(staging / "report.json", report)
        write_text(staging / "report.md", render_markdown(report))
    return report, [out_dir / name for name in report["files"]]


def headline(report: dict[str, Any]) -> str:
    """One line: ``batch size 256 (micro-batch 256), lr 2.8e-03 (adam, ...)``, marked
    provisional when measurements cut short by time left larger sizes unjudged."""
    r = report["recommended"]
    acc = f" = {r['accumulation']} x {r['micro_batch_size']}" if r["accumulation"] > 1 else ""
    mark = (
        "PROVISIONAL (the time budget cut the measurements short) " if r.get("provisional") else ""
    )
    low, high = r["batch_size_range"]
    span = f"; {low}-{high} equally good" if report.get("race") and low != high else ""
    return (
        f"{mark}batch size {r['batch_size']}{acc} (micro-batch {r['micro_batch_size']}{span}), "
        f"lr {r['lr']:.3g} ({r['lr_rule']})"
    )


def reasons_line(report: dict[str, Any]) -> str:
    """The short why: ``throughput flattens after 256; gradient noise scale ~180, so beyond ~360
    extra samples buy few steps; fits in memory up to 8192``."""
    parts = []
    flat = report["throughput_flattens_at"]
    if flat is not None:
        parts.append(f"throughput flattens after {flat}")
    else:
        points = [(p["batch_size"], p["samples_per_s"]) for p in report["throughput"]]
        peak = max(points, key=lambda p: (p[1], -p[0]), default=None)
        if peak is not None and peak[0] < max(b for b, _ in points):
            parts.append(f"throughput peaks at {peak[0]} and falls at larger sizes")
        else:
            parts.append("throughput still grows at the largest size measured")
    noise = report["noise"]["b_simple"]
    if noise is not None and math.isfinite(noise):
        parts.append(
            f"gradient noise scale ~{noise:.0f}, so beyond ~{2 * noise:.0f} extra samples buy "
            "few steps"
        )
    elif noise is not None:
        parts.append("gradient noise scale unbounded (signal not resolved)")
    else:
        parts.append("gradient noise scale not measured")
    mem = report["memory"]
    if mem["capped_by"] == "time budget":
        parts.append(
            f"fits in memory up to at least {mem['max_micro_batch_size']} (the time budget "
            "ended the search)"
        )
    else:
        parts.append(f"fits in memory up to {mem['max_micro_batch_size']} ({mem['capped_by']})")
    return "; ".join(parts)


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-" if x is None else "unbounded"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.{digits}g}"
    return f"{x}"


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the recommendation, its reasons, the measurements and the plots."""
    sections = (
        _md_summary,
        markdown_race,
        _md_predicted_time,
        _md_throughput,
        _md_noise,
        _md_memory,
        _md_lr_range,
        _md_reproduce,
    )
    return "\n".join(line for section in sections for line in section(report))


def _md_summary(report: dict[str, Any]) -> list[str]:
    """The title, the recommendation, where it was measured, why, and what was cut short."""
    lines = [
        f"# batchfit tune: {report['task']}",
        "",
        f"**Recommended: {headline(report)}.**",
        "",
        *markdown_warnings(report),
        f"Measured on {report['device']} in {report['seconds']:.1f} s (time budget "
        f"{report['time_budget_s']:g} s), {report['num_samples'] or 'a stream of'} training "
        f"samples. batchfit {report['batchfit_version']}, report version {report['version']}.",
        "",
        "## Why",
        "",
        *[f"- {d}" for d in report["decision"]],
        "",
    ]
    if report["skipped"]:
        lines += ["## Cut short or skipped", "", *[f"- {s}" for s in report["skipped"]], ""]
    return lines


def _md_predicted_time(report: dict[str, Any]) -> list[str]:
    rows = [
        [
            c["batch_size"],
            f"{c['micro_batch_size']} x {c['accumulation']}",
            _num(c["samples_per_s"]),
            "yes" if c["measured"] else "no",
            f"{c['relative_time']:.2f}",
        ]
        for c in report["predicted_time"]
    ]
    headers = ["B", "micro-batch x accumulation", "samples/s", "measured", "relative time"]
    return [
        "## Predicted time to a result",
        "",
        "Relative to the best: `(B + B_noise) / samples_per_s(B)`; sizes past the measured range "
        "use the throughput of the largest one (accumulation adds no speed on one device).",
        "",
        "![predicted time](time_to_result.png)",
        "",
        table(headers, rows),
        "",
    ]


def _md_throughput(report: dict[str, Any]) -> list[str]:
    rows = [
        [
            p["batch_size"],
            _num(p["samples_per_s"]),
            f"{p['step_seconds'] * 1e3:.3g} ms",
            "-" if p["gain_from_doubling"] is None else f"{p['gain_from_doubling']:+.0%}",
        ]
        for p in report["throughput"]
    ]
    return [
        "## Throughput",
        "",
        "End-to-end training steps (data included), median of the timed steps after warm-up.",
        "",
        "![throughput](throughput.png)",
        "",
        table(["B", "samples/s", "step time", "gain from doubling"], rows),
        "",
    ]


def _md_noise(report: dict[str, Any]) -> list[str]:
    noise = report["noise"]
    lines = ["## Gradient noise scale", ""]
    if noise["b_simple"] is None and not noise["steps_averaged"]:
        return [*lines, "Not measured (see above).", ""]
    low, high = noise["interval"]
    return [
        *lines,
        f"B_simple = tr(Sigma) / |G|^2 ~ **{_num(noise['b_simple'])}** "
        f"({noise['confidence']:.0%} interval {_num(low)} to {_num(high)}), from "
        f"{noise['steps_averaged']} steps with micro-batches of "
        f"{noise['micro_batch_size']} and batches of {noise['batch_size']}, corrected for "
        f"drawing from {noise['finite_data_samples'] or 'an endless stream of'} samples. "
        f"At the initial weights ({noise['start_steps']} steps without updates) it was "
        f"~{_num(noise['b_simple_at_start'])}; the warm-up took the loss from "
        f"{noise['loss_start']:.3g} to {noise['loss_end']:.3g}.",
        "",
        "![noise scale](noise_scale.png)",
        "",
        "The seed's law, measured: the error of a batch gradient shrinks only as 1/sqrt(B).",
        "",
        "![gradient error](gradient_error.png)",
        "",
    ]


def _per_rank_sentence(per_rank: list[int]) -> str:
    """Under torchrun: the ceiling is the smallest of the ranks' (each measured on its device)."""
    if len(per_rank) < 2:
        return ""
    each = ", ".join(f"rank {r}: {c}" for r, c in enumerate(per_rank))
    least = per_rank.index(min(per_rank))
    return (
        f"It is the minimum of the {len(per_rank)} ranks' ceilings, each measured on its own "
        f"device ({each}); the limit and trials here are rank {least}'s. "
    )


def _md_memory(report: dict[str, Any]) -> list[str]:
    mem = report["memory"]
    rows = [
        [
            t["micro_batch_size"],
            "yes" if t["fits"] else "no",
            format_bytes(t["peak_bytes"]) if t["peak_bytes"] else "-",
            t["error"] or "",
        ]
        for t in mem["trials"]
    ]
    return [
        "## Memory",
        "",
        f"Limit {format_bytes(mem['limit_bytes'])} ({mem['limit_source']}), "
        f"{mem['headroom']:.0%} headroom; measured as {mem['peak_measure']}. "
        f"Ceiling: micro-batch **{mem['max_micro_batch_size']}** ({mem['capped_by']}). "
        + _per_rank_sentence(mem.get("per_rank", []))
        + f"Check in a limited child process: {mem['confirmation']}.",
        "",
        "![memory and step time](memory_and_step_time.png)",
        "",
        table(["micro-batch", "fits", "peak memory", "error"], rows, "rrrl"),
        "",
    ]


def _md_lr_range(report: dict[str, Any]) -> list[str]:
    lr_range = report["lr_range"]
    if not lr_range:
        return []
    outcome = (
        f"pick {lr_range['pick']:.3g} ({lr_range['rule']})"
        if lr_range["pick"] is not None
        else f"no pick: {lr_range['verdict']}; the lr is rule-scaled instead"
    )
    return [
        "## Learning rate",
        "",
        f"Range test at batch size {lr_range['batch_size']}: lowest smoothed loss at lr "
        f"{lr_range['lr_at_min_loss']:.3g}; {outcome}; stopped: {lr_range['stopped_by']}.",
        "",
        "![lr range test](lr_range.png)",
        "",
    ]


#: The epochs the report's train command names: a start, to set to the run's length.
REPRODUCE_EPOCHS = 10


def train_command(report: dict[str, Any]) -> str:
    """The whole ``batchfit train`` command that trains with the recommendation on the task tune
    measured (its ``--model/--data/...`` options, when tune ran from the command line), to copy
    and run; it names the train command's flags (from the option table) whoever made the report."""
    r = report["recommended"]
    settings = {
        "batch_size": r["batch_size"],
        "micro_batch_size": r["micro_batch_size"],
        "lr": f"{r['lr']:.3g}",
        "optimizer": r["optimizer"],
        "epochs": REPRODUCE_EPOCHS,
    }
    options = [*(report.get("task_options") or ())]
    options += [f"{OPTIONS[name].flags[0]} {value}" for name, value in settings.items()]
    return " ".join(["batchfit train", *options])


def _md_reproduce(report: dict[str, Any]) -> list[str]:
    """The train command that trains with the recommendation (see :func:`train_command`)."""
    epochs = OPTIONS["epochs"].flags[0]
    task = (
        f" (with your task's options: tune ran from Python, so {OPTIONS['model'].flags[0]} and "
        f"{OPTIONS['data'].flags[0]} name your model factory and data)"
        if report.get("task_options") is None
        else ""
    )
    return [
        "## Reproduce",
        "",
        f"Train with it ({REPRODUCE_EPOCHS} epochs to start; set {epochs} to your run's "
        f"length){task}:",
        "",
        "```bash",
        train_command(report),
        "```",
        "",
    ]


# --- plots -----------------------------------------------------------------------------------


def _plots(result: TuneData, out: Path) -> list[Path | None]:
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
        f"estimate {_num(b_simple)} ({_num(est['low'])}-{_num(est['high'])})",
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

"""The race in words and a plot (the report's job): ``report.json``'s ``race`` and ``machine``
keys, the report.md sections for them, and the plot of the last round's held-out loss curves.
Plain data in (the race and machine check as ``to_dict()`` gives them), nothing imported from the
orchestrator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batchfit.report import plots
from batchfit.report.markdown import table

Data = Mapping[str, Any]


def race_json(race: Data | None) -> dict[str, Any] | None:
    """``race``: the winner, the finalists with their time relative to the winner's, the level
    they were judged at, and per round its horizon and lanes (contender, steps, data order, the
    lowest held-out loss reached and the curve)."""
    if race is None:
        return None
    return {
        "winner": dict(race["winner"]),
        "finalists": [
            {**contender, "relative_time": relative} for contender, relative in race["finalists"]
        ],
        "equally_good_batch_sizes": sorted({c["batch_size"] for c in race["equally_good"]}),
        "within_noise_batch_sizes": sorted(
            {c["batch_size"] for c in race.get("within_noise") or race["equally_good"]}
        ),
        "order_spread": race.get("order_spread"),
        "level": race["level"],
        "still_improving": race["still_improving"],
        "seconds": race["seconds"],
        "rounds": [_round_json(r) for r in race["rounds"]],
        "notes": list(race["notes"]),
        "lr_for_the_run": _for_the_run_json(race.get("for_the_run")),
    }


def _for_the_run_json(found: Data | None) -> dict[str, Any] | None:
    """``race.lr_for_the_run``: the ladder of learning rates trained after the race at the
    winner's batch size, the fit and the learning rate chosen for the planned run (None: not
    measured)."""
    if found is None:
        return None
    keys = ("batch_size", "horizon_s", "steps", "run_steps", "observed_lr", "lr", "how")
    return {
        **{k: found[k] for k in keys},
        "fit": dict(found["fit"]) if found["fit"] else None,
        "lanes": _lanes_json(found["lanes"]),
    }


def _round_json(round_: Data) -> dict[str, Any]:
    return {
        "name": round_["name"],
        "horizon_s": round_["horizon_s"],
        "level": round_["level"],
        "wall_s": round_["wall_s"],
        "lanes": _lanes_json(round_["lanes"]),
    }


def _lanes_json(lanes: list[Data]) -> list[dict[str, Any]]:
    return [
        {
            **lane["contender"],
            "data_order": lane["data_order"],
            "steps": lane["steps"],
            "step_seconds": lane["step_seconds"],
            "diverged_at": lane["diverged_at"],
            "curve": [list(point) for point in lane["curve"]],
        }
        for lane in lanes
    ]


def batch_size_range(race: Data | None, fallback: list[int]) -> list[int]:
    """``recommended.batch_size_range``: the batch sizes the race could not tell from the winner
    (within its own noise, the data orders' spread, or near the winner's time, as
    :mod:`batchfit.core.race` judges), else what the noise scale's interval gave."""
    if race is None or not race["equally_good"]:
        return fallback
    told_apart = race.get("within_noise") or race["equally_good"]  # the race's own noise
    sizes = [c["batch_size"] for c in told_apart]
    return [min(sizes), max(sizes)]


def markdown_warnings(report: Data) -> list[str]:
    """The machine check's warnings, first thing in the report."""
    warnings = (report.get("machine") or {}).get("warnings") or []
    if not warnings:
        return []
    return ["## Warning: timings may be off", "", *[f"- {w}" for w in warnings], ""]


def markdown_race(report: Data) -> list[str]:
    """The race's finalists and how it ran."""
    race = report.get("race")
    if race is None:
        return []
    rows = [
        [f["batch_size"], f"{f['lr']:.3g}", "-" if not math.isfinite(r) else f"{r:.2f}"]
        for f, r in ((f, f["relative_time"] or math.inf) for f in race["finalists"])
    ]
    rounds = ", ".join(
        f"{r['name']}: {len(r['lanes'])} runs of {r['horizon_s']:.2g} s" for r in race["rounds"]
    )
    return [
        "## The race",
        "",
        "Short training runs from the initial weights, each (batch size, learning rate) for the "
        "same training time (steps x the measured step time), judged by the time to reach a "
        f"held-out loss of {race['level']:.4g}. Rounds: {rounds}.",
        "",
        "![race](race.png)",
        "",
        table(["B", "lr", "time relative to the winner"], rows),
        "",
        *_markdown_for_the_run(race.get("lr_for_the_run")),
    ]


def _markdown_for_the_run(found: Data | None) -> list[str]:
    """The learning rate for the planned run's length, measured after the race."""
    if found is None:
        return []
    lowest = {lane["lr"]: min(loss for _, loss in lane["curve"]) for lane in found["lanes"]}
    rows = [[f"{lr:.3g}", f"{loss:.4g}"] for lr, loss in lowest.items()]
    run = f"{found['run_steps']} steps" if found["run_steps"] else "to its target"
    return [
        "### The learning rate for your run",
        "",
        f"At batch size {found['batch_size']}, each rate trained {found['steps']} steps "
        f"({found['horizon_s']:.2g} s); your run trains {run}. Chosen: lr {found['lr']:.3g}, "
        f"{found['how']}.",
        "",
        table(["lr", "lowest held-out loss reached"], rows),
        "",
    ]


def race_plot(race: Data | None, path: Path) -> Path | None:
    """Held-out loss against training seconds for the last round's runs in the first data order
    (the winner's curve drawn first)."""
    if race is None:
        return None
    last = race["rounds"][-1]
    lanes = [lane for lane in last["lanes"] if lane["data_order"] == last["lanes"][0]["data_order"]]
    winner = race["winner"]
    lanes.sort(key=lambda lane: lane["contender"] != winner)
    series = [
        plots.Series(
            f"B={lane['contender']['batch_size']} lr {lane['contender']['lr']:.3g}",
            [t for t, loss in lane["curve"] if math.isfinite(loss)],
            [loss for _, loss in lane["curve"] if math.isfinite(loss)],
            style="-",
        )
        for lane in lanes[: len(plots.COLORS)]
    ]
    fig, (ax,) = plots.figure()
    plots.plot_series(ax, series)
    ax.set_yscale("log")
    ax.axhline(race["level"], color=plots.COLORS[-1], linestyle=":", linewidth=1)
    plots.titles(ax, f"The race's last round ({last['name']})", "held-out loss", "training s")
    return plots.save(fig, path)

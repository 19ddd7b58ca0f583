"""The ``horizon`` section of a tune report: the run the answer is for (its planned length, the
steps and training time predicted for it, how the budget was set, whether tune ended early) and
what the race showed about training longer (the leader after each round, how long a run the
answer was judged over, for how long a run it holds).

Reads plain data (``TuneResult.to_dict()["horizon"]``); a result recorded before tune read a
horizon has none, and its report's ``horizon`` is None.
"""

from __future__ import annotations

from typing import Any


def horizon_json(reading: dict[str, Any] | None) -> dict[str, Any] | None:
    """``report.json``'s ``horizon``."""
    if reading is None:
        return None
    given = reading["horizon"]
    return {
        "given": given["epochs"] is not None
        or given["max_steps"] is not None
        or given["target"] is not None,
        "text": reading["horizon_text"],
        "epochs": given["epochs"],
        "max_steps": given["max_steps"],
        "target": None if given["target"] is None else dict(given["target"]),
        "predicted_at_batch_size": reading["batch_size"],
        "predicted_steps": reading["steps"],
        "predicted_training_s": reading["training_s"],
        "tuning_left_s": reading["tuning_left_s"],
        "ended_early": reading["ends_early"],
        "budget_set_by": reading["budget_set_by"],
        "judged_over_s": reading["judged_over_s"],
        "judged_steps": reading["judged_steps"],
        "judged_epochs": reading["judged_epochs"],
        "leaders": [
            {"round": name, "training_s": seconds, "leader": leader}
            for name, seconds, leader in reading["leaders"]
        ],
        "target_reached_s": reading["target_reached_s"],
        "holds": reading["holds"],
    }


def markdown_horizon(report: dict[str, Any]) -> list[str]:
    """report.md's horizon section (nothing for a report without one)."""
    h = report.get("horizon")
    if h is None:
        return []
    lines = ["## Your run (horizon)", "", f"- Planned length: {h['text']}."]
    if h["predicted_training_s"] is not None:
        lines.append(
            f"- Predicted at batch size {h['predicted_at_batch_size']}: {h['predicted_steps']} "
            f"steps, {h['predicted_training_s']:.3g} s of training."
        )
    lines.append(f"- Time budget: {report['time_budget_s']:g} s, {h['budget_set_by']}.")
    if h["ended_early"]:
        lines.append(
            f"- Ended early: the run trains in less than the {h['tuning_left_s']:.0f} s of "
            "tuning that was left, so tuning could not pay for itself."
        )
    if h["leaders"]:
        moved = ", ".join(
            f"{x['round']} ({x['training_s']:.2g} s): {x['leader']}" for x in h["leaders"]
        )
        lines.append(f"- The race's leader as its runs trained longer: {moved}.")
    lines += [f"- {h['holds']}", ""]
    return lines

"""The ``report.json`` object of a tune result: stable, versioned keys.

Keys promised by docs/design.md (version 1): ``recommended.batch_size``,
``recommended.micro_batch_size``, ``recommended.lr``, ``memory.max_micro_batch_size``,
``memory.limit_bytes``, ``throughput[] {batch_size, samples_per_s}``, ``noise.b_simple``,
``noise.critical_batch_size``, ``decision[]``, ``version``. Other keys add detail; values that are
not finite (an unbounded noise scale) are written as ``null``.

It reads the tune result as plain data (:meth:`batchfit.orchestrate.tune.TuneResult.to_dict`: its
fields, each probe's result as a dict of its fields), never the orchestrator's types.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from batchfit.report.tune_horizon_report import horizon_json
from batchfit.report.tune_race_report import batch_size_range, race_json
from batchfit.version import __version__

#: A tune result as plain data: ``TuneResult.to_dict()``.
TuneData = Mapping[str, Any]

REPORT_VERSION = 1


def build_report(result: TuneData) -> dict[str, Any]:
    """The ``report.json`` object for a tune result given as plain data (``result.to_dict()``)."""
    choice = result["batch_size_choice"]
    throughput = result["throughput"]
    return {
        "version": REPORT_VERSION,
        "batchfit_version": __version__,
        "task": result["task"],
        "device": result["device"],
        "precision": result.get("precision", "32"),
        "compile": result.get("compile"),
        "num_samples": result["num_samples"],
        "recommended": _recommended_json(
            result["recommended"],
            choice,
            result["race"],
            result["skipped"],
            bool((result.get("horizon") or {}).get("ends_early")),
        ),
        "memory": _memory_json(result["memory"]),
        "throughput": [_throughput_point_json(p) for p in throughput["points"]],
        "throughput_flattens_at": throughput["flattens_at"],
        "step_time_fit": _step_time_fit_json(result["step_time_fit"]),
        "noise": _noise_json(result["noise"]),
        "lr_range": _lr_range_json(result["lr_range"]),
        "race": race_json(result["race"]),
        "horizon": horizon_json(result.get("horizon")),
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


#: Why an answer of a tune that ended early (the run too short to repay tuning) is provisional.
ENDED_EARLY = (
    "Tuning cannot pay for itself on a run this short: tune ended early and raced learning "
    "rates at the predicted batch size only, so no race of batch sizes confirmed it."
)


def provisional_reasons(
    choice_provisional: Sequence[str],
    raced: bool,
    skipped: Sequence[str],
    ended_early: bool = False,
) -> list[str]:
    """Why an answer is provisional: the measurements cut short that left larger sizes unjudged,
    and a race that did not run (its reason, from the phases' notes), since then nothing trained
    the prediction before it became the answer."""
    reasons = list(choice_provisional)
    if ended_early:
        reasons.append(ENDED_EARLY)
    if not raced:
        why = next((s for s in skipped if s.startswith(("The race was not", "The race not"))), None)
        reasons.append(why or "The race was not run: the prediction is unconfirmed.")
    return reasons


def _recommended_json(
    recommended: TuneData,
    choice: TuneData,
    race: TuneData | None,
    skipped: Sequence[str],
    ended_early: bool,
) -> dict[str, Any]:
    runner = choice["runner_up"]
    return {
        "batch_size": recommended["batch_size"],
        "micro_batch_size": recommended["micro_batch_size"],
        "accumulation": recommended["accumulation"],
        "lr": recommended["lr"],
        "lr_rule": recommended["lr_rule"],
        "optimizer": recommended["optimizer"],
        "provisional": provisional_reasons(
            choice["provisional"], race is not None, skipped, ended_early
        ),
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
        "precision": memory.get("precision", "32"),
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

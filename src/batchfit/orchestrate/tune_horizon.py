"""The user's run inside ``tune`` (the orchestrator's job): once the throughput phase has
measured step times, predict how long the planned run trains (:mod:`batchfit.core.horizon`),
set a long run's time budget, end early when tuning cannot pay for itself, and afterwards read
what the race measured about the horizon (how its ranking moved as its rounds trained longer,
how long a run its answer was judged over, when the winner reached a target).

Why: tune's answer is judged over the race's runs, seconds of training; a run of hours may
favour a larger batch (the critical batch grows as the loss falls), and a run of seconds cannot
repay a minute of tuning. The report says which case the answer is in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from batchfit.core.horizon import (
    LONG_RUN_SHARE,
    TUNING_SHARE,
    Horizon,
    long_run_budget,
    share_of_run,
    tuning_pays,
)
from batchfit.core.options import opt
from batchfit.orchestrate.tune_state import TuneRun
from batchfit.probe.race import RaceResult

#: The share of the time left that a run too short to repay tuning still spends: on the noise
#: probe, the range test and a race of learning rates at the predicted batch size alone (the
#: range test's pick was off 4-5x on held-out tasks; the race measures the lr).
EARLY_SHARE = 0.25
#: ... and never less than this (or all that is left): fewer seconds leave the noise probe and
#: the range test too few steps to read anything.
EARLY_AT_LEAST_S = 10.0
#: A run this many times longer than the race judged over is "far longer" than the evidence.
FAR_LONGER = 3.0


@dataclass(frozen=True)
class HorizonReading:
    """The planned run against tune's measurements: its predicted steps and training seconds at
    ``batch_size`` (None: not known before training), whether tune ended early because tuning
    could not pay for itself, how the budget was set, and what the race showed about training
    longer (filled in by :func:`after_race`)."""

    horizon: Horizon
    batch_size: int | None = None
    steps: int | None = None
    training_s: float | None = None
    tuning_left_s: float | None = None
    ends_early: bool = False
    budget_set_by: str = "given"
    #: The longest training the race judged its answer over, and that many steps of the winner.
    judged_over_s: float | None = None
    judged_steps: int | None = None
    #: ``judged_steps`` as passes over the training data (None: its size is not known).
    judged_epochs: float | None = None
    #: The race's leader after each round: (round, training seconds per run, leader).
    leaders: tuple[tuple[str, float, str], ...] = ()
    #: Training seconds at which the winner's held-out loss first reached the target (None: not
    #: reached in the race, or no target).
    target_reached_s: float | None = None
    holds: str = ""
    #: The horizon in words (plain data carries it to the report).
    horizon_text: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "horizon_text", self.horizon.describe())


def read_horizon(run: TuneRun, size: int, step_s: float) -> HorizonReading:
    """After the throughput phase: the planned run at batch size ``size`` (the throughput-based
    answer) taking ``step_s`` per step, a long run's budget (when none was given), and whether
    tuning can still pay for itself."""
    horizon, budget = run.horizon, run.budget
    if not horizon.counted:
        return HorizonReading(horizon, budget_set_by=budget.set_by)
    steps = horizon.steps(size, run.source.num_samples)
    if steps is None:  # epochs of a stream of unknown length
        return HorizonReading(horizon, budget_set_by=budget.set_by)
    seconds = steps * step_s
    longer = long_run_budget(seconds, budget.total) if run.config.time_budget is None else None
    if longer is not None:
        budget.extend_to(longer, f"{LONG_RUN_SHARE:.0%} of the predicted {_span(seconds)} run")
        run.log(f"budget: {longer:.0f} s, {budget.set_by} (a {opt('time_budget')} sets it)")
    left = max(budget.remaining(), 0.0)
    ends = not tuning_pays(seconds, left)
    share = share_of_run(seconds, left) if run.config.time_budget is None else None
    if not ends and share is not None:  # tuning in full would cost too much of the run
        cut = max(share, min(left, EARLY_AT_LEAST_S))
        budget.cut_to(cut)
        budget.set_by = f"cut to {cut:.0f} s left: {TUNING_SHARE:.0%} of the predicted "
        budget.set_by += f"{_span(seconds)} run"
        run.log(
            f"budget: {budget.set_by} (tuning should cost a small part of the run it tunes; a "
            f"{opt('time_budget')} sets it)"
        )
    line = f"horizon: {horizon.describe()}: ~{steps} steps, ~{_span(seconds)} of training at "
    line += f"batch size {size}"
    if ends:
        line += (
            f"; this run trains in ~{_span(seconds)}, less than the {left:.0f} s of tuning left, "
            "so tuning cannot pay for itself: ending early (a short noise probe, and learning "
            "rates raced at one batch size)"
        )
    run.log(line)
    if ends:  # the noise probe, range test and a race of lrs at one size, in a share of it
        budget.cut_to(max(EARLY_SHARE * left, min(left, EARLY_AT_LEAST_S)))
    return HorizonReading(horizon, size, steps, seconds, left, ends, budget.set_by)


def run_seconds(run: TuneRun, step_seconds: dict[int, float]) -> dict[int, float] | None:
    """Each raced batch size's training seconds for the planned run (None: not known), so that
    no race round trains longer than the run it judges for."""
    horizon, n = run.horizon, run.source.num_samples
    if not horizon.counted:
        return None
    out = {}
    for size, step_s in step_seconds.items():
        seconds = horizon.training_seconds(size, n, step_s)
        if seconds is None:
            return None
        out[size] = seconds
    return out


def after_race(
    reading: HorizonReading, raced: RaceResult | None, num_samples: int | None = None
) -> HorizonReading:
    """The reading with what the race measured about training longer, and for how long a run the
    answer holds."""
    if raced is None:
        return replace(reading, holds=_holds_without_race(reading))
    last = raced.rounds[-1]
    winner = raced.winner
    step_s = next(lane.step_seconds for lane in last.lanes if lane.contender == winner)
    judged = last.horizon_s
    leaders = tuple(
        (r.name, r.horizon_s, r.contenders[r.standings[0].lane].label()) for r in raced.rounds
    )
    reached = target_reached(raced, reading.horizon) if reading.horizon.target else None
    steps = round(judged / step_s)
    if reading.training_s is not None:  # the run at the answer's batch size, not the cheap one
        run_steps = reading.horizon.steps(winner.batch_size, num_samples)
        if run_steps is not None:
            reading = replace(
                reading,
                batch_size=winner.batch_size,
                steps=run_steps,
                training_s=run_steps * step_s,
            )
    done = replace(
        reading,
        judged_over_s=judged,
        judged_steps=steps,
        judged_epochs=steps * winner.batch_size / num_samples if num_samples else None,
        leaders=leaders,
        target_reached_s=reached,
    )
    return replace(done, holds=_holds(done, raced.still_improving))


def target_reached(raced: RaceResult, horizon: Horizon) -> float | None:
    """When the winner's held-out loss first reached the target, in its longest run."""
    target = horizon.target
    assert target is not None
    last = raced.rounds[-1]
    times = [
        t for lane in last.lanes_of(raced.winner) for t, loss in lane.curve if target.reached(loss)
    ]
    return min(times) if times else None


def _holds(reading: HorizonReading, still_improving: bool) -> str:
    """For how long a run the answer holds, in words."""
    judged = reading.judged_over_s or 0.0
    epochs = reading.judged_epochs
    passes = f", {epochs:.2g} epochs" if epochs is not None else ""
    over = (
        f"The answer was judged over runs of {judged:.2g} s of training ({reading.judged_steps} "
        f"steps at the winner's batch size{passes})"
    )
    target = reading.horizon.target
    if target is not None:
        if reading.target_reached_s is not None:
            return (
                f"{over}; the winner reached {target.describe()} after "
                f"{reading.target_reached_s:.2g} s of them, so the answer is for your run's "
                "horizon."
            )
        return (
            f"{over}; the winner did not reach {target.describe()} in them, so your run is "
            "longer than the race saw and a larger batch may suit it (a larger "
            f"{opt('time_budget')} races further)."
        )
    if reading.training_s is None:
        later = " and a larger batch may win a run much longer" if still_improving else ""
        return (
            f"{over}: it holds for runs of about that length{later}; give your run's length "
            f"({opt('epochs')} or {opt('max_steps')}) to have it judged for that run."
        )
    ratio = reading.training_s / judged if judged else math.inf
    if ratio <= FAR_LONGER:
        return f"{over}; your run trains ~{_span(reading.training_s)}, within reach of that."
    falling = (
        "and the winner's loss was still falling, so a larger batch may suit it"
        if still_improving
        else "though the winner's loss had levelled off, so the answer should carry over"
    )
    return (
        f"{over}; your run trains ~{_span(reading.training_s)}, {ratio:.0f}x longer, {falling} "
        f"(a larger {opt('time_budget')} races further)."
    )


def _holds_without_race(reading: HorizonReading) -> str:
    if reading.ends_early:
        return (
            f"No race ran: the run trains in ~{_span(reading.training_s or 0.0)}, too short for "
            "tuning to pay for itself, so the answer is the noise-scale model's prediction, "
            "unconfirmed."
        )
    return "No race ran, so nothing measured how long a run the answer holds for."


def _span(seconds: float) -> str:
    """Seconds as a reader would say them.

    >>> _span(42.0), _span(5400.0), _span(9000.0), _span(200_000.0)
    ('42 s', '90 min', '2.5 h', '2.3 days')
    """
    if seconds < 120:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"

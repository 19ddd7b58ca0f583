"""After the race, the learning rate for the planned run's length (the probes' job): the race's
winning batch size trained at a ladder of lower learning rates for as long as the time left
allows, and the rate for the run read from those curves (:mod:`batchfit.core.horizon_lr`).

Why: a race round lasts a fraction of a second, and over so short a horizon the boldest stable
rate wins. On the long benchmark tasks the race's rate was 6-8x the best for a run of a minute,
whose constant-rate floor then sat above the target. Measured at the race's winning batch size
over longer lanes, the best rate falls as the lanes grow; the fit says how fast, and so where it
lands at the run's length.

Only for a run much longer than the race's rounds (:data:`LONG_RUN`): for a short run the race's
rounds already train about as long as the run, and their answer stands.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from batchfit.core.horizon_lr import FloorFit, fit_floor
from batchfit.probe.harness import Deadline, OutOfTime
from batchfit.probe.race import Contender, Lane, _Field, run_lane

#: The ladder's learning rates, as fractions of the race's winning rate.
LADDER = (1.0, 0.5, 0.25, 0.125)
#: The probe runs when the planned run trains at least this many times the race's last round.
LONG_RUN = 30.0
#: The share of the race's time kept for the ladder when it is planned.
SHARE = 0.4
#: The ladder's lanes train at least this many times the race's last round, else it adds
#: little the race did not see.
MIN_GAIN = 1.5
#: The fit may lower the rate seen best at the ladder's horizon by this factor at most: an
#: extrapolation past it is beyond what the curves show.
MAX_EXTRAPOLATION = 4.0
#: The share of the time left that the ladder plans to use: its cost is predicted from the
#: race's rounds, on a clock that may not be the budget's.
SAFETY = 0.8


@dataclass(frozen=True)
class LrForTheRun:
    """The ladder at the winner's batch size: its lanes (``horizon_s`` training seconds each,
    ``steps`` steps), the rate that ended best (``observed_lr``), the fit, the run's steps at
    that batch size, and the rate chosen for the run (``lr``), with how it was chosen."""

    batch_size: int
    horizon_s: float
    steps: int
    run_steps: int | None  # None: the run trains to a loss, its length unknown
    lanes: tuple[Lane, ...]
    observed_lr: float
    fit: FloorFit | None
    lr: float
    how: str


def wanted(run_seconds: float | None, last_round_s: float) -> bool:
    """Whether the run is long enough next to the race's rounds for the ladder to matter."""
    return run_seconds is not None and run_seconds >= LONG_RUN * last_round_s


@dataclass(frozen=True)
class RunToJudge:
    """What the ladder chooses for: the run's training seconds at the winner's batch size
    (``seconds``), or, for a run that trains until a held-out loss is reached, that loss
    (``level``; its length unknown)."""

    seconds: float | None = None
    level: float | None = None


def lr_for_the_run(
    field_: _Field,
    winner: Contender,
    run: RunToJudge,
    last_round_s: float,
    wall_per_training_second: float,
    deadline: Deadline,
    log: Callable[[str], None],
) -> LrForTheRun | str:
    """The ladder at ``winner``'s batch size within ``deadline`` (the race's last round trained
    ``last_round_s``), or why it did not run."""
    step_s = field_.step_seconds[winner.batch_size]
    affordable = SAFETY * deadline.remaining() / (len(LADDER) * wall_per_training_second)
    horizon = min(affordable, run.seconds / 3) if run.seconds else affordable
    if horizon < MIN_GAIN * last_round_s:
        return (
            f"the time left trains the ladder of learning rates for {max(horizon, 0):.2g} s, "
            f"too little next to the race's {last_round_s:.2g} s rounds"
        )
    rates = [float(f"{winner.lr * f:.4g}") for f in LADDER]
    mine = f"your run: {run.seconds:.3g} s" if run.seconds else f"your target: loss {run.level}"
    log(
        f"race: the lr for your run: B={winner.batch_size} at lr "
        + ", ".join(f"{lr:.3g}" for lr in rates)
        + f", {horizon:.2g} s each ({mine})"
    )
    ladder = replace(field_, first_horizon_s=horizon, deadline=deadline)
    lanes: list[Lane] = []
    for lr in rates:  # boldest first: a ladder cut short keeps the rates nearest the race's
        try:
            lanes.append(
                run_lane(ladder, Contender(winner.batch_size, lr, winner.micro_batch_size), horizon)
            )
        except OutOfTime:
            break
    if len(lanes) < 2:
        return "the ladder of learning rates ran out of time"
    run_steps = run.seconds / step_s if run.seconds else None
    return _chosen(winner, lanes, horizon, run_steps, run.level)


def _chosen(
    winner: Contender,
    lanes: list[Lane],
    horizon: float,
    run_steps: float | None,
    level: float | None = None,
) -> LrForTheRun:
    """The rate for the run: the fit's best rate at ``run_steps`` (or, with a ``level`` to
    reach, the one the fit says reaches it soonest), kept between the rate that ended the
    ladder best and :data:`MAX_EXTRAPOLATION` times lower; that rate itself when the fit found
    no floor to balance (or no rate that reaches the level)."""
    observed = min(lanes, key=_end_loss).contender.lr
    points = [
        (lane.contender.lr, seconds / lane.step_seconds, loss)
        for lane in lanes
        for seconds, loss in _best_so_far(lane.curve)[1:]
        if seconds >= horizon / 10
    ]
    fit = fit_floor(points)
    low = observed / MAX_EXTRAPOLATION
    if fit is None:
        best = None
    elif level is not None:
        best = fit.fastest_lr(level, low, observed)
    else:
        best = fit.best_lr(run_steps or 0.0)
    if fit is None or best is None:
        lr, how = observed, "the ladder's best at its horizon (the fit gave nothing to extrapolate)"
    elif level is not None:
        lr = best
        steps = fit.steps_to(lr, level)
        how = (
            f"fitted to the ladder: the fastest to loss {level:.4g} (~{steps:.0f} steps predicted)"
        )
    else:
        lr = min(observed, max(best, low))
        how = (
            f"fitted to the ladder and taken to your run's {run_steps:.0f} steps (best lr falls "
            f"as steps^-{fit.horizon_exponent:.2f})"
        )
    lr = float(f"{lr:.4g}")
    planned = round(run_steps) if run_steps else None
    return LrForTheRun(
        winner.batch_size, horizon, lanes[0].steps, planned, tuple(lanes), observed, fit, lr, how
    )


def _best_so_far(curve: tuple[tuple[float, float], ...]) -> list[tuple[float, float]]:
    """The lowest held-out loss reached by each point of ``curve``: Adam's loss spikes (on a
    regression near its noise floor a lane jumped 0.29 -> 1.29 -> 0.31 between evaluations)
    would otherwise decide the fit, and a run to a target is over the first time it gets
    there."""
    out, best = [], math.inf
    for seconds, loss in curve:
        best = min(best, loss)
        out.append((seconds, best))
    return out


def _end_loss(lane: Lane) -> float:
    """The lowest held-out loss a lane reached (inf once it diverged)."""
    if lane.diverged_at is not None:
        return math.inf
    return _best_so_far(lane.curve)[-1][1]

"""The race as a phase inside ``tune`` (the orchestrator's job), its last: confirm the batch size
and measure the learning rate by racing short training runs around the prediction
(:mod:`batchfit.probe.race`), planned by :mod:`batchfit.orchestrate.race_plan`.

The noise-scale model and the range test give a *prior*: a batch size ``B0`` and a learning rate
at it. The race tries the batch sizes from ``B0 / 2`` to ``4 B0`` with a grid of learning rates
around the prior's (scaled to each size by the lr rule), from the initial weights, for equal
training time, judged on held-out data; its winner is the answer. Held-out data is the
validation data when given, else a seeded fifth of the training data (at most 4096 samples),
which the race then does not train on.
"""

from __future__ import annotations

import math
from dataclasses import replace

from batchfit.core.accounting import split_batch
from batchfit.core.lr_scaling import scale_lr
from batchfit.core.options import opt
from batchfit.core.recommend import BatchSizeChoice, fit_step_time
from batchfit.data.source import BatchSource
from batchfit.inputs import split_off
from batchfit.orchestrate import race_plan
from batchfit.orchestrate.tune_horizon import run_seconds, target_reached
from batchfit.orchestrate.tune_state import Phase, TuneRun, timed
from batchfit.probe import race_horizon
from batchfit.probe.harness import Deadline, preserved
from batchfit.probe.race import (
    EVAL_BATCH_SIZE,
    GROWTH,
    Contender,
    RaceResult,
    RaceSettings,
    field_for,
    race,
    wall_rate,
)
from batchfit.probe.throughput import Throughput

#: The share of the training data held out to judge the race when no validation data is given
#: (at most :data:`MAX_HELD_OUT` samples).
HELD_OUT_FRACTION = 0.2
MAX_HELD_OUT = 4096
#: The race is not run on fewer held-out samples than this: its judgement would be noise.
MIN_HELD_OUT = 32
#: ... nor in less time than this: its runs would be too short to tell learning rates apart.
MIN_RACE_SECONDS = 3.0
#: Held-out evaluations a lane makes, about (:func:`~batchfit.probe.race.eval_steps`: 12 per
#: screening horizon and 12 more spaced by sqrt(2) early on), to plan the race with their time.
EVALUATIONS_PER_LANE = 24


def held_out_data(
    source: BatchSource, val_data: BatchSource | None, seed: int
) -> tuple[BatchSource, BatchSource] | str:
    """``(data to train on, data to judge on)``, or why there is none."""
    if val_data is not None:
        return source, val_data
    n = source.num_samples
    if n is None:
        return "a stream of unknown length cannot be split, and no validation data was given"
    if n * HELD_OUT_FRACTION < MIN_HELD_OUT:
        return f"{n} samples are too few to hold {MIN_HELD_OUT} out for judging"
    return split_off(source, min(HELD_OUT_FRACTION, MAX_HELD_OUT / n), seed)


def step_seconds(throughput: Throughput, sizes: list[int], ceiling: int) -> dict[int, float]:
    """The step time of each batch size: measured, or for a size above the largest measured one
    (it runs as accumulated micro-batches), that many micro-batches of the largest."""
    measured = {p.batch_size: p.step_seconds for p in throughput.points}
    top = max(b for b in measured if b <= ceiling)
    out = {}
    for size in sizes:
        if size in measured:
            out[size] = measured[size]
        else:
            micro, parts = split_batch(size, top)
            out[size] = parts * measured.get(micro, measured[top] * micro / top)
    return out


def contenders(
    choice: BatchSizeChoice,
    lr_center: float,
    lr_rule: str,
    smallest: int,
    largest: int,
    ceiling: int,
    user_lr: bool,
    knee: float = 0.0,
) -> dict[int, list[Contender]]:
    """Batch size -> its contenders: the sizes around the prediction, each with the learning
    rates of :data:`~batchfit.orchestrate.race_plan.LR_FACTORS` around ``lr_center`` (the learning
    rate at the predicted size) scaled by ``lr_rule``; only the scaled rate when the user gave the
    lr."""
    sizes = race_plan.batch_sizes_around(choice.batch_size, smallest, largest, knee)
    factors = (1.0,) if user_lr else race_plan.LR_FACTORS
    grid = {}
    for size in sizes:
        center = scale_lr(lr_center, choice.batch_size, size, lr_rule)
        micro = split_batch(size, ceiling)[0]
        grid[size] = [Contender(size, float(f"{center * f:.4g}"), micro) for f in factors]
    return grid


@timed
def race_phase(
    run: TuneRun,
    choice: BatchSizeChoice,
    throughput: Throughput,
    ceiling: int,
    lr_center: float,
    one_size: bool = False,
) -> Phase[RaceResult | None]:
    """The race around ``choice`` and ``lr_center`` (the learning rate at its batch size) within
    micro-batches of ``ceiling``, or None with a note when it cannot be run. ``one_size``: only
    the learning rates at ``choice``'s batch size race (a run too short to repay a full race)."""
    deadline = run.budget.phase("race")
    if deadline.remaining() < MIN_RACE_SECONDS:
        return _not_run(
            f"{max(deadline.remaining(), 0):.1f} s were left for it and it needs "
            f"{MIN_RACE_SECONDS:g} s at least; the prediction stands unconfirmed (a larger "
            f"{opt('time_budget')} confirms it)"
        )
    split = held_out_data(run.source, run.val_data, run.config.seed)
    if isinstance(split, str):
        return _not_run(split)
    train, held_out = split
    largest = _largest(run.config.max_batch_size, train.num_samples, 4 * choice.batch_size)
    grid = contenders(
        choice,
        lr_center,
        run.lr.scaling,
        run.smallest,
        max(largest, run.smallest),
        ceiling,
        user_lr=run.lr.given is not None,
        knee=_knee(throughput),
    )
    if one_size:  # the predicted size, or the nearest raced (the held-out share may cap it)
        size = min(grid, key=lambda b: (abs(math.log(b / choice.batch_size)), -b))
        grid = {size: grid[size]}
    times = step_seconds(throughput, list(grid), ceiling)
    rates = max(len(c) for c in grid.values())
    level = _loss_target(run)
    runs_s = run_seconds(run, times)
    eval_s = _evaluation_seconds(throughput, held_out.num_samples, ceiling) * EVALUATIONS_PER_LANE
    ladder = (runs_s, level) if run.lr.given is None else (None, None)  # the user's lr stays
    seconds = deadline.remaining()
    fits, rounds_s = _planned(list(grid), rates, times, seconds, choice.batch_size, ladder, eval_s)
    if fits is None:
        return _not_run(
            f"not even a screening round of batch size {choice.batch_size} fits in the "
            f"{max(deadline.remaining(), 0):.1f} s left; a larger {opt('time_budget')} races it"
        )
    sizes, count, horizon = fits
    shrunk = _shrunk_note(grid, sizes, count, rates)
    grid = {size: _middle(grid[size], count) for size in sizes}
    times = {size: times[size] for size in sizes}
    lanes = sum(len(c) for c in grid.values())
    run.log(
        f"race: {lanes} runs of {horizon:.2g} s of training from the initial weights, batch "
        f"sizes {', '.join(map(str, grid))}; held-out loss on {held_out.num_samples} samples"
    )
    settings = RaceSettings(
        grid,
        times,
        optimizer=run.lr.optimizer,
        first_horizon_s=horizon,
        seed=run.config.seed,
        lr_power={"linear": 1.0, "sqrt": 0.5, "none": 0.0}[run.lr.scaling],
        run_seconds=None if runs_s is None else {size: runs_s[size] for size in sizes},
    )
    rounds = deadline if rounds_s is None else Deadline(rounds_s)
    raced = run.unless_it_fails(
        "The race was",  # "The race was not measured: ..."
        lambda: race(run.model, train, held_out, run.loss, settings, deadline=rounds, log=run.log),
    )
    if raced.result is not None and rounds_s is not None:
        raced = _with_lr_for_the_run(run, raced, (train, held_out), settings, level, deadline)
    return raced if shrunk is None else replace(raced, notes=(shrunk, *raced.notes))


def _planned(
    sizes: list[int],
    rates: int,
    times: dict[int, float],
    seconds: float,
    keep: int,
    run: tuple[dict[int, float] | None, float | None],
    eval_s: float,
) -> tuple[tuple[list[int], int, float] | None, float | None]:
    """The race that fits (:func:`~batchfit.orchestrate.race_plan.shrunk_to_fit`), and the
    seconds its rounds may take when a share is kept for the learning rate for the run (None:
    none is, the run being about as short as the race's rounds, or neither its length nor a
    held-out loss to reach known). ``run``: each size's training seconds in the run, and the
    held-out loss it trains to."""
    runs_s, level = run
    if runs_s or level is not None:
        rounds_s = seconds * (1 - race_horizon.SHARE)
        fits = race_plan.shrunk_to_fit(sizes, rates, times, rounds_s, keep, GROWTH, eval_s)
        shortest = min(runs_s.values()) if runs_s else None
        long_run = level is not None or (
            fits is not None and race_horizon.wanted(shortest, fits[2] * GROWTH)
        )
        if fits and long_run:
            return fits, rounds_s
    return race_plan.shrunk_to_fit(sizes, rates, times, seconds, keep, GROWTH, eval_s), None


def _evaluation_seconds(throughput: Throughput, samples: int | None, ceiling: int) -> float:
    """Seconds of one held-out evaluation of ``samples``, predicted from the measured step time
    at the evaluation's batch size: a forward pass without gradients costs about a third of a
    training step (forward, backward, update). Predicted rather than timed, so nothing runs
    on the model before the race does."""
    if not samples:
        return 0.0
    batch = min(EVAL_BATCH_SIZE, ceiling, samples)
    return step_seconds(throughput, [batch], ceiling)[batch] / 3 * math.ceil(samples / batch)


def _with_lr_for_the_run(
    run: TuneRun,
    raced: Phase[RaceResult | None],
    data: tuple[BatchSource, BatchSource],
    settings: RaceSettings,
    level: float | None,
    deadline: Deadline,
) -> Phase[RaceResult | None]:
    """The race with the learning rate for the planned run measured after it
    (:mod:`batchfit.probe.race_horizon`), or with a note saying why not: for a run of known
    length much longer than the race's rounds, or one that trains to a held-out ``level`` the
    race's winner did not reach."""
    result = raced.result
    assert result is not None
    last = result.rounds[-1].horizon_s
    size = result.winner.batch_size
    judged = race_horizon.RunToJudge(
        (settings.run_seconds or {}).get(size) if level is None else None, level
    )
    if level is not None:
        if target_reached(result, run.horizon) is not None:
            return raced  # the race saw the run's end: its answer is for it
    elif not race_horizon.wanted(judged.seconds, last):
        return raced
    field_ = field_for(run.model, *data, run.loss, settings, deadline)
    with preserved(run.model):
        found = run.unless_it_fails(
            "The learning rate for your run was",
            lambda: race_horizon.lr_for_the_run(
                field_, result.winner, judged, last, wall_rate(result.rounds), deadline, run.log
            ),
        )
    if isinstance(found.result, race_horizon.LrForTheRun):
        return replace(raced, result=replace(result, for_the_run=found.result))
    why = found.notes or (f"The learning rate for your run was not measured: {found.result}.",)
    return replace(raced, result=replace(result, notes=(*result.notes, *why)))


def _loss_target(run: TuneRun) -> float | None:
    """The held-out loss the run trains to (``--target val_loss=V``), or None."""
    target = run.horizon.target
    if target is None or target.metric != "val_loss":
        return None
    return target.value


def _middle(lrs: list[Contender], count: int) -> list[Contender]:
    """The ``count`` learning rates in the middle of a size's grid (around its centre)."""
    start = (len(lrs) - count) // 2
    return lrs[start : start + count]


def _shrunk_note(
    grid: dict[int, list[Contender]], sizes: list[int], count: int, rates: int
) -> str | None:
    """What a race shrunk to fit the time left leaves out (None when nothing was)."""
    dropped = [size for size in grid if size not in sizes]
    if not dropped and count == rates:
        return None
    parts = [f"batch sizes {', '.join(map(str, dropped))} not raced"] if dropped else []
    if count < rates:
        parts.append(f"{count} of {rates} learning rates per size")
    return (
        "The race was shrunk to fit the time left (" + "; ".join(parts) + f"); a larger "
        f"{opt('time_budget')} races them all."
    )


def _not_run(why: str) -> Phase[RaceResult | None]:
    return Phase(None, (f"The race was not run: {why}.",))


def horizon_batch(throughput: Throughput, cheap: int) -> int:
    """The batch size at which tune predicts the planned run's length before the noise scale is
    measured: the measured size nearest (in log) to the throughput knee, at most ``cheap`` (the
    throughput-based answer). That answer is the largest batch that still runs efficiently, so
    the run predicted at it is the shortest the run could be: on a regression whose throughput
    flattened only at 16,384, a 3-minute run at the batch tune chose (64) was predicted at
    ~36 s there and tune ended early. At the knee samples/s are half their limit: no
    prediction of the batch yet, but not the extreme either."""
    knee = _knee(throughput)
    sizes = [p.batch_size for p in throughput.points if p.batch_size <= cheap]
    if knee <= 0 or not sizes:
        return cheap
    return min(sizes, key=lambda b: (abs(math.log(b / knee)), b))


def _knee(throughput: Throughput) -> float:
    """Where samples/s reach half their limit, ``a / c`` of the step-time fit (0: no fit)."""
    fit = fit_step_time(throughput.pairs())
    return fit[0] / fit[1] if fit else 0.0


def _largest(config_max: int | None, samples: int | None, fallback: int) -> int:
    """The largest batch size raced: at most half the training data (so an epoch holds two
    batches at least) and ``max_batch_size``."""
    limits = [n for n in (config_max, samples // 2 if samples else None) if n]
    return min(limits) if limits else fallback

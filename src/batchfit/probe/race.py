"""The race run on a real model (the probes' job): short training runs, one (batch size, learning
rate) each, that find which reaches a low held-out loss soonest on the user's model and data
instead of predicting it by a rule.

Every *lane* trains from the same initial weights with the same data order, one (batch size,
learning rate) each, for the same number of *training seconds*: its steps times the step time of
its batch size measured by the throughput probe (so a busy machine during the race changes
nothing), evaluating the held-out loss at fixed intervals of training time;
:mod:`batchfit.core.race` judges the curves. Rounds follow successive halving (Jamieson &
Talwalkar 2016; Li et al. 2017, Hyperband), with twists of our own:

1. *Screening*: every (batch size, lr) of the grid for a short horizon, and the two best learning
   rates of *each* batch size go on (a large batch starts slower and would be thrown out by a
   short race it wins over a longer one). A best lr at the edge of its grid has the next one
   tried too.
2. *Longer rounds*: the survivors race over three times the horizon, each twice, with the data in
   two orders (a learning rate at the edge of stability can be fast with one order and never get
   there with another: it must be fast with both), and the better half go on, as long as the
   leader's held-out loss was still falling at the end of the last round (once it levels off, a
   longer race only measures overfitting) and the time allows. The last round decides.

Lanes are rerun from the initial weights each round (deterministic, so a rerun retraces its
steps): nothing but the curves is kept in memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from batchfit.core import race as judge
from batchfit.core.options import default_of, opt
from batchfit.data.source import BatchSource
from batchfit.losses import Loss
from batchfit.probe.harness import Deadline, OutOfTime, cycle_batches, preserved
from batchfit.step import evaluate, make_optimizer, model_device, train_step

#: Held-out evaluations per screening horizon; longer rounds evaluate as often in training time.
EVAL_POINTS = 12
#: Each round's horizon is this many times the one before.
GROWTH = 3.0
#: Learning rates per batch size that survive screening.
KEEP_PER_BATCH_SIZE = 2
#: Steps past the edge of a batch size's lr grid, at most, while the edge wins.
EDGE_STEPS = 3
#: The data orders of the rounds after screening: epochs of the source's own seeded shuffle.
DATA_ORDERS = (0, 1000)
#: Held-out evaluation batch size, at most: never above the largest micro-batch that trains, so an
#: evaluation fits wherever a training iteration does (a forward without gradients needs less).
EVAL_BATCH_SIZE = default_of("eval_batch_size")


@dataclass(frozen=True)
class Contender:
    """One (batch size, learning rate) in the race, with the micro-batch it trains in."""

    batch_size: int
    lr: float
    micro_batch_size: int

    def label(self) -> str:
        return f"B={self.batch_size} lr {self.lr:.3g}"


@dataclass(frozen=True)
class Lane:
    """One contender's run to ``horizon_s`` training seconds with the data in order
    ``data_order``: its held-out loss curve as ``(seconds, loss)`` points (the first at the
    initial weights), its steps, and the step at which its loss stopped being finite, if it did."""

    contender: Contender
    step_seconds: float
    horizon_s: float
    steps: int
    curve: tuple[tuple[float, float], ...]
    diverged_at: int | None = None
    data_order: int = 0


@dataclass(frozen=True)
class RaceRound:
    """One round: its horizon, its contenders and their lanes (one per data order), the level
    they were judged at, the standings (indices into ``contenders``), the contenders that went
    on, and the wall seconds it took."""

    name: str
    horizon_s: float
    contenders: tuple[Contender, ...]
    lanes: tuple[Lane, ...]
    level: float
    standings: tuple[judge.Standing, ...]
    kept: tuple[int, ...]
    wall_s: float = 0.0

    def lanes_of(self, contender: Contender) -> list[Lane]:
        return [lane for lane in self.lanes if lane.contender == contender]


@dataclass(frozen=True)
class RaceResult:
    """The race: its rounds, the winner, the contenders equally good (within
    :data:`~batchfit.core.race.EQUALLY_GOOD` of the winner's time to the level), the winner's
    time relative to each finalist's, and whether the winner's loss was still falling at the end
    (the race did not see where it levels off)."""

    rounds: tuple[RaceRound, ...]
    winner: Contender
    equally_good: tuple[Contender, ...]
    finalists: tuple[tuple[Contender, float], ...]
    level: float
    still_improving: bool
    seconds: float
    notes: tuple[str, ...] = field(default=())
    #: The finalists the race cannot tell from the fastest: within its own noise (the spread of
    #: a contender's times over the data orders, :func:`~batchfit.core.race.order_spread`) or
    #: within ``EQUALLY_GOOD``, whichever is wider; the answer's stated range.
    within_noise: tuple[Contender, ...] = field(default=())
    #: That spread (None: no contender ran in two orders).
    order_spread: float | None = None
    #: The learning rate for the planned run's length, measured after the race at the winner's
    #: batch size (a :class:`batchfit.probe.race_horizon.LrForTheRun`, which imports this module;
    #: None: not measured, and the race's notes say why).
    for_the_run: Any = None

    @property
    def contenders_raced(self) -> int:
        """How many (batch size, learning rate) contenders ran, over every round."""
        return len({lane.contender for r in self.rounds for lane in r.lanes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Field:
    """What every lane shares: the model and its initial state, the data, the judge's loss, and
    the screening round's horizon, which sets when the held-out loss is evaluated."""

    model: nn.Module
    initial: dict[str, torch.Tensor]
    train: BatchSource
    held_out: BatchSource
    loss: Loss
    optimizer: str
    step_seconds: Mapping[int, float]
    deadline: Deadline
    seed: int
    first_horizon_s: float
    eval_batch_size: int = EVAL_BATCH_SIZE
    run_seconds: Mapping[int, float] | None = None

    def held_out_loss(self) -> float:
        device = model_device(self.model)
        return evaluate(self.model, self.held_out, self.loss, self.eval_batch_size, device)["loss"]


def run_lane(field_: _Field, contender: Contender, horizon_s: float, data_order: int = 0) -> Lane:
    """Train ``contender`` from the initial weights for ``horizon_s`` training seconds."""
    model = field_.model
    model.load_state_dict(field_.initial)
    model.train()
    torch.manual_seed(field_.seed + data_order)  # dropout draws alike in every lane of an order
    step_s = field_.step_seconds[contender.batch_size]
    total = max(1, int(horizon_s / step_s))
    marks = eval_steps(field_.first_horizon_s, horizon_s, step_s)
    optimizer = make_optimizer(field_.optimizer, model, contender.lr)
    batches = cycle_batches(field_.train, contender.batch_size, first_epoch=data_order)
    device = model_device(model)
    curve = [(0.0, field_.held_out_loss())]
    for step in range(1, total + 1):
        x, y = next(batches)
        loss, _ = train_step(
            model, optimizer, field_.loss.fn, x, y, contender.micro_batch_size, device
        )
        if not math.isfinite(float(loss)):
            curve.append((step * step_s, math.inf))
            return Lane(contender, step_s, horizon_s, step, tuple(curve), step, data_order)
        if step in marks:
            curve.append((step * step_s, field_.held_out_loss()))
        if field_.deadline.expired():
            raise OutOfTime("its screening round ran out of time")
    return Lane(contender, step_s, horizon_s, total, tuple(curve), None, data_order)


def eval_steps(first_horizon_s: float, horizon_s: float, step_seconds: float) -> set[int]:
    """The steps after which a lane evaluates: every ``1/EVAL_POINTS`` of the screening horizon,
    and from ``1/64`` of it on, every factor of sqrt(2), so that a model whose held-out loss is
    best early (and then overfits) is seen at its best; always the last step.

    >>> sorted(eval_steps(1.0, 1.0, 0.01))[:8], max(eval_steps(1.0, 3.0, 0.01))
    ([2, 3, 4, 6, 8, 9, 13, 17], 300)
    """
    total = max(1, int(horizon_s / step_seconds))
    times = {
        first_horizon_s * k / EVAL_POINTS
        for k in range(1, EVAL_POINTS * int(horizon_s / first_horizon_s + 1) + 1)
    }
    t = first_horizon_s / 64
    while t < horizon_s:
        times.add(t)
        t *= math.sqrt(2)
    steps = {max(1, round(t / step_seconds)) for t in times if t <= horizon_s}
    return {s for s in steps if s <= total} | {total}


def _judged(
    name: str, lanes: Sequence[Lane], horizon_s: float, keep: int, started: float
) -> RaceRound:
    """A round of ``lanes`` judged per contender (over its data orders); its best ``keep``
    contenders (those with a finite loss) go on."""
    contenders = tuple(dict.fromkeys(lane.contender for lane in lanes))
    groups = [[lane.curve for lane in lanes if lane.contender == c] for c in contenders]
    level = judge.level_for(groups)
    ranked = judge.standings(groups, level)
    kept = tuple(s.lane for s in ranked if math.isfinite(s.best_loss))[:keep]
    wall = time.perf_counter() - started
    return RaceRound(name, horizon_s, contenders, tuple(lanes), level, tuple(ranked), kept, wall)


def _screen(
    field_: _Field,
    grid: Mapping[int, Sequence[Contender]],
    horizon_s: float,
    log: Callable[[str], None],
) -> tuple[RaceRound, list[str]]:
    """Round 1: every contender for ``horizon_s``; the best learning rates of each batch size go
    on, and a best lr at the edge of its grid has its neighbour beyond the edge tried too.
    When the time runs out after some batch sizes were screened, the race goes on with those
    (a note says which were not), rather than throwing their runs away."""
    started = time.perf_counter()
    lanes: list[Lane] = []
    going_on: list[Contender] = []
    notes: list[str] = []
    for batch_size, contenders in grid.items():
        try:
            mine = [run_lane(field_, c, horizon_s) for c in contenders]
            mine += _beyond_the_edge(field_, mine, horizon_s)
        except OutOfTime:
            if not lanes:
                raise
            left = [str(b) for b in grid if b >= batch_size]
            notes.append(
                f"The race's screening round ran out of time before batch sizes "
                f"{', '.join(left)}; the race went on with the sizes screened (a larger "
                f"{opt('time_budget')} screens them all)."
            )
            log(f"race: out of time; batch sizes {', '.join(left)} not screened")
            break
        judged = _judged("", mine, horizon_s, KEEP_PER_BATCH_SIZE, started)
        going_on += [judged.contenders[i] for i in judged.kept]
        lanes += mine
        log(
            f"race: B={batch_size}: "
            + ", ".join(f"lr {judged.contenders[i].lr:.3g}" for i in judged.kept)
            + f" go on (of {len(mine)})"
        )
    screened = _judged("screening", lanes, horizon_s, len(lanes), started)
    order = [screened.contenders[s.lane] for s in screened.standings]
    kept = tuple(screened.contenders.index(c) for c in sorted(going_on, key=order.index))
    return replace(screened, kept=kept), notes


def _beyond_the_edge(field_: _Field, lanes: list[Lane], horizon_s: float) -> list[Lane]:
    """More lanes past the grid's edge, one step of its spacing at a time (at most
    :data:`EDGE_STEPS`), while the best lr of this batch size sits at the edge."""
    added: list[Lane] = []
    for _ in range(EDGE_STEPS):
        both = lanes + added
        if len(both) < 2:
            break
        lrs = sorted(lane.contender.lr for lane in both)
        judged = _judged("", both, horizon_s, 1, time.perf_counter())
        best = judged.contenders[judged.kept[0]]
        if best.lr == lrs[-1]:
            lr = best.lr * lrs[-1] / lrs[-2]
        elif best.lr == lrs[0]:
            lr = best.lr * lrs[0] / lrs[1]
        else:
            break
        edge = Contender(best.batch_size, float(f"{lr:.4g}"), best.micro_batch_size)
        added.append(run_lane(field_, edge, horizon_s))
    return added


@dataclass(frozen=True)
class RaceSettings:
    """What a race runs: its contenders (``grid``: batch size -> its contenders), the measured
    step time of each batch size, the optimizer, the screening round's training seconds per
    lane, the seed, and how the learning rate follows the batch size (``lr_power``, 0.5: the
    sqrt rule), to tell the boldest of equally fast contenders."""

    grid: Mapping[int, Sequence[Contender]]
    step_seconds: Mapping[int, float]
    optimizer: str
    first_horizon_s: float
    seed: int = 0
    lr_power: float = 0.5
    #: Each batch size's training seconds in the user's planned run (None: not given): no round
    #: trains longer than the run it judges for.
    run_seconds: Mapping[int, float] | None = None


def race(
    model: nn.Module,
    train: BatchSource,
    held_out: BatchSource,
    loss: Loss,
    settings: RaceSettings,
    *,
    deadline: Deadline,
    log: Callable[[str], None] | None = None,
) -> RaceResult:
    """Race the contenders of ``settings.grid`` from ``model``'s current weights, which it gets
    back afterwards, training on ``train`` and judging on ``held_out``. Raises
    :class:`~batchfit.probe.harness.OutOfTime` when not even the screening round fits.
    """
    log = log or (lambda _: None)
    started = time.perf_counter()
    field_ = field_for(model, train, held_out, loss, settings, deadline)
    with preserved(model):
        screening, cut = _screen(field_, settings.grid, settings.first_horizon_s, log)
        longer, notes = _longer_rounds(field_, screening, log)
    rounds = [screening, *longer]
    return _result(rounds, cut + notes, time.perf_counter() - started, settings.lr_power)


def field_for(
    model: nn.Module,
    train: BatchSource,
    held_out: BatchSource,
    loss: Loss,
    settings: RaceSettings,
    deadline: Deadline,
) -> _Field:
    """What every lane of a race with ``settings`` shares, from ``model``'s current weights."""
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    micro = max(c.micro_batch_size for cs in settings.grid.values() for c in cs)
    return _Field(
        model,
        initial,
        train,
        held_out,
        loss,
        settings.optimizer,
        settings.step_seconds,
        deadline,
        settings.seed,
        settings.first_horizon_s,
        min(EVAL_BATCH_SIZE, micro),
        settings.run_seconds,
    )


def _longer_rounds(
    field_: _Field, screening: RaceRound, log: Callable[[str], None]
) -> tuple[list[RaceRound], list[str]]:
    """The rounds after ``screening``, of growing horizon, while the leader's loss still falls and
    the time allows; returns them, and a note when time stopped the race early."""
    rounds = [screening]
    while True:
        next_round = _next_round(field_, rounds)
        if not isinstance(next_round, RaceRound):
            return rounds[1:], [] if next_round is None else [next_round]
        rounds.append(next_round)
        horizon, leaders = next_round.horizon_s, _leaders(next_round)
        log(f"race: round {len(rounds)}, {horizon:.2g} s per run: {leaders}")


def _next_round(field_: _Field, rounds: Sequence[RaceRound]) -> RaceRound | str | None:
    """The round after ``rounds``: their survivors (after screening, with the rate between each
    batch size's two) over :data:`GROWTH` times the horizon, each with the data in every order
    of :data:`DATA_ORDERS`. None when the race is decided (one survivor, or the leader's loss
    levelled off), or a note when the round does not fit in the time left or ran out of it."""
    last = rounds[-1]
    if len(last.kept) <= 1:
        return None
    if len(rounds) > 1 and not judge.still_improving(_leader(last).curve, last.horizon_s):
        return None
    survivors = [last.contenders[i] for i in last.kept]
    if len(rounds) == 1:
        survivors += _between(survivors)
    horizon = last.horizon_s * GROWTH
    if field_.run_seconds is not None:
        longest = max(field_.run_seconds.get(c.batch_size, math.inf) for c in survivors)
        if horizon > longest:
            return (
                f"The race stopped after round {len(rounds)} ({last.horizon_s:.2g} s of training "
                f"per run): a longer round would train longer than your run ({longest:.2g} s at "
                "most), so the race judged over your run's horizon."
            )
    if _cost(rounds, horizon * len(survivors) * len(DATA_ORDERS)) > field_.deadline.remaining():
        return (
            f"The race stopped after round {len(rounds)} ({last.horizon_s:.2g} s of training "
            "per run): a longer round did not fit in the time budget."
        )
    started = time.perf_counter()
    try:
        lanes = [run_lane(field_, c, horizon, order) for c in survivors for order in DATA_ORDERS]
    except OutOfTime:
        return f"Round {len(rounds) + 1} of the race ran out of time; it is left out."
    keep = max(2, math.ceil(len(survivors) / 2))
    return _judged(f"round {len(rounds) + 1}", lanes, horizon, keep, started)


def _between(survivors: Sequence[Contender]) -> list[Contender]:
    """For each batch size whose two surviving learning rates are neighbours on its grid (a
    factor of 2), the rate between them (their geometric mean): a grid of factor 2 can miss the
    best rate by up to 1.4x, which costs time."""
    out = []
    for size in dict.fromkeys(c.batch_size for c in survivors):
        mine = sorted((c for c in survivors if c.batch_size == size), key=lambda c: c.lr)
        if len(mine) == 2 and mine[1].lr <= 2.05 * mine[0].lr:
            lr = float(f"{math.sqrt(mine[0].lr * mine[1].lr):.4g}")
            out.append(Contender(size, lr, mine[0].micro_batch_size))
    return out


def _cost(rounds: Sequence[RaceRound], training_seconds: float) -> float:
    """The wall seconds ``training_seconds`` of lanes will take, at the rate the race has run so
    far (evaluations, and a busier machine than the throughput probe saw, both count)."""
    return wall_rate(rounds) * training_seconds


def wall_rate(rounds: Sequence[RaceRound]) -> float:
    """Wall seconds per training second of the race's lanes so far (at least 1)."""
    trained = sum(lane.steps * lane.step_seconds for r in rounds for lane in r.lanes)
    wall = sum(r.wall_s for r in rounds)
    return max(1.0, wall / trained) if trained > 0 else 1.0


def _leader(round_: RaceRound) -> Lane:
    return round_.lanes_of(round_.contenders[round_.standings[0].lane])[0]


def _leaders(round_: RaceRound) -> str:
    return ", ".join(
        f"{round_.contenders[s.lane].label()} ({s.relative_time:.2f}x)"
        for s in round_.standings[:3]
    )


def _result(
    rounds: Sequence[RaceRound], notes: Sequence[str], seconds: float, lr_power: float
) -> RaceResult:
    """The finalists of the last round, and the winner: of those within
    :data:`~batchfit.core.race.EQUALLY_GOOD` of the fastest, the one with the lowest learning
    rate for its batch size (``lr / B**lr_power``, the lr rule's scaling): equally fast, it is
    the one furthest from instability, where a learning rate fast with these two data orders is
    slow or never gets there with others."""
    last = rounds[-1]
    finalists = tuple((last.contenders[s.lane], s.relative_time) for s in last.standings)
    close = [c for c, r in finalists if r <= 1 + judge.EQUALLY_GOOD] or [finalists[0][0]]
    winner = min(close, key=lambda c: c.lr / c.batch_size**lr_power)
    spread = judge.order_spread([[ln.curve for ln in last.lanes_of(c)] for c in last.contenders],
                                last.level)  # fmt: skip
    tolerance = max(judge.EQUALLY_GOOD, spread or 0.0)
    within = tuple(c for c, r in finalists if r <= 1 + tolerance) or (finalists[0][0],)
    return RaceResult(
        rounds=tuple(rounds),
        winner=winner,
        equally_good=tuple(close),
        finalists=finalists,
        level=last.level,
        still_improving=judge.still_improving(last.lanes_of(winner)[0].curve, last.horizon_s),
        seconds=seconds,
        notes=tuple(notes),
        within_noise=tuple(dict.fromkeys((*close, *within))),
        order_spread=spread,
    )

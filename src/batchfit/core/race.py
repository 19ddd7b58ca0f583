"""The race's judge, pure numbers (the core's job): which (batch size, learning rate) gets to a
low held-out loss soonest; curves in, standings out. :mod:`batchfit.orchestrate.race_plan` plans
a race, :mod:`batchfit.probe.race` runs it on the real model.

A *lane* is one short training run from the same initial weights; its curve is
``(seconds, held-out loss)`` points, where seconds are *training* seconds counted as steps times
the measured step time of its batch size (so that machine noise during the race does not decide
it). Time to a result is what batchfit minimises, so lanes are compared at equal seconds, not at
equal steps or samples.

Each curve is first smoothed over three evaluations (a lucky dip of one evaluation, typical of a
learning rate at the edge of stability, does not win) and read as best-so-far (a model that starts
to overfit keeps the best it reached, as early stopping would). The race is then judged by the
time each lane takes to reach a demanding *level* (:func:`level_of`): :data:`LEVEL_SHARE` of the
way on a log scale from the lowest loss any lane reached back up to the initial loss (at most
:data:`LEVEL_AT_MOST` times the lowest).
Lanes that never reach it rank after, by the lowest loss they reached.

Examples:
    Two lanes: the first gets close to its best in 1 s, the second needs 2 s.

    >>> fast = [(0.0, 1.0), (0.5, 0.6), (1.0, 0.11), (1.5, 0.1), (2.0, 0.1), (2.5, 0.1)]
    >>> slow = [(0.0, 1.0), (0.5, 0.8), (1.0, 0.5), (1.5, 0.2), (2.0, 0.1), (2.5, 0.1)]
    >>> level = level_of([fast, slow])
    >>> round(level, 3)
    0.158
    >>> [round(s.relative_time, 2) for s in standings([[fast], [slow]], level)]
    [1.0, 1.43]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Curve = Sequence[tuple[float, float]]

#: Lanes whose time to the level is within this share of the winner's are equally good.
EQUALLY_GOOD = 0.05
#: The level lies this share of the way (on a log scale) from the lowest loss reached back up to
#: the initial loss: near the best, as a demanding target is, yet reached by more than one lane.
LEVEL_SHARE = 0.2
#: ... and never more than this many times the lowest loss: a huge initial loss (a regression
#: target with a large mean starts in the thousands) must not make the level an easy one.
LEVEL_AT_MOST = 2.0


@dataclass(frozen=True)
class Standing:
    """One lane's result: its index in the race, its time to the level (``inf``: never reached),
    the lowest loss it reached, and its time relative to the winner's."""

    lane: int
    seconds_to_level: float
    best_loss: float
    relative_time: float


def smoothed(curve: Curve) -> list[tuple[float, float]]:
    """Each evaluation averaged with its neighbours (the first point, at the initial weights, and
    the last are kept); non-finite losses stay non-finite.

    >>> smoothed([(0, 9.0), (1, 3.0), (2, 1.0), (3, 2.0), (4, 1.5)])
    [(0, 9.0), (1, 2.0), (2, 2.0), (3, 1.5), (4, 1.75)]
    """
    out = list(curve[:1])
    for k in range(1, len(curve)):
        window = [loss for _, loss in curve[max(1, k - 1) : k + 2]]
        out.append((curve[k][0], sum(window) / len(window)))
    return out


def best_so_far(curve: Curve) -> list[tuple[float, float]]:
    """The lowest smoothed loss reached by each point's time; non-finite losses are skipped.

    >>> best_so_far([(0, 3.0), (1, 2.0), (2, 2.0), (3, 3.5), (4, 4.0)])
    [(0, 3.0), (1, 2.0), (2, 2.0), (3, 2.0), (4, 2.0)]
    """
    out: list[tuple[float, float]] = []
    lowest = math.inf
    for seconds, loss in smoothed(curve):
        if not math.isfinite(loss):
            continue
        lowest = min(lowest, loss)
        out.append((seconds, lowest))
    return out


def loss_at(curve: Curve, seconds: float) -> float:
    """The best-so-far loss at ``seconds`` (linear between points; ``inf`` before the first).

    >>> loss_at([(0.0, 1.0), (2.0, 0.5)], 1.0)
    0.75
    """
    points = best_so_far(curve)
    if not points or seconds < points[0][0]:
        return math.inf
    for (t0, l0), (t1, l1) in zip(points, points[1:], strict=False):
        if t0 <= seconds <= t1:
            return l0 if t1 == t0 else l0 + (l1 - l0) * (seconds - t0) / (t1 - t0)
    return points[-1][1]


def seconds_to(curve: Curve, level: float) -> float:
    """When the best-so-far curve first reaches ``level`` (linear between points; ``inf``:
    never).

    >>> seconds_to([(0.0, 1.0), (2.0, 0.5)], 0.75), seconds_to([(0.0, 1.0)], 0.5)
    (1.0, inf)
    """
    points = best_so_far(curve)
    if points and points[0][1] <= level:
        return points[0][0]
    for (t0, l0), (t1, l1) in zip(points, points[1:], strict=False):
        if l1 <= level < l0:
            return t0 + (t1 - t0) * (l0 - level) / (l0 - l1)
    return math.inf


def level_of(curves: Sequence[Curve], share: float = LEVEL_SHARE) -> float:
    """The race's level: ``share`` of the way on a log scale from the lowest loss any lane
    reached up to the initial loss (the first point of the first curve), and at most
    :data:`LEVEL_AT_MOST` times the lowest. Losses that are not all positive (a log-likelihood can
    be negative) take the same share on a linear scale.

    >>> level_of([[(0.0, 1000.0), (1.0, 0.5)]])  # 0.5 x 2000**0.2 would be 2.29
    1.0
    """
    lowest = min((p[-1][1] for p in map(best_so_far, curves) if p), default=math.inf)
    start = next((c[0][1] for c in curves if c), math.inf)
    if not (math.isfinite(lowest) and math.isfinite(start)) or start <= lowest:
        return lowest
    if lowest > 0:
        level = math.exp(math.log(lowest) + share * (math.log(start) - math.log(lowest)))
        return min(level, LEVEL_AT_MOST * lowest)
    return lowest + share * (start - lowest)


#: The level is raised, where needed, until this many contenders reach it with every run.
FINISHERS = 3


def level_for(groups: Sequence[Sequence[Curve]], finishers: int = FINISHERS) -> float:
    """The level for contenders that each ran one or more times (:func:`level_of` over all their
    curves), raised where needed so that ``finishers`` of them reach it with every run: one
    lucky evaluation on a small held-out set must not set a level that only its own run reaches,
    which would rank the rest by luck.

    >>> lucky, good = [(0.0, 1.0), (1.0, 0.1)], [(0.0, 1.0), (1.0, 0.5)]
    >>> fair = [(0.0, 1.0), (1.0, 0.6)]
    >>> round(level_of([lucky, good, fair]), 3), level_for([[lucky], [good], [fair]])
    (0.158, 0.6)
    """
    level = level_of([curve for group in groups for curve in group])
    worst = sorted(
        max((p[-1][1] if p else math.inf) for p in map(best_so_far, group)) for group in groups
    )
    if not worst:
        return level
    return max(level, worst[min(finishers, len(worst)) - 1])


def standings(groups: Sequence[Sequence[Curve]], level: float) -> list[Standing]:
    """Contenders ranked by their time to ``level``, then (those that never reached it) by the
    lowest loss they reached; ties go to the earlier one. Each contender is a group of curves
    (runs with the data in different orders): its time is their mean, and ``inf`` if any run
    never reached the level, so that a learning rate that is fast only with a lucky order loses.
    """
    rows = []
    for i, curves in enumerate(groups):
        times = [seconds_to(curve, level) for curve in curves]
        bests = [p[-1][1] if p else math.inf for p in map(best_so_far, curves)]
        rows.append((sum(times) / len(times), sum(bests) / len(bests), i))
    rows.sort()
    first = rows[0][0] if rows else math.inf
    return [Standing(i, t, best, _relative(t, first)) for t, best, i in rows]


def _relative(time: float, first: float) -> float:
    """``time`` over the fastest ``first``; a level reached at once (every run diverged, so the
    initial loss is the best) counts as 1 for those that reached it at once.

    >>> _relative(2.0, 1.0), _relative(0.0, 0.0), _relative(1.0, 0.0), _relative(math.inf, 1.0)
    (2.0, 1.0, inf, inf)
    """
    if not math.isfinite(time):
        return math.inf
    if first > 0:
        return time / first
    return 1.0 if time <= first else math.inf


def equally_good(ranked: Sequence[Standing], tolerance: float = EQUALLY_GOOD) -> list[int]:
    """The lanes whose time to the level is within ``tolerance`` of the winner's.

    >>> equally_good([Standing(2, 1.0, 0.1, 1.0), Standing(0, 1.04, 0.1, 1.04),
    ...               Standing(1, 1.2, 0.1, 1.2)])
    [2, 0]
    """
    return [s.lane for s in ranked if s.relative_time <= 1 + tolerance]


def order_spread(groups: Sequence[Sequence[Curve]], level: float) -> float | None:
    """The race's own measurement noise: over the contenders run with the data in two or more
    orders that all reached ``level``, the median relative spread of their times to it
    (``(slowest - fastest) / mean``). None when no contender has two such runs (a race of its
    screening round alone). Two contenders whose times differ by less than this are not told
    apart by the race: the spread of two runs is about one standard deviation of the difference
    of two such means.

    >>> order_spread([[[(0, 1.0), (1, 0.4)], [(0, 1.0), (1.5, 0.4)]],
    ...               [[(0, 1.0), (2, 0.4)], [(0, 1.0), (2, 0.4)]]], 0.4)
    0.2
    >>> order_spread([[[(0, 1.0), (1, 0.4)]]], 0.4) is None
    True
    """
    spreads = []
    for curves in groups:
        times = [seconds_to(curve, level) for curve in curves]
        if len(times) >= 2 and all(math.isfinite(t) for t in times) and sum(times) > 0:
            spreads.append((max(times) - min(times)) / (sum(times) / len(times)))
    if not spreads:
        return None
    spreads.sort()
    middle = len(spreads) // 2
    return spreads[middle] if len(spreads) % 2 else (spreads[middle - 1] + spreads[middle]) / 2


def still_improving(curve: Curve, horizon: float, tolerance: float = 0.02) -> bool:
    """Whether the lane's best-so-far loss still fell by more than ``tolerance`` (relative) over
    the second half of the horizon: the race has not yet seen where this lane levels off.

    >>> still_improving([(0.0, 1.0), (0.5, 0.5), (1.0, 0.5), (1.5, 0.5), (2.0, 0.5)], 2.0)
    False
    >>> still_improving([(0.0, 1.0), (0.5, 0.8), (1.0, 0.5), (1.5, 0.4), (2.0, 0.3)], 2.0)
    True
    """
    half, end = loss_at(curve, horizon / 2), loss_at(curve, horizon)
    if not (math.isfinite(half) and math.isfinite(end)):
        return False
    return half - end > tolerance * max(abs(half), 1e-12)

"""The race's plan, pure numbers beside the phase that uses it: which batch sizes and learning
rates race, and how long the screening round trains each lane so that the first two rounds fit
in the time given. No torch; only tune's race phase (:mod:`batchfit.orchestrate.tune_race`) plans
a race, :mod:`batchfit.probe.race` runs it and :mod:`batchfit.core.race` judges it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

#: Wall seconds a lane takes per training second (its held-out evaluations, data loading),
#: measured at about 1.3-1.4 on small CPU models; to plan the race before it runs.
WALL_PER_TRAINING_SECOND = 1.4
#: Batch sizes raced at least, where the limits allow.
SIZES_RACED = 4
#: The fewest steps the slowest batch size takes in the screening round.
MIN_STEPS = 20
#: Learning rates tried around each batch size's centre in the screening round: the centre comes
#: from a range test (off by 4-5x either way on held-out tasks), so the grid spans 16x, and a best
#: rate at its edge has the next one tried too.
LR_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def batch_sizes_around(center: int, smallest: int, largest: int, knee: float = 0.0) -> list[int]:
    """The batch sizes raced: ``center`` and the powers of two from half of it up to four times
    it, or up to the throughput knee when that is higher (the noise scale read early in training
    tends to understate the batch that wins later, and below the knee a larger batch costs
    little time per step), kept within ``[smallest, largest]``.

    >>> batch_sizes_around(128, 1, 4000)
    [64, 128, 256, 512]
    >>> batch_sizes_around(100, 2, 300)
    [64, 100, 128, 256]
    >>> batch_sizes_around(32, 1, 4000, knee=240.0)
    [16, 32, 64, 128, 256]
    >>> batch_sizes_around(8, 8, 16)
    [8, 16]

    A predicted size above ``largest`` (a training set cut for the held-out share) moves down, and
    when ``largest`` cuts the sizes above, as many are added below, down to ``smallest``:

    >>> batch_sizes_around(256, 1, 120)
    [16, 32, 64, 120]
    >>> batch_sizes_around(512, 1, 700)
    [64, 128, 256, 512]
    """
    center = min(center, largest)
    top = max(4 * center, knee)
    sizes = {center}
    power = 1
    while power < 2 * top:
        if power * 2 >= center and (power <= 4 * center or power / 2 < knee):
            sizes.add(power)
        power *= 2
    kept = sorted(s for s in sizes if smallest <= s <= largest and 2 * s >= center)
    below = min(kept, default=center)
    while len(kept) < SIZES_RACED and below // 2 >= smallest:
        below //= 2
        kept.insert(0, below)
    return kept


def first_horizon(
    seconds: float, step_seconds: Sequence[float], lanes: int, sizes: int, growth: float = 3.0
) -> float:
    """Training seconds per lane for the screening round, so that the race's first two rounds fit
    in ``seconds``: ``lanes`` screening lanes (plus one beyond the grid's edge per size), then two
    survivors per size and the learning rate between them, at ``growth`` times the horizon, each
    with the data in two orders (each round reruns from the start), at
    :data:`WALL_PER_TRAINING_SECOND`. Never less than :data:`MIN_STEPS` steps of the slowest
    size: fewer show no learning to judge.

    >>> round(first_horizon(30.0, [0.001, 0.002], lanes=10, sizes=2), 3)
    0.446
    """
    units = lanes + sizes + 6 * sizes * growth
    return max(seconds / (units * WALL_PER_TRAINING_SECOND), MIN_STEPS * max(step_seconds))


def shrunk_to_fit(
    sizes: Sequence[int],
    rates: int,
    step_seconds: Mapping[int, float],
    seconds: float,
    keep: int,
    growth: float = 3.0,
    eval_s: float = 0.0,
) -> tuple[list[int], int, float] | None:
    """``(sizes, learning rates per size, screening horizon)`` of the largest race whose
    screening round fits in ``seconds``, or None when not even ``keep`` (the prediction) with one
    learning rate fits. A race that does not fit is shrunk rather than skipped, since a small race
    still checks the prediction: first to the middle three learning rates, then without the
    slowest batch sizes (never ``keep``), then to one learning rate. ``eval_s``: the held-out
    evaluations' seconds per lane, which do not shrink with the horizon (on a large validation
    set they were most of a round's time, and a screening planned without them ran out of it).

    >>> times = {64: 0.01, 128: 0.02, 256: 0.04, 512: 0.08}
    >>> shrunk_to_fit([64, 128, 256, 512], 5, times, 60.0, keep=128)[:2]
    ([64, 128, 256, 512], 5)
    >>> shrunk_to_fit([64, 128, 256, 512], 5, times, 12.0, keep=128)[:2]
    ([64, 128, 256], 3)
    >>> shrunk_to_fit([64, 128, 256, 512], 5, times, 0.1, keep=128) is None
    True
    >>> shrunk_to_fit([64, 128, 256, 512], 5, times, 60.0, keep=128, eval_s=1.0)[:2]
    ([64, 128, 256, 512], 3)
    """
    counts = sorted({rates, min(rates, 3), 1}, reverse=True)
    for count in counts:
        kept = sorted(sizes)
        while kept:
            lanes = len(kept) * count
            times = [step_seconds[s] for s in kept]
            evaluating = eval_s * (lanes + len(kept) + 2 * len(kept) * growth)
            horizon = first_horizon(0.8 * seconds - evaluating, times, lanes, len(kept), growth)
            if horizon * lanes * WALL_PER_TRAINING_SECOND + eval_s * lanes <= seconds:
                return kept, count, horizon
            others = [s for s in kept if s != keep]
            if not others or (count == rates and len(counts) > 1):
                break  # all the learning rates only with all the sizes
            kept.remove(max(others, key=lambda s: (step_seconds[s], s)))
    return None

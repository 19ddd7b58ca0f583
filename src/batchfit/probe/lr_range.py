"""A learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks").

Train from the current weights at one batch size while the learning rate grows geometrically from
``min_lr`` to ``max_lr``, one step each; record the loss, smoothed by an exponential moving
average. The loss first barely moves (lr too small), then falls, then blows up (lr too large). The
pick is the learning rate at the smoothed minimum divided by 10, a common rule (fast.ai's
``lr_min``): the minimum itself is already at the edge of divergence. The model is left as it was.

The first steps are left out of the search for the minimum (the average has not settled: one lucky
batch would do). A minimum at either end of the range tried says nothing: at the low end the loss
never fell below where it started, at the high end it was still falling when the range (or the
time) ran out. Such a test is *inconclusive*: it picks nothing, and the caller falls back to a
rule-scaled default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from batchfit.core.options import opt
from batchfit.data.source import Batch, BatchSource
from batchfit.errors import BatchfitError
from batchfit.losses import LossFn
from batchfit.probe.harness import Deadline, OutOfTime, cycle_batches, preserved
from batchfit.step import make_optimizer, model_device, train_step

#: Stop once the smoothed loss is this many times its minimum: the rate has diverged.
DIVERGED = 4.0
SMOOTHING = 0.9
PICK_DIVISOR = 10.0
#: Steps left out of the search for the minimum while the moving average settles.
SETTLE_STEPS = 8
#: The minimum must lie this share below the smoothed loss where the search starts.
MIN_FALL = 0.05


@dataclass(frozen=True)
class LRRange:
    """The range test's curve (``lrs[i]``, smoothed ``losses[i]``) and its pick."""

    batch_size: int
    micro_batch_size: int
    optimizer: str
    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    lr_at_min_loss: float
    pick: float | None  # None: inconclusive (see ``verdict``)
    rule: str
    stopped_by: str
    verdict: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pick_lr(
    lrs: list[float], smoothed: list[float], settle: int = SETTLE_STEPS
) -> tuple[float, float | None, str]:
    """``(lr at the smallest smoothed loss, that lr / 10 or None, why)``, the first ``settle``
    steps left out. ``None`` when the test is inconclusive: the minimum sits at either end of the
    range, or lies less than 5% below where the search starts. Pure.

    >>> pick_lr([1e-4, 1e-3, 1e-2, 1e-1], [2.0, 1.5, 1.0, 9.0], settle=0)
    (0.01, 0.001, 'lowest smoothed loss at lr 0.01')
    >>> pick_lr([1e-4, 1e-3, 1e-2, 1e-1], [2.0, 1.5, 1.0, 0.5], settle=0)[1:]
    (None, 'inconclusive: the loss was still falling at the largest lr tried, 0.1')
    """
    if not any(math.isfinite(loss) for loss in smoothed):
        raise BatchfitError("The learning-rate range test saw no finite loss; check the data.")
    first = min(settle, max(len(lrs) - 3, 0))
    window = [(loss, i) for i, loss in enumerate(smoothed) if i >= first and math.isfinite(loss)]
    if not window:
        lowest = min((loss, i) for i, loss in enumerate(smoothed) if math.isfinite(loss))[1]
        return lrs[lowest], None, f"inconclusive: the loss diverged within {len(lrs)} steps"
    start_loss, start = window[0]
    best_loss, best = min(window)
    best_lr = lrs[best]
    if best == len(smoothed) - 1:
        why = f"the loss was still falling at the largest lr tried, {best_lr:.2g}"
        return best_lr, None, f"inconclusive: {why}"
    # Losses may be negative (a log-likelihood): the fall is measured against |loss|.
    if best == start or best_loss > start_loss - MIN_FALL * abs(start_loss):
        why = (
            f"the loss did not fall by {MIN_FALL:.0%} anywhere between lr {lrs[start]:.2g} and "
            f"{lrs[-1]:.2g}"
        )
        return best_lr, None, f"inconclusive: {why}"
    return best_lr, best_lr / PICK_DIVISOR, f"lowest smoothed loss at lr {best_lr:.3g}"


def lr_range_test(
    model: nn.Module,
    data: BatchSource,
    loss_fn: LossFn,
    *,
    batch_size: int,
    micro_batch_size: int | None = None,
    optimizer: str = "adam",
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    steps: int = 60,
    deadline: Deadline | None = None,
    log: Callable[[str], None] | None = None,
) -> LRRange:
    """Run the range test at ``batch_size`` (micro-batches of ``micro_batch_size``).

    Examples:
        >>> import torch
        >>> from batchfit import TensorSource
        >>> from batchfit.losses import mse
        >>> x = torch.randn(256, 4); y = x @ torch.ones(4)
        >>> result = lr_range_test(torch.nn.Linear(4, 1), TensorSource(x, y), mse,
        ...                        batch_size=32, steps=40, optimizer="sgd")
        >>> 1e-6 < result.pick < 1.0  # SGD with momentum diverges well before lr 1 here
        True
    """
    if steps < 3:
        raise BatchfitError(f"The learning-rate range test needs at least 3 steps; got {steps}.")
    log = log or (lambda _: None)
    micro = micro_batch_size or batch_size
    factor = (max_lr / min_lr) ** (1 / (steps - 1))
    schedule = [min_lr * factor**i for i in range(steps)]
    with preserved(model):
        model.train()
        batches = cycle_batches(data, batch_size)
        lrs, smoothed, stopped_by = _climb(
            model, batches, loss_fn, micro, optimizer, schedule, deadline or Deadline(None)
        )
    if len(lrs) < 3:
        raise OutOfTime(
            "The learning-rate range test ran fewer than 3 steps in its time; give a larger "
            f"{opt('time_budget')} or {opt('lr')}."
        )
    at_min, pick, verdict = pick_lr(lrs, smoothed)
    if pick is None and stopped_by == "time budget":  # a budget stop, said as one
        verdict = (
            f"inconclusive: the time budget stopped it at lr {lrs[-1]:.2g}, after {len(lrs)} of "
            f"{steps} steps, before it could tell"
        )
    log(f"lr range test: {verdict}" + (f"; pick {pick:.3g}" if pick is not None else ""))
    return LRRange(
        batch_size=batch_size,
        micro_batch_size=micro,
        optimizer=optimizer,
        lrs=tuple(lrs),
        losses=tuple(smoothed),
        lr_at_min_loss=at_min,
        pick=pick,
        rule=f"the lr of the lowest smoothed loss divided by {PICK_DIVISOR:g}",
        stopped_by=stopped_by,
        verdict=verdict,
    )


def _climb(
    model: nn.Module,
    batches: Iterator[Batch],
    loss_fn: LossFn,
    micro_batch_size: int,
    optimizer: str,
    schedule: list[float],
    deadline: Deadline,
) -> tuple[list[float], list[float], str]:
    """Train one step at each learning rate of ``schedule`` until the smoothed loss diverges or
    time is up: ``(lrs, smoothed losses, why it stopped)``."""
    device = model_device(model)
    lrs: list[float] = []
    smoothed: list[float] = []
    average = 0.0
    optim = make_optimizer(optimizer, model, schedule[0])
    for i, lr in enumerate(schedule):
        for group in optim.param_groups:
            group["lr"] = lr
        x, y = next(batches)
        loss, _ = train_step(model, optim, loss_fn, x, y, micro_batch_size, device)
        value = float(loss)
        average = SMOOTHING * average + (1 - SMOOTHING) * value
        current = average / (1 - SMOOTHING ** (i + 1))  # bias-corrected, as in Adam
        lrs.append(lr)
        smoothed.append(current if math.isfinite(value) else math.inf)
        if not math.isfinite(value) or (i > 5 and current > DIVERGED * min(smoothed)):
            return lrs, smoothed, "loss diverged"
        if deadline.expired():
            return lrs, smoothed, "time budget"
    return lrs, smoothed, "max_lr reached"

"""Throughput: samples per second of real training steps, end to end, per batch size.

A timed step is what the training loop does for one batch: take it from the data source (so the
cost of loading and indexing counts), run forward, backward and the optimizer update
(:func:`batchfit.train.train_step`), and wait for the loss value. After ``warmup_steps`` untimed
steps (allocator and kernel caches warm up), the median of ``timed_steps`` step times is kept: the
median, because a shared machine adds rare long pauses that a mean would absorb.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from batchfit.data.source import BatchSource
from batchfit.losses import LossFn
from batchfit.probe.common import Deadline, cycle_batches, model_device, preserved, synchronize
from batchfit.recommend import FLAT_GAIN, doubling_gains, flattening_point
from batchfit.schedule import check_batch_fits_data
from batchfit.train import train_step

WARMUP_STEPS = 2
TIMED_STEPS = 5
MIN_TIMED_STEPS = 3
#: Timed steps this many times apart (slowest over fastest) mean the timing is not to be trusted.
UNSTABLE = 3.0


@dataclass(frozen=True)
class ThroughputPoint:
    """One batch size: median step time, samples/s, and the spread of the timed steps."""

    batch_size: int
    micro_batch_size: int
    samples_per_s: float
    step_seconds: float
    step_seconds_min: float
    step_seconds_max: float
    timed_steps: int
    gain_from_doubling: float | None = None


@dataclass(frozen=True)
class Throughput:
    """The throughput probe's result. ``flattens_at``: the smallest size where doubling the batch
    gains less than 10% samples/s; ``skipped``: sizes not measured for lack of time."""

    points: tuple[ThroughputPoint, ...]
    flattens_at: int | None
    skipped: tuple[int, ...]
    warmup_steps: int
    notes: tuple[str, ...] = field(default=())

    def pairs(self) -> list[tuple[int, float]]:
        return [(p.batch_size, p.samples_per_s) for p in self.points]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def powers_of_two_up_to(ceiling: int) -> list[int]:
    """1, 2, 4, ... up to ``ceiling``, and ``ceiling`` itself when it is not a power of two.

    >>> powers_of_two_up_to(100)
    [1, 2, 4, 8, 16, 32, 64, 100]
    """
    sizes, b = [], 1
    while b < ceiling:
        sizes.append(b)
        b *= 2
    return [*sizes, ceiling]


def measure_throughput(
    model: nn.Module,
    data: BatchSource,
    loss_fn: LossFn,
    batch_sizes: Sequence[int],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    max_micro_batch_size: int | None = None,
    warmup_steps: int = WARMUP_STEPS,
    timed_steps: int = TIMED_STEPS,
    deadline: Deadline | None = None,
    log: Callable[[str], None] | None = None,
) -> Throughput:
    """Samples/s of real training steps at each of ``batch_sizes`` (ascending), model unchanged.

    Sizes above ``max_micro_batch_size`` run as accumulated micro-batches. When the ``deadline``
    draws near, fewer steps are timed (at least 3) and the sizes that no longer fit in the time
    left are skipped, smallest first kept.

    Examples:
        >>> import torch
        >>> from batchfit import TensorSource
        >>> src = TensorSource(torch.randn(64, 3), torch.randint(0, 2, (64,)))
        >>> result = measure_throughput(
        ...     torch.nn.Linear(3, 2), src, torch.nn.functional.cross_entropy, [8, 16])
        >>> [p.batch_size for p in result.points]
        [8, 16]
    """
    log = log or (lambda _: None)
    deadline = deadline or Deadline(None)
    if data.num_samples is not None:
        for size in batch_sizes:
            check_batch_fits_data(size, data.num_samples)
    device = model_device(model)
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=1e-3)
    points: list[ThroughputPoint] = []
    skipped: list[int] = []
    notes: list[str] = []
    last_step = 0.0
    with preserved(model, opt):
        model.train()
        for size in sorted(batch_sizes):
            micro = min(size, max_micro_batch_size or size)
            # Predict this size's cost from the last (step time roughly doubles with B).
            predicted = last_step * 2 * (warmup_steps + MIN_TIMED_STEPS)
            if skipped or (points and predicted > deadline.remaining()):
                skipped.append(size)
                continue
            batches = cycle_batches(data, size)
            times = []
            steps = warmup_steps + timed_steps
            for i in range(steps):
                started = time.perf_counter()
                x, y = next(batches)
                loss, _ = train_step(model, opt, loss_fn, x, y, micro, device)
                loss.item()
                synchronize(device)
                if i >= warmup_steps:
                    times.append(time.perf_counter() - started)
                    left = deadline.remaining()
                    if len(times) >= MIN_TIMED_STEPS and times[-1] * 2 > left:
                        break
            step = statistics.median(times)
            last_step = step
            points.append(
                ThroughputPoint(size, micro, size / step, step, min(times), max(times), len(times))
            )
            log(f"throughput: batch size {size}: {size / step:,.0f} samples/s")
            if len(times) < timed_steps:
                notes.append(
                    f"Batch size {size}: {len(times)} steps timed instead of {timed_steps}."
                )
    pairs = [(p.batch_size, p.samples_per_s) for p in points]
    gains = doubling_gains(pairs)
    points = [
        ThroughputPoint(**{**asdict(p), "gain_from_doubling": g})
        for p, g in zip(points, gains, strict=True)
    ]
    unstable = [p.batch_size for p in points if p.step_seconds_max > UNSTABLE * p.step_seconds_min]
    if unstable:
        notes.append(
            f"Step times varied more than {UNSTABLE:g}x at batch size "
            f"{', '.join(map(str, unstable))}: the CPU may be busy with other work (or its threads "
            "oversubscribed); rerun on a quiet machine, or with fewer threads (OMP_NUM_THREADS)."
        )
    if skipped:
        notes.append(f"Throughput not measured at {', '.join(map(str, skipped))} for lack of time.")
    flat = flattening_point(pairs, FLAT_GAIN)
    return Throughput(tuple(points), flat, tuple(skipped), warmup_steps, tuple(notes))

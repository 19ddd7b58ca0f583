"""Throughput: samples per second of real training steps, end to end, per batch size.

A timed step is what the training loop does for one batch: take it from the data source (so the
cost of loading and indexing counts), run forward, backward and the optimizer update
(:func:`batchfit.step.train_step`), and wait for the loss value. After ``warmup_steps`` untimed
steps (allocator and kernel caches warm up), steps are timed until there are ``timed_steps`` of them
and they add up to ``min_seconds``: a small model's step takes a millisecond or two, and five of
them are at the mercy of one scheduler tick. The median step time is kept: the median, because a
shared machine adds rare long pauses that a mean would absorb.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from batchfit.core.accounting import check_batch_fits_data
from batchfit.core.recommend import FLAT_GAIN, doubling_gains, flattening_point
from batchfit.data.source import BatchSource
from batchfit.losses import LossFn
from batchfit.probe.harness import Deadline, cycle_batches, preserved
from batchfit.probe.memory import is_out_of_memory, release_memory
from batchfit.step import model_device, synchronize, train_step

WARMUP_STEPS = 2
TIMED_STEPS = 5
MIN_TIMED_STEPS = 3
#: Time steps at each size until they add up to this (a busy or coarse clock evens out).
MIN_TIMED_SECONDS = 0.15
#: ... but never more steps than this at one size.
MAX_TIMED_STEPS = 200
#: Timed steps this many times apart (the slowest tenth over the fastest tenth) mean the timing is
#: not to be trusted.
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
    gains less than 10% samples/s; ``skipped``: sizes not measured for lack of time;
    ``out_of_memory_at``: the size that ran out of memory while being timed, if one did."""

    points: tuple[ThroughputPoint, ...]
    flattens_at: int | None
    skipped: tuple[int, ...]
    warmup_steps: int
    notes: tuple[str, ...] = field(default=())
    out_of_memory_at: int | None = None

    def pairs(self) -> list[tuple[int, float]]:
        return [(p.batch_size, p.samples_per_s) for p in self.points]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def powers_of_two_up_to(ceiling: int, smallest: int = 1) -> list[int]:
    """Powers of two from ``smallest`` (see :func:`~batchfit.probe.harness.smallest_trainable_size`)
    up to ``ceiling``, and ``ceiling`` itself when it is not a power of two.

    >>> powers_of_two_up_to(100), powers_of_two_up_to(100, smallest=2)
    ([1, 2, 4, 8, 16, 32, 64, 100], [2, 4, 8, 16, 32, 64, 100])
    """
    sizes, b = [], 1
    while b < ceiling:
        if b >= smallest:
            sizes.append(b)
        b *= 2
    return [*sizes, ceiling]


@dataclass(frozen=True)
class _Bench:
    """What every timed size shares: the model and its optimizer, the data, the settings."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    data: BatchSource
    device: torch.device
    max_micro_batch_size: int | None
    warmup_steps: int
    timed_steps: int
    min_seconds: float
    deadline: Deadline
    log: Callable[[str], None]


@dataclass
class _Timings:
    """The sizes measured so far, those skipped, and what the probe has to say."""

    points: list[ThroughputPoint] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    unstable: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    last_step: float = 0.0  # the median step time of the last size measured
    out_of_memory_at: int | None = None


def _time_steps(
    bench: _Bench, size: int, micro: int, min_seconds: float, may_give_up: bool
) -> list[float]:
    """Seconds of each timed step at batch ``size``, after the untimed warm-up steps; none when
    ``may_give_up`` and the first step shows that the size cannot be measured before the
    deadline."""
    batches = cycle_batches(bench.data, size)
    warmup_steps, deadline = bench.warmup_steps, bench.deadline
    times: list[float] = []
    for i in range(warmup_steps + MAX_TIMED_STEPS):
        started = time.perf_counter()
        x, y = next(batches)
        loss, _ = train_step(bench.model, bench.optimizer, bench.loss_fn, x, y, micro, bench.device)
        loss.item()
        synchronize(bench.device)
        if i == 0 and may_give_up:
            # The first step shows what this size costs: give up on it early if it cannot fit.
            needed = (time.perf_counter() - started) * (warmup_steps - 1 + MIN_TIMED_STEPS)
            if needed > deadline.remaining():
                return []
        if i >= warmup_steps:
            times.append(time.perf_counter() - started)
            if len(times) >= bench.timed_steps and sum(times) >= min_seconds:
                break
            if len(times) >= MIN_TIMED_STEPS and times[-1] * 2 > deadline.remaining():
                break
    return times


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
    min_seconds: float = MIN_TIMED_SECONDS,
    deadline: Deadline | None = None,
    log: Callable[[str], None] | None = None,
) -> Throughput:
    """Samples/s of real training steps at each of ``batch_sizes`` (ascending), model unchanged.

    Sizes above ``max_micro_batch_size`` run as accumulated micro-batches. At each size at least
    ``timed_steps`` steps are timed, and more until they add up to ``min_seconds``. When the
    ``deadline`` draws near, fewer steps are timed (at least 3) and the sizes that no longer fit in
    the time left are skipped, smallest first kept.

    Examples:
        >>> import torch
        >>> from batchfit import TensorSource
        >>> src = TensorSource(torch.randn(64, 3), torch.randint(0, 2, (64,)))
        >>> result = measure_throughput(
        ...     torch.nn.Linear(3, 2), src, torch.nn.functional.cross_entropy, [8, 16])
        >>> [p.batch_size for p in result.points]
        [8, 16]
    """
    if data.num_samples is not None:
        for size in batch_sizes:
            check_batch_fits_data(size, data.num_samples)
    bench = _Bench(
        model=model,
        optimizer=optimizer or torch.optim.Adam(model.parameters(), lr=1e-3),
        loss_fn=loss_fn,
        data=data,
        device=model_device(model),
        max_micro_batch_size=max_micro_batch_size,
        warmup_steps=warmup_steps,
        timed_steps=timed_steps,
        min_seconds=min_seconds,
        deadline=deadline or Deadline(None),
        log=log or (lambda _: None),
    )
    timings = _Timings()
    with preserved(model, bench.optimizer):
        model.train()
        for size in sorted(batch_sizes):
            if not _measure_size(bench, timings, size, len(batch_sizes)):
                break
    return _summarise(timings, warmup_steps)


def _measure_size(bench: _Bench, timings: _Timings, size: int, sizes: int) -> bool:
    """Time batch ``size`` (one of ``sizes``), or skip it when the time left is too short;
    False when it ran out of memory, which ends the probe."""
    points = timings.points
    micro = min(size, bench.max_micro_batch_size or size)
    # Predict this size's cost from the last (step time roughly doubles with B).
    predicted = timings.last_step * 2 * (bench.warmup_steps + MIN_TIMED_STEPS)
    if timings.skipped or (points and predicted > bench.deadline.remaining()):
        timings.skipped.append(size)
        return True
    # Spend at most half of each remaining size's share of the time on reaching min_seconds.
    share = 0.5 * bench.deadline.remaining() / (sizes - len(points))
    try:
        times = _time_steps(
            bench, size, micro, min(bench.min_seconds, share), may_give_up=bool(points)
        )
    except Exception as exc:
        # A device can still run out at a size the memory probe passed (fragmentation).
        if not is_out_of_memory(exc):
            raise
        release_memory(bench.device, collect=True)
        timings.notes.append(
            f"Batch size {size} ran out of memory while timing it; it and larger sizes "
            "were not measured."
        )
        timings.out_of_memory_at = size
        return False
    if not times:
        timings.skipped.append(size)
        return True
    if _unstable(times):
        timings.unstable.append(size)
    step = statistics.median(times)
    timings.last_step = step
    points.append(
        ThroughputPoint(size, micro, size / step, step, min(times), max(times), len(times))
    )
    bench.log(f"throughput: batch size {size}: {size / step:,.0f} samples/s")
    if len(times) < bench.timed_steps:
        timings.notes.append(
            f"Batch size {size}: {len(times)} steps timed instead of {bench.timed_steps}."
        )
    return True


def _unstable(times: Sequence[float]) -> bool:
    """Whether the slowest timed steps took :data:`UNSTABLE` times the fastest (the slowest tenth
    over the fastest tenth, given ten steps or more)."""
    if len(times) >= 10:
        deciles = statistics.quantiles(times, n=10)
        return deciles[-1] > UNSTABLE * deciles[0]
    return max(times) > UNSTABLE * min(times)


def _summarise(timings: _Timings, warmup_steps: int) -> Throughput:
    """The points with their gains from doubling, the flattening point, and the notes."""
    pairs = [(p.batch_size, p.samples_per_s) for p in timings.points]
    gains = doubling_gains(pairs)
    points = [replace(p, gain_from_doubling=g) for p, g in zip(timings.points, gains, strict=True)]
    notes = timings.notes
    if timings.unstable:
        notes.append(
            f"Step times varied more than {UNSTABLE:g}x at batch size "
            f"{', '.join(map(str, timings.unstable))}: the CPU may be busy with other work (or "
            "its threads oversubscribed); rerun on a quiet machine, or with fewer threads "
            "(OMP_NUM_THREADS)."
        )
    skipped = timings.skipped
    if skipped:
        notes.append(f"Throughput not measured at {', '.join(map(str, skipped))} for lack of time.")
    flat = flattening_point(pairs, FLAT_GAIN)
    return Throughput(
        tuple(points), flat, tuple(skipped), warmup_steps, tuple(notes), timings.out_of_memory_at
    )

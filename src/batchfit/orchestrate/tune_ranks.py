"""``tune`` under torchrun: every rank measures its memory ceiling at once, the minimum wins.

Why: the ranks train together, each on its own device, so the micro-batch must fit on every one
of them; a device with less room (a smaller GPU, a busier machine, a model whose footprint
differs by rank) sets the ceiling for all. Each rank searches its own device under its own limit;
the ceilings are gathered and the smallest rank's search stands for all, with every rank's
ceiling kept (``per_rank``). An error on any rank (nothing fits even at the smallest size) is
raised on every rank. Then every rank measures the gradient noise scale together, within that
ceiling: each rank's gradient is the small batch, their all-reduce the large one
(:mod:`batchfit.probe.noise_ranks`); an error there too is raised on every rank. The later phases
(throughput, learning rate, race) then run on rank 0 alone with that ceiling and that noise
measurement while the others wait for its answer (:func:`on_rank_0`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

from batchfit.distributed import on_every_rank, on_rank_0
from batchfit.orchestrate.tune_state import MeasuredByRanks, Phase
from batchfit.probe.memory import MemoryCeiling
from batchfit.probe.noise import NoiseMeasurement

T = TypeVar("T")


def smallest_ceiling(ceilings: Sequence[MemoryCeiling]) -> MemoryCeiling:
    """The lowest rank's smallest ceiling, listing every rank's (``per_rank``, rank order)."""
    least = min(ceilings, key=lambda c: c.max_micro_batch_size)
    return replace(least, per_rank=tuple(c.max_micro_batch_size for c in ceilings))


def tune_on_ranks(
    measure_memory: Callable[[], Phase[MemoryCeiling]],
    measure_noise: Callable[[MemoryCeiling], Phase[NoiseMeasurement | None] | None],
    rest: Callable[[MeasuredByRanks], T],
    wait_s: float,
) -> T:
    """``measure_memory()`` on every rank, then ``measure_noise(combined ceiling)`` on every rank
    together (rank 0's phase counts; the others return None), then ``rest(both phases)`` on rank
    0 alone; every rank returns rank 0's result or raises its error. The memory phase's seconds
    are all but the noise phase's, gathering and waiting included."""
    started = time.perf_counter()
    combined = smallest_ceiling([p.result for p in on_every_rank(measure_memory, wait_s)])
    noise = on_every_rank(lambda: measure_noise(combined), wait_s)[0]
    assert noise is not None  # rank 0's
    seconds = round(time.perf_counter() - started, 3)
    memory = Phase(combined, combined.notes, seconds=round(seconds - noise.seconds, 3))
    return on_rank_0(lambda: rest(MeasuredByRanks(memory, noise, seconds)), wait_s)

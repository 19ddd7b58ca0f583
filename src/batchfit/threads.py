"""torch's intra-op threads for a run: the count a run is given (``threads``), set for it and
set back after, and the cheap check that torch's own count fights over the cores.

Why: torch starts one thread per core it sees, and on a machine whose cores are busy with other
work, or inside a container that shows more cores than it grants, those threads take turns and
every step slows alike (a reference product measured 62x slower on 2 threads than it should on
a shared 2-core machine). Nothing in the run's own numbers says so; a reference timing does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from batchfit.core.options import opt_value

#: Torch's threads slower than this many times one thread: they compete for cores.
THREADS_SLOWER = 1.3
#: The reference workload: a product of two square float32 matrices of this size, repeated.
REFERENCE_SIZE = 192
REFERENCE_REPEATS = 12


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; all of them where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def reference_seconds(threads: int) -> float:
    """The fastest of a few timings of the reference workload on ``threads`` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.ones(REFERENCE_SIZE, REFERENCE_SIZE)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(REFERENCE_REPEATS):
                a = (a @ a).clamp_(-1.0, 1.0)
            best = min(best, time.perf_counter() - started)
        return best
    finally:
        torch.set_num_threads(previous)


def use_threads(threads: int | None) -> None:
    """Set torch's threads to ``threads`` only when that changes them: resetting the pool to
    the count it has is not free, and under torchrun it races the process group's threads."""
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block on ``threads`` torch threads (None: as they are), then set them back.

    >>> before = torch.get_num_threads()
    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    before = torch.get_num_threads()
    use_threads(threads)  # None or the same count: the pool is left as it is (torchrun too)
    try:
        yield
    finally:
        use_threads(before)


def threads_compete(threads: int, cores: int, with_threads: float, one: float) -> bool:
    """Torch's ``threads`` outnumber the ``cores``, or ran the reference slower than one thread
    did (``with_threads`` against ``one`` seconds): they take turns on the cores.

    >>> threads_compete(8, 2, 0.01, 0.01), threads_compete(2, 2, 0.05, 0.01)
    (True, True)
    >>> threads_compete(2, 2, 0.006, 0.01)
    False
    """
    return threads > cores or (threads > 1 and with_threads > THREADS_SLOWER * one)


def thread_warning() -> str | None:
    """For train and sweep, cheaply (two timings of a few milliseconds): torch's threads outnumber
    the cores or run the reference slower than one thread, named with the fix; None when not."""
    cores, threads = usable_cores(), torch.get_num_threads()
    if threads <= 1:
        return None
    with_threads, one = reference_seconds(threads), reference_seconds(1)
    if not threads_compete(threads, cores, with_threads, one):
        return None
    return (
        f"torch runs {threads} threads on {cores} usable cores, and a reference matrix product "
        f"took {with_threads / one:.1f}x the time of one thread: the threads compete for the "
        f"cores and every step slows down; give {opt_value('threads', 1)} or {cores} (or the "
        "count tune's report names)."
    )

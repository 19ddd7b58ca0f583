"""Is this machine fit to time anything? A CPU shared with other work, or torch running more
threads than it has cores, makes every step slow alike: throughput then looks flat, and the batch
size that timings recommend is off, with nothing in the numbers to say so.

:func:`check_machine` looks before measuring, in well under a second:

- the cores this process may use against ``torch.get_num_threads()`` (more threads than cores:
  oversubscribed);
- how busy other processes keep the CPU (sampled over a fraction of a second);
- a fixed reference workload, a matrix product, on torch's threads and on one: when the threads
  make it *slower* than one thread alone, they are fighting over cores (the usual sign of
  oversubscription, seen as steps 10-100x slower than they should be).

Each finding is a warning with its fix; tune prints them first and records them in the report.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch

#: Other processes keeping more than this share of the CPU busy make timings unreliable.
BUSY_SHARE = 0.5
#: Torch's threads slower than this many times one thread: they compete for cores.
THREADS_SLOWER = 1.3
#: The reference workload: a product of two square float32 matrices of this size, repeated.
REFERENCE_SIZE = 192
REFERENCE_REPEATS = 12
SAMPLE_SECONDS = 0.3


@dataclass(frozen=True)
class MachineCheck:
    """What the machine looked like before measuring, and the warnings it gave."""

    cores: int
    threads: int
    busy_share: float
    reference_seconds_threads: float
    reference_seconds_one: float
    warnings: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; all of them where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _reference_seconds(threads: int) -> float:
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


def check_machine(device: torch.device) -> MachineCheck:
    """Look at the CPU before timing anything on it (on a GPU, only the host's threads matter
    less, so the checks still run: data loading and the optimizer step use the CPU)."""
    cores, threads = usable_cores(), torch.get_num_threads()
    busy = psutil.cpu_percent(interval=SAMPLE_SECONDS) / 100.0
    with_threads = _reference_seconds(threads)
    one = _reference_seconds(1) if threads > 1 else with_threads
    warnings = []
    if threads > cores:
        warnings.append(
            f"torch runs {threads} threads on {cores} usable cores, so they take turns and every "
            f"step slows down; call torch.set_num_threads({cores}) or set OMP_NUM_THREADS={cores}."
        )
    if busy > BUSY_SHARE and device.type == "cpu":
        warnings.append(
            f"Other work kept {busy:.0%} of the CPU busy as tune started, so its timings (and the "
            "batch size they recommend) may be off; run tune when the machine is idle."
        )
    if threads > 1 and with_threads > THREADS_SLOWER * one:
        warnings.append(
            f"A reference matrix product ran {with_threads / one:.1f}x slower on torch's "
            f"{threads} threads than on one: the threads compete with other work for the cores, "
            "so every step is slow alike; free the CPU, or set OMP_NUM_THREADS=1."
        )
    return MachineCheck(cores, threads, busy, with_threads, one, tuple(warnings))

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

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import psutil
import torch

from batchfit.core.options import opt_value
from batchfit.threads import THREADS_SLOWER, threads_compete, usable_cores
from batchfit.threads import reference_seconds as _reference_seconds

#: Other processes keeping more than this share of the CPU busy make timings unreliable.
BUSY_SHARE = 0.5
SAMPLE_SECONDS = 0.3


@dataclass(frozen=True)
class MachineCheck:
    """What the machine looked like before measuring, and the warnings it gave; and the torch
    threads tune measured with (``threads_used``): the ones given, torch's own, or on an
    oversubscribed CPU the fastest of ``threads_seconds`` (count -> reference seconds)."""

    cores: int
    threads: int
    busy_share: float
    reference_seconds_threads: float
    reference_seconds_one: float
    warnings: tuple[str, ...]
    threads_used: int = 0
    threads_how: str = "torch's own"
    threads_seconds: dict[int, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fastest_threads(seconds: Mapping[int, float]) -> int:
    """The thread count that ran the reference workload fastest; of counts within 5% of it, the
    fewest (fewer threads leave cores to the rest of the machine).

    >>> fastest_threads({1: 0.010, 2: 0.006, 8: 0.050})
    2
    >>> fastest_threads({1: 0.0100, 2: 0.0098})
    1
    """
    best = min(seconds.values())
    return min(n for n, s in seconds.items() if s <= 1.05 * best)


def thread_counts(cores: int, default: int) -> list[int]:
    """The counts tried on an oversubscribed CPU: one, half the cores, all of them, torch's own.

    >>> thread_counts(2, 8), thread_counts(16, 16)
    ([1, 2, 8], [1, 8, 16])
    """
    return sorted({1, max(1, cores // 2), cores, default})


def oversubscribed(check: MachineCheck) -> bool:
    """Torch's threads outnumber the cores, or run the reference slower than one thread does."""
    return threads_compete(
        check.threads, check.cores, check.reference_seconds_threads, check.reference_seconds_one
    )


def choose_threads(check: MachineCheck, given: int | None) -> MachineCheck:
    """The threads to measure with: ``given`` when given; on an oversubscribed CPU the fastest
    on the reference workload (timed now); else torch's own. The caller sets them."""
    if given is not None:
        return replace(check, threads_used=given, threads_how="given")
    if not oversubscribed(check):
        return replace(check, threads_used=check.threads)
    seconds = {n: _reference_seconds(n) for n in thread_counts(check.cores, check.threads)}
    chosen = fastest_threads(seconds)
    timings = ", ".join(f"{n}: {s * 1e3:.1f} ms" for n, s in sorted(seconds.items()))
    note = (
        f"tune measured with {chosen} torch threads, the fastest on a reference matrix product "
        f"({timings}; torch's own: {check.threads}); train with {opt_value('threads', chosen)}."
    )
    return replace(
        check,
        threads_used=chosen,
        threads_how=f"the fastest of {sorted(seconds)} on the reference workload",
        threads_seconds=seconds,
        warnings=(*check.warnings, note),
    )


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
    return MachineCheck(cores, threads, busy, with_threads, one, tuple(warnings), threads)

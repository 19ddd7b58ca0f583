"""The clock that tune's time budget is counted on.

By default the budget counts wall-clock seconds: it is what the user waits. With the environment
variable ``BATCHFIT_BUDGET_CLOCK=cpu`` it counts this process's CPU seconds instead, so that
other work on a shared machine (a CI runner, a test suite beside other jobs) does not eat into
what a budget measures: every phase then gets the same work on a busy machine as on a quiet
one. That clock is for runs on the CPU with one thread per process (``OMP_NUM_THREADS=1``): a
GPU's work does not show in CPU time, and n threads spend n CPU seconds per second.

Only the budget's deadlines read this clock; measured step times stay in wall seconds.

Examples:
    >>> later = now()
    >>> now() >= later
    True
"""

from __future__ import annotations

import os
import time

#: The environment variable that chooses the clock: ``wall`` (the default) or ``cpu``.
CLOCK_VARIABLE = "BATCHFIT_BUDGET_CLOCK"
CLOCKS = ("wall", "cpu")


def kind() -> str:
    """The clock the budget counts on (``wall`` or ``cpu``); an unknown value is refused with the
    values it may take, since a typo would silently change what the budget means."""
    value = os.environ.get(CLOCK_VARIABLE, "wall").strip().lower() or "wall"
    if value not in CLOCKS:
        from batchfit.errors import BatchfitError

        raise BatchfitError(
            f"{CLOCK_VARIABLE}={value!r} is not a clock: set it to 'wall' (the default: the "
            "budget counts the seconds you wait) or 'cpu' (this process's CPU seconds)."
        )
    return value


def now() -> float:
    """The budget clock's reading in seconds (only differences between readings mean anything)."""
    return time.process_time() if kind() == "cpu" else time.monotonic()

"""A sweep stopped by SIGINT or SIGTERM at any point says what was saved and how to resume.

Inside a run, :func:`batchfit.train` turns the first signal into a stop after the current step
(:class:`~batchfit.loop.signals.StopSignals`). Outside one (the sweep's checks and its first
evaluation, a run's evaluation and sharpness, the report) a SIGTERM would kill the process
silently and a SIGINT be a bare ``KeyboardInterrupt``: :func:`signals_stop_the_sweep` makes both
raise :class:`SweepSignal` there, which the sweep turns into one
:class:`~batchfit.errors.TrainingInterrupted` naming its phase.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchfit.core.options import opt
from batchfit.errors import TrainingInterrupted

#: The signals that stop a sweep.
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SweepSignal(KeyboardInterrupt):
    """SIGINT or SIGTERM received outside a run's training steps (``signal_name`` says which).
    A ``KeyboardInterrupt``, as Python's own SIGINT is, so code that lets Ctrl-C through lets
    this through too."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


@contextlib.contextmanager
def signals_stop_the_sweep() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`SweepSignal` while the sweep runs; the handlers before
    are restored after. A signal ignored (``SIG_IGN``, e.g. SIGINT under ``nohup``) stays
    ignored; off the main thread (where handlers cannot be set) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}

    def stop(signum: int, frame: Any) -> None:
        raise SweepSignal(signal.Signals(signum).name)

    try:
        for sig in map(int, SIGNALS):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, stop)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stopped_before_runs(exc: BaseException) -> TrainingInterrupted:
    """A signal while the sweep checked its inputs and measured its start: nothing saved yet."""
    name = getattr(exc, "signal_name", "SIGINT")
    return TrainingInterrupted(
        f"Stopped by {name} while preparing the sweep (checking its inputs and evaluating the "
        "initial weights); no run had finished, so nothing was saved.",
        name,
        0,
    )


def stopped_after_runs(
    exc: BaseException, saved: int, runs_dir: Path | None
) -> TrainingInterrupted:
    """A signal while the sweep wrote its report: every run is saved, the report is not."""
    name = getattr(exc, "signal_name", "SIGINT")
    kept = (
        f"all {saved} finished run(s) are saved in {runs_dir}; continue with {opt('resume')}, "
        "which reads them back and writes the report."
        if runs_dir is not None
        else "nothing was saved because no output folder was given."
    )
    return TrainingInterrupted(f"Stopped by {name} while writing the report; {kept}", name, 0)

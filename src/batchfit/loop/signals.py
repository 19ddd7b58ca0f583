"""SIGINT and SIGTERM turned into a stop after the current step, with a checkpoint when there is
somewhere to save one."""

from __future__ import annotations

import signal
import threading
from typing import Any

from batchfit.core.options import opt
from batchfit.errors import TrainingInterrupted
from batchfit.loop.state import Position


class StopSignals:
    """Turn the first SIGINT/SIGTERM into ``received`` (the signal's name), which the step loop
    checks after each step. A second signal gets the previous handler (a second Ctrl-C
    interrupts at once). Signal handlers can only be set from the main thread; elsewhere this
    does nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signum, self._previous[signum])

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def interrupted(signal_name: str, pos: Position, saved_at: str | None) -> TrainingInterrupted:
    """The error that ends a run stopped by a signal: where it stopped and what was saved."""
    where = f"step {pos.step} (epoch {pos.epoch + 1}, {pos.sample_in_epoch} samples into it)"
    if saved_at:
        message = f"Stopped by {signal_name} at {where}; checkpoint saved to {saved_at}."
    else:
        message = (
            f"Stopped by {signal_name} at {where}; nothing was saved because no "
            f"{opt('checkpoint_dir')} was given."
        )
    return TrainingInterrupted(message, signal_name, pos.step)

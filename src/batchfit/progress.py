"""Progress on stderr: one bar per epoch with loss, samples/s and ETA, then a summary line.

Everything goes to stderr, so ``--json`` output on stdout stays clean. Updates are throttled by the
caller (the training loop flushes a few times a second), so the display costs nothing per step.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_console: Console | None = None


def console() -> Console:
    """The shared stderr console (created lazily so that tests can swap stderr). Lines are never
    broken at the console's width: piped to a file or a log collector (80 columns when not a
    terminal), a long path would split a message in two; a terminal wraps them itself."""
    global _console
    if _console is None:
        _console = Console(stderr=True, highlight=False, soft_wrap=True)
    return _console


class TrainProgress:
    """Per-epoch progress bars; every method is a no-op when ``enabled`` is False."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def start_epoch(self, label: str, total_steps: int | None, done_steps: int = 0) -> None:
        if not self.enabled:
            return
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps  loss {task.fields[loss]}  {task.fields[speed]} samples/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console(),
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(
            label, total=total_steps, completed=done_steps, loss="-", speed="-"
        )

    def update(self, steps_done: int, loss: float, samples_per_s: float) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(
                self._task,
                completed=steps_done,
                loss=f"{loss:.4f}",
                speed=f"{samples_per_s:,.0f}",
            )

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def log(self, message: str) -> None:
        if self.enabled:
            console().print(message)

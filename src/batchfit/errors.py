"""The project's exception types.

Every error a user can cause by what they pass in is a :class:`BatchfitError` whose message names
the value that was wrong and what to do instead. The command line prints that message as one line
and exits with status 2; the Python API simply raises it.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    r"""The first line of an error's message, without a final full stop (ours add their own), or
    the error's type when it has no message (a bare ``MemoryError()``, say).

    >>> first_line(ValueError("shapes differ.\nmore detail")), first_line(MemoryError())
    ('shapes differ', 'MemoryError')
    """
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__).rstrip(".")


class BatchfitError(ValueError):
    """Bad input or an unusable setting: the message says what was wrong and how to fix it."""

    #: Set when training stopped on this error after saving a checkpoint (the CLI then says how
    #: to resume).
    checkpoint_path: str | None = None


class NonFiniteLossError(BatchfitError):
    """The training loss became NaN or infinite; training stopped and nothing bad was saved."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class TrainingInterrupted(BatchfitError):
    """SIGINT or SIGTERM stopped training; a checkpoint was saved if a directory was given."""

    def __init__(self, message: str, signal_name: str, step: int) -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.step = step

"""The project's exception types.

Every error a user can cause by what they pass in is a :class:`BatchfitError` whose message names
the value that was wrong and what to do instead. The command line prints that message as one line
and exits with status 2; the Python API simply raises it.
"""

from __future__ import annotations

import contextlib
import errno
import traceback
import types
from collections.abc import Iterator
from pathlib import Path

#: This package's folder: frames of files under it are batchfit's, not the user's.
_PACKAGE = str(Path(__file__).resolve().parent)


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
    #: What must change before that resume can go on (the CLI says "Once <this>, resume with").
    resume_when: str = "the data is fixed"


class StoppedAfterSaving(BatchfitError):
    """``cause``, met while training, after the checkpoint of the last completed step was saved
    to ``checkpoint_path``: the message is the cause's, then where training stopped and what was
    saved. A new error, so that the cause keeps its own message for whoever else holds it."""

    def __init__(self, cause: BatchfitError, where: str, saved_at: str) -> None:
        super().__init__(f"{cause} Training stopped at {where}; checkpoint saved to {saved_at}.")
        self.cause, self.checkpoint_path, self.resume_when = cause, saved_at, cause.resume_when


class ReportedByRank0(BatchfitError):
    """Rank 0's error, raised on another rank under ``torchrun`` so that every rank stops: rank
    0's command line prints it, so this rank's says nothing (the message is printed once)."""


class NonFiniteLossError(BatchfitError):
    """The training loss became NaN or infinite; training stopped and nothing bad was saved.

    Given ``advice``, the message is ``"<message>; <what was kept>. <advice>"``; the training loop
    says there what is true of the checkpoints (:meth:`say_kept`)."""

    #: What is true without knowing more: the bad state was never saved.
    NOTHING_LATER_KEPT = "training stopped; no checkpoint of this or a later step was kept"

    def __init__(self, message: str, step: int, advice: str = "") -> None:
        self.head, self.advice, self.step = message, advice, step
        super().__init__(self._text(self.NOTHING_LATER_KEPT) if advice else message)

    def _text(self, kept: str) -> str:
        return f"{self.head}; {kept}. {self.advice}"

    def say_kept(self, kept: str) -> None:
        """Say ``kept`` (what became of the checkpoints) in place of the general statement."""
        if self.advice:
            self.args = (self._text(kept),)


class TrainingInterrupted(BatchfitError):
    """SIGINT or SIGTERM stopped training; a checkpoint was saved if a directory was given."""

    def __init__(self, message: str, signal_name: str, step: int) -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.step = step


def without_batchfit_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb`` without the frames of batchfit's own files: what is left is the user's code (and
    the libraries it called), the part of a traceback that helps fix it."""
    kept = []
    while tb is not None:
        if not str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_PACKAGE):
            kept.append(tb)
        tb = tb.tb_next
    chain = None
    for entry in reversed(kept):
        chain = types.TracebackType(chain, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return chain


def user_code_failed(
    exc: BaseException, where: str, step: int, saved_at: str | None, how_to_resume: str
) -> BaseException:
    """``exc``, raised by the user's code (their dataset, model or loss) at ``where`` (``"step 6
    (epoch 1)"``), marked for the caller: its traceback shows the user's frames only,
    ``exc.batchfit_step`` is the last completed step and ``exc.checkpoint_path`` its checkpoint
    (None: none saved), and a note says where training stopped and how to resume."""
    exc.batchfit_step = step  # type: ignore[attr-defined]  # tagged on the user's error
    exc.checkpoint_path = saved_at  # type: ignore[attr-defined]  # tagged on the user's error
    if saved_at:
        kept = f"the checkpoint of step {step}, the last completed, was saved to {saved_at}"
        then = f"; fix the error, then {how_to_resume}"
    else:
        kept, then = "no checkpoint was saved", ""
    exc.add_note(f"batchfit: training stopped at {where} on this error; {kept}{then}.")
    return exc.with_traceback(without_batchfit_frames(exc.__traceback__))


def users_frames_only(exc: BaseException) -> BaseException | None:
    """``exc`` with the user's frames only, for an error of the user's code that
    :func:`user_code_failed` marked; None for any other error (the caller re-raises it as is).
    The caller raises the result, so its own frame is the one of batchfit's left: the call the
    user made."""
    if getattr(exc, "batchfit_step", None) is None:
        return None
    return exc.with_traceback(without_batchfit_frames(exc.__traceback__))


def describe_user_failure(exc: BaseException) -> str | None:
    """The user's traceback and batchfit's note, for a command to print; None for an error that
    :func:`user_code_failed` did not mark."""
    if getattr(exc, "batchfit_step", None) is None:
        return None
    frames = without_batchfit_frames(exc.__traceback__)  # ours were added on the way up
    return "".join(traceback.format_exception(type(exc), exc, frames, chain=False)).rstrip()


#: errno values that mean the disk (or this process's file-size limit) has no room left.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def no_space_error(exc: BaseException, folder: str | Path, kept: str = "") -> BatchfitError | None:
    """The one-line error for a write that failed for want of space in ``folder`` (ENOSPC, a
    quota, or a file-size limit), saying what was ``kept``; None for any other error."""
    if not isinstance(exc, OSError) or exc.errno not in NO_SPACE_ERRNOS:
        return None
    reason = "file too large for this process's limit" if exc.errno == errno.EFBIG else ""
    detail = f" ({reason})" if reason else ""
    return BatchfitError(
        f"No space left on '{folder}'{detail}{kept}; free some space or choose another folder."
    )


@contextlib.contextmanager
def space_checked(folder: str | Path, kept: str = "") -> Iterator[None]:
    """Within this block, a write that fails for want of space is :func:`no_space_error`."""
    try:
        yield
    except OSError as exc:
        error = no_space_error(exc, folder, kept)
        if error is None:
            raise
        raise error from None

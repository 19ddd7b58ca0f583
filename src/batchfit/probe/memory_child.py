"""One memory trial in a forked child process under the memory limit, and the process's peak
memory read from the kernel: the confirmation of a ceiling found in this process
(:func:`confirm_in_child`) and, where a kernel may crash rather than raise on a refused
allocation, every trial (:func:`child_trial`). Split from :mod:`~batchfit.probe.memory`, which
searches the ceiling and imports these from here."""

from __future__ import annotations

import os
import resource
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch

from batchfit.core.units import format_bytes
from batchfit.errors import BatchfitError, first_line
from batchfit.memory_limits import address_space_limit, is_out_of_memory, release_memory, rss_bytes
from batchfit.memory_limits import status_bytes as _status_bytes

#: What PyTorch raises when a child forked after autograd started its GPU threads runs backward.
AUTOGRAD_FORK_ERROR = "autograd's threading in combination with fork"


@dataclass(frozen=True)
class MemoryTrial:
    """One training iteration at ``micro_batch_size``: did it fit, and its peak memory."""

    micro_batch_size: int
    fits: bool
    out_of_memory: bool
    peak_bytes: int | None
    rss_after_bytes: int | None
    seconds: float
    error: str | None = None


# --- process memory (Linux /proc; elsewhere a conservative fallback) -------------------------


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(reset_worked: bool) -> int:
    if reset_worked:
        peak = _status_bytes("VmHWM")
        if peak is not None:
            return peak
    # Lifetime peak: never below the trial's own, so a trial judged to fit really fits.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"[:300]


def confirm_in_child(
    run: Callable[[], None], limit: int, headroom: float, timeout: float = 60.0
) -> tuple[bool | None, str]:
    """Run ``run`` once in a forked child whose address space allows at most ``limit`` bytes of
    resident memory for the whole process (relative to this process's use now).

    Returns ``(True, detail)`` when it ran within the limit, ``(False, detail)`` on a real
    out-of-memory error in the child, a peak above the limit less headroom, or a child killed by a
    signal (the kernel's out-of-memory killer sends SIGKILL), and ``(None, why)`` where a child
    cannot be forked, cannot train (PyTorch's autograd refuses to run in a child forked after it
    started threads for GPUs: a CPU model on a GPU machine) or gave no answer within ``timeout``
    seconds.

    >>> confirm_in_child(lambda: os.kill(os.getpid(), 9), rss_bytes() + 2**30, 0.1)
    (False, 'the child process was killed by SIGKILL (the out-of-memory killer sends it)')
    """
    if not _can_fork():
        return None, "not run: needs fork and /proc (Linux)"
    answer, status, parent_files = _in_child(run, limit, timeout)
    if answer is None:
        return None, f"the child process gave no answer within {timeout:.0f} s"
    return _child_verdict(answer, status, limit, headroom, parent_files)


def _can_fork() -> bool:
    return hasattr(os, "fork") and sys.platform.startswith("linux")


def _in_child(run: Callable[[], None], limit: int, timeout: float) -> tuple[str | None, int, int]:
    """Run ``run`` in a forked child limited to ``limit`` bytes for the whole process: what it
    wrote (None: nothing within ``timeout`` seconds), its wait status, and this process's
    resident memory when it forked.

    The child writes its peak and its file-backed resident pages after the run: a forked child
    does not count the parent's file-backed pages (torch's libraries, about 100 MiB) until it
    touches them, so its own peak reads lower than the same iteration in this process by the
    file pages this process holds and the child never touched (:func:`_peak_here`). The third
    value returned is this process's file-backed resident memory at the fork."""
    release_memory()
    parent_rss = rss_bytes()
    parent_files = _status_bytes("RssFile") or 0
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _run_in_child(run, limit - parent_rss, write_fd)
    os.close(write_fd)
    answer, status = _child_answer(pid, read_fd, timeout)
    return answer, status, parent_files


def _peak_here(answer: str, parent_files: int) -> int:
    """The peak the child's iteration would have reached in this process: the child's peak plus
    the file-backed pages this process held that the child did not (``answer``: its ``PEAK
    FILES`` in bytes)."""
    peak, _, files = answer.partition(" ")
    return int(peak) + max(0, parent_files - int(files or parent_files))


def child_trial(
    run: Callable[[], None], size: int, limit: int, headroom: float, timeout: float = 60.0
) -> MemoryTrial | None:
    """One trial (:func:`_trial`) in a forked child under the limit, so that a kernel that dies
    of a refused allocation instead of raising (oneDNN's bf16 kernels, measured, segfault when
    the limit is very tight) ends the child, not tune: a child killed by a signal did not fit.
    None where no child can run it (no fork, autograd's GPU threads, no answer in time)."""
    if not _can_fork():
        return None
    started = time.perf_counter()
    answer, status, parent_files = _in_child(run, limit, timeout)
    seconds = time.perf_counter() - started
    if answer is None:
        return None
    if os.WIFSIGNALED(status):
        why = f"the child was killed by {signal.Signals(os.WTERMSIG(status)).name}"
        return MemoryTrial(size, False, True, None, None, seconds, why)
    kind, _, rest = answer.partition(" ")
    if kind == "ok":
        peak = _peak_here(rest, parent_files)
        return MemoryTrial(size, peak <= (1 - headroom) * limit, False, peak, None, seconds)
    if kind == "oom":
        return MemoryTrial(size, False, True, None, None, seconds, rest)
    if kind == "error" and AUTOGRAD_FORK_ERROR not in rest:
        raise BatchfitError(f"The training iteration failed in the memory trial's child: {rest}")
    return None


def _run_in_child(run: Callable[[], None], allowed_new_bytes: int, write_fd: int) -> NoReturn:
    """The forked child: run under the address-space limit, write ``ok PEAK``, ``oom WHY`` or
    ``error WHY`` to the pipe, and exit without returning into the parent's code."""
    code = 1
    try:
        # GNU OpenMP's thread pool does not survive fork; one thread avoids a hang.
        torch.set_num_threads(1)
        reset = _reset_peak()
        with address_space_limit(allowed_new_bytes):
            try:
                run()
                message = f"ok {_peak_bytes(reset)} {_status_bytes('RssFile') or 0}"
                code = 0
            except Exception as exc:
                kind = "oom" if is_out_of_memory(exc) else "error"
                message = f"{kind} {_first_line(exc)}"
        os.write(write_fd, message.encode()[:4000])
    finally:
        os._exit(code)


def _child_answer(pid: int, read_fd: int, timeout: float) -> tuple[str | None, int]:
    """What the child wrote (``None``: nothing within ``timeout`` seconds, so it was killed) and
    its wait status."""
    chunks = []
    timed_out = False
    try:
        ready, _, _ = select.select([read_fd], [], [], timeout)
        if ready:
            while chunk := os.read(read_fd, 4096):
                chunks.append(chunk)
        else:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    return (None if timed_out else b"".join(chunks).decode(errors="replace")), status


def _child_verdict(
    answer: str, status: int, limit: int, headroom: float, parent_files: int
) -> tuple[bool | None, str]:
    """:func:`confirm_in_child`'s verdict from the child's answer and wait status (and this
    process's file-backed memory at the fork, :func:`_peak_here`)."""
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return False, f"the child process was killed by {name} (the out-of-memory killer sends it)"
    kind, _, rest = answer.partition(" ")
    if kind == "ok":
        peak = _peak_here(rest, parent_files)
        if peak <= (1 - headroom) * limit:
            return (
                True,
                f"ran in a child process limited to {format_bytes(limit)}: "
                f"peak {format_bytes(peak)}",
            )
        return False, f"peak {format_bytes(peak)} in the child is above the limit less headroom"
    if kind == "oom":
        return False, f"out of memory in the child: {rest}"
    if kind == "error" and AUTOGRAD_FORK_ERROR in rest:
        return None, (
            "not run: on a machine with GPUs, PyTorch's autograd cannot run in a forked child "
            "once it has started its GPU threads (the in-process trials under the address-space "
            "limit stand; CUDA_VISIBLE_DEVICES= hides the GPUs and allows the check)"
        )
    if kind == "error":
        raise BatchfitError(f"The training iteration failed in the memory check's child: {rest}")
    return (
        None,
        f"the child process exited with status {os.waitstatus_to_exitcode(status)} and no answer",
    )

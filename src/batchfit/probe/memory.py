"""The memory ceiling for the micro-batch: the largest size whose training iteration fits.

The search (:func:`search_ceiling`) doubles the micro-batch until a trial does not fit or the cap
(``max_batch_size`` or the data set size) is reached, then bisects between the last size that fit
and the first that did not. Only sizes that were run are ever returned. A trial is one real
training iteration on real data (forward, backward, optimizer step), run on the user's model and
undone afterwards (:func:`~batchfit.probe.harness.preserved`), with memory freed between trials.

A trial *fits* when it raised no out-of-memory error and its peak stayed at most
``(1 - headroom) x limit``.

- **CPU**: there is no device limit, so the limit is ``memory_limit`` (default: what this process
  uses now plus half of the RAM still available, split among the processes torchrun starts on the
  machine), for the whole process's resident memory (runtime, model, data and the iteration's
  activations). Each trial's peak is read from the kernel
  (``VmHWM``, reset before each trial through ``/proc/self/clear_refs``), and trials run under an
  address-space limit (``RLIMIT_AS``) set to allow no more than the limit, so a trial that would
  exceed it fails with the allocator's real error instead of waking the kernel's OOM killer. The
  final size is then confirmed in a child process (``fork``) whose own address space is limited
  the same way.
- **CUDA**: real ``torch.cuda.OutOfMemoryError`` and ``torch.cuda.max_memory_allocated``; the limit
  defaults to the device's total memory, and a smaller ``memory_limit`` caps PyTorch's allocator
  for each trial (its per-process memory fraction), so going over it is the allocator's own error
  too. No child check: the device's errors are already real. ``tests/test_cuda.py`` runs this on
  a GPU (checked on an H200).

A ``memory_limit`` above the machine's memory (RAM, or the GPU's) is clamped to it, and the limit's
source says so: more could never be reached, and a limit past what ``setrlimit`` takes would
overflow it. A model with batch norm never trains on one sample, so a cap of one is refused.

A CPU model on a machine with GPUs gets no child check either: once autograd has started its GPU
threads, PyTorch refuses to train in a forked child; the result says so.

Examples:
    The search alone, with a predicate standing in for real trials:

    >>> search_ceiling(lambda b: b <= 300, cap=4096)[0]
    288
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil
import torch
from torch import nn

from batchfit.core import options
from batchfit.core.options import opt
from batchfit.core.units import format_bytes
from batchfit.data.source import BatchSource
from batchfit.errors import BatchfitError
from batchfit.losses import LossFn
from batchfit.memory_limits import (  # the shared limits, still importable from here
    address_space_limit,
    device_memory_cap,
    is_out_of_memory,
    release_memory,
    rss_bytes,
)
from batchfit.probe.harness import (
    Deadline,
    preserved,
)
from batchfit.probe.memory_child import (  # still importable from here
    MemoryTrial,
    _first_line,
    _peak_bytes,
    _reset_peak,
    child_trial,
    confirm_in_child,
)
from batchfit.step import model_device, smallest_trainable_size, synchronize, train_step

DEFAULT_HEADROOM = options.default_of("headroom")
#: The default CPU limit: what the process holds now plus this share of the RAM still available.
DEFAULT_RAM_SHARE = options.CPU_RAM_SHARE
#: Without a data set size or a max_batch_size, the search stops here.
STREAM_CAP = 65536
#: Bisect until the gap between fit and no-fit is at most this share of the fitting size.
BISECT_PRECISION = 1 / 16
#: Doublings the search makes whatever the time budget (1 -> 32): a ceiling cut short after one
#: trial says nothing, and trials at small sizes are cheap.
MIN_DOUBLINGS = 5


@dataclass(frozen=True)
class MemoryCeiling:
    """The result of the memory probe. ``capped_by`` says what ended the search: ``memory``,
    ``max_batch_size``, ``data size`` or ``time budget``. Under torchrun, ``per_rank`` holds each
    rank's ceiling (rank order) and the rest is the smallest one's search; empty in one process."""

    max_micro_batch_size: int
    limit_bytes: int
    limit_source: str
    headroom: float
    device: str
    capped_by: str
    baseline_bytes: int
    peak_bytes: int | None
    trials: tuple[MemoryTrial, ...]
    confirmed: bool | None
    confirmation: str
    peak_measure: str
    notes: tuple[str, ...] = field(default=())
    per_rank: tuple[int, ...] = field(default=())
    #: The precision the trials trained in (``32``, ``bf16-mixed`` or ``16-mixed``).
    precision: str = "32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def search_ceiling(
    fits: Callable[[int], bool],
    cap: int,
    *,
    start: int = 1,
    deadline: Deadline | None = None,
    precision: float = BISECT_PRECISION,
    min_doublings: int = MIN_DOUBLINGS,
) -> tuple[int, int | None, str]:
    """Double from ``start`` until ``fits`` fails or ``cap`` is reached, then bisect. The first
    ``min_doublings`` doublings are made even when the ``deadline`` has passed.

    Returns ``(largest size that fit, smallest size that did not or None, what stopped it)``;
    the first is 0 when even ``start`` did not fit. ``fits`` is called once per size tried.

    >>> search_ceiling(lambda b: True, cap=1000)
    (1000, None, 'cap')
    >>> search_ceiling(lambda b: b < 64, cap=1000, precision=0)
    (63, 64, 'memory')
    >>> search_ceiling(lambda b: True, cap=1000, deadline=Deadline(0))
    (32, None, 'time budget')
    """
    deadline = deadline or Deadline(None)
    good, bad = 0, None
    size = min(start, cap)
    guaranteed = size * 2**min_doublings
    while True:
        if fits(size):
            good = size
            if size >= cap:
                return good, None, "cap"
            if deadline.expired() and size >= guaranteed:
                return good, None, "time budget"
            size = min(size * 2, cap)
        else:
            bad = size
            break
    while good and bad - good > max(1, math.floor(good * precision)):
        if deadline.expired():
            return good, bad, "time budget"
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good, bad, "memory"


def default_memory_limit() -> tuple[int, str]:
    """``(bytes, how it was chosen)``: this process's memory now plus half the available RAM,
    split evenly among the processes torchrun starts on this machine (``LOCAL_WORLD_SIZE``),
    which will all train at once."""
    now = rss_bytes()
    available = psutil.virtual_memory().available
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    limit = now + int(available * DEFAULT_RAM_SHARE / processes)
    how = (
        f"default: this process's {format_bytes(now)} plus {DEFAULT_RAM_SHARE:.0%} of the "
        f"{format_bytes(available)} RAM available"
    )
    if processes > 1:
        how += f", shared by the {processes} processes training on this machine"
    return limit, how


# --- one trial -----------------------------------------------------------------------------


def _iteration(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    source: BatchSource,
    micro_batch_size: int,
    device: torch.device,
) -> None:
    """One training iteration as the loop runs it (fetch, forward, backward, optimizer step),
    its gradients freed after."""
    x, y = next(iter(source.batches(0, micro_batch_size)))
    train_step(model, optimizer, loss_fn, x, y, micro_batch_size, device)
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)


def _trial(
    run: Callable[[], None], size: int, limit: int, headroom: float, device: torch.device
) -> MemoryTrial:
    """One iteration with its peak measured. CPU: the process's peak resident memory, under an
    address-space limit. CUDA: the allocator's peak, under the allocator's own cap."""
    cuda = device.type == "cuda"
    release_memory(device)
    started = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        guard: contextlib.AbstractContextManager = device_memory_cap(limit, device)
    else:
        reset = _reset_peak()
        guard = address_space_limit(limit - rss_bytes())
    oom, error = False, None
    with guard:
        try:
            run()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            oom, error = True, _first_line(exc)
    peak = torch.cuda.max_memory_allocated(device) if cuda else _peak_bytes(reset)
    release_memory(device, collect=oom)
    fits = not oom and peak <= (1 - headroom) * limit
    rss_after = None if cuda else rss_bytes()
    return MemoryTrial(size, fits, oom, peak, rss_after, time.perf_counter() - started, error)


# --- the probe ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Limit:
    """What a trial must stay under, how that was chosen, what the process holds before any
    trial, and how peaks are read."""

    bytes: int
    source: str
    baseline_bytes: int
    peak_measure: str


@dataclass
class _Search:
    """The trials of one search, each a real iteration on the user's model, undone after."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    data: BatchSource
    device: torch.device
    limit: _Limit
    headroom: float
    log: Callable[[str], None]
    #: Each trial in a limited child process (mixed precision on the CPU), not in this one.
    in_child: bool = False
    trials: list[MemoryTrial] = field(default_factory=list)

    def iteration(self, size: int) -> Callable[[], None]:
        """One training iteration at micro-batch ``size``, to be run (and undone) later."""
        return lambda: _iteration(
            self.model, self.optimizer, self.loss_fn, self.data, size, self.device
        )

    def fits(self, size: int) -> bool:
        """Run a trial at ``size``, keep it, say how it went."""
        limit = self.limit.bytes
        trial = None
        with preserved(self.model, self.optimizer):
            if self.in_child:
                trial = child_trial(self.iteration(size), size, limit, self.headroom)
                self.in_child = trial is not None  # no child: every trial in this process
            if trial is None:
                trial = _trial(self.iteration(size), size, limit, self.headroom, self.device)
        self.trials.append(trial)
        peak = format_bytes(trial.peak_bytes) if trial.peak_bytes is not None else "?"
        verdict = "fits" if trial.fits else ("out of memory" if trial.out_of_memory else "too big")
        self.log(f"memory: micro-batch {size}: {verdict} (peak {peak} of {format_bytes(limit)})")
        return trial.fits


def find_max_micro_batch_size(
    model: nn.Module,
    data: BatchSource,
    loss_fn: LossFn,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    limit_bytes: int | None = None,
    max_batch_size: int | None = None,
    headroom: float = DEFAULT_HEADROOM,
    deadline: Deadline | None = None,
    confirm: bool = True,
    log: Callable[[str], None] | None = None,
    trials_in_child: bool = False,
    precision: str = "32",
) -> MemoryCeiling:
    """The largest micro-batch whose training iteration fits in memory, with headroom.

    ``optimizer`` defaults to Adam (its state, two tensors per parameter, is part of the
    footprint). The model, its gradients and the optimizer are as before when this returns.
    With ``trials_in_child`` (CPU), each trial runs in a forked child under the limit
    (:func:`child_trial`), so that a kernel that crashes on a refused allocation ends only the
    child; the ceiling then needs no separate confirmation. ``precision`` names what the model's
    forward runs in (the caller applies it; the result records it).

    Examples:
        >>> import torch
        >>> from batchfit import TensorSource
        >>> src = TensorSource(torch.randn(64, 3), torch.randint(0, 2, (64,)))
        >>> ceiling = find_max_micro_batch_size(
        ...     torch.nn.Linear(3, 2), src, torch.nn.functional.cross_entropy, confirm=False)
        >>> ceiling.max_micro_batch_size, ceiling.capped_by
        (64, 'data size')
    """
    log = log or (lambda _: None)
    deadline = deadline or Deadline(None)
    options.check("headroom", headroom)
    options.check_optional("max_batch_size", max_batch_size)
    device = model_device(model)
    optim = optimizer or torch.optim.Adam(model.parameters(), lr=1e-3)
    cap, cap_reason = _search_cap(max_batch_size, data.num_samples)
    # Batch norm cannot train on one sample: its micro-batches start at two.
    start = smallest_trainable_size(model)
    if cap < start:
        raise batch_norm_cap_error(cap, cap_reason)
    _untracked_iteration(model, optim, loss_fn, data, start, device)
    limit = _limit(device, limit_bytes, headroom)
    in_child = trials_in_child and device.type == "cpu"
    search = _Search(model, optim, loss_fn, data, device, limit, headroom, log, in_child)
    best, _, stopped = search_ceiling(search.fits, cap, start=start, deadline=deadline)
    if best == 0:
        raise _nothing_fits(search.trials[0], limit.bytes, headroom, start)
    notes: list[str] = []
    if stopped == "time budget":
        notes.append(
            f"The time budget ended the memory search at {best}; larger sizes were not tried."
        )
    best, confirmed, confirmation = _confirmed(search, best, confirm, deadline, notes)
    return MemoryCeiling(
        max_micro_batch_size=best,
        limit_bytes=int(limit.bytes),
        limit_source=limit.source,
        headroom=headroom,
        device=str(device),
        capped_by={"cap": cap_reason, "memory": "memory", "time budget": "time budget"}[stopped],
        baseline_bytes=int(limit.baseline_bytes),
        peak_bytes=next(
            (t.peak_bytes for t in search.trials if t.micro_batch_size == best and t.fits), None
        ),
        trials=tuple(search.trials),
        confirmed=confirmed,
        confirmation=confirmation,
        peak_measure=limit.peak_measure,
        notes=tuple(notes),
        precision=precision,
    )


def _untracked_iteration(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    data: BatchSource,
    size: int,
    device: torch.device,
) -> None:
    """One iteration before the trials, undone: one-time allocations (thread pools, kernel
    workspaces) then count in the baseline rather than in the first trial."""
    with preserved(model, optimizer):
        try:
            _iteration(model, optimizer, loss_fn, data, size, device)
        except Exception as exc:  # out of memory already: the first trial says so, with the limit
            if not is_out_of_memory(exc):
                raise
            release_memory(device, collect=True)


def _confirmed(
    search: _Search, best: int, confirm: bool, deadline: Deadline, notes: list[str]
) -> tuple[int, bool | None, str]:
    """``(ceiling, confirmed, how)``: CUDA's errors are real already; trials that each ran in a
    limited child need no further check; else the ceiling is confirmed in a child (backing off
    when it fails there) unless ``confirm`` is False."""
    if search.device.type == "cuda":
        return best, None, "not needed: the device reports real out-of-memory errors"
    if search.in_child:
        limit = format_bytes(search.limit.bytes)
        return best, True, f"ran in a child process limited to {limit}, as every trial did"
    if confirm:
        return _confirm_in_children(search, deadline, notes)
    return best, None, "skipped"


def batch_norm_cap_error(cap: int, cap_reason: str) -> BatchfitError:
    """The error for a model with batch norm whose sizes are capped at one sample
    (``cap_reason``: ``max_batch_size`` or ``data size``): no probe trains batch norm on one."""
    what = (
        f"{options.opt_value('max_batch_size', cap)} allows no other size; give "
        f"{opt('max_batch_size')} 2 or more"
        if cap_reason == "max_batch_size"
        else f"the data holds only {cap} sample; give 2 samples or more"
    )
    return BatchfitError(
        f"The model has batch norm, which needs batches of 2 or more samples to train, and {what}."
    )


def _search_cap(max_batch_size: int | None, num_samples: int | None) -> tuple[int, str]:
    """The largest size the search may try, and what set it (the ``capped_by`` it reports)."""
    caps = [
        (c, why) for c, why in ((max_batch_size, "max_batch_size"), (num_samples, "data size")) if c
    ]
    return min(caps) if caps else (STREAM_CAP, "stream cap")


def _limit(device: torch.device, limit_bytes: int | None, headroom: float) -> _Limit:
    """The limit (``limit_bytes``, else the device's memory or :func:`default_memory_limit`) and
    the baseline it is held against; refused when the baseline leaves no room."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        limit_at, source = _within_machine(limit_bytes, total, "the GPU's memory")
        limit = _Limit(
            bytes=limit_at or total,
            source=source if limit_bytes else "the GPU's total memory",
            baseline_bytes=torch.cuda.memory_allocated(device),
            peak_measure="torch.cuda.max_memory_allocated",
        )
        held = "on the GPU (the model)"
    else:
        if limit_bytes is None:
            limit_at, source = default_memory_limit()
        else:
            total = psutil.virtual_memory().total
            limit_at, source = _within_machine(limit_bytes, total, "this machine's RAM")
        release_memory(collect=True)
        baseline = rss_bytes()
        assert limit_at is not None  # a default or a given limit, clamped
        limit = _Limit(
            bytes=limit_at,
            source=source,
            baseline_bytes=baseline,
            peak_measure="peak resident memory of the process (VmHWM, reset per trial)"
            if _reset_peak()
            else "peak resident memory since the process started (ru_maxrss): conservative",
        )
        held = "(torch, the model and the data)"
    if limit.baseline_bytes >= (1 - headroom) * limit.bytes:
        raise BatchfitError(
            f"The memory limit ({format_bytes(limit.bytes)}) leaves no room: this process already "
            f"holds {format_bytes(limit.baseline_bytes)} {held} before any trial. Raise "
            f"{opt('memory_limit')} above {format_bytes(limit.baseline_bytes / (1 - headroom))}."
        )
    return limit


def _within_machine(limit_bytes: int | None, total: int, what: str) -> tuple[int | None, str]:
    """The limit asked for, clamped to ``total`` bytes (``what``: the machine's memory) and saying
    so: a limit the machine cannot reach would only let trials run into the kernel's out-of-memory
    killer, and one past what ``setrlimit`` takes would overflow it."""
    if limit_bytes is None or limit_bytes <= total:
        return limit_bytes, opt("memory_limit")
    return total, (
        f"{opt('memory_limit')} {format_bytes(limit_bytes)} is more than {what}, "
        f"{format_bytes(total)}: clamped to it"
    )


def _nothing_fits(first: MemoryTrial, limit: int, headroom: float, start: int) -> BatchfitError:
    """The error for a limit too small for the first, smallest trial."""
    need = (first.peak_bytes or 0) / (1 - headroom)
    what = (
        "ran out of memory"
        if first.out_of_memory
        else f"peaked at {format_bytes(first.peak_bytes or 0)}"
    )
    return BatchfitError(
        f"The memory limit ({format_bytes(limit)}) is too small for even a micro-batch of "
        f"{start}: one training iteration {what}, with {headroom:.0%} headroom kept. Raise "
        f"{opt('memory_limit')} to at least {format_bytes(max(need, limit * 1.5))}."
    )


def _confirm_in_children(
    search: _Search, deadline: Deadline, notes: list[str]
) -> tuple[int, bool | None, str]:
    """Confirm the largest fitting sizes in a limited child process, largest first, backing off
    (at most three tries); returns ``(ceiling, confirmed, how)``. Each back-off adds a note."""
    tried = sorted((t.micro_batch_size for t in search.trials if t.fits), reverse=True)
    for size in tried[:3]:
        with preserved(search.model, search.optimizer):
            confirmed, confirmation = confirm_in_child(
                search.iteration(size),
                search.limit.bytes,
                search.headroom,
                timeout=max(10.0, min(60.0, deadline.remaining())),
            )
        search.log(f"memory: micro-batch {size} in a limited child process: {confirmation}")
        if confirmed is not False:
            return size, confirmed, confirmation
        notes.append(
            f"Micro-batch {size} failed in the child process ({confirmation}); backed off."
        )
    raise BatchfitError(
        f"No micro-batch size passed the check in a child process limited to "
        f"{format_bytes(search.limit.bytes)}; raise {opt('memory_limit')}."
    )

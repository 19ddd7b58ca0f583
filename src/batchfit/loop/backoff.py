"""Out-of-memory back-off: a step that runs out of memory is redone with half the micro-batch.

A long run that meets a memory spike should not die of it. When a step's forward or backward
pass raises an out-of-memory error (:func:`~batchfit.memory_limits.is_out_of_memory` decides),
:func:`back_off` drops the partial gradients and what the failed pass held, halves the
micro-batch and redoes the *same* batch with exact accumulation. The batch size, the step counter,
the optimizer and scheduler state and the data position do not change, so the run continues as
one that used the smaller micro-batch from the start (a model with dropout draws other random
numbers after a failed pass, so there it is a different, equally valid, draw). After
``regrow_after`` clean steps :func:`regrow` tries twice the micro-batch again, up to the
configured one. Evaluation has its own batch and its own back-off
(:func:`evaluate_within_memory`).

Nothing here runs per step: the step loop calls :func:`back_off` from an ``except`` (free in
Python 3.11+ until something raises) and :func:`regrow` at a step it computed in advance.

Under torchrun (DDP) there is no back-off: one rank redoing a step alone would leave the others
waiting in its all-reduce, so an out-of-memory error ends the job as any rank's failure does.

``memory_limit`` makes the limit real (:func:`memory_limited`): the same address-space limit
``tune`` measures under on the CPU, the allocator's cap on CUDA.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from batchfit.core.options import opt
from batchfit.core.units import format_bytes
from batchfit.errors import BatchfitError
from batchfit.loop.state import Backoff, RunState, Setup
from batchfit.memory_limits import (
    address_space_limit,
    device_memory_cap,
    is_out_of_memory,
    release_memory,
    rss_bytes,
)
from batchfit.step import evaluate, has_batch_norm, smallest_trainable_size, train_step

#: Where a frame of the optimizer's update lives: an out-of-memory error there may have changed
#: some parameters already, so that step cannot be redone.
_OPTIMIZER_CODE = f"{os.sep}torch{os.sep}optim{os.sep}"


class UpdateOutOfMemory(BatchfitError):
    """Out of memory in the optimizer's update. Some parameters may have moved already, so the
    step is not redone and this state is not checkpointed (the last checkpoint stays); a smaller
    micro-batch would not shrink the optimizer's state anyway."""

    resume_when = "more memory is allowed"

    def __init__(self, run: RunState, setup: Setup) -> None:
        super().__init__(
            f"Out of memory in the optimizer's update at step {run.position.step + 1} (its state "
            f"grows with the parameters, not the micro-batch); {_the_fix(setup)} Training "
            f"stopped without saving this step; the last checkpoint, if any, is kept."
        )


@contextlib.contextmanager
def memory_limited(setup: Setup, backoff: Backoff) -> Iterator[None]:
    """Train within ``memory_limit`` (nothing changes without one): on CUDA the allocator's cap;
    on the CPU the process may map at most the limit less the memory it holds now
    (``RLIMIT_AS``), measured again by ``backoff.make_room`` at every back-off and regrow, as
    ``tune`` measures before each trial (mapped but unused address space, such as a new thread's
    malloc arena, would otherwise count against the limit for the rest of the run).
    ``backoff.lift_limit`` ends the limit early: a run that stops for want of memory still needs
    some to save its checkpoint and say why."""
    limit = setup.config.memory_limit
    if limit is None:
        yield
        return
    with contextlib.ExitStack() as held_limit:

        def make_room() -> None:
            held_limit.close()  # the previous limit back, then the new one from here
            release_memory(setup.device, collect=True)
            if setup.device.type == "cuda":
                held_limit.enter_context(device_memory_cap(limit, setup.device))
                return
            held = rss_bytes()
            if held >= limit:
                raise BatchfitError(
                    f"The memory limit ({format_bytes(limit)}) leaves no room: this process "
                    f"holds {format_bytes(held)} (torch, the model and the data) outside any "
                    f"step; raise {opt('memory_limit')} well above {format_bytes(held)}."
                )
            held_limit.enter_context(address_space_limit(limit - held))

        make_room()
        backoff.make_room, backoff.lift_limit = make_room, held_limit.close
        try:
            yield
        finally:
            backoff.make_room = backoff.lift_limit = _unlimited


def _unlimited() -> None:
    """No ``memory_limit``: nothing to measure again."""


def back_off(
    exc: Exception, run: RunState, setup: Setup, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor | float, int]:
    """Redo the step that raised ``exc`` on the batch ``(x, y)`` with half the micro-batch, again
    while it runs out of memory; return ``(loss, iterations)`` as the step loop keeps them.

    Anything but an out-of-memory error is re-raised as it is. Raises
    :class:`~batchfit.errors.BatchfitError` when the smallest trainable micro-batch does not fit,
    or the optimizer's update (which cannot be redone) ran out of memory; the caller saves the
    checkpoint of the last completed step."""
    if setup.ddp is not None:  # ranks must stay in step: under torchrun an out-of-memory ends it
        raise exc
    state, size = run.backoff, len(y)
    floor = smallest_trainable_size(setup.model)
    while True:
        if not is_out_of_memory(exc):
            raise exc
        if _in_optimizer_update(exc):
            state.lift_limit()
            raise UpdateOutOfMemory(run, setup) from None
        failed = min(state.micro_batch_size, size)
        exc.__traceback__ = None  # its frames hold the failed pass's activations
        del exc
        setup.optimizer.zero_grad(set_to_none=True)
        release_memory(setup.device, collect=True)
        state.make_room()
        if failed <= floor:
            state.lift_limit()
            raise _nothing_fits(run, setup, failed)
        smaller = _half(failed, _batch_sizes(setup, size), has_batch_norm(setup.model))
        _use_micro_batch(run, setup, smaller)
        state.log(
            f"out of memory at micro-batch {failed}; continuing with {smaller} (batch size "
            f"stays {setup.batch_size})"
        )
        try:
            model, loss_fn = setup.step_parts()  # one process (a rank's back-off ends the run)
            loss, parts = train_step(
                model, setup.optimizer, loss_fn, x, y, smaller, setup.device, setup.scaler
            )
        except Exception as again:  # noqa: BLE001 - judged at the top of the loop
            exc = again
            continue
        return (loss.item() if setup.device.type == "cpu" else loss), parts


def regrow(run: RunState, setup: Setup) -> None:
    """``regrow_after`` clean steps since the last back-off: try twice the micro-batch (at most
    the configured one) from the next step on."""
    state = run.backoff
    larger = min(state.micro_batch_size * 2, setup.micro_batch_size)
    if has_batch_norm(setup.model):  # no one-sample micro-batch in any batch the run meets
        larger = _half(2 * larger, _batch_sizes(setup, setup.batch_size), True)
        larger = max(larger, state.micro_batch_size)
    state.log(
        f"{setup.config.regrow_after} steps without running out of memory: trying micro-batch "
        f"{larger} again"
    )
    _use_micro_batch(run, setup, larger)
    state.make_room()


def watch_step(run: RunState, setup: Setup) -> int:
    """The next step at which the step loop must look up: the last step, or a regrow before it.
    A regrow already due (a checkpoint saved at the step it fell due) is made now, so a resumed
    run continues at the micro-batch the uninterrupted one used."""
    last_step, regrow_step = setup.last_step, run.backoff.regrow_step
    if regrow_step is None:
        return last_step
    if regrow_step <= run.position.step:
        regrow(run, setup)
        return watch_step(run, setup)
    return min(last_step, regrow_step)


def evaluate_within_memory(run: RunState, setup: Setup) -> dict[str, float]:
    """:func:`~batchfit.step.evaluate` on the validation data, over again with half the batch
    while it runs out of memory (evaluation changes nothing, so it simply starts over)."""
    state, val_source = run.backoff, setup.val_source
    assert val_source is not None  # called only for a run with validation data
    while True:
        try:
            return evaluate(
                setup.model, val_source, setup.loss, state.eval_batch_size, setup.device
            )
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            exc.__traceback__ = None
        failed = state.eval_batch_size
        release_memory(setup.device, collect=True)
        state.make_room()
        if failed <= 1:
            state.lift_limit()
            raise BatchfitError(
                f"Evaluation ran out of memory even one sample at a time after step "
                f"{run.position.step}; {_the_fix(setup)}"
            )
        state.eval_batch_size = failed // 2
        state.log(
            f"out of memory while evaluating at batch {failed}; continuing with {failed // 2}"
        )


def _use_micro_batch(run: RunState, setup: Setup, size: int) -> None:
    """From the next recorded step on, train at micro-batch ``size`` (and try a larger one after
    ``regrow_after`` steps at it); the rows already recorded are written first, so
    ``metrics.csv`` gives each step the micro-batch it ran at."""
    state, regrow_after = run.backoff, setup.config.regrow_after
    run.train_seconds += run.metrics.flush()
    run.metrics.micro_batch_size = state.micro_batch_size = size
    grows = regrow_after and size < setup.micro_batch_size
    state.regrow_step = run.position.step + regrow_after if grows else None


def _batch_sizes(setup: Setup, size: int) -> tuple[int, ...]:
    """The batch sizes the run meets from here: this one, the configured one and an epoch's last
    (smaller) batch when the plan knows it."""
    last = setup.plan.last_batch_size if setup.plan is not None else setup.batch_size
    return (size, setup.batch_size, last)


def _half(failed: int, batches: tuple[int, ...], batch_norm: bool) -> int:
    """Half of ``failed``; with batch norm at least 2, and not a size that leaves any of
    ``batches`` a one-sample last micro-batch (batch norm cannot train on one sample).

    >>> _half(4096, (32768,), False), _half(3, (3,), True), _half(10, (11,), True)
    (2048, 2, 4)
    >>> _half(11, (11,), False), _half(8, (8, 5), True)  # 4 would leave the last batch of 5 a 1
    (5, 3)
    """
    smaller = max(failed // 2, 2 if batch_norm else 1)
    while batch_norm and smaller > 2 and any(b % smaller == 1 for b in batches):
        smaller -= 1
    return smaller


def _in_optimizer_update(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside ``torch.optim`` (the update, not forward or backward)."""
    tb = exc.__traceback__
    while tb is not None:
        if _OPTIMIZER_CODE in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _nothing_fits(run: RunState, setup: Setup, failed: int) -> BatchfitError:
    error = BatchfitError(
        f"Out of memory at micro-batch {failed}, the smallest this model trains on, at step "
        f"{run.position.step + 1}; {_the_fix(setup)}"
    )
    error.resume_when = "more memory is allowed"
    return error


def _the_fix(setup: Setup) -> str:
    limit = setup.config.memory_limit
    if limit is None:
        return "free memory for this process or use a smaller model."
    return f"raise {opt('memory_limit')} above {format_bytes(limit)} or use a smaller model."

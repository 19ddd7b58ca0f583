"""One epoch: its batches, its step loop (the hot path of batchfit) and what ends it.

One *step* takes one batch, splits it into micro-batches, accumulates their gradients weighted by
sample count (so the update equals the full-batch mean gradient even when the micro-batch does not
divide the batch) and makes one optimizer update. An epoch ends when its batches run out, or after
``steps_per_epoch`` steps of the data read as one continuing stream.

The step loop (:func:`_train_steps`) binds everything it touches to local names before the first
step and calls nothing per step but the model, the loss and the optimizer, or
:func:`~batchfit.step.train_step` for several micro-batches: at batch size 1 one more function
call per step costs ~1% of throughput (benchmarks/loop_overhead.py). Flushes, checkpoints and
validation (:mod:`batchfit.loop.events`) happen between steps, a few times a second at most.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from batchfit.core.options import opt, opt_value
from batchfit.data.source import Batch, BatchSource
from batchfit.distributed import ddp_train_step
from batchfit.errors import BatchfitError, NonFiniteLossError, TrainingInterrupted
from batchfit.loop.backoff import UpdateOutOfMemory, back_off, regrow, watch_step
from batchfit.loop.events import (
    flush_metrics,
    save,
    saved_before_stopping,
    stopped_by_user_code,
    validate,
    validate_or_save,
    validation_values,
)
from batchfit.loop.signals import StopSignals, interrupted
from batchfit.loop.state import Position, RunState, Setup
from batchfit.progress import TrainProgress
from batchfit.step import train_step

#: Seconds between metrics flushes (and progress updates): often enough to look live, rarely
#: enough to cost nothing per step.
FLUSH_SECONDS = 0.5


def train_epoch(run: RunState, setup: Setup, bar: TrainProgress, stop: StopSignals) -> bool:
    """Train the epoch in progress from where it stands; True if it ran to its end, False if
    training stops inside it (the last step, ``on_eval`` asked to stop)."""
    pos, steps_per_epoch = run.position, setup.config.steps_per_epoch
    steps_done, bar_steps = _epoch_steps(setup, pos)
    first_step = pos.step - steps_done  # the global step before this epoch's first
    bar.start_epoch(_epoch_label(pos.epoch, setup.config.epochs), bar_steps, steps_done)
    run.metrics.epoch = pos.epoch + 1
    clock_start = time.perf_counter()  # making the batches counts as training time
    batches = None
    try:
        if run.adaptive is None:
            batches = _epoch_batches(setup, pos, steps_done)
        else:  # the batch size may change mid-epoch: the adaptive run makes the batches
            batches = run.adaptive.batches(run, bar)
        ran_out = _train_steps(run, setup, batches, bar, stop, first_step, clock_start)
        if ran_out:
            _warn_if_smaller_than_a_batch(run, setup, bar)
        if steps_per_epoch is not None:
            finished = ran_out or pos.step - first_step >= steps_per_epoch
            if ran_out and pos.step - first_step < steps_per_epoch:
                run.stop_requested = True  # the stream ran dry
        else:
            finished = ran_out or _covered_the_data(setup, pos)
        flush_metrics(run)
        bar.update(pos.step - first_step, run.metrics.last_loss, run.metrics.last_samples_per_s)
    except (NonFiniteLossError, TrainingInterrupted, UpdateOutOfMemory):
        raise
    except BatchfitError as exc:  # bad data met mid-epoch: keep what was trained, then stop
        raise saved_before_stopping(exc, pos, save(run, setup)) from None
    except Exception as exc:  # the user's dataset, model or loss raised: keep what was trained
        raise stopped_by_user_code(exc, run, setup, "step")  # noqa: B904 - theirs, as is
    finally:
        if batches is not None and hasattr(batches, "close"):
            batches.close()  # stops a prefetching thread when we leave mid-epoch
        bar.end_epoch()
    return finished


def _warn_if_smaller_than_a_batch(run: RunState, setup: Setup, bar: TrainProgress) -> None:
    """A stream of unknown length that ends inside its first batch made every step smaller
    than the batch size asked for, which the plan could not check up front: say so, once."""
    samples, batch_size = run.position.sample_in_epoch, setup.batch_size
    if setup.plan is not None or run.warnings or not 0 < samples < batch_size:
        return
    warning = (
        f"The training stream ended after {samples} samples, fewer than {opt('batch_size')} "
        f"{batch_size}, so each step trained on {samples}; give "
        f"{opt_value('batch_size', samples)} or less to train the batch you name."
    )
    run.warnings.append(warning)
    bar.log(f"warning: {warning}")


def end_epoch(run: RunState, setup: Setup, bar: TrainProgress) -> None:
    """Validate, record the epoch in the history, move to the next epoch and checkpoint there."""
    pos, metrics = run.position, run.metrics
    evaluated = validate_or_save(run, setup)
    record = {"epoch": pos.epoch + 1, "step": pos.step, "train_loss": metrics.epoch_mean_loss()}
    record.update(validation_values(evaluated))
    run.history.append(record)
    bar.log(_epoch_summary(record, setup.config.epochs))
    pos.epoch += 1
    pos.sample_in_epoch = 0
    metrics.start_epoch(pos.epoch + 1)
    save(run, setup)


def _train_steps(
    run: RunState,
    setup: Setup,
    batches: Iterator[Batch],
    bar: TrainProgress,
    stop: StopSignals,
    first_step: int,
    clock_start: float,
) -> bool:
    """Step through ``batches``; True if they ran out, False at the last step or a stop request.

    Each step appends ``(step, batch size, loss, seconds)`` to the metrics log; checkpoints and
    evaluation are not counted in the seconds."""
    optimizer = setup.optimizer
    model, loss_fn = setup.step_parts()  # DDP's model, autocast: as the steps call them
    watch = watch_step(run, setup)  # the last step, or an out-of-memory regrow before it
    micro, device = run.backoff.micro_batch_size, setup.device
    on_cpu, last_step = device.type == "cpu" and setup.ddp is None, setup.last_step
    step_fn: Callable[..., tuple[torch.Tensor, int]] = train_step
    loss_value: Any  # a tensor, or its float on the CPU (cheaper to keep)
    if setup.ddp is not None:  # several processes: each its share, one all-reduce per step
        step_fn = ddp_train_step
    checkpoint_every, eval_every = setup.config.checkpoint_every, setup.config.eval_every
    pos, metrics, clock = run.position, run.metrics, time.perf_counter
    adaptive = run.adaptive
    scaler = setup.scaler
    # checked once here, so the default path pays nothing
    plain_cpu = on_cpu and adaptive is None and scaler is None
    add_row = metrics.pending.append  # MetricsLog.flush empties this list in place
    next_flush, t_last = clock() + FLUSH_SECONDS, clock_start
    for x, y in batches:
        try:  # free until something raises (Python 3.11+)
            if plain_cpu and len(y) <= micro:
                # train_step's one-micro-batch case, written out: at batch size 1 the call alone
                # cost ~1% of throughput (benchmarks/loop_overhead.py).
                optimizer.zero_grad(set_to_none=True)
                loss_value = loss_fn(model(x), y)
                loss_value.backward()
                optimizer.step()
                loss_value, parts = loss_value.item(), 1
            elif adaptive is not None:  # measures the noise scale as it steps
                loss_value, parts = adaptive.step(x, y, micro)
            else:
                loss_value, parts = step_fn(model, optimizer, loss_fn, x, y, micro, device, scaler)
                if on_cpu:  # nothing to sync on the CPU, and a float is cheaper to keep
                    loss_value = loss_value.item()
        except Exception as exc:  # out of memory: the same batch again, smaller micro-batches
            loss_value = None  # the failed pass's graph
            loss_value, parts = back_off(exc, run, setup, x, y)
            micro, watch = run.backoff.micro_batch_size, watch_step(run, setup)
        size = len(y)
        pos.step += 1
        pos.iterations += parts
        pos.samples_seen += size
        pos.sample_in_epoch += size
        now = clock()
        add_row((pos.step, size, loss_value, now - t_last))
        t_last = now
        if now >= next_flush:
            flush_metrics(run)
            bar.update(pos.step - first_step, metrics.last_loss, metrics.last_samples_per_s)
            next_flush = now + FLUSH_SECONDS
        if stop.received:
            raise interrupted(stop.received, pos, save(run, setup))
        if checkpoint_every and pos.step % checkpoint_every == 0:
            save(run, setup)
            t_last = clock()
        if eval_every and pos.step % eval_every == 0:
            validate(run, setup)
            if run.stop_requested:
                return False
            t_last = clock()
        if pos.step >= watch:
            if pos.step >= last_step:
                return False
            regrow(run, setup)
            micro, watch = run.backoff.micro_batch_size, watch_step(run, setup)
    return True


def _epoch_steps(setup: Setup, pos: Position) -> tuple[int, int | None]:
    """Steps of the epoch in progress already done, and the step its bar ends at: where this
    epoch's training ends (None: unknown, a stream)."""
    config = setup.config
    total = setup.plan.steps_per_epoch if setup.plan else None
    done = math.ceil(pos.sample_in_epoch / setup.batch_size)
    if config.steps_per_epoch is not None:
        total, done = config.steps_per_epoch, pos.step - pos.epoch * config.steps_per_epoch
    if config.adaptive:  # the batch size may change: the epoch's steps are not known ahead
        total = None
    if total is not None:
        total = done + min(total - done, setup.last_step - pos.step)
    return done, total


def _epoch_batches(setup: Setup, pos: Position, steps_done: int) -> Iterator[Batch]:
    """The batches left in the epoch in progress: the rest of the source's epoch, or with
    ``steps_per_epoch`` the next steps of the data read as one stream."""
    config = setup.config
    if config.steps_per_epoch is None:
        return setup.source.batches(
            pos.epoch, setup.batch_size, start=pos.sample_in_epoch, drop_last=config.drop_last
        )
    return continuing_batches(
        setup.source,
        pos.samples_seen,
        setup.batch_size,
        drop_last=config.drop_last,
        samples_per_pass=setup.plan.samples_per_epoch if setup.plan else None,
        steps=config.steps_per_epoch - steps_done,
    )


def _covered_the_data(setup: Setup, pos: Position) -> bool:
    """Whether the epoch in progress has read every sample it takes (``drop_last`` included)."""
    return setup.plan is not None and pos.sample_in_epoch >= setup.plan.samples_per_epoch


def continuing_batches(
    source: BatchSource,
    offset: int,
    batch_size: int,
    *,
    drop_last: bool = False,
    samples_per_pass: int | None = None,
    steps: int,
) -> Iterator[Batch]:
    """``steps`` batches of the source read as one stream, from ``offset`` samples into it.

    Pass ``p`` over a finite source is its epoch ``p`` (``samples_per_pass`` samples); a source of
    unknown length is one pass, and the batches end early when it runs dry. Everything follows from
    ``offset``, so a resumed run continues exactly.

    Examples:
        >>> import torch
        >>> from batchfit.data import TensorSource
        >>> src = TensorSource(torch.zeros(5, 1), torch.arange(5), shuffle=False)
        >>> [y.tolist() for _, y in continuing_batches(src, 4, 2, samples_per_pass=5, steps=3)]
        [[4], [0, 1], [2, 3]]
    """
    taken = 0
    while taken < steps:
        data_epoch, start = divmod(offset, samples_per_pass) if samples_per_pass else (0, offset)
        batches = source.batches(data_epoch, batch_size, start=start, drop_last=drop_last)
        got_any = False
        try:
            for batch in batches:
                got_any = True
                offset += len(batch[1])
                taken += 1
                yield batch
                if taken >= steps:
                    return
        finally:
            if hasattr(batches, "close"):
                batches.close()
        if not got_any or not samples_per_pass:
            return


def _epoch_label(epoch: int, epochs: int | None) -> str:
    return f"epoch {epoch + 1}" + (f"/{epochs}" if epochs else "")


def _epoch_summary(record: dict[str, float], epochs: int | None) -> str:
    parts = [
        _epoch_label(int(record["epoch"]) - 1, epochs),
        f"train_loss {record['train_loss']:.4f}",
    ]
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_")]
    return "  ".join(parts)

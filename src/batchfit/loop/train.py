"""The training loop: batches, exact gradient accumulation, evaluation, checkpoints, stop rules.

The loop is :func:`train`; read it top to bottom. One *step* takes one batch from the source, splits
it into micro-batches, accumulates their gradients weighted by sample count (so the update equals
the full-batch mean gradient even when the micro-batch does not divide the batch) and makes one
optimizer update. Epochs end when the source runs dry; training ends after ``epochs`` epochs or
``max_steps`` steps, whichever comes first.

Everything needed to continue is two integers of data position plus model, optimizer and RNG
state, so a run stopped at any step and resumed ends bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from batchfit.checkpoint import (
    CHECKPOINT_NAME,
    check_same_model,
    check_same_settings,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from batchfit.core import options
from batchfit.core.accounting import (
    check_sizes,
    plan,
    single_sample_micro_batch_at,
    total_steps,
)
from batchfit.data.source import Batch, BatchSource
from batchfit.errors import BatchfitError, NonFiniteLossError, TrainingInterrupted
from batchfit.files import make_folder
from batchfit.inputs import as_source, check_model_accepts_data, loss_for
from batchfit.losses import Loss, LossFn
from batchfit.metrics import MetricsLog
from batchfit.progress import TrainProgress
from batchfit.step import (
    DEFAULT_LR,
    evaluate,
    has_batch_norm,
    make_optimizer,
    params_sha256,
    resolve_device,
    train_step,
)

FLUSH_SECONDS = 0.5


@dataclass(frozen=True)
class TrainResult:
    """What a finished run did. ``final`` holds ``train_loss`` (mean over the last epoch's steps),
    ``val_loss`` and, for classification, ``val_accuracy``."""

    steps: int
    iterations: int
    epochs_completed: int
    samples_seen: int
    params_sha256: str
    final: dict[str, float]
    history: list[dict[str, float]]
    evals: list[dict[str, float]]
    seconds: float
    train_seconds: float
    samples_per_s: float
    batch_size: int
    micro_batch_size: int
    lr: float
    optimizer: str
    metrics_path: str | None
    checkpoint_path: str | None
    resumed_from_step: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Position:
    """Where the run is: the epoch in progress, samples of it consumed, and global counters."""

    epoch: int = 0
    sample_in_epoch: int = 0
    step: int = 0
    iterations: int = 0
    samples_seen: int = 0


@dataclass
class _Run:
    """The state that a checkpoint captures, besides model and optimizer."""

    position: Position = field(default_factory=Position)
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0


class _StopSignals:
    """Turn the first SIGINT/SIGTERM into a flag the loop checks after each step.

    A second signal gets the previous handler (a second Ctrl-C interrupts at once).
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signum, self._previous[signum])

    def __enter__(self) -> _StopSignals:
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _rng_state() -> dict[str, Any]:
    """Every global generator a model or dataset may draw from: torch (CPU and CUDA), Python's
    ``random`` and NumPy's legacy global one, as plain data (loadable with weights_only)."""
    version, mt_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _seed_everything(seed: int) -> None:
    """Seed every global generator that :func:`_rng_state` saves, for a reproducible fresh run."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_output_paths(
    checkpoint_dir: str | Path | None,
    checkpoint_every: int | None,
    resume: bool,
    out_dir: str | Path | None,
) -> None:
    """Fail before training, not at the first checkpoint, on folders that cannot be used."""
    if checkpoint_dir is None:
        if resume:
            raise BatchfitError(
                "--resume needs --checkpoint-dir, the folder that holds the checkpoint."
            )
        if checkpoint_every is not None:
            raise BatchfitError(
                "--checkpoint-every needs --checkpoint-dir, the folder to write checkpoints to."
            )
    else:
        folder = Path(checkpoint_dir)
        if folder.exists() and not folder.is_dir():
            hint = (
                f" (give its folder: --checkpoint-dir {folder.parent})"
                if folder.name == CHECKPOINT_NAME
                else ""
            )
            raise BatchfitError(f"--checkpoint-dir '{folder}' is a file, not a folder{hint}.")
        if not resume and checkpoint_path(folder).exists():
            raise BatchfitError(
                f"'{folder}' already holds a checkpoint; add --resume to continue that run, or "
                "choose another --checkpoint-dir (or delete it) to start over."
            )
        make_folder(folder, "checkpoint_dir")
    if out_dir is not None:
        make_folder(Path(out_dir), "out_dir")


def _check_batch_norm(
    model: nn.Module, samples: int | None, batch_size: int, micro_batch_size: int, drop_last: bool
) -> None:
    """Batch norm cannot train on one sample; say so before training, not mid-epoch."""
    where = single_sample_micro_batch_at(samples, batch_size, micro_batch_size, drop_last)
    if where is not None and has_batch_norm(model):
        raise BatchfitError(
            f"The model has batch norm, which cannot train on a micro-batch of 1 sample, and batch "
            f"size {batch_size} (micro-batch {micro_batch_size}) makes one at {where}. Use "
            "batch and micro-batch sizes that leave at least 2 samples, or --drop-last."
        )


def _check_finite_parameters(model: nn.Module, step: int) -> None:
    """A gradient can overflow while the loss is still finite: never checkpoint such weights."""
    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            raise NonFiniteLossError(
                f"Parameter '{name}' became NaN or infinite by step {step} although the loss was "
                "still finite (a gradient overflowed); training stopped and the last good "
                "checkpoint was kept. Lower --lr or check the data for extreme values.",
                step=step,
            )


def _stop_rule(
    epochs: int | None,
    max_steps: int | None,
    num_samples: int | None,
    steps_per_epoch: int | None = None,
) -> None:
    options.check_optional("epochs", epochs)
    options.check_optional("max_steps", max_steps)
    options.check_optional("steps_per_epoch", steps_per_epoch)
    if num_samples is None and max_steps is None and steps_per_epoch is None:
        raise BatchfitError(
            "The training data is a stream of unknown length, so epochs cannot be counted; "
            "give --max-steps (online learning on a stream), or --steps-per-epoch to define an "
            "epoch on it."
        )
    if epochs is None and max_steps is None:
        raise BatchfitError("Say how long to train: give --epochs, --max-steps, or both.")


def train(
    model: nn.Module,
    data: object,
    *,
    batch_size: int,
    epochs: int | None = None,
    max_steps: int | None = None,
    micro_batch_size: int | None = None,
    val_data: object | None = None,
    loss: str | LossFn | Loss | None = None,
    optimizer: str = "adam",
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float | None = None,
    seed: int = 0,
    drop_last: bool = False,
    eval_batch_size: int | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    out_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    eval_every: int | None = None,
    on_eval: Callable[[dict[str, float]], bool | None] | None = None,
    steps_per_epoch: int | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` with mini-batches of ``batch_size`` samples.

    ``data`` and ``val_data`` are ``(x, y)`` tensors or arrays, a torch ``Dataset`` or
    ``IterableDataset``, or a :class:`~batchfit.data.source.BatchSource`. ``batch_size=1`` is online
    learning; ``batch_size=len(data)`` is full-batch descent. ``micro_batch_size`` splits each batch
    for memory with exact accumulation. Training stops after ``epochs`` or ``max_steps``, whichever
    comes first. With ``checkpoint_dir`` a checkpoint is written at every epoch end, every
    ``checkpoint_every`` steps and on SIGINT/SIGTERM; ``resume=True`` continues from it exactly.
    With ``out_dir``, ``metrics.csv`` gets one row per step.

    Validation runs at every epoch end and, with ``eval_every``, every that many steps; each
    evaluation is a record in ``TrainResult.evals`` (step, epoch, samples_seen, train_seconds: time
    spent training so far, without evaluation; val_loss, val_accuracy) and is passed to ``on_eval``,
    which may return True to stop training there.

    ``steps_per_epoch`` defines an epoch as that many steps, as in Keras: the data is read as one
    continuing stream (the next pass over a finite source starts where the last ended), and
    per-epoch validation and checkpoints happen every ``steps_per_epoch`` steps. It is how epochs
    work on a stream of unknown length; training ends early if such a stream runs dry.

    Examples:
        >>> import torch
        >>> x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
        >>> result = train(torch.nn.Linear(3, 2), (x, y), batch_size=16, epochs=2)
        >>> result.steps, result.samples_seen
        (8, 128)
    """
    source = as_source(data, seed=seed)
    val_source = (
        as_source(val_data, shuffle=False, what="validation data") if val_data is not None else None
    )
    n = source.num_samples
    if n is not None:  # checks the sizes against each other and the data, and counts the steps
        the_plan = plan(
            n,
            batch_size,
            micro_batch_size=micro_batch_size,
            epochs=epochs,
            max_steps=max_steps,
            drop_last=drop_last,
        )
        micro = the_plan.micro_batch_size
    else:
        the_plan, micro = None, check_sizes(batch_size, micro_batch_size)
    _stop_rule(epochs, max_steps, n, steps_per_epoch)
    options.check("optimizer", optimizer)
    lr = DEFAULT_LR[optimizer] if lr is None else options.check("lr", lr)
    options.check_optional("checkpoint_every", checkpoint_every)
    options.check_optional("eval_every", eval_every)
    eval_batch_size = options.check_optional("eval_batch_size", eval_batch_size) or max(micro, 1024)
    _check_output_paths(checkpoint_dir, checkpoint_every, resume, out_dir)
    loss = loss_for(source, loss)

    _check_batch_norm(model, n, batch_size, micro, drop_last)
    device = resolve_device(device)
    model.to(device)
    check_model_accepts_data(model, source, loss)
    if val_source is not None:  # bad validation data found now, not after an epoch of training
        check_model_accepts_data(model, val_source, loss, what="validation data")
    opt = make_optimizer(optimizer, model, lr, momentum, weight_decay)
    if steps_per_epoch is not None:
        last_step = total_steps(steps_per_epoch, epochs, max_steps)
    else:
        last_step = the_plan.total_steps if the_plan else max_steps
    settings = {
        "batch_size": batch_size,
        "seed": seed,
        "optimizer": optimizer,
        "drop_last": drop_last,
        "samples": n,
        "steps_per_epoch": steps_per_epoch,
        "lr": lr,
        "momentum": momentum if optimizer == "sgd" else None,
        "weight_decay": weight_decay,
        "data": source.fingerprint(),  # streamed or loaded, files, shuffle buffer, split
    }

    run = _Run()
    resumed_from = None
    saved = load_checkpoint(checkpoint_dir) if resume else None
    if saved is not None:
        path = checkpoint_path(checkpoint_dir)
        check_same_model(saved, model.state_dict(), path)
        check_same_settings(saved, settings, path)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        _set_rng_state(saved["rng"])
        run = _Run(
            Position(**saved["position"]),
            list(saved["history"]),
            list(saved["evals"]),
            saved["train_seconds"],
        )
        resumed_from = run.position.step
    else:
        _seed_everything(seed)
    pos = run.position

    metrics = MetricsLog(
        Path(out_dir) / "metrics.csv" if out_dir else None,
        micro_batch_size=micro,
        lr=lr,
        resume_step=resumed_from,
    )
    if saved is not None:
        metrics.epoch_loss_sum, metrics.epoch_samples = saved["epoch_loss"]
    bar = TrainProgress(progress)
    per_epoch = f"{the_plan.steps_per_epoch} steps per epoch" if the_plan else "a stream"
    if steps_per_epoch is not None:
        per_epoch = f"{steps_per_epoch} steps per epoch (--steps-per-epoch)"
    bar.log(
        f"Training on {source.describe()}: batch size {batch_size} (micro-batch {micro}), "
        f"{per_epoch}, loss {loss.name}, {optimizer} lr {lr:g}"
    )
    if resumed_from is not None:
        bar.log(
            f"Resumed from {checkpoint_path(checkpoint_dir)} at step {pos.step} "
            f"(epoch {pos.epoch + 1}, {pos.sample_in_epoch} samples into it)."
        )
    elif resume:
        bar.log(f"No checkpoint in {checkpoint_dir} yet; starting from the beginning.")

    def flush_metrics() -> None:
        """Write the pending metrics rows (raising on a NaN loss) and count their seconds."""
        run.train_seconds += metrics.flush()

    last_saved: list[tuple[int, str]] = []  # (step, path) of the newest checkpoint, if any

    def checkpoint() -> str | None:
        flush_metrics()  # raises on a NaN loss first, so a bad state is never saved
        if checkpoint_dir is None:
            return None
        if last_saved and last_saved[0][0] == pos.step:
            return last_saved[0][1]
        _check_finite_parameters(model, pos.step)
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "rng": _rng_state(),
            "position": asdict(pos),
            "history": run.history,
            "evals": run.evals,
            "train_seconds": run.train_seconds,
            "epoch_loss": [metrics.epoch_loss_sum, metrics.epoch_samples],
            "settings": settings,
        }
        path = str(save_checkpoint(checkpoint_dir, state))
        last_saved[:] = [(pos.step, path)]
        return path

    def validate() -> dict[str, float]:
        """Evaluate now (once per step at most), record it and tell ``on_eval``."""
        if run.evals and run.evals[-1]["step"] == pos.step:
            return run.evals[-1]
        flush_metrics()
        record: dict[str, float] = {
            "step": pos.step,
            "epoch": pos.epoch + 1,
            "samples_seen": pos.samples_seen,
            "train_seconds": run.train_seconds,
        }
        if val_source is not None:
            for key, value in evaluate(model, val_source, loss, eval_batch_size, device).items():
                record[f"val_{key}"] = value
        run.evals.append(record)
        if on_eval is not None and on_eval(dict(record)):
            stop_requested.append(pos.step)
        return record

    def validate_or_save() -> dict[str, float]:
        """:func:`validate`, but bad validation data saves a checkpoint before stopping."""
        try:
            return validate()
        except NonFiniteLossError:
            raise
        except BatchfitError as exc:
            raise _saved_before_stopping(exc, pos, checkpoint()) from None

    stop_requested: list[int] = []
    on_cpu = device.type == "cpu"
    model.train()
    epoch_finished = False
    samples_at_start, seconds_at_start = pos.samples_seen, run.train_seconds
    add_row = metrics.pending.append
    loss_fn = loss.fn
    started = time.perf_counter()
    with _StopSignals(enabled=True) as stop:
        while pos.step < last_step and (epochs is None or pos.epoch < epochs):
            epoch_steps = the_plan.steps_per_epoch if the_plan else None
            steps_done = math.ceil(pos.sample_in_epoch / batch_size)
            if steps_per_epoch is not None:
                epoch_steps, steps_done = steps_per_epoch, pos.step - pos.epoch * steps_per_epoch
            if epoch_steps is not None:  # the bar ends where this epoch's training ends
                epoch_steps = steps_done + min(epoch_steps - steps_done, last_step - pos.step)
            bar.start_epoch(
                f"epoch {pos.epoch + 1}" + (f"/{epochs}" if epochs else ""),
                epoch_steps,
                steps_done,
            )
            first_step = pos.step - steps_done  # the global step before this epoch's first
            metrics.epoch = pos.epoch + 1
            epoch_finished = False
            next_flush = time.perf_counter() + FLUSH_SECONDS
            t_last = time.perf_counter()
            batches = None
            try:
                if steps_per_epoch is None:
                    batches = source.batches(
                        pos.epoch, batch_size, start=pos.sample_in_epoch, drop_last=drop_last
                    )
                else:
                    batches = continuing_batches(
                        source,
                        pos.samples_seen,
                        batch_size,
                        drop_last=drop_last,
                        samples_per_pass=the_plan.samples_per_epoch if the_plan else None,
                        steps=steps_per_epoch - steps_done,
                    )
                for x, y in batches:
                    if on_cpu and len(y) <= micro:
                        # train_step's one-micro-batch case, written out: at batch size 1 the
                        # call alone cost ~1% of throughput (benchmarks/loop_overhead.py).
                        opt.zero_grad(set_to_none=True)
                        loss_value = loss_fn(model(x), y)
                        loss_value.backward()
                        opt.step()
                        loss_value, parts = loss_value.item(), 1
                    else:
                        loss_value, parts = train_step(model, opt, loss_fn, x, y, micro, device)
                        if on_cpu:  # nothing to sync on the CPU, and a float is cheaper to keep
                            loss_value = loss_value.item()
                    size = len(y)
                    pos.step += 1
                    pos.iterations += parts
                    pos.samples_seen += size
                    pos.sample_in_epoch += size
                    now = time.perf_counter()
                    add_row((pos.step, size, loss_value, now - t_last))
                    t_last = now
                    if now >= next_flush:
                        flush_metrics()
                        bar.update(
                            pos.step - first_step, metrics.last_loss, metrics.last_samples_per_s
                        )
                        next_flush = now + FLUSH_SECONDS
                    if stop.received:
                        raise _interrupted(stop.received, pos, checkpoint())
                    if checkpoint_every and pos.step % checkpoint_every == 0:
                        checkpoint()
                        t_last = time.perf_counter()
                    if eval_every and pos.step % eval_every == 0:
                        validate()
                        t_last = time.perf_counter()
                    if pos.step >= last_step or stop_requested:
                        break
                else:
                    epoch_finished = True
                    steps_done = pos.step - first_step
                    if steps_per_epoch is not None and steps_done < steps_per_epoch:
                        stop_requested.append(pos.step)  # the stream ran dry
                if steps_per_epoch is not None:
                    epoch_finished = epoch_finished or pos.step - first_step >= steps_per_epoch
                elif the_plan and pos.sample_in_epoch >= the_plan.samples_per_epoch:
                    epoch_finished = True
                flush_metrics()
                bar.update(pos.step - first_step, metrics.last_loss, metrics.last_samples_per_s)
            except (NonFiniteLossError, TrainingInterrupted):
                raise
            except BatchfitError as exc:
                # bad data met mid-epoch: keep what was trained, then stop
                raise _saved_before_stopping(exc, pos, checkpoint()) from None
            finally:
                if batches is not None and hasattr(batches, "close"):
                    batches.close()  # stops a prefetching thread when we leave mid-epoch
                bar.end_epoch()
            if not epoch_finished:
                break
            evaluated = validate_or_save()
            record = {
                "epoch": pos.epoch + 1,
                "step": pos.step,
                "train_loss": metrics.epoch_mean_loss(),
            }
            record.update({k: v for k, v in evaluated.items() if k.startswith("val_")})
            run.history.append(record)
            bar.log(_epoch_summary(record, epochs))
            pos.epoch += 1
            pos.sample_in_epoch = 0
            metrics.start_epoch(pos.epoch + 1)
            checkpoint()
            if stop_requested:
                break

    if run.history and (epoch_finished or metrics.epoch_samples == 0):
        final = {k: v for k, v in run.history[-1].items() if k not in ("epoch", "step")}
    else:  # ended mid-epoch: report the partial epoch and a fresh validation
        evaluated = validate_or_save()
        final = {"train_loss": metrics.epoch_mean_loss()}
        final.update({k: v for k, v in evaluated.items() if k.startswith("val_")})
    last = checkpoint()
    seconds = time.perf_counter() - started
    return TrainResult(
        steps=pos.step,
        iterations=pos.iterations,
        epochs_completed=pos.epoch,
        samples_seen=pos.samples_seen,
        params_sha256=params_sha256(model),
        final=final,
        history=run.history,
        seconds=seconds,
        evals=run.evals,
        train_seconds=run.train_seconds,
        samples_per_s=(pos.samples_seen - samples_at_start) / (run.train_seconds - seconds_at_start)
        if run.train_seconds > seconds_at_start
        else 0.0,
        batch_size=batch_size,
        micro_batch_size=micro,
        lr=lr,
        optimizer=optimizer,
        metrics_path=str(metrics.path) if metrics.path else None,
        checkpoint_path=last,
        resumed_from_step=resumed_from,
    )


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


def _epoch_summary(record: dict[str, float], epochs: int | None) -> str:
    of = f"/{epochs}" if epochs else ""
    parts = [f"epoch {int(record['epoch'])}{of}", f"train_loss {record['train_loss']:.4f}"]
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_")]
    return "  ".join(parts)


def _saved_before_stopping(
    exc: BatchfitError, pos: Position, saved_at: str | None
) -> BatchfitError:
    """``exc`` (bad data met while training), saying where training stopped and what was saved."""
    if saved_at and exc.checkpoint_path is None:
        exc.checkpoint_path = saved_at
        exc.args = (
            f"{exc} Training stopped at step {pos.step} (epoch {pos.epoch + 1}); checkpoint "
            f"saved to {saved_at}.",
        )
    return exc


def _interrupted(signal_name: str, pos: Position, saved_at: str | None) -> TrainingInterrupted:
    where = f"step {pos.step} (epoch {pos.epoch + 1}, {pos.sample_in_epoch} samples into it)"
    if saved_at:
        message = f"Stopped by {signal_name} at {where}; checkpoint saved to {saved_at}."
    else:
        message = (
            f"Stopped by {signal_name} at {where}; nothing was saved because no "
            "--checkpoint-dir was given."
        )
    return TrainingInterrupted(message, signal_name, pos.step)

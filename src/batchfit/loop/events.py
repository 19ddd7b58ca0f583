"""What the loop does between steps: flush the metrics, save a checkpoint, validate.

The step loop calls these a few times a second at most (and at every epoch end), never per step,
so they are plain functions of the run's state and its setup.
"""

from __future__ import annotations

from pathlib import Path

import torch

from batchfit.checkpoint import save_checkpoint
from batchfit.core.options import opt, opt_value
from batchfit.distributed import is_main
from batchfit.errors import BatchfitError, NonFiniteLossError, StoppedAfterSaving, user_code_failed
from batchfit.files import atomic_open
from batchfit.loop.backoff import evaluate_within_memory
from batchfit.loop.checks import check_finite_parameters
from batchfit.loop.state import Position, RunState, Setup, checkpoint_state


def flush_metrics(run: RunState) -> None:
    """Write the pending metrics rows (raising on a NaN loss) and count their training seconds."""
    run.train_seconds += run.metrics.flush()


def save(run: RunState, setup: Setup) -> str | None:
    """Checkpoint the run here (once per step at most) and return the path; None when there is no
    ``checkpoint_dir``. The metrics are flushed first: a NaN loss raises there, so a bad state is
    never saved."""
    flush_metrics(run)
    directory = setup.config.checkpoint_dir
    if directory is None or not is_main():  # several processes: rank 0 alone writes
        return None
    step = run.position.step
    if run.last_checkpoint is not None and run.last_checkpoint[0] == step:
        return run.last_checkpoint[1]
    check_finite_parameters(setup.model, step)
    path = str(save_checkpoint(directory, checkpoint_state(run, setup)))
    run.last_checkpoint = (step, path)
    return path


#: The file in ``out_dir`` that holds the trained model's final weights.
WEIGHTS_FILE = "model.pt"


def save_weights(setup: Setup) -> str | None:
    """Write the model's final weights atomically as ``out_dir/model.pt`` (a plain ``state_dict``
    on the CPU, loadable with ``torch.load(path, weights_only=True)``) and return the path; None
    when there is no ``out_dir``. Without it a run that had no ``checkpoint_dir`` kept nothing."""
    if setup.config.out_dir is None or not is_main():
        return None
    path = Path(setup.config.out_dir) / WEIGHTS_FILE
    state = {k: v.detach().cpu() for k, v in setup.model.state_dict().items()}
    try:
        with atomic_open(path, "wb") as f:
            torch.save(state, f)
    except OSError as exc:
        raise BatchfitError(
            f"cannot write the trained weights to {path}: {exc.strerror or exc}; free space "
            f"there or choose another {opt('out_dir')}"
        ) from exc
    return str(path)


def validate(run: RunState, setup: Setup) -> dict[str, float]:
    """Evaluate here (once per step at most), record it in ``run.evals`` and pass it to
    ``on_eval``, which may ask to stop. Without validation data the record still says where and
    when (step, epoch, samples_seen, train_seconds)."""
    pos = run.position
    if run.evals and run.evals[-1]["step"] == pos.step:
        return run.evals[-1]
    flush_metrics(run)
    record: dict[str, float] = {
        "step": pos.step,
        "epoch": pos.epoch + 1,
        "samples_seen": pos.samples_seen,
        "train_seconds": run.train_seconds,
    }
    if setup.val_source is not None:
        values = evaluate_within_memory(run, setup)
        record.update({f"val_{key}": value for key, value in values.items()})
    run.evals.append(record)
    if setup.on_eval is not None and setup.on_eval(dict(record)):
        run.stop_requested = True
    return record


def validate_or_save(run: RunState, setup: Setup) -> dict[str, float]:
    """:func:`validate`, but bad validation data saves a checkpoint before stopping."""
    try:
        return validate(run, setup)
    except NonFiniteLossError:
        raise
    except BatchfitError as exc:
        raise saved_before_stopping(exc, run.position, save(run, setup)) from None
    except Exception as exc:  # the user's model or loss raised while evaluating
        raise stopped_by_user_code(exc, run, setup, "evaluation")  # noqa: B904 - theirs, as is


def stopped_by_user_code(exc: Exception, run: RunState, setup: Setup, during: str) -> BaseException:
    """``exc``, raised by the user's code ``during`` a step or an evaluation, after saving the
    checkpoint of the last completed step: the user's own exception, marked by
    :func:`~batchfit.errors.user_code_failed`."""
    pos = run.position
    saved_at = save(run, setup)
    if during == "step":
        where = f"step {pos.step + 1} (epoch {pos.epoch + 1})"
    else:
        where = f"the evaluation after step {pos.step} (epoch {pos.epoch + 1})"
    resume = f"train again with {opt_value('resume', True)}"
    return user_code_failed(exc, where, pos.step, saved_at, resume)


def validation_values(record: dict[str, float]) -> dict[str, float]:
    """The ``val_*`` entries of an evaluation record.

    >>> validation_values({"step": 3, "val_loss": 0.5})
    {'val_loss': 0.5}
    """
    return {key: value for key, value in record.items() if key.startswith("val_")}


def saved_before_stopping(exc: BatchfitError, pos: Position, saved_at: str | None) -> BatchfitError:
    """The error to raise for ``exc`` (bad data met while training): a new one saying where
    training stopped and what was saved, or ``exc`` itself when nothing was saved or it says so
    already."""
    if saved_at and exc.checkpoint_path is None:
        return StoppedAfterSaving(exc, f"step {pos.step} (epoch {pos.epoch + 1})", saved_at)
    return exc

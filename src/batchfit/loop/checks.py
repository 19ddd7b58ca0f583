"""Refusals before the first step, so a run fails in a second instead of after an epoch, and the
check that keeps overflowed weights out of every checkpoint."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from batchfit.checkpoint import CHECKPOINT_NAME, checkpoint_path
from batchfit.core.accounting import single_sample_micro_batch_at
from batchfit.core.configs import TrainConfig
from batchfit.core.options import opt, opt_value
from batchfit.errors import BatchfitError, NonFiniteLossError
from batchfit.files import check_writable, folder_lock
from batchfit.step import has_batch_norm


def check_stop_rule(config: TrainConfig, num_samples: int | None) -> None:
    """Training needs an end: epochs (countable only on data of known length) or max_steps."""
    if num_samples is None and config.max_steps is None and config.steps_per_epoch is None:
        raise BatchfitError(
            "The training data is a stream of unknown length, so epochs cannot be counted; "
            f"give {opt('max_steps')} (online learning on a stream), or "
            f"{opt('steps_per_epoch')} to define an epoch on it."
        )
    if config.epochs is None and config.max_steps is None:
        raise BatchfitError(
            f"Say how long to train: give {opt('epochs')}, {opt('max_steps')}, or both."
        )


def check_output_paths(config: TrainConfig) -> None:
    """Fail before training, not at the first checkpoint, on folders that cannot be used: each
    is made if needed and must take a file (one is created and removed)."""
    if config.checkpoint_dir is None:
        if config.resume:
            raise BatchfitError(
                f"{opt('resume')} needs {opt('checkpoint_dir')}, the folder that holds the "
                "checkpoint."
            )
        if config.checkpoint_every is not None:
            raise BatchfitError(
                f"{opt('checkpoint_every')} needs {opt('checkpoint_dir')}, the folder to write "
                "checkpoints to."
            )
    else:
        if config.resume:
            _check_not_a_typo(Path(config.checkpoint_dir))
        _check_checkpoint_folder(Path(config.checkpoint_dir), config.resume)
    if config.out_dir is not None:
        check_writable(Path(config.out_dir), "out_dir")


def _check_not_a_typo(folder: Path) -> None:
    """``resume`` with a checkpoint folder that does not exist starts a new run there (the same
    command can launch and relaunch a job), but not when a folder of a close name beside it holds
    a checkpoint: a typo must not silently train a long run again from step 0."""
    if folder.exists() or not folder.parent.is_dir():
        return
    beside = [
        p.name for p in folder.parent.iterdir() if p.is_dir() and (p / CHECKPOINT_NAME).exists()
    ]
    close = difflib.get_close_matches(folder.name, beside, n=1, cutoff=0.6)
    if close:
        raise BatchfitError(
            f"{opt('resume')}: the checkpoint folder '{folder}' does not exist, but "
            f"'{folder.parent / close[0]}' beside it holds a checkpoint; give that folder to "
            f"continue its run, or leave out {opt('resume')} to start a new run in '{folder}'."
        )


@contextlib.contextmanager
def run_lock(config: TrainConfig) -> Iterator[None]:
    """Hold the checkpoint folder for the run's life, so that a second run using it at the same
    time is refused instead of overwriting this one's checkpoints (:func:`folder_lock`). Once
    held, a fresh run's folder is checked again: another run may have saved there meanwhile."""
    if config.checkpoint_dir is None:
        yield
        return
    with folder_lock(config.checkpoint_dir, "checkpoint_dir"):
        _check_checkpoint_folder(Path(config.checkpoint_dir), config.resume)
        yield


def _check_checkpoint_folder(folder: Path, resume: bool) -> None:
    """The checkpoint folder must be a folder, and a fresh run must not overwrite a checkpoint."""
    if folder.exists() and not folder.is_dir():
        hint = (
            f" (give its folder: {opt_value('checkpoint_dir', str(folder.parent))})"
            if folder.name == CHECKPOINT_NAME
            else ""
        )
        raise BatchfitError(f"{opt('checkpoint_dir')} '{folder}' is a file, not a folder{hint}.")
    if not resume and checkpoint_path(folder).exists():
        raise BatchfitError(
            f"'{folder}' already holds a checkpoint; add {opt_value('resume', True)} to continue "
            f"that run, or choose another {opt('checkpoint_dir')} (or delete it) to start over."
        )
    check_writable(folder, "checkpoint_dir")


def check_batch_norm(
    model: nn.Module, samples: int | None, config: TrainConfig, micro_batch_size: int
) -> None:
    """Batch norm cannot train on one sample; say so before training, not mid-epoch."""
    batch_size, drop_last = config.batch_size, config.drop_last
    assert isinstance(batch_size, int)  # auto is resolved before the loop
    where = single_sample_micro_batch_at(samples, batch_size, micro_batch_size, drop_last)
    if where is not None and has_batch_norm(model):
        raise BatchfitError(
            f"The model has batch norm, which cannot train on a micro-batch of 1 sample, and batch "
            f"size {batch_size} (micro-batch {micro_batch_size}) makes one at {where}. Use "
            f"batch and micro-batch sizes that leave at least 2 samples, or "
            f"{opt_value('drop_last', True)}."
        )


def check_finite_parameters(model: nn.Module, step: int) -> None:
    """A gradient can overflow while the loss is still finite: never checkpoint such weights."""
    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            raise NonFiniteLossError(
                f"Parameter '{name}' became NaN or infinite by step {step} although the loss was "
                "still finite (a gradient overflowed)",
                step=step,
                advice=f"Lower {opt('lr')} or check the data for extreme values.",
            )

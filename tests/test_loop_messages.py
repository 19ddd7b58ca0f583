"""The loop's messages name options for a Python caller and flags while the command line runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from batchfit import BatchfitError, NonFiniteLossError, train
from batchfit.checkpoint import check_same_settings
from batchfit.core.options import OPTIONS, named_as_flags
from batchfit.loop.signals import interrupted
from batchfit.loop.state import Position
from batchfit.metrics import MetricsLog
from helpers import blobs

#: Every option under its first flag, as the command line shows it.
FLAGS = {name: row.flags[0] for name, row in OPTIONS.items()}


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def refusal(then: dict, now: dict) -> str:
    """The message that refuses to resume a checkpoint made with ``then`` using ``now``."""
    with pytest.raises(BatchfitError) as info:
        check_same_settings({"settings": then}, now, Path("c/last.pt"))
    return str(info.value)


@pytest.mark.parametrize(
    ("then", "now", "python", "command_line"),
    [
        ({"batch_size": 10}, {"batch_size": 5}, "batch_size=10", "--batch-size 10"),
        ({"lr": 0.001}, {"lr": 0.5}, "lr=0.001", "--lr 0.001"),
        ({"optimizer": "sgd"}, {"optimizer": "adam"}, "optimizer='sgd'", "--optimizer sgd"),
        ({"drop_last": True}, {"drop_last": False}, "drop_last=True", "--drop-last"),
        ({"drop_last": False}, {"drop_last": True}, "drop_last=False", "no --drop-last"),
        ({"weight_decay": None}, {"weight_decay": 0.1}, "weight_decay=None", "no --weight-decay"),
        ({"data": {"source": "stream"}}, {"data": {"source": "memory"}}, "stream=True", "--stream"),
        (
            {"data": {"source": "memory"}},
            {"data": {"source": "stream"}},
            "stream=False",
            "--no-stream",
        ),
        (
            {"data": {"shuffle_buffer": 50}},
            {"data": {"shuffle_buffer": 80}},
            "shuffle_buffer=50",
            "--shuffle-buffer 50",
        ),
        (
            {"data": {"val_seed": 4}},
            {"data": {"val_seed": 5}},
            "seed=4 (the seed of the validation split)",
            "--seed 4 (the seed of the validation split)",
        ),
        (
            {"data": {"val_fraction": None}},
            {"data": {"val_fraction": 0.1}},
            "'val_data' or val_fraction=0 (no split of 'data')",
            "--val-data or --val-fraction 0 (no split of --data)",
        ),
    ],
)
def test_a_refused_resume_names_the_setting_to_use_as_option_or_flag(
    then, now, python, command_line
):
    assert f"; resume with {python}, or use a new 'checkpoint_dir' to start" in refusal(then, now)
    with named_as_flags(FLAGS):
        shown = refusal(then, now)
    assert f"; resume with {command_line}, or use a new --checkpoint-dir to start" in shown


@pytest.mark.parametrize(
    ("options", "python", "command_line"),
    [
        (
            dict(epochs=1, resume=True),
            "'resume' needs 'checkpoint_dir', the folder that holds the checkpoint.",
            "--resume needs --checkpoint-dir, the folder that holds the checkpoint.",
        ),
        (
            dict(epochs=1, checkpoint_every=5),
            "'checkpoint_every' needs 'checkpoint_dir', the folder to write checkpoints to.",
            "--checkpoint-every needs --checkpoint-dir, the folder to write checkpoints to.",
        ),
        (
            {},
            "Say how long to train: give 'epochs', 'max_steps', or both.",
            "Say how long to train: give --epochs, --max-steps, or both.",
        ),
    ],
)
def test_train_refusals_name_options_from_python_and_flags_on_the_command_line(
    options, python, command_line
):
    x, y = blobs(40)
    with pytest.raises(BatchfitError, match=rf"^{python}$"):
        train(tiny_model(), (x, y), batch_size=8, **options)
    with named_as_flags(FLAGS), pytest.raises(BatchfitError, match=rf"^{command_line}$"):
        train(tiny_model(), (x, y), batch_size=8, **options)


def test_a_checkpoint_folder_that_is_used_or_a_file_is_refused_naming_the_option(tmp_path):
    x, y = blobs(40)
    train(tiny_model(), (x, y), batch_size=8, max_steps=1, checkpoint_dir=tmp_path)
    with pytest.raises(BatchfitError, match=r"add resume=True to continue that run, or choose "):
        train(tiny_model(), (x, y), batch_size=8, epochs=1, checkpoint_dir=tmp_path)
    with pytest.raises(
        BatchfitError,
        match=r"'checkpoint_dir' '.*last.pt' is a file, not a folder "
        rf"\(give its folder: checkpoint_dir='{re.escape(str(tmp_path))}'\)\.$",
    ):
        train(tiny_model(), (x, y), batch_size=8, epochs=1, checkpoint_dir=tmp_path / "last.pt")


def test_a_batch_norm_refusal_offers_drop_last_as_option_or_flag():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    x, y = blobs(101)
    with pytest.raises(BatchfitError, match=r"at least 2 samples, or drop_last=True\.$"):
        train(model, (x, y), batch_size=10, epochs=1)
    with named_as_flags(FLAGS), pytest.raises(BatchfitError, match=r"or --drop-last\.$"):
        train(model, (x, y), batch_size=10, epochs=1)


def test_an_interruption_without_a_checkpoint_folder_names_the_option():
    where = Position(epoch=1, sample_in_epoch=20, step=7)
    message = str(interrupted("SIGTERM", where, None))
    assert message == (
        "Stopped by SIGTERM at step 7 (epoch 2, 20 samples into it); nothing was saved because "
        "no 'checkpoint_dir' was given."
    )
    with named_as_flags(FLAGS):
        assert "because no --checkpoint-dir was given." in str(interrupted("SIGTERM", where, None))


def test_a_nan_loss_advises_a_lower_lr_as_option_or_flag():
    def flush_a_nan() -> None:
        log = MetricsLog(None, micro_batch_size=4, lr=0.1)
        log.pending.append((1, 4, 2.0, 0.01))
        log.pending.append((2, 4, float("nan"), 0.01))  # after an update: the lr may be to blame
        log.flush()

    with pytest.raises(NonFiniteLossError, match=r"kept\. Lower 'lr' or check the data"):
        flush_a_nan()
    with named_as_flags(FLAGS), pytest.raises(NonFiniteLossError, match=r"Lower --lr or check"):
        flush_a_nan()


def test_bad_data_met_after_a_save_is_a_new_error_and_the_cause_keeps_its_message():
    from batchfit.errors import StoppedAfterSaving
    from batchfit.loop.events import saved_before_stopping

    cause = BatchfitError("Target label 7 is out of range.")
    cause.resume_when = "the labels are fixed"
    error = saved_before_stopping(cause, Position(step=10, epoch=0), "c/last.pt")
    assert isinstance(error, StoppedAfterSaving) and error.cause is cause
    assert str(error) == (
        "Target label 7 is out of range. Training stopped at step 10 (epoch 1); checkpoint saved "
        "to c/last.pt."
    )
    assert (error.checkpoint_path, error.resume_when) == ("c/last.pt", "the labels are fixed")
    assert str(cause) == "Target label 7 is out of range." and cause.checkpoint_path is None
    # nothing saved, or saved already: the error as it is
    assert saved_before_stopping(cause, Position(step=10, epoch=0), None) is cause
    assert saved_before_stopping(error, Position(step=11, epoch=0), "c/last.pt") is error

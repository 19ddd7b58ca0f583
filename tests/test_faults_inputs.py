"""Reliability suite, inputs: each fault a user can bring in with the data, the model or the API
options ends in one line that names the problem and the fix (issue 17), never a traceback, a hang
or a silently wrong answer. Real files, real processes, real permissions; nothing mocked.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset

from batchfit.errors import BatchfitError
from batchfit.loop.train import train
from batchfit.orchestrate.sweep import sweep
from batchfit.orchestrate.tune import tune
from helpers import blobs, run_cli


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The single stderr line of a command that failed on bad input (exit 2), holding every
    one of ``needles``."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- models that cannot train (defects 8 and 14) ------------------------------------------------


class _NoParameters(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3] * 2


class _NeedsMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * mask


def _frozen() -> nn.Module:
    model = nn.Linear(4, 3)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


UNTRAINABLE = {
    "no parameters": (_NoParameters, "has no parameters"),
    "all frozen": (_frozen, "frozen (requires_grad=False)"),
    "forward(x, mask)": (_NeedsMask, "forward() needs 'mask'"),
}
NOT_RUNNABLE = {
    "not a module": (lambda: lambda x: x, "not a torch.nn.Module"),
    "on the meta device": (lambda: nn.Linear(4, 3, device="meta"), "meta device"),
}


def _run_api(command: str, model: object) -> None:
    x, y = blobs(64)
    if command == "train":
        train(model, (x, y), batch_size=16, epochs=1, progress=False)
    elif command == "tune":
        tune(model, (x, y), lr=1e-3, time_budget=5)
    else:
        sweep(model, (x, y), val_data=(x, y), batch_sizes=[16], epochs=1)


@pytest.mark.parametrize("command", ["train", "tune", "sweep"])
@pytest.mark.parametrize("case", sorted(UNTRAINABLE))
def test_model_without_trainable_parameters_or_with_extra_inputs_is_one_line_from_python(
    command, case
):
    make, expected = UNTRAINABLE[case]
    with pytest.raises(BatchfitError, match=r"^[^\n]+$") as error:
        _run_api(command, make())
    assert expected in str(error.value)


@pytest.mark.parametrize("command", ["train", "tune"])
def test_model_without_trainable_parameters_or_with_extra_inputs_is_one_line_on_the_cli(
    tmp_path, blobs_parquet, command
):
    (tmp_path / "untrainable.py").write_text(
        "import torch\n"
        "from torch import nn\n\n"
        "class NoParameters(nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x[:, :3] * 2\n\n"
        "class NeedsMask(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.linear = nn.Linear(4, 3)\n\n"
        "    def forward(self, x, mask):\n"
        "        return self.linear(x) * mask\n\n"
        "def frozen():\n"
        "    model = nn.Linear(4, 3)\n"
        "    model.requires_grad_(False)\n"
        "    return model\n\n"
        "def meta():\n"
        "    return nn.Linear(4, 3, device='meta')\n"
    )
    expected = {
        "NoParameters": "has no parameters",
        "frozen": "frozen (requires_grad=False)",
        "NeedsMask": "forward() needs 'mask'",
        "meta": "meta device",
    }
    for factory, needle in expected.items():
        args = [command, "--model", f"untrainable:{factory}", "--data", str(blobs_parquet)]
        args += ["--target", "y", "--out", str(tmp_path / "out"), "--quiet"]
        args += ["--batch-size", "16", "--epochs", "1"] if command == "train" else []
        args += ["--time-budget", "5", "--lr", "1e-3"] if command == "tune" else []
        _one_error_line(run_cli(args, cwd=tmp_path), needle)


@pytest.mark.parametrize("command", ["train", "tune", "sweep"])
@pytest.mark.parametrize("case", sorted(NOT_RUNNABLE))
def test_model_that_is_not_a_module_or_is_on_the_meta_device_is_one_line_from_python(command, case):
    make, expected = NOT_RUNNABLE[case]
    with pytest.raises(BatchfitError, match=r"^[^\n]+$") as error:
        _run_api(command, make())
    assert expected in str(error.value)


# -- validation data that never ends (defect 6) -------------------------------------------------


class _Samples(IterableDataset):
    """``count`` samples of the blobs (``None``: endlessly, cycling), optionally with a length."""

    def __init__(self, count: int | None, length: int | None = None) -> None:
        self.x, self.y = blobs(50)
        self.count, self.length = count, length

    def __iter__(self):
        i = 0
        while self.count is None or i < self.count:
            yield self.x[i % 50], self.y[i % 50]
            i += 1

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("no length")
        return self.length


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_endless_iterable_validation_data_is_refused_in_one_line(command):
    x, y = blobs(64)
    with pytest.raises(BatchfitError, match=r"^[^\n]+$") as error:
        if command == "train":
            train(nn.Linear(4, 3), (x, y), val_data=_Samples(None), batch_size=16, epochs=1)
        else:
            sweep(nn.Linear(4, 3), (x, y), val_data=_Samples(None), batch_sizes=[16], epochs=1)
    assert "without ending" in str(error.value) and "__len__" in str(error.value)


def test_finite_iterable_validation_data_is_read_to_its_end_and_a_length_bounds_it():
    x, y = blobs(64)
    model = nn.Linear(4, 3)
    finite = train(model, (x, y), val_data=_Samples(50), batch_size=16, epochs=1, progress=False)
    # An endless stream that declares a length is read up to that length.
    bounded = train(
        model, (x, y), val_data=_Samples(None, length=50), batch_size=16, epochs=1, progress=False
    )
    assert np.isfinite(finite.final["val_loss"]) and np.isfinite(bounded.final["val_loss"])
    result = sweep(nn.Linear(4, 3), (x, y), val_data=_Samples(50), batch_sizes=[16], epochs=1)
    assert result.to_dict()


# -- misleading messages (defect 12) --------------------------------------------------------


def test_one_number_per_sample_output_with_cross_entropy_names_the_output_shape():
    x, y = blobs(64)
    flat = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))
    with pytest.raises(BatchfitError, match=r"^[^\n]+$") as error:
        train(flat, (x, y), batch_size=16, epochs=1, loss="cross_entropy")
    message = str(error.value)
    assert "shape (2,), one number per sample" in message and "(N, C)" in message
    assert "outputs" not in message


def test_integer_features_are_told_to_become_floats_not_to_fix_features():
    x, y = blobs(64)
    with pytest.raises(BatchfitError, match=r"^[^\n]+$") as error:
        train(nn.Linear(4, 3), (x.long(), y), batch_size=16, epochs=1)
    message = str(error.value)
    assert "torch.int64" in message and "x.float()" in message
    assert "features'" not in message and "Fix" not in message

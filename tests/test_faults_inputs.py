"""Reliability suite, inputs: each fault a user can bring in with the data, the model or the API
options ends in one line that names the problem and the fix (issue 17), never a traceback, a hang
or a silently wrong answer. Real files, real processes, real permissions; nothing mocked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset

from batchfit.errors import BatchfitError
from batchfit.loop.train import train
from batchfit.orchestrate.sweep import sweep
from batchfit.orchestrate.tune import tune
from helpers import blobs, run_cli, subprocess_env


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


def _per_sample_loss(output, target):
    return torch.nn.functional.cross_entropy(output, target, reduction="none")  # a vector


def _loss_reading_a_missing_key(output, target):
    return {"weights": 1.0}["weight"] * output.sum()  # KeyError: the user's own bug


@pytest.mark.parametrize(
    ("loss", "said"),
    [
        (_per_sample_loss, "returned a tensor of shape (2,), not one number; reduce it"),
        (_loss_reading_a_missing_key, "raised KeyError: 'weight', tried on the first samples"),
    ],
)
def test_a_custom_loss_is_tried_before_training_and_a_vector_or_error_is_one_line(loss, said):
    x, y = blobs(64)
    for run in (train, tune):
        with pytest.raises(BatchfitError, match=r"^[^\n]+$") as error:
            run(nn.Linear(4, 3), (x, y), loss=loss, **({"batch_size": 16, "epochs": 1}
                if run is train else {"time_budget": 5}))  # fmt: skip
        assert said in str(error.value)


def test_nan_in_tensor_features_is_named_before_training_as_it_is_for_files():
    x, y = blobs(64)
    x[5, 2] = float("nan")
    x[9] = float("inf")
    with pytest.raises(BatchfitError, match=r"^[^\n]+$") as error:
        train(nn.Linear(4, 3), (x, y), batch_size=16, epochs=1)
    assert "features hold 5 NaN or infinite values (in 2 of 64 samples)" in str(error.value)


class _NanForward(nn.Module):
    """A forward pass that makes NaN from the first batch on (a log of a negative number)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)

    def forward(self, x):
        return torch.log(-self.net(x).abs() - 1.0)


def test_a_nan_loss_at_step_one_blames_the_model_or_data_not_the_learning_rate():
    with pytest.raises(BatchfitError) as error:
        train(_NanForward(), blobs(64), batch_size=16, epochs=1)
    message = str(error.value)
    assert "at step 1, before any update, so the learning rate is not the cause" in message
    assert "Lower 'lr'" not in message and "check the forward pass" in message


def test_integer_features_are_told_to_become_floats_not_to_fix_features():
    x, y = blobs(64)
    with pytest.raises(BatchfitError, match=r"^[^\n]+$") as error:
        train(nn.Linear(4, 3), (x.long(), y), batch_size=16, epochs=1)
    message = str(error.value)
    assert "torch.int64" in message and "x.float()" in message
    assert "features'" not in message and "Fix" not in message


# -- validation columns matched by name (defect 1) ----------------------------------------------


def _write(table: pa.Table, path: Path) -> Path:
    import pyarrow.csv as pacsv
    import pyarrow.feather as feather

    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        feather.write_feather(table, path)
    return path


def _blobs_table(n: int, seed: int, order: list[str]) -> pa.Table:
    x, y = blobs(n, seed=seed)
    columns = {f"f{i}": x[:, i].numpy() for i in range(4)} | {"y": y.numpy()}
    return pa.table({name: columns[name] for name in order})


def _val_rows(source) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = list(source.batches(0, 1000))
    return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".arrow"])
def test_validation_columns_are_matched_to_the_training_columns_by_name(
    tmp_path, models_file, suffix, stream
):
    from batchfit.task import StreamOptions, load_task

    train_file = _write(
        _blobs_table(300, 0, ["f0", "f1", "f2", "f3", "y"]), tmp_path / f"t{suffix}"
    )
    same = _write(_blobs_table(100, 1, ["f0", "f1", "f2", "f3", "y"]), tmp_path / f"v{suffix}")
    reordered = _write(_blobs_table(100, 1, ["f3", "y", "f2", "f1", "f0"]), tmp_path / f"r{suffix}")
    sources = [
        load_task(
            model=f"{models_file}:mlp",
            data=str(train_file),
            val_data=str(val),
            target="y",
            stream=StreamOptions(stream=stream),
        ).val
        for val in (same, reordered)
    ]
    (x_same, y_same), (x_reordered, y_reordered) = (_val_rows(s) for s in sources)
    assert torch.equal(x_same, x_reordered) and torch.equal(y_same, y_reordered)
    assert torch.equal(x_same, blobs(100, seed=1)[0])


@pytest.mark.parametrize("command", ["train", "tune", "sweep"])
def test_validation_data_without_the_training_columns_is_one_line_naming_the_column(
    tmp_path, models_file, blobs_parquet, command
):
    other = _blobs_table(100, 1, ["f0", "f1", "f2", "f3", "y"]).rename_columns(
        ["a", "b", "c", "d", "y"]
    )
    val = _write(other, tmp_path / "other.parquet")
    args = [command, "--model", "user_models:mlp", "--data", str(blobs_parquet), "--target", "y"]
    args += ["--val-data", str(val), "--out", str(tmp_path / "out"), "--quiet"]
    args += ["--batch-size", "16", "--epochs", "1"] if command == "train" else []
    line = _one_error_line(run_cli(args, cwd=tmp_path), "has no column 'f0'", "by name")
    assert "['a', 'b', 'c', 'd', 'y']" in line


def test_validation_column_holding_other_values_is_one_line_naming_the_column(
    tmp_path, models_file
):
    from batchfit.task import load_task

    train_file = _write(_blobs_table(300, 0, ["f0", "f1", "f2", "f3", "y"]), tmp_path / "t.parquet")
    listed = _blobs_table(100, 1, ["f0", "f1", "f2", "f3", "y"])
    pairs = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(200.0)), 2)
    listed = listed.set_column(2, "f2", pairs)
    val = _write(listed, tmp_path / "v.parquet")
    with pytest.raises(BatchfitError, match=r"^Column 'f2' of the validation data .* 2 numbers"):
        load_task(model=f"{models_file}:mlp", data=str(train_file), val_data=str(val), target="y")
    strings = _blobs_table(100, 1, ["f0", "f1", "f2", "f3", "y"]).set_column(
        1, "f1", pa.array([str(i) for i in range(100)])
    )
    val = _write(strings, tmp_path / "s.parquet")
    with pytest.raises(BatchfitError, match=r"^Column 'f1' in .*s.parquet' holds string values"):
        load_task(model=f"{models_file}:mlp", data=str(train_file), val_data=str(val), target="y")


# -- misleading messages about data (defect 12) and options that do not apply (defect 13) ------


def test_unreadable_folder_is_reported_as_unreadable_not_empty(tmp_path, models_file):
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(_blobs_table(50, 0, ["f0", "f1", "f2", "f3", "y"]), folder / "p.parquet")
    folder.chmod(0)
    command = [sys.executable, "-m", "batchfit", "train", "--model", "user_models:mlp"]
    command += ["--data", str(folder), "--target", "y", "--batch-size", "8", "--quiet"]
    if os.geteuid() == 0:
        # Root reads any folder through two capabilities: run the command without them.
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to drop root's capabilities")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    try:
        proc = subprocess.run(
            command, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=subprocess_env()
        )
    finally:
        folder.chmod(0o755)
    _one_error_line(proc, "Cannot list the folder", "Permission denied", "chmod")


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_garbage_npy_is_called_not_a_npy_file_without_allow_pickle_advice(
    tmp_path, models_file, stream
):
    (tmp_path / "zeros.npy").write_bytes(bytes(4096))
    args = ["train", "--model", "user_models:mlp", "--data", "zeros.npy", stream]
    line = _one_error_line(run_cli([*args, "--batch-size", "8"], cwd=tmp_path), "not a NumPy .npy")
    assert "allow_pickle" not in line and "numpy.save" in line


def test_empty_features_list_says_the_list_is_empty(tmp_path, models_file, blobs_parquet):
    args = ["train", "--model", "user_models:mlp", "--data", str(blobs_parquet), "--target", "y"]
    line = _one_error_line(
        run_cli([*args, "--features", ",", "--batch-size", "8"], cwd=tmp_path),
        "--features is empty",
    )
    assert "no feature columns" not in line


@pytest.mark.parametrize(
    "flags",
    [["--stream"], ["--shuffle-buffer", "100"], ["--data-workers", "2"]],
)
def test_streaming_options_with_the_built_in_example_are_refused(tmp_path, flags):
    args = ["train", "--example", "linreg", "--batch-size", "64", "--epochs", "1", *flags]
    _one_error_line(run_cli([*args, "--out", str(tmp_path)]), flags[0], "only to --data")

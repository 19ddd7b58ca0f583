"""Streaming from the command line: --stream/--no-stream, globs, --steps-per-epoch, bad data."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from batchfit.cli import main
from helpers import blobs


@pytest.fixture()
def parts(tmp_path):
    """300 blob samples split over three Parquet files of 100 rows (row groups of 25)."""
    x, y = blobs()
    folder = tmp_path / "parts"
    folder.mkdir()
    table = pa.table({f"f{i}": x[:, i].numpy() for i in range(4)} | {"y": y.numpy()})
    for i in range(3):
        pq.write_table(table.slice(100 * i, 100), folder / f"part-{i}.parquet", row_group_size=25)
    return folder


def train_args(models_file, data, tmp_path, *extra):
    return [
        "train",
        "--model",
        f"{models_file}:mlp",
        "--data",
        str(data),
        "--target",
        "y",
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "--out",
        str(tmp_path / "o"),
        *extra,
    ]


def test_a_parquet_glob_streams_with_validation_and_says_so(tmp_path, capsys, models_file, parts):
    argv = train_args(models_file, f"{parts}/part-*.parquet", tmp_path, "--stream", "--json")
    assert main([*argv, "--shuffle-buffer", "60", "--val-fraction", "0.2"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "streaming" in captured.err and "forced by --stream" in captured.err
    assert "note: validation holds out 0.2 of the streamed rows, so each evaluation reads" in (
        captured.err
    )
    assert result["samples_seen"] == 480 and result["steps"] == 16  # 240 rows, 8 steps per epoch
    assert result["final"]["val_accuracy"] > 0.6


def test_a_small_file_is_loaded_into_memory_unless_streaming_is_forced(
    tmp_path, capsys, models_file, blobs_parquet
):
    assert main(train_args(models_file, blobs_parquet, tmp_path, "--json")) == 0
    loaded = capsys.readouterr()
    assert "into memory" in loaded.err and "--stream to override" in loaded.err
    streamed_argv = train_args(models_file, blobs_parquet, tmp_path, "--json", "--stream")
    assert main([*streamed_argv, "--val-data", str(blobs_parquet)]) == 0
    streamed = capsys.readouterr()
    assert "streaming" in streamed.err
    assert json.loads(streamed.out)["samples_seen"] == json.loads(loaded.out)["samples_seen"] + 60


def user_stream(tmp_path, samples: int | None = None):
    """A user's module with ``stream()``, an IterableDataset of blobs (endless by default)."""
    data = tmp_path / "user_stream.py"
    loop = "while True:" if samples is None else f"for _ in range({samples}):"
    data.write_text(
        "import torch\n\n"
        "class Blobs(torch.utils.data.IterableDataset):\n"
        "    def __iter__(self):\n"
        "        g = torch.Generator().manual_seed(0)\n"
        f"        {loop}\n"
        "            y = int(torch.randint(0, 3, (), generator=g))\n"
        "            yield torch.randn(4, generator=g) + 2 * torch.eye(4)[y], y\n\n"
        "def stream():\n"
        "    return Blobs()\n"
    )
    return data


def test_steps_per_epoch_gives_epochs_to_an_iterable_dataset(tmp_path, capsys, models_file):
    data = user_stream(tmp_path)
    base = ["train", "--model", f"{models_file}:mlp", "--data", f"{data}:stream"]
    base += ["--batch-size", "16", "--val-fraction", "0", "--quiet", "--out", str(tmp_path / "o")]
    assert main([*base, "--epochs", "2"]) == 2
    assert "--steps-per-epoch" in capsys.readouterr().err
    assert main([*base, "--epochs", "3", "--steps-per-epoch", "10", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["epochs_completed"] == 3 and result["steps"] == 30


def test_bad_data_met_mid_epoch_keeps_a_checkpoint_and_exits_2(tmp_path, capsys, models_file):
    x, y = blobs()
    labels = y.numpy().copy()
    labels[250] = 5  # the model has 3 outputs
    path = tmp_path / "d.parquet"
    table = pa.table({f"f{i}": x[:, i].numpy() for i in range(4)} | {"y": labels})
    pq.write_table(table, path, row_group_size=50)
    argv = train_args(models_file, path, tmp_path, "--stream", "--quiet", "--val-fraction", "0")
    code = main([*argv, "--checkpoint-dir", str(tmp_path / "c"), "--shuffle-buffer", "50"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "Target label 5 is outside the model's 3 outputs" in err
    assert "checkpoint saved to" in err and "Once the data is fixed, resume with: batchfit" in err
    assert err.endswith("--resume")
    saved = torch.load(tmp_path / "c" / "last.pt", weights_only=True)
    assert 0 < saved["position"]["step"] < 10


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("nothing-*.parquet", "No files match"),
        ("mixed", "has a different schema from"),
    ],
)
def test_bad_streamed_inputs_are_one_line_with_exit_2(
    tmp_path, capsys, models_file, data, expected
):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    pq.write_table(pa.table({"f0": np.zeros(4), "y": np.arange(4)}), mixed / "a.parquet")
    pq.write_table(pa.table({"f0": np.zeros(4, np.int32), "y": np.arange(4)}), mixed / "b.parquet")
    argv = train_args(models_file, tmp_path / data, tmp_path, "--quiet")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err


def test_plan_says_which_devices_get_no_sample_in_the_last_step(capsys):
    assert main(["plan", "--samples", "1002", "--batch-size", "100", "--world-size", "4"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "[1, 1, 0, 0] (2 of 4 devices get no sample in the last step; --drop-last drops it)" in out
    )
    assert main(["plan", "--samples", "1010", "--batch-size", "100", "--world-size", "4"]) == 0
    assert "[3, 3, 2, 2] (every device still takes the step" in " ".join(
        capsys.readouterr().out.split()
    )


@pytest.mark.parametrize(
    ("flag", "bad"),
    [
        ("--shuffle-buffer", "0"),
        ("--prefetch", "-1"),
        ("--steps-per-epoch", "0"),
        ("--data-workers", "0"),
    ],
)
def test_streaming_flags_reject_bad_values_in_one_line(flag, bad, capsys):
    assert main(["train", "--batch-size", "8", "--epochs", "1", flag, bad]) == 2
    err = capsys.readouterr().err.strip()
    option = flag[2:].replace("-", "_")
    assert len(err.splitlines()) == 1 and f"The '{option}' option must be an int" in err


def test_resume_reads_the_data_as_the_run_it_continues_and_refuses_the_other_way(
    tmp_path, capsys, models_file, blobs_parquet
):
    argv = train_args(models_file, blobs_parquet, tmp_path, "--checkpoint-dir", str(tmp_path / "c"))
    assert main([*argv, "--stream", "--shuffle-buffer", "50", "--max-steps", "3", "--quiet"]) == 0
    capsys.readouterr()
    assert main([*argv, "--no-stream", "--shuffle-buffer", "50", "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "made with source='stream', not 'memory'; resume with --stream," in err
    assert main([*argv, "--shuffle-buffer", "70", "--resume", "--quiet"]) == 2
    assert "resume with --shuffle-buffer 50," in capsys.readouterr().err
    # No flag: this small file would be loaded, but the run being resumed streamed it.
    assert main([*argv, "--shuffle-buffer", "50", "--resume", "--json"]) == 0
    captured = capsys.readouterr()
    assert "streaming" in captured.err and "as the run being resumed from" in captured.err
    assert json.loads(captured.out)["steps"] == 18  # 270 training rows, 9 steps an epoch


def test_bad_validation_data_at_an_epoch_end_keeps_the_epoch_and_says_how_to_resume(
    tmp_path, capsys, models_file, blobs_parquet
):
    x, y = blobs()
    labels = y.numpy().copy()
    labels[250] = 9
    bad = tmp_path / "label9.parquet"
    table = pa.table({f"f{i}": x[:, i].numpy() for i in range(4)} | {"y": labels})
    pq.write_table(table, bad, row_group_size=50)
    argv = train_args(models_file, blobs_parquet, tmp_path, "--stream", "--shuffle-buffer", "50")
    argv += ["--val-data", str(bad), "--checkpoint-dir", str(tmp_path / "ck"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Target label 9 is outside the model's 3 outputs" in err
    assert "Training stopped at step 10 (epoch 1); checkpoint saved to" in err
    saved = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)["position"]
    assert (saved["step"], saved["sample_in_epoch"]) == (10, 300)


def test_an_iterable_dataset_trains_without_validation_by_default_and_says_so(
    tmp_path, capsys, models_file
):
    data = user_stream(tmp_path, samples=200)
    argv = ["train", "--model", f"{models_file}:mlp", "--data", f"{data}:stream", "--json"]
    assert main([*argv, "--batch-size", "16", "--max-steps", "5", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "note: no validation: data from" in captured.err and "--val-data" in captured.err
    result = json.loads(captured.out)
    assert result["steps"] == 5 and "val_loss" not in result["final"]


def test_the_shuffle_buffer_takes_a_size_and_the_start_line_says_what_the_stream_holds(
    tmp_path, capsys, models_file, parts
):
    argv = train_args(models_file, parts, tmp_path, "--stream", "--val-fraction", "0", "--json")
    assert main([*argv, "--shuffle-buffer", "4KiB", "--data-workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "shuffle buffer" in err and "2 decode threads" in err and "KiB of windows" in err
    assert main([*argv, "--shuffle-buffer", "lots"]) == 2
    assert "an int >= 1 (rows) or a size with a unit" in capsys.readouterr().err


def test_nulls_in_an_arrow_file_are_one_line_even_with_a_tiny_buffer(tmp_path, capsys, models_file):
    import pyarrow.feather as feather

    x, y = blobs()
    f1 = pa.array([None if i % 70 == 3 else float(v) for i, v in enumerate(x[:, 1])], pa.float32())
    table = pa.table({f"f{i}": x[:, i].numpy() for i in range(4)} | {"y": y.numpy()})
    path = tmp_path / "nulls.arrow"
    feather.write_feather(table.set_column(1, "f1", f1), path, compression="uncompressed")
    argv = train_args(models_file, path, tmp_path, "--stream", "--shuffle-buffer", "3", "--quiet")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Column 'f1' in '" in err and "has 5 null values" in err

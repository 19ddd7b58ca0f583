"""The command line as a user runs it: tables, --json, files written, one-line errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchfit.cli import main
from batchfit.errors import BatchfitError
from helpers import run_cli, subprocess_env


def json_out(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_prints_the_seed_examples(capsys):
    assert main(["plan", "--samples", "24000", "--batch-size", "32", "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "750" in out and "ceil(24000 / 32)" in out and "2250" in out
    assert (
        json_out(capsys, ["plan", "--samples", "2000", "--batch-size", "10", "--json"])[
            "steps_per_epoch"
        ]
        == 200
    )


def test_plan_json_has_the_documented_keys_and_drop_last_changes_the_counts(capsys):
    got = json_out(
        capsys,
        [
            "plan",
            "--samples",
            "1000",
            "--batch-size",
            "300",
            "--micro-batch-size",
            "128",
            "--world-size",
            "2",
            "--max-steps",
            "7",
            "--json",
        ],
    )
    for key in (
        "steps_per_epoch",
        "iterations_per_epoch",
        "last_batch_size",
        "total_steps",
        "batch_size",
        "micro_batch_size",
        "accumulation",
        "world_size",
    ):
        assert key in got
    assert (got["steps_per_epoch"], got["last_batch_size"], got["accumulation"]) == (4, 100, 2)
    dropped = json_out(
        capsys, ["plan", "--samples", "1000", "--batch-size", "300", "--drop-last", "--json"]
    )
    assert (dropped["steps_per_epoch"], dropped["dropped_per_epoch"]) == (3, 100)


def test_train_json_reports_the_run_and_writes_metrics(tmp_path, capsys):
    got = json_out(
        capsys,
        [
            "train",
            "--batch-size",
            "64",
            "--epochs",
            "2",
            "--quiet",
            "--json",
            "--out",
            str(tmp_path),
        ],
    )
    assert (got["steps"], got["epochs_completed"], got["samples_seen"]) == (126, 2, 8000)
    assert len(got["params_sha256"]) == 64
    assert set(got["final"]) == {"train_loss", "val_loss", "val_accuracy"}
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,epoch,batch_size,micro_batch_size,loss,lr,samples_per_s"
    assert len(lines) == 1 + 126


def test_train_is_reproducible_with_a_seed_and_online_learning_works(tmp_path, capsys):
    argv = [
        "train",
        "--batch-size",
        "1",
        "--max-steps",
        "300",
        "--quiet",
        "--json",
        "--out",
        str(tmp_path),
    ]
    a, b = json_out(capsys, argv), json_out(capsys, argv)
    assert a["params_sha256"] == b["params_sha256"] and a["steps"] == 300
    c = json_out(capsys, argv + ["--seed", "1"])
    assert c["params_sha256"] != a["params_sha256"]


def test_users_model_and_parquet_data_by_file_path_and_by_module_name(
    tmp_path, capsys, models_file, blobs_parquet, monkeypatch
):
    got = json_out(
        capsys,
        [
            "train",
            "--model",
            f"{models_file}:mlp",
            "--data",
            str(blobs_parquet),
            "--target",
            "y",
            "--batch-size",
            "32",
            "--epochs",
            "3",
            "--lr",
            "0.01",
            "--quiet",
            "--json",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert got["samples_seen"] == 3 * 270  # the default 10% is held out for validation
    assert got["final"]["val_accuracy"] > 0.7
    monkeypatch.chdir(models_file.parent)
    got = json_out(
        capsys,
        [
            "train",
            "--model",
            "user_models:regressor",
            "--data",
            str(blobs_parquet),
            "--features",
            "f0,f1,f2,f3",
            "--target",
            "y",
            "--loss",
            "mse",
            "--val-fraction",
            "0",
            "--batch-size",
            "300",
            "--epochs",
            "2",
            "--quiet",
            "--json",
            "--out",
            str(tmp_path / "p"),
        ],
    )
    assert got["steps"] == 2 and "val_loss" not in got["final"]


def _bad_input_cases(models_file: Path, blobs_parquet: Path, tmp_path: Path):
    empty = tmp_path / "empty.csv"
    empty.write_text("f0,f1,f2,f3,y\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    used = tmp_path / "used"
    (used / "last.pt").parent.mkdir()
    (used / "last.pt").write_bytes(b"a checkpoint from an earlier run")
    one = ["--batch-size", "8", "--epochs", "1"]
    user = ["--model", f"{models_file}:mlp", "--data", str(blobs_parquet), "--target", "y"]
    return [
        (["--batch-size", "0", "--epochs", "1"], "'batch_size' option must be an int >= 1"),
        (["--batch-size", "-4", "--epochs", "1"], "Got '-4'"),
        (["--batch-size", "2.5", "--epochs", "1"], "Got '2.5'"),
        (
            ["--batch-size", "5000", "--epochs", "1"],
            "larger than the training set (4000 samples). Use --batch-size 4000",
        ),
        (
            ["--batch-size", "32", "--micro-batch-size", "64", "--epochs", "1"],
            "micro-batch size (64) is larger",
        ),
        (["--batch-size", "32"], "give --epochs, --max-steps, or both"),
        (
            [
                "--model",
                f"{models_file}:mlp",
                "--data",
                str(tmp_path / "nope.parquet"),
                "--batch-size",
                "8",
                "--epochs",
                "1",
            ],
            "No such file or folder",
        ),
        (
            [
                *user[:-2],
                "--features",
                "f0,zz",
                "--target",
                "y",
                "--batch-size",
                "8",
                "--epochs",
                "1",
            ],
            "Feature column(s) ['zz'] not in",
        ),
        (
            [*user[:-2], "--target", "label", "--batch-size", "8", "--epochs", "1"],
            "Target column 'label' is not in",
        ),
        (
            ["--model", "no_such_module:f", "--batch-size", "8", "--epochs", "1"],
            "Cannot import the model factory 'no_such_module:f'",
        ),
        (
            ["--model", f"{models_file}:missing", "--batch-size", "8", "--epochs", "1"],
            "has no attribute 'missing'",
        ),
        (
            ["--model", f"{models_file}:not_a_model", "--batch-size", "8", "--epochs", "1"],
            "returned int, not a torch.nn.Module",
        ),
        (
            ["--model", f"{models_file}:needs_args", "--batch-size", "8", "--epochs", "1"],
            "needs arguments (width)",
        ),
        (
            [
                "--model",
                f"{models_file}:wide",
                "--data",
                str(blobs_parquet),
                "--target",
                "y",
                "--batch-size",
                "8",
                "--epochs",
                "1",
            ],
            "each sample has shape (4,), but the model's first layer expects 7",
        ),
        (
            [
                "--model",
                f"{models_file}:mlp",
                "--data",
                str(empty),
                "--target",
                "y",
                "--batch-size",
                "8",
                "--epochs",
                "1",
            ],
            "has no rows",
        ),
        (["--batch-size", "8", "--epochs", "1", "--resume"], "--resume needs --checkpoint-dir"),
        ([*one, "--checkpoint-every", "5"], "--checkpoint-every needs --checkpoint-dir"),
        ([*one, "--checkpoint-dir", str(a_file)], "is a file, not a folder"),
        (
            [*one, "--checkpoint-dir", str(used / "last.pt"), "--resume"],
            f"is a file, not a folder (give its folder: --checkpoint-dir {used})",
        ),
        ([*one, "--checkpoint-dir", str(used)], "already holds a checkpoint; add --resume"),
        ([*one, "--checkpoint-dir", str(used), "--resume"], "Cannot load"),
        (["--batch-size", "8", "--epochs", "1", "--out", str(a_file)], "--out"),
        ([*one, "--val-fraction", "0.5"], "has its own validation set"),
        (["--model", f"{models_file}:broken", *one], "raised ValueError: boom"),
        (
            [*user, "--model", f"{models_file}:batch_norm", "--batch-size", "1", "--epochs", "1"],
            "batch norm, which cannot train on a micro-batch of 1 sample",
        ),
    ]


def test_each_bad_input_is_one_line_with_exit_2(tmp_path, capsys, models_file, blobs_parquet):
    for argv, expected in _bad_input_cases(models_file, blobs_parquet, tmp_path):
        code = main(["train", "--quiet", "--out", str(tmp_path / "o"), *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err)
        assert len(err.splitlines()) == 1, err
        assert expected in err, (expected, err)
        assert "Traceback" not in err


def test_resume_from_another_models_checkpoint_is_one_line(tmp_path, capsys, models_file):
    ckpt = ["--checkpoint-dir", str(tmp_path / "c"), "--quiet", "--out", str(tmp_path / "o")]
    assert main(["train", "--batch-size", "500", "--epochs", "1", *ckpt]) == 0
    capsys.readouterr()
    code = main(
        [
            "train",
            "--model",
            f"{models_file}:mnist_mlp",
            "--batch-size",
            "500",
            "--epochs",
            "2",
            "--resume",
            *ckpt,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "different model" in err


def test_progress_bar_shows_loss_speed_and_eta_then_validation(tmp_path):
    proc = run_cli(["train", "--batch-size", "256", "--epochs", "2", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    for text in ("epoch 1/2", "loss", "samples/s", "ETA", "val_accuracy"):
        assert text in proc.stderr
    assert "epochs completed" in proc.stdout


def _wait_for_rows(path: Path, rows: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) > rows:
            return
        if proc.poll() is not None:
            raise AssertionError(f"finished early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("no metrics rows appeared")


@pytest.mark.parametrize(("signal_name", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_saves_a_checkpoint_and_the_resumed_run_matches_an_uninterrupted_one(
    tmp_path, signal_name, code
):
    import signal

    args = [
        "train",
        "--batch-size",
        "2",
        "--epochs",
        "2",
        "--checkpoint-dir",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "o"),
        "--quiet",
        "--json",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchfit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    _wait_for_rows(tmp_path / "o" / "metrics.csv", 10, proc)
    proc.send_signal(getattr(signal, signal_name))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"Stopped by {signal_name} at step" in err and "Resume with: batchfit train" in err
    assert "--resume" in err and out == ""
    assert (tmp_path / "c" / "last.pt").exists()
    stopped_at = int(err.split(" at step ")[1].split()[0])
    rows = (tmp_path / "o" / "metrics.csv").read_text().splitlines()
    assert int(rows[-1].split(",")[0]) == stopped_at  # every finished step's row was written
    if signal_name == "SIGTERM":
        return
    resumed = run_cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    fresh = run_cli([*args[:3], "--epochs", "2", "--out", str(tmp_path / "f"), "--quiet", "--json"])
    a, b = json.loads(resumed.stdout), json.loads(fresh.stdout)
    assert a["resumed_from_step"] > 0
    assert a["params_sha256"] == b["params_sha256"] and a["steps"] == b["steps"] == 4000


def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path):
    # The second save blocks inside torch.save (pickling an object that waits), so the kill lands
    # mid-write every time, with the temporary file open and half written.
    script = (
        "import sys, time\n"
        "from batchfit.checkpoint import save_checkpoint\n"
        "class Stall:\n"
        "    def __reduce__(self):\n"
        "        print('writing', flush=True)\n"
        "        time.sleep(120)\n"
        "        return (int, (0,))\n"
        "save_checkpoint(sys.argv[1], {'version': 1})\n"
        "save_checkpoint(sys.argv[1], {'version': 2, 'stall': Stall()})\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    from batchfit.checkpoint import load_checkpoint, save_checkpoint

    assert list(tmp_path.glob(".last.pt.*.tmp")), "the kill should have left a half-written file"
    assert load_checkpoint(tmp_path)["version"] == 1
    save_checkpoint(tmp_path, {"version": 3})
    assert not list(tmp_path.glob(".last.pt.*.tmp"))
    assert load_checkpoint(tmp_path)["version"] == 3


def test_a_damaged_or_foreign_checkpoint_is_refused_in_one_line(tmp_path):
    import torch

    from batchfit.checkpoint import load_checkpoint

    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(BatchfitError, match=r"Cannot load .* as a batchfit checkpoint"):
        load_checkpoint(tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "last.pt")
    with pytest.raises(BatchfitError, match=r"is not a batchfit checkpoint of format 1"):
        load_checkpoint(tmp_path)


def test_json_piped_into_a_reader_that_leaves_early_ends_quietly():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchfit",
            "plan",
            "--samples",
            "24000",
            "--batch-size",
            "32",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
    )
    proc.stdout.close()  # the reader is gone before batchfit writes
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and b"Traceback" not in err


def test_float_labels_of_a_2d_npy_train_with_cross_entropy(tmp_path, capsys, models_file):
    import numpy as np

    from helpers import blobs

    x, y = blobs(200)
    np.save(tmp_path / "d.npy", np.column_stack([x.numpy(), y.numpy()]).astype(np.float32))
    argv = [
        "train",
        "--model",
        f"{models_file}:mlp",
        "--data",
        str(tmp_path / "d.npy"),
        "--batch-size",
        "20",
        "--epochs",
        "2",
        "--quiet",
        "--json",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 2
    assert "if the target holds class labels, use --loss cross_entropy" in capsys.readouterr().err
    got = json_out(capsys, [*argv, "--loss", "cross_entropy"])
    assert "val_accuracy" in got["final"]


def test_rank_0s_error_on_another_rank_exits_without_printing_it_again(capsys, monkeypatch):
    from batchfit.errors import ReportedByRank0

    def fails(*args, **kwargs):
        raise ReportedByRank0("The time budget is too short.")

    monkeypatch.setattr("batchfit.orchestrate.tune.tune", fails)
    assert main(["tune", "--example", "linreg", "--quiet"]) == 2
    assert capsys.readouterr().err == ""
    # the same error on rank 0 (or in one process) is said, once
    monkeypatch.setattr("batchfit.orchestrate.tune.tune", _raises(BatchfitError("Too short.")))
    assert main(["tune", "--example", "linreg", "--quiet"]) == 2
    assert capsys.readouterr().err == "batchfit tune: error: Too short.\n"


def test_training_stopped_on_bad_data_says_how_to_resume_and_leaves_the_error_as_it_was(
    capsys, monkeypatch
):
    error = BatchfitError("Target label 7 is out of range. Training stopped at step 3 (epoch 1).")
    error.checkpoint_path, error.resume_when = "c/last.pt", "the labels are fixed"
    monkeypatch.setattr("batchfit.orchestrate.train_auto.train", _raises(error))
    argv = ["train", "--example", "linreg", "--batch-size", "8", "--checkpoint-dir", "c", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"batchfit train: error: {error} Once the labels are fixed, resume with:")
    assert err.endswith(" --resume\n") and err.count("\n") == 1
    assert str(error).endswith("(epoch 1).")  # a new error said it: the caught one is unchanged


def _raises(error: BaseException):
    def raises(*args, **kwargs):
        raise error

    return raises


def test_the_resume_line_under_torchrun_relaunches_as_many_processes(monkeypatch):
    from batchfit.cli import _resume_command

    argv = ["batchfit", "train", "--example", "linreg", "--checkpoint-dir", "ck"]
    monkeypatch.setattr(sys, "argv", argv)
    args = argparse.Namespace(resume=False)
    assert _resume_command(args) == "batchfit train --example linreg --checkpoint-dir ck --resume"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _resume_command(args) == (
        "torchrun --nproc-per-node 2 -m batchfit train --example linreg --checkpoint-dir ck "
        "--resume"
    )
    monkeypatch.setenv("WORLD_SIZE", "4")  # two nodes of two
    assert _resume_command(args).startswith(
        "torchrun --nnodes 2 <your rendezvous options> --nproc-per-node 2 -m batchfit train "
    )


def test_the_train_summary_says_when_start_up_took_a_noticeable_share():
    from batchfit.cli import _train_time

    assert _train_time(2.4, 17.4) == (
        "2.4 s (and 15.0 s of start-up before it: importing torch, loading the data)"
    )
    assert _train_time(20.0, 20.5) == "20.0 s"  # start-up a small share: not worth a word

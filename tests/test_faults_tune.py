"""Reliability of ``batchfit tune``'s limits and sizes (issue 17): each test walks one fault, on
real models, real processes and the real ``setrlimit``, and checks it is refused (or clamped) in
one line that names the problem and the fix, never a traceback. Last, the README's promise that a
run killed by any signal resumes bitwise identical, for the signals no other test sends."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchfit import TensorSource
from batchfit.core.units import format_bytes, parse_size
from batchfit.errors import BatchfitError
from batchfit.orchestrate.tune import tune
from batchfit.probe.memory import address_space_limit, find_max_micro_batch_size
from helpers import blobs, run_cli, subprocess_env

pytestmark = pytest.mark.usefixtures("one_thread")

#: The largest limit Linux's setrlimit takes from Python (a C long): 8 EiB.
MAX_SIZE = 2**63 - 1


def batch_norm_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _one_line_error(result) -> str:
    """The child's stderr error line, after checking the exit status and that it is one line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


# --- defect 7: batch norm and --max-batch-size 1 ---------------------------------------------


def test_tune_refuses_batch_norm_with_max_batch_size_1_before_measuring(tmp_path: Path):
    out = tmp_path / "report"
    with pytest.raises(BatchfitError, match=r"batch norm.*max_batch_size=1.*2 or more") as error:
        tune(batch_norm_mlp(), blobs(64), max_batch_size=1, time_budget=30, out_dir=out)
    assert "\n" not in str(error.value)
    assert not out.exists()  # refused before anything was measured or written


def test_cli_tune_refuses_batch_norm_with_max_batch_size_1_in_one_line(
    tmp_path: Path, models_file: Path, blobs_parquet: Path
):
    args = ["tune", "--model", f"{models_file.name}:batch_norm", "--data", str(blobs_parquet)]
    args += ["--target", "y", "--max-batch-size", "1", "--device", "cpu", "--out", "report"]
    line = _one_line_error(run_cli(args, cwd=tmp_path))
    assert "batch norm" in line and "--max-batch-size 1" in line and "2 or more" in line, line
    assert not (tmp_path / "report").exists()


def test_memory_probe_never_trains_batch_norm_on_one_sample():
    x, y = blobs(64)
    with pytest.raises(BatchfitError, match=r"batch norm.*'max_batch_size' 2 or more"):
        find_max_micro_batch_size(
            batch_norm_mlp(), TensorSource(x, y), F.cross_entropy, max_batch_size=1, confirm=False
        )
    with pytest.raises(BatchfitError, match=r"batch norm.*the data holds only 1 sample"):
        find_max_micro_batch_size(
            batch_norm_mlp(), TensorSource(x[:1], y[:1]), F.cross_entropy, confirm=False
        )


def test_tune_with_batch_norm_and_max_batch_size_2_measures_from_2():
    x, y = blobs(64)
    result = find_max_micro_batch_size(
        batch_norm_mlp(), TensorSource(x, y), F.cross_entropy, max_batch_size=2, confirm=False
    )
    assert [t.micro_batch_size for t in result.trials] == [2]
    assert result.max_micro_batch_size == 2


# --- defect 11: sizes too large to parse or to give setrlimit ---------------------------------


@pytest.mark.parametrize("text", ["1e999GB", "1e999", "1e400", "1e308GB", "1e30", "9.3e18"])
def test_sizes_beyond_what_an_os_accepts_are_refused_with_the_limit(text: str):
    with pytest.raises(ValueError, match=r"more than the largest size an OS accepts \(8.0 EiB\)"):
        parse_size(text)


@pytest.mark.parametrize("text", ["inf", "nan", "-1", "-1GB", "infGB", "1e", "e5", "0x10"])
def test_sizes_that_are_not_finite_or_negative_are_refused(text: str):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_the_largest_size_an_os_accepts_still_parses():
    assert parse_size("9e18") == 9 * 10**18 <= MAX_SIZE
    assert parse_size("7t") == 7 * 2**40


def test_format_bytes_shows_sizes_beyond_any_unit_without_overflow():
    assert format_bytes(MAX_SIZE) == "8.0 EiB"
    assert format_bytes(10**30) == "1.00e+30 B"
    assert format_bytes(10**400) == "1.00e+400 B"  # an int too large for a float
    assert format_bytes(float("inf")) == "Infinity B"


@pytest.mark.parametrize("value", ["1e999GB", "1e30"])
def test_cli_tune_refuses_a_memory_limit_beyond_what_an_os_accepts_in_one_line(
    tmp_path: Path, value: str
):
    args = ["tune", "--memory-limit", value, "--device", "cpu", "--out", "report"]
    line = _one_line_error(run_cli(args, cwd=tmp_path))
    assert f"Got '{value}'" in line and "largest size an OS accepts (8.0 EiB)" in line, line
    assert "machine's memory" in line


def test_a_memory_limit_above_the_machine_is_clamped_to_it_and_says_so():
    x, y = blobs(64)
    result = find_max_micro_batch_size(
        nn.Linear(4, 3), TensorSource(x, y), F.cross_entropy, limit_bytes=10**30, max_batch_size=8
    )
    total = psutil.virtual_memory().total
    assert result.limit_bytes == total
    assert result.limit_source == (
        f"'memory_limit' 1.00e+30 B is more than this machine's RAM, {format_bytes(total)}: "
        "clamped to it"
    )
    # The child check ran under the clamped limit too (on a GPU machine it may not run at all).
    assert result.max_micro_batch_size == 8 and result.confirmed is not False


def test_an_address_space_limit_past_what_setrlimit_takes_is_capped_not_an_overflow():
    import resource

    before = resource.getrlimit(resource.RLIMIT_AS)
    with address_space_limit(10**30) as limited:
        assert limited is True
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        assert soft in (MAX_SIZE, before[0])
    assert resource.getrlimit(resource.RLIMIT_AS) == before


# --- the README's promise: resume after SIGTERM or SIGKILL is bitwise identical ----------------


def _wait_for_rows(path: Path, rows: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) > rows:
            return
        if proc.poll() is not None:
            raise AssertionError(f"finished early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("no metrics rows appeared")


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_a_run_killed_by_sigterm_or_sigkill_resumes_bitwise_identical(tmp_path, signal_name):
    args = ["train", "--example", "linreg", "--batch-size", "2", "--epochs", "1"]
    args += ["--checkpoint-every", "25", "--quiet", "--json"]
    ckpt = ["--checkpoint-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchfit", *args, *ckpt],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    _wait_for_rows(tmp_path / "o" / "metrics.csv", 60, proc)
    proc.send_signal(getattr(signal, signal_name))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (-signal.SIGKILL if signal_name == "SIGKILL" else 143), err
    resumed = run_cli([*args, *ckpt, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    fresh = run_cli([*args, "--checkpoint-dir", str(tmp_path / "fc"), "--out", str(tmp_path / "f")])
    assert fresh.returncode == 0, fresh.stderr
    a, b = json.loads(resumed.stdout), json.loads(fresh.stdout)
    assert a["resumed_from_step"] >= 50  # SIGKILL: from the last periodic checkpoint
    assert a["params_sha256"] == b["params_sha256"] and a["steps"] == b["steps"]

"""``batchfit tune``: the probes for throughput and learning rate, the whole run through the API
and the command line, the report files, the time budget and bad input."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchfit import TensorSource
from batchfit.cli import main
from batchfit.errors import BatchfitError
from batchfit.lr_scaling import scale_lr
from batchfit.probe.common import Deadline
from batchfit.probe.lr_range import lr_range_test, pick_lr
from batchfit.probe.throughput import measure_throughput
from batchfit.train import params_sha256
from batchfit.tune import tune  # the function; the name batchfit.tune is also the module
from helpers import blobs, run_cli

PLOTS = (
    "throughput.png",
    "time_to_result.png",
    "noise_scale.png",
    "gradient_error.png",
    "memory_and_step_time.png",
    "lr_range.png",
)

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def test_throughput_is_measured_per_size_with_accumulation_above_the_ceiling():
    model = mlp()
    sha = params_sha256(model)
    result = measure_throughput(
        model, TensorSource(*blobs(512)), F.cross_entropy, [8, 32, 128], max_micro_batch_size=32
    )
    assert params_sha256(model) == sha
    assert [(p.batch_size, p.micro_batch_size) for p in result.points] == [
        (8, 8),
        (32, 32),
        (128, 32),
    ]
    for p in result.points:
        assert p.samples_per_s == pytest.approx(p.batch_size / p.step_seconds)
        assert p.step_seconds_min <= p.step_seconds <= p.step_seconds_max
        assert p.timed_steps == 5
    assert result.points[0].gain_from_doubling is None  # 16 was not measured


def test_throughput_skips_sizes_when_time_runs_out_and_says_so():
    result = measure_throughput(
        mlp(), TensorSource(*blobs(512)), F.cross_entropy, [8, 16, 32], deadline=Deadline(0)
    )
    assert [p.batch_size for p in result.points] == [8]
    assert result.points[0].timed_steps == 3
    assert result.skipped == (16, 32)
    assert any("not measured at 16, 32" in n for n in result.notes)


def test_lr_range_test_picks_a_tenth_of_the_best_rate_and_leaves_the_model():
    model = mlp()
    sha = params_sha256(model)
    result = lr_range_test(
        model, TensorSource(*blobs(512)), F.cross_entropy, batch_size=32, steps=60
    )
    assert params_sha256(model) == sha
    assert result.pick == pytest.approx(result.lr_at_min_loss / 10)
    assert result.lrs[0] == pytest.approx(1e-6)
    assert result.stopped_by in ("loss diverged", "max_lr reached")
    assert min(result.losses) < result.losses[0]
    assert pick_lr([1e-3, 1e-2, 1e-1], [2.0, math.inf, 1.0]) == (0.1, 0.01)
    with pytest.raises(BatchfitError, match="at least 3 steps"):
        lr_range_test(model, TensorSource(*blobs(64)), F.cross_entropy, batch_size=8, steps=2)


def test_tune_api_recommends_writes_the_report_and_restores_the_model(tmp_path):
    model = mlp()
    sha = params_sha256(model)
    result = tune(model, blobs(1000), time_budget=30, out_dir=tmp_path, seed=1)
    assert params_sha256(model) == sha
    rec = result.recommended
    assert (
        1 <= rec.batch_size <= 1000 and rec.micro_batch_size <= result.memory.max_micro_batch_size
    )
    assert result.lr_range is not None and rec.lr == result.lr_range.pick
    assert result.noise is not None and result.noise.estimate.pairs >= 2
    names = {os.path.basename(f) for f in result.report_files}
    assert {"report.json", "report.md", *PLOTS} <= names
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["recommended"]["batch_size"] == rec.batch_size
    assert report["version"] == 1 and report["decision"] == list(result.decision)
    md = (tmp_path / "report.md").read_text()
    assert f"batch size {rec.batch_size}" in md and "![throughput](throughput.png)" in md


@pytest.mark.parametrize(
    ("optimizer", "rule", "expected_rule"),
    [("adam", None, "sqrt"), ("sgd", None, "linear"), ("adamw", "none", "none")],
)
def test_a_given_lr_is_scaled_to_the_recommended_batch_by_the_named_rule(
    optimizer, rule, expected_rule
):
    result = tune(
        mlp(),
        blobs(600),
        optimizer=optimizer,
        lr=0.01,
        lr_batch_size=16,
        lr_scaling=rule,
        time_budget=20,
    )
    b = result.recommended.batch_size
    assert result.recommended.lr == scale_lr(0.01, 16, b, expected_rule)
    assert f"{expected_rule} rule from 0.01 at 16" in result.recommended.lr_rule
    assert result.lr_range is None


def test_a_tight_time_budget_still_gives_a_recommendation_and_lists_what_was_cut():
    result = tune(mlp(), blobs(4000), time_budget=0.2, lr=1e-3)
    assert result.recommended.batch_size >= 1
    assert any("time budget ended the memory search" in s for s in result.skipped)
    assert any("Noise scale not measured" in s for s in result.skipped)
    assert result.noise is None and result.recommendation.b_noise is None


def test_tune_refuses_bad_settings():
    with pytest.raises(BatchfitError, match="'time_budget' option"):
        tune(mlp(), blobs(100), time_budget=0)
    with pytest.raises(BatchfitError, match="'memory_limit' option"):
        tune(mlp(), blobs(100), memory_limit=10)
    with pytest.raises(BatchfitError, match="'lr_scaling' option"):
        tune(mlp(), blobs(100), lr_scaling="cubic")


def test_cli_tune_json_end_to_end_writes_every_report_file(
    tmp_path, models_file, blobs_parquet, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CPU is shared: no thread oversubscription
    out = tmp_path / "report"
    done = run_cli(
        [
            "tune",
            "--model",
            f"{models_file}:mlp",
            "--data",
            str(blobs_parquet),
            "--time-budget",
            "15",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # one JSON object, nothing else on stdout
    for key in ("batch_size", "micro_batch_size", "lr"):
        assert report["recommended"][key] > 0
    assert report["memory"]["max_micro_batch_size"] >= 1
    assert report["memory"]["limit_bytes"] > 0
    assert {"batch_size", "samples_per_s"} <= set(report["throughput"][0])
    assert report["noise"]["b_simple"] is None or report["noise"]["b_simple"] > 0
    assert "critical_batch_size" in report["noise"]
    assert report["decision"] and report["version"] == 1
    for name in ("report.json", "report.md", *PLOTS):
        assert (out / name).stat().st_size > 0, name
    assert "memory:" in done.stderr and "throughput:" in done.stderr  # progress on stderr


def test_cli_tune_prints_the_recommendation_with_its_reasons(tmp_path, capsys):
    argv = ["tune", "--example", "linreg", "--time-budget", "20", "--lr", "0.01", "--quiet"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("batchfit tune: batch size ")
    assert "sqrt rule from 0.01 at 32" in out
    assert "gradient noise scale ~" in out and "fits in memory up to" in out
    assert "why:" in out and f"report: {tmp_path}/report.md" in out


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--memory-limit", "lots", "'memory_limit' option must be a size"),
        ("--memory-limit", "12XB", "'memory_limit' option must be a size"),
        ("--memory-limit", "1MB", "'memory_limit' option must be a size of at least 1048576"),
        ("--memory-limit", "100MiB", "leaves no room: this process already holds"),
    ],
)
def test_cli_tune_bad_memory_limit_is_one_line_and_exit_2(flag, value, message, capsys, tmp_path):
    assert main(["tune", flag, value, "--quiet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err

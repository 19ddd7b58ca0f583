"""``batchfit.sweep`` and ``batchfit sweep``: one run per batch size, compared fairly."""

from __future__ import annotations

import copy
import gc
import json
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import batchfit
from batchfit.cli import main
from batchfit.core.configs import SweepConfig
from batchfit.errors import BatchfitError
from batchfit.step import params_sha256
from helpers import blobs, cpu_only_env, run_cli, subprocess_env

# Tiny models: one intra-op thread (conftest.py); child processes get one via run_cli.
pytestmark = pytest.mark.usefixtures("one_thread")

PLOTS = ("sweep_curves.png", "sweep_metric.png", "sweep_sharpness.png", "sweep_time_to_target.png")


def mlp(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))


def data():
    return blobs(400, seed=0), blobs(200, seed=1)


def run(model=None, **kwargs):
    train_data, val_data = data()
    if "steps" not in kwargs and "examples" not in kwargs:
        kwargs.setdefault("epochs", 2)
    kwargs.setdefault("out_dir", None)
    kwargs.setdefault("lr", 1e-2)
    return batchfit.sweep(model or mlp(), train_data, val_data=val_data, **kwargs)


def test_same_seed_and_size_twice_gives_identical_results():
    a = run(batch_sizes=[16, 64], epochs=3)
    b = run(batch_sizes=[16, 64], epochs=3)
    for x, y in zip(a.sizes, b.sizes, strict=True):
        assert x["params_sha256"] == y["params_sha256"]
        assert [p["val_loss"] for p in x["curve"]] == [p["val_loss"] for p in y["curve"]]
        assert x["sharpness"] == y["sharpness"] and x["train_subset"] == y["train_subset"]
    other_seed = run(batch_sizes=[16], epochs=3, seed=1)
    assert other_seed.sizes[0]["params_sha256"] != a.sizes[0]["params_sha256"]


def test_every_size_ends_where_a_plain_training_run_from_the_same_weights_ends():
    model = mlp()
    start = params_sha256(model)
    reference = copy.deepcopy(model)
    optimizer = {"optimizer": "sgd", "momentum": 0.5, "weight_decay": 1e-3}
    result = run(model, batch_sizes=[8, 32, 128], epochs=2, **optimizer)
    assert len({s["params_sha256"] for s in result.sizes}) == 3
    assert params_sha256(model) == start  # the model is handed back as it came
    # Two routes, one answer: plain batchfit.train from the same weights, at every size, ends at
    # the same place, so every run started from those weights and used the same optimizer.
    train_data, _ = data()
    for size in result.sizes:
        plain = batchfit.train(
            copy.deepcopy(reference),
            train_data,
            batch_size=size["batch_size"],
            epochs=2,
            lr=size["lr"],
            **optimizer,
        )
        assert plain.params_sha256 == size["params_sha256"], size["batch_size"]
    without_decay = run(mlp(), batch_sizes=[32], epochs=2, optimizer="sgd", momentum=0.5)
    assert without_decay.sizes[0]["params_sha256"] != result.sizes[1]["params_sha256"]


def test_equal_examples_budgets_give_every_size_the_same_number_of_examples():
    sizes = [1, 7, 32, 100, 400]
    by_epochs = run(batch_sizes=sizes, epochs=2, eval_points=4)
    assert [s["samples_seen"] for s in by_epochs.sizes] == [800] * 5
    assert [s["steps"] for s in by_epochs.sizes] == [800, 2 * 58, 2 * 13, 8, 2]
    by_examples = run(batch_sizes=sizes, examples=1000, eval_points=4)
    for s in by_examples.sizes:
        assert 1000 <= s["samples_seen"] < 1000 + s["batch_size"], s["batch_size"]
    by_steps = run(batch_sizes=[8, 32], steps=30)
    # 400 samples at B=32: 13 steps per epoch (the last holds 16), so 30 steps see 2 x 400 + 4 x 32
    assert [(s["steps"], s["samples_seen"]) for s in by_steps.sizes] == [(30, 240), (30, 928)]


def test_micro_batches_split_large_batches_without_changing_the_result():
    whole = run(batch_sizes=[4, 64], epochs=2)
    split = run(batch_sizes=[4, 64], epochs=2, micro_batch_size=16)
    assert [s["micro_batch_size"] for s in split.sizes] == [4, 16]
    # evaluation and sharpness work in micro-batches too, with the same numbers
    assert (whole.settings["eval_batch_size"], split.settings["eval_batch_size"]) == (1024, 16)
    for a, b in zip(whole.sizes, split.sizes, strict=True):
        assert b["final"]["val_loss"] == pytest.approx(a["final"]["val_loss"], rel=1e-4)
        assert b["sharpness"]["eigenvalue"] == pytest.approx(a["sharpness"]["eigenvalue"], rel=1e-3)


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on deprecated torch aliases warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_sequential_runs_leave_no_tensors_or_memory_behind():
    # Six runs of the same shape (one size, a grid of six learning rates) and a model big enough
    # (0.5M parameters, 6 MB with Adam's state) that keeping any run's optimizer would show.
    counts, rss = [], []

    def after_run(record):
        counts.append(_live_tensors())
        rss.append(record["rss_bytes"])

    model = nn.Sequential(nn.Linear(4, 500), nn.ReLU(), nn.Linear(500, 500), nn.Linear(500, 3))
    run(
        model,
        batch_sizes=[64],
        epochs=1,
        lr_grid="0.25,0.5,2,4,8",
        eval_points=2,
        sharpness_iterations=3,
        on_run=after_run,
    )
    assert len(counts) == 6
    assert counts[1:] == [counts[1]] * 5, counts
    # one leaked run (weights, gradients, two Adam moments: 4 x 1 MB) would add 4 MB per run
    assert max(rss[1:]) - rss[1] < 6 * 2**20, rss


def test_lr_follows_the_scaling_rule_from_the_reference_batch_size():
    def lrs(**kwargs):
        return [s["lr"] for s in run(batch_sizes=[16, 64], epochs=1, **kwargs).sizes]

    assert lrs(lr=0.01, lr_batch_size=16, lr_scaling="linear") == [0.01, 0.04]
    assert lrs(lr=0.01, lr_batch_size=16, lr_scaling="sqrt") == [0.01, 0.02]
    assert lrs(lr=0.01, lr_batch_size=16, lr_scaling="none") == [0.01, 0.01]
    assert lrs(lr=0.01, lr_batch_size=64, optimizer="sgd") == [0.0025, 0.01]  # sgd: linear


def test_lr_grid_runs_every_factor_and_keeps_the_best_by_validation():
    result = run(batch_sizes=[32], epochs=2, lr=1e-3, lr_grid="0.1,10", lr_scaling="none")
    (summary,) = result.sizes
    grid = summary["lr_grid"]
    assert [g["lr"] for g in grid] == [1e-4, 1e-3, 1e-2] and len(result.runs) == 3
    chosen = [g for g in grid if g["chosen"]]
    assert len(chosen) == 1 and chosen[0]["lr"] == summary["lr"]
    assert chosen[0]["best"] == max(g["best"] for g in grid)
    assert summary["lr_at_grid_edge"] == (summary["lr"] in (1e-4, 1e-2))
    assert result.settings["lr_grid"] == [0.1, 1.0, 10.0]


def test_every_size_reports_gap_sharpness_time_to_target_and_speed():
    result = run(batch_sizes=[8, 64], epochs=3, target="val_accuracy=0.5")
    assert result.target.source == "given" and result.metric == "val_accuracy"
    for s in result.sizes:
        assert s["curve"][0]["step"] == 0 and s["curve"][-1]["step"] == s["steps"]
        assert s["best"]["value"] >= s["final"]["val_accuracy"]
        assert s["gap"]["accuracy"] == pytest.approx(
            s["train_subset"]["accuracy"] - s["final"]["val_accuracy"]
        )
        assert s["sharpness"]["eigenvalue"] > 0 and s["sharpness"]["iterations"] >= 1
        assert s["samples_per_s"] > 0 and s["train_seconds"] > 0
        assert s["time_to_target"]["reached"]
        assert s["time_to_target"]["steps"] <= s["steps"]
    assert result.verdict.fastest_batch_size in (8, 64)
    assert result.timing["eval_seconds"] > 0 and result.timing["sharpness_seconds"] > 0


def test_without_a_target_the_sweep_picks_one_every_improving_size_can_reach():
    result = run(batch_sizes=[8, 64], epochs=3)
    assert result.target.source == "auto"
    initial = result.initial["val_accuracy"]
    best = max(s["best"]["value"] for s in result.sizes)
    assert result.target.value == pytest.approx(initial + 0.9 * (best - initial), abs=1e-4)
    regression = batchfit.sweep(
        nn.Linear(4, 1),
        (blobs(400)[0], blobs(400)[0].sum(1)),
        val_data=(blobs(100, 1)[0], blobs(100, 1)[0].sum(1)),
        batch_sizes=[16, 64],
        epochs=2,
        out_dir=None,
    )
    assert regression.metric == "val_loss" and not regression.target.higher_is_better


def test_resume_skips_finished_runs_and_refuses_runs_made_with_other_settings(tmp_path):
    def run(**kwargs):
        return globals()["run"](lr_batch_size=16, **kwargs)

    first = run(batch_sizes=[16, 64], out_dir=tmp_path)
    saved = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert saved == ["b16-lr0.01.json", "b64-lr0.02.json"]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").iterdir()}
    ran = []
    again = run(batch_sizes=[16, 64, 128], out_dir=tmp_path, resume=True, on_run=ran.append)
    assert [r["batch_size"] for r in ran] == [128]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [s["params_sha256"] for s in again.sizes[:2]] == [
        s["params_sha256"] for s in first.sizes
    ]
    assert "2 of the 3 runs were read back" in (tmp_path / "sweep.md").read_text()
    with pytest.raises(BatchfitError, match="was made with budget=\\{'epochs': 2\\}, not"):
        run(batch_sizes=[16], epochs=3, out_dir=tmp_path, resume=True)
    (tmp_path / "runs" / "b16-lr0.01.json").write_text("{not json")
    with pytest.raises(BatchfitError, match="Cannot read the finished run .* Delete it"):
        run(batch_sizes=[16], out_dir=tmp_path, resume=True)


def test_a_sweep_trains_in_bf16_mixed_and_does_not_resume_float32_runs_in_it(tmp_path):
    first = run(batch_sizes=[16], out_dir=tmp_path, precision="bf16-mixed")
    assert first.settings["precision"] == "bf16-mixed"
    plain = run(batch_sizes=[16])
    assert first.sizes[0]["params_sha256"] != plain.sizes[0]["params_sha256"]  # trained in it
    with pytest.raises(BatchfitError, match="was made with precision='bf16-mixed', not '32'"):
        run(batch_sizes=[16], out_dir=tmp_path, resume=True)
    # a run saved before the key existed was float32
    (saved,) = (tmp_path / "runs").iterdir()
    record = json.loads(saved.read_text())
    del record["settings"]["precision"]
    saved.write_text(json.dumps(record))
    with pytest.raises(BatchfitError, match="was made with precision='32', not 'bf16-mixed'"):
        run(batch_sizes=[16], out_dir=tmp_path, resume=True, precision="bf16-mixed")


def test_resume_refuses_runs_made_on_other_data_of_the_same_size(tmp_path):
    (x, y), (xv, yv) = data()
    model = mlp()

    def sweep(train_data, val_data, **kwargs):
        return batchfit.sweep(
            copy.deepcopy(model),
            train_data,
            val_data=val_data,
            batch_sizes=[64],
            epochs=1,
            lr=1e-2,
            out_dir=tmp_path,
            **kwargs,
        )

    sweep((x, y), (xv, yv))
    ran = []
    sweep((x.clone(), y.clone()), (xv.clone(), yv.clone()), resume=True, on_run=ran.append)
    assert ran == []  # the same values in other tensors: the same data
    changed = xv.clone()
    changed[-1, 0] += 1.0  # one value of the last validation sample
    with pytest.raises(BatchfitError, match="was made with val_data_sha256="):
        sweep((x, y), (changed, yv), resume=True)
    other_features = x[:, [1, 0, 2, 3]]
    with pytest.raises(BatchfitError, match="was made with train_data_sha256="):
        sweep((other_features, y), (xv, yv), resume=True)
    with pytest.raises(BatchfitError, match="was made with train_data_sha256="):
        sweep((x, (y + 1) % 3), (xv, yv), resume=True)


def test_an_out_folder_that_cannot_be_used_is_refused_before_any_run(tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("")
    ran = []
    with pytest.raises(BatchfitError, match="'out_dir' '.*afile' is a file, not a folder"):
        run(out_dir=a_file, on_run=ran.append)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "runs").write_text("")
    with pytest.raises(BatchfitError, match="'out_dir' '.*runs' is a file, not a folder"):
        run(out_dir=tmp_path / "out", on_run=ran.append)
    assert ran == []
    code = main(["sweep", "--out", str(a_file), "--epochs", "1", "--batch-sizes", "256"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is a file, not a folder; give a folder" in err


def batch_norm_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_sizes_that_batch_norm_cannot_train_are_skipped_with_a_reason():
    # 400 samples: B=1 is one sample every step; B=3 leaves 400 % 3 = 1 in the last batch.
    result = run(batch_norm_mlp(), batch_sizes=[1, 3, 16], epochs=1)
    assert [s["batch_size"] for s in result.sizes] == [16]
    assert [s["batch_size"] for s in result.skipped] == [1, 3]
    assert result.settings["skipped_batch_sizes"] == [1, 3]
    lines = "\n".join(result.verdict.lines)
    assert "B=1 was not run: the model has batch norm" in lines and "at every step" in lines
    assert "B=3 was not run" in lines and "at the last batch of each epoch" in lines
    with pytest.raises(BatchfitError, match="batch norm.*every size in 'batch_sizes' makes one"):
        run(batch_norm_mlp(), batch_sizes=[1, 3], epochs=1)


def test_targets_that_mean_nothing_are_called_out_in_the_verdict():
    never = run(batch_sizes=[16], epochs=1, target="val_loss=-1")
    assert any("can never be met: the cross_entropy loss" in x for x in never.verdict.lines)
    at_start = run(batch_sizes=[16], epochs=1, target="val_accuracy=0.01")
    assert at_start.sizes[0]["time_to_target"]["steps"] == 0
    assert any("met already at the initial weights" in x for x in at_start.verdict.lines)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_sizes": []}, "'batch_sizes' is empty"),
        ({"batch_sizes": [16, 1000]}, "Batch size 1000 is larger than the training set"),
        ({"epochs": 2, "steps": 3}, "Give one budget: .*not 'epochs' and 'steps'"),
        ({"epochs": 0}, "'epochs' option must be an int >= 1"),
        ({"target": "val_f1=0.9"}, "Unknown metric 'val_f1'"),
        ({"lr_scaling": "cubic"}, "'lr_scaling' option must be one of"),
        ({"eval_points": 0}, "'eval_points' option must be an int >= 1"),
        ({"resume": True}, "'resume' needs 'out_dir'"),
        ({"report": "/nonexistent/report.json"}, "No tune report at"),
    ],
)
def test_bad_sweep_settings_are_refused_before_training(kwargs, message):
    with pytest.raises(BatchfitError, match=message):
        run(**kwargs)


def test_a_config_gives_the_same_sweep_as_keywords_and_keywords_override_it():
    config = SweepConfig(batch_sizes=[16, 64], epochs=1, lr=1e-2, out_dir=None)
    train_data, val_data = data()
    by_config = batchfit.sweep(mlp(), train_data, val_data=val_data, config=config)
    by_keywords = run(batch_sizes=[16, 64], epochs=1)
    assert [s["params_sha256"] for s in by_config.sizes] == [
        s["params_sha256"] for s in by_keywords.sizes
    ]
    overridden = batchfit.sweep(
        mlp(), train_data, val_data=val_data, config=config, batch_sizes=[16]
    )
    assert overridden.sizes[0]["params_sha256"] == by_config.sizes[0]["params_sha256"]
    assert [s["batch_size"] for s in overridden.sizes] == [16]


def test_an_unknown_option_is_a_type_error_that_names_the_option_meant():
    ran = []
    with pytest.raises(TypeError, match="sweep\\(\\) got an unknown option 'batch_size'; did you "):
        run(batch_size=[16], on_run=ran.append)
    assert ran == []


#: The keys of a run's file in runs/: an interrupted sweep saved by an earlier batchfit resumes
#: only while these stay.
RUN_KEYS = [
    "batch_size",
    "lr",
    "lr_factor",
    "micro_batch_size",
    "steps",
    "samples_seen",
    "epochs",
    "eval_every",
    "train_seconds",
    "eval_seconds",
    "sharpness_seconds",
    "seconds",
    "samples_per_s",
    "train_loss",
    "final",
    "train_subset",
    "gap",
    "sharpness",
    "curve",
    "params_sha256",
    "rss_bytes",
    "diverged",
    "initial_params_sha256",
    "settings",
]


def test_run_files_and_records_keep_their_keys(tmp_path):
    made = []
    result = run(batch_sizes=[16], out_dir=tmp_path, on_run=made.append)
    (saved,) = (tmp_path / "runs").iterdir()
    assert list(json.loads(saved.read_text())) == RUN_KEYS
    assert list(made[0]) == RUN_KEYS
    assert list(result.runs[0]) == [*RUN_KEYS, "in_sweep", "for_tune"]
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert list(report["runs"][0]) == [*RUN_KEYS, "in_sweep", "for_tune"]
    without_curve = json.loads(saved.read_text())
    del without_curve["curve"]
    saved.write_text(json.dumps(without_curve))
    with pytest.raises(BatchfitError, match="Cannot read the finished run .*: it has no curve"):
        run(batch_sizes=[16], out_dir=tmp_path, resume=True)


def test_a_sweep_needs_validation_data():
    with pytest.raises(BatchfitError, match="needs validation data"):
        batchfit.sweep(mlp(), blobs(100), val_data=None, out_dir=None)


def test_tune_report_adds_its_batch_size_and_the_verdict_compares(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"version": 1, "recommended": {"batch_size": 48, "lr": 0.01}}))
    result = run(batch_sizes=[16, 64], out_dir=None, report=report)
    assert [s["batch_size"] for s in result.sizes] == [16, 48, 64]
    tune = result.verdict.tune
    assert tune.swept_batch_size == 48 and tune.recommended_lr == 0.01
    assert result.verdict.lines[-1] == tune.reason


def test_tune_is_judged_on_a_run_at_its_own_batch_size_and_learning_rate(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"version": 1, "recommended": {"batch_size": 48, "lr": 0.03}}))
    result = run(batch_sizes=[16, 64], report=report, target="val_accuracy=0.6", epochs=3)
    # B=48 joins the sweep at the sweep's own (scaled) lr; one more run uses tune's lr.
    assert [s["batch_size"] for s in result.sizes] == [16, 48, 64]
    assert result.sizes[1]["lr"] == pytest.approx(0.01 * (48 / 32) ** 0.5, rel=1e-5)
    (extra,) = [r for r in result.runs if not r["in_sweep"]]
    assert (extra["batch_size"], extra["lr"], extra["for_tune"]) == (48, 0.03, True)
    tune = result.verdict.tune
    assert tune.judged == "tune's batch size and lr" and tune.swept_lr == 0.03
    seconds = extra["curve"][1:]  # the first evaluation at or past the target
    reached = [p for p in seconds if p["val_accuracy"] >= 0.6]
    assert reached, "tune's run must reach the target for this test to judge it"
    assert tune.seconds_to_target == reached[0]["train_seconds"]
    fastest = result.verdict.fastest_seconds
    assert tune.seconds_ratio == pytest.approx(reached[0]["train_seconds"] / fastest, rel=1e-3)
    assert tune.agrees == (tune.seconds_ratio <= 1.25)
    assert "at its lr 0.03" in tune.reason and "At the sweep's lr 0.0122" in tune.reason


def test_tune_runs_no_extra_run_when_a_sweep_run_already_has_its_lr_and_says_why_it_skips_one(
    tmp_path,
):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"recommended": {"batch_size": 64, "lr": 0.02}}))
    same = run(batch_sizes=[16, 64], lr_batch_size=16, lr_scaling="linear", lr=0.005, report=report)
    assert len(same.runs) == 2 and [r["for_tune"] for r in same.runs] == [False, True]
    assert same.verdict.tune.judged == "tune's batch size and lr"
    report.write_text(json.dumps({"recommended": {"batch_size": 5000, "lr": 0.02}}))
    too_big = run(batch_sizes=[16, 64], report=report)
    assert [s["batch_size"] for s in too_big.sizes] == [16, 64] and len(too_big.runs) == 2
    assert "larger than this training set (400 samples), so it was not run" in (
        too_big.verdict.tune.reason
    )
    assert too_big.verdict.tune.judged == "nearest swept size"


def test_a_diverging_learning_rate_is_recorded_and_the_sweep_goes_on(tmp_path):
    # SGD at 1000x the learning rate blows up within a few steps at either size.
    kwargs = {"batch_sizes": [16, 64], "optimizer": "sgd", "lr": 0.05, "lr_grid": "1,20000"}
    result = run(out_dir=tmp_path, lr_batch_size=16, lr_scaling="none", **kwargs)
    assert len(result.runs) == 4
    blew_up = [r for r in result.runs if r["diverged"]]
    assert [(r["batch_size"], r["lr"]) for r in blew_up] == [(16, 1000.0), (64, 1000.0)]
    for r in blew_up:
        assert r["sharpness"] is None and r["final"]["val_loss"] is None
        assert 1 <= r["diverged"]["step"] < r["eval_every"] * 20
        assert "became" in r["diverged"]["reason"]
    # The grid keeps the rate that did not blow up, and the verdict says which one did.
    assert [s["lr"] for s in result.sizes] == [0.05, 0.05]
    assert not any(s["diverged"] for s in result.sizes)
    text = "\n".join(result.verdict.lines)
    assert "At B=16, lr 1e+03 (step" in text and "the grid kept lr 0.05" in text
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert [g["diverged"] is not None for g in report["sizes"][0]["lr_grid"]] == [False, True]
    assert "| at step" in (tmp_path / "sweep.md").read_text()
    # --resume reads the diverged runs back instead of running them again.
    ran = []
    again = run(
        out_dir=tmp_path,
        lr_batch_size=16,
        lr_scaling="none",
        resume=True,
        on_run=ran.append,
        **kwargs,
    )
    assert ran == [] and [r["diverged"] is not None for r in again.runs] == [False, True] * 2
    assert "4 of the 4 runs were read back" in (tmp_path / "sweep.md").read_text()


def test_a_size_whose_every_learning_rate_diverged_is_named_and_left_out_of_the_verdict(
    tmp_path,
):
    result = run(batch_sizes=[16], optimizer="sgd", lr=1000.0, out_dir=tmp_path)
    (size,) = result.sizes
    assert size["diverged"] and size["sharpness"] is None
    assert result.verdict.best_batch_size is None and result.verdict.fastest_batch_size is None
    assert any("B=16 diverged at every lr tried" in line for line in result.verdict.lines)
    for name in ("sweep.json", "sweep.md", *PLOTS):
        assert (tmp_path / name).stat().st_size > 0, name


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "Cannot read .* as JSON"),
        ('{"noise": {}}', "has no recommended.batch_size, so it is not a tune report"),
        ('{"recommended": {"batch_size": 0}}', "recommended.batch_size .* must be an int >= 1"),
        ('{"recommended": {"batch_size": 32, "lr": -1}}', "recommended.lr .* positive number"),
    ],
)
def test_unreadable_tune_reports_are_refused(tmp_path, content, message):
    path = tmp_path / "report.json"
    path.write_text(content)
    with pytest.raises(BatchfitError, match=message):
        run(report=path)


def _user_task(models_file: Path, blobs_parquet: Path) -> list[str]:
    return ["--model", f"{models_file}:mlp", "--data", str(blobs_parquet), "--target", "y"]


def test_end_to_end_command_on_a_tiny_model_writes_every_file(tmp_path, models_file, blobs_parquet):
    out = tmp_path / "sweep"
    proc = run_cli(
        [
            "sweep",
            *_user_task(models_file, blobs_parquet),
            "--batch-sizes",
            "8,32,N",
            "--epochs",
            "3",
            "--lr",
            "0.01",
            "--target",
            "val_accuracy=0.6",
            "--out",
            str(out),
        ]
    )
    assert proc.returncode == 0, proc.stderr
    for text in ("[1/3] B=8", "[3/3] B=270", "sharpness"):
        assert text in proc.stderr
    assert "best" in proc.stdout and "Fastest to val_accuracy >= 0.6" in proc.stdout
    for name in ("sweep.json", "sweep.md", *PLOTS):
        assert (out / name).stat().st_size > 0, name
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "sweep.json").stat().st_mode & 0o044 == 0o044  # readable by others, as reports
    report = json.loads((out / "sweep.json").read_text())
    assert [s["batch_size"] for s in report["sizes"]] == [8, 32, 270]  # N: 90% of 300 rows
    assert report["target"]["text"] == "val_accuracy >= 0.6"
    assert set(report["files"]) == {
        "curves",
        "metric",
        "sharpness",
        "time_to_target",
        "markdown",
        "json",
    }
    markdown = (out / "sweep.md").read_text()
    assert "## Verdict" in markdown and "![Validation curves](sweep_curves.png)" in markdown


def sweep_json(capsys, tmp_path: Path, *argv: str) -> dict:
    code = main(["sweep", *argv, "--quiet", "--json", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)  # stdout holds one JSON object and nothing else


def test_json_output_is_one_object_and_nothing_else(tmp_path, capsys):
    report = sweep_json(
        capsys, tmp_path, "--example", "linreg", "--batch-sizes", "64,1024", "--steps", "20"
    )
    assert report["metric"] == "val_loss" and report["settings"]["budget"] == {"steps": 20}
    assert [s["steps"] for s in report["sizes"]] == [20, 20]
    assert report["verdict"]["lines"] and report["version"] == 1


def test_target_flag_takes_both_the_column_and_the_level(
    tmp_path, capsys, models_file, blobs_parquet
):
    task = _user_task(models_file, blobs_parquet)  # holds --target y, the column
    report = sweep_json(
        capsys,
        tmp_path,
        *task,
        "--target",
        "val_loss=0.7",
        "--batch-sizes",
        "32,64",
        "--epochs",
        "2",
    )
    assert report["target"]["text"] == "val_loss <= 0.7"
    # a metric name where a column is expected: the error also says how to give a level
    code = main(["sweep", *task[:-2], "--target", "val_accuracy", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "(for a level to reach, write --target val_accuracy=VALUE)" in err


def _cli_bad_inputs(tmp_path: Path):
    bad_report = tmp_path / "bad.json"
    bad_report.write_text("[1, 2]")
    return [
        (["--target", "val_accuracy"], "a target level is METRIC=VALUE"),
        (["--target", "val_accuracy=abc"], "is not a number"),
        (["--target", "f1=0.9"], "Unknown metric 'f1'"),
        (["--example", "linreg", "--target", "val_accuracy=0.9"], "not measured for this task"),
        (["--batch-sizes", ""], "--batch-sizes is empty"),
        (["--batch-sizes", "0,32"], "'batch_size' option must be an int >= 1"),
        (["--batch-sizes", "32,5000"], "Batch size 5000 is larger than the training set (4000"),
        (["--batch-sizes", "32,32"], "appears more than once"),
        (["--epochs", "2", "--steps", "5"], "not allowed with argument"),
        (["--steps", "0"], "'steps' option must be an int >= 1"),
        (["--examples", "-5"], "'examples' option must be an int >= 1"),
        (["--lr-batch-size", "0"], "'lr_batch_size' option must be an int >= 1"),
        (["--lr-scaling", "cubic"], "'lr_scaling' option must be one of"),
        (["--lr-grid", "0,1"], "'lr_grid_factor' option must be a number > 0"),
        (["--eval-points", "0"], "'eval_points' option must be an int >= 1"),
        (["--sharpness-samples", "0"], "'sharpness_samples' option must be an int >= 1"),
        (["--report", str(tmp_path / "missing.json")], "No tune report at"),
        (["--report", str(bad_report)], "has no recommended.batch_size"),
        (["--val-fraction", "0"], "needs validation data"),
        (["--target", "val_loss=0.5", "--target", "val_accuracy=0.9"], "give METRIC=VALUE once"),
        (["--momentum", "1"], "'momentum' option must be"),
        (["--weight-decay", "-1"], "'weight_decay' option must be"),
        (["--eval-batch-size", "0"], "'eval_batch_size' option must be an int >= 1"),
    ]


def test_each_bad_sweep_input_is_one_line_with_exit_2(tmp_path, capsys):
    for argv, expected in _cli_bad_inputs(tmp_path):
        code = main(["sweep", *argv, "--quiet", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err)
        assert len(err.splitlines()) == 1, err
        assert expected in err, (expected, err)


def test_interrupted_sweep_keeps_finished_runs_and_resumes_without_redoing_them(
    tmp_path,
):
    out = tmp_path / "s"
    # Equal steps: B=1 finishes in a blink, full batch (4,000 samples a step) takes seconds, so the
    # signal sent when the first run's file appears lands in the second run.
    args = [
        "sweep",
        "--batch-sizes",
        "1,N",
        "--steps",
        "20",
        "--eval-points",
        "2",
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchfit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    deadline = time.monotonic() + 120
    runs = out / "runs"
    while not list(runs.glob("b*.json")) and time.monotonic() < deadline:  # not the .tmp file
        if proc.poll() is not None:
            raise AssertionError(f"finished early: {proc.communicate()}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Stopped by SIGINT" in err and "1 finished run(s) are saved in" in err
    assert "Resume with: batchfit sweep" in err and err.strip().endswith("--resume")
    (finished,) = runs.iterdir()
    assert finished.name.startswith("b1-")
    stamp = finished.stat().st_mtime_ns
    resumed = run_cli([*args, "--resume", "--json"])
    assert resumed.returncode == 0, resumed.stderr
    assert finished.stat().st_mtime_ns == stamp
    assert [r["batch_size"] for r in json.loads(resumed.stdout)["runs"]] == [1, 4000]


OOM_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from torch import nn
    import batchfit
    from batchfit.probe.memory import address_space_limit
    torch.manual_seed(0)
    # 128 KiB of activations per sample: training at B=8 takes 1 MiB, but the sharpness
    # measurement on 512 samples needs 64 MiB for one activation alone.
    model = nn.Sequential(nn.Linear(16, 32768), nn.ReLU(), nn.Linear(32768, 2))
    x, y = torch.randn(512, 16), torch.randint(0, 2, (512,))
    kwargs = dict(val_data=(x[:64], y[:64]), batch_sizes=[8], steps=2, eval_points=1,
                  sharpness_iterations=2, train_subset_samples=64)
    batchfit.sweep(model, (x, y), **kwargs)  # one-time costs, outside the limit
    out = {}
    with address_space_limit(64 * 2**20):
        try:
            batchfit.sweep(model, (x, y), **kwargs)
        except batchfit.BatchfitError as exc:
            out["error"] = str(exc)
        result = batchfit.sweep(model, (x, y), micro_batch_size=8, **kwargs)
    out["sharpness"] = result.sizes[0]["sharpness"]["eigenvalue"]
    print(json.dumps(out))
    """
)


def test_out_of_memory_in_sharpness_is_one_line_and_micro_batches_avoid_it():
    done = subprocess.run(
        [sys.executable, "-c", OOM_SCRIPT],
        capture_output=True,
        text=True,
        env=cpu_only_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["error"].startswith("Out of memory while measuring the sharpness of B=8 (")
    assert "can't allocate memory" in out["error"] and len(out["error"].splitlines()) == 1
    assert out["error"].endswith(
        "give 'micro_batch_size', which also bounds evaluation and "
        "sharpness, or lower 'sharpness_samples'."
    )
    assert out["sharpness"] > 0


SLOW_EVAL_MODEL = textwrap.dedent(
    """
    import os, time
    from pathlib import Path
    from torch import nn

    class SlowEval(nn.Module):
        '''Each forward in eval mode (the sweep's checks and its first evaluation, before any
        run trains) leaves a marker and takes 0.5 s: a signal sent then lands outside train().'''

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x):
            if not self.training:
                Path(os.environ["MARKER"]).touch()
                time.sleep(0.5)
            return self.net(x)

    def slow_eval():
        return SlowEval()
    """
)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_before_any_run_trains_is_one_line_saying_what_was_saved_and_how_to_resume(
    tmp_path, blobs_parquet, sig, code
):
    models = tmp_path / "slow_models.py"
    models.write_text(SLOW_EVAL_MODEL)
    marker, out = tmp_path / "in-eval", tmp_path / "s"
    task = ["--model", f"{models}:slow_eval", "--data", str(blobs_parquet), "--target", "y"]
    args = ["sweep", *task, "--batch-sizes", "8,32", "--steps", "4", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchfit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**subprocess_env(), "MARKER": str(marker)},
    )
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"finished early: {proc.communicate()}")
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert len(err.strip().splitlines()) == 1, err
    name = signal.Signals(sig).name
    assert err.startswith(f"batchfit sweep: Stopped by {name} while preparing the sweep"), err
    assert "no run had finished, so nothing was saved" in err
    assert "Resume with: batchfit sweep" in err and err.strip().endswith("--resume")


def test_a_signal_while_the_report_is_written_says_every_run_is_saved_and_resume_writes_it(
    tmp_path, monkeypatch
):
    """SIGTERM after the last run, while the sweep concludes: every run is saved, and the one line
    says so and that --resume writes the report from them. The process's own handler is back
    afterwards."""
    import os

    import batchfit.orchestrate.sweep as sweep_module
    from batchfit.errors import TrainingInterrupted

    class Killed(Exception):
        """What SIGTERM does to this test's process when the sweep does not handle it."""

    def killed(signum, frame):
        raise Killed

    conclude = sweep_module._conclude

    def signalled_then_conclude(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return conclude(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "_conclude", signalled_then_conclude)
    before = signal.signal(signal.SIGTERM, killed)
    try:
        with pytest.raises(TrainingInterrupted) as caught:
            run(batch_sizes=[16, 64], steps=3, eval_points=1, out_dir=tmp_path)
        assert signal.getsignal(signal.SIGTERM) is killed
    finally:
        signal.signal(signal.SIGTERM, before)
    message = str(caught.value)
    assert caught.value.signal_name == "SIGTERM" and "\n" not in message
    assert message.startswith("Stopped by SIGTERM while writing the report")
    assert f"all 2 finished run(s) are saved in {tmp_path / 'runs'}" in message
    assert len(list((tmp_path / "runs").glob("b*.json"))) == 2
    assert not (tmp_path / "sweep.json").exists()

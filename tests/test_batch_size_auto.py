"""``--batch-size auto`` / ``batch_size="auto"``: tune first, then train with its answer; a resume
reads the choice back from the checkpoint folder and never tunes again."""

from __future__ import annotations

import json

import pytest
import torch

import batchfit
from batchfit.errors import BatchfitError
from batchfit.loop.train import TrainResult
from helpers import blobs, run_cli

EXAMPLE_RUN = ["train", "--batch-size", "auto", "--tune-budget", "6", "--quiet", "--json"]


def _said(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("batchfit train: ")]


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    """One auto run of the built-in example, 4 steps, with a checkpoint folder and --out."""
    folder = tmp_path_factory.mktemp("auto")
    args = [*EXAMPLE_RUN, "--max-steps", "4", "--out", "out", "--checkpoint-dir", "ck"]
    proc = run_cli(args, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    return folder, proc


def test_cli_auto_tunes_prints_two_lines_and_trains_with_the_choice(auto_run):
    folder, proc = auto_run
    said = _said(proc.stderr)
    assert len(said) == 2, proc.stderr  # --quiet: the choice and why, nothing else
    assert said[0].startswith("batchfit train: tune chose ") and "batch size" in said[0]
    assert " lr " in said[0]
    assert said[1].startswith("batchfit train: why: ") and "memory" in said[1]
    result = json.loads(proc.stdout)
    tune_report = json.loads((folder / "out" / "tune.json").read_text())
    chosen = tune_report["recommended"]
    assert result["batch_size"] == chosen["batch_size"]
    assert result["micro_batch_size"] == chosen["micro_batch_size"]
    assert result["lr"] == pytest.approx(chosen["lr"])
    assert result["steps"] == 4 and result["samples_seen"] == 4 * chosen["batch_size"]
    assert result["tune"]["recommended"] == chosen
    assert (folder / "out" / "tune.md").read_text().startswith("#")
    assert (folder / "out" / "metrics.csv").exists()
    saved = json.loads((folder / "ck" / "auto.json").read_text())
    assert saved["batch_size"] == chosen["batch_size"]


def test_the_tune_report_of_an_auto_run_says_it_trained_with_it_not_to_train_with_it(auto_run):
    """The report's closing command is not "train with it: ... --epochs 10" (batchfit is already
    doing that): it says this run trains with the choice, and how to resume it."""
    folder, proc = auto_run
    text = (folder / "out" / "tune.md").read_text()
    chosen = json.loads((folder / "out" / "tune.json").read_text())["recommended"]
    assert "--epochs 10" not in text and "Train with it" not in text
    tail = text[text.index("## Trained with it") :]
    assert f"batch size {chosen['batch_size']}" in tail
    assert "--resume" in tail and "--checkpoint-dir ck" in tail and "auto.json" in tail


def test_cli_resume_of_auto_run_uses_the_saved_choice_and_does_not_tune(auto_run):
    folder, first = auto_run
    tune_json = folder / "out" / "tune.json"
    before = (tune_json.stat().st_mtime_ns, tune_json.read_text())
    args = [*EXAMPLE_RUN, "--max-steps", "6", "--out", "out", "--checkpoint-dir", "ck", "--resume"]
    proc = run_cli(args, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    said = _said(proc.stderr)
    assert len(said) == 1 and "not tuning again" in said[0], proc.stderr
    assert (tune_json.stat().st_mtime_ns, tune_json.read_text()) == before
    result, chosen = json.loads(proc.stdout), json.loads(first.stdout)
    assert result["resumed_from_step"] == 4 and result["steps"] == 6
    assert result["batch_size"] == chosen["batch_size"] and result["lr"] == chosen["lr"]
    assert result["tune"] is None


def test_cli_resume_without_saved_choice_is_one_line_error(tmp_path):
    """A checkpoint without auto.json: that run trained with its own batch size, so an auto
    resume cannot know it (with no checkpoint either, it tunes: see the test below)."""
    fixed = run_cli(["train", "--batch-size", "16", "--max-steps", "2", "--checkpoint-dir", "ck",
                     "--quiet"], cwd=tmp_path)  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr
    proc = run_cli(["train", "--batch-size", "auto", "--max-steps", "2", "--checkpoint-dir",
                    "ck", "--resume", "--quiet"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "auto.json" in lines[0] and "--batch-size" in lines[0], lines


def test_resume_of_an_auto_run_stopped_before_it_trained_tunes_again(tmp_path):
    """A checkpoint folder with neither auto.json nor a checkpoint (the run was stopped while
    tuning): nothing was trained, so the resume tunes, saves the choice and trains."""
    x, y = blobs(300)
    (tmp_path / "ck").mkdir()
    said: list[str] = []
    result = batchfit.train(
        torch.nn.Linear(4, 3),
        (x, y),
        batch_size="auto",
        tune_budget=4,
        lr=0.01,
        max_steps=2,
        checkpoint_dir=tmp_path / "ck",
        resume=True,
        log=said.append,
        tune_options={"max_batch_size": 32},
    )
    assert said[0].startswith("resuming an auto run that stopped before it trained") and (
        "tuning again" in said[0]
    )
    assert said[1:] == list(result.auto.lines())
    assert result.tune is not None and result.steps == 2 and result.resumed_from_step is None
    saved = json.loads((tmp_path / "ck" / "auto.json").read_text())
    assert saved["batch_size"] == result.batch_size
    assert (tmp_path / "ck" / "last.pt").exists()


@pytest.mark.parametrize("command", ["train", "plan"])
def test_bad_batch_size_names_auto(tmp_path, command):
    extra = ["--samples", "100"] if command == "plan" else ["--max-steps", "2"]
    proc = run_cli([command, "--batch-size", "banana", *extra], cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'auto'" in lines[0] and "banana" in lines[0], lines


def test_plan_refuses_auto_in_one_line(tmp_path):
    proc = run_cli(["plan", "--samples", "100", "--batch-size", "auto"], cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--batch-size 32" in lines[0], lines


def test_api_auto_returns_train_result_with_the_tune_result(tmp_path):
    x, y = blobs(600)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    said: list[str] = []
    result = batchfit.train(
        model,
        (x, y),
        batch_size="auto",
        tune_budget=5,
        lr=0.01,
        max_steps=3,
        checkpoint_dir=tmp_path / "ck",
        log=said.append,
        tune_options={"max_batch_size": 64},
    )
    assert isinstance(result, TrainResult)
    chosen = result.tune.recommended
    assert result.batch_size == chosen.batch_size <= 64
    assert result.lr == chosen.lr and "rule from 0.01 at 32" in chosen.lr_rule  # the user's lr
    assert result.steps == 3 and result.samples_seen == 3 * chosen.batch_size
    assert said == list(result.auto.lines())
    assert result.to_dict()["tune"]["recommended"]["batch_size"] == chosen.batch_size
    # resumed: the same choice, read back, no tune
    resumed = batchfit.train(
        model,
        (x, y),
        batch_size="auto",
        lr=0.01,
        max_steps=5,
        checkpoint_dir=tmp_path / "ck",
        resume=True,
    )
    assert resumed.tune is None and resumed.batch_size == chosen.batch_size
    assert resumed.resumed_from_step == 3 and resumed.steps == 5


def test_api_auto_resume_without_saved_choice_raises(tmp_path):
    x, y = blobs(100)
    # a run with its own batch size left a checkpoint, and no auto.json
    batchfit.train(
        torch.nn.Linear(4, 3), (x, y), batch_size=10, max_steps=2, checkpoint_dir=tmp_path
    )
    with pytest.raises(BatchfitError, match="auto.json.*which is not there"):
        batchfit.train(
            torch.nn.Linear(4, 3),
            (x, y),
            batch_size="auto",
            max_steps=2,
            checkpoint_dir=tmp_path,
            resume=True,
        )


def test_a_machine_unfit_for_timing_is_said_in_the_why_line():
    """More torch threads than cores: tune's machine check names it with the fix, and the auto
    run's second line carries it, so an answer measured on such a machine is not taken on trust."""
    from batchfit.probe.machine import usable_cores

    x = torch.randn(512, 8)
    y = (x[:, 0] > 0).long()
    class CountsThreads(torch.nn.Linear):
        seen: list[int] = []

        def forward(self, x):
            self.seen.append(torch.get_num_threads())
            return super().forward(x)

    before = torch.get_num_threads()
    torch.set_num_threads(usable_cores() + 2)
    said: list[str] = []
    try:
        result = batchfit.train(
            CountsThreads(8, 2),
            (x, y),
            batch_size="auto",
            tune_budget=4,
            max_steps=2,
            log=said.append,
            tune_options={"max_batch_size": 64},
        )
    finally:
        torch.set_num_threads(before)
    assert len(said) == 2 and said[1].startswith("why: ")
    assert "Warning:" in said[1] and f"OMP_NUM_THREADS={usable_cores()}" in said[1]
    assert result.auto.reasons in said[1]
    # tune measured with the fastest thread count, and the run trained on it, not on torch's own
    chosen = result.tune.machine.threads_used
    assert result.tune.machine.threads_seconds and f"train with threads={chosen}." in said[1]
    assert CountsThreads.seen[-2:] == [chosen, chosen]  # the two training steps

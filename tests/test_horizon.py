"""tune's horizon: the user's planned run (epochs, steps or a held-out loss to reach) read
against the measurements: a run too short for tuning to pay for itself ends tune early, a long
one earns a larger default budget, no race round trains longer than the run, and the report
says which horizon the answer is for and for how long a run it holds."""

from __future__ import annotations

import json
import time

import pytest
import torch

import batchfit.orchestrate.train_auto as train_auto
from batchfit import train
from batchfit.core.horizon import Horizon, long_run_budget, parse_tune_target, tuning_pays
from batchfit.errors import BatchfitError
from batchfit.inputs import as_source, loss_for
from batchfit.orchestrate.tune import tune
from batchfit.orchestrate.tune_horizon import HorizonReading, _holds
from batchfit.probe.harness import Deadline
from batchfit.probe.race import Contender, RaceSettings, race
from batchfit.report.tune_json import ENDED_EARLY
from batchfit.report.tune_report import headline, train_command
from helpers import blobs, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


class Stop(Exception):
    """Raised from tune's log to stop it at a line (what it said is all the test needs)."""


# -- the horizon's numbers ------------------------------------------------------------------------


def test_a_horizon_counts_steps_and_training_time_as_train_does():
    assert Horizon(epochs=3).steps(32, 1000) == 3 * 32  # ceil(1000 / 32) steps per epoch
    assert Horizon(epochs=3, max_steps=50).steps(32, 1000) == 50  # whichever ends first
    assert Horizon(max_steps=50).training_seconds(256, None, 0.02) == pytest.approx(1.0)
    assert Horizon(epochs=3).steps(32, None) is None  # a stream of unknown length
    assert Horizon.of(None, None, "val_loss=0.3").counted is False
    with pytest.raises(BatchfitError, match="judges by held-out loss"):
        parse_tune_target("val_accuracy=0.9")


def test_tuning_pays_only_when_the_run_trains_longer_than_the_tuning_left():
    assert not tuning_pays(run_seconds=10.0, tuning_left_s=40.0)
    assert tuning_pays(run_seconds=400.0, tuning_left_s=40.0)
    # a few percent of a long run, capped; nothing for a run whose share is under the default
    assert long_run_budget(10_000.0, 60.0) == pytest.approx(300.0)
    assert long_run_budget(1e7, 60.0) == pytest.approx(1800.0)
    assert long_run_budget(1_000.0, 60.0) is None


# -- inside tune ------------------------------------------------------------------------------


def test_a_run_too_short_to_repay_tuning_ends_tune_early_racing_only_learning_rates(tmp_path):
    lines: list[str] = []
    cpu_before = time.process_time()  # the suite's budget clock: CPU seconds, one thread
    result = tune(mlp(), blobs(400), epochs=2, time_budget=20, log=lines.append, out_dir=tmp_path)
    spent = time.process_time() - cpu_before  # wall seconds would count a busy machine's load
    h = result.horizon
    assert h.ends_early and h.steps is not None and h.training_s < h.tuning_left_s
    said = next(s for s in lines if s.startswith("horizon: 2 epochs: "))
    assert "tuning cannot pay for itself: ending early" in said
    # the noise probe and the range test still run; the race only tries learning rates at the
    # predicted batch size, within a share of the time that was left
    assert result.noise is not None and result.lr_range is not None
    assert result.race is not None
    assert len({c.batch_size for c in result.race.rounds[0].contenders}) == 1
    assert spent < 20 * 0.6, spent  # a quarter of what was left, and the start-up before it
    assert headline(result.to_report()).startswith(
        "PROVISIONAL (tuning cannot pay for itself on a run this short, so no batch sizes raced)"
    )
    assert ENDED_EARLY in result.decision and ENDED_EARLY in result.provisional_reasons
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["horizon"]["ended_early"] and report["horizon"]["epochs"] == 2
    assert train_command(report).endswith("--epochs 2")
    assert "## Your run (horizon)" in (tmp_path / "report.md").read_text()


def test_a_long_run_without_a_budget_given_earns_a_share_of_it():
    said: list[str] = []

    def log(line: str) -> None:  # stops tune once it has read the horizon
        said.append(line)
        if line.startswith("horizon: "):
            raise Stop

    with pytest.raises(Stop):
        tune(mlp(), blobs(400), epochs=10**9, log=log)
    (budget,) = [s for s in said if s.startswith("budget: ")]
    assert budget.startswith("budget: 1800 s, 3% of the predicted ")
    # a budget the user gave is theirs
    said.clear()
    with pytest.raises(Stop):
        tune(mlp(), blobs(400), epochs=10**9, time_budget=30, log=log)
    assert not [s for s in said if s.startswith("budget: ")]


def test_no_horizon_says_for_how_long_a_run_the_race_judged_the_answer():
    result = tune(mlp(), blobs(2000), lr=1e-3, time_budget=20)
    h = result.horizon
    assert not h.horizon.given and result.race is not None
    assert h.judged_over_s == result.race.rounds[-1].horizon_s
    assert [name for name, _, _ in h.leaders] == [r.name for r in result.race.rounds]
    assert h.holds.startswith(f"The answer was judged over runs of {h.judged_over_s:.2g} s")
    assert "give your run's length ('epochs' or 'max_steps')" in h.holds
    assert h.holds in result.decision


def test_a_target_the_winner_reached_in_the_race_is_reported_when():
    result = tune(mlp(), blobs(2000), time_budget=20, target="val_loss=50")
    assert result.race is not None
    assert result.horizon.target_reached_s == 0.0  # reached at the initial weights already
    assert result.race.for_the_run is None  # the race saw the run's end: no ladder after it
    assert "the winner reached val_loss <= 50 after 0 s of them" in result.horizon.holds


def test_a_target_not_reached_or_a_run_far_longer_than_the_race_says_a_larger_batch_may_suit():
    judged = HorizonReading(
        Horizon.of(None, None, "val_loss=0.01"), judged_over_s=2.0, judged_steps=400
    )
    assert "did not reach val_loss <= 0.01 in them" in _holds(judged, still_improving=True)
    longer = HorizonReading(Horizon(epochs=500), training_s=200.0, judged_over_s=2.0)
    assert "100x longer, and the winner's loss was still falling" in _holds(longer, True)
    assert "should carry over" in _holds(longer, still_improving=False)
    near = HorizonReading(Horizon(epochs=5), training_s=4.0, judged_over_s=2.0)
    assert "within reach of that" in _holds(near, True)


def test_no_race_round_trains_longer_than_the_planned_run():
    x, y = blobs(600)
    train_data, held_out = as_source((x[:480], y[:480]), seed=0), as_source((x[480:], y[480:]))
    grid = {size: [Contender(size, lr, size) for lr in (1e-3, 3e-2)] for size in (16, 64)}
    steps = {16: 0.001, 64: 0.002}
    common = {"grid": grid, "step_seconds": steps, "optimizer": "adam", "first_horizon_s": 0.2}
    capped = race(
        mlp(), train_data, held_out, loss_for(train_data, None),
        RaceSettings(**common, run_seconds={16: 0.3, 64: 0.3}), deadline=Deadline(60),
    )  # fmt: skip
    assert len(capped.rounds) == 1
    assert any("a longer round would train longer than your run" in n for n in capped.notes)


# -- where the batch size is chosen ---------------------------------------------------------


def test_train_with_batch_size_auto_gives_tune_its_own_length(monkeypatch):
    seen = []

    def record(*_, config, **__):
        seen.append(config)
        raise Stop

    monkeypatch.setattr(train_auto, "tune", record)
    with pytest.raises(Stop):
        train(mlp(), blobs(200), batch_size="auto", epochs=4, max_steps=90)
    assert (seen[0].epochs, seen[0].max_steps) == (4, 90)


def test_cli_tune_takes_the_runs_length_and_refuses_an_accuracy_target(tmp_path):
    done = run_cli(["tune", "--example", "linreg", "--epochs", "2", "--out", str(tmp_path)])
    assert done.returncode == 0, done.stderr
    assert "tuning cannot pay for itself" in " ".join(done.stdout.split())  # lines wrap
    assert "train with it: batchfit train " in done.stdout and "--epochs 2" in done.stdout
    refused = run_cli(["tune", "--example", "linreg", "--target", "val_accuracy=0.9"])
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "batchfit tune: error: tune's race judges by held-out loss, so its target is a loss "
        "level: "
        "give --target val_loss=VALUE (a loss your run should reach), or --epochs or "
        "--max-steps."
    ]


def test_a_run_of_minutes_cuts_tuning_to_a_fifth_of_it_unless_a_budget_was_given(monkeypatch):
    """A full minute of tuning on a run of 100 s doubles the wait: tune keeps to a fifth of the
    predicted run. The step time is pinned (0.05 s) so the predicted run is exact."""
    import batchfit.orchestrate.tune as tune_module

    monkeypatch.setattr(
        tune_module, "step_seconds", lambda _t, sizes, _c: dict.fromkeys(sizes, 0.05)
    )
    said: list[str] = []

    def log(line: str) -> None:  # stops tune once it has read the horizon
        said.append(line)
        if line.startswith("horizon: "):
            raise Stop

    with pytest.raises(Stop):  # 2,000 steps at 0.05 s: a 100 s run
        tune(mlp(), blobs(400), max_steps=2000, log=log)
    (budget,) = [s for s in said if s.startswith("budget: ")]
    assert budget.startswith("budget: cut to 20 s left: 20% of the predicted 100 s run"), budget
    assert "tuning cannot pay" not in said[-1]  # it still tunes in full, in less time
    for options in ({"max_steps": 20_000}, {"max_steps": 2000, "time_budget": 60}):
        said.clear()  # a run of 1,000 s leaves the default alone; a budget given is the user's
        with pytest.raises(Stop):
            tune(mlp(), blobs(400), log=log, **options)
        assert not [s for s in said if s.startswith("budget: ")], said


def test_the_run_is_predicted_at_the_throughput_knee_not_at_the_largest_efficient_batch():
    """Step time 1 ms + 2.5 us x B: samples/s reach half their limit at B = 400. The run is
    predicted there (the measured size nearest to it), never above the throughput answer."""
    from batchfit.orchestrate.tune_race import horizon_batch
    from batchfit.probe.throughput import Throughput, ThroughputPoint

    def point(b: int) -> ThroughputPoint:
        step = 1e-3 + 2.5e-6 * b
        return ThroughputPoint(b, b, b / step, step, step, step, 5)

    measured = Throughput(tuple(point(2**k) for k in range(4, 15)), 8192, (), 3)
    assert horizon_batch(measured, cheap=16384) == 512  # nearest to 400 in log (256 is farther)
    assert horizon_batch(measured, cheap=128) == 128  # never above the throughput answer
    flat = Throughput((point(16),), None, (), 3)  # one point: no fit, the answer itself
    assert horizon_batch(flat, cheap=16) == 16

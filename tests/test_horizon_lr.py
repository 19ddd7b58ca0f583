"""The learning rate for the planned run's length: the floor model's fit, the rate chosen from a
ladder of longer runs after the race, and tune using it only for a run much longer than its
race."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

from batchfit.core.horizon_lr import fit_floor
from batchfit.orchestrate.tune import tune
from batchfit.probe import race_horizon
from batchfit.probe.race import Contender, Lane
from helpers import blobs

pytestmark = pytest.mark.usefixtures("one_thread")


def floor_loss(lr: float, steps: float, p: float = 0.6, c: float = 4.0) -> float:
    return 0.05 + 1.5 * (lr * steps) ** -p + c * lr


def test_the_fit_recovers_the_floor_model_from_noisy_curves_and_its_best_lr_falls_with_steps():
    rng = random.Random(0)
    points = [
        (lr, t, floor_loss(lr, t) * (1 + rng.uniform(-0.02, 0.02)))
        for lr in (0.04, 0.02, 0.01, 0.005)
        for t in (50, 80, 130, 200, 320, 500)
    ]
    fit = fit_floor(points)
    assert fit is not None and fit.p == pytest.approx(0.6, rel=0.25)
    exact = (0.6 * 1.5 * 20000**-0.6 / 4.0) ** (1 / 1.6)
    assert fit.best_lr(20000) == pytest.approx(exact, rel=0.35)
    assert fit.best_lr(20000) < fit.best_lr(2000) < fit.best_lr(200)
    assert fit.horizon_exponent == pytest.approx(fit.p / (fit.p + 1))


def test_curves_without_a_floor_give_no_rate_to_extrapolate_and_too_few_points_no_fit():
    no_floor = [(lr, t, floor_loss(lr, t, c=0.0)) for lr in (0.04, 0.01) for t in (10, 100, 1000)]
    fit = fit_floor(no_floor)
    assert fit is not None and fit.c == pytest.approx(0.0, abs=1e-9) and fit.best_lr(1e5) is None
    assert fit_floor(no_floor[:5]) is None
    assert fit_floor([(0.01, t, floor_loss(0.01, t)) for t in range(10, 100, 10)]) is None


def lanes_from(model, rates, horizon_steps, step_s=0.001):
    marks = [round(horizon_steps * k / 12) for k in range(1, 13)]
    return [
        Lane(
            Contender(64, lr, 64),
            step_s,
            horizon_steps * step_s,
            horizon_steps,
            ((0.0, 3.0), *((m * step_s, model(lr, m)) for m in marks)),
        )
        for lr in rates
    ]


def test_the_rate_for_the_run_is_the_fits_kept_between_the_ladders_best_and_four_times_lower():
    winner = Contender(64, 0.04, 64)
    rates = [0.04, 0.02, 0.01, 0.005]

    def steep(lr: float, t: float) -> float:  # a high floor: 0.0175 is best after 400 steps
        return floor_loss(lr, t, c=16.0)

    near = race_horizon._chosen(winner, lanes_from(steep, rates, 400), 0.4, 4000)
    assert near.observed_lr == 0.02  # over 400 steps, 0.02 ends lowest
    assert near.fit is not None and near.lr < near.observed_lr
    assert near.lr == pytest.approx(near.fit.best_lr(4000), rel=1e-3)
    assert "steps^-" in near.how and near.run_steps == 4000 and near.steps == 400
    far = race_horizon._chosen(winner, lanes_from(steep, rates, 400), 0.4, 4e9)
    assert far.lr == pytest.approx(far.observed_lr / race_horizon.MAX_EXTRAPOLATION, rel=1e-3)
    bolder = race_horizon._chosen(
        winner, lanes_from(lambda lr, t: floor_loss(lr, t, c=0.0), rates, 400), 0.4, 4000
    )
    assert bolder.lr == bolder.observed_lr == 0.04 and "nothing to extrapolate" in bolder.how


def test_for_a_run_to_a_held_out_loss_the_rate_is_the_one_the_fit_says_gets_there_soonest():
    winner = Contender(64, 0.04, 64)
    lanes = lanes_from(lambda lr, t: floor_loss(lr, t, c=16.0), [0.04, 0.02, 0.01, 0.005], 400)
    found = race_horizon._chosen(winner, lanes, 0.4, None, level=0.2)
    assert found.fit is not None and found.run_steps is None
    assert found.lr == pytest.approx(found.fit.fastest_lr(0.2, 0.005, 0.02), rel=1e-3)
    # the lr is reported to 4 significant digits, which may round it just below the bound
    assert found.observed_lr / race_horizon.MAX_EXTRAPOLATION <= found.lr * (1 + 1e-3)
    assert found.lr <= found.observed_lr
    assert "the fastest to loss 0.2" in found.how
    # a level below every floor the fit allows: the ladder's own best stands
    never = race_horizon._chosen(winner, lanes, 0.4, None, level=0.01)
    assert never.lr == never.observed_lr and "nothing to extrapolate" in never.how


def test_a_spike_in_a_lane_does_not_decide_which_rate_ended_best():
    winner = Contender(64, 0.04, 64)
    lanes = lanes_from(lambda lr, t: floor_loss(lr, t, c=16.0), [0.04, 0.02, 0.01, 0.005], 400)
    spiked = replace(lanes[1], curve=(*lanes[1].curve[:-1], (0.4, 5.0)))  # 0.02's last point
    assert (
        race_horizon._chosen(winner, [lanes[0], spiked, *lanes[2:]], 0.4, 4000).observed_lr == 0.02
    )


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def test_tune_lowers_the_races_lr_for_a_run_far_longer_than_its_rounds_and_reports_it(tmp_path):
    result = tune(mlp(), blobs(2000), epochs=20000, time_budget=30, out_dir=tmp_path)
    raced = result.race
    assert raced is not None
    found = raced.for_the_run
    assert found is not None, (raced.notes, result.skipped)
    assert found.batch_size == raced.winner.batch_size == result.recommended.batch_size
    assert [lane.contender.lr for lane in found.lanes] == [
        float(f"{raced.winner.lr * f:.4g}") for f in race_horizon.LADDER
    ]
    assert found.steps >= race_horizon.MIN_GAIN * raced.rounds[-1].lanes[0].steps
    assert found.lr <= raced.winner.lr and result.recommended.lr == found.lr
    # the lr is reported to 4 significant digits, which may round it just below the bound
    assert found.observed_lr / race_horizon.MAX_EXTRAPOLATION <= found.lr * (1 + 1e-3)
    assert found.lr <= found.observed_lr
    assert any(line.startswith("The lr for your run: ") for line in result.decision)
    report = json.loads((tmp_path / "report.json").read_text())
    written = report["race"]["lr_for_the_run"]
    assert written["lr"] == found.lr and len(written["lanes"]) == len(race_horizon.LADDER)
    assert "### The learning rate for your run" in (tmp_path / "report.md").read_text()


def test_with_the_users_lr_a_long_run_keeps_the_races_answer():
    # (without a horizon: tests/test_race.py's tune test checks that no ladder runs)
    result = tune(mlp(), blobs(2000), time_budget=12, epochs=20000, lr=1e-3)
    assert result.race is not None and result.race.for_the_run is None
    assert not any(line.startswith("The lr for your run") for line in result.decision)


def test_tune_to_a_held_out_loss_the_race_did_not_reach_measures_the_lr_that_gets_there():
    result = tune(mlp(), blobs(2000), target="val_loss=0.0001", time_budget=30)
    raced = result.race
    assert raced is not None
    found = raced.for_the_run
    assert found is not None, (raced.notes, result.skipped)
    assert found.run_steps is None and result.recommended.lr == found.lr <= raced.winner.lr
    assert any("your run: to its target" in line for line in result.decision)

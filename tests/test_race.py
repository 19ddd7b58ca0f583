"""The race of short training runs that decides tune's batch size and learning rate: its judge
(pure numbers), its runs (real training, equal training time, the model given back) and its place
in tune (the answer, the report, a budget too small for it)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from batchfit.core import race as judge
from batchfit.core.lr_scaling import scale_lr
from batchfit.inputs import as_source, loss_for
from batchfit.orchestrate import race_plan, tune_race
from batchfit.orchestrate.tune import tune
from batchfit.probe import race as race_probe
from batchfit.probe.harness import Deadline, OutOfTime
from batchfit.probe.machine import check_machine, usable_cores
from batchfit.probe.race import Contender, RaceSettings, race
from batchfit.report.tune_race_report import batch_size_range
from batchfit.report.tune_report import headline
from batchfit.step import params_sha256
from helpers import blobs, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


# -- the judge ------------------------------------------------------------------------------------


def test_one_lucky_evaluation_does_not_win_the_race():
    steady = [(0.0, 1.0)] + [(t / 10, 1.0 - 0.07 * t) for t in range(1, 11)]
    lucky = [(0.0, 1.0), (0.1, 0.85), (0.2, 0.85), (0.3, 0.1)]
    lucky += [(t / 10, 0.85) for t in range(4, 11)]
    level = judge.level_of([steady, lucky])
    ranked = judge.standings([[lucky], [steady]], level)
    assert ranked[0].lane == 1 and ranked[1].relative_time > 1


def test_a_contender_fast_with_one_data_order_only_ranks_after_one_fast_with_both():
    good = [(0.0, 1.0), (1.0, 0.3), (2.0, 0.2), (3.0, 0.2)]
    never = [(0.0, 1.0), (1.0, 0.9), (2.0, 0.9), (3.0, 0.9)]
    fast_once = [[good], [never]]  # a sharp lr: fine with one order, stuck with the other
    both = [[good], [good]]
    level = judge.level_of([good, never])
    ranked = judge.standings([fast_once[0] + fast_once[1], both[0] + both[1]], level)
    assert [s.lane for s in ranked] == [1, 0] and math.isinf(ranked[1].seconds_to_level)


def test_the_level_is_near_the_best_on_a_log_scale_or_linear_for_negative_losses():
    curves = [[(0.0, 10.0), (1.0, 1.0)], [(0.0, 10.0), (1.0, 5.0)]]
    assert judge.level_of(curves) == pytest.approx(10**0.2)
    huge_start = [[(0.0, 1e4), (1.0, 1.0)]]
    assert judge.level_of(huge_start) == pytest.approx(judge.LEVEL_AT_MOST)
    negative = [[(0.0, 1.0), (1.0, -3.0)]]
    assert judge.level_of(negative) == pytest.approx(-3.0 + 0.2 * 4.0)


def test_overfitting_keeps_the_best_it_reached():
    curve = [(0.0, 2.0), (1.0, 0.5), (2.0, 0.5), (3.0, 1.5), (4.0, 1.5), (5.0, 1.5)]
    assert judge.best_so_far(curve)[-1][1] == pytest.approx(0.5)
    assert not judge.still_improving(curve, 5.0)


@given(
    center=st.integers(1, 5000),
    smallest=st.integers(1, 4),
    largest=st.integers(4, 10000),
    knee=st.floats(0.0, 5000.0),
)
def test_the_batch_sizes_raced_surround_the_prediction_within_the_limits(
    center, smallest, largest, knee
):
    sizes = race_plan.batch_sizes_around(center, smallest, largest, knee)
    assert sizes == sorted(set(sizes))
    assert all(smallest <= s <= largest for s in sizes)
    assert min(center, largest) in sizes or min(center, largest) < smallest
    assert len(sizes) >= race_plan.SIZES_RACED or not sizes or min(sizes) // 2 < smallest


def test_the_screening_horizon_fits_the_time_and_gives_the_slowest_size_enough_steps():
    assert race_plan.first_horizon(0.01, [0.5], lanes=5, sizes=1) == pytest.approx(
        race_plan.MIN_STEPS * 0.5
    )
    horizon = race_plan.first_horizon(100.0, [0.001, 0.004], lanes=10, sizes=2)
    # screening, then per size two survivors and the lr between them, two orders each, over 3H
    rounds = (10 + 2) * horizon + 2 * 3 * 2 * 3 * horizon
    assert rounds * race_plan.WALL_PER_TRAINING_SECOND == pytest.approx(100.0)


def test_a_race_too_large_for_the_time_left_is_shrunk_not_skipped():
    times = {64: 0.01, 128: 0.02, 256: 0.04, 512: 0.08}
    sizes = list(times)
    assert race_plan.shrunk_to_fit(sizes, 5, times, 1e4, keep=512)[:2] == (sizes, 5)
    # Less time: the middle three learning rates first, then without the slowest sizes other
    # than the prediction (keep), then one learning rate; None only when not even that fits.
    plans = {s: race_plan.shrunk_to_fit(sizes, 5, times, s, keep=512) for s in (40, 20, 8, 6, 3)}
    assert {s: p[:2] for s, p in plans.items()} == {
        40: (sizes, 3),
        20: ([64, 512], 3),
        8: ([512], 3),
        6: ([64, 512], 1),
        3: ([512], 1),
    }
    for seconds, (kept, count, horizon) in plans.items():
        assert horizon >= race_plan.MIN_STEPS * times[512]  # the slowest still takes its steps
        screening = horizon * len(kept) * count  # training seconds of the first round
        assert screening * race_plan.WALL_PER_TRAINING_SECOND <= seconds
    assert race_plan.shrunk_to_fit(sizes, 5, times, 2.0, keep=512) is None


def test_a_shrunk_race_says_what_it_left_out_and_the_option_that_races_them_all():
    grid = {s: [Contender(s, lr, s) for lr in (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)] for s in (8, 16)}
    assert tune_race._shrunk_note(grid, [8, 16], 5, 5) is None
    note = tune_race._shrunk_note(grid, [8], 3, 5)
    assert note == (
        "The race was shrunk to fit the time left (batch sizes 16 not raced; 3 of 5 learning "
        "rates per size); a larger 'time_budget' races them all."
    )
    assert [c.lr for c in tune_race._middle(grid[8], 3)] == [2e-3, 4e-3, 8e-3]
    assert [c.lr for c in tune_race._middle(grid[8], 1)] == [4e-3]


# -- the runs ------------------------------------------------------------------------------------


def _race(model, deadline_s=60.0, grid=None, seed=0):
    x, y = blobs(600)
    train, held_out = as_source((x[:480], y[:480]), seed=seed), as_source((x[480:], y[480:]))
    grid = grid or {
        16: [Contender(16, 1e-5, 16), Contender(16, 3e-2, 16)],
        64: [Contender(64, 1e-5, 64), Contender(64, 3e-2, 64)],
    }
    settings = RaceSettings(
        grid, {16: 0.001, 64: 0.002}, optimizer="adam", first_horizon_s=0.2, seed=seed
    )
    loss = loss_for(train, None)
    return race(model, train, held_out, loss, settings, deadline=Deadline(deadline_s))


def test_the_race_finds_a_learning_rate_that_learns_and_gives_the_model_back():
    model = mlp()
    sha = params_sha256(model)
    result = _race(model)
    assert params_sha256(model) == sha
    assert result.winner.lr == 3e-2  # 1e-5 barely moves in the time given
    slow = [relative for contender, relative in result.finalists if contender.lr == 1e-5]
    assert slow and all(relative > 1.5 for relative in slow)


def test_every_run_gets_the_same_training_time_and_the_race_is_deterministic():
    first, second = _race(mlp()), _race(mlp())
    assert [r.lanes for r in first.rounds] == [r.lanes for r in second.rounds]
    assert (first.winner, first.finalists) == (second.winner, second.finalists)
    lanes = {lane.contender.batch_size: lane for lane in first.rounds[0].lanes}
    assert lanes[16].steps == 2 * lanes[64].steps  # a step of 64 takes twice as long
    assert lanes[16].steps * 0.001 == pytest.approx(lanes[64].steps * 0.002)
    later = first.rounds[1:]
    assert later and all(len({lane.data_order for lane in r.lanes}) == 2 for r in later)


def test_the_stated_range_is_every_finalist_within_the_races_own_noise():
    result = _race(mlp())
    last = result.rounds[-1]
    groups = [[lane.curve for lane in last.lanes_of(c)] for c in last.contenders]
    assert result.order_spread == judge.order_spread(groups, last.level)
    tolerance = max(judge.EQUALLY_GOOD, result.order_spread or 0.0)
    assert set(result.within_noise) >= set(result.equally_good)
    assert set(result.within_noise) == {c for c, r in result.finalists if r <= 1 + tolerance}
    # the noise of a contender is its data orders' spread; one order alone measures none
    fast, slow = [(0.0, 1.0), (1.0, 0.4)], [(0.0, 1.0), (3.0, 0.4)]
    assert judge.order_spread([[fast, slow]], 0.4) == pytest.approx(1.0)
    assert judge.order_spread([[fast]], 0.4) is None
    # the report's range spans what the race cannot tell apart, wider than the 5% band
    race = {"equally_good": [{"batch_size": 64}], "within_noise": [{"batch_size": 32},
            {"batch_size": 64}, {"batch_size": 256}]}  # fmt: skip
    assert batch_size_range(race, [64, 64]) == [32, 256]
    assert batch_size_range({"equally_good": [{"batch_size": 64}]}, [8, 8]) == [64, 64]


class _FitsSixteen(torch.nn.Module):
    """Fails like an allocator on more than 16 samples at once: a memory ceiling of 16."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        if x.shape[0] > 16:
            torch.empty(2**60, dtype=torch.uint8)  # more than any machine has
        return self.net(x)


def test_a_batch_above_the_ceiling_races_and_is_judged_in_micro_batches_that_fit():
    grid = {
        16: [Contender(16, 3e-2, 16)],
        64: [Contender(64, 3e-2, 16)],  # 64 runs as four micro-batches of 16
    }
    result = _race(_FitsSixteen(), grid=grid)
    assert {lane.contender.batch_size for lane in result.rounds[0].lanes} == {16, 64}
    assert all(math.isfinite(loss) for lane in result.rounds[0].lanes for _, loss in lane.curve)


def test_a_race_without_time_is_out_of_time():
    with pytest.raises(OutOfTime):
        _race(mlp(), deadline_s=0.0)


def test_a_screening_cut_short_by_time_goes_on_with_the_sizes_it_screened(monkeypatch):
    real = race_probe.run_lane

    def out_of_time_at_64(field_, contender, horizon_s, data_order=0):  # a clock the test sets
        if contender.batch_size == 64 and data_order == 0 and horizon_s == field_.first_horizon_s:
            raise OutOfTime("its screening round ran out of time")
        return real(field_, contender, horizon_s, data_order)

    monkeypatch.setattr(race_probe, "run_lane", out_of_time_at_64)
    result = _race(mlp())
    assert {lane.contender.batch_size for lane in result.rounds[0].lanes} == {16}
    assert result.winner.batch_size == 16
    assert any("ran out of time before batch sizes 64" in note for note in result.notes)


# -- in tune -------------------------------------------------------------------------------------


def test_tune_answers_with_the_races_winner_and_reports_the_race(tmp_path):
    x, y = blobs(1200)
    val = blobs(300)
    result = tune(mlp(), (x, y), val_data=val, time_budget=25, out_dir=tmp_path)
    race_ = result.race
    assert race_ is not None
    rec = result.recommended
    assert (rec.batch_size, rec.lr) == (race_.winner.batch_size, race_.winner.lr)
    assert "short runs" in rec.lr_rule
    # no horizon given: no ladder of learning rates for a run's length after the race
    assert race_.for_the_run is None and report_has_no_ladder(result.decision)
    assert any(line.startswith("Race: ") for line in result.decision)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["race"]["winner"]["batch_size"] == rec.batch_size
    sizes = report["race"]["equally_good_batch_sizes"]
    assert report["recommended"]["batch_size_range"] == [min(sizes), max(sizes)]
    assert "machine" in report and "warnings" in report["machine"]
    assert (tmp_path / "race.png").exists() and "## The race" in (
        tmp_path / "report.md"
    ).read_text()
    if sizes[0] != sizes[-1]:
        assert f"{sizes[0]}-{sizes[-1]} equally good" in headline(report)


def report_has_no_ladder(decision) -> bool:
    return not any(line.startswith("The lr for your run") for line in decision)


def test_with_a_given_lr_the_race_chooses_the_batch_size_and_the_lr_stays_the_users_scaled():
    result = tune(mlp(), blobs(1200), lr=2e-3, lr_batch_size=32, time_budget=25)
    assert result.race is not None
    assert {lane.contender.lr for r in result.race.rounds for lane in r.lanes} == {
        float(f"{scale_lr(2e-3, 32, b, 'sqrt'):.4g}")
        for b in {lane.contender.batch_size for r in result.race.rounds for lane in r.lanes}
    }
    rec = result.recommended
    assert rec.batch_size == result.race.winner.batch_size
    assert rec.lr == scale_lr(2e-3, 32, rec.batch_size, "sqrt")
    assert rec.lr_rule == "adam, sqrt rule from 0.002 at 32"


def test_a_budget_too_small_for_the_race_keeps_the_prediction_and_says_so():
    result = tune(mlp(), blobs(4000), time_budget=3)
    assert result.race is None
    assert any(s.startswith("The race was not run: ") for s in result.skipped)
    assert result.recommended.batch_size == result.batch_size_choice.batch_size
    # Nothing trained the prediction, so the answer says it is provisional, and why.
    why = next(s for s in result.skipped if s.startswith("The race was not run: "))
    assert result.provisional and why in result.provisional_reasons
    assert result.to_report()["recommended"]["provisional"] == result.provisional_reasons
    assert "the race did not run, so nothing confirmed it" in headline(result.to_report())


def test_data_too_small_to_hold_out_for_the_race_makes_the_answer_provisional_with_the_reason():
    result = tune(mlp(), blobs(100), lr=1e-3, time_budget=20)
    assert result.race is None
    assert result.provisional_reasons == [
        "The race was not run: 100 samples are too few to hold 32 out for judging."
    ]
    assert headline(result.to_report()).startswith(
        "PROVISIONAL (the race did not run, so nothing confirmed it) batch size "
    )


# -- a machine unfit for timing ------------------------------------------------------------------


def _cpu_hogs():
    """One busy process per usable core, and one more, at the lowest priority: the CPU counts as
    busy, yet the suite's other tests (and the tune under test) are served first."""
    code = "while True: pass"
    return [
        subprocess.Popen([sys.executable, "-c", code], preexec_fn=lambda: os.nice(19))
        for _ in range(usable_cores() + 1)
    ]


def test_more_torch_threads_than_cores_is_named_with_the_fix():
    before = torch.get_num_threads()
    torch.set_num_threads(usable_cores() + 2)
    try:
        warnings = check_machine(torch.device("cpu")).warnings
    finally:
        torch.set_num_threads(before)
    assert any(f"OMP_NUM_THREADS={usable_cores()}" in w for w in warnings)


def test_tune_beside_a_cpu_hog_says_so_in_its_first_lines(tmp_path):
    hogs = _cpu_hogs()
    try:
        time.sleep(0.5)
        check = check_machine(torch.device("cpu"))
        done = run_cli(["tune", "--time-budget", "10", "--quiet", "--out", str(tmp_path)])
    finally:
        for hog in hogs:
            hog.kill()
    assert any("machine is idle" in w for w in check.warnings)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and lines[0].startswith("batchfit tune: ")
    assert lines[1].strip().startswith("warning:") and "idle" in " ".join(lines[1:4])


def test_of_equally_fast_contenders_the_one_furthest_from_instability_wins():
    from batchfit.probe.race import Lane, RaceRound, _result

    bold, calm, slow = (
        Contender(256, 0.0169, 256),
        Contender(512, 0.0119, 512),
        Contender(64, 1e-3, 64),
    )
    curve = ((0.0, 1.0), (1.0, 0.5))
    lanes = tuple(Lane(c, 0.001, 1.0, 1000, curve) for c in (bold, calm, slow))
    standings = (
        judge.Standing(0, 1.00, 0.5, 1.00),
        judge.Standing(1, 1.01, 0.5, 1.01),  # within 5%: as fast, and a calmer lr for its size
        judge.Standing(2, 1.50, 0.5, 1.50),
    )
    last = RaceRound("round 2", 1.0, (bold, calm, slow), lanes, 0.6, standings, (0, 1))
    result = _result([last], [], 1.0, lr_power=0.5)
    assert result.winner == calm and set(result.equally_good) == {bold, calm}
    assert _result([last], [], 1.0, lr_power=0.0).winner == calm  # lower lr outright, too


def test_when_every_run_diverges_the_leader_still_stands_first_and_wins():
    from batchfit.probe.race import Lane, RaceRound, _result

    worse = [(0.0, 1.0), (1.0, 5.0), (2.0, math.nan)]  # the initial loss is the best it had
    level = judge.level_for([[worse], [worse]])
    ranked = judge.standings([[worse], [worse]], level)
    assert [s.relative_time for s in ranked] == [1.0, 1.0]
    calm, bold = Contender(32, 1.0, 32), Contender(32, 100.0, 32)
    lanes = tuple(Lane(c, 0.001, 1.0, 1000, tuple(worse)) for c in (calm, bold))
    last = RaceRound("screening", 1.0, (calm, bold), lanes, level, tuple(ranked), (0, 1))
    assert _result([last], [], 1.0, lr_power=0.5).winner == calm
    never = [judge.Standing(0, math.inf, 5.0, math.inf), judge.Standing(1, math.inf, 6.0, math.inf)]
    last = RaceRound("screening", 1.0, (bold, calm), lanes, level, tuple(never), (0, 1))
    assert _result([last], [], 1.0, lr_power=0.5).winner == bold  # nobody finished: the best loss


def test_a_round_after_the_last_comes_back_as_a_value_and_the_rounds_given_stay_as_they_were():
    from batchfit.probe.race import Lane, RaceRound, _Field, _longer_rounds, _next_round

    calm, bold = Contender(32, 1e-3, 32), Contender(32, 2e-3, 32)
    curve = ((0.0, 1.0), (1.0, 0.5))
    lanes = tuple(Lane(c, 0.001, 1.0, 1000, curve) for c in (calm, bold))
    ranked = (judge.Standing(0, 1.0, 0.5, 1.0), judge.Standing(1, 1.1, 0.5, 1.1))
    decided = RaceRound("screening", 1.0, (calm, bold), lanes, 0.6, ranked, (0,))
    assert _next_round(None, [decided]) is None  # one survivor: nothing to race
    no_time = _Field(None, {}, None, None, None, "adam", {32: 0.001}, Deadline(0), 0, 1.0)
    screening = replace(decided, kept=(0, 1))
    rounds = [screening]
    note = _next_round(no_time, rounds)
    assert note == (
        "The race stopped after round 1 (1 s of training per run): a longer round did not fit "
        "in the time budget."
    )
    assert rounds == [screening]
    assert _longer_rounds(no_time, screening, lambda _: None) == ([], [note])

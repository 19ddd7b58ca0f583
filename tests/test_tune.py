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
from batchfit.core import budget_clock
from batchfit.core.configs import TuneConfig
from batchfit.core.lr_scaling import scale_lr
from batchfit.core.options import named_as_flags
from batchfit.errors import BatchfitError
from batchfit.orchestrate.tune import tune  # the function; batchfit.tune is also the module
from batchfit.orchestrate.tune_budget import PHASE_SHARES, TimeBudget
from batchfit.probe.harness import Deadline
from batchfit.probe.lr_range import lr_range_test, pick_lr
from batchfit.probe.throughput import MAX_TIMED_STEPS, measure_throughput
from batchfit.report.tune_report import headline, write_report
from batchfit.step import params_sha256
from helpers import blobs, busy, run_cli

PLOTS = (
    "throughput.png",
    "time_to_result.png",
    "noise_scale.png",
    "gradient_error.png",
    "memory_and_step_time.png",
    "lr_range.png",
    "race.png",
)

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def batch_norm_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


class SlowAbove(nn.Module):
    """A model whose forward pass takes ``seconds`` of the budget's clock at batches of ``size``
    or more: time, not memory, ends the memory search there (a real slow model, not a stand-in
    for one; it computes rather than sleeps, so the suite's CPU clock counts it)."""

    def __init__(self, size: int, seconds: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp()
        self.size, self.seconds = size, seconds

    def forward(self, x):
        if len(x) >= self.size:
            busy(self.seconds)
        return self.net(x)


class ExplodesWhenArmed(nn.Module):
    """Asks the allocator for an exabyte once armed: a real out-of-memory error, on cue."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.armed = False

    def forward(self, x):
        if self.armed:
            torch.empty(2**60, dtype=torch.uint8)
        return self.net(x)


def test_throughput_is_measured_per_size_with_accumulation_above_the_ceiling():
    model = mlp()
    sha = params_sha256(model)
    result = measure_throughput(
        model,
        TensorSource(*blobs(512)),
        F.cross_entropy,
        [8, 32, 128],
        max_micro_batch_size=32,
        min_seconds=0,
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


def test_throughput_times_each_size_until_the_steps_add_up_to_a_minimum():
    result = measure_throughput(
        mlp(), TensorSource(*blobs(512)), F.cross_entropy, [8, 64], min_seconds=0.02
    )
    for p in result.points:
        # Millisecond steps: far more than the 5 steps that a scheduler tick could distort.
        assert p.timed_steps > 5
        assert p.timed_steps == MAX_TIMED_STEPS or p.timed_steps * p.step_seconds_max >= 0.02


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
    assert pick_lr([1e-3, 1e-2, 1e-1, 1.0], [2.0, math.inf, 1.0, 5.0], settle=0)[:2] == (0.1, 0.01)
    with pytest.raises(BatchfitError, match="at least 3 steps"):
        lr_range_test(model, TensorSource(*blobs(64)), F.cross_entropy, batch_size=8, steps=2)


class ExpiresAfter(Deadline):
    """A deadline that expires after ``checks`` looks at it: a budget stop at a chosen step,
    whatever the machine's speed."""

    def __init__(self, checks: int) -> None:
        super().__init__(None)
        self.left = checks

    def expired(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_a_range_test_stopped_by_the_budget_says_so_not_that_the_loss_did_not_fall():
    result = lr_range_test(
        mlp(), TensorSource(*blobs(512)), F.cross_entropy, batch_size=32, steps=60,
        deadline=ExpiresAfter(5),
    )  # fmt: skip
    assert result.stopped_by == "time budget" and len(result.lrs) == 6  # 5 checks passed
    assert result.pick is None
    assert result.verdict == (
        f"inconclusive: the time budget stopped it at lr {result.lrs[-1]:.2g}, after 6 of 60 "
        "steps, before it could tell"
    )


LRS = [1e-6 * 10 ** (i / 4) for i in range(25)]  # 1e-6 .. 1


@pytest.mark.parametrize(
    ("losses", "verdict"),
    [
        # The first steps' average has not settled: a lucky first batch is no minimum.
        ([0.5] + [2.0] * 12 + [1.5, 1.0, 0.8, 1.2, 9.0] + [20.0] * 7, "lowest smoothed loss"),
        # Lowest where the search starts: the loss never fell.
        ([2.0] * 10 + [2.1 + i / 10 for i in range(15)], "did not fall"),
        # Lowest at the largest lr tried: still falling when the range ran out.
        ([2.0] * 10 + [2.0 - i / 10 for i in range(15)], "still falling at the largest lr"),
        # A dip within the noise is not a minimum either.
        ([2.0] * 10 + [1.96, 1.95, 1.97] + [2.0] * 12, "did not fall by 5%"),
    ],
)
def test_an_lr_range_minimum_at_either_end_or_in_the_noise_is_inconclusive(losses, verdict):
    at_min, pick, why = pick_lr(LRS, losses)
    assert verdict in why
    if verdict == "lowest smoothed loss":
        assert at_min == LRS[15] and pick == pytest.approx(LRS[15] / 10)
    else:
        assert pick is None and why.startswith("inconclusive")


def test_an_inconclusive_range_test_falls_back_to_the_rule_scaled_default():
    # 11 samples: the loss falls all the way to lr 1, where the old pick gave Adam lr 0.1.
    result = tune(mlp(), blobs(11), time_budget=20)
    assert result.lr_range is not None and result.lr_range.pick is None
    b = result.recommended.batch_size
    assert result.recommended.lr == scale_lr(1e-3, 32, b, "sqrt")
    assert "sqrt rule from the default 0.001 at 32" in result.recommended.lr_rule
    assert any("range test" in d and "inconclusive" in d for d in result.decision)


def test_tune_api_recommends_writes_the_report_and_restores_the_model(tmp_path):
    model = mlp()
    sha = params_sha256(model)
    rng = torch.get_rng_state()
    result = tune(model, blobs(1000), time_budget=30, out_dir=tmp_path, seed=1)
    assert params_sha256(model) == sha
    assert torch.equal(torch.get_rng_state(), rng)  # tune seeds its own run, not the caller's
    rec = result.recommended
    assert (
        1 <= rec.batch_size <= 1000 and rec.micro_batch_size <= result.memory.max_micro_batch_size
    )
    # The race decides, around the range test's pick at the predicted batch size.
    race, pick = result.race, result.lr_range.pick
    assert race is not None and (rec.batch_size, rec.lr) == (race.winner.batch_size, race.winner.lr)
    screened = {(lane.contender.batch_size, lane.contender.lr) for lane in race.rounds[0].lanes}
    assert (result.lr_range.batch_size, float(f"{pick:.4g}")) in screened
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


def test_a_batch_norm_model_never_trains_on_one_sample():
    # Every probe used to start at batch size 1: batch norm then raised a ValueError.
    model = batch_norm_mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = tune(model, blobs(1025), lr=1e-3, time_budget=20)
    # ...and its running statistics, like its weights, are as before (every probe restores them)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert model.training and all(p.grad is None for p in model.parameters())
    assert min(p.batch_size for p in result.throughput.points) == 2
    assert min(t.micro_batch_size for t in result.memory.trials) == 2
    assert result.noise is not None and result.noise.estimate.small_batch_size >= 2
    assert all(p.batch_size >= 2 for p in result.noise.gradient_error)
    assert result.recommended.micro_batch_size >= 2


def test_a_budget_start_up_used_up_counts_from_its_end_and_one_too_short_is_refused():
    # the user already waited for start-up: the budget then counts from its end, and says so
    result = tune(mlp(), blobs(100), lr=1e-3, time_budget=5, budget_started=budget_clock.now() - 6)
    note = [line for line in result.decision if line.startswith("Start-up")]
    assert len(note) == 1 and "took 6." in note[0] and "of the 5 s time budget" in note[0], note
    assert "counts from the end of start-up instead" in note[0]
    assert result.memory.trials and result.throughput.points  # it measured
    said: list[str] = []
    tune(mlp(), blobs(100), lr=1e-3, time_budget=5, log=said.append)
    assert not any("Start-up" in line for line in said)  # no note when start-up was quick
    with pytest.raises(BatchfitError, match="tuning needs at least 2 s. Give time_budget="):
        tune(mlp(), blobs(100), time_budget=1.5)


def test_a_memory_search_cut_short_by_time_makes_a_provisional_recommendation():
    # Each forward at 64 samples or more takes 1 s: the memory phase's share of a 5 s budget
    # ends the search there, after the guaranteed doublings 1 .. 32.
    model = SlowAbove(64, 1.0)
    result = tune(model, blobs(4000), time_budget=5, lr=1e-3)
    memory = result.memory
    assert memory.capped_by == "time budget"
    assert [t.micro_batch_size for t in memory.trials][:6] == [1, 2, 4, 8, 16, 32]
    assert result.provisional and "PROVISIONAL" in headline(result.to_report())
    # Nothing above the sizes measured is assumed (it used to be taken as flat throughput).
    measured = [p.batch_size for p in result.throughput.points]
    assert all(c.measured for c in result.batch_size_choice.curve)
    assert result.recommended.batch_size in measured and result.recommended.batch_size > 1
    assert any(d.startswith("Provisional: the time budget ended the memory search") for d in
               result.decision)  # fmt: skip


def test_the_report_is_written_from_plain_json_data(tmp_path):
    result = tune(mlp(), blobs(300), lr=1e-3, time_budget=8, out_dir=tmp_path / "tune")
    plain = json.loads(json.dumps({**result.to_dict(), "report_files": [], "report": None}))
    report, files = write_report(plain, tmp_path / "again")
    assert json.dumps(report) == json.dumps(result.report)
    assert [f.name for f in files] == [os.path.basename(f) for f in result.report_files]
    for name in ("report.json", "report.md"):
        assert (tmp_path / "again" / name).read_text() == (tmp_path / "tune" / name).read_text()


def test_the_decision_names_options_from_python_and_flags_on_the_command_line():
    config = TuneConfig.build(lr=1e-3, max_batch_size=16, time_budget=8)
    python = tune(mlp(), blobs(300), config=config).decision
    assert any("'max_batch_size' capped the search" in d for d in python)
    assert "Batch sizes considered: up to 16 ('max_batch_size')." in python
    with named_as_flags({"max_batch_size": "--max-batch-size"}):
        cli = tune(mlp(), blobs(300), config=config).decision
    assert any("--max-batch-size capped the search" in d for d in cli)
    assert "Batch sizes considered: up to 16 (--max-batch-size)." in cli


def test_tune_takes_a_config_and_options_on_top_of_it():
    with pytest.raises(TypeError, match="unknown option 'time_budgt'; did you mean 'time_budget'"):
        tune(mlp(), blobs(100), time_budgt=5)
    config = TuneConfig.build(lr=1e-3, time_budget=0.5)
    with pytest.raises(BatchfitError, match="tuning needs at least 2 s"):
        tune(mlp(), blobs(100), config=config)  # the config's budget: too short
    result = tune(mlp(), blobs(300), config=config, time_budget=8, max_batch_size=64)
    assert result.time_budget_s == 8 and result.recommended.batch_size <= 64


def test_with_a_given_lr_the_noise_probe_and_the_race_share_the_range_tests_time():
    budget = TimeBudget(100.0, budget_clock.now(), reserve=0.0, skipped=("lr",))
    budget.phase("memory")
    budget.phase("throughput")
    noise, race = PHASE_SHARES["noise"], PHASE_SHARES["race"]
    assert budget.phase("noise").remaining() == pytest.approx(
        100.0 * noise / (noise + race), abs=0.5
    )
    assert budget.phase("race").remaining() == pytest.approx(100.0, abs=0.5)
    assert set(PHASE_SHARES) == {"memory", "throughput", "noise", "lr", "race"}


def test_phases_spent_before_a_run_leave_no_share_and_a_skipped_one_goes_with_the_one_before():
    # Under torchrun, rank 0 goes on after every rank measured memory and noise together.
    shares = PHASE_SHARES
    after_ranks = TimeBudget(
        100.0, budget_clock.now(), 0.0, spent=("memory", "noise"), skipped=("lr",)
    )
    assert after_ranks.phase("throughput").remaining() == pytest.approx(
        100.0 * shares["throughput"] / (shares["throughput"] + shares["race"]), abs=0.5
    )
    # Each rank's memory search: the range test it skips still counts (noise has not begun).
    memory_only = TimeBudget(100.0, budget_clock.now(), 0.0, skipped=("lr",))
    assert memory_only.phase("memory").remaining() == pytest.approx(
        100.0 * shares["memory"], abs=0.5
    )
    # The joint noise probe, after the memory search: throughput and the race still to come.
    joint_noise = TimeBudget(100.0, budget_clock.now(), 0.0, spent=("memory",), skipped=("lr",))
    rest = shares["throughput"] + shares["noise"] + shares["race"]
    assert joint_noise.phase("noise").remaining() == pytest.approx(
        100.0 * shares["noise"] / rest, abs=0.5
    )
    with pytest.raises(KeyError):
        after_ranks.phase("noise")  # spent: its share was handed out once, before this run


@pytest.mark.parametrize("lr", [100.0, 1e30])
def test_a_diverging_warm_up_is_not_used_and_memory_and_throughput_stand(lr):
    result = tune(mlp(), blobs(2000), lr=lr, time_budget=20)
    assert result.noise is None and result.batch_size_choice.b_simple is None
    assert result.memory.max_micro_batch_size >= 32 and result.throughput.points
    assert any(
        "warm-up diverged at lr" in d and "give a smaller 'lr'" in d for d in result.decision
    )


@pytest.mark.parametrize("phase", ["noise:", "lr:"])
def test_running_out_of_memory_in_the_noise_or_lr_phase_skips_only_that_phase(phase):
    model = ExplodesWhenArmed()

    def arm(line: str) -> None:  # the progress lines announce each phase before it starts
        model.armed = line.startswith(phase)

    result = tune(model, blobs(1000), time_budget=20, log=arm)
    assert result.throughput.points and result.memory.max_micro_batch_size >= 32
    out_of_memory = [s for s in result.skipped if "ran out of memory" in s]
    assert len(out_of_memory) == 1 and "can't allocate memory" in out_of_memory[0]
    if phase == "noise:":
        assert result.noise is None and result.lr_range is not None
    else:
        assert result.noise is not None and result.lr_range is None
        # the race centres each size's learning rates on the default scaled by the sqrt rule
        # (the prediction itself may be above the largest size the training split can race),
        # and decides
        screened = [lane.contender for lane in result.race.rounds[0].lanes]
        centred = [
            c
            for c in screened
            if c.lr == pytest.approx(scale_lr(1e-3, 32, c.batch_size, "sqrt"), rel=1e-3)
        ]
        assert centred and result.recommended.lr == result.race.winner.lr
        assert {c.batch_size for c in centred} == {c.batch_size for c in screened}


def test_tune_refuses_bad_settings(tmp_path):
    with pytest.raises(BatchfitError, match="'time_budget' option"):
        tune(mlp(), blobs(100), time_budget=0)
    with pytest.raises(BatchfitError, match="'memory_limit' option"):
        tune(mlp(), blobs(100), memory_limit=10)
    with pytest.raises(BatchfitError, match="'lr_scaling' option"):
        tune(mlp(), blobs(100), lr_scaling="cubic")
    (tmp_path / "afile").write_text("")
    with pytest.raises(BatchfitError, match="'.*afile' is a file, not a folder"):
        tune(mlp(), blobs(100), out_dir=tmp_path / "afile")
    with pytest.raises(BatchfitError, match="Cannot create 'out_dir' '.*afile/report'"):
        tune(mlp(), blobs(100), out_dir=tmp_path / "afile" / "report")


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
            "30",  # room for every phase on a loaded machine (15 s once ran out on a GPU machine)
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
    # On the CPU the limit covers the whole process, so 100 MiB leaves no room.
    assert main(["tune", flag, value, "--device", "cpu", "--quiet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_cli_tune_json_is_the_report_on_disk_and_stale_files_are_removed(tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "lr_range.png").write_bytes(b"an earlier run's plot")
    (out / "notes.txt").write_text("the user's own file")
    argv = ["tune", "--example", "linreg", "--lr", "0.01", "--time-budget", "15", "--json"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "report.json").read_text())
    # With --lr there is no range test: its plot is neither listed nor left from before.
    assert "lr_range.png" not in printed["files"] and not (out / "lr_range.png").exists()
    assert all((out / name).stat().st_size > 0 for name in printed["files"])
    assert (out / "notes.txt").exists()


def test_a_failed_tune_leaves_no_earlier_report_looking_current(tmp_path, capsys):
    (tmp_path / "report.json").write_text('{"recommended": {"batch_size": 64}}')
    argv = ["tune", "--memory-limit", "100MiB", "--device", "cpu", "--quiet"]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert "leaves no room" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize(
    ("out", "message"),
    [("afile", "is a file, not a folder"), ("afile/report", "Cannot create --out")],
)
def test_cli_tune_bad_out_is_one_line_before_any_measuring(out, message, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["tune", "--out", str(tmp_path / out)]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and message in captured.err
    assert "memory:" not in captured.err  # refused before the first probe


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_cli_tune_measures_on_all_of_the_data(stream, tmp_path, models_file, blobs_parquet, capsys):
    argv = ["tune", "--model", f"{models_file}:mlp", "--data", str(blobs_parquet), *stream]
    argv += ["--lr", "1e-3", "--time-budget", "10", "--json", "--quiet", "--out", str(tmp_path)]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["num_samples"] in (300, None)  # no 10% held out for a validation never used
    assert report["memory"]["max_micro_batch_size"] >= 32

"""The sweep's pure arithmetic: targets, budgets, trends, the verdict (plain numbers, no torch)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchfit.core.accounting import plan
from batchfit.core.options import named_as_flags
from batchfit.core.sweep_claims import (
    FULL_BATCH_MIN_STEPS,
    check_claims,
    full_batch_claim,
    sizes_claim,
    spearman,
)
from batchfit.core.sweep_inputs import (
    DEFAULT_LR_GRID,
    Target,
    auto_target,
    parse_batch_sizes,
    parse_lr_grid,
    parse_target,
    steps_for_examples,
)
from batchfit.core.sweep_records import (
    Divergence,
    SizeSummary,
    TimeToTarget,
    best_point,
    format_seconds,
    time_to_target,
)
from batchfit.core.sweep_tune_check import Recommendation, compare_with_tune
from batchfit.core.sweep_verdict import verdict
from batchfit.errors import BatchfitError


def curve(values, metric="val_accuracy", every=10, batch=32, seconds=0.1):
    return [
        {
            "step": i * every,
            "samples_seen": i * every * batch,
            "train_seconds": i * seconds,
            metric: v,
        }
        for i, v in enumerate(values)
    ]


def test_target_parses_metric_and_direction():
    acc = parse_target("val_accuracy=0.9")
    loss = parse_target(" val_loss = 0.25 ")
    assert (acc.metric, acc.value, acc.higher_is_better, acc.source) == (
        "val_accuracy",
        0.9,
        True,
        "given",
    )
    assert (loss.metric, loss.value, loss.higher_is_better) == ("val_loss", 0.25, False)
    assert acc.reached(0.9) and not acc.reached(0.89) and not acc.reached(None)
    assert loss.reached(0.2) and not loss.reached(0.3) and not loss.reached(math.nan)


@pytest.mark.parametrize(
    ("text", "metrics", "message"),
    [
        ("val_accuracy", None, "'target_level' must be METRIC=VALUE, got 'val_accuracy'"),
        ("=0.9", None, "'target_level' must be METRIC=VALUE"),
        ("val_accuracy=", None, "'target_level' must be METRIC=VALUE"),
        (
            "accuracy=0.9",
            None,
            "Unknown metric 'accuracy' in target_level='accuracy=0.9'; use one of",
        ),
        ("val_acc=0.9", None, "Unknown metric 'val_acc'"),
        ("val_accuracy=high", None, "is not a number"),
        ("val_loss=inf", None, "must be finite"),
        ("val_accuracy=90", None, "must be a fraction in \\[0, 1\\], got 90"),
        ("val_accuracy=0.9", ("val_loss",), "val_accuracy .* is not measured for this task"),
    ],
)
def test_bad_targets_are_refused_with_the_fix(text, metrics, message):
    with pytest.raises(BatchfitError, match=message):
        parse_target(text, metrics) if metrics else parse_target(text)


def test_time_to_target_is_the_first_evaluation_that_meets_it():
    points = curve([0.1, 0.5, 0.91, 0.85, 0.95])
    assert time_to_target(points, parse_target("val_accuracy=0.9")).to_dict() == {
        "reached": True,
        "steps": 20,
        "samples_seen": 640,
        "seconds": 0.2,
    }
    assert time_to_target(points, parse_target("val_accuracy=0.99")).reached is False
    losses = curve([2.3, 0.9, 0.4, 0.6], metric="val_loss")
    assert time_to_target(losses, parse_target("val_loss=0.5")).steps == 20


def test_best_point_takes_the_direction_of_the_metric_and_the_earliest_tie():
    assert best_point(curve([0.1, 0.8, 0.8, 0.7]), "val_accuracy")["step"] == 10
    assert best_point(curve([2.0, 0.5, 0.7], metric="val_loss"), "val_loss")["value"] == 0.5
    assert best_point([], "val_loss") is None


def test_auto_target_is_ninety_percent_of_the_best_improvement_in_either_direction():
    assert auto_target("val_accuracy", 0.1, 0.9).value == pytest.approx(0.82)
    low = auto_target("val_loss", 2.3, 0.3)
    assert (low.value, low.higher_is_better, low.source) == (0.5, False, "auto")


@given(
    samples=st.integers(1, 5000),
    data=st.data(),
)
def test_equal_examples_budget_overshoots_by_less_than_one_batch(samples, data):
    batch = data.draw(st.integers(1, samples))
    examples = data.draw(st.integers(1, 20 * samples))
    steps = steps_for_examples(examples, samples, batch)
    seen = plan(samples, batch, max_steps=steps).total_samples
    assert examples <= seen < examples + batch


def test_batch_sizes_parse_sort_and_accept_n_for_full_batch():
    assert parse_batch_sizes("256,32, 1,N", 4000) == [1, 32, 256, 4000]
    assert parse_batch_sizes("full", 100) == [100]
    assert parse_batch_sizes([64, 8], 100) == [8, 64]


@pytest.mark.parametrize(
    ("text", "samples", "message"),
    [
        ("", 100, "'batch_sizes' is empty"),
        (" , ", 100, "'batch_sizes' is empty"),
        ("32,0", 100, "'batch_size' option must be an int >= 1. Got 0"),
        ("32,abc", 100, "Got 'abc' instead. Give 'batch_sizes' as whole numbers"),
        ("3.5", 100, "Got '3.5'"),
        ("32,64,32", 100, "Batch size 32 appears more than once"),
        ("32,500", 100, "Batch size 500 is larger than the training set \\(100 samples\\); use N"),
        ("N", None, "needs data of known length"),
    ],
)
def test_bad_batch_size_lists_are_refused(text, samples, message):
    with pytest.raises(BatchfitError, match=message):
        parse_batch_sizes(text, samples)


def test_lr_grid_defaults_and_always_contains_the_scaled_rate():
    assert parse_lr_grid(None) is None
    assert parse_lr_grid("") == parse_lr_grid(True) == DEFAULT_LR_GRID
    assert parse_lr_grid("3, 0.3") == (0.3, 1.0, 3.0)
    with pytest.raises(BatchfitError, match="'lr_grid_factor' option must be a number > 0"):
        parse_lr_grid("1,0")
    with pytest.raises(BatchfitError, match="Got 'x' instead"):
        parse_lr_grid("x")


def test_spearman_matches_hand_computed_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties get average ranks: ys ranks 1, 2.5, 2.5, 4
    assert spearman([1, 2, 3, 4], [1, 5, 5, 9]) == pytest.approx(0.9486832980505)
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    assert spearman([1], [2]) is None


def size(b, best, gap_acc, sharp, seconds=None, lr=1e-3, **more):
    """A size summary as sweep.json holds it (``more`` adds or replaces keys), read as the
    verdict's record."""
    return SizeSummary.from_dict(
        {
            "batch_size": b,
            "lr": lr,
            "steps": 100,
            "curve": [],
            "best": {"value": best, "step": 100, "samples_seen": 3200, "seconds": 1.0},
            "gap": {"accuracy": gap_acc, "loss": gap_acc},
            "sharpness": {"eigenvalue": sharp, "iterations": 10, "converged": True},
            "time_to_target": {
                "reached": seconds is not None,
                "steps": 10 if seconds is not None else None,
                "samples_seen": 320 if seconds is not None else None,
                "seconds": seconds,
            },
            "diverged": None,
        }
        | more
    )


def test_claims_hold_reverse_or_show_no_trend():
    sizes = [
        size(32, 0.95, 0.01, 10, 2.0),
        size(64, 0.90, 0.03, 20, 1.0),
        size(128, 0.85, 0.05, 40, 0.5),
        size(256, 0.80, 0.02, 30, None),
    ]
    generalise, gap_claim, sharp_claim = check_claims(sizes, "val_accuracy", 1000)
    assert (generalise.outcome, generalise.rho) == ("holds", -1.0)
    assert gap_claim.outcome == "no clear trend" and gap_claim.rho == pytest.approx(0.4)
    assert sharp_claim.outcome == "holds" and sharp_claim.rho == pytest.approx(0.8)
    flipped = [size(b, 0.80 + 0.05 * i, 0.0, 40 - 10 * i) for i, b in enumerate((32, 64, 128))]
    generalise, _, sharp_claim = check_claims(flipped, "val_accuracy", 1000)
    assert generalise.outcome == "reversed" and sharp_claim.outcome == "reversed"


def test_small_accuracy_differences_are_called_within_noise_and_two_sizes_too_few():
    close = [size(32, 0.905, 0, 1), size(64, 0.900, 0, 2), size(128, 0.895, 0, 3)]
    assert check_claims(close, "val_accuracy", 1000)[0].outcome == "within noise"
    # the same spread on a 100,000-sample validation set is far above its sampling error
    assert check_claims(close, "val_accuracy", 100_000)[0].outcome == "holds"
    assert {c.outcome for c in check_claims(close[:2], "val_accuracy", 1000)} == {"too few sizes"}


def test_loss_metric_claims_expect_the_loss_to_rise_with_batch_size():
    sizes = [size(32, 0.3, 0, 1), size(64, 0.4, 0, 2), size(128, 0.5, 0, 3)]
    assert check_claims(sizes, "val_loss", None)[0].outcome == "holds"


def test_verdict_names_best_and_fastest_and_the_sizes_that_missed():
    sizes = [size(32, 0.95, 0, 1, 2.0), size(64, 0.93, 0, 2, 1.0), size(128, 0.85, 0, 3, None)]
    target = Target("val_accuracy", 0.9, True)
    answer = verdict(sizes, "val_accuracy", target, 1000)
    assert (answer.best_batch_size, answer.fastest_batch_size) == (32, 64)
    assert answer.fastest_seconds == 1.0 and answer.tune is None
    text = "\n".join(answer.lines)
    assert "Best validation: B=32" in text and "Fastest to val_accuracy >= 0.9: B=64" in text
    assert "Not reached by B=128" in text
    nobody = [size(32, 0.5, 0, 1), size(64, 0.4, 0, 1)]
    assert "No batch size reached" in verdict(nobody, "val_accuracy", target).lines[1]


def test_tune_agrees_within_the_design_factor_of_the_fastest():
    sizes = [
        size(32, 0.95, 0, 1, 2.0),
        size(64, 0.93, 0, 2, 1.0),
        size(128, 0.9, 0, 3, 1.2),
        size(256, 0.8, 0, 3, None),
    ]
    agree = compare_with_tune(sizes, 128, 0.002, 64, 1.0)
    assert agree.agrees and agree.seconds_ratio == 1.2 and agree.swept_batch_size == 128
    assert agree.reason.endswith("tune's lr 0.002; the sweep ran B=128 at lr 0.001.")
    slow = compare_with_tune(sizes, 32, None, 64, 1.0)
    assert not slow.agrees and slow.seconds_ratio == 2.0 and "disagrees" in slow.reason
    missed = compare_with_tune(sizes, 300, None, 64, 1.0)
    assert missed.swept_batch_size == 256 and not missed.agrees
    assert "not swept; nearest swept B=256" in missed.reason
    assert "did not reach the target" in missed.reason
    answer = verdict(
        sizes,
        "val_accuracy",
        Target("val_accuracy", 0.9, True),
        1000,
        Recommendation.from_dict({"batch_size": 100, "lr": 1e-3}),
    )
    assert answer.tune.swept_batch_size == 128 and answer.tune.agrees
    assert answer.lines[-1] == answer.tune.reason


def test_claim_lines_give_rho_once_and_the_table_detail_not_at_all():
    sizes = [size(32, 0.95, 0.01, 10), size(64, 0.90, 0.03, 20), size(128, 0.85, 0.05, 40)]
    claim = check_claims(sizes, "val_accuracy", 100_000)[0]
    assert "Spearman" not in claim.detail
    assert claim.describe().count("Spearman rho with batch size -1") == 1


def test_seconds_read_as_milliseconds_below_one_second():
    assert [format_seconds(s) for s in (0.0, 0.0042, 0.04, 0.5, 1.0, 61.2)] == [
        "0 ms",
        "4.2 ms",
        "40 ms",
        "500 ms",
        "1.00 s",
        "61.20 s",
    ]


def diverged(b, step=7, lr=1e-3):
    return size(  # looked great before it blew up
        b,
        0.99,
        0,
        1,
        0.01,
        lr=lr,
        diverged={"step": step, "reason": "the training loss became nan at step 7"},
        sharpness=None,
        gap={},
    )


def test_diverged_sizes_are_named_and_kept_out_of_best_fastest_and_claims():
    grid = [
        {"lr": 1e-3, "chosen": True, "diverged": None},
        {"lr": 4e-3, "chosen": False, "diverged": 12},
    ]
    sizes = [
        size(32, 0.95, 0.01, 10, 2.0),
        size(64, 0.90, 0.03, 20, 1.0, lr_grid=grid),
        diverged(128),
        size(256, 0.85, 0.05, 40, 1.5),
    ]
    answer = verdict(sizes, "val_accuracy", Target("val_accuracy", 0.9, True), 100_000)
    assert (answer.best_batch_size, answer.fastest_batch_size) == (32, 64)
    generalise, gap_claim, sharp_claim = answer.claims[:3]
    assert "B=128" not in generalise.detail and generalise.outcome == "holds"
    assert sharp_claim.outcome == "holds" and gap_claim.outcome == "holds"
    text = "\n".join(answer.lines)
    assert "B=128 diverged at every lr tried (lr 0.001; the training loss became nan" in text
    assert "At B=64, lr 0.004 (step 12) diverged; the grid kept lr 0.001." in text
    nobody = verdict([diverged(32)], "val_accuracy", Target("val_accuracy", 0.9, True))
    assert nobody.best_batch_size is None and nobody.fastest_batch_size is None
    assert "No batch size reached" in "\n".join(nobody.lines)


def test_the_verdict_warns_about_a_grid_edge_and_a_target_met_before_training():
    sizes = [size(32, 0.95, 0, 1, 0.0, lr_at_grid_edge=True), size(64, 0.93, 0, 2, 0.0)]
    answer = verdict(sizes, "val_accuracy", Target("val_accuracy", 0.5, True), initial=0.6)
    text = "\n".join(answer.lines)
    assert "met already at the initial weights (val_accuracy 0.6)" in text
    assert "The chosen lr is at the edge of the grid for B=32: widen 'lr_grid'" in text
    assert "in 0 ms of training" in text


def full_batch(values, steps=400, metric="val_accuracy", b=4000, **more):
    points = curve(values, metric=metric, every=steps // (len(values) - 1), batch=b)
    best = best_point(points, metric)
    never = {"reached": False, "steps": None, "samples_seen": None, "seconds": None}
    record = {"batch_size": b, "steps": steps, "curve": points, "best": best, "lr": 1e-3}
    return SizeSummary.from_dict(record | {"time_to_target": never} | more)


def test_full_batch_claim_reads_still_improving_stuck_or_level_from_the_curve():
    climbing = full_batch([0.1, 0.3, 0.45, 0.55, 0.6, 0.62, 0.65, 0.68, 0.7])
    small = [size(32, 0.9, 0, 1)]
    claim = full_batch_claim(climbing, small, "val_accuracy", 1000)
    assert claim.outcome == "cannot tell"
    assert "400 steps; val_accuracy 0.65 -> 0.7 over its last 3 evaluations (steps 300-400)" in (
        claim.detail
    )
    assert claim.detail.endswith(
        ": still improving at the end (gained 0.05, more than 5% of the run's 0.6): too few "
        "updates to tell"
    )
    stuck = full_batch([0.1, 0.5, 0.6, 0.62, 0.625, 0.625, 0.626, 0.625, 0.626])
    assert full_batch_claim(stuck, small, "val_accuracy", 1000).outcome == "holds"
    level = full_batch([0.1, 0.5, 0.8, 0.88, 0.895, 0.9, 0.9, 0.9, 0.9])
    assert full_batch_claim(level, small, "val_accuracy", 1000).outcome == "reversed"
    assert full_batch_claim(stuck, [], "val_accuracy", 1000).outcome == "plateaued"
    short = full_batch([0.1, 0.3])
    assert full_batch_claim(short, small, "val_accuracy", 1000).outcome == "too few evaluations"
    losses = full_batch([2.3, 1.0, 0.8, 0.79, 0.79], metric="val_loss")
    rival = [size(32, 0.3, 0, 1)]
    assert full_batch_claim(losses, rival, "val_loss").outcome == "holds"
    blew_up = replace(stuck, diverged=Divergence(9, "nan"))
    assert full_batch_claim(blew_up, small, "val_accuracy").outcome == "diverged"


def test_full_batch_claim_joins_the_verdict_only_when_full_batch_was_swept():
    values = [0.1, 0.5, 0.6, 0.62, 0.625, 0.625, 0.626, 0.625, 0.626]
    stuck = full_batch(values, b=400, gap={"accuracy": 0.0}, sharpness={"eigenvalue": 5.0})
    assert stuck.time_to_target == TimeToTarget(False)
    sizes = [size(32, 0.9, 0, 1, 1.0), stuck]
    target = Target("val_accuracy", 0.8, True)
    claims = [c.claim for c in verdict(sizes, "val_accuracy", target, 1000, samples=400).claims]
    assert "Full batch gets stuck in the first valley (B=400)" in claims
    claims = [c.claim for c in verdict(sizes, "val_accuracy", target, 1000, samples=800).claims]
    assert not any("Full batch" in c for c in claims)


def test_the_32_to_256_claim_checks_where_the_best_and_fastest_sizes_fall():
    assert sizes_claim([8, 32, 256], 32, 256).outcome == "holds"
    assert sizes_claim([8, 32, 256], 8, 256).outcome == "partly"
    assert sizes_claim([8, 32, 1024], 8, 1024).outcome == "does not hold"
    untested = sizes_claim([32, 64, 128, 256], 32, 256)
    assert untested.outcome == "not tested" and "add sizes outside it" in untested.detail
    assert "best B=8 outside, fastest B=256 inside" in sizes_claim([8, 256], 8, 256).detail


def test_tune_is_judged_on_its_own_run_when_there_is_one():
    sizes = [size(32, 0.95, 0, 1, 2.0), size(64, 0.93, 0, 2, 1.0), size(128, 0.9, 0, 3, None)]
    quick = size(128, 0.93, 0, 3, 1.2, lr=0.01)
    agree = compare_with_tune(sizes, 128, 0.01, 64, 1.0, tune_run=quick)
    assert agree.agrees and agree.seconds_ratio == 1.2 and agree.swept_lr == 0.01
    assert agree.reason.startswith("tune's B=128 at its lr 0.01 reached the target in 1.20 s")
    assert agree.reason.endswith("At the sweep's lr 0.001, B=128 did not reach it.")
    slow = compare_with_tune(sizes, 128, 0.01, 64, 1.0, tune_run=size(128, 0.9, 0, 3, 1.3))
    assert not slow.agrees and "disagrees" in slow.reason
    blew_up = compare_with_tune(sizes, 128, 0.01, 64, 1.0, tune_run=diverged(128))
    assert not blew_up.agrees and "diverged (step 7): disagrees" in blew_up.reason
    alone = compare_with_tune(sizes, 128, 0.01, None, None, tune_run=quick)
    assert alone.agrees and "no swept size did: agrees" in alone.reason
    no_lr = compare_with_tune(sizes, 64, None, 64, 1.0)
    assert no_lr.judged == "nearest swept size" and no_lr.agrees
    assert no_lr.reason.endswith("report.json gives no lr, so B=64 ran at the sweep's lr.")
    not_run = compare_with_tune(sizes, 5000, 0.01, 64, 1.0, not_run="It was too large.")
    assert not_run.swept_batch_size == 128 and not_run.reason.endswith("too large.")


def test_messages_name_options_from_python_and_flags_on_the_command_line():
    flags = {"target_level": "--target", "batch_sizes": "--batch-sizes", "lr_grid": "--lr-grid"}
    python = "Unknown metric 'f1' in target_level='f1=0.9'; .* \\(e.g. target_level='val_accuracy"
    with pytest.raises(BatchfitError, match=python):
        parse_target("f1=0.9")
    sizes = [size(32, 0.95, 0, 1, 0.0, lr_at_grid_edge=True), size(64, 0.93, 0, 2, 0.0)]
    target = Target("val_accuracy", 0.5, True)
    with named_as_flags(flags):
        with pytest.raises(BatchfitError, match="in --target f1=0.9; .* \\(e.g. --target val_acc"):
            parse_target("f1=0.9")
        with pytest.raises(BatchfitError, match="^--batch-sizes is empty"):
            parse_batch_sizes("", 100)
        lines = verdict(sizes, "val_accuracy", target, initial=0.6).lines
    assert "met already at the initial weights (val_accuracy 0.6)" in lines[0]
    assert lines[0].endswith("give a harder --target.")
    assert any(line.endswith("widen --lr-grid to be sure it is the best.") for line in lines)


def test_the_verdicts_json_keeps_the_keys_and_order_sweep_json_always_had():
    # sweep.json and --resume stay byte for byte the same although the verdict reads records.
    sizes = [size(32, 0.95, 0, 1, 2.0), size(64, 0.93, 0, 2, 1.0)]
    tune_run = diverged(64, lr=0.01)
    answer = verdict(
        sizes,
        "val_accuracy",
        Target("val_accuracy", 0.9, True),
        1000,
        Recommendation(64, 0.01),
        tune_run=tune_run,
    ).to_dict()
    assert list(answer) == [
        "best_batch_size",
        "best_value",
        "fastest_batch_size",
        "fastest_seconds",
        "claims",
        "tune",
        "lines",
    ]
    assert list(answer["claims"][0]) == ["claim", "outcome", "rho", "detail"]
    assert list(answer["tune"]) == [
        "recommended_batch_size",
        "recommended_lr",
        "judged",
        "swept_batch_size",
        "swept_lr",
        "seconds_to_target",
        "best",
        "diverged",
        "fastest_batch_size",
        "seconds_ratio",
        "agrees",
        "reason",
    ]
    assert answer["tune"]["diverged"] == {
        "step": 7,
        "reason": "the training loss became nan at step 7",
    }
    json.dumps(answer)  # plain JSON, nothing left as a record


def test_full_batch_claim_cannot_tell_from_a_short_run_or_a_curve_still_rising():
    # Issue 24: 10 full-batch steps with accuracy still rising on a small validation set read
    # "holds" (the rise was within the sampling error, so it counted as a plateau).
    rising = [0.1, 0.2, 0.3, 0.35, 0.4, 0.43, 0.46, 0.48, 0.5, 0.52, 0.54]
    small = [size(32, 0.9, 0, 1)]
    short = full_batch_claim(full_batch(rising, steps=10), small, "val_accuracy", 150)
    assert short.outcome == "cannot tell"
    assert f"only 10 steps; telling stuck from not yet converged takes {FULL_BATCH_MIN_STEPS}" in (
        short.detail
    )
    with named_as_flags({"epochs": "--epochs", "steps": "--steps"}):
        flagged = full_batch_claim(full_batch(rising, steps=10), small, "val_accuracy", 150)
    assert "(raise --epochs or --steps)" in flagged.detail
    # Enough steps, but the last quarter still rose (by less than the sampling error): the curve
    # cannot be told from a slow climb, so neither stuck nor level.
    long = full_batch(rising, steps=10 * FULL_BATCH_MIN_STEPS)
    slow = full_batch_claim(long, small, "val_accuracy", 150)
    assert slow.outcome == "cannot tell"
    assert "still rising" in slow.detail and "sampling error" in slow.detail
    assert "Full batch gets stuck in the first valley (B=4000)? cannot tell (" in slow.describe()


def test_the_readme_quotes_the_full_batch_verdict_as_the_sweep_writes_it():
    # README's built-in example: full batch on 4000 samples for 40 epochs makes 40 steps.
    points = curve([0.1, 0.5, 0.6, 0.609, 0.625], every=10, batch=4000)
    full = SizeSummary.from_dict(
        {
            "batch_size": 4000,
            "lr": 1e-3,
            "steps": 40,
            "curve": points,
            "best": best_point(points, "val_accuracy"),
            "time_to_target": TimeToTarget(False).to_dict(),
        }
    )
    with named_as_flags({"epochs": "--epochs", "steps": "--steps"}):
        said = full_batch_claim(full, [size(8, 0.909, 0, 1)], "val_accuracy", 1000).describe()
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert f'"{said[:-1]}"' in readme
    assert f"fewer than {FULL_BATCH_MIN_STEPS} steps" in readme

"""The pure recommender on synthetic throughput and noise curves."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchfit.core.options import named_as_flags
from batchfit.core.recommend import (
    fit_step_time,
    flattening_point,
    recommend,
    split_batch,
)
from batchfit.errors import BatchfitError

SIZES = [2**i for i in range(13)]  # 1 .. 4096


def saturating(knee: float, peak: float = 10_000.0):
    """Step time a + cB: samples/s rise, then approach ``peak``; half of it at ``knee``."""
    return [(b, peak * b / (b + knee)) for b in SIZES]


def test_linear_throughput_picks_the_largest_feasible_batch():
    linear = [(b, 50.0 * b) for b in SIZES]
    rec = recommend(linear, b_simple=300.0, max_micro_batch_size=4096, num_samples=100_000)
    assert rec.batch_size == 4096
    capped = recommend(
        linear, b_simple=300.0, max_micro_batch_size=4096, num_samples=100_000, max_batch_size=1000
    )
    assert capped.batch_size == 512  # the largest measured size within --max-batch-size


def test_flat_throughput_picks_the_smallest_batch_of_the_flat_region():
    rising_then_flat = [(b, 100.0 * min(b, 64)) for b in SIZES]
    rec = recommend(rising_then_flat, b_simple=50.0, max_micro_batch_size=4096, num_samples=50_000)
    assert rec.batch_size == 64
    assert rec.flattens_at == 64
    flat = [(b, 1000.0) for b in SIZES]
    assert recommend(flat, b_simple=50.0, max_micro_batch_size=4096).batch_size == 1


def test_a_larger_noise_scale_recommends_a_larger_batch():
    curve = saturating(knee=64)
    picks = [
        recommend(
            curve, b_simple=noise, max_micro_batch_size=4096, num_samples=1_000_000
        ).batch_size
        for noise in (4.0, 64.0, 1024.0, 16384.0)
    ]
    assert picks == sorted(picks) and picks[0] < picks[-1]
    # The optimum of (B + n)(a + cB)/B sits near sqrt(n a / c) (docs/design.md): sqrt(1024 * 64).
    assert picks[2] == 256


def test_an_unbounded_noise_scale_follows_throughput_alone():
    curve = [(b, s if b != 512 else 20_000.0) for b, s in saturating(knee=64)]
    rec = recommend(curve, b_simple=math.inf, max_micro_batch_size=4096)
    assert rec.batch_size == 512
    assert any("unbounded" in d for d in rec.decision)


def test_without_a_noise_scale_the_smallest_batch_near_peak_throughput_is_chosen():
    rec = recommend(saturating(knee=64), b_simple=None, max_micro_batch_size=4096)
    speeds = dict(saturating(knee=64))
    assert speeds[rec.batch_size] >= 0.9 * max(speeds.values())
    assert speeds[rec.batch_size // 2] < 0.9 * max(speeds.values())
    assert any("No gradient noise scale" in d for d in rec.decision)


def test_batches_above_the_memory_ceiling_are_accumulated_but_add_no_speed():
    measured = [(b, 10.0 * b) for b in SIZES if b <= 256]  # memory stops at 256, still linear
    rec = recommend(measured, b_simple=5000.0, max_micro_batch_size=256, num_samples=100_000)
    above = [c for c in rec.curve if c.batch_size > 256]
    assert above and all(not c.measured and c.accumulation > 1 for c in above)
    assert all(c.micro_batch_size <= 256 for c in rec.curve)
    assert all(c.micro_batch_size * c.accumulation >= c.batch_size for c in rec.curve)
    assert rec.batch_size == 256 and rec.accumulation == 1
    assert any("need accumulation, which adds no speed" in d for d in rec.decision)


def test_curve_runner_up_and_the_range_over_the_interval():
    rec = recommend(
        saturating(knee=64),
        b_simple=1024.0,
        max_micro_batch_size=4096,
        b_simple_interval=(256.0, 4096.0),
    )
    best = min(rec.curve, key=lambda c: c.relative_time)
    assert best.batch_size == rec.batch_size and best.relative_time == pytest.approx(1.0)
    assert rec.runner_up is not None and rec.runner_up.relative_time >= 1.0
    low, high = rec.batch_size_range
    assert low < rec.batch_size < high
    assert any("ranges from" in d for d in rec.decision)


@given(
    knee=st.floats(1, 2000),
    noise=st.floats(0, 1e5),
    ceiling=st.integers(1, 4096),
    cap=st.integers(1, 10_000),
)
def test_the_recommendation_is_always_feasible(knee, noise, ceiling, cap):
    curve = [(b, s) for b, s in saturating(knee) if b <= ceiling]
    rec = recommend(curve, b_simple=noise, max_micro_batch_size=ceiling, num_samples=cap)
    assert 1 <= rec.batch_size <= cap
    assert rec.micro_batch_size <= ceiling
    assert rec.micro_batch_size * rec.accumulation >= rec.batch_size


def test_flattening_point_ignores_an_early_dip():
    noisy = [(1, 100.0), (2, 101.0), (4, 300.0), (8, 600.0), (16, 630.0), (32, 610.0)]
    assert flattening_point(noisy) == 8


def test_step_time_fit_recovers_a_and_c():
    a, c = 2e-3, 5e-6
    fit = fit_step_time([(b, b / (a + c * b)) for b in SIZES])
    assert fit == pytest.approx((a, c), rel=1e-9)
    assert fit_step_time([(32, 100.0)]) is None


def test_split_batch_uses_the_fewest_even_micro_batches():
    assert split_batch(1000, 300) == (250, 4)
    assert split_batch(64, 64) == (64, 1)


def test_nothing_measured_is_refused():
    with pytest.raises(BatchfitError, match="No throughput was measured"):
        recommend([], b_simple=10.0, max_micro_batch_size=64)
    with pytest.raises(BatchfitError, match="at a batch size that fits"):
        recommend([(128, 10.0)], b_simple=10.0, max_micro_batch_size=64)


def test_a_memory_search_cut_short_by_time_assumes_nothing_above_the_sizes_measured():
    linear = [(b, 50.0 * b) for b in SIZES if b <= 32]
    cut = recommend(linear, b_simple=300.0, max_micro_batch_size=32, ceiling_is_final=False)
    assert [c.batch_size for c in cut.curve] == [1, 2, 4, 8, 16, 32]
    assert cut.batch_size == 32 and cut.provisional
    assert any(d.startswith("Provisional: the time budget ended the memory search") for d in
               cut.decision)  # fmt: skip
    # A ceiling the search really found: accumulation above it, at the ceiling's rate.
    found = recommend(linear, b_simple=300.0, max_micro_batch_size=32, num_samples=1000)
    assert not found.provisional and any(not c.measured for c in found.curve)


def test_throughput_cut_short_below_the_ceiling_is_provisional_too():
    measured = [(b, 50.0 * b) for b in SIZES if b <= 16]  # fits up to 1024; timed up to 16
    rec = recommend(measured, b_simple=300.0, max_micro_batch_size=1024, num_samples=4000)
    assert max(c.batch_size for c in rec.curve) == 16 and rec.batch_size == 16
    assert rec.provisional and "measured only up to batch size 16" in rec.provisional[0]


def test_batch_norm_sizes_that_would_make_a_one_sample_micro_batch_are_left_out():
    # Above a ceiling of 3, B = 16 would split 6 ways as 5 x 3 + 1.
    small = [(2, 200.0), (3, 300.0)]
    rec = recommend(small, b_simple=1e4, max_micro_batch_size=3, min_micro_batch_size=2)
    assert [c.batch_size for c in rec.curve] == [2, 3, 4, 8]
    assert any(d.startswith("Left out B=16: batch norm") for d in rec.decision)
    assert recommend(small, b_simple=1e4, max_micro_batch_size=3).curve[-1].batch_size == 16
    # An epoch of 4001 samples ends on one sample at B = 32: say how to train with it.
    curve = [(b, 100.0 * min(b, 32)) for b in SIZES if 2 <= b <= 64]
    rec = recommend(
        curve, b_simple=1.0, max_micro_batch_size=64, num_samples=4001, min_micro_batch_size=2
    )
    assert rec.batch_size == 32
    assert any(
        "ends on a batch of one sample at B=32" in d and "train with drop_last=True" in d
        for d in rec.decision
    )


def test_the_reasons_name_options_from_python_and_flags_on_the_command_line():
    linear = [(b, 50.0 * b) for b in SIZES if b <= 32]
    settings = {"b_simple": 300.0, "max_micro_batch_size": 32, "max_batch_size": 16}
    python = recommend(linear, ceiling_is_final=False, **settings).decision
    assert any(d.endswith("Give a larger 'time_budget' to measure them.") for d in python)
    assert "Batch sizes considered: up to 16 ('max_batch_size')." in python
    flags = {"time_budget": "--time-budget", "max_batch_size": "--max-batch-size"}
    with named_as_flags(flags):
        cli = recommend(linear, ceiling_is_final=False, **settings).decision
    assert any(d.endswith("Give a larger --time-budget to measure them.") for d in cli)
    assert "Batch sizes considered: up to 16 (--max-batch-size)." in cli

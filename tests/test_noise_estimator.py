"""The pure noise-scale estimator: exact on expected norms, unbiased on simulated draws from a
finite population, the finite-data correction, ratio of means, and its confidence interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchfit.core.noise_estimator import (
    estimate_noise_scale,
    expected_relative_error,
    unbiased_norms,
    variance_factor,
)
from batchfit.errors import BatchfitError


@given(
    g2=st.floats(0.01, 100),
    tr=st.floats(0.0, 1e4),
    small=st.integers(1, 64),
    ratio=st.integers(2, 16),
    n=st.one_of(st.none(), st.integers(2048, 100_000)),
)
def test_expected_norms_give_back_the_exact_terms(g2, tr, small, ratio, n):
    big = small * ratio
    small_sq = g2 + tr * variance_factor(small, n)
    big_sq = g2 + tr * variance_factor(big, n)
    got_g2, got_tr = unbiased_norms(small_sq, big_sq, small, big, n)
    assert got_g2 == pytest.approx(g2, rel=1e-6, abs=1e-6 * tr)
    assert got_tr == pytest.approx(tr, rel=1e-6, abs=1e-9)


def _population(n: int, dim: int, mean_norm: float, seed: int) -> np.ndarray:
    """``n`` per-sample gradients whose mean has norm ``mean_norm`` (float64)."""
    rng = np.random.default_rng(seed)
    grads = rng.standard_normal((n, dim))
    grads -= grads.mean(axis=0)
    direction = rng.standard_normal(dim)
    return grads + mean_norm * direction / np.linalg.norm(direction)


def _exact(pop: np.ndarray) -> float:
    """tr(Sigma) / |G|^2 of the population itself."""
    mean = pop.mean(axis=0)
    return float(((pop - mean) ** 2).sum(axis=1).mean() / (mean**2).sum())


def _draw_norms(pop: np.ndarray, small: int, k: int, steps: int, seed: int):
    """Batches of ``small * k`` drawn without replacement, as an epoch's shuffle does."""
    rng = np.random.default_rng(seed)
    small_sq, big_sq = [], []
    for _ in range(steps):
        batch = pop[rng.permutation(len(pop))[: small * k]].reshape(k, small, -1).mean(axis=1)
        small_sq.append(float((batch**2).sum(axis=1).mean()))
        big_sq.append(float((batch.mean(axis=0) ** 2).sum()))
    return small_sq, big_sq


def test_finite_data_correction_removes_the_late_training_bias():
    # Late in training |G|^2 is small next to tr(Sigma)/n: the regime docs/design.md warns about.
    n, small, k = 1000, 8, 32
    pop = _population(n, dim=20, mean_norm=0.25, seed=1)
    exact = _exact(pop)
    small_sq, big_sq = _draw_norms(pop, small, k, steps=3000, seed=2)
    corrected = estimate_noise_scale(small_sq, big_sq, small, small * k, n).b_simple
    uncorrected = estimate_noise_scale(small_sq, big_sq, small, small * k, None).b_simple
    assert corrected == pytest.approx(exact, rel=0.1)
    assert abs(uncorrected / exact - 1) > 0.25


def test_ratio_of_means_is_stable_where_the_mean_of_ratios_is_not():
    n, small, k = 1000, 8, 8
    pop = _population(n, dim=20, mean_norm=0.3, seed=3)
    exact = _exact(pop)
    small_sq, big_sq = _draw_norms(pop, small, k, steps=2000, seed=4)
    estimate = estimate_noise_scale(small_sq, big_sq, small, small * k, n)
    per_step = [
        unbiased_norms(s, b, small, small * k, n) for s, b in zip(small_sq, big_sq, strict=True)
    ]
    mean_of_ratios = np.mean([tr / g2 for g2, tr in per_step])
    assert estimate.b_simple == pytest.approx(exact, rel=0.15)
    assert abs(mean_of_ratios / exact - 1) > 1.0  # steps with tiny or negative |G|^2 dominate


def test_interval_covers_the_truth_and_narrows_with_more_steps():
    n, small, k = 2000, 4, 16
    pop = _population(n, dim=10, mean_norm=1.0, seed=5)
    exact = _exact(pop)
    small_sq, big_sq = _draw_norms(pop, small, k, steps=800, seed=6)
    few = estimate_noise_scale(small_sq[:50], big_sq[:50], small, small * k, n)
    many = estimate_noise_scale(small_sq, big_sq, small, small * k, n)
    assert many.low <= exact <= many.high
    assert many.low <= many.b_simple <= many.high
    assert (many.high - many.low) < (few.high - few.low)
    assert many.pairs == 800 and many.confidence == 0.9


def test_an_unresolved_gradient_gives_an_unbounded_noise_scale():
    # |g_B|^2 no smaller than pure noise predicts: the mean gradient is lost in the noise.
    estimate = estimate_noise_scale([1.0, 1.0], [1 / 8, 1 / 8 - 0.001], 1, 8)
    assert math.isinf(estimate.b_simple)
    assert math.isinf(estimate.high)


def test_one_step_has_an_open_interval():
    estimate = estimate_noise_scale([9.0], [2.0], 8, 64)
    assert estimate.b_simple == pytest.approx(64.0)
    assert (estimate.low, estimate.high) == (0.0, math.inf)


def test_full_batch_has_no_noise_and_the_error_law_has_the_finite_data_factor():
    assert variance_factor(500, 500) == 0.0
    assert expected_relative_error(64.0, 500, 500) == 0.0
    assert expected_relative_error(64.0, 4, None) == pytest.approx(4.0)
    assert expected_relative_error(64.0, 4, 1000) < 4.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: estimate_noise_scale([1.0], [1.0, 2.0], 4, 8), "one of each per step"),
        (lambda: estimate_noise_scale([], [], 4, 8), "at least one step"),
        (lambda: estimate_noise_scale([1.0], [1.0], 8, 8), "small < big"),
        (lambda: estimate_noise_scale([1.0], [1.0], 4, 8, confidence=1.0), "between 0 and 1"),
        (lambda: variance_factor(0), "at least one sample"),
        (lambda: variance_factor(64, 32), "cannot be drawn from 32"),
    ],
)
def test_bad_estimator_input_is_refused(call, message):
    with pytest.raises(BatchfitError, match=message):
        call()

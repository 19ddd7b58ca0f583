"""The gradient noise scale from squared gradient norms at two batch sizes (pure: no torch).

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", appendix A) define the simple
noise scale ``B_simple = tr(Sigma) / |G|^2``: the per-sample gradient variance over the squared true
gradient. It is the batch size at which the noise in a batch gradient is as large as the signal,
and it predicts the critical batch size beyond which bigger batches buy few steps. It is their
estimate of the noise scale ``B_noise`` (exact when the Hessian is a multiple of the identity);
in code this number has one name, ``b_simple``, from this estimator through the recommendation
(``report.json`` shows it as ``noise.b_simple`` and as ``noise.critical_batch_size``).

Neither term is observed directly, but the squared norm of a mean gradient over ``n`` samples has a
known expectation. Drawing ``n`` of ``N`` training samples without replacement,

    E|g_n|^2 = |G|^2 + tr(Sigma) c(n),   c(n) = (N - n) / ((N - 1) n)

(``c(n) = 1/n`` for an endless stream). Measuring ``|g_b|^2`` for micro-batches of ``b`` samples and
``|g_B|^2`` for their average over a batch of ``B`` gives two equations, solved here for unbiased
estimates of ``|G|^2`` and ``tr(Sigma)``. Ignoring the finite-data factor inflates ``B_simple`` late
in training, when ``|G|^2`` is small (docs/design.md).

One step's estimates are very noisy (``|G|^2`` may even come out negative), so the numerator and the
denominator are each averaged over many steps before dividing: the ratio of means, not the mean of
ratios, which would be dominated by the steps with the smallest ``|G|^2``.

Examples:
    Norms made from known values (``|G|^2 = 1``, ``tr(Sigma) = 64``, b = 8, B = 64, a stream):

    >>> small = [1 + 64 / 8] * 4
    >>> big = [1 + 64 / 64] * 4
    >>> estimate = estimate_noise_scale(small, big, 8, 64)
    >>> round(estimate.b_simple, 6), round(estimate.g2, 6), round(estimate.tr_sigma, 6)
    (64.0, 1.0, 64.0)

References:
    McCandlish, Kaplan, Amodei et al. 2018, arXiv:1812.06162, appendix A.1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from batchfit.errors import BatchfitError


def variance_factor(n: int, num_samples: int | None = None) -> float:
    """``c(n)``: the variance of a mean over ``n`` samples, in units of the per-sample variance.

    ``1/n`` for an endless stream; ``(N - n) / ((N - 1) n)`` for ``n`` of ``N`` samples drawn
    without replacement (zero when ``n = N``: the full batch has no noise).

    >>> variance_factor(32), variance_factor(4000, 4000), round(variance_factor(32, 4000), 6)
    (0.03125, 0.0, 0.031008)
    """
    if n < 1:
        raise BatchfitError(f"A batch needs at least one sample; got {n}.")
    if num_samples is None:
        return 1.0 / n
    if n > num_samples:
        raise BatchfitError(f"A batch of {n} samples cannot be drawn from {num_samples} samples.")
    if num_samples == 1:
        return 0.0
    return (num_samples - n) / ((num_samples - 1) * n)


def unbiased_norms(
    small_sq: float, big_sq: float, small: int, big: int, num_samples: int | None = None
) -> tuple[float, float]:
    """``(|G|^2, tr(Sigma))`` from one pair of squared norms, unbiased.

    ``small_sq`` is ``|g_b|^2`` (or its mean over the micro-batches of a step), ``big_sq`` is
    ``|g_B|^2``. Solves ``E|g_n|^2 = |G|^2 + tr(Sigma) c(n)`` for ``n = small`` and ``n = big``.

    >>> unbiased_norms(9.0, 2.0, 8, 64)
    (1.0, 64.0)
    """
    if not 1 <= small < big:
        raise BatchfitError(
            f"The noise scale needs two batch sizes, small < big; got {small} and {big}."
        )
    c_small, c_big = variance_factor(small, num_samples), variance_factor(big, num_samples)
    tr_sigma = (small_sq - big_sq) / (c_small - c_big)
    g2 = (c_small * big_sq - c_big * small_sq) / (c_small - c_big)
    return g2, tr_sigma


@dataclass(frozen=True)
class NoiseScale:
    """``B_simple`` with its confidence interval, and the averaged terms it was divided from.

    ``b_simple`` is ``inf`` when the averaged ``|G|^2`` is not above zero: the gradient signal was
    not resolved under the noise, so any batch size is below the noise scale. ``low``/``high`` bound
    it with probability ``confidence`` (bootstrap over steps; ``high`` may be ``inf``).
    """

    b_simple: float
    low: float
    high: float
    confidence: float
    g2: float
    tr_sigma: float
    pairs: int
    small_batch_size: int
    big_batch_size: int
    num_samples: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ratio(tr_sigma: np.ndarray, g2: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(g2 > 0, np.maximum(tr_sigma, 0.0) / np.where(g2 > 0, g2, 1.0), np.inf)
    return ratio


def estimate_noise_scale(
    small_sq: Sequence[float],
    big_sq: Sequence[float],
    small: int,
    big: int,
    num_samples: int | None = None,
    *,
    confidence: float = 0.9,
    resamples: int = 2000,
    seed: int = 0,
) -> NoiseScale:
    """``B_simple`` from per-step squared norms: the ratio of the mean ``tr(Sigma)`` to the mean
    ``|G|^2``, with a bootstrap percentile interval over steps.

    ``small_sq[i]`` and ``big_sq[i]`` come from step ``i``: the (mean) squared norm of its
    micro-batch gradients of ``small`` samples and of their average over ``big`` samples.
    ``num_samples`` is the training set size for the finite-data correction (``None``: a stream).
    """
    if len(small_sq) != len(big_sq):
        raise BatchfitError(
            f"Got {len(small_sq)} small-batch norms but {len(big_sq)} big-batch norms; "
            "give one of each per step."
        )
    if len(small_sq) == 0:
        raise BatchfitError("The noise scale needs at least one step of gradient norms; got none.")
    if not 0 < confidence < 1:
        raise BatchfitError(f"The confidence must be between 0 and 1; got {confidence}.")
    pairs = [
        unbiased_norms(s, b, small, big, num_samples) for s, b in zip(small_sq, big_sq, strict=True)
    ]
    g2 = np.array([p[0] for p in pairs], dtype=np.float64)
    tr = np.array([p[1] for p in pairs], dtype=np.float64)
    estimate = float(_ratio(np.array([tr.mean()]), np.array([g2.mean()]))[0])
    if len(pairs) < 2:
        low, high = 0.0, math.inf
    else:
        rng = np.random.default_rng(seed)
        index = rng.integers(0, len(pairs), size=(resamples, len(pairs)))
        ratios = np.sort(_ratio(tr[index].mean(axis=1), g2[index].mean(axis=1)))
        tail = (1 - confidence) / 2
        low = float(ratios[int(math.floor(tail * (resamples - 1)))])
        high = float(ratios[int(math.ceil((1 - tail) * (resamples - 1)))])
    return NoiseScale(
        b_simple=estimate,
        low=low,
        high=high,
        confidence=confidence,
        g2=float(g2.mean()),
        tr_sigma=float(tr.mean()),
        pairs=len(pairs),
        small_batch_size=small,
        big_batch_size=big,
        num_samples=num_samples,
    )


def expected_relative_error(b_simple: float, batch_size: int, num_samples: int | None) -> float:
    """Predicted RMS of ``|g_B - G| / |G|``: ``sqrt(B_simple c(B))``, the seed's O(1/sqrt(B)) law
    with the finite-data factor (the error reaches zero at the full batch).

    >>> expected_relative_error(64.0, 16, None)
    2.0
    """
    return math.sqrt(b_simple * variance_factor(batch_size, num_samples))

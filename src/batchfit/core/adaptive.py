"""The adaptive batch size's arithmetic: a running noise scale, and the batch size it calls for.

Pure numbers, no torch. While training with ``adaptive``, each step yields squared gradient norms
at two sizes (its micro-batches, or two halves of a batch that has one, and the whole batch);
:func:`step_terms` turns one step's norms into unbiased ``|G|^2`` and ``tr(Sigma)``
(the two-batch estimator of :mod:`batchfit.core.noise_estimator`, with parts of unequal size).
:class:`NoiseAverage` keeps an exponential moving average of each of the two terms, as McCandlish
et al. 2018 advise (the ratio of averages, not the average of ratios), over about ``window`` steps.

Every ``adapt_every`` steps :func:`next_batch_size` re-chooses the batch size, one doubling or
halving at a time (Smith et al. 2018 grow the batch in steps), toward the noise scale: at
``B = B_noise`` a run takes twice the fewest steps and twice the fewest examples (McCandlish et
al.'s critical batch size), the balance between wasting the hardware and wasting samples. ``tune``'s
model of time to a result also weighs throughput per batch size; a run's own step times are not
reproducible (a resumed run must repeat the uninterrupted one bitwise), so here throughput enters
only through where the run starts and ``min_batch_size``.

Examples:
    >>> avg = NoiseAverage.start(window=4)
    >>> for _ in range(20):
    ...     avg = avg.add(1.0, 64.0)
    >>> round(avg.b_noise, 6)
    64.0
    >>> next_batch_size(64.0, current=16, low=2, high=1024)
    (32, 'the noise scale ~64 is at least twice the batch size 16: doubling it')
    >>> next_batch_size(20.0, current=16, low=2, high=1024)[0]
    16
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from batchfit.core.noise_estimator import variance_factor


def step_terms(
    small_sq: Sequence[float],
    small_sizes: Sequence[int],
    big_sq: float,
    num_samples: int | None = None,
) -> tuple[float, float]:
    """Unbiased ``(|G|^2, tr(Sigma))`` from one step: ``small_sq[i]`` is ``|g|^2`` of part ``i``
    (``small_sizes[i]`` samples) and ``big_sq`` that of their weighted mean, the whole batch.

    ``E mean_i |g_i|^2 = |G|^2 + tr(Sigma) mean_i c(b_i)`` and ``E |g_B|^2 = |G|^2 + tr(Sigma)
    c(B)``: two equations in the two terms.

    >>> step_terms([9.0, 9.0], [8, 8], 5.0)
    (1.0, 64.0)
    """
    big = sum(small_sizes)
    c_small = sum(variance_factor(b, num_samples) for b in small_sizes) / len(small_sizes)
    c_big = variance_factor(big, num_samples)
    mean_small = sum(small_sq) / len(small_sq)
    tr_sigma = (mean_small - big_sq) / (c_small - c_big)
    g2 = (c_small * big_sq - c_big * mean_small) / (c_small - c_big)
    return g2, tr_sigma


@dataclass(frozen=True)
class NoiseAverage:
    """Exponential moving averages of ``|G|^2`` and ``tr(Sigma)`` with Adam's bias correction
    (``weight`` is the sum of the averaging weights so far, so the first steps are not pulled
    toward zero)."""

    decay: float
    g2: float = 0.0
    tr_sigma: float = 0.0
    weight: float = 0.0
    steps: int = 0

    @classmethod
    def start(cls, window: int) -> NoiseAverage:
        """An empty average over about ``window`` steps."""
        return cls(decay=1.0 - 1.0 / max(window, 1))

    def add(self, g2: float, tr_sigma: float) -> NoiseAverage:
        d = self.decay
        return replace(
            self,
            g2=d * self.g2 + (1 - d) * g2,
            tr_sigma=d * self.tr_sigma + (1 - d) * tr_sigma,
            weight=d * self.weight + (1 - d),
            steps=self.steps + 1,
        )

    @property
    def b_noise(self) -> float:
        """``tr(Sigma) / |G|^2`` of the averages; ``inf`` while ``|G|^2`` is not above zero (the
        signal is not resolved under the noise), ``nan`` before the first step."""
        if self.steps == 0:
            return math.nan
        if self.g2 <= 0:
            return math.inf
        return max(self.tr_sigma, 0.0) / self.g2


def next_batch_size(b_noise: float, *, current: int, low: int, high: int) -> tuple[int, str]:
    """The batch size for the next ``adapt_every`` steps, and why, in words.

    Doubled when the noise scale is at least twice the batch (or unbounded), halved when it is at
    most half of it, kept in between (a dead band, so an estimate that wobbles around a boundary
    does not swing the batch back and forth); always within ``[low, high]``. Not measured
    (``nan``): no change.

    >>> next_batch_size(float("inf"), current=600, low=2, high=1000)
    (1000, 'the noise scale is unbounded (no gradient signal resolved yet): raising it to 1000')
    >>> next_batch_size(3.0, current=64, low=8, high=1000)
    (32, 'the noise scale ~3 is below half the batch size 64: halving it')
    >>> next_batch_size(100.0, current=64, low=8, high=1000)
    (64, 'the noise scale ~100 is within a factor 2 of the batch size 64: no change')
    """
    if math.isnan(b_noise):
        return current, "no noise scale measured yet"
    start = min(max(current, low), high)
    if b_noise >= 2 * start:  # inf included
        chosen = min(2 * start, high)
    elif b_noise <= start / 2:
        chosen = max(start // 2, low)
    else:
        chosen = start
    if math.isinf(b_noise):
        said = "is unbounded (no gradient signal resolved yet)"
    else:
        said = f"~{b_noise:,.0f}" if b_noise >= 10 else f"~{b_noise:.2g}"
    if chosen > current:
        how = "doubling it" if chosen == 2 * current else f"raising it to {chosen}"
        where = "" if math.isinf(b_noise) else f" is at least twice the batch size {current}"
        return chosen, f"the noise scale {said}{where}: {how}"
    if chosen < current:
        how = "halving it" if 2 * chosen == current else f"lowering it to {chosen}"
        return chosen, f"the noise scale {said} is below half the batch size {current}: {how}"
    return (
        chosen,
        f"the noise scale {said} is within a factor 2 of the batch size {chosen}: no change",
    )

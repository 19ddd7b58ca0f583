"""The learning rate for the run's length, from held-out loss curves at a few constant learning
rates (pure numbers; the probe that measures the curves is :mod:`batchfit.probe.race_horizon`).

Why: the race judges learning rates over a round of a fraction of a second, and over so short a
horizon the boldest stable rate wins. A long run at a constant rate ends at the noise floor that
rate sets: on two long benchmark tasks the race's rate was 6-8x the best one for the run.

The model, fitted to every lane's held-out loss ``L`` after ``t`` steps at rate ``eta``::

    L(t, eta) = L_inf + A * (eta * t) ** -p + C * eta

The second term is progress, which depends on the distance travelled, ``eta * t`` (the sum of
the rates: Tissue et al. 2024, "Scaling law with learning rate annealing"); the third is the
floor of constant-rate stochastic training, which grows with the rate (the steady-state excess
loss of constant-step SGD is proportional to the step: Bach & Moulines 2013, Mandt et al. 2017).
Over a short horizon the progress term dominates and the largest rate wins; at the run's ``T``
steps the best rate balances the two:

    eta*(T) = (p * A * T**-p / C) ** (1 / (p + 1)),   so   eta* ~ T ** (-p / (p + 1)).

The exponent comes from the fit, not a constant: a theory of random-feature models and
measurements of LLM token horizons (Bjorck et al. 2025) both find it depends on the task.

Examples:
    >>> curve = [(lr, t, 0.1 + 2.0 * (lr * t) ** -0.5 + 3.0 * lr)
    ...          for lr in (0.04, 0.02, 0.01, 0.005) for t in (100, 200, 400, 800, 1600)]
    >>> fit = fit_floor(curve)
    >>> round(fit.p, 2), round(fit.c, 2)  # p is fitted on a grid: 0.5 lies between two points
    (0.49, 3.05)
    >>> round(fit.best_lr(1600), 4), round(fit.best_lr(16000), 4)  # exactly: 0.0411, 0.0191
    (0.0411, 0.0192)

With a level to reach instead of a length, the rate that gets there soonest (a lower level
needs a lower floor, so a lower rate):

    >>> round(fit.fastest_lr(0.2, 1e-4, 0.1), 4), round(fit.fastest_lr(0.13, 1e-4, 0.1), 4)
    (0.0119, 0.0045)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: The exponents ``p`` of the progress term that are tried (a grid: for a given ``p`` the rest
#: of the model is a non-negative linear least-squares problem, solved exactly).
EXPONENTS = tuple(
    float(p) for p in np.round(np.exp(np.linspace(math.log(0.05), math.log(3.0), 60)), 4)
)


@dataclass(frozen=True)
class FloorFit:
    """The fitted ``L_inf + A (eta t)^-p + C eta`` and its root-mean-square relative error."""

    l_inf: float
    a: float
    p: float
    c: float
    rel_error: float
    points: int

    def loss(self, lr: float, steps: float) -> float:
        """The model's held-out loss after ``steps`` steps at ``lr``."""
        return self.l_inf + self.a * (lr * steps) ** -self.p + self.c * lr

    def best_lr(self, steps: float) -> float | None:
        """The rate with the lowest modelled loss after ``steps`` steps, or None when the fit
        found no floor (``C = 0``: every larger rate looks better, nothing to balance)."""
        if self.c <= 0 or self.a <= 0:
            return None
        return (self.p * self.a * steps**-self.p / self.c) ** (1.0 / (self.p + 1.0))

    def steps_to(self, lr: float, level: float) -> float:
        """The modelled steps at ``lr`` until the loss reaches ``level`` (inf: its floor,
        ``L_inf + C lr``, lies at or above the level)."""
        gap = level - self.l_inf - self.c * lr
        if gap <= 0:
            return math.inf
        if self.a <= 0:
            return 0.0
        return (self.a / gap) ** (1.0 / self.p) / lr

    def fastest_lr(self, level: float, low: float, high: float) -> float | None:
        """The rate in ``[low, high]`` whose modelled loss reaches ``level`` in the fewest steps
        (None: none reaches it); a search on a log grid, since the steps have no closed-form
        minimum."""
        grid = np.exp(np.linspace(math.log(low), math.log(high), 121))
        steps = [self.steps_to(float(lr), level) for lr in grid]
        best = int(np.argmin(steps))
        return float(grid[best]) if math.isfinite(steps[best]) else None

    @property
    def horizon_exponent(self) -> float:
        """``p / (p + 1)``: the best rate falls as ``steps ** -exponent``."""
        return self.p / (self.p + 1.0)


def fit_floor(points: Sequence[tuple[float, float, float]]) -> FloorFit | None:
    """The model fitted to ``(lr, steps, held-out loss)`` points (finite, positive), weighting
    each point by ``1 / loss`` so that the fit is in relative error, as the curves are judged;
    None with fewer than 6 points or fewer than 2 learning rates."""
    data = np.array([p for p in points if all(math.isfinite(v) and v > 0 for v in p)], float)
    if len(data) < 6 or len(set(data[:, 0])) < 2:
        return None
    lr, steps, loss = data[:, 0], data[:, 1], data[:, 2]
    weights = 1.0 / loss
    best: FloorFit | None = None
    for p in EXPONENTS:
        design = np.stack([np.ones_like(lr), (lr * steps) ** -p, lr], axis=1)
        coef = _non_negative_lstsq(design * weights[:, None], loss * weights)
        error = float(np.sqrt(np.mean(((design @ coef) * weights - 1.0) ** 2)))
        if best is None or error < best.rel_error:
            l_inf, a, c = (float(v) for v in coef)
            best = FloorFit(l_inf, a, p, c, error, len(data))
    return best


def _non_negative_lstsq(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0, exactly, by trying each set of free columns (3
    columns: 7 sets) and keeping the best feasible one."""
    columns = design.shape[1]
    best, best_error = np.zeros(columns), float(np.sum(target**2))
    for size in range(1, columns + 1):
        for free in itertools.combinations(range(columns), size):
            sub = design[:, free]
            coef, *_ = np.linalg.lstsq(sub, target, rcond=None)
            if np.any(coef < 0):
                continue
            error = float(np.sum((sub @ coef - target) ** 2))
            if error < best_error:
                best_error = error
                best = np.zeros(columns)
                best[list(free)] = coef
    return best

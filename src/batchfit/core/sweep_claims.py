"""The seed's claims about batch size, checked against a sweep, and the statistics they rest on.

Three trends over the swept sizes, each by Spearman's rank correlation with batch size (smaller
batches generalise better, the train-validation gap grows, larger batches reach sharper minima);
"full batch gets stuck in the first valley", read from the full-batch run's own curve; and
"32-256 are the sizes to try". Accuracy differences below twice the binomial sampling error of
the validation set are *within noise*: one seed cannot separate them. Pure: per-size
:class:`~batchfit.core.sweep_records.SizeSummary` records in, frozen :class:`Claim` out.

Examples:
    >>> spearman([32, 64, 128, 256], [0.91, 0.90, 0.89, 0.85])
    -1.0
    >>> sizes_claim([8, 32, 256], 8, 256).outcome
    'partly'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from batchfit.core.options import opt
from batchfit.core.sweep_inputs import higher_is_better
from batchfit.core.sweep_records import Point, SizeSummary

#: Rank correlation (Spearman) at or beyond which a trend over batch sizes counts as one.
TREND_RHO = 0.8
#: A curve has plateaued when its last quarter gained at most this share of what the whole run
#: gained; the same share of the best size's gain separates "behind it" from "level with it".
PLATEAU_SHARE = 0.05
#: The sizes the seed says to try: 32, 64, 128 and 256.
SEED_SIZES = (32, 256)
#: Fewer full-batch updates than this cannot tell being stuck from not having converged yet, so
#: the full-batch claim says it cannot tell (the built-in example's full batch was still climbing
#: after 40); with the default equal-examples budget full batch makes one step per epoch.
FULL_BATCH_MIN_STEPS = 100


@dataclass(frozen=True)
class Claim:
    """One of the seed's claims, checked against the sweep.

    ``outcome`` is ``holds``, ``reversed``, ``no clear trend``, ``within noise`` or ``too few
    sizes`` for the trends over batch size; the full-batch claim (:func:`full_batch_claim`) and the
    32-256 claim (:func:`sizes_claim`) have their own outcomes. ``rho`` is Spearman's rank
    correlation with batch size where one was taken; ``detail`` the numbers behind the outcome.
    """

    claim: str
    outcome: str
    rho: float | None
    detail: str

    def describe(self) -> str:
        """One line: the claim, the outcome, the numbers (and rho, when there is one)."""
        rho = f"; Spearman rho with batch size {_fmt(self.rho)}" if self.rho is not None else ""
        return f"{self.claim}? {self.outcome} ({self.detail}{rho})."


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); ``None`` when undefined (fewer than
    two points, or one side constant)."""
    if len(xs) != len(ys) or len(xs) < 2:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return round(sxy / math.sqrt(sxx * syy), 12)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def accuracy_noise(accuracy: float, samples: int) -> float:
    """Standard error of an accuracy measured on ``samples`` validation samples (binomial).

    >>> round(accuracy_noise(0.9, 1000), 4)
    0.0095
    """
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / samples) if samples else math.nan


def check_claims(
    sizes: Sequence[SizeSummary], metric: str, val_samples: int | None
) -> tuple[Claim, ...]:
    """Test the seed's three trend claims over the swept sizes by rank correlation with batch size.

    ``sizes`` holds one summary per batch size (its ``best``, ``gap`` and ``sharpness`` are
    read). A trend needs |Spearman rho| >= 0.8 over at least three
    sizes. For accuracy, a spread between sizes smaller than twice the sampling error of the
    validation set is reported as ``within noise``: a single seed cannot separate such differences.
    The accuracy gap gets the same threshold (it is read on the same validation set); sharpness and
    losses have no known sampling error, so they get none.
    """
    batch_sizes = [s.batch_size for s in sizes]
    up = higher_is_better(metric)
    gap_key = "accuracy" if metric == "val_accuracy" else "loss"
    best = [s.best.value if s.best else math.nan for s in sizes]
    gaps = [(s.gap or {}).get(gap_key, math.nan) for s in sizes]
    sharp = [s.sharpness if s.sharpness is not None else math.nan for s in sizes]
    noise = None
    if metric == "val_accuracy" and val_samples and best and all(math.isfinite(v) for v in best):
        noise = sampling_noise(metric, sum(best) / len(best), val_samples)
    return (
        _claim(
            "Smaller batches generalise better",
            batch_sizes,
            best,
            -1.0 if up else 1.0,
            f"best {metric}",
            noise,
        ),
        _claim(
            "The train-validation gap grows with batch size",
            batch_sizes,
            gaps,
            1.0,
            f"{gap_key} gap",
            noise,
        ),
        _claim(
            "Larger batches reach sharper minima",
            batch_sizes,
            sharp,
            1.0,
            "top Hessian eigenvalue",
            None,
        ),
    )


def _claim(
    text: str,
    batch_sizes: Sequence[int],
    values: Sequence[float],
    expected_sign: float,
    what: str,
    noise: float | None,
) -> Claim:
    pairs = ", ".join(f"B={b}: {_fmt(v)}" for b, v in zip(batch_sizes, values, strict=True))
    finite = [v for v in values if math.isfinite(v)]
    if len(batch_sizes) < 3 or len(finite) < len(values):
        return Claim(text, "too few sizes", None, f"{what}: {pairs} (a trend needs 3+ sizes)")
    rho = spearman(batch_sizes, values)
    spread = max(values) - min(values)
    detail = f"{what}: {pairs}"
    if noise is not None and spread < noise:
        detail += f"; spread {spread:.3f} < {noise:.3f} (2x the validation sampling error)"
        return Claim(text, "within noise", rho, detail)
    if rho is not None and rho * expected_sign >= TREND_RHO:
        outcome = "holds"
    elif rho is not None and rho * expected_sign <= -TREND_RHO:
        outcome = "reversed"
    else:
        outcome = "no clear trend"
    return Claim(text, outcome, rho, detail)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4g}"


def sampling_noise(metric: str, value: float, val_samples: int | None) -> float:
    """Twice the sampling error of an accuracy (0 for losses, whose error is not known)."""
    if metric != "val_accuracy" or not val_samples:
        return 0.0
    return 2 * accuracy_noise(value, val_samples)


@dataclass(frozen=True)
class _Tail:
    """The last quarter of a curve (by step): its first and last values and the gain over it,
    next to the gain over the whole curve (both signed so that positive is better)."""

    first: Point
    last: Point
    evaluations: int
    gain: float
    total_gain: float


def _tail(points: Sequence[Point], metric: str) -> _Tail:
    sign = 1.0 if higher_is_better(metric) else -1.0
    last = points[-1]
    window = [p for p in points if p["step"] >= 0.75 * last["step"]]
    if len(window) < 2:
        window = list(points[-2:])
    return _Tail(
        first=window[0],
        last=last,
        evaluations=len(window),
        gain=sign * (last[metric] - window[0][metric]),
        total_gain=sign * (last[metric] - points[0][metric]),
    )


def full_batch_claim(
    full: SizeSummary,
    others: Sequence[SizeSummary],
    metric: str,
    val_samples: int | None = None,
) -> Claim:
    """ "Full batch gets stuck in the first valley", read from the full-batch run's curve.

    The claim is about where full batch ends up, so short evidence is not read as an answer: with
    fewer than :data:`FULL_BATCH_MIN_STEPS` steps, or a curve whose last quarter of steps still
    gained more than :data:`PLATEAU_SHARE` of what the whole run gained (still improving, or
    rising by less than twice the validation sampling error, which a plateau cannot be told from),
    the outcome is ``cannot tell`` and the detail says why. Otherwise the curve has *plateaued*;
    the claim ``holds`` when it plateaued behind the best other size (by more than that share of
    the size's gain and the sampling error) and is ``reversed`` when it plateaued level with it.
    ``full`` and ``others`` are per-size summaries (their ``steps``, ``curve`` and ``best`` are
    read).

    >>> from batchfit.core.sweep_records import BestPoint, TimeToTarget
    >>> points = [(0, 2.0), (100, 1.2), (200, 1.01), (400, 1.0)]
    >>> curve = tuple({"step": s, "val_loss": v} for s, v in points)
    >>> full = SizeSummary(4000, 0.1, 400, curve, TimeToTarget(False), BestPoint(1.0, 400))
    >>> small = SizeSummary(32, 0.01, 5000, (), TimeToTarget(False), BestPoint(0.4, 900))
    >>> full_batch_claim(full, [small], "val_loss").outcome
    'holds'
    >>> from dataclasses import replace
    >>> full_batch_claim(replace(full, steps=40), [small], "val_loss").detail
    "only 40 steps; telling stuck from not yet converged takes 100 or more (raise 'epochs' or \
'steps')"
    """
    text = f"Full batch gets stuck in the first valley (B={full.batch_size})"
    if full.diverged:
        return Claim(text, "diverged", None, f"the run diverged at step {full.diverged.step}")
    if full.steps < FULL_BATCH_MIN_STEPS:
        detail = (
            f"only {full.steps} steps; telling stuck from not yet converged takes "
            f"{FULL_BATCH_MIN_STEPS} or more (raise {opt('epochs')} or {opt('steps')})"
        )
        return Claim(text, "cannot tell", None, detail)
    points = [p for p in full.curve if _finite(p.get(metric))]
    if len(points) < 3:
        detail = (
            f"{len(points)} evaluation(s) in {full.steps} steps; a plateau needs 3+ "
            f"(raise {opt('eval_points')} or the budget)"
        )
        return Claim(text, "too few evaluations", None, detail)
    # choose: still rising (cannot tell), or plateaued behind or level with the best other size
    tail = _tail(points, metric)
    detail = (
        f"{full.steps} steps; {metric} {tail.first[metric]:.4g} -> {tail.last[metric]:.4g} "
        f"over its last {tail.evaluations} evaluations "
        f"(steps {tail.first['step']}-{tail.last['step']})"
    )
    rising = _still_rising(tail, sampling_noise(metric, tail.last[metric], val_samples))
    if rising:
        return Claim(text, "cannot tell", None, f"{detail}: {rising}")
    rivals = [
        (o.best.value, o.batch_size) for o in others if o.best and o.batch_size != full.batch_size
    ]
    if not rivals:
        return Claim(text, "plateaued", None, detail + "; no other size to compare it with")
    sign = 1.0 if higher_is_better(metric) else -1.0
    theirs, rival = max(rivals, key=lambda r: sign * r[0])
    mine = full.best.value if full.best else tail.last[metric]
    behind = sign * (theirs - mine)
    scale = abs(theirs - points[0][metric])
    stuck = behind > max(PLATEAU_SHARE * scale, sampling_noise(metric, mine, val_samples))
    # explain
    detail += f"; plateaued with best {mine:.4g} against {theirs:.4g} at B={rival}"
    if stuck:
        return Claim(text, "holds", None, detail)
    return Claim(text, "reversed", None, detail + " (level with it: not stuck)")


def _still_rising(tail: _Tail, noise: float) -> str | None:
    """Why the curve cannot be read as a plateau (its last quarter gained more than
    :data:`PLATEAU_SHARE` of the whole run's gain), or ``None`` when it has plateaued."""
    share = PLATEAU_SHARE * abs(tail.total_gain)
    if tail.gain <= share:
        return None
    gained = (
        f"gained {tail.gain:.3g}, more than {PLATEAU_SHARE:.0%} of the run's {tail.total_gain:.3g}"
    )
    if tail.gain > noise:
        return f"still improving at the end ({gained}): too few updates to tell"
    return (
        f"still rising at the end ({gained}) by less than 2x the validation sampling error "
        f"({noise:.3g}): a plateau cannot be told from a slow climb"
    )


def sizes_claim(
    swept: Sequence[int],
    best_batch_size: int | None,
    fastest_batch_size: int | None,
    best_ties: Sequence[int] = (),
) -> Claim:
    """ "32, 64, 128 and 256 are the sizes to try": do the best and the fastest size fall inside
    32-256? Untested unless some swept size lies outside that range. ``best_ties`` are the sizes
    whose validation value is within twice the sampling error of the best (a tie): when the best
    lies outside but a tie lies inside, that pick is ``within noise``, never ``does not hold``.

    >>> sizes_claim([8, 32, 256, 1024], 32, 1024).outcome
    'partly'
    >>> sizes_claim([32, 64], 32, 64).outcome
    'not tested'
    >>> sizes_claim([8, 32], 8, None, best_ties=[8, 32]).outcome
    'within noise'
    >>> sizes_claim([8, 32], 8, None, best_ties=[8]).outcome
    'does not hold'
    """
    low, high = SEED_SIZES
    text = f"{low}, 64, 128 and {high} are the sizes to try"
    outside = [b for b in swept if not low <= b <= high]
    if not outside:
        return Claim(
            text,
            "not tested",
            None,
            f"every swept size is within {low}-{high}; add sizes outside it (e.g. 8 or 1024)",
        )
    picks = [(w, b) for w, b in (("best", best_batch_size), ("fastest", fastest_batch_size)) if b]
    if not picks:
        return Claim(text, "not tested", None, "no size has a result to compare")
    inside = [low <= b <= high for _, b in picks]
    tied_inside = [t for t in best_ties if low <= t <= high]
    tied = [
        not i and w == "best" and bool(tied_inside) for (w, _), i in zip(picks, inside, strict=True)
    ]
    level = [i or t for i, t in zip(inside, tied, strict=True)]
    if all(inside):
        outcome = "holds"
    elif all(level):
        outcome = "within noise"
    else:
        outcome = "does not hold" if not any(level) else "partly"
    where = ", ".join(
        f"{what} B={b} {'inside' if i else 'outside'}"
        + (f" (B={', '.join(map(str, tied_inside))} inside is within noise of it)" if t else "")
        for (what, b), i, t in zip(picks, inside, tied, strict=True)
    )
    swept_outside = ", ".join(map(str, outside))
    return Claim(text, outcome, None, f"{where}; swept outside {low}-{high}: B={swept_outside}")


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


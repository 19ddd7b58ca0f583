"""From measurements to a batch size, with reasons. Pure: numbers in, a frozen dataclass out.

The model (McCandlish et al. 2018): reaching a given loss takes ``S(B) = S_min (1 + B_noise / B)``
steps, and a step of ``B`` samples takes ``B / throughput(B)`` seconds, so the time to a result is
proportional to

    T(B) = (B + B_noise) / throughput(B).

Small batches waste the hardware (low samples/s); batches far above the noise scale waste samples
(each doubling saves few steps). The recommendation is the feasible ``B`` that minimises ``T``:
equivalently, the one that maximises goodput, throughput times statistical efficiency.

Feasible means at most the data set and ``max_batch_size``. A batch above the memory ceiling is
run as accumulated micro-batches; on one device that adds no speed, so its throughput is taken as
that of the largest measured size that fits (a slight underestimate: the optimizer step is shared).
That holds only when throughput was measured up to a memory ceiling that the search really found.
When the time budget cut the memory search or the throughput measurements short, sizes above the
largest one measured are *unknown*, not slow: they are left out of the choice, and the
recommendation is marked provisional.

Examples:
    Throughput that stops growing at 256, and a noise scale of 200:

    >>> tp = [(2**i, min(2**i, 256) * 100.0) for i in range(11)]
    >>> rec = recommend(tp, b_noise=200.0, max_micro_batch_size=1024, num_samples=50_000)
    >>> rec.batch_size, rec.micro_batch_size, rec.runner_up.batch_size
    (256, 256, 128)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from batchfit.core.accounting import has_single_sample_micro_batch, split_batch
from batchfit.errors import BatchfitError

#: Doubling the batch gains less than this share of samples/s: throughput has flattened.
FLAT_GAIN = 0.10


@dataclass(frozen=True)
class Candidate:
    """One batch size on the predicted curve. ``relative_time`` is ``T(B) / T(best)``."""

    batch_size: int
    micro_batch_size: int
    accumulation: int
    samples_per_s: float
    measured: bool
    steps_factor: float  # S(B) / S_min = 1 + B_noise / B
    relative_time: float


@dataclass(frozen=True)
class Recommendation:
    """The chosen batch size, the runner-up, the predicted curve and every rule applied."""

    batch_size: int
    micro_batch_size: int
    accumulation: int
    runner_up: Candidate | None
    curve: tuple[Candidate, ...]
    b_noise: float | None
    batch_size_range: tuple[int, int]  # the choice over the noise scale's interval
    flattens_at: int | None
    decision: tuple[str, ...] = field(default=())
    #: Why larger sizes could not be judged (empty: the choice is final).
    provisional: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def doubling_gains(throughput: Sequence[tuple[int, float]]) -> list[float | None]:
    """For each measured size, the relative gain in samples/s at twice the size (``None`` when
    twice the size was not measured).

    >>> doubling_gains([(32, 100.0), (64, 200.0), (128, 150.0)])
    [1.0, -0.25, None]
    """
    speed = dict(throughput)
    return [(speed[2 * b] / s - 1) if 2 * b in speed and s > 0 else None for b, s in throughput]


def flattening_point(
    throughput: Sequence[tuple[int, float]], gain: float = FLAT_GAIN
) -> int | None:
    """The smallest measured size beyond which no larger batch gains ``gain`` (10%) samples/s or
    more: where throughput has flattened. A dip from noise at small sizes does not count, as a
    later rise of 10% or more moves the point on. ``None`` when the largest size still gains.

    >>> flattening_point([(1, 100.0), (2, 105.0), (4, 300.0), (8, 500.0), (16, 520.0), (32, 530.0)])
    8
    >>> flattening_point([(1, 100.0), (2, 200.0)]) is None
    True
    """
    points = sorted(throughput)
    for i, (b, speed) in enumerate(points[:-1]):
        if all(later < (1 + gain) * speed for _, later in points[i + 1 :]):
            return b
    return None


def fit_step_time(throughput: Sequence[tuple[int, float]]) -> tuple[float, float] | None:
    """``t(B) = a + c B`` through the measured step times, ``(a, c)`` in seconds, fitted by least
    squares on relative errors (weights ``1/t^2``), so that the small sizes, where ``a`` shows,
    count as much as the large ones, where ``c`` does.

    ``a`` is the fixed cost of a step, ``c`` the cost per sample; ``a / c`` is the throughput knee,
    where samples/s reach half their limit. ``None`` with fewer than two sizes or a fit that is not
    positive.

    >>> a, c = fit_step_time([(b, b / (0.01 + 0.001 * b)) for b in (1, 10, 100)])
    >>> round(a, 6), round(c, 6)
    (0.01, 0.001)
    """
    points = [(b, b / s) for b, s in throughput if s > 0]
    if len(points) < 2:
        return None
    # Normal equations of sum(((a + c b) - t)^2 / t^2) over a and c.
    w = [1 / t**2 for _, t in points]
    s_w = sum(w)
    s_b = sum(wi * b for wi, (b, _) in zip(w, points, strict=True))
    s_bb = sum(wi * b * b for wi, (b, _) in zip(w, points, strict=True))
    s_t = sum(wi * t for wi, (_, t) in zip(w, points, strict=True))
    s_bt = sum(wi * b * t for wi, (b, t) in zip(w, points, strict=True))
    det = s_w * s_bb - s_b**2
    if det <= 0:
        return None
    a = (s_bb * s_t - s_b * s_bt) / det
    c = (s_w * s_bt - s_b * s_t) / det
    if a <= 0 or c <= 0:
        return None
    return a, c


def _candidates(
    throughput: Sequence[tuple[int, float]], max_micro_batch_size: int, cap: int, extrapolate: bool
) -> list[tuple[int, float, bool]]:
    """(batch size, samples/s, measured) for each measured size and, with ``extrapolate``, each
    power of two above the largest measured one, up to ``cap``."""
    measured = sorted((b, s) for b, s in throughput if b <= min(cap, max_micro_batch_size))
    if not measured:
        raise BatchfitError(
            f"No throughput was measured at a batch size that fits (micro-batch ceiling "
            f"{max_micro_batch_size}, batch sizes up to {cap}); nothing to recommend."
        )
    top_s = measured[-1][1]
    out = [(b, s, True) for b, s in measured]
    b = 1
    while extrapolate and b <= cap:
        if b > measured[-1][0]:
            out.append((b, top_s, False))
        b *= 2
    return out


def _provisional(
    top: int, max_micro_batch_size: int, cap: int, ceiling_is_final: bool
) -> tuple[str, ...]:
    """Why sizes above ``top``, the largest measured, cannot be judged (empty when they can)."""
    if not ceiling_is_final:
        return (
            f"the time budget ended the memory search at micro-batch {max_micro_batch_size}, so "
            f"larger micro-batches may fit and batch sizes above {top} may be faster; they were "
            "not considered",
        )
    if top < min(cap, max_micro_batch_size):
        return (
            f"throughput was measured only up to batch size {top} for lack of time; sizes up to "
            f"{min(cap, max_micro_batch_size)} fit in memory and may be faster; they were not "
            "considered",
        )
    return ()


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def recommend(
    throughput: Sequence[tuple[int, float]],
    *,
    b_noise: float | None,
    max_micro_batch_size: int,
    num_samples: int | None = None,
    max_batch_size: int | None = None,
    b_noise_interval: tuple[float, float] | None = None,
    ceiling_is_final: bool = True,
    min_micro_batch_size: int = 1,
) -> Recommendation:
    """Choose the batch size that minimises predicted time to a result (see the module docstring).

    ``throughput`` holds measured ``(batch_size, samples_per_s)`` pairs. ``b_noise`` is the noise
    scale (``inf``: the gradient signal was not resolved, so only throughput matters; ``None``: not
    measured, so the smallest size within 10% of the best throughput is chosen).
    ``b_noise_interval`` gives the range of choices over the noise scale's confidence interval.
    ``ceiling_is_final`` is False when the memory search was cut short (by time): then nothing above
    the measured sizes is assumed. With ``min_micro_batch_size`` 2 (batch norm), sizes whose split
    into micro-batches would make one of one sample are left out, and a choice whose epoch of
    ``num_samples`` ends on one sample comes with the advice to drop that last batch.

    Examples:
        A memory search cut short at 32 by time: nothing above 32 is assumed, the choice is
        provisional.

        >>> tp = [(2**i, 2**i * 100.0) for i in range(6)]
        >>> rec = recommend(tp, b_noise=200.0, max_micro_batch_size=32, ceiling_is_final=False)
        >>> rec.batch_size, [c.batch_size for c in rec.curve][-1], bool(rec.provisional)
        (32, 32, True)
    """
    usable = [(int(b), float(s)) for b, s in throughput if s > 0 and math.isfinite(s)]
    if not usable:
        raise BatchfitError("No throughput was measured; nothing to recommend.")
    if max_micro_batch_size < 1:
        raise BatchfitError(f"The micro-batch ceiling must be >= 1; got {max_micro_batch_size}.")
    cap_parts = [c for c in (num_samples, max_batch_size) if c is not None]
    cap = min(cap_parts) if cap_parts else max(b for b, _ in usable) * 8
    top = max((b for b, _ in usable if b <= min(cap, max_micro_batch_size)), default=0)
    provisional = _provisional(top, max_micro_batch_size, cap, ceiling_is_final)
    candidates = _candidates(usable, max_micro_batch_size, cap, extrapolate=not provisional)
    decision: list[str] = []
    if min_micro_batch_size > 1:
        single = [
            b
            for b, _, _ in candidates
            if has_single_sample_micro_batch(None, b, split_batch(b, max_micro_batch_size)[0])
        ]
        candidates = [c for c in candidates if c[0] not in single]
        if not candidates:
            raise BatchfitError(
                "Every batch size considered would make a micro-batch of one sample, which batch "
                "norm cannot train on; give a larger --max-batch-size or more data."
            )
        if single:
            decision.append(
                f"Left out B={', '.join(map(str, single))}: batch norm cannot train on one "
                "sample, and split into micro-batches that fit, these leave one."
            )
    flat = flattening_point(usable)

    def times(noise: float) -> list[float]:
        if math.isinf(noise):
            return [1.0 / s for _, s, _ in candidates]
        return [(b + max(noise, 0.0)) / s for b, s, _ in candidates]

    if b_noise is None:
        best_speed = max(s for _, s, _ in candidates)
        chosen = min(b for b, s, _ in candidates if s >= 0.9 * best_speed)
        t = [1.0 / s for _, s, _ in candidates]
        decision.append(
            "No gradient noise scale was measured, so the steps a batch size saves are unknown: "
            f"chose the smallest batch within 10% of the best measured throughput ({chosen})."
        )
    else:
        t = times(b_noise)
        best_t = min(t)
        # Among equal predicted times (flat throughput, infinite noise scale) the smaller batch.
        chosen = min(b for (b, _, _), ti in zip(candidates, t, strict=True) if ti <= best_t)
    best_t = t[[b for b, _, _ in candidates].index(chosen)]
    curve = []
    for (b, s, measured), ti in zip(candidates, t, strict=True):
        micro, acc = split_batch(b, max_micro_batch_size)
        steps = math.inf if b_noise is not None and math.isinf(b_noise) else 1 + (b_noise or 0) / b
        curve.append(Candidate(b, micro, acc, s, measured, steps, ti / best_t))
    ranked = sorted(curve, key=lambda c: (c.relative_time, c.batch_size))
    best = next(c for c in curve if c.batch_size == chosen)
    runner_up = next((c for c in ranked if c.batch_size != chosen), None)

    lo_hi = (chosen, chosen)
    if b_noise is not None and b_noise_interval is not None:
        picks = []
        for noise in b_noise_interval:
            tt = times(noise)
            picks.append(
                min(b for (b, _, _), x in zip(candidates, tt, strict=True) if x <= min(tt))
            )
        lo_hi = (min(picks), max(picks))

    if flat is not None:
        decision.append(
            f"Throughput flattens after {flat}: doubling the batch beyond it gains less than "
            f"{FLAT_GAIN:.0%} samples/s."
        )
    else:
        decision.append(
            "Throughput still grows by 10% or more with each doubling up to the largest size "
            f"measured ({max(b for b, _ in usable) if usable else '-'})."
        )
    if b_noise is not None:
        if math.isinf(b_noise):
            decision.append(
                "The gradient noise scale is unbounded (the mean gradient was not resolved under "
                "the noise), so every batch size saves steps in proportion: time to a result "
                "follows throughput alone."
            )
        else:
            decision.append(
                f"Gradient noise scale ~{_fmt(b_noise)}: steps needed S(B) = S_min (1 + "
                f"{_fmt(b_noise)}/B), so beyond ~{_fmt(2 * b_noise)} extra samples per step buy "
                "few steps."
            )
        decision.append(
            f"Predicted time to a result ~ (B + B_noise) / samples_per_s(B) is smallest at "
            f"B={chosen}"
            + (
                f"; runner-up B={runner_up.batch_size} at {runner_up.relative_time:.2f}x the time."
                if runner_up
                else "."
            )
        )
        if lo_hi[0] != lo_hi[1]:
            decision.append(
                f"Over the noise scale's confidence interval the best batch size ranges from "
                f"{lo_hi[0]} to {lo_hi[1]}."
            )
    if best.accumulation > 1:
        decision.append(
            f"B={chosen} exceeds the micro-batch ceiling ({max_micro_batch_size}): "
            f"{best.accumulation} micro-batches of {best.micro_batch_size} accumulated "
            "(exactly the same update; no extra speed on one device)."
        )
    elif (
        b_noise is not None
        and b_noise > chosen
        and chosen >= max_micro_batch_size
        and any(c.accumulation > 1 for c in curve)
    ):
        decision.append(
            f"Batches above the memory ceiling ({max_micro_batch_size}) need accumulation, which "
            "adds no speed on one device: they would cost more samples per step without "
            "saving time, so the ceiling is the largest useful batch here."
        )
    if any(not c.measured for c in curve):
        decision.append(
            f"Above the memory ceiling ({max_micro_batch_size}) a batch runs as accumulated "
            "micro-batches, so its throughput is taken as that of the ceiling."
        )
    if provisional:
        decision.append(
            f"Provisional: {'; '.join(provisional)}. Give a larger --time-budget to measure them."
        )
    if cap_parts:
        decision.append(
            f"Batch sizes considered: up to {cap} ({_cap_reason(num_samples, max_batch_size)})."
        )
    if min_micro_batch_size > 1 and has_single_sample_micro_batch(
        num_samples, chosen, best.micro_batch_size
    ):
        decision.append(
            f"Each epoch of {num_samples} samples ends on a batch of one sample at B={chosen}, "
            "which batch norm cannot train on: train with --drop-last."
        )
    return Recommendation(
        batch_size=chosen,
        micro_batch_size=best.micro_batch_size,
        accumulation=best.accumulation,
        runner_up=runner_up,
        curve=tuple(curve),
        b_noise=b_noise,
        batch_size_range=lo_hi,
        flattens_at=flat,
        decision=tuple(decision),
        provisional=provisional,
    )


def _cap_reason(num_samples: int | None, max_batch_size: int | None) -> str:
    if max_batch_size is not None and (num_samples is None or max_batch_size <= num_samples):
        return "--max-batch-size"
    return f"the training set holds {num_samples} samples"

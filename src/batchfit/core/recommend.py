"""From measurements to a batch size, with reasons. Pure: numbers in, a frozen dataclass out.

The model (McCandlish et al. 2018): reaching a given loss takes ``S(B) = S_min (1 + B_noise / B)``
steps, and a step of ``B`` samples takes ``B / throughput(B)`` seconds, so the time to a result is
proportional to

    T(B) = (B + B_noise) / throughput(B).

``B_noise`` is not observed; the code's one name for the number that stands in for it is
``b_simple``: McCandlish et al.'s simple noise scale ``B_simple = tr(Sigma) / |G|^2``
(:mod:`batchfit.core.noise_estimator`), their estimate of ``B_noise`` and of the critical batch
size (``report.json`` shows it as both ``noise.b_simple`` and ``noise.critical_batch_size``).

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

:func:`recommend` works in three steps: what may be chosen (:func:`_feasible`), the choice in
numbers (:func:`_choose`, a frozen :class:`BatchSizeChoice`), then the reasons in words
(:func:`_explain`).

Examples:
    Throughput that stops growing at 256, and a noise scale of 200:

    >>> tp = [(2**i, min(2**i, 256) * 100.0) for i in range(11)]
    >>> choice = recommend(tp, b_simple=200.0, max_micro_batch_size=1024, num_samples=50_000)
    >>> choice.batch_size, choice.micro_batch_size, choice.runner_up.batch_size
    (256, 256, 128)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from batchfit.core.accounting import has_single_sample_micro_batch, split_batch
from batchfit.core.options import opt, opt_value
from batchfit.errors import BatchfitError

#: Doubling the batch gains less than this share of samples/s: throughput has flattened.
FLAT_GAIN = 0.10
#: Without a noise scale, the smallest batch within this share of the best throughput is chosen.
NEAR_BEST_SPEED = 0.9

#: ``(batch size, samples/s, measured)``: one size the choice may fall on.
_Size = tuple[int, float, bool]


@dataclass(frozen=True)
class Candidate:
    """One batch size on the predicted curve. ``relative_time`` is ``T(B) / T(best)``."""

    batch_size: int
    micro_batch_size: int
    accumulation: int
    samples_per_s: float
    measured: bool
    steps_factor: float  # S(B) / S_min = 1 + B_simple / B
    relative_time: float


@dataclass(frozen=True)
class BatchSizeChoice:
    """The chosen batch size, the runner-up, the predicted curve and every rule applied.

    ``b_simple`` is the noise scale the choice used (``None``: not measured; ``inf``: unbounded).
    """

    batch_size: int
    micro_batch_size: int
    accumulation: int
    runner_up: Candidate | None
    curve: tuple[Candidate, ...]
    b_simple: float | None
    batch_size_range: tuple[int, int]  # the choice over the noise scale's interval
    flattens_at: int | None
    decision: tuple[str, ...] = field(default=())
    #: Why larger sizes could not be judged (empty: the choice is final).
    provisional: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Feasible:
    """What the choice may fall on, and the limits that made it so (the reasons need them)."""

    measured: tuple[tuple[int, float], ...]  # every usable (batch size, samples/s)
    sizes: tuple[_Size, ...]
    cap: int  # the largest batch size considered
    cap_given: bool  # the cap came from the data size or max_batch_size
    left_out: tuple[int, ...]  # sizes batch norm cannot train as split into micro-batches
    provisional: tuple[str, ...]
    max_micro_batch_size: int
    min_micro_batch_size: int
    num_samples: int | None
    max_batch_size: int | None


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


def _sizes(
    throughput: Sequence[tuple[int, float]], max_micro_batch_size: int, cap: int, extrapolate: bool
) -> list[_Size]:
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
    b_simple: float | None,
    max_micro_batch_size: int,
    num_samples: int | None = None,
    max_batch_size: int | None = None,
    b_simple_interval: tuple[float, float] | None = None,
    ceiling_is_final: bool = True,
    min_micro_batch_size: int = 1,
) -> BatchSizeChoice:
    """Choose the batch size that minimises predicted time to a result (see the module docstring).

    ``throughput`` holds measured ``(batch_size, samples_per_s)`` pairs. ``b_simple`` is the noise
    scale B_simple, the estimate of ``B_noise`` in ``T(B)`` (``inf``: the gradient signal was not
    resolved, so only throughput matters; ``None``: not measured, so the smallest size within 10%
    of the best throughput is chosen). ``b_simple_interval`` gives the range of choices over the
    noise scale's confidence interval. ``ceiling_is_final`` is False when the memory search was
    cut short (by time): then nothing above the measured sizes is assumed. With
    ``min_micro_batch_size`` 2 (batch norm), sizes whose split into micro-batches would make one of
    one sample are left out, and a choice whose epoch of ``num_samples`` ends on one sample comes
    with the advice to drop that last batch.

    Examples:
        A memory search cut short at 32 by time: nothing above 32 is assumed, the choice is
        provisional.

        >>> tp = [(2**i, 2**i * 100.0) for i in range(6)]
        >>> choice = recommend(tp, b_simple=200.0, max_micro_batch_size=32, ceiling_is_final=False)
        >>> choice.batch_size, [c.batch_size for c in choice.curve][-1], bool(choice.provisional)
        (32, 32, True)
    """
    feasible = _feasible(
        throughput,
        max_micro_batch_size=max_micro_batch_size,
        num_samples=num_samples,
        max_batch_size=max_batch_size,
        ceiling_is_final=ceiling_is_final,
        min_micro_batch_size=min_micro_batch_size,
    )
    choice = _choose(feasible, b_simple, b_simple_interval)
    return replace(choice, decision=_explain(choice, feasible))


def _feasible(
    throughput: Sequence[tuple[int, float]],
    *,
    max_micro_batch_size: int,
    num_samples: int | None,
    max_batch_size: int | None,
    ceiling_is_final: bool,
    min_micro_batch_size: int,
) -> _Feasible:
    """The sizes the choice may fall on: measured ones within the cap, powers of two above them
    when the ceiling is final, less those batch norm cannot train on."""
    measured = [(int(b), float(s)) for b, s in throughput if s > 0 and math.isfinite(s)]
    if not measured:
        raise BatchfitError("No throughput was measured; nothing to recommend.")
    if max_micro_batch_size < 1:
        raise BatchfitError(f"The micro-batch ceiling must be >= 1; got {max_micro_batch_size}.")
    caps = [c for c in (num_samples, max_batch_size) if c is not None]
    cap = min(caps) if caps else max(b for b, _ in measured) * 8
    top = max((b for b, _ in measured if b <= min(cap, max_micro_batch_size)), default=0)
    provisional = _provisional(top, max_micro_batch_size, cap, ceiling_is_final)
    sizes = _sizes(measured, max_micro_batch_size, cap, extrapolate=not provisional)
    left_out: list[int] = []
    if min_micro_batch_size > 1:
        left_out = [
            b
            for b, _, _ in sizes
            if has_single_sample_micro_batch(None, b, split_batch(b, max_micro_batch_size)[0])
        ]
        sizes = [size for size in sizes if size[0] not in left_out]
        if not sizes:
            raise BatchfitError(
                "Every batch size considered would make a micro-batch of one sample, which batch "
                f"norm cannot train on; give a larger {opt('max_batch_size')} or more data."
            )
    return _Feasible(
        measured=tuple(measured),
        sizes=tuple(sizes),
        cap=cap,
        cap_given=bool(caps),
        left_out=tuple(left_out),
        provisional=provisional,
        max_micro_batch_size=max_micro_batch_size,
        min_micro_batch_size=min_micro_batch_size,
        num_samples=num_samples,
        max_batch_size=max_batch_size,
    )


def _predicted_times(sizes: Sequence[_Size], b_simple: float) -> list[float]:
    """``T(B)`` up to a constant for each size: ``(B + B_simple) / samples_per_s(B)``."""
    if math.isinf(b_simple):
        return [1.0 / s for _, s, _ in sizes]
    return [(b + max(b_simple, 0.0)) / s for b, s, _ in sizes]


def _fastest(sizes: Sequence[_Size], times: Sequence[float]) -> int:
    """The batch size of the smallest time; among equal times (flat throughput, an unbounded
    noise scale) the smaller batch."""
    best = min(times)
    return min(b for (b, _, _), t in zip(sizes, times, strict=True) if t <= best)


def _choose(
    feasible: _Feasible, b_simple: float | None, interval: tuple[float, float] | None
) -> BatchSizeChoice:
    """The choice in numbers: the batch size, the curve of predicted times, the runner-up and the
    range of choices over the noise scale's interval (its ``decision`` is left empty)."""
    sizes = feasible.sizes
    if b_simple is None:
        best_speed = max(s for _, s, _ in sizes)
        chosen = min(b for b, s, _ in sizes if s >= NEAR_BEST_SPEED * best_speed)
        times = [1.0 / s for _, s, _ in sizes]
    else:
        times = _predicted_times(sizes, b_simple)
        chosen = _fastest(sizes, times)
    best_time = times[[b for b, _, _ in sizes].index(chosen)]
    curve = []
    for (b, s, measured), t in zip(sizes, times, strict=True):
        micro, accumulation = split_batch(b, feasible.max_micro_batch_size)
        unbounded = b_simple is not None and math.isinf(b_simple)
        steps = math.inf if unbounded else 1 + (b_simple or 0) / b
        curve.append(Candidate(b, micro, accumulation, s, measured, steps, t / best_time))
    ranked = sorted(curve, key=lambda c: (c.relative_time, c.batch_size))
    best = next(c for c in curve if c.batch_size == chosen)
    runner_up = next((c for c in ranked if c.batch_size != chosen), None)
    choice_range = (chosen, chosen)
    if b_simple is not None and interval is not None:
        picks = [_fastest(sizes, _predicted_times(sizes, end)) for end in interval]
        choice_range = (min(picks), max(picks))
    return BatchSizeChoice(
        batch_size=chosen,
        micro_batch_size=best.micro_batch_size,
        accumulation=best.accumulation,
        runner_up=runner_up,
        curve=tuple(curve),
        b_simple=b_simple,
        batch_size_range=choice_range,
        flattens_at=flattening_point(feasible.measured),
        provisional=feasible.provisional,
    )


def _explain(choice: BatchSizeChoice, feasible: _Feasible) -> tuple[str, ...]:
    """Every rule the choice applied, in plain words, in the order applied."""
    lines: list[str] = []
    if feasible.left_out:
        lines.append(
            f"Left out B={', '.join(map(str, feasible.left_out))}: batch norm cannot train on one "
            "sample, and split into micro-batches that fit, these leave one."
        )
    if choice.b_simple is None:
        lines.append(
            "No gradient noise scale was measured, so the steps a batch size saves are unknown: "
            f"chose the smallest batch within {1 - NEAR_BEST_SPEED:.0%} of the best measured "
            f"throughput ({choice.batch_size})."
        )
    lines.append(_throughput_reason(choice, feasible))
    if choice.b_simple is not None:
        lines += _noise_reasons(choice, choice.b_simple)
    lines += _accumulation_reasons(choice, feasible)
    lines += _limit_reasons(choice, feasible)
    return tuple(lines)


def _throughput_reason(choice: BatchSizeChoice, feasible: _Feasible) -> str:
    return throughput_sentence(choice.flattens_at, feasible.measured)


def throughput_sentence(flattens_at: int | None, measured: Sequence[tuple[int, float]]) -> str:
    """What the measured throughput does, in one sentence that the throughput table beside it
    cannot contradict: where it flattens; else where it peaks and which larger sizes fall; else
    that it still grows with each doubling.

    >>> print(throughput_sentence(None, [(32, 100.0), (64, 200.0), (128, 150.0)]))
    Throughput stops growing at B=64 (200 samples/s, the highest measured); larger sizes fall:
    150 samples/s at B=128.
    >>> print(throughput_sentence(None, [(32, 100.0), (64, 200.0)]))
    Throughput still grows by 10% or more with each doubling up to the largest size measured
    (64).
    """
    if flattens_at is not None:
        return (
            f"Throughput flattens after {flattens_at}: doubling the batch beyond it gains "
            f"less than {FLAT_GAIN:.0%} samples/s."
        )
    ordered = sorted(measured)
    speed = dict(ordered)
    gains = all(speed[2 * b] >= (1 + FLAT_GAIN) * s for b, s in ordered if 2 * b in speed)
    rising = all(later > s for (_, s), (_, later) in zip(ordered, ordered[1:], strict=False))
    if len(ordered) < 2 or (gains and rising):
        return (
            f"Throughput still grows by {FLAT_GAIN:.0%} or more with each doubling up to the "
            f"largest size measured ({max((b for b, _ in ordered), default=0)})."
        )
    peak_b, peak_s = max(ordered, key=lambda p: (p[1], -p[0]))
    text = (
        f"Throughput stops growing at B={peak_b} ({_fmt(peak_s)} samples/s, the highest measured)"
    )
    falls = [(b, s) for b, s in ordered if b > peak_b]
    if falls:
        listed = [
            f"{_fmt(s)} samples/s at B={b}" if i == 0 else f"{_fmt(s)} at B={b}"
            for i, (b, s) in enumerate(falls)
        ]
        text += "; larger sizes fall: " + ", ".join(listed)
    flat = [
        b
        for b, s in ordered
        if b < peak_b and 2 * b in speed and speed[2 * b] < (1 + FLAT_GAIN) * s
    ]
    if flat:
        text += f"; doubling gains under {FLAT_GAIN:.0%} already at B={', '.join(map(str, flat))}"
    return text + "."


def _noise_reasons(choice: BatchSizeChoice, b_simple: float) -> list[str]:
    """What the noise scale says about steps, and where the predicted time is smallest."""
    if math.isinf(b_simple):
        lines = [
            "The gradient noise scale is unbounded (the mean gradient was not resolved under "
            "the noise), so every batch size saves steps in proportion: time to a result "
            "follows throughput alone."
        ]
    else:
        lines = [
            f"Gradient noise scale ~{_fmt(b_simple)}: steps needed S(B) = S_min (1 + "
            f"{_fmt(b_simple)}/B), so beyond ~{_fmt(2 * b_simple)} extra samples per step buy "
            "few steps."
        ]
    runner_up = choice.runner_up
    lines.append(
        f"Predicted time to a result ~ (B + B_noise) / samples_per_s(B) is smallest at "
        f"B={choice.batch_size}"
        + (
            f"; runner-up B={runner_up.batch_size} at {runner_up.relative_time:.2f}x the time."
            if runner_up
            else "."
        )
    )
    low, high = choice.batch_size_range
    if low != high:
        lines.append(
            f"Over the noise scale's confidence interval the best batch size ranges from "
            f"{low} to {high}."
        )
    return lines


def _accumulation_reasons(choice: BatchSizeChoice, feasible: _Feasible) -> list[str]:
    """Why the choice is, or is not, above the memory ceiling."""
    ceiling = feasible.max_micro_batch_size
    lines = []
    if choice.accumulation > 1:
        lines.append(
            f"B={choice.batch_size} exceeds the micro-batch ceiling ({ceiling}): "
            f"{choice.accumulation} micro-batches of {choice.micro_batch_size} accumulated "
            "(exactly the same update; no extra speed on one device)."
        )
    elif (
        choice.b_simple is not None
        and choice.b_simple > choice.batch_size
        and choice.batch_size >= ceiling
        and any(c.accumulation > 1 for c in choice.curve)
    ):
        lines.append(
            f"Batches above the memory ceiling ({ceiling}) need accumulation, which "
            "adds no speed on one device: they would cost more samples per step without "
            "saving time, so the ceiling is the largest useful batch here."
        )
    if any(not c.measured for c in choice.curve):
        lines.append(
            f"Above the memory ceiling ({ceiling}) a batch runs as accumulated "
            "micro-batches, so its throughput is taken as that of the ceiling."
        )
    return lines


def _limit_reasons(choice: BatchSizeChoice, feasible: _Feasible) -> list[str]:
    """What was not judged, what capped the sizes, and what the epoch's last batch needs."""
    lines = []
    if feasible.provisional:
        lines.append(
            f"Provisional: {'; '.join(feasible.provisional)}. Give a larger "
            f"{opt('time_budget')} to measure them."
        )
    if feasible.cap_given:
        lines.append(
            f"Batch sizes considered: up to {feasible.cap} "
            f"({_cap_reason(feasible.num_samples, feasible.max_batch_size)})."
        )
    if feasible.min_micro_batch_size > 1 and has_single_sample_micro_batch(
        feasible.num_samples, choice.batch_size, choice.micro_batch_size
    ):
        lines.append(
            f"Each epoch of {feasible.num_samples} samples ends on a batch of one sample at "
            f"B={choice.batch_size}, which batch norm cannot train on: train with "
            f"{opt_value('drop_last', True)}."
        )
    return lines


def _cap_reason(num_samples: int | None, max_batch_size: int | None) -> str:
    if max_batch_size is not None and (num_samples is None or max_batch_size <= num_samples):
        return opt("max_batch_size")
    return f"the training set holds {num_samples} samples"

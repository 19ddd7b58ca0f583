"""Does tune's recommendation hold up in a sweep? The sweep's check of it, by docs/design.md's bar.

Tune's batch size joins the sweep at the sweep's own learning rate, and one more run trains it
at tune's learning rate; that run is judged. It *agrees* when it reaches the target within
:data:`AGREEMENT_FACTOR` times the training seconds of the fastest swept size. Pure: per-size
:class:`~batchfit.core.sweep_records.SizeSummary` records in, a frozen :class:`TuneCheck` out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from batchfit.core.sweep_records import Divergence, SizeSummary, format_seconds

#: docs/design.md's bar: the recommended batch size is good if its time to target is within this
#: factor of the fastest size found by the sweep.
AGREEMENT_FACTOR = 1.25


@dataclass(frozen=True)
class Recommendation:
    """Tune's answer as the sweep reads it from ``report.json``: the batch size, and the learning
    rate when the report gives one."""

    batch_size: int
    lr: float | None = None

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Recommendation:
        return cls(record["batch_size"], record.get("lr"))


@dataclass(frozen=True)
class TuneCheck:
    """The run judged (``judged`` says which: tune's own, or the nearest swept size), its time to
    target against the fastest size's, whether that ``agrees``, and the ``reason`` in words.
    ``sweep.json``'s ``verdict.tune`` holds these fields, in this order."""

    recommended_batch_size: int
    recommended_lr: float | None
    judged: str
    swept_batch_size: int
    swept_lr: float
    seconds_to_target: float | None
    best: float | None
    diverged: Divergence | None
    fastest_batch_size: int | None
    seconds_ratio: float | None
    agrees: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def nearest_size(batch_size: int, sizes: Sequence[int]) -> int:
    """The swept size closest to ``batch_size`` on a log scale (the smaller one on a tie).

    >>> nearest_size(100, [32, 64, 128, 256])
    128
    """
    return min(sizes, key=lambda s: (abs(math.log(s / batch_size)), s))


def compare_with_tune(
    sizes: Sequence[SizeSummary],
    recommended_batch_size: int,
    recommended_lr: float | None,
    fastest_batch_size: int | None,
    fastest_seconds: float | None,
    tune_run: SizeSummary | None = None,
    not_run: str | None = None,
) -> TuneCheck:
    """Does tune's recommendation do well in the sweep? The bar of docs/design.md: it agrees when it
    reaches the target within :data:`AGREEMENT_FACTOR` times the time of the fastest swept size.

    ``tune_run`` is the sweep's run at tune's batch size *and* tune's learning rate; it is what is
    judged. Without it (the report gives no lr, or tune's size could not be run: ``not_run`` says
    why), the swept size nearest to tune's, at the sweep's own learning rate, stands in.

    >>> from batchfit.core.sweep_records import TimeToTarget
    >>> swept = [SizeSummary(64, 1e-3, 5, (), TimeToTarget(True, 5, 320, 1.2))]
    >>> tune = compare_with_tune(swept, 64, None, 64, 1.0)
    >>> tune.seconds_ratio, tune.agrees
    (1.2, True)
    """
    by_size = {s.batch_size: s for s in sizes}
    # choose: the run judged, and how its time compares with the fastest size's
    if tune_run is not None:
        judged = tune_run
    else:
        judged = by_size[nearest_size(recommended_batch_size, list(by_size))]
    seconds = judged.time_to_target.seconds
    ratio, agrees = _tune_agreement(judged, seconds, fastest_seconds)
    # explain
    where = _tune_where(recommended_batch_size, judged, tune_run is not None)
    fastest = (
        f"B={fastest_batch_size}, {format_seconds(fastest_seconds)}"
        if fastest_seconds is not None
        else None
    )
    reason = _tune_reason(where, judged, seconds, fastest, ratio, agrees)
    reason += _tune_aside(
        by_size, recommended_batch_size, recommended_lr, judged, tune_run, not_run
    )
    return TuneCheck(
        recommended_batch_size=recommended_batch_size,
        recommended_lr=recommended_lr,
        judged="tune's batch size and lr" if tune_run is not None else "nearest swept size",
        swept_batch_size=judged.batch_size,
        swept_lr=judged.lr,
        seconds_to_target=seconds,
        best=judged.best.value if judged.best else None,
        diverged=judged.diverged,
        fastest_batch_size=fastest_batch_size,
        seconds_ratio=round(ratio, 4) if ratio is not None else None,
        agrees=agrees,
        reason=reason,
    )


def _tune_agreement(
    judged: SizeSummary, seconds: float | None, fastest_seconds: float | None
) -> tuple[float | None, bool]:
    """Tune's time over the fastest size's (when both reached the target) and whether it agrees:
    a run that diverged or missed the target does not; one that reached it alone does."""
    if judged.diverged or seconds is None:
        return None, False
    if fastest_seconds is None:
        return None, True
    ratio = seconds / fastest_seconds if fastest_seconds > 0 else 1.0
    return ratio, ratio <= AGREEMENT_FACTOR


def _tune_where(recommended_batch_size: int, judged: SizeSummary, own_run: bool) -> str:
    """The run judged, in words: tune's own run, its size in the sweep, or the nearest size."""
    if own_run:
        return f"B={recommended_batch_size} at its lr {judged.lr:.3g}"
    if judged.batch_size == recommended_batch_size:
        return f"B={recommended_batch_size}"
    return f"B={recommended_batch_size} (not swept; nearest swept B={judged.batch_size})"


def _tune_reason(
    where: str,
    judged: SizeSummary,
    seconds: float | None,
    fastest: str | None,
    ratio: float | None,
    agrees: bool,
) -> str:
    if judged.diverged:
        return f"tune's {where} diverged (step {judged.diverged.step}): disagrees."
    if seconds is None and fastest is None:
        return f"No size reached the target, tune's {where} neither: cannot be confirmed."
    if seconds is None:
        return (
            f"tune's {where} did not reach the target in the sweep's budget; the fastest "
            f"size did ({fastest}): disagrees."
        )
    if ratio is None:
        return (
            f"tune's {where} reached the target in {format_seconds(seconds)} and no swept size "
            "did: agrees."
        )
    verb = "agrees" if agrees else "disagrees"
    return (
        f"tune's {where} reached the target in {format_seconds(seconds)}, {ratio:.2f}x the "
        f"fastest ({fastest}): {verb} (within {AGREEMENT_FACTOR}x counts as agreement)."
    )


def _tune_aside(
    by_size: Mapping[int, SizeSummary],
    recommended_batch_size: int,
    recommended_lr: float | None,
    judged: SizeSummary,
    tune_run: SizeSummary | None,
    not_run: str | None,
) -> str:
    """What sets the judged run apart: the sweep's own lr at tune's size, or why tune's lr was
    not run."""
    if tune_run is not None:
        scaled = by_size.get(recommended_batch_size)
        if scaled is None or scaled is tune_run:
            return ""
        took = scaled.time_to_target.seconds
        return f" At the sweep's lr {scaled.lr:.3g}, B={recommended_batch_size} " + (
            f"took {format_seconds(took)}." if took is not None else "did not reach it."
        )
    if not_run:
        return f" {not_run}"
    swept = judged.batch_size
    if recommended_lr is None:
        return f" report.json gives no lr, so B={swept} ran at the sweep's lr."
    return f" tune's lr {recommended_lr:.3g}; the sweep ran B={swept} at lr {judged.lr:.3g}."

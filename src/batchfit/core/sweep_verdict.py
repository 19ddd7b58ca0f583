"""What a sweep's numbers say: the best size, the fastest to target, the seed's claims, tune.

:func:`verdict` puts together what the other sweep modules measure: the per-size records
(:mod:`~batchfit.core.sweep_records`), the claims (:mod:`~batchfit.core.sweep_claims`) and the
check of tune's recommendation (:mod:`~batchfit.core.sweep_tune_check`), into one frozen
:class:`Verdict` whose ``lines`` say it in words. Pure: records in, a record out; no torch, no
files. The sweep and ``--resume`` (which re-reads finished runs from JSON) turn their JSON dicts
into records with :meth:`~batchfit.core.sweep_records.SizeSummary.from_dict` before calling it.

Examples:
    >>> from batchfit.core.sweep_records import BestPoint, TimeToTarget
    >>> size = SizeSummary(64, 1e-3, 10, (), TimeToTarget(True, 5, 320, 0.5), BestPoint(0.9, 5))
    >>> verdict([size], "val_accuracy", Target("val_accuracy", 0.8, True)).lines[1]
    'Fastest to val_accuracy >= 0.8: B=64 in 500 ms of training (5 steps, 320 examples).'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from batchfit.core.options import opt
from batchfit.core.sweep_claims import (
    Claim,
    check_claims,
    full_batch_claim,
    sampling_noise,
    sizes_claim,
)
from batchfit.core.sweep_inputs import Target, higher_is_better
from batchfit.core.sweep_records import SizeSummary, format_seconds
from batchfit.core.sweep_tune_check import Recommendation, TuneCheck, compare_with_tune


@dataclass(frozen=True)
class Verdict:
    """The sweep's answer: the best size, the fastest to target, the seed's claims, and whether
    tune's recommendation agrees. ``lines`` say it in words."""

    best_batch_size: int | None
    best_value: float | None
    fastest_batch_size: int | None
    fastest_seconds: float | None
    claims: tuple[Claim, ...]
    tune: TuneCheck | None
    lines: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def best_size(usable: Sequence[SizeSummary], metric: str) -> SizeSummary | None:
    """The size with the best validation value (the smaller batch size on a tie)."""
    sign = 1 if higher_is_better(metric) else -1
    scored = [(sign * s.best.value, -s.batch_size, -i) for i, s in enumerate(usable) if s.best]
    return usable[-max(scored)[2]] if scored else None


def fastest_size(usable: Sequence[SizeSummary]) -> SizeSummary | None:
    """The size that reached the target in the fewest training seconds (smaller B on a tie)."""
    reached = [
        (s.time_to_target.seconds, s.batch_size, i)
        for i, s in enumerate(usable)
        if s.time_to_target.reached and s.time_to_target.seconds is not None
    ]
    return usable[min(reached)[2]] if reached else None


def verdict(
    sizes: Sequence[SizeSummary],
    metric: str,
    target: Target,
    val_samples: int | None = None,
    recommendation: Recommendation | None = None,
    *,
    samples: int | None = None,
    initial: float | None = None,
    tune_run: SizeSummary | None = None,
    tune_not_run: str | None = None,
    notes: Sequence[str] = (),
) -> Verdict:
    """The best size by validation, the fastest to ``target``, the seed's claims, and tune.

    ``sizes`` holds one summary per batch size; ``recommendation`` is tune's from its
    ``report.json``, ``tune_run`` the run at that size and lr (see :func:`compare_with_tune`).
    Sizes whose runs diverged are named but left out of the best, the fastest and the claims.
    ``samples`` (the training set size) marks the full-batch run, whose curve is read for the
    full-batch claim; ``initial`` is the metric at the initial weights, to warn about a target met
    before training. ``notes`` come first in ``lines``. Ties go to the smaller batch size.

    >>> from batchfit.core.sweep_records import BestPoint, TimeToTarget
    >>> size = SizeSummary(64, 1e-3, 10, (), TimeToTarget(True, 5, 320, 0.5), BestPoint(0.9, 5))
    >>> verdict([size], "val_accuracy", Target("val_accuracy", 0.8, True)).lines[0]
    'Best validation: B=64 (val_accuracy 0.9000 at step 5, lr 0.001).'
    """
    # choose
    usable = [s for s in sizes if not s.diverged]
    best, fastest = best_size(usable, metric), fastest_size(usable)
    claims = _all_claims(sizes, usable, metric, val_samples, samples, best, fastest)
    tune = None
    if recommendation is not None:
        tune = compare_with_tune(
            sizes,
            recommendation.batch_size,
            recommendation.lr,
            fastest.batch_size if fastest else None,
            fastest.time_to_target.seconds if fastest else None,
            tune_run,
            tune_not_run,
        )
    # explain
    lines = [
        *notes,
        *_initial_lines(target, metric, initial),
        *_result_lines(sizes, usable, best, fastest, metric, target),
        *[claim.describe() for claim in claims],
        *([tune.reason] if tune is not None else []),
    ]
    return Verdict(
        best_batch_size=best.batch_size if best else None,
        best_value=best.best.value if best and best.best else None,
        fastest_batch_size=fastest.batch_size if fastest else None,
        fastest_seconds=fastest.time_to_target.seconds if fastest else None,
        claims=claims,
        tune=tune,
        lines=tuple(lines),
    )


def _all_claims(
    sizes: Sequence[SizeSummary],
    usable: Sequence[SizeSummary],
    metric: str,
    val_samples: int | None,
    samples: int | None,
    best: SizeSummary | None,
    fastest: SizeSummary | None,
) -> tuple[Claim, ...]:
    """The trend claims, the full-batch claim (when full batch was swept) and the 32-256 claim."""
    claims = list(check_claims(usable, metric, val_samples))
    full = next((s for s in sizes if samples is not None and s.batch_size == samples), None)
    if full is not None:
        claims.append(full_batch_claim(full, usable, metric, val_samples))
    claims.append(
        sizes_claim(
            [s.batch_size for s in usable],
            best.batch_size if best else None,
            fastest.batch_size if fastest else None,
            _ties(usable, best, metric, val_samples),
        )
    )
    return tuple(claims)


def _ties(
    usable: Sequence[SizeSummary],
    best: SizeSummary | None,
    metric: str,
    val_samples: int | None,
) -> list[int]:
    """The sizes whose best value is within twice the validation sampling error of the best one's
    (equal to it, for losses, whose error is not known)."""
    if best is None or best.best is None:
        return []
    top = best.best.value
    noise = sampling_noise(metric, top, val_samples)
    return [s.batch_size for s in usable if s.best and abs(s.best.value - top) <= noise]


def _initial_lines(target: Target, metric: str, initial: float | None) -> list[str]:
    """A warning when the target is met before any training: then every time to it is 0."""
    if initial is None or not target.reached(initial):
        return []
    if target.source == "given":
        return [
            f"The target {target.describe()} is met already at the initial weights ({metric} "
            f"{initial:.4g}), so every size reaches it at step 0; give a harder "
            f"{opt('target_level')}."
        ]
    return [
        f"No size improved on the initial weights' {metric} ({initial:.4g}), so the automatic "
        "target and the time to it mean nothing here."
    ]


def _result_lines(
    sizes: Sequence[SizeSummary],
    usable: Sequence[SizeSummary],
    best: SizeSummary | None,
    fastest: SizeSummary | None,
    metric: str,
    target: Target,
) -> list[str]:
    """The best size, the fastest, the sizes that missed or diverged and the grid's edges."""
    lines = []
    if best is not None and best.best is not None:
        lines.append(
            f"Best validation: B={best.batch_size} ({metric} {best.best.value:.4f} "
            f"at step {best.best.step}, lr {best.lr:.3g})."
        )
    ttt = fastest.time_to_target if fastest is not None else None
    if fastest is not None and ttt is not None and ttt.seconds is not None:
        lines.append(
            f"Fastest to {target.describe()}: B={fastest.batch_size} in "
            f"{format_seconds(ttt.seconds)} of training ({ttt.steps} steps, "
            f"{ttt.samples_seen} examples)."
        )
    else:
        lines.append(f"No batch size reached {target.describe()} within the budget.")
    missed = [str(s.batch_size) for s in usable if not s.time_to_target.reached]
    if missed and fastest is not None:
        lines.append(f"Not reached by B={', '.join(missed)}.")
    lines += _divergence_lines(sizes)
    edge = [str(s.batch_size) for s in usable if s.lr_at_grid_edge]
    if edge:
        lines.append(
            f"The chosen lr is at the edge of the grid for B={', '.join(edge)}: widen "
            f"{opt('lr_grid')} to be sure it is the best."
        )
    return lines


def _divergence_lines(sizes: Sequence[SizeSummary]) -> list[str]:
    lines = []
    for s in sizes:
        b = s.batch_size
        blew_up = [g for g in s.lr_grid if g.diverged]
        if s.diverged:
            lrs = ", ".join(f"{g.lr:.3g}" for g in blew_up) or f"{s.lr:.3g}"
            lines.append(
                f"B={b} diverged at every lr tried (lr {lrs}; {s.diverged.reason}): left "
                f"out of the best, the fastest and the claims. Lower {opt('lr')} or widen "
                f"{opt('lr_grid')} downwards."
            )
        elif blew_up:
            lrs = ", ".join(f"{g.lr:.3g} (step {g.diverged})" for g in blew_up)
            lines.append(f"At B={b}, lr {lrs} diverged; the grid kept lr {s.lr:.3g}.")
    return lines

"""What one sweep run's curve says, and the per-size record the claims and the verdict read.

A run's validation curve is a list of evaluation points (``step``, ``samples_seen``,
``train_seconds`` and the ``val_*`` metrics); from it come the best point, the time to the target
and, with the training subset, the train-validation gap. ``sweep.json`` and ``--resume`` keep the
runs and size summaries as the JSON dicts they always were; :meth:`SizeSummary.from_dict` turns one
into the frozen record the claims and the verdict take, at the edge, so the pure code reads typed
fields and the file on disk stays byte for byte the same.

Examples:
    >>> from batchfit.core.sweep_inputs import Target
    >>> curve = [{"step": 0, "samples_seen": 0, "train_seconds": 0.0, "val_accuracy": 0.1},
    ...          {"step": 50, "samples_seen": 1600, "train_seconds": 0.4, "val_accuracy": 0.93}]
    >>> time_to_target(curve, Target("val_accuracy", 0.9, True)).to_dict()
    {'reached': True, 'steps': 50, 'samples_seen': 1600, 'seconds': 0.4}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from batchfit.core.sweep_inputs import Target, higher_is_better

#: One evaluation point of a curve: ``step``, ``samples_seen``, ``train_seconds``, ``val_*``.
Point = Mapping[str, float]


@dataclass(frozen=True)
class TimeToTarget:
    """Where a run first met the target: steps, examples and training seconds at that evaluation
    (all ``None`` when it never did). ``sweep.json`` holds :meth:`to_dict`'s keys."""

    reached: bool
    steps: int | None = None
    samples_seen: int | None = None
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> TimeToTarget:
        return cls(
            bool(record["reached"]), record["steps"], record["samples_seen"], record["seconds"]
        )


@dataclass(frozen=True)
class BestPoint:
    """A run's best validation value and the step it was reached at."""

    value: float
    step: int


@dataclass(frozen=True)
class Divergence:
    """Where a run's loss or weights became non-finite, and the message that says so."""

    step: int
    reason: str


@dataclass(frozen=True)
class GridPoint:
    """One learning rate of a size's ``lr_grid``: the rate, and the step it diverged at (or
    ``None``)."""

    lr: float
    diverged: int | None = None


@dataclass(frozen=True)
class SizeSummary:
    """One batch size's result as the claims and the verdict read it: the chosen learning rate's
    run (``lr``, ``steps``, ``curve``, ``best``, ``time_to_target``, ``gap``, the top Hessian
    eigenvalue as ``sharpness``, ``diverged``), the grid it was chosen from and whether the choice
    sits at the grid's edge. Built from ``sweep.json``'s size summary by :meth:`from_dict`."""

    batch_size: int
    lr: float
    steps: int
    curve: tuple[Point, ...]
    time_to_target: TimeToTarget
    best: BestPoint | None = None
    gap: Mapping[str, float] | None = None
    sharpness: float | None = None
    diverged: Divergence | None = None
    lr_grid: tuple[GridPoint, ...] = ()
    lr_at_grid_edge: bool = False

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> SizeSummary:
        """The record of a size summary (or of tune's run in that shape) as ``sweep.json`` holds
        it; keys the record does not read are left in the dict."""
        best, sharp, diverged = record.get("best"), record.get("sharpness"), record.get("diverged")
        grid = tuple(GridPoint(g["lr"], g.get("diverged")) for g in record.get("lr_grid") or ())
        return cls(
            batch_size=record["batch_size"],
            lr=record["lr"],
            steps=record["steps"],
            curve=tuple(record["curve"]),
            time_to_target=TimeToTarget.from_dict(record["time_to_target"]),
            best=BestPoint(best["value"], best["step"]) if best else None,
            gap=record.get("gap") or {},
            sharpness=sharp.get("eigenvalue") if sharp else None,
            diverged=Divergence(diverged["step"], diverged["reason"]) if diverged else None,
            lr_grid=grid,
            lr_at_grid_edge=bool(record.get("lr_at_grid_edge")),
        )


def best_point(curve: Sequence[Point], metric: str) -> dict[str, float] | None:
    """The evaluation point with the best value of ``metric`` (the earliest among ties), as
    ``sweep.json``'s ``best`` holds it."""
    points = [p for p in curve if p.get(metric) is not None and math.isfinite(p[metric])]
    if not points:
        return None
    sign = 1.0 if higher_is_better(metric) else -1.0
    best = max(points, key=lambda p: (sign * p[metric], -p["step"]))
    return {
        "value": best[metric],
        "step": best["step"],
        "samples_seen": best["samples_seen"],
        "seconds": best["train_seconds"],
    }


def time_to_target(curve: Sequence[Point], target: Target) -> TimeToTarget:
    """Steps, samples and training seconds at the first evaluation that meets ``target``.

    Resolution is the evaluation interval: the numbers are those of the first evaluation point at
    or past the target, an upper bound on when it was crossed.
    """
    for point in curve:
        if target.reached(point.get(target.metric)):
            return TimeToTarget(
                True, int(point["step"]), int(point["samples_seen"]), point["train_seconds"]
            )
    return TimeToTarget(False)


def gap(final: Mapping[str, float], train_subset: Mapping[str, float]) -> dict[str, float]:
    """Train-validation gap, both measured in eval mode: positive means better on training data.

    ``loss`` is val - train, ``accuracy`` is train - val.

    >>> gap({"val_loss": 0.5, "val_accuracy": 0.8}, {"loss": 0.1, "accuracy": 0.97})
    {'loss': 0.4, 'accuracy': 0.17}
    """
    out = {"loss": round(final["val_loss"] - train_subset["loss"], 12)}
    if "accuracy" in train_subset and "val_accuracy" in final:
        out["accuracy"] = round(train_subset["accuracy"] - final["val_accuracy"], 12)
    return out


def choose_lr(curves: Sequence[Sequence[Point]], diverged: Sequence[bool], metric: str) -> int:
    """Of one batch size's runs (one per learning rate, given by their curves and whether each
    diverged), the index of the one with the best validation value (its best over the run); ties
    go to the run listed first. A run that diverged is chosen only when every run of that size
    diverged: a learning rate that blows up is not one to use, however good the run looked
    before it did.

    >>> def curve(loss):
    ...     return [{"step": 5, "samples_seen": 80, "train_seconds": 0.1, "val_loss": loss}]
    >>> choose_lr([curve(0.2), curve(0.5)], [True, False], "val_loss")  # the first blew up
    1
    """
    sign = 1.0 if higher_is_better(metric) else -1.0
    runs = range(len(curves))
    stable = [i for i in runs if not diverged[i]] or list(runs)

    def score(i: int) -> float:
        point = best_point(curves[i], metric)
        return -math.inf if point is None else sign * point["value"]

    return max(stable, key=score)


def format_seconds(seconds: float) -> str:
    """Seconds for people: milliseconds below one second, so that 0.004 s does not read 0.00 s.

    >>> format_seconds(0.0042), format_seconds(0.0), format_seconds(12.345)
    ('4.2 ms', '0 ms', '12.35 s')
    """
    if seconds >= 1:
        return f"{seconds:.2f} s"
    ms = seconds * 1000
    return f"{ms:.0f} ms" if ms >= 10 or ms == 0 else f"{ms:.2g} ms"

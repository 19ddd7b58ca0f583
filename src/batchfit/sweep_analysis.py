"""What a sweep's numbers say: targets, best results, time to target, trends and the verdict.

Pure: plain numbers, lists and dicts in (the per-run records that :mod:`batchfit.sweep` writes),
numbers and frozen dataclasses out; no torch, no files. The sweep, its report and ``--resume``
(which re-reads finished runs from JSON) all go through these functions.

Examples:
    >>> t = parse_target("val_accuracy=0.9", ("val_loss", "val_accuracy"))
    >>> t.metric, t.value, t.higher_is_better
    ('val_accuracy', 0.9, True)
    >>> curve = [{"step": 0, "samples_seen": 0, "train_seconds": 0.0, "val_accuracy": 0.1},
    ...          {"step": 50, "samples_seen": 1600, "train_seconds": 0.4, "val_accuracy": 0.93}]
    >>> time_to_target(curve, t)
    {'reached': True, 'steps': 50, 'samples_seen': 1600, 'seconds': 0.4}
    >>> spearman([32, 64, 128, 256], [0.91, 0.90, 0.89, 0.85])
    -1.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from batchfit import validation
from batchfit.errors import BatchfitError
from batchfit.schedule import plan

#: Validation metrics the sweep records at each evaluation point (accuracy: classification only).
METRICS = ("val_accuracy", "val_loss")
#: ``--lr-grid`` with no factors: two halvings and two doublings around the scaled learning rate.
DEFAULT_LR_GRID = (0.25, 0.5, 1.0, 2.0, 4.0)
#: An automatic target sits this far from the initial value towards the best value any size reached.
AUTO_TARGET_SHARE = 0.9
#: Rank correlation (Spearman) at or beyond which a trend over batch sizes counts as one.
TREND_RHO = 0.8
#: DESIGN.md's bar: the recommended batch size is good if its time to target is within this
#: factor of the fastest size found by the sweep.
AGREEMENT_FACTOR = 1.25


def higher_is_better(metric: str) -> bool:
    """Losses go down, everything else (accuracy) goes up."""
    return not metric.endswith("loss")


@dataclass(frozen=True)
class Target:
    """A level of a validation metric to reach: ``val_accuracy >= 0.9`` or ``val_loss <= 0.5``.

    ``source`` is ``"given"`` (``--target``) or ``"auto"`` (chosen from the runs, see
    :func:`auto_target`).
    """

    metric: str
    value: float
    higher_is_better: bool
    source: str = "given"

    def reached(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value >= self.value if self.higher_is_better else value <= self.value

    def describe(self) -> str:
        return f"{self.metric} {'>=' if self.higher_is_better else '<='} {self.value:.4g}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"text": self.describe()}


def parse_target(text: str, metrics: Sequence[str] = METRICS) -> Target:
    """Parse ``METRIC=VALUE`` (``val_accuracy=0.9``, ``val_loss=0.5``) against the known metrics.

    Examples:
        >>> parse_target("val_loss=0.5").higher_is_better
        False
        >>> parse_target("accuracy=0.9")
        Traceback (most recent call last):
        ...
        batchfit.errors.BatchfitError: Unknown metric 'accuracy' in --target 'accuracy=0.9'; \
use one of val_accuracy, val_loss (e.g. --target val_accuracy=0.9).
    """
    example = f"e.g. --target {metrics[0]}={0.9 if higher_is_better(metrics[0]) else 0.5}"
    name, sep, value_text = str(text).partition("=")
    name = name.strip()
    if not sep or not name or not value_text.strip():
        raise BatchfitError(f"--target must be METRIC=VALUE, got {text!r} ({example}).")
    if name not in metrics:
        if name in METRICS:
            raise BatchfitError(
                f"{name} in --target {text!r} is not measured for this task's loss; use one "
                f"of {', '.join(metrics)} ({example})."
            )
        raise BatchfitError(
            f"Unknown metric '{name}' in --target {text!r}; use one of "
            f"{', '.join(metrics)} ({example})."
        )
    try:
        value = float(value_text)
    except ValueError:
        raise BatchfitError(f"The value in --target {text!r} is not a number; {example}.") from None
    if not math.isfinite(value):
        raise BatchfitError(f"The value in --target {text!r} must be finite; {example}.")
    if name.endswith("accuracy") and not 0.0 <= value <= 1.0:
        raise BatchfitError(
            f"An accuracy target must be a fraction in [0, 1], got {value:g} in --target "
            f"{text!r}; write 0.9 for 90%."
        )
    return Target(name, value, higher_is_better(name))


def auto_target(
    metric: str, initial: float, best: float, share: float = AUTO_TARGET_SHARE
) -> Target:
    """The target used when none is given: ``share`` of the way from the value at the initial
    weights to the best value any batch size reached, so it is reachable, scale-free and near the
    end of the useful progress (e.g. accuracy 0.10 -> best 0.90 gives the target 0.82).

    >>> auto_target("val_loss", 2.3, 0.3).value
    0.5
    """
    value = initial + share * (best - initial)
    return Target(metric, float(f"{value:.4g}"), higher_is_better(metric), source="auto")


def best_point(curve: Sequence[dict[str, float]], metric: str) -> dict[str, float] | None:
    """The evaluation point with the best value of ``metric`` (the earliest among ties)."""
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


def time_to_target(curve: Sequence[dict[str, float]], target: Target) -> dict[str, Any]:
    """Steps, samples and training seconds at the first evaluation that meets ``target``.

    Resolution is the evaluation interval: the numbers are those of the first evaluation point at
    or past the target, an upper bound on when it was crossed.
    """
    for point in curve:
        if target.reached(point.get(target.metric)):
            return {
                "reached": True,
                "steps": point["step"],
                "samples_seen": point["samples_seen"],
                "seconds": point["train_seconds"],
            }
    return {"reached": False, "steps": None, "samples_seen": None, "seconds": None}


def gap(final: dict[str, float], train_subset: dict[str, float]) -> dict[str, float]:
    """Train-validation gap, both measured in eval mode: positive means better on training data.

    ``loss`` is val - train, ``accuracy`` is train - val.

    >>> gap({"val_loss": 0.5, "val_accuracy": 0.8}, {"loss": 0.1, "accuracy": 0.97})
    {'loss': 0.4, 'accuracy': 0.17}
    """
    out = {"loss": round(final["val_loss"] - train_subset["loss"], 12)}
    if "accuracy" in train_subset and "val_accuracy" in final:
        out["accuracy"] = round(train_subset["accuracy"] - final["val_accuracy"], 12)
    return out


def steps_for_examples(examples: int, samples: int, batch_size: int) -> int:
    """Steps that see at least ``examples`` samples with epochs of ``samples`` (remainder batches
    included); the overshoot is less than one batch.

    >>> steps_for_examples(10_000, 4000, 256)   # 2 epochs of 16 steps, then 2000 / 256 -> 8
    40
    """
    validation.check("examples", examples)
    per_epoch = plan(samples, batch_size).steps_per_epoch
    whole, rest = divmod(examples, samples)
    return whole * per_epoch + math.ceil(rest / batch_size)


def parse_batch_sizes(text: str | Sequence[int | str], samples: int | None) -> list[int]:
    """Batch sizes from ``"32,64,128"`` (or a list); ``N`` or ``full`` means the whole training
    set. Sorted ascending; duplicates, sizes < 1 and sizes beyond the data are refused.

    >>> parse_batch_sizes("1, 32,N", 4000)
    [1, 32, 4000]
    """
    items = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    items = [p for p in items if p != ""]
    if not items:
        raise BatchfitError(
            "--batch-sizes is empty; give a comma-separated list such as 32,64,128,256."
        )
    sizes = []
    for item in items:
        if isinstance(item, str) and item.lower() in ("n", "full"):
            if samples is None:
                raise BatchfitError(
                    "Batch size N (full batch) needs data of known length; the training data "
                    "is a stream, so give numbers in --batch-sizes."
                )
            sizes.append(samples)
            continue
        try:
            size = int(item) if isinstance(item, str) else item
        except ValueError:
            size = item
        validation.check(
            "batch_size",
            size,
            "Give --batch-sizes as whole numbers, or N for full batch (e.g. 32,64,128,256,N).",
        )
        sizes.append(size)
    for size in sizes:
        if sizes.count(size) > 1:
            raise BatchfitError(
                f"Batch size {size} appears more than once in --batch-sizes; list each size once."
            )
        if samples is not None and size > samples:
            raise BatchfitError(
                f"Batch size {size} is larger than the training set ({samples} samples); "
                f"use N (= {samples}) for full batch, or a smaller size."
            )
    return sorted(sizes)


def parse_lr_grid(text: str | Sequence[float] | None) -> tuple[float, ...] | None:
    """Learning-rate factors for ``--lr-grid``: ``None`` (no grid), ``""``/``True`` (the default
    grid) or factors like ``"0.5,1,2"``. Always includes 1 (the rule-scaled learning rate).

    >>> parse_lr_grid("2,0.5")
    (0.5, 1.0, 2.0)
    """
    if text is None or text is False:
        return None
    if text is True or text == "":
        return DEFAULT_LR_GRID
    items = [p.strip() for p in text.split(",") if p.strip()] if isinstance(text, str) else text
    factors = set()
    for item in items:
        try:
            factor = float(item)
        except (TypeError, ValueError):
            factor = item
        validation.check(
            "lr_grid_factor",
            factor,
            "--lr-grid takes factors of the scaled learning rate, e.g. 0.25,0.5,1,2,4.",
        )
        factors.add(float(factor))
    return tuple(sorted(factors | {1.0}))


def choose_lr(runs: Sequence[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Of one batch size's runs (one per learning rate), the one with the best validation value
    (its best over the run); ties go to the run listed first."""
    sign = 1.0 if higher_is_better(metric) else -1.0

    def score(run: dict[str, Any]) -> float:
        point = best_point(run["curve"], metric)
        return -math.inf if point is None else sign * point["value"]

    return max(runs, key=score)


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


@dataclass(frozen=True)
class Claim:
    """One of the seed's claims, checked against the sweep: ``outcome`` is ``holds``,
    ``reversed``, ``no clear trend``, ``within noise`` or ``too few sizes``."""

    claim: str
    outcome: str
    rho: float | None
    detail: str


@dataclass(frozen=True)
class Verdict:
    """The sweep's answer: the best size, the fastest to target, the seed's claims, and whether
    tune's recommendation agrees. ``lines`` say it in words."""

    best_batch_size: int | None
    best_value: float | None
    fastest_batch_size: int | None
    fastest_seconds: float | None
    claims: tuple[Claim, ...]
    tune: dict[str, Any] | None
    lines: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def accuracy_noise(accuracy: float, samples: int) -> float:
    """Standard error of an accuracy measured on ``samples`` validation samples (binomial).

    >>> round(accuracy_noise(0.9, 1000), 4)
    0.0095
    """
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / samples) if samples else math.nan


def check_claims(
    sizes: Sequence[dict[str, Any]], metric: str, val_samples: int | None
) -> tuple[Claim, ...]:
    """Test the seed's three claims over the swept sizes by rank correlation with batch size.

    ``sizes`` holds one summary per batch size with ``batch_size``, ``best`` (``value``), ``gap``
    and ``sharpness`` (``eigenvalue``). A trend needs |Spearman rho| >= 0.8 over at least three
    sizes. For accuracy, a spread between sizes smaller than twice the sampling error of the
    validation set is reported as ``within noise``: a single seed cannot separate such differences.
    """
    batch_sizes = [s["batch_size"] for s in sizes]
    up = higher_is_better(metric)
    gap_key = "accuracy" if metric == "val_accuracy" else "loss"
    best = [s["best"]["value"] if s.get("best") else math.nan for s in sizes]
    gaps = [s["gap"].get(gap_key, math.nan) for s in sizes]
    sharp = [s["sharpness"]["eigenvalue"] for s in sizes]
    noise = None
    if metric == "val_accuracy" and val_samples and all(math.isfinite(v) for v in best):
        noise = 2 * accuracy_noise(sum(best) / len(best), val_samples)
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
            None,
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
    detail = f"{what}: {pairs}; Spearman rho with batch size {_fmt(rho)}"
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


def nearest_size(batch_size: int, sizes: Sequence[int]) -> int:
    """The swept size closest to ``batch_size`` on a log scale (the smaller one on a tie).

    >>> nearest_size(100, [32, 64, 128, 256])
    128
    """
    return min(sizes, key=lambda s: (abs(math.log(s / batch_size)), s))


def compare_with_tune(
    sizes: Sequence[dict[str, Any]],
    recommended_batch_size: int,
    recommended_lr: float | None,
    fastest_batch_size: int | None,
    fastest_seconds: float | None,
) -> dict[str, Any]:
    """Does tune's recommended batch size do well in the sweep? It agrees when the swept size
    nearest to it reached the target within 1.25x the time of the fastest size (DESIGN.md)."""
    by_size = {s["batch_size"]: s for s in sizes}
    swept = nearest_size(recommended_batch_size, list(by_size))
    mine = by_size[swept]
    seconds = mine["time_to_target"]["seconds"]
    out: dict[str, Any] = {
        "recommended_batch_size": recommended_batch_size,
        "recommended_lr": recommended_lr,
        "swept_batch_size": swept,
        "swept_lr": mine["lr"],
        "seconds_to_target": seconds,
        "fastest_batch_size": fastest_batch_size,
        "seconds_ratio": None,
        "agrees": False,
    }
    where = (
        f"B={recommended_batch_size}"
        if swept == recommended_batch_size
        else f"B={recommended_batch_size} (not swept; nearest swept B={swept})"
    )
    if fastest_seconds is None:
        out["reason"] = f"No size reached the target, so tune's {where} cannot be confirmed."
    elif seconds is None:
        out["reason"] = f"tune's {where} did not reach the target in the sweep's budget."
    else:
        ratio = seconds / fastest_seconds if fastest_seconds > 0 else 1.0
        out["seconds_ratio"] = round(ratio, 4)
        out["agrees"] = ratio <= AGREEMENT_FACTOR
        verb = "agrees" if out["agrees"] else "disagrees"
        out["reason"] = (
            f"tune's {where} reached the target in {seconds:.2f} s, {ratio:.2f}x the fastest "
            f"(B={fastest_batch_size}, {fastest_seconds:.2f} s): {verb} "
            f"(within {AGREEMENT_FACTOR}x counts as agreement)."
        )
    if recommended_lr is not None:
        out["reason"] += (
            f" tune's lr {recommended_lr:.3g}; the sweep ran B={swept} at lr {mine['lr']:.3g}."
        )
    return out


def verdict(
    sizes: Sequence[dict[str, Any]],
    metric: str,
    target: Target,
    val_samples: int | None = None,
    recommendation: dict[str, Any] | None = None,
) -> Verdict:
    """The best size by validation, the fastest to ``target``, the seed's claims, and tune.

    ``sizes`` holds one summary per batch size (``batch_size``, ``lr``, ``best``, ``gap``,
    ``sharpness``, ``time_to_target``); ``recommendation`` is ``{"batch_size", "lr"}`` from tune's
    ``report.json``. Ties go to the smaller batch size.
    """
    up = higher_is_better(metric)
    scored = [s for s in sizes if s.get("best")]
    best = (
        max(scored, key=lambda s: ((1 if up else -1) * s["best"]["value"], -s["batch_size"]))
        if scored
        else None
    )
    reached = [s for s in sizes if s["time_to_target"]["reached"]]
    fastest = (
        min(reached, key=lambda s: (s["time_to_target"]["seconds"], s["batch_size"]))
        if reached
        else None
    )
    claims = check_claims(sizes, metric, val_samples)
    tune = None
    if recommendation is not None:
        tune = compare_with_tune(
            sizes,
            recommendation["batch_size"],
            recommendation.get("lr"),
            fastest["batch_size"] if fastest else None,
            fastest["time_to_target"]["seconds"] if fastest else None,
        )
    lines = []
    if best is not None:
        lines.append(
            f"Best validation: B={best['batch_size']} ({metric} {best['best']['value']:.4f} "
            f"at step {best['best']['step']}, lr {best['lr']:.3g})."
        )
    if fastest is not None:
        ttt = fastest["time_to_target"]
        lines.append(
            f"Fastest to {target.describe()}: B={fastest['batch_size']} in "
            f"{ttt['seconds']:.2f} s of training ({ttt['steps']} steps, "
            f"{ttt['samples_seen']} examples)."
        )
    else:
        lines.append(f"No batch size reached {target.describe()} within the budget.")
    missed = [str(s["batch_size"]) for s in sizes if not s["time_to_target"]["reached"]]
    if missed and fastest is not None:
        lines.append(f"Not reached by B={', '.join(missed)}.")
    for claim in claims:
        lines.append(f"{claim.claim}? {claim.outcome} ({claim.detail}).")
    if tune is not None:
        lines.append(tune["reason"])
    return Verdict(
        best_batch_size=best["batch_size"] if best else None,
        best_value=best["best"]["value"] if best else None,
        fastest_batch_size=fastest["batch_size"] if fastest else None,
        fastest_seconds=fastest["time_to_target"]["seconds"] if fastest else None,
        claims=claims,
        tune=tune,
        lines=tuple(lines),
    )

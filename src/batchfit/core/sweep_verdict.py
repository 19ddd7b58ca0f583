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

from batchfit.core import options
from batchfit.core.accounting import plan
from batchfit.core.options import opt, opt_value
from batchfit.errors import BatchfitError

#: Validation metrics the sweep records at each evaluation point (accuracy: classification only).
METRICS = ("val_accuracy", "val_loss")
#: ``lr_grid=True`` (``--lr-grid`` with no factors): two halvings and two doublings around the
#: scaled learning rate.
DEFAULT_LR_GRID = (0.25, 0.5, 1.0, 2.0, 4.0)
#: An automatic target sits this far from the initial value towards the best value any size reached.
AUTO_TARGET_SHARE = 0.9
#: Rank correlation (Spearman) at or beyond which a trend over batch sizes counts as one.
TREND_RHO = 0.8
#: docs/design.md's bar: the recommended batch size is good if its time to target is within this
#: factor of the fastest size found by the sweep.
AGREEMENT_FACTOR = 1.25
#: A curve has plateaued when its last quarter gained at most this share of what the whole run
#: gained; the same share of the best size's gain separates "behind it" from "level with it".
PLATEAU_SHARE = 0.05
#: The sizes the seed says to try: 32, 64, 128 and 256.
SEED_SIZES = (32, 256)


def higher_is_better(metric: str) -> bool:
    """Losses go down, everything else (accuracy) goes up."""
    return not metric.endswith("loss")


@dataclass(frozen=True)
class Target:
    """A level of a validation metric to reach: ``val_accuracy >= 0.9`` or ``val_loss <= 0.5``.

    ``source`` is ``"given"`` (the ``target_level`` option, ``--target`` on the command line) or
    ``"auto"`` (chosen from the runs, see :func:`auto_target`).
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
        batchfit.errors.BatchfitError: Unknown metric 'accuracy' in target_level='accuracy=0.9'; \
use one of val_accuracy, val_loss (e.g. target_level='val_accuracy=0.9').
    """
    level = 0.9 if higher_is_better(metrics[0]) else 0.5
    example = f"e.g. {opt_value('target_level', f'{metrics[0]}={level}')}"
    given = opt_value("target_level", str(text))
    name, sep, value_text = str(text).partition("=")
    name = name.strip()
    if not sep or not name or not value_text.strip():
        raise BatchfitError(
            f"{opt('target_level')} must be METRIC=VALUE, got {text!r} ({example})."
        )
    if name not in metrics:
        if name in METRICS:
            raise BatchfitError(
                f"{name} in {given} is not measured for this task's loss; use one "
                f"of {', '.join(metrics)} ({example})."
            )
        raise BatchfitError(
            f"Unknown metric '{name}' in {given}; use one of {', '.join(metrics)} ({example})."
        )
    try:
        value = float(value_text)
    except ValueError:
        raise BatchfitError(f"The value in {given} is not a number; {example}.") from None
    if not math.isfinite(value):
        raise BatchfitError(f"The value in {given} must be finite; {example}.")
    if name.endswith("accuracy") and not 0.0 <= value <= 1.0:
        raise BatchfitError(
            f"An accuracy target must be a fraction in [0, 1], got {value:g} in {given}; "
            "write 0.9 for 90%."
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
    options.check("examples", examples)
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
            f"{opt('batch_sizes')} is empty; give a comma-separated list such as 32,64,128,256."
        )
    sizes = []
    for item in items:
        if isinstance(item, str) and item.lower() in ("n", "full"):
            if samples is None:
                raise BatchfitError(
                    "Batch size N (full batch) needs data of known length; the training data "
                    f"is a stream, so give numbers in {opt('batch_sizes')}."
                )
            sizes.append(samples)
            continue
        try:
            size = int(item) if isinstance(item, str) else item
        except ValueError:
            size = item
        options.check(
            "batch_size",
            size,
            f"Give {opt('batch_sizes')} as whole numbers, or N for full batch "
            "(e.g. 32,64,128,256,N).",
        )
        sizes.append(size)
    for size in sizes:
        if sizes.count(size) > 1:
            raise BatchfitError(
                f"Batch size {size} appears more than once in {opt('batch_sizes')}; list each "
                "size once."
            )
        if samples is not None and size > samples:
            raise BatchfitError(
                f"Batch size {size} is larger than the training set ({samples} samples); "
                f"use N (= {samples}) for full batch, or a smaller size."
            )
    return sorted(sizes)


def parse_lr_grid(text: str | Sequence[float] | None) -> tuple[float, ...] | None:
    """Learning-rate factors for ``lr_grid``: ``None`` (no grid), ``""``/``True`` (the default
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
        options.check(
            "lr_grid_factor",
            factor,
            f"{opt('lr_grid')} takes factors of the scaled learning rate, e.g. 0.25,0.5,1,2,4.",
        )
        factors.add(float(factor))
    return tuple(sorted(factors | {1.0}))


def choose_lr(runs: Sequence[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Of one batch size's runs (one per learning rate), the one with the best validation value
    (its best over the run); ties go to the run listed first. A run that diverged is chosen only
    when every run of that size diverged: a learning rate that blows up is not one to use, however
    good the run looked before it did.

    >>> def run(loss, diverged=None):
    ...     point = {"step": 5, "samples_seen": 80, "train_seconds": 0.1, "val_loss": loss}
    ...     return {"curve": [point], "diverged": diverged}
    >>> ok, blew_up = run(0.5), run(0.2, diverged={"step": 9})
    >>> choose_lr([blew_up, ok], "val_loss") is ok
    True
    """
    sign = 1.0 if higher_is_better(metric) else -1.0
    stable = [r for r in runs if not r.get("diverged")] or list(runs)

    def score(run: dict[str, Any]) -> float:
        point = best_point(run["curve"], metric)
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
    """Test the seed's three trend claims over the swept sizes by rank correlation with batch size.

    ``sizes`` holds one summary per batch size with ``batch_size``, ``best`` (``value``), ``gap``
    and ``sharpness`` (``eigenvalue``). A trend needs |Spearman rho| >= 0.8 over at least three
    sizes. For accuracy, a spread between sizes smaller than twice the sampling error of the
    validation set is reported as ``within noise``: a single seed cannot separate such differences.
    The accuracy gap gets the same threshold (it is read on the same validation set); sharpness and
    losses have no known sampling error, so they get none.
    """
    batch_sizes = [s["batch_size"] for s in sizes]
    up = higher_is_better(metric)
    gap_key = "accuracy" if metric == "val_accuracy" else "loss"
    best = [s["best"]["value"] if s.get("best") else math.nan for s in sizes]
    gaps = [(s.get("gap") or {}).get(gap_key, math.nan) for s in sizes]
    sharp = [(s.get("sharpness") or {}).get("eigenvalue", math.nan) for s in sizes]
    noise = None
    if metric == "val_accuracy" and val_samples and best and all(math.isfinite(v) for v in best):
        noise = _noise(metric, sum(best) / len(best), val_samples)
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


def _noise(metric: str, value: float, val_samples: int | None) -> float:
    """Twice the sampling error of an accuracy (0 for losses, whose error is not known)."""
    if metric != "val_accuracy" or not val_samples:
        return 0.0
    return 2 * accuracy_noise(value, val_samples)


@dataclass(frozen=True)
class _Tail:
    """The last quarter of a curve (by step): its first and last values and the gain over it,
    next to the gain over the whole curve (both signed so that positive is better)."""

    first: dict[str, float]
    last: dict[str, float]
    evaluations: int
    gain: float
    total_gain: float


def _tail(points: Sequence[dict[str, float]], metric: str) -> _Tail:
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
    full: dict[str, Any],
    others: Sequence[dict[str, Any]],
    metric: str,
    val_samples: int | None = None,
) -> Claim:
    """ "Full batch gets stuck in the first valley", read from the full-batch run's curve.

    Over the last quarter of its steps the curve is *still improving* when it gained more than
    5% of what the whole run gained (and, for accuracy, more than twice the validation sampling
    error): then the run had too few updates to tell, which is not being stuck. Otherwise it has
    *plateaued*; the claim ``holds`` when it plateaued behind the best other size (by more than
    5% of that size's gain and the sampling error) and is ``reversed`` when it plateaued level
    with it. ``full`` and ``others`` are per-size summaries (``batch_size``, ``steps``,
    ``curve``, ``best``).

    >>> points = [(0, 2.0), (10, 1.2), (20, 1.01), (40, 1.0)]
    >>> curve = [{"step": s, "val_loss": v} for s, v in points]
    >>> full = {"batch_size": 4000, "steps": 40, "curve": curve, "best": {"value": 1.0}}
    >>> full_batch_claim(full, [{"batch_size": 32, "best": {"value": 0.4}}], "val_loss").outcome
    'holds'
    """
    text = f"Full batch gets stuck in the first valley (B={full['batch_size']})"
    if full.get("diverged"):
        return Claim(text, "diverged", None, f"the run diverged at step {full['diverged']['step']}")
    points = [p for p in full["curve"] if _finite(p.get(metric))]
    if len(points) < 3:
        detail = (
            f"{len(points)} evaluation(s) in {full['steps']} steps; a plateau needs 3+ "
            f"(raise {opt('eval_points')} or the budget)"
        )
        return Claim(text, "too few evaluations", None, detail)
    # choose: still improving, or plateaued behind or level with the best other size
    tail = _tail(points, metric)
    detail = (
        f"{full['steps']} steps; {metric} {tail.first[metric]:.4g} -> {tail.last[metric]:.4g} "
        f"over its last {tail.evaluations} evaluations "
        f"(steps {tail.first['step']}-{tail.last['step']})"
    )
    noise = _noise(metric, tail.last[metric], val_samples)
    if tail.gain > max(PLATEAU_SHARE * abs(tail.total_gain), noise):
        return Claim(text, "still improving", None, detail + ": too few updates to tell, not stuck")
    rivals = [o for o in others if o.get("best") and o["batch_size"] != full["batch_size"]]
    if not rivals:
        return Claim(text, "plateaued", None, detail + "; no other size to compare it with")
    sign = 1.0 if higher_is_better(metric) else -1.0
    rival = max(rivals, key=lambda o: sign * o["best"]["value"])
    mine = full["best"]["value"] if full.get("best") else tail.last[metric]
    behind = sign * (rival["best"]["value"] - mine)
    scale = abs(rival["best"]["value"] - points[0][metric])
    stuck = behind > max(PLATEAU_SHARE * scale, _noise(metric, mine, val_samples))
    # explain
    detail += (
        f"; plateaued with best {mine:.4g} against {rival['best']['value']:.4g} at "
        f"B={rival['batch_size']}"
    )
    if stuck:
        return Claim(text, "holds", None, detail)
    return Claim(text, "reversed", None, detail + " (level with it: not stuck)")


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
    tune_run: dict[str, Any] | None = None,
    not_run: str | None = None,
) -> dict[str, Any]:
    """Does tune's recommendation do well in the sweep? The bar of docs/design.md: it agrees when it
    reaches the target within 1.25x the time of the fastest swept size.

    ``tune_run`` is the sweep's run at tune's batch size *and* tune's learning rate; it is what is
    judged. Without it (the report gives no lr, or tune's size could not be run: ``not_run`` says
    why), the swept size nearest to tune's, at the sweep's own learning rate, stands in.

    >>> point = {"reached": True, "steps": 5, "samples_seen": 320, "seconds": 1.2}
    >>> swept = [{"batch_size": 64, "lr": 1e-3, "time_to_target": point}]
    >>> tune = compare_with_tune(swept, 64, None, 64, 1.0)
    >>> tune["seconds_ratio"], tune["agrees"]
    (1.2, True)
    """
    by_size = {s["batch_size"]: s for s in sizes}
    # choose: the run judged, and how its time compares with the fastest size's
    if tune_run is not None:
        judged = tune_run
    else:
        judged = by_size[nearest_size(recommended_batch_size, list(by_size))]
    seconds = judged["time_to_target"]["seconds"]
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
    return {
        "recommended_batch_size": recommended_batch_size,
        "recommended_lr": recommended_lr,
        "judged": "tune's batch size and lr" if tune_run is not None else "nearest swept size",
        "swept_batch_size": judged["batch_size"],
        "swept_lr": judged["lr"],
        "seconds_to_target": seconds,
        "best": judged["best"]["value"] if judged.get("best") else None,
        "diverged": judged.get("diverged"),
        "fastest_batch_size": fastest_batch_size,
        "seconds_ratio": round(ratio, 4) if ratio is not None else None,
        "agrees": agrees,
        "reason": reason,
    }


def _tune_agreement(
    judged: dict[str, Any], seconds: float | None, fastest_seconds: float | None
) -> tuple[float | None, bool]:
    """Tune's time over the fastest size's (when both reached the target) and whether it agrees:
    a run that diverged or missed the target does not; one that reached it alone does."""
    if judged.get("diverged") or seconds is None:
        return None, False
    if fastest_seconds is None:
        return None, True
    ratio = seconds / fastest_seconds if fastest_seconds > 0 else 1.0
    return ratio, ratio <= AGREEMENT_FACTOR


def _tune_where(recommended_batch_size: int, judged: dict[str, Any], own_run: bool) -> str:
    """The run judged, in words: tune's own run, its size in the sweep, or the nearest size."""
    if own_run:
        return f"B={recommended_batch_size} at its lr {judged['lr']:.3g}"
    if judged["batch_size"] == recommended_batch_size:
        return f"B={recommended_batch_size}"
    return f"B={recommended_batch_size} (not swept; nearest swept B={judged['batch_size']})"


def _tune_reason(
    where: str,
    judged: dict[str, Any],
    seconds: float | None,
    fastest: str | None,
    ratio: float | None,
    agrees: bool,
) -> str:
    if judged.get("diverged"):
        return f"tune's {where} diverged (step {judged['diverged']['step']}): disagrees."
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
    by_size: dict[int, dict[str, Any]],
    recommended_batch_size: int,
    recommended_lr: float | None,
    judged: dict[str, Any],
    tune_run: dict[str, Any] | None,
    not_run: str | None,
) -> str:
    """What sets the judged run apart: the sweep's own lr at tune's size, or why tune's lr was
    not run."""
    if tune_run is not None:
        scaled = by_size.get(recommended_batch_size)
        if scaled is None or scaled is tune_run:
            return ""
        took = scaled["time_to_target"]["seconds"]
        return f" At the sweep's lr {scaled['lr']:.3g}, B={recommended_batch_size} " + (
            f"took {format_seconds(took)}." if took is not None else "did not reach it."
        )
    if not_run:
        return f" {not_run}"
    swept = judged["batch_size"]
    if recommended_lr is None:
        return f" report.json gives no lr, so B={swept} ran at the sweep's lr."
    return f" tune's lr {recommended_lr:.3g}; the sweep ran B={swept} at lr {judged['lr']:.3g}."


def best_size(usable: Sequence[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The size with the best validation value (the smaller batch size on a tie)."""
    scored = [s for s in usable if s.get("best")]
    if not scored:
        return None
    sign = 1 if higher_is_better(metric) else -1
    return max(scored, key=lambda s: (sign * s["best"]["value"], -s["batch_size"]))


def fastest_size(usable: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The size that reached the target in the fewest training seconds (smaller B on a tie)."""
    reached = [s for s in usable if s["time_to_target"]["reached"]]
    if not reached:
        return None
    return min(reached, key=lambda s: (s["time_to_target"]["seconds"], s["batch_size"]))


def verdict(
    sizes: Sequence[dict[str, Any]],
    metric: str,
    target: Target,
    val_samples: int | None = None,
    recommendation: dict[str, Any] | None = None,
    *,
    samples: int | None = None,
    initial: float | None = None,
    tune_run: dict[str, Any] | None = None,
    tune_not_run: str | None = None,
    notes: Sequence[str] = (),
) -> Verdict:
    """The best size by validation, the fastest to ``target``, the seed's claims, and tune.

    ``sizes`` holds one summary per batch size (``batch_size``, ``lr``, ``steps``, ``curve``,
    ``best``, ``gap``, ``sharpness``, ``time_to_target``, ``diverged``); ``recommendation`` is
    ``{"batch_size", "lr"}`` from tune's ``report.json``, ``tune_run`` the run at that size and lr
    (see :func:`compare_with_tune`). Sizes whose runs diverged are named but left out of the best,
    the fastest and the claims. ``samples`` (the training set size) marks the full-batch run,
    whose curve is read for the full-batch claim; ``initial`` is the metric at the initial
    weights, to warn about a target met before training. ``notes`` come first in ``lines``.
    Ties go to the smaller batch size.

    >>> point = {"reached": True, "steps": 5, "samples_seen": 320, "seconds": 0.5}
    >>> size = {"batch_size": 64, "lr": 1e-3, "time_to_target": point,
    ...         "best": {"value": 0.9, "step": 5}, "gap": {}, "sharpness": None}
    >>> verdict([size], "val_accuracy", Target("val_accuracy", 0.8, True)).lines[0]
    'Best validation: B=64 (val_accuracy 0.9000 at step 5, lr 0.001).'
    """
    # choose
    usable = [s for s in sizes if not s.get("diverged")]
    best, fastest = best_size(usable, metric), fastest_size(usable)
    claims = _all_claims(sizes, usable, metric, val_samples, samples, best, fastest)
    tune = None
    if recommendation is not None:
        tune = compare_with_tune(
            sizes,
            recommendation["batch_size"],
            recommendation.get("lr"),
            fastest["batch_size"] if fastest else None,
            fastest["time_to_target"]["seconds"] if fastest else None,
            tune_run,
            tune_not_run,
        )
    # explain
    lines = [
        *notes,
        *_initial_lines(target, metric, initial),
        *_result_lines(sizes, usable, best, fastest, metric, target),
        *[claim.describe() for claim in claims],
        *([tune["reason"]] if tune is not None else []),
    ]
    return Verdict(
        best_batch_size=best["batch_size"] if best else None,
        best_value=best["best"]["value"] if best else None,
        fastest_batch_size=fastest["batch_size"] if fastest else None,
        fastest_seconds=fastest["time_to_target"]["seconds"] if fastest else None,
        claims=claims,
        tune=tune,
        lines=tuple(lines),
    )


def _all_claims(
    sizes: Sequence[dict[str, Any]],
    usable: Sequence[dict[str, Any]],
    metric: str,
    val_samples: int | None,
    samples: int | None,
    best: dict[str, Any] | None,
    fastest: dict[str, Any] | None,
) -> tuple[Claim, ...]:
    """The trend claims, the full-batch claim (when full batch was swept) and the 32-256 claim."""
    claims = list(check_claims(usable, metric, val_samples))
    full = next((s for s in sizes if samples is not None and s["batch_size"] == samples), None)
    if full is not None:
        claims.append(full_batch_claim(full, usable, metric, val_samples))
    claims.append(
        sizes_claim(
            [s["batch_size"] for s in usable],
            best["batch_size"] if best else None,
            fastest["batch_size"] if fastest else None,
            _ties(usable, best, metric, val_samples),
        )
    )
    return tuple(claims)


def _ties(
    usable: Sequence[dict[str, Any]],
    best: dict[str, Any] | None,
    metric: str,
    val_samples: int | None,
) -> list[int]:
    """The sizes whose best value is within twice the validation sampling error of the best one's
    (equal to it, for losses, whose error is not known)."""
    if best is None:
        return []
    top = best["best"]["value"]
    noise = _noise(metric, top, val_samples)
    return [
        s["batch_size"] for s in usable if s.get("best") and abs(s["best"]["value"] - top) <= noise
    ]


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
    sizes: Sequence[dict[str, Any]],
    usable: Sequence[dict[str, Any]],
    best: dict[str, Any] | None,
    fastest: dict[str, Any] | None,
    metric: str,
    target: Target,
) -> list[str]:
    """The best size, the fastest, the sizes that missed or diverged and the grid's edges."""
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
            f"{format_seconds(ttt['seconds'])} of training ({ttt['steps']} steps, "
            f"{ttt['samples_seen']} examples)."
        )
    else:
        lines.append(f"No batch size reached {target.describe()} within the budget.")
    missed = [str(s["batch_size"]) for s in usable if not s["time_to_target"]["reached"]]
    if missed and fastest is not None:
        lines.append(f"Not reached by B={', '.join(missed)}.")
    lines += _divergence_lines(sizes)
    edge = [str(s["batch_size"]) for s in usable if s.get("lr_at_grid_edge")]
    if edge:
        lines.append(
            f"The chosen lr is at the edge of the grid for B={', '.join(edge)}: widen "
            f"{opt('lr_grid')} to be sure it is the best."
        )
    return lines


def _divergence_lines(sizes: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for s in sizes:
        b = s["batch_size"]
        blew_up = [g for g in s.get("lr_grid") or () if g.get("diverged")]
        if s.get("diverged"):
            lrs = ", ".join(f"{g['lr']:.3g}" for g in blew_up) or f"{s['lr']:.3g}"
            lines.append(
                f"B={b} diverged at every lr tried (lr {lrs}; {s['diverged']['reason']}): left "
                f"out of the best, the fastest and the claims. Lower {opt('lr')} or widen "
                f"{opt('lr_grid')} downwards."
            )
        elif blew_up:
            lrs = ", ".join(f"{g['lr']:.3g} (step {g['diverged']})" for g in blew_up)
            lines.append(f"At B={b}, lr {lrs} diverged; the grid kept lr {s['lr']:.3g}.")
    return lines

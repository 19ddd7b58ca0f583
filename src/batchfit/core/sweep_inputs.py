"""What the sweep is asked: the metrics it records, the target, the batch sizes, the lr grid, the
budget in steps.

Pure text and numbers in, checked values out (a refusal is one :class:`BatchfitError` that names
the option and the fix); no torch, no files. ``batchfit sweep``'s setup parses every option with
these before the first run, and the verdict reads the :class:`Target` they make.

Examples:
    >>> t = parse_target("val_accuracy=0.9", ("val_loss", "val_accuracy"))
    >>> t.metric, t.value, t.higher_is_better
    ('val_accuracy', 0.9, True)
    >>> parse_batch_sizes("32,64,N", 4000)
    [32, 64, 4000]
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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
        size: Any = item
        with contextlib.suppress(ValueError):  # the check below names it
            size = int(item) if isinstance(item, str) else item
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
        factor: Any = item
        with contextlib.suppress(TypeError, ValueError):  # the check below names it
            factor = float(item)
        options.check(
            "lr_grid_factor",
            factor,
            f"{opt('lr_grid')} takes factors of the scaled learning rate, e.g. 0.25,0.5,1,2,4.",
        )
        factors.add(float(factor))
    return tuple(sorted(factors | {1.0}))

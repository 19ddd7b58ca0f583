"""The run the user will train, as tune reads it: its planned length (epochs, optimizer steps,
or a held-out loss to reach), the steps and training seconds that length takes at a batch size,
and whether tuning can pay for itself within it.

Why tune needs it: the best batch size depends on how long the run trains. The critical batch
grows as the loss falls (McCandlish et al. 2018; Merrill et al. 2025), so an answer judged over
a few seconds of training is the answer for a run of about that length, and a run far longer may
favour a larger batch. And a run that trains in less time than tuning has left cannot repay the
tuning, whatever it finds.

Pure numbers; no torch. :mod:`batchfit.orchestrate.tune_horizon` applies it inside tune.

Examples:
    >>> h = Horizon(epochs=3)
    >>> h.describe(), h.steps(32, 24000)
    ('3 epochs', 2250)
    >>> round(h.training_seconds(32, 24000, 0.01), 1)
    22.5
    >>> Horizon().given, Horizon().steps(32, 24000) is None
    (False, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from batchfit.core.options import opt, opt_value
from batchfit.core.sweep_inputs import Target, parse_target
from batchfit.errors import BatchfitError

#: The metric a tune target may name: the race judges every contender by its held-out loss.
TARGET_METRICS = ("val_loss",)
#: With a horizon and no time budget given, tune may spend this share of the predicted run.
LONG_RUN_SHARE = 0.03
#: ... but never more than this many seconds by default (a user wanting more says so).
LONG_RUN_CAP_S = 1800.0
#: With a horizon and no time budget given, tuning spends at most this share of the predicted
#: run: a full minute of tuning on a run of a minute doubles the user's wait, whatever it finds,
#: while a fifth keeps tuning plus training near 1.2-1.3x the best configuration's training.
TUNING_SHARE = 0.2


@dataclass(frozen=True)
class Horizon:
    """How long the user's run trains: ``epochs`` passes and/or ``max_steps`` optimizer steps
    (whichever ends first, as :func:`batchfit.train` counts them), or until ``target`` (a level
    of the held-out loss) is reached. None of them: no horizon given."""

    epochs: int | None = None
    max_steps: int | None = None
    target: Target | None = None

    @classmethod
    def of(cls, epochs: int | None, max_steps: int | None, target: Any = None) -> Horizon:
        """The horizon of tune's options; ``target`` as ``METRIC=VALUE`` or a Target."""
        if target is not None and not isinstance(target, Target):
            target = parse_tune_target(str(target))
        return cls(epochs, max_steps, target)

    @property
    def given(self) -> bool:
        return self.epochs is not None or self.max_steps is not None or self.target is not None

    @property
    def counted(self) -> bool:
        """Whether the length is known before training (epochs or steps, not a target)."""
        return self.epochs is not None or self.max_steps is not None

    def describe(self) -> str:
        """The horizon in words.

        >>> Horizon(epochs=2, max_steps=500).describe()
        '2 epochs or 500 steps, whichever ends first'
        >>> Horizon.of(None, None, "val_loss=0.3").describe()
        'until val_loss <= 0.3'
        """
        parts = []
        if self.epochs is not None:
            parts.append(f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}")
        if self.max_steps is not None:
            parts.append(f"{self.max_steps} steps")
        text = " or ".join(parts) + (", whichever ends first" if len(parts) == 2 else "")
        if self.target is not None:
            until = f"until {self.target.describe()}"
            text = f"{text}, or {until}" if text else until
        return text or "none given"

    def steps(self, batch_size: int, num_samples: int | None) -> int | None:
        """Optimizer steps the run takes at ``batch_size`` (None: not known before training)."""
        by_epochs = None
        if self.epochs is not None and num_samples:
            by_epochs = self.epochs * math.ceil(num_samples / batch_size)
        counts = [n for n in (by_epochs, self.max_steps) if n is not None]
        return min(counts) if counts else None

    def training_seconds(
        self, batch_size: int, num_samples: int | None, step_seconds: float
    ) -> float | None:
        """Seconds of training the run takes at ``batch_size``, at ``step_seconds`` per step."""
        steps = self.steps(batch_size, num_samples)
        return None if steps is None else steps * step_seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "max_steps": self.max_steps,
            "target": None if self.target is None else self.target.to_dict(),
            "text": self.describe(),
        }


def parse_tune_target(text: str) -> Target:
    """tune's target: a level of the held-out loss, the one thing the race judges by.

    >>> parse_tune_target("val_loss=0.25").value
    0.25
    >>> parse_tune_target("val_accuracy=0.9")
    Traceback (most recent call last):
    ...
    batchfit.errors.BatchfitError: tune's race judges by held-out loss, so its target is a loss \
level: give target_level='val_loss=VALUE' (a loss your run should reach), or 'epochs' or \
'max_steps'.
    """
    if str(text).partition("=")[0].strip() == "val_accuracy":
        raise BatchfitError(
            "tune's race judges by held-out loss, so its target is a loss level: give "
            f"{opt_value('target_level', 'val_loss=VALUE')} (a loss your run should reach), or "
            f"{opt('epochs')} or {opt('max_steps')}."
        )
    return parse_target(text, TARGET_METRICS)


def tuning_pays(run_seconds: float, tuning_left_s: float) -> bool:
    """Whether the tuning still to come can pay for itself: at best it saves the whole run's
    training, so a run that trains in less time than tuning has left never repays it.

    >>> tuning_pays(120.0, 40.0), tuning_pays(5.0, 40.0)
    (True, False)
    """
    return run_seconds > tuning_left_s


def share_of_run(run_seconds: float, tuning_left_s: float) -> float | None:
    """The seconds tuning may still spend on a run of ``run_seconds`` when what it has left is
    more than :data:`TUNING_SHARE` of that run, else None (the budget stands).

    >>> share_of_run(100.0, 45.0), share_of_run(1000.0, 45.0)
    (20.0, None)
    """
    share = TUNING_SHARE * run_seconds
    return share if tuning_left_s > share else None


def long_run_budget(run_seconds: float, default_s: float) -> float | None:
    """The time budget for a run long enough that :data:`LONG_RUN_SHARE` of it is more than the
    default budget (capped at :data:`LONG_RUN_CAP_S`), else None: a few percent of a long run is
    a small price for its batch size, and more time lets the race judge over longer runs.

    >>> long_run_budget(10_000.0, 60.0), long_run_budget(1_000.0, 60.0)
    (300.0, None)
    >>> long_run_budget(1e6, 60.0)
    1800.0
    """
    share = LONG_RUN_SHARE * run_seconds
    return min(share, LONG_RUN_CAP_S) if share > default_s else None

"""One ``tune`` run's state and what its phases return: the run's settings and data, resolved once
(:class:`TuneRun`, the learning rates in :class:`LearningRates`), and each phase's result with what
it noted, what failed and its seconds (:class:`Phase`), which only ``tune`` itself records."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Generic, ParamSpec, TypeVar

import torch
from torch import nn

from batchfit.core.configs import TuneConfig
from batchfit.core.horizon import Horizon
from batchfit.core.lr_scaling import default_rule, scale_lr
from batchfit.data.source import BatchSource
from batchfit.errors import first_line
from batchfit.losses import Loss, LossFn
from batchfit.orchestrate.tune_budget import TimeBudget
from batchfit.precision import Precision
from batchfit.probe.harness import Diverged, OutOfTime
from batchfit.probe.memory import MemoryCeiling, is_out_of_memory, release_memory
from batchfit.probe.noise import NoiseMeasurement
from batchfit.step import DEFAULT_LR, model_device

T = TypeVar("T")
P = ParamSpec("P")


@dataclass(frozen=True)
class Phase(Generic[T]):
    """What one phase of ``tune`` returns: its ``result``, what it cut short or skipped, in words
    (``notes``: the report's ``skipped``), the divergences and out-of-memory errors that the
    decision names (``failures``), and its ``seconds``."""

    result: T
    notes: tuple[str, ...] = ()
    failures: tuple[str, ...] = ()
    seconds: float = 0.0


def timed(phase: Callable[P, Phase[T]]) -> Callable[P, Phase[T]]:
    """A phase that returns its own seconds (wall time, to the millisecond)."""

    @functools.wraps(phase)
    def run(*args: P.args, **kwargs: P.kwargs) -> Phase[T]:
        started = time.perf_counter()
        done = phase(*args, **kwargs)
        return replace(done, seconds=round(time.perf_counter() - started, 3))

    return run


@dataclass(frozen=True)
class MeasuredByRanks:
    """Under torchrun, the phases every rank measured together before rank 0 goes on alone: the
    combined memory ceiling and the joint noise probe, and the seconds both took."""

    memory: Phase[MemoryCeiling]
    noise: Phase[NoiseMeasurement | None]
    seconds: float

    #: The budget's phases that these spent.
    PHASES = ("memory", "noise")


@dataclass(frozen=True)
class LearningRates:
    """tune's learning rates, resolved once from its options: the optimizer, how the lr follows
    the batch size (``scaling``), the batch size the lrs below are for (``batch_size``), the
    user's lr (``given``, None: none), the lr the rule scales when the range test settles nothing
    (``fallback``: the warm-up lr, else the optimizer's default), and the noise probe's warm-up
    lr (``warmup``).

    >>> lrs = LearningRates.of(TuneConfig.build(lr=0.01, lr_batch_size=16))
    >>> lrs.at(64), lrs.came_from()
    (0.02, 'adam, sqrt rule from 0.01 at 16')
    >>> LearningRates.of(TuneConfig.build(optimizer="sgd")).came_from()
    'sgd, linear rule from the default 0.01 at 32'
    >>> LearningRates.of(TuneConfig.build(warmup_lr=5e-5, lr_batch_size=64)).came_from()
    'adam, sqrt rule from your prior 5e-05 at 64'
    """

    optimizer: str
    scaling: str
    batch_size: int
    given: float | None
    fallback: float
    warmup: float
    fallback_is_prior: bool = False

    @classmethod
    def of(cls, config: TuneConfig) -> LearningRates:
        fallback = config.warmup_lr or DEFAULT_LR[config.optimizer]
        return cls(
            optimizer=config.optimizer,
            scaling=config.lr_scaling or default_rule(config.optimizer),
            batch_size=config.lr_batch_size,
            given=config.lr,
            fallback=fallback,
            warmup=config.warmup_lr or config.lr or fallback,
            fallback_is_prior=config.warmup_lr is not None,
        )

    @property
    def measured(self) -> float:
        """The lr of the optimizer whose state and step the memory and throughput probes measure
        (the weights it moves are put back): the user's, else the optimizer's default."""
        return self.given or DEFAULT_LR[self.optimizer]

    def at(self, batch_size: int) -> float:
        """The lr at ``batch_size`` by the rule: the user's lr scaled, else the fallback."""
        base = self.fallback if self.given is None else self.given
        return scale_lr(base, self.batch_size, batch_size, self.scaling)

    def warmup_at(self, batch_size: int) -> float:
        """The noise probe's warm-up lr at ``batch_size``, scaled by the rule."""
        return scale_lr(self.warmup, self.batch_size, batch_size, self.scaling)

    def came_from(self, chosen_by: str | None = None) -> str:
        """Where a learning rate came from, in words (``Recommended.lr_rule``): what chose it
        (``chosen_by``: the range test, the race), else the rule of :meth:`at`."""
        if chosen_by is None:
            source = "your prior" if self.fallback_is_prior else "the default"
            base = f"{self.given:g}" if self.given is not None else f"{source} {self.fallback:g}"
            chosen_by = f"{self.scaling} rule from {base} at {self.batch_size}"
        return f"{self.optimizer}, {chosen_by}"


@dataclass(frozen=True)
class TuneRun:
    """One tune run: what it measures, with which settings, on which device, within which time
    budget. The phases read it; what they find they return (:class:`Phase`)."""

    config: TuneConfig
    model: nn.Module
    source: BatchSource
    loss: Loss
    budget: TimeBudget
    log: Callable[[str], None]
    #: The smallest size the model trains on (2 with batch norm): every probe starts there.
    smallest: int
    lr: LearningRates
    #: Held-out data for the race (None: a share of ``source`` is held out).
    val_data: BatchSource | None = None
    #: The run the user will train (none given: the answer is for a run like the race's).
    horizon: Horizon = field(default_factory=Horizon)
    #: Where it measures (under torchrun: this rank's device).
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: What every probe's forward pass and loss run in (:func:`batchfit.precision.measured_in`).
    precision: Precision = field(default_factory=lambda: Precision("32", "cpu", None))

    @property
    def loss_fn(self) -> LossFn:
        return self.loss.fn

    def unless_it_fails(self, what: str, probe: Callable[[], T]) -> Phase[T | None]:
        """Run a probe that the recommendation can do without. When it ran out of time, diverged
        or ran out of memory, the phase's result is None and its notes say so (a divergence or
        out-of-memory error is also one of its failures, for the decision). Every other error
        propagates."""
        try:
            return Phase(probe())
        except OutOfTime as exc:
            return Phase(None, (f"{what} not measured: {exc}",))
        except Diverged as exc:
            return Phase(None, (f"{what} not measured: {exc}",), (str(exc),))
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            release_memory(model_device(self.model), collect=True)
            message = (
                f"{what} not measured: it ran out of memory ({first_line(exc)[:200]}); "
                "the measurements before it stand."
            )
            return Phase(None, (message,), (message,))

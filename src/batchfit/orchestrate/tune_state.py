"""One ``tune`` run's state: its settings and data, the time budget, and what it collects
besides the probes' results (notes on what was cut short, failures, seconds per phase)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from batchfit.core.configs import TuneConfig
from batchfit.data.source import BatchSource
from batchfit.errors import first_line
from batchfit.losses import Loss, LossFn
from batchfit.orchestrate.tune_budget import TimeBudget
from batchfit.probe.harness import Diverged, OutOfTime
from batchfit.probe.memory import MemoryCeiling, is_out_of_memory, release_memory
from batchfit.probe.noise import NoiseMeasurement
from batchfit.step import model_device

T = TypeVar("T")


@dataclass(frozen=True)
class MeasuredNoise:
    """The noise phase done already (under torchrun: by every rank together): its measurement
    (None when it failed or had too few samples), what it noted as cut short or failed, and its
    seconds."""

    measurement: NoiseMeasurement | None
    skipped: tuple[str, ...] = ()
    failures: tuple[str, ...] = ()
    seconds: float = 0.0


@dataclass
class TuneRun:
    """One tune run: what it measures, with which settings, and what it has collected so far
    besides the probes' results (notes on what was cut short, failures, seconds per phase)."""

    config: TuneConfig
    model: nn.Module
    source: BatchSource
    loss: Loss
    budget: TimeBudget
    log: Callable[[str], None]
    #: The smallest size the model trains on (2 with batch norm): every probe starts there.
    smallest: int
    #: How the learning rate follows the batch size: as given, else the optimizer's usual rule.
    lr_scaling: str
    #: Held-out data for the race (None: a share of ``source`` is held out).
    val_data: BatchSource | None = None
    skipped: list[str] = field(default_factory=list)
    #: Divergences and out-of-memory errors of the optional phases, for the decision.
    failures: list[str] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    #: Where it measures (under torchrun: this rank's device).
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: The memory ceiling measured already (under torchrun: the minimum over the ranks).
    memory: MemoryCeiling | None = None
    #: The noise phase done already (under torchrun: from the ranks' gradients, every rank).
    noise: MeasuredNoise | None = None

    @property
    def loss_fn(self) -> LossFn:
        return self.loss.fn

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.phase_seconds[phase] = round(time.perf_counter() - started, 3)

    def unless_it_fails(self, what: str, probe: Callable[[], T]) -> T | None:
        """Run a probe that the recommendation can do without; when it ran out of time, diverged
        or ran out of memory, say so in ``skipped`` (and a divergence or out-of-memory error also
        in ``failures``, for the decision) and return None. Every other error propagates."""
        try:
            return probe()
        except OutOfTime as exc:
            self.skipped.append(f"{what} not measured: {exc}")
        except Diverged as exc:
            self.skipped.append(f"{what} not measured: {exc}")
            self.failures.append(str(exc))
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            release_memory(model_device(self.model), collect=True)
            message = (
                f"{what} not measured: it ran out of memory ({first_line(exc)[:200]}); "
                "the measurements before it stand."
            )
            self.skipped.append(message)
            self.failures.append(message)
        return None

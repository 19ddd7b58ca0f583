"""What ``tune`` answers: :class:`Recommended`, what to train with, and :class:`TuneResult`,
everything it measured and decided (its :meth:`~TuneResult.to_report` is ``report.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from batchfit.core.recommend import BatchSizeChoice
from batchfit.orchestrate.tune_horizon import HorizonReading
from batchfit.probe.lr_range import LRRange
from batchfit.probe.machine import MachineCheck
from batchfit.probe.memory import MemoryCeiling
from batchfit.probe.noise import NoiseMeasurement
from batchfit.probe.race import RaceResult
from batchfit.probe.throughput import Throughput
from batchfit.report.tune_json import provisional_reasons
from batchfit.report.tune_report import build_report


@dataclass(frozen=True)
class Recommended:
    """Tune's answer, what to train with: the batch size, its split into micro-batches, and the
    learning rate with where it came from."""

    batch_size: int
    micro_batch_size: int
    accumulation: int
    lr: float
    lr_rule: str
    optimizer: str


@dataclass(frozen=True)
class TuneResult:
    """Everything ``tune`` measured and decided; :meth:`to_report` is ``report.json``.

    ``recommended`` is the answer; ``batch_size_choice`` is how the batch size was chosen (the
    predicted curve, the runner-up, the reasons); the probes' results sit beside them.
    """

    task: str
    device: str
    num_samples: int | None
    recommended: Recommended
    memory: MemoryCeiling
    throughput: Throughput
    noise: NoiseMeasurement | None
    lr_range: LRRange | None
    race: RaceResult | None
    machine: MachineCheck
    batch_size_choice: BatchSizeChoice
    step_time_fit: tuple[float, float] | None
    decision: tuple[str, ...]
    skipped: tuple[str, ...]
    time_budget_s: float
    seconds: float
    phase_seconds: dict[str, float]
    report_files: tuple[str, ...] = field(default=())
    #: The command line's task options, for the report's train command (None: called from Python).
    task_options: tuple[str, ...] | None = None
    #: The very object written to ``report.json`` (None when no report was written).
    report: dict[str, Any] | None = None
    #: The planned run against the measurements (report.json's ``horizon``).
    horizon: HorizonReading | None = None
    #: What the probes trained in (``32``, ``bf16-mixed`` or ``16-mixed``).
    precision: str = "32"
    #: With ``compile``: the graphs compiled before measuring, their seconds, and the graphs
    #: compiled while measuring (report.json's ``compile``); None uncompiled.
    compile: dict[str, Any] | None = None

    @property
    def provisional(self) -> bool:
        """True when measurements cut short left larger batch sizes unjudged, or when the race did
        not run (nothing trained the prediction): :attr:`provisional_reasons` says which."""
        return bool(self.provisional_reasons)

    @property
    def provisional_reasons(self) -> list[str]:
        """Why the answer is provisional (empty when it is not); report.json's
        ``recommended.provisional``."""
        return provisional_reasons(
            self.batch_size_choice.provisional,
            self.race is not None,
            self.skipped,
            self.horizon is not None and self.horizon.ends_early,
        )

    def to_report(self) -> dict[str, Any]:
        """``report.json``: the object written to disk, or built now when none was written."""
        return self.report if self.report is not None else build_report(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """Plain data (each result as a dict of its fields): what the report is built from."""
        return asdict(self)

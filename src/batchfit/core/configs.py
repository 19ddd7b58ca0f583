"""The settings of ``train``, ``tune`` and ``sweep`` as frozen configs, checked once when built.

Each field is an option of :data:`batchfit.core.options.OPTIONS` and takes its default from there,
so a default is written once. The Python API builds a config from its keyword arguments
(:meth:`Config.build`), the command line from its parsed flags (the same call); an unknown name
is a ``TypeError`` that suggests the option meant.

Examples:
    >>> config = TrainConfig.build(batch_size=32, epochs=3)
    >>> config.optimizer, config.momentum, config.epochs
    ('adam', 0.9, 3)
    >>> TrainConfig.build(batch_size=32, epoch=3)
    Traceback (most recent call last):
    ...
    TypeError: train() got an unknown option 'epoch'; did you mean 'epochs'?
    >>> TrainConfig.build(batch_size=0)
    Traceback (most recent call last):
    ...
    batchfit.errors.BatchfitError: The 'batch_size' option must be an int >= 1. Got 0 instead.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from batchfit.core.options import OPTIONS, check_optional

C = TypeVar("C", bound="Config")


def _option(name: str) -> Any:
    """A dataclass field whose default is the option table's."""
    return dataclasses.field(default=OPTIONS[name].default)


@dataclass(frozen=True)
class Config:
    """Base of the configs: checks every field against the option table once, when built."""

    command: ClassVar[str] = ""
    #: Fields checked by an option row of another name (sweep's ``target`` is a level to reach,
    #: not the data's target column).
    checked_as: ClassVar[Mapping[str, str]] = {}

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            name = self.checked_as.get(f.name, f.name)
            if name in OPTIONS:
                value = check_optional(name, getattr(self, f.name))
                object.__setattr__(self, f.name, value)  # a NumPy int becomes a plain int

    @classmethod
    def build(cls: type[C], config: C | None = None, /, **options: Any) -> C:
        """A config from keyword options, on top of ``config`` when one is given."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(names), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; it takes {sorted(names)}"
            raise TypeError(f"{cls.command}() got an unknown option '{unknown[0]}'{hint}")
        if config is not None:
            return dataclasses.replace(config, **options)
        return cls(**options)

    @classmethod
    def from_mapping(cls: type[C], values: Mapping[str, Any]) -> C:
        """A config from a mapping that may hold more (the command line's parsed flags)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainConfig(Config):
    """How :func:`batchfit.train` trains: sizes, length, optimizer, checkpoints, output."""

    command: ClassVar[str] = "train"

    batch_size: int | str  # "auto": tune chooses it (batchfit.orchestrate.train_auto)
    epochs: int | None = _option("epochs")
    max_steps: int | None = _option("max_steps")
    micro_batch_size: int | None = _option("micro_batch_size")
    steps_per_epoch: int | None = _option("steps_per_epoch")
    drop_last: bool = _option("drop_last")
    optimizer: str = _option("optimizer")
    lr: float | None = _option("lr")
    momentum: float = _option("momentum")
    weight_decay: float | None = _option("weight_decay")
    seed: int = _option("seed")
    eval_batch_size: int | None = _option("eval_batch_size")
    eval_every: int | None = _option("eval_every")
    memory_limit: int | None = _option("memory_limit")
    regrow_after: int = _option("regrow_after")
    checkpoint_dir: Any = _option("checkpoint_dir")
    checkpoint_every: int | None = _option("checkpoint_every")
    resume: bool = _option("resume")
    out_dir: Any = _option("out_dir")
    device: Any = _option("device")
    threads: int | None = _option("threads")
    precision: str = _option("precision")
    compile: bool = _option("compile")
    progress: bool = _option("progress")
    tune_budget: float | None = _option("tune_budget")
    adaptive: bool = _option("adaptive")
    adapt_every: int = _option("adapt_every")
    min_batch_size: int | None = _option("min_batch_size")
    max_batch_size: int | None = _option("max_batch_size")


@dataclass(frozen=True)
class TuneConfig(Config):
    """What :func:`batchfit.tune` may spend and assume: limits, budget, optimizer and lr."""

    command: ClassVar[str] = "tune"
    checked_as: ClassVar[Mapping[str, str]] = {"target": "target_level"}

    optimizer: str = _option("optimizer")
    lr: float | None = _option("lr")
    lr_batch_size: int = _option("lr_batch_size")
    lr_scaling: str | None = _option("lr_scaling")
    warmup_lr: float | None = _option("warmup_lr")
    memory_limit: int | None = _option("memory_limit")
    max_batch_size: int | None = _option("max_batch_size")
    time_budget: float | None = _option("time_budget")
    headroom: float = _option("headroom")
    device: Any = _option("device")
    threads: int | None = _option("threads")
    precision: str = _option("precision")
    compile: bool = _option("compile")
    seed: int = _option("seed")
    out_dir: Any = _option("out_dir")
    #: The planned run (its horizon, :class:`~batchfit.core.horizon.Horizon`): epochs and/or
    #: steps, or a held-out loss to reach ("val_loss=VALUE"); None: not given.
    epochs: int | None = _option("epochs")
    max_steps: int | None = _option("max_steps")
    target: Any = None
    task_name: str = "your model"
    #: The command line's task options (``--model M --data D ...``) for the report's train command;
    #: None when tune was called from Python.
    task_options: tuple[str, ...] | None = None
    #: When the time budget started (a :func:`batchfit.core.budget_clock.now` reading; None: when
    #: tune is called).
    budget_started: float | None = None


@dataclass(frozen=True)
class SweepConfig(Config):
    """What :func:`batchfit.sweep` runs: batch sizes, budget, lr per size, measurements, output."""

    command: ClassVar[str] = "sweep"
    checked_as: ClassVar[Mapping[str, str]] = {"target": "target_level"}

    batch_sizes: Any = _option("batch_sizes")
    epochs: int | None = _option("epochs")
    steps: int | None = _option("steps")
    examples: int | None = _option("examples")
    optimizer: str = _option("optimizer")
    lr: float | None = _option("lr")
    lr_batch_size: int = _option("lr_batch_size")
    lr_scaling: str | None = _option("lr_scaling")
    lr_grid: Any = _option("lr_grid")
    momentum: float = _option("momentum")
    weight_decay: float | None = _option("weight_decay")
    micro_batch_size: int | None = _option("micro_batch_size")
    eval_batch_size: int | None = _option("eval_batch_size")
    target: Any = None  # "METRIC=VALUE" or a Target: the level to reach
    seed: int = _option("seed")
    eval_points: int = _option("eval_points")
    train_subset_samples: int = _option("train_subset_samples")
    sharpness_samples: int = _option("sharpness_samples")
    sharpness_iterations: int = _option("sharpness_iterations")
    sharpness_tolerance: float = _option("sharpness_tolerance")
    out_dir: Any = _option("out_dir")
    resume: bool = _option("resume")
    report: Any = _option("report")
    device: Any = _option("device")
    threads: int | None = _option("threads")
    precision: str = _option("precision")
    compile: bool = _option("compile")
    progress: bool = _option("progress")
    task_name: str | None = None

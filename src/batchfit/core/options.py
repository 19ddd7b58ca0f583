"""Parameter checking in one place.

One table, :data:`OPTIONS`, says what each option accepts. The Python API calls :func:`check`
with values, the command line calls :func:`parse` with text; both raise
:class:`~batchfit.errors.BatchfitError` with the same message template, e.g.

    The 'batch_size' option must be an int >= 1. Got 0 instead.

Examples:
    >>> check("batch_size", 32)
    32
    >>> parse("lr", "3e-4")
    0.0003
    >>> check("batch_size", 0)
    Traceback (most recent call last):
    ...
    batchfit.errors.BatchfitError: The 'batch_size' option must be an int >= 1. Got 0 instead.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from batchfit.core.units import parse_size
from batchfit.errors import BatchfitError


@dataclass(frozen=True)
class Int:
    """An integer in [low, high] (high None: unbounded)."""

    low: int = 1
    high: int | None = None

    def describe(self) -> str:
        if self.high is None:
            return f"an int >= {self.low}"
        return f"an int in [{self.low}, {self.high}]"

    def accepts(self, value: Any) -> bool:
        # numbers.Integral admits NumPy integers (np.int64(24000)); bool is excluded on purpose.
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return False
        return value >= self.low and (self.high is None or value <= self.high)

    def convert(self, text: str) -> Any:
        return int(text.strip().replace("_", ""))


@dataclass(frozen=True)
class Float:
    """A finite float with optional bounds; ``open_low`` excludes the lower bound."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.open_low else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.open_high else '<='} {self.high:g}")
        return "a number" + (" " + " and ".join(parts) if parts else "")

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return not (
            self.high is not None and (value >= self.high if self.open_high else value > self.high)
        )

    def convert(self, text: str) -> Any:
        return float(text)


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of strings."""

    choices: tuple[str, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.choices

    def convert(self, text: str) -> Any:
        return text.strip().lower()


@dataclass(frozen=True)
class Size:
    """A number of bytes >= ``low``, written as text like ``4GB``, ``512MiB`` or ``2g``."""

    low: int = 1

    def describe(self) -> str:
        return f"a size of at least {self.low} bytes, like 4GB, 512MiB or 2g"

    def accepts(self, value: Any) -> bool:
        return Int(self.low).accepts(value)

    def convert(self, text: str) -> Any:
        return parse_size(text)


@dataclass(frozen=True)
class RowsOrSize:
    """A count of rows (an int >= 1), or a size in bytes written with a unit (``'64MiB'``), kept
    as text: what a row costs is only known once the data is open."""

    def describe(self) -> str:
        return "an int >= 1 (rows) or a size with a unit, like 64MiB or 1GB"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, str):
            try:
                return value.strip()[-1:].isalpha() and parse_size(value) >= 1
            except ValueError:
                return False
        return Int(1).accepts(value)

    def convert(self, text: str) -> Any:
        plain = text.strip().replace("_", "")
        if plain.isdigit():
            return int(plain)
        parse_size(plain)  # raises ValueError on anything that is not a size
        return plain


OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCALING_RULES = ("none", "linear", "sqrt")

#: What every option accepts. The CLI and the API share it; a test feeds each a bad value.
OPTIONS: dict[str, Int | Float | Choice | Size | RowsOrSize] = {
    "samples": Int(1),
    "batch_size": Int(1),
    "micro_batch_size": Int(1),
    "eval_batch_size": Int(1),
    "world_size": Int(1),
    "epochs": Int(1),
    "max_steps": Int(1),
    "checkpoint_every": Int(1),
    "eval_every": Int(1),
    "seed": Int(0, 2**63 - 1),
    "lr": Float(0.0, open_low=True),
    "momentum": Float(0.0, 1.0, open_high=True),
    "weight_decay": Float(0.0),
    "val_fraction": Float(0.0, 1.0, open_high=True),
    "steps_per_epoch": Int(1),
    "shuffle_buffer": RowsOrSize(),
    "prefetch": Int(0),
    "data_workers": Int(1, 64),
    "optimizer": Choice(OPTIMIZERS),
    "lr_scaling": Choice(LR_SCALING_RULES),
    "max_batch_size": Int(1),
    "lr_batch_size": Int(1),
    "memory_limit": Size(2**20),
    "time_budget": Float(0.0, open_low=True),
    "headroom": Float(0.0, 1.0, open_high=True),
    "batches": Int(1),
    # batchfit sweep
    "steps": Int(1),
    "examples": Int(1),
    "lr_grid_factor": Float(0.0, open_low=True),
    "eval_points": Int(1),
    "sharpness_samples": Int(1),
    "sharpness_iterations": Int(1),
    "sharpness_tolerance": Float(0.0, open_low=True),
    "train_subset_samples": Int(1),
}


def _message(name: str, got: Any, fix: str | None) -> str:
    rule = OPTIONS[name].describe()
    text = f"The '{name}' option must be {rule}. Got {got!r} instead."
    return f"{text} {fix}" if fix else text


def check(name: str, value: Any, fix: str | None = None) -> Any:
    """Return ``value`` if option ``name`` accepts it, else raise a BatchfitError naming both."""
    rule = OPTIONS[name]
    if not rule.accepts(value):
        raise BatchfitError(_message(name, value, fix))
    if isinstance(rule, (Int, Size)) or (
        isinstance(rule, RowsOrSize) and not isinstance(value, str)
    ):
        return int(value)  # a NumPy integer becomes a plain int (JSON, checkpoints)
    return float(value) if isinstance(rule, Float) else value


def check_optional(name: str, value: Any, fix: str | None = None) -> Any:
    """Like :func:`check`, but ``None`` (option not given) passes through."""
    return None if value is None else check(name, value, fix)


def parse(name: str, text: str) -> Any:
    """Convert command-line text for option ``name`` and check it."""
    rule = OPTIONS[name]
    try:
        value = rule.convert(text)
    except (ValueError, TypeError):
        raise BatchfitError(_message(name, text, None)) from None
    if not rule.accepts(value):
        raise BatchfitError(_message(name, text, None))
    return value

"""What an option accepts: small frozen rules with one description each, shared by the option
table (:mod:`batchfit.core.options`) and its checks.

A rule answers three questions: how to describe the values it takes (for the one message
template), whether it accepts a value given from Python, and how to turn command-line text into
such a value.

Examples:
    >>> Int(1).accepts(32), Int(1).accepts(0), Int(1).describe()
    (True, False, 'an int >= 1')
    >>> Float(0.0, open_low=True).describe()
    'a number > 0'
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from batchfit.core.units import parse_size


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
        number = int(value)  # numbers.Integral has no order in the stubs; int() keeps the value
        return number >= self.low and (self.high is None or number <= self.high)

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
        number = float(value)  # numbers.Real has no order in the stubs; float() keeps the value
        if not math.isfinite(number):
            return False
        if self.low is not None and (number <= self.low if self.open_low else number < self.low):
            return False
        return not (
            self.high is not None
            and (number >= self.high if self.open_high else number > self.high)
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


@dataclass(frozen=True)
class Text:
    """A non-empty string: a path, a ``module:name`` spec or a device. With ``objects``, any value
    but None: the function that takes it checks what it means (a ``Path``, a ``torch.device``, a
    list, or text such as ``"32,64"`` whose parse says what is wrong with it)."""

    objects: bool = False

    def describe(self) -> str:
        return "a non-empty string" if not self.objects else "given (not None)"

    def accepts(self, value: Any) -> bool:
        if self.objects:
            return value is not None
        return isinstance(value, str) and bool(value.strip())

    def convert(self, text: str) -> Any:
        return text


@dataclass(frozen=True)
class Flag:
    """True or False (on the command line: present or absent)."""

    def describe(self) -> str:
        return "True or False"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def convert(self, text: str) -> Any:
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(text)
        return lowered in ("true", "1", "yes")


@dataclass(frozen=True)
class IntOrAuto:
    """An int >= ``low``, or the word ``auto``: batchfit chooses the value (the batch size, by
    running tune first)."""

    low: int = 1

    def describe(self) -> str:
        return f"an int >= {self.low}"

    def hint(self, value: Any) -> str | None:
        """What to say after the message for a refused value: a word may have meant ``auto``."""
        return (
            "Give a number, or 'auto' for train to choose it by tune."
            if isinstance(value, str)
            else None
        )

    def accepts(self, value: Any) -> bool:
        return value == "auto" or Int(self.low).accepts(value)

    def convert(self, text: str) -> Any:
        plain = text.strip().lower()
        return "auto" if plain == "auto" else Int(self.low).convert(plain)


Rule = Int | Float | Choice | Size | RowsOrSize | Text | Flag | IntOrAuto

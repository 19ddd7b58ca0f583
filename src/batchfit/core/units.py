"""Sizes in bytes, as people write them (``4GB``, ``512MiB``, ``1.5g``), and back.

Pure text and numbers; used by ``--memory-limit`` and by the reports. A size is a whole number
of bytes that an operating system could be given: finite, not negative, and at most
:data:`MAX_SIZE` (the largest limit Linux's ``setrlimit`` takes), so that a typo such as ``1e999GB``
is refused here, with the reason, rather than overflowing deep inside a probe.

Examples:
    >>> parse_size("4GB"), parse_size("512MiB"), parse_size("1.5g"), parse_size("1000")
    (4000000000, 536870912, 1610612736, 1000)
    >>> format_bytes(1_610_612_736)
    '1.5 GiB'
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

_DECIMAL = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BINARY = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_BINARY.update({f"{k}ib": v for k, v in list(_BINARY.items())})
_UNITS = _DECIMAL | _BINARY
#: The largest size accepted, 2**63 - 1 bytes (8 EiB): the largest limit the OS accepts (a C
#: ``long``), far more than any machine's memory.
MAX_SIZE = 2**63 - 1
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$")


class SizeTooLarge(ValueError):
    """A size that parses but is more than :data:`MAX_SIZE`; its message says so and the fix."""


def parse_size(text: str) -> int:
    """Bytes from text: a number with an optional unit.

    ``KB``/``MB``/``GB``/``TB`` are powers of 1000; ``KiB``/``MiB``/``GiB``/``TiB`` and the short
    ``k``/``m``/``g``/``t`` (as ``ulimit`` and ``docker --memory`` use them) are powers of 1024.
    Raises ``ValueError`` on anything else, and on a size over :data:`MAX_SIZE` (or one that does
    not fit a float at all, such as ``1e999``), saying so.

    >>> parse_size("1e999GB")
    Traceback (most recent call last):
    ...
    batchfit.core.units.SizeTooLarge: 1e999GB is more than the largest size an OS accepts ...
    """
    match = _PATTERN.match(text.lower().replace("_", ""))
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"not a size: {text!r}")
    number = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(number) or number > MAX_SIZE:
        raise SizeTooLarge(
            f"{text.strip()} is more than the largest size an OS accepts "
            f"({format_bytes(MAX_SIZE)}); give at most the machine's memory."
        )
    return int(number)


def format_bytes(n: float) -> str:
    """A short human form in powers of 1024: ``'812 MiB'``, ``'11.2 GiB'``; a number of bytes
    beyond any unit (or not finite) in scientific notation.

    >>> format_bytes(2**63 - 1), format_bytes(10**30), format_bytes(float("inf"))
    ('8.0 EiB', '1.00e+30 B', 'Infinity B')
    """
    if not math.isfinite(_as_float(n)) or abs(n) >= 1024**7:
        return f"{Decimal(n):.3g} B"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(value) < 1024 or unit == "EiB":
            break
        value /= 1024
    if unit == "B":
        return f"{int(value)} B"
    return f"{value:.1f} {unit}" if abs(value) < 10 else f"{value:.0f} {unit}"


def _as_float(n: float) -> float:
    """``n`` as a float, infinite when it is an integer too large for one."""
    try:
        return float(n)
    except OverflowError:
        return math.inf

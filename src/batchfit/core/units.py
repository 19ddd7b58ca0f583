"""Sizes in bytes, as people write them (``4GB``, ``512MiB``, ``1.5g``), and back.

Pure text and numbers; used by ``--memory-limit`` and by the reports.

Examples:
    >>> parse_size("4GB"), parse_size("512MiB"), parse_size("1.5g"), parse_size("1000")
    (4000000000, 536870912, 1610612736, 1000)
    >>> format_bytes(1_610_612_736)
    '1.5 GiB'
"""

from __future__ import annotations

import re

_DECIMAL = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BINARY = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_BINARY.update({f"{k}ib": v for k, v in list(_BINARY.items())})
_UNITS = _DECIMAL | _BINARY
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes from text: a number with an optional unit.

    ``KB``/``MB``/``GB``/``TB`` are powers of 1000; ``KiB``/``MiB``/``GiB``/``TiB`` and the short
    ``k``/``m``/``g``/``t`` (as ``ulimit`` and ``docker --memory`` use them) are powers of 1024.
    Raises ``ValueError`` on anything else.
    """
    match = _PATTERN.match(text.lower().replace("_", ""))
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"not a size: {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(n: float) -> str:
    """A short human form in powers of 1024: ``'812 MiB'``, ``'11.2 GiB'``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    if unit == "B":
        return f"{int(value)} B"
    return f"{value:.1f} {unit}" if abs(value) < 10 else f"{value:.0f} {unit}"

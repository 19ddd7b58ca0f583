"""Markdown pieces shared by the tune and sweep reports.

Examples:
    >>> print(table(["B", "samples/s"], [[32, "1,200"], [64, "2,100"]]))
    | B | samples/s |
    |---:|---:|
    | 32 | 1,200 |
    | 64 | 2,100 |
"""

from __future__ import annotations

from collections.abc import Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A Markdown table; ``align`` holds one of ``l``/``r`` per column (default: right)."""
    align = align or "r" * len(headers)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)

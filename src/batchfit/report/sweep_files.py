"""Small file helpers for reports: atomic writes and Markdown tables.

Generic on purpose (nothing here knows about sweeps), so tune's report can use the same ones.

Examples:
    >>> print(markdown_table(["B", "accuracy"], [[32, "0.91"], [64, "0.90"]]))
    | B | accuracy |
    |---|---|
    | 32 | 0.91 |
    | 64 | 0.90 |
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a temporary file in the same folder, then a rename,
    so a reader (or a crash) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | Path, value: object) -> Path:
    """Write ``value`` as strict JSON (NaN and infinities as null), atomically."""
    from batchfit.cli import to_json

    return write_text(path, to_json(value) + "\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)

"""Writers shared by the reports and the command line: strict JSON, Markdown tables, whole files.

Examples:
    >>> print(table(["B", "samples/s"], [[32, "1,200"], [64, "2,100"]]))
    | B | samples/s |
    |---:|---:|
    | 32 | 1,200 |
    | 64 | 2,100 |
    >>> to_json({"b_simple": float("inf"), "sizes": (32, 64)})
    '{"b_simple": null, "sizes": [32, 64]}'
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

from batchfit.atomic import atomic_open
from batchfit.errors import BatchfitError


def make_folder(folder: Path, flag: str) -> None:
    """Create ``folder`` (and its parents), or fail in one line naming the command-line ``flag``."""
    if folder.exists() and not folder.is_dir():
        raise BatchfitError(f"{flag} '{folder}' is a file, not a folder; give a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchfitError(
            f"Cannot create {flag} '{folder}': {exc.strerror}; choose a folder you can write to."
        ) from None


def prepare_report_folder(out_dir: str | Path, report_files: Sequence[str]) -> Path:
    """Make sure ``out_dir`` is a folder this process can write to, before any measuring or
    training, and remove the ``report_files`` an earlier run left there, so that a run that fails
    leaves none that look current (other files are left alone)."""
    folder = Path(out_dir)
    make_folder(folder, "--out")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise BatchfitError(
            f"Cannot write to --out '{folder}': {exc.strerror}; choose a folder you can write to."
        ) from None
    for name in report_files:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    return folder


def to_json(value: object) -> str:
    """Strict JSON: NaN and infinities become null, as JSON has no spelling for them."""

    def clean(v: object) -> object:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A Markdown table; ``align`` holds one of ``l``/``r`` per column (default: right)."""
    align = align or "r" * len(headers)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (a reader never sees half a file)."""
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, value: object) -> Path:
    """Write ``value`` as strict JSON (:func:`to_json`), atomically."""
    return write_text(path, to_json(value) + "\n")

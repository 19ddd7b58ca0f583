"""Files written whole or not at all, and the folders and JSON they go in.

Atomic writes: write to a temporary file beside the target, then rename.

A rename within one folder is atomic on POSIX, so a reader (or a crash mid-write) sees either the
old file or the new one, never half of one. Checkpoints, reports and cached data all go through
:func:`atomic_open`.

Examples:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_open(path, "w") as f:
    ...     _ = f.write("complete")
    >>> path.read_text()
    'complete'
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from batchfit.core.options import opt
from batchfit.errors import BatchfitError


def temporary_name_pattern(path: Path) -> str:
    """The glob that matches temporary files left for ``path`` by a writer killed mid-write."""
    return f".{path.name}.*.tmp"


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, durable: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path``.

    ``durable`` also flushes the data and the folder entry to disk (``fsync``), so the new file
    survives a power cut, not only a crash of this process: worth it for checkpoints.
    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; ours are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # The rename itself is only durable once the folder entry is flushed (POSIX).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_folder(folder: Path, option: str) -> None:
    """Create ``folder`` (and its parents), or fail in one line naming the ``option`` that gave
    it (``'out_dir'``; ``--out`` on the command line)."""
    if folder.exists() and not folder.is_dir():
        raise BatchfitError(f"{opt(option)} '{folder}' is a file, not a folder; give a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchfitError(
            f"Cannot create {opt(option)} '{folder}': {exc.strerror}; choose a folder you can "
            "write to."
        ) from None


def prepare_report_folder(out_dir: str | Path, report_files: Sequence[str]) -> Path:
    """Make sure ``out_dir`` is a folder this process can write to, before any measuring or
    training, and remove the ``report_files`` an earlier run left there, so that a run that fails
    leaves none that look current (other files are left alone)."""
    folder = Path(out_dir)
    make_folder(folder, "out_dir")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise BatchfitError(
            f"Cannot write to {opt('out_dir')} '{folder}': {exc.strerror}; choose a folder you "
            "can write to."
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


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (a reader never sees half a file)."""
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, value: object) -> Path:
    """Write ``value`` as strict JSON (:func:`to_json`), atomically."""
    return write_text(path, to_json(value) + "\n")

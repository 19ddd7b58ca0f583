"""Files written whole or not at all: write to a temporary file beside the target, then rename.

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
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


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

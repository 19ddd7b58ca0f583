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
import errno
import fcntl
import json
import math
import os
import shutil
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
    # The process id in the name keeps writers in different processes apart.
    prefix = f".{path.name}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
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


def check_writable(folder: Path, option: str) -> None:
    """Create ``folder`` if needed, then create and remove a probe file in it, so that a folder
    this process cannot write to fails now in one line naming the ``option``, not at the first
    save after the work it was meant to keep."""
    make_folder(folder, option)
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".batchfit-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BatchfitError(
            f"Cannot write to {opt(option)} '{folder}': {exc.strerror}; choose a folder you "
            "can write to."
        ) from None


LOCK_NAME = ".batchfit.lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path, option: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` for the block, so that two runs never write into one
    folder at once; a second run is refused in one line naming the folder and the holder's pid.

    The lock is ``flock`` on ``folder/.batchfit.lock``: the kernel drops it when its holder exits,
    however it exits, so a lock left by a dead process is no lock."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            by = f" by process {holder}" if holder.isdigit() else " by another run"
            raise BatchfitError(
                f"{opt(option)} '{folder}' is in use{by}; wait for that run to end, or choose "
                f"another {opt(option)}."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def prepare_report_folder(out_dir: str | Path, report_files: Sequence[str]) -> Path:
    """Make sure ``out_dir`` is a folder this process can write to, before any measuring or
    training. The report an earlier run left there stays until the new one replaces it
    (:func:`report_staging`), so a run that is interrupted or fails loses nothing."""
    folder = Path(out_dir)
    check_writable(folder, "out_dir")
    return folder


def discard_report(out_dir: str | Path, report_files: Sequence[str]) -> None:
    """Remove the ``report_files`` an earlier run left in ``out_dir`` (other files stay): for a
    run that failed, so that no earlier report looks like its answer."""
    for name in report_files:
        with contextlib.suppress(FileNotFoundError):
            (Path(out_dir) / name).unlink()


@contextlib.contextmanager
def report_staging(out_dir: str | Path, report_files: Sequence[str]) -> Iterator[Path]:
    """A temporary folder beside ``out_dir``'s report to write the new report into; on a clean
    exit its files replace the old report's (a report file of the earlier run that the new one
    does not have is removed), each by an atomic rename; on an error it is removed and the old
    report is left as it was."""
    out_dir = Path(out_dir)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".report.{os.getpid()}.", suffix=".tmp"))
    try:
        yield staging
        new = {p.name for p in staging.iterdir()}
        for name in report_files:
            if name not in new:
                with contextlib.suppress(FileNotFoundError):
                    (out_dir / name).unlink()
        for name in sorted(new):
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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

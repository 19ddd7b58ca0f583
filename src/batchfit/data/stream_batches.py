"""Streamed rows cut into batches: the run of an epoch's rows a source reads, and the batches
(or a rank's shares of them) cut from it across window boundaries.

Examples:
    >>> windows = [(np.arange(4), np.arange(4)), None, (np.arange(4, 9), np.arange(4, 9))]
    >>> [y.tolist() for _, y in rows_from(iter(windows), skip=1, count=6)]
    [[1, 2, 3], [4, 5, 6]]
    >>> pieces = rows_from(iter(windows), skip=0, count=9)
    >>> empty = (np.empty((0,)), np.empty((0,)))
    >>> [y.tolist() for _, y in cut_batches(pieces, iter([3, 0, 6]), empty)]
    [[0, 1, 2], [], [3, 4, 5, 6, 7, 8]]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

#: Rows as decoded: features and targets, one entry per row.
Rows = tuple[np.ndarray, np.ndarray]


def rows_from(windows: Iterable[Rows | None], skip: int, count: int) -> Iterator[Rows]:
    """``count`` rows of the decoded ``windows`` after the first ``skip``, as the pieces the
    windows give (``None``: a window with no row of this side of the validation split)."""
    remaining = count
    for decoded in windows:
        if decoded is None:
            continue
        x, y = decoded
        if skip:
            x, y, skip = x[skip:], y[skip:], 0
        if len(y) > remaining:
            x, y = x[:remaining], y[:remaining]
        remaining -= len(y)
        yield x, y
        if remaining == 0:
            return


def cut_batches(pieces: Iterator[Rows], sizes: Iterable[int], empty: Rows) -> Iterator[Rows]:
    """The rows of ``pieces`` cut into batches of the given ``sizes``; a size of 0 (a rank with
    no sample in a short last step) gives ``empty``."""
    pending_x: list[np.ndarray] = []
    pending_y: list[np.ndarray] = []
    pending, offset = 0, 0
    x, y = empty  # nothing read yet: the first row asked for reads the first piece
    for size in sizes:
        while pending < size:
            if offset == len(y):
                x, y = next(pieces)
                offset = 0
            take = min(size - pending, len(y) - offset)
            pending_x.append(x[offset : offset + take])
            pending_y.append(y[offset : offset + take])
            pending += take
            offset += take
        if size == 0:
            pending_x, pending_y = [empty[0]], [empty[1]]
        yield _joined(pending_x), _joined(pending_y)
        pending_x, pending_y, pending = [], [], 0


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

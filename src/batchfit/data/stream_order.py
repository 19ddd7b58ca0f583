"""The order of a streamed epoch: pure functions of the seed, the epoch and the rows per block.

Nothing here reads a file or keeps history, so resuming at ``(epoch, start)`` recomputes the same
windows and re-reads only the one that holds ``start`` (see :mod:`batchfit.data.stream` for the
whole scheme). Two kinds of window:

- *block windows* (Parquet row groups, Arrow record batches, CSV files): each block is cut into
  consecutive :class:`Segment` pieces no bigger than the shuffle buffer, the blocks are permuted
  per epoch (:func:`block_order`), their pieces packed into windows of at most ``buffer`` rows
  (:func:`pack_windows`), and the rows of window ``w`` permuted by :func:`window_permutation`;
- *row ranges* of a full permutation of every row (:func:`range_windows`,
  :func:`permuted_rows`), for formats where any row is cheap to reach.

Examples:
    >>> pieces = block_pieces([5, 0, 12, 3], buffer=6)
    >>> [[(s.block, s.start, s.stop) for s in w] for w in epoch_windows(pieces, 6, 0, 0, False)]
    [[(0, 0, 5)], [(2, 0, 6)], [(2, 6, 12)], [(3, 0, 3)]]
    >>> chains(epoch_windows(pieces, 6, 0, 0, False), first=0)  # window 2 continues window 1
    [[0], [1, 2], [3]]
    >>> window_span([5, 6, 6, 3], lo=7, hi=13)  # rows 7..12: windows 1 and 2, from row 2 of 1
    (1, 3, 2)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from batchfit.core.accounting import split_evenly
from batchfit.data.permute import IndexPermutation
from batchfit.data.source import epoch_seed


@dataclass(frozen=True)
class Segment:
    """Rows ``start..stop`` of block ``block`` (a row group, a record batch, a CSV file)."""

    block: int
    start: int
    stop: int


@dataclass(frozen=True)
class RowRange:
    """Positions ``first..stop`` of an epoch's full permutation of the rows: one window."""

    first: int
    stop: int


#: One window of an epoch: pieces of blocks read one after the other, or a range of positions.
Window = tuple[Segment, ...] | RowRange


def cut_block(block: int, rows: int, buffer: int) -> list[Segment]:
    """Block ``block`` of ``rows`` rows as consecutive, nearly equal pieces of at most ``buffer``.

    >>> [(s.start, s.stop) for s in cut_block(0, 10, buffer=4)]
    [(0, 4), (4, 7), (7, 10)]
    """
    if rows == 0:
        return []  # an empty row group or record batch: nothing to read
    parts = split_evenly(rows, max(1, math.ceil(rows / buffer)))
    bounds = np.cumsum([0] + parts)
    return [Segment(block, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def block_pieces(block_rows: Sequence[int], buffer: int) -> list[list[Segment]]:
    """Every block's pieces (:func:`cut_block`), by block: computed once per stream."""
    return [cut_block(block, rows, buffer) for block, rows in enumerate(block_rows)]


def block_order(num_blocks: int, seed: int, epoch: int) -> list[int]:
    """The blocks in the order epoch ``epoch`` visits them: a permutation drawn by the epoch's
    seed (:func:`~batchfit.data.source.epoch_seed`)."""
    rng = np.random.default_rng((epoch_seed(seed, epoch), 0))
    return rng.permutation(num_blocks).tolist()


def pack_windows(
    pieces: Sequence[Sequence[Segment]], order: Iterable[int], buffer: int
) -> list[tuple[Segment, ...]]:
    """The pieces of the blocks in ``order``, packed into windows of at most ``buffer`` rows."""
    windows: list[tuple[Segment, ...]] = []
    current: list[Segment] = []
    rows = 0
    for block in order:
        for segment in pieces[block]:
            size = segment.stop - segment.start
            if current and rows + size > buffer:
                windows.append(tuple(current))
                current, rows = [], 0
            current.append(segment)
            rows += size
    if current:
        windows.append(tuple(current))
    return windows


def epoch_windows(
    pieces: Sequence[Sequence[Segment]], buffer: int, seed: int, epoch: int, shuffle: bool
) -> list[tuple[Segment, ...]]:
    """The block windows of epoch ``epoch``: the blocks permuted (in file order unless
    ``shuffle``), their pieces packed (:func:`pack_windows`)."""
    order = block_order(len(pieces), seed, epoch) if shuffle else range(len(pieces))
    return pack_windows(pieces, order, buffer)


def range_windows(num_rows: int, buffer: int) -> list[RowRange]:
    """A full permutation's windows: ``buffer`` positions each, the last one shorter.

    >>> range_windows(10, 4)
    [RowRange(first=0, stop=4), RowRange(first=4, stop=8), RowRange(first=8, stop=10)]
    """
    return [RowRange(a, min(a + buffer, num_rows)) for a in range(0, num_rows, buffer)]


def permuted_rows(num_rows: int, seed: int, epoch: int, window: RowRange) -> np.ndarray:
    """The rows (file order indices) at the window's positions of the epoch's permutation."""
    positions = np.arange(window.first, window.stop, dtype=np.int64)
    return IndexPermutation(num_rows, epoch_seed(seed, epoch))(positions)


def window_permutation(seed: int, epoch: int, window: int, rows: int) -> np.ndarray:
    """The order in which window ``window`` of a block-shuffled epoch yields its ``rows`` rows."""
    return np.random.default_rng((epoch_seed(seed, epoch), 1, window)).permutation(rows)


def chains(windows: Sequence[Window], first: int) -> list[list[int]]:
    """Windows ``first..`` grouped into runs where each window continues the previous one's last
    block exactly where it stopped (a block bigger than the buffer spans several windows)."""
    runs: list[list[int]] = []
    for w in range(first, len(windows)):
        window, previous = windows[w], windows[w - 1]
        if runs and isinstance(window, tuple) and isinstance(previous, tuple):
            last, start = previous[-1], window[0]
            if last.block == start.block and last.stop == start.start:
                runs[-1].append(w)
                continue
        runs.append([w])
    return runs


def window_span(sizes: Iterable[int], lo: int, hi: int) -> tuple[int, int, int] | None:
    """Which windows hold rows ``lo..hi`` of an epoch, given the windows' sizes in order:
    ``(first, stop, skip)``, windows ``first..stop-1`` with the first ``skip`` rows of window
    ``first`` before ``lo``; ``None`` when no window does. ``sizes`` is read no further than the
    window that reaches ``hi``, so a lazy one costs only the windows needed.
    """
    first, skip, seen, stop = None, lo, 0, 0
    for w, size in enumerate(sizes):
        stop = w + 1
        if first is None and skip < size:
            first = w
        elif first is None:
            skip -= size
        seen += size
        if seen >= hi:
            break
    if first is None or hi <= lo:
        return None
    return first, stop, skip

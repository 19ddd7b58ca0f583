"""The pieces of a streamed epoch on their own: its order as pure functions of (seed, epoch, rows
per block), held to the order ``StreamSource`` gave before they left it, and the decode-ahead
threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchfit.data.decode_ahead import DecodeAhead
from batchfit.data.stream_order import (
    RowRange,
    block_pieces,
    chains,
    epoch_windows,
    permuted_rows,
    range_windows,
    window_permutation,
    window_span,
)

BLOCK_ROWS = [5, 0, 12, 3, 7, 40]  # an empty block, and blocks bigger than the buffer

#: ``StreamSource._windows`` for BLOCK_ROWS, a buffer of 10 rows and seed 3, recorded before the
#: order moved to its own module: (block, start, stop) of each segment of each window.
RECORDED_WINDOWS = {
    (0, True): [
        [(2, 0, 6)], [(2, 6, 12)], [(4, 0, 7), (3, 0, 3)], [(5, 0, 10)], [(5, 10, 20)],
        [(5, 20, 30)], [(5, 30, 40)], [(0, 0, 5)],
    ],
    (1, True): [
        [(3, 0, 3), (2, 0, 6)], [(2, 6, 12)], [(0, 0, 5)], [(5, 0, 10)], [(5, 10, 20)],
        [(5, 20, 30)], [(5, 30, 40)], [(4, 0, 7)],
    ],
    (1, False): [
        [(0, 0, 5)], [(2, 0, 6)], [(2, 6, 12), (3, 0, 3)], [(4, 0, 7)], [(5, 0, 10)],
        [(5, 10, 20)], [(5, 20, 30)], [(5, 30, 40)],
    ],
}


@pytest.mark.parametrize(("epoch", "shuffle"), list(RECORDED_WINDOWS))
def test_the_block_windows_are_the_ones_recorded_for_the_same_seed(epoch, shuffle):
    windows = epoch_windows(block_pieces(BLOCK_ROWS, 10), 10, 3, epoch, shuffle)
    got = [[(s.block, s.start, s.stop) for s in window] for window in windows]
    assert got == RECORDED_WINDOWS[(epoch, shuffle)]


def test_the_rows_within_a_window_and_a_full_permutation_are_the_ones_recorded():
    assert window_permutation(3, 1, 2, 9).tolist() == [6, 1, 4, 2, 7, 5, 0, 8, 3]
    assert permuted_rows(20, 3, 1, RowRange(5, 12)).tolist() == [0, 4, 9, 5, 6, 11, 13]
    every = np.concatenate([permuted_rows(20, 3, 1, w) for w in range_windows(20, 6)])
    assert sorted(every.tolist()) == list(range(20))


@given(
    st.lists(st.integers(0, 30), max_size=12),
    st.integers(1, 16),
    st.integers(0, 5),
    st.integers(0, 2),
)
def test_every_epoch_packs_every_row_once_in_windows_no_bigger_than_the_buffer(
    block_rows, buffer, seed, epoch
):
    windows = epoch_windows(block_pieces(block_rows, buffer), buffer, seed, epoch, True)
    rows = [(s.block, r) for w in windows for s in w for r in range(s.start, s.stop)]
    assert sorted(rows) == [(b, r) for b, n in enumerate(block_rows) for r in range(n)]
    assert all(sum(s.stop - s.start for s in w) <= buffer for w in windows)
    for chain in chains(windows, 0):  # a chain continues one block where it stopped
        for before, after in zip(chain, chain[1:], strict=False):
            last, first = windows[before][-1], windows[after][0]
            assert (last.block, last.stop) == (first.block, first.start)


@given(st.lists(st.integers(0, 9), max_size=8), st.integers(0, 60), st.integers(0, 60))
def test_the_window_span_holds_exactly_the_rows_asked_for(sizes, lo, hi):
    owner = [w for w, size in enumerate(sizes) for _ in range(size)]  # the window of each row
    wanted = owner[lo:hi]
    expected = None
    if wanted:  # the window of row lo, one past the last window needed, rows before lo in it
        stop = wanted[-1] + 1 if hi <= len(owner) else len(sizes)
        expected = (wanted[0], stop, lo - sum(sizes[: wanted[0]]))
    assert window_span(iter(sizes), lo, hi) == expected


def test_decode_ahead_raises_an_error_at_its_window_and_joins_its_threads_however_it_ends():
    def decode(w: int) -> int:
        if w == 3:
            raise ValueError("window 3 is damaged")
        return w

    before = threading.active_count()
    got = []
    with pytest.raises(ValueError, match="window 3 is damaged"):
        for item in DecodeAhead(decode, [[0, 1], [2], [3], [4]], workers=3):
            got.append(item)
    assert got == [0, 1, 2]
    early = iter(DecodeAhead(lambda w: w, [[w] for w in range(100)], workers=2))
    assert [next(early), next(early)] == [0, 1]
    early.close()
    assert threading.active_count() == before

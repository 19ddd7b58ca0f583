"""A seeded random permutation of ``0..n-1`` that costs no memory: any position, any time.

A shuffled epoch over a memory-mapped file needs the permuted index of position ``i`` without
holding ``n`` integers (8 bytes a row: 600 MB for 78 million rows). A Feistel network is a
bijection on ``2**(2h)`` values built from any mixing function; "cycle walking" (apply it again
while the result is ``>= n``) restricts it to ``0..n-1`` and stays a bijection (Black and Rogaway,
"Ciphers with Arbitrary Finite Domains", 2002). So ``permuted(i)`` is a pure function of
``(n, seed, i)``: a resumed epoch asks for positions ``start..`` and gets the same rows.

NumPy only (no torch): positions in, row indices out.

Examples:
    >>> p = IndexPermutation(10, seed=3)
    >>> sorted(p(np.arange(10)).tolist()) == list(range(10))
    True
    >>> p(np.arange(10)).tolist() == IndexPermutation(10, seed=3)(np.arange(10)).tolist()
    True
"""

from __future__ import annotations

import numpy as np

from batchfit.data.source import epoch_seed
from batchfit.errors import BatchfitError

_ROUNDS = 6


def _mix(values: np.ndarray, key: np.uint64) -> np.ndarray:
    """SplitMix64's finaliser of ``values + key``: every input bit flips about half the output."""
    z = values + key
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class IndexPermutation:
    """The permutation of ``0..n-1`` drawn by ``seed``, evaluated for any array of positions."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = int(n)
        bits = max(2, (max(self.n, 2) - 1).bit_length())
        self._half = (bits + 1) // 2  # domain 2**(2*half) < 4n, so about 2 walks at most on average
        self._low_mask = np.uint64((1 << self._half) - 1)
        self._keys = [np.uint64(epoch_seed(seed, r)) for r in range(_ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self._half)
        left, right = x >> half, x & self._low_mask
        with np.errstate(over="ignore"):
            for key in self._keys:
                left, right = right, left ^ (_mix(right, key) & self._low_mask)
        return (left << half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The row index at each position (int64 array of the same shape)."""
        if self.n <= 1:
            return np.zeros_like(positions, dtype=np.int64)
        out = self._feistel(np.asarray(positions, dtype=np.uint64))
        outside = out >= np.uint64(self.n)
        while outside.any():
            out[outside] = self._feistel(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64)


def validation_count(n: int, fraction: float) -> int:
    """``round(fraction * n)`` samples for validation, refusing a split that empties either side.

    >>> validation_count(1000, 0.1)
    100
    """
    n_val = round(n * fraction)
    if n_val < 1 or n_val >= n:
        raise BatchfitError(
            f"A validation fraction of {fraction:g} of {n} samples leaves {n_val} for validation "
            f"and {n - n_val} for training; choose a fraction that leaves at least one sample in "
            "each, or 0 for none."
        )
    return n_val


class Holdout:
    """Which rows of ``0..n-1`` are validation rows: exactly ``count`` of them, drawn by ``seed``.

    Row ``i`` is held out when its position under a seeded :class:`IndexPermutation` is below
    ``count``. It is a pure function of ``(n, count, seed)`` evaluated row by row, so the streamed
    source (which asks about one window of rows at a time) and the in-memory source (which asks
    about all rows at once) hold out the same rows: choosing --stream or --no-stream, or letting
    the free memory choose, never changes the validation set.

    Examples:
        >>> held = Holdout(10, 3, seed=0).is_validation(np.arange(10))
        >>> int(held.sum()), held.tolist() == Holdout(10, 3, seed=0).is_validation(
        ...     np.arange(10)).tolist()
        (3, True)
    """

    #: Rows asked about at once by :meth:`all_rows`: bounds the temporary arrays (8 bytes a row).
    CHUNK_ROWS = 1 << 20

    def __init__(self, n: int, count: int, seed: int) -> None:
        self.n, self.count, self.seed = int(n), int(count), int(seed)
        self._permutation = IndexPermutation(self.n, epoch_seed(seed, -1))

    def is_validation(self, rows: np.ndarray) -> np.ndarray:
        """A boolean array: True where the row (an index into ``0..n-1``) is a validation row."""
        return self._permutation(rows) < self.count

    def all_rows(self) -> np.ndarray:
        """:meth:`is_validation` of every row ``0..n-1``, computed in chunks."""
        return np.concatenate(
            [
                self.is_validation(np.arange(a, min(a + self.CHUNK_ROWS, self.n), dtype=np.int64))
                for a in range(0, self.n, self.CHUNK_ROWS)
            ]
        )

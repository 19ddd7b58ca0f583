"""One window of a streamed epoch as arrays: read its rows, keep this side of the validation
split, convert them (:mod:`batchfit.data.window_convert`) and put them in the epoch's order
(:mod:`batchfit.data.stream_order`).

A :class:`WindowDecoder` is called from the decode threads (:mod:`batchfit.data.decode_ahead`),
several windows at once: it changes nothing after it is made.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from batchfit.data.permute import Holdout
from batchfit.data.readers import Reader
from batchfit.data.stream_order import RowRange, Segment, Window, permuted_rows, window_permutation
from batchfit.data.window_convert import (
    Raw,
    check_nulls,
    class_labels,
    convert,
    convert_many,
    is_flat,
    take,
)
from batchfit.errors import BatchfitError


@dataclass(frozen=True)
class HoldoutSide:
    """One side of a split: the validation rows of ``rows`` (or the others), and the fraction."""

    rows: Holdout
    fraction: float
    keep_validation: bool

    def mask(self, rows: np.ndarray) -> np.ndarray:
        """True where the row (an index in file order) is on this side of the split."""
        held_out = self.rows.is_validation(rows)
        return held_out if self.keep_validation else ~held_out


@dataclass(frozen=True)
class _Part:
    """One piece read for a window: the rows kept, where they came from (for messages), and the
    segment when the holdout filtered it (to count a bad value over the whole piece named)."""

    raw: Raw
    where: str
    filtered_from: Segment | None


class WindowDecoder:
    """Windows of ``reader`` as ``(x, y)`` arrays in the order an epoch visits their rows.

    ``holdout``: the side of the validation split read (``None``: every row). ``shuffle``: the
    rows of a block window are permuted (a full permutation's windows come permuted already).
    ``labels_as_classes``: float targets are read as int64 class labels.
    """

    def __init__(
        self,
        reader: Reader,
        features: list[str],
        target: str,
        *,
        seed: int,
        shuffle: bool,
        holdout: HoldoutSide | None = None,
        labels_as_classes: bool = False,
    ) -> None:
        self.reader, self.features, self.target = reader, list(features), target
        self.seed, self.shuffle, self.holdout = seed, shuffle, holdout
        self.labels_as_classes = labels_as_classes
        self._flat = all(is_flat(reader.column_type(c)) for c in self.features)
        self._offsets = np.cumsum([0] + reader.block_rows)  # the first row of each block

    def with_class_labels(self) -> WindowDecoder:
        """This decoder with float targets read as int64 class labels."""
        return WindowDecoder(
            self.reader,
            self.features,
            self.target,
            seed=self.seed,
            shuffle=self.shuffle,
            holdout=self.holdout,
            labels_as_classes=True,
        )

    def size(self, epoch: int, window: Window) -> int:
        """Rows of this side of the split in ``window``."""
        if self.holdout is None:  # every row counts: no need to work out the window's order
            if isinstance(window, RowRange):
                return window.stop - window.first
            return sum(s.stop - s.start for s in window)
        if isinstance(window, RowRange):
            return len(self._permuted_rows(epoch, window))
        return sum(int(self._kept(self.holdout, s).sum()) for s in window)

    def decode(self, epoch: int, w: int, window: Window) -> tuple[np.ndarray, np.ndarray] | None:
        """Window ``w`` as (x, y) arrays in the order the epoch visits them; None if it holds no
        row of this source (every row is on the other side of the validation split)."""
        if isinstance(window, RowRange):
            return self._decode_range(epoch, window)
        parts = self._read(window)
        if not parts:
            return None
        try:
            pieces = [(p.raw, p.where) for p in parts]
            x, y = convert_many(pieces, self.features, self.target, self._flat)
        except BatchfitError:
            if self.holdout is not None:
                self._explain(parts)
            raise
        if self.shuffle:
            perm = window_permutation(self.seed, epoch, w, len(y))
            x, y = take(x, perm), take(y, perm)
        return x, self._labels(y)

    def _permuted_rows(self, epoch: int, window: RowRange) -> np.ndarray:
        """The rows of this side of the split at the window's positions of the permutation."""
        rows = permuted_rows(self.reader.num_rows, self.seed, epoch, window)
        if self.holdout is not None:
            rows = rows[self.holdout.mask(rows)]
        return rows

    def _decode_range(self, epoch: int, window: RowRange) -> tuple[np.ndarray, np.ndarray] | None:
        """A full permutation's window: its rows read in file order, then put in the epoch's."""
        rows = self._permuted_rows(epoch, window)
        if not len(rows):
            return None
        order = np.argsort(rows, kind="stable")
        where = f"{len(rows)} rows (one shuffled window) of {self.reader.label}"
        raw = self.reader.take(rows[order])
        x_sorted, y_sorted = convert(raw, self.features, self.target, where)
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return take(x_sorted, back), self._labels(take(y_sorted, back))

    def _kept(self, holdout: HoldoutSide, s: Segment) -> np.ndarray:
        """True for each row of segment ``s`` on this side of the split."""
        base = self._offsets[s.block]
        return holdout.mask(np.arange(base + s.start, base + s.stop))

    def _read(self, window: tuple[Segment, ...]) -> list[_Part]:
        """The window's segments read, nulls checked over each whole segment, and only the rows
        of this side of the split kept (segments with none are not read)."""
        parts = []
        for s in window:
            mask = None
            if self.holdout is not None:
                mask = self._kept(self.holdout, s)
                if not mask.any():
                    continue
            raw = self.reader.read(s.block, s.start, s.stop)
            where = self.reader.piece(s.block, s.start, s.stop)
            check_nulls(raw, (*self.features, self.target), where)
            if mask is not None and not mask.all():
                if isinstance(raw, pa.Table):
                    raw = raw.filter(pa.array(mask))
                else:
                    raw = {k: v[mask] for k, v in raw.items()}
                parts.append(_Part(raw, where, s))
            else:
                parts.append(_Part(raw, where, None))
        return parts

    def _explain(self, parts: list[_Part]) -> None:
        """Convert each piece again, whole, so that a bad value is counted over the piece named
        (the holdout may have kept only some of its rows); raises the first problem found."""
        for part in parts:
            raw = part.raw
            if part.filtered_from is not None:
                s = part.filtered_from
                raw = self.reader.read(s.block, s.start, s.stop)
            convert(raw, self.features, self.target, part.where)

    def _labels(self, y: np.ndarray) -> np.ndarray:
        """Float targets as int64 class labels when :meth:`with_class_labels` asked for it."""
        if not self.labels_as_classes:
            return y
        return class_labels(y, self.target, self.reader.label)

"""Train on files bigger than memory: streamed, shuffled, resumable, sharded batches.

A :class:`StreamSource` reads a Parquet file or folder (or glob), an Arrow IPC/Feather file, a
``.npy`` file or a CSV file piece by piece (:mod:`batchfit.data.readers`) and yields ready torch
batches. Memory depends on the shuffle buffer, the batch size and the prefetch depth, never on the
size of the data.

**Order of an epoch** (a pure function of ``(seed, epoch)`` and the file metadata, so resuming at
``(epoch, start)`` is exact and re-reads only one window):

- Block formats (Parquet, compressed Arrow, CSV, Arrow IPC streams): the blocks (row groups) are
  permuted per epoch;
  a block larger than the buffer is cut into consecutive pieces; the permuted pieces are packed
  into *windows* of at most ``shuffle_buffer`` rows, and the rows of window ``w`` are permuted by a
  generator seeded with ``(seed, epoch, w)``. Rows move anywhere their block goes, and within the
  window that holds them. Nothing depends on history (unlike a reservoir buffer, whose contents
  would have to be saved in the checkpoint).
- Random-access formats (``.npy`` memory map, uncompressed Arrow IPC): a full permutation of all
  rows (:class:`~batchfit.data.permute.IndexPermutation`, no memory per row), read a window at a
  time in sorted row order.

**Sharding** (``world_size > 1``): the data is read once across the ranks, not once per rank.
Rank ``r`` reads one contiguous run of the epoch's order, about ``1/W`` of its rows
(:func:`~batchfit.data.source.rank_rows`), and decodes only the windows that hold it; its share
of every global step (:func:`~batchfit.core.accounting.split_evenly` of the step's size, the same
arithmetic on every rank) comes from that run. Every rank takes the same number of steps and the
union over the ranks is every row exactly once per epoch, but a global batch groups other rows
together than one process would (for in-memory data the grouping is the one-process one). Resume
on the same world size is exact.

**Decoding ahead**: ``workers`` threads (default 1) decode the next windows while the current one
is cut into batches, at most ``workers`` windows ahead. Consecutive windows that continue one
block (a row group or CSV file bigger than the buffer) go to the same thread, which keeps its read
position in the block, so no block is decoded twice.

**Validation** from the same files: :meth:`StreamSource.split` holds out exactly
``round(fraction * N)`` rows chosen by :class:`~batchfit.data.permute.Holdout`, with no pass over
the data, the same rows as the in-memory split; each evaluation then reads the files once (use
``--val-data`` for big data).
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from batchfit.core import options
from batchfit.core.accounting import split_evenly
from batchfit.core.options import opt_value
from batchfit.core.units import format_bytes, parse_size
from batchfit.data.files import (
    _features_tensor,
    _numeric_column,
    _pick_features,
    _pick_target,
    _target_tensor,
    column_width,
    default_target,
    file_format,
    positional,
)
from batchfit.data.permute import Holdout, IndexPermutation, validation_count
from batchfit.data.prefetch import Failure
from batchfit.data.prefetch import prefetch as run_ahead
from batchfit.data.readers import (
    Reader,
    check_types,
    files_fingerprint,
    open_reader,
    resolve_files,
)
from batchfit.data.source import Batch, BatchSource, check_class_labels, epoch_seed, rank_rows
from batchfit.errors import BatchfitError

#: Default shuffle buffer: as many rows as one window of this many bytes holds (the decoded rows,
#: their float32 copy and its permuted copy): 466,000 rows of 16 float32 features and an int64
#: label, the same as 32 MiB of decoded rows.
DEFAULT_SHUFFLE_BUFFER_BYTES = parse_size(options.default_of("shuffle_buffer"))
DEFAULT_PREFETCH = options.default_of("prefetch")
#: Stream when loading would take more than this share of the available memory. Loading a file
#: holds the Arrow table and the float32 tensors at once: about 2x the decoded size, plus slack.
LOAD_SHARE_OF_AVAILABLE = 0.25
_LOAD_OVERHEAD = 2.0


@dataclass(frozen=True)
class _Segment:
    block: int
    start: int
    stop: int


@dataclass(frozen=True)
class _Holdout:
    """One side of a split: the validation rows of ``rows`` (or the others), and the fraction."""

    rows: Holdout
    fraction: float
    keep_validation: bool

    def mask(self, rows: np.ndarray) -> np.ndarray:
        held_out = self.rows.is_validation(rows)
        return held_out if self.keep_validation else ~held_out


@dataclass
class _Part:
    """One piece read for a window: the rows kept, where they came from (for messages), and the
    segment when the holdout filtered it (to count a bad value over the whole piece named)."""

    raw: pa.Table | dict[str, np.ndarray]
    where: str
    filtered_from: _Segment | None


def _target_kind(kind: object) -> str:
    if isinstance(kind, pa.DataType):
        if pa.types.is_boolean(kind):
            return "binary"
        return "class" if pa.types.is_integer(kind) else "real"
    dtype = np.dtype(kind)
    if dtype.kind == "b":
        return "binary"
    return "class" if dtype.kind in "iu" else "real"


class StreamSource(BatchSource):
    """Batches streamed from files through a seeded, resumable shuffle buffer.

    ``shuffle_buffer`` is in rows (an int) or the bytes of one window (text such as ``"64MiB"``:
    the decoded rows, their float32 copy and its permuted copy; default 96 MiB); the stream holds
    about ``1 + workers`` windows and ``prefetch + 1`` batches (:meth:`memory_bytes`). ``prefetch``
    batches are prepared ahead in a background thread (0: none); ``workers`` threads decode
    windows ahead, window ``w`` by one worker only and delivered in order, so rows are never
    duplicated or lost.

    Examples:
        >>> import tempfile, pyarrow.parquet as pq
        >>> path = Path(tempfile.mkdtemp()) / "d.parquet"
        >>> pq.write_table(pa.table({"x": np.arange(10.0), "y": np.arange(10)}), path,
        ...                row_group_size=4)
        >>> src = open_stream(path, target="y", shuffle=False)
        >>> [y.tolist() for _, y in src.batches(0, 4)]
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        >>> [y.tolist() for _, y in src.batches(0, 4, start=8)]
        [[8, 9]]
        >>> src.num_samples, sorted(sum((y.tolist() for _, y in open_stream(path, target="y",
        ...     shuffle_buffer=3).batches(1, 4)), []))
        (10, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """

    reads_rank_share = True

    def __init__(
        self,
        reader: Reader,
        features: list[str],
        target: str,
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int | str | None = None,
        prefetch: int = DEFAULT_PREFETCH,
        workers: int = 1,
        holdout: _Holdout | None = None,
    ) -> None:
        self.reader, self.features, self.target = reader, list(features), target
        #: Rows decoded from the files so far, all epochs together (what this process read).
        self.rows_decoded = 0
        self.seed, self.shuffle = seed, shuffle
        self.prefetch, self.workers, self.holdout = prefetch, max(1, workers), holdout
        self.target_kind = _target_kind(reader.column_type(target))
        fmt = file_format(reader.files[0])
        if not positional(reader.column_names, fmt):
            self.columns = {c: column_width(reader.column_type(c)) for c in self.features}
        self._float_labels_as_classes = False
        self._flat = all(_is_flat(reader.column_type(c)) for c in self.features)
        if shuffle_buffer is None or isinstance(shuffle_buffer, str):
            window_bytes = (
                DEFAULT_SHUFFLE_BUFFER_BYTES
                if shuffle_buffer is None
                else parse_size(shuffle_buffer)
            )
            shuffle_buffer = max(1, int(window_bytes // self._window_row_bytes()))
        self.shuffle_buffer = int(shuffle_buffer)
        self.full_permutation = shuffle and reader.random_access
        self._pieces = [self._cut(b, rows) for b, rows in enumerate(reader.block_rows)]
        self._offsets = np.cumsum([0] + reader.block_rows)
        n = reader.num_rows
        if holdout is None:
            self._num_samples = n
        else:
            held = holdout.rows.count
            self._num_samples = held if holdout.keep_validation else n - held

    # -- the order of an epoch -------------------------------------------------------------
    def _cut(self, block: int, rows: int) -> list[_Segment]:
        if rows == 0:
            return []  # an empty row group or record batch: nothing to read
        parts = split_evenly(rows, max(1, math.ceil(rows / self.shuffle_buffer)))
        bounds = np.cumsum([0] + parts)
        return [
            _Segment(block, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]

    def _windows(self, epoch: int) -> list:
        """Window ``w`` of the epoch: a tuple of segments, or a (first, stop) range of positions."""
        buffer = self.shuffle_buffer
        if self.full_permutation:
            n = self.reader.num_rows
            return [(a, min(a + buffer, n)) for a in range(0, n, buffer)]
        order = range(len(self._pieces))
        if self.shuffle:
            rng = np.random.default_rng((epoch_seed(self.seed, epoch), 0))
            order = rng.permutation(len(self._pieces)).tolist()
        windows, current, rows = [], [], 0
        for block in order:
            for segment in self._pieces[block]:
                size = segment.stop - segment.start
                if current and rows + size > buffer:
                    windows.append(tuple(current))
                    current, rows = [], 0
                current.append(segment)
                rows += size
        if current:
            windows.append(tuple(current))
        return windows

    def _window_rows(self, epoch: int, window) -> np.ndarray | None:
        """Row indices (file order) of a full-permutation window; None for segment windows."""
        if isinstance(window[0], _Segment):
            return None
        first, stop = window
        rows = IndexPermutation(self.reader.num_rows, epoch_seed(self.seed, epoch))(
            np.arange(first, stop, dtype=np.int64)
        )
        if self.holdout is not None:
            rows = rows[self.holdout.mask(rows)]
        return rows

    def _window_size(self, epoch: int, window) -> int:
        if self.holdout is None:  # every row counts: no need to work out the window's order
            if isinstance(window[0], _Segment):
                return sum(s.stop - s.start for s in window)
            return window[1] - window[0]
        rows = self._window_rows(epoch, window)
        if rows is not None:
            return len(rows)
        total = 0
        for s in window:
            base = self._offsets[s.block]
            total += int(self.holdout.mask(np.arange(base + s.start, base + s.stop)).sum())
        return total

    # -- reading ------------------------------------------------------------------------------
    def _convert(self, raw: pa.Table | dict[str, np.ndarray], where: str):
        if isinstance(raw, pa.Table):
            arrays = [_numeric_column(raw, c, where) for c in self.features]
            target = _numeric_column(raw, self.target, where)
        else:
            arrays = [np.asarray(raw[c]) for c in self.features]
            target = np.asarray(raw[self.target])
        x = _features_tensor(arrays, self.features, where).numpy()
        y = _target_tensor(target, self.target, where)[0].numpy()
        return x, y

    def _convert_many(self, parts: list[_Part]) -> tuple[np.ndarray, np.ndarray]:
        """Convert the raw pieces of a window into one (x, y), copying each value once."""
        if not (self._flat and all(isinstance(p.raw, pa.Table) for p in parts)):
            converted = [self._convert(p.raw, p.where) for p in parts]
            xs, ys = [c[0] for c in converted], [c[1] for c in converted]
            return (
                xs[0] if len(xs) == 1 else np.concatenate(xs),
                ys[0] if len(ys) == 1 else np.concatenate(ys),
            )
        total = sum(p.raw.num_rows for p in parts)
        x = np.empty((total, len(self.features)), dtype=np.float32)
        targets, offset = [], 0
        for part in parts:
            for j, name in enumerate(self.features):
                position = offset
                for chunk in part.raw.column(name).chunks:
                    x[position : position + len(chunk), j] = chunk.to_numpy(zero_copy_only=False)
                    position += len(chunk)
            targets.append(_numeric_column(part.raw, self.target, part.where))
            offset += part.raw.num_rows
        # One fast pass: a finite sum means finite values (an overflow only costs the slow check).
        if not np.isfinite(x.sum()) and not np.isfinite(x).all():
            for part in parts:
                self._convert(part.raw, part.where)  # raises, naming column, piece and count
        y = targets[0] if len(targets) == 1 else np.concatenate(targets)
        return x, _target_tensor(y, self.target, parts[0].where)[0].numpy()

    def _check_nulls(self, raw: pa.Table | dict[str, np.ndarray], where: str) -> None:
        """Nulls are counted over the whole piece read, before the holdout keeps part of it."""
        if isinstance(raw, pa.Table):
            for name in (*self.features, self.target):
                if raw.column(name).null_count:
                    _numeric_column(raw, name, where)  # raises, naming column, piece and count

    def _explain(self, parts: list[_Part]) -> None:
        """Convert each piece again, whole, so that a bad value is counted over the piece named
        (the holdout may have kept only some of its rows); raises the first problem found."""
        for part in parts:
            raw = part.raw
            if part.filtered_from is not None:
                s = part.filtered_from
                raw = self.reader.read(s.block, s.start, s.stop)
            self._convert(raw, part.where)

    def _decode(self, epoch: int, w: int, window) -> tuple[np.ndarray, np.ndarray] | None:
        """Window ``w`` as (x, y) arrays in the order the epoch visits them; None if it holds no
        row of this source (every row is on the other side of the validation split)."""
        rows = self._window_rows(epoch, window)
        if rows is not None:
            if not len(rows):
                return None
            order = np.argsort(rows, kind="stable")
            where = f"{len(rows)} rows (one shuffled window) of {self.reader.label}"
            x_sorted, y_sorted = self._convert(self.reader.take(rows[order]), where)
            back = np.empty_like(order)
            back[order] = np.arange(len(order))
            return _take(x_sorted, back), self._labels(_take(y_sorted, back))
        parts = []
        for s in window:
            mask = None
            if self.holdout is not None:
                base = self._offsets[s.block]
                mask = self.holdout.mask(np.arange(base + s.start, base + s.stop))
                if not mask.any():
                    continue
            raw = self.reader.read(s.block, s.start, s.stop)
            where = self.reader.piece(s.block, s.start, s.stop)
            self._check_nulls(raw, where)
            if mask is not None and not mask.all():
                if isinstance(raw, pa.Table):
                    raw = raw.filter(pa.array(mask))
                else:
                    raw = {k: v[mask] for k, v in raw.items()}
                parts.append(_Part(raw, where, s))
            else:
                parts.append(_Part(raw, where, None))
        if not parts:
            return None
        try:
            x, y = self._convert_many(parts)
        except BatchfitError:
            if self.holdout is not None:
                self._explain(parts)
            raise
        if self.shuffle:
            rng = np.random.default_rng((epoch_seed(self.seed, epoch), 1, w))
            perm = rng.permutation(len(y))
            x, y = _take(x, perm), _take(y, perm)
        return x, self._labels(y)

    def _labels(self, y: np.ndarray) -> np.ndarray:
        """Float targets as int64 class labels when :meth:`as_class_labels` asked for it."""
        if not self._float_labels_as_classes:
            return y
        if y.ndim != 1 or not (y == np.round(y)).all() or (y < 0).any():
            raise BatchfitError(
                f"The cross_entropy loss needs class labels 0..C-1, but the target '{self.target}' "
                f"in {self.reader.label} holds other numbers; store the labels as integers, or "
                f"use {opt_value('loss', 'mse')}."
            )
        return y.astype(np.int64)

    def _decoded(self, epoch: int, windows: list, first: int) -> Iterator[tuple | None]:
        """Decoded windows from ``first`` on, in order, while ``workers`` threads decode the
        windows ahead (at most ``workers`` of them: memory stays bounded).

        A *chain* of consecutive windows that continue one block is decoded by one thread, which
        keeps its read position in the block; a window may be decoded only once the consumer is
        within ``workers`` windows of it. Chains are taken in order, so the window the consumer
        waits for is always in a chain that a thread holds or takes next: no deadlock.
        """
        chains = iter(_chains(windows, first))
        cond = threading.Condition()
        ready: dict[int, object] = {}
        state = {"next": first, "stop": False}

        def decode_chains() -> None:
            while True:
                with cond:
                    chain = None if state["stop"] else next(chains, None)
                if chain is None:
                    return
                for w in chain:
                    with cond:
                        while not state["stop"] and w >= state["next"] + self.workers:
                            cond.wait()
                        if state["stop"]:
                            return
                    try:
                        item: object = self._decode(epoch, w, windows[w])
                    except BaseException as exc:  # raised in the consumer, at window w
                        item = Failure(exc)
                    with cond:
                        ready[w] = item
                        if isinstance(item, tuple):
                            self.rows_decoded += len(item[1])
                        cond.notify_all()
                    if isinstance(item, Failure):
                        return

        threads = [
            threading.Thread(target=decode_chains, name="batchfit-decode", daemon=True)
            for _ in range(self.workers)
        ]
        for thread in threads:
            thread.start()
        try:
            for w in range(first, len(windows)):
                with cond:
                    while w not in ready:
                        cond.wait()
                    item = ready.pop(w)
                    state["next"] = w + 1
                    cond.notify_all()
                if isinstance(item, Failure):
                    raise item.exc
                yield item
                del item  # not held while the next window is awaited
        finally:
            with cond:
                state["stop"] = True
                cond.notify_all()
            for thread in threads:
                thread.join()

    def _rows(self, epoch: int, lo: int, hi: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Rows ``lo..hi`` of the epoch's order as decoded (x, y) pieces; only the windows that
        hold them are decoded (and no window past them is decoded ahead)."""
        windows = self._windows(epoch)
        first, skip, last, seen = None, lo, len(windows), 0
        for w, window in enumerate(windows):
            size = self._window_size(epoch, window)
            if first is None and skip < size:
                first = w
            elif first is None:
                skip -= size
            seen += size
            if seen >= hi:
                last = w + 1
                break
        remaining = hi - lo
        if first is None or remaining <= 0:
            return
        for decoded in self._decoded(epoch, windows[:last], first):
            if decoded is None:
                continue  # a window with no row of this side of the validation split
            x, y = decoded
            if skip:
                x, y, skip = x[skip:], y[skip:], 0
            if len(y) > remaining:
                x, y = x[:remaining], y[:remaining]
            remaining -= len(y)
            yield x, y
            if remaining == 0:
                return

    def _cut_batches(self, pieces: Iterator[tuple], sizes: Iterator[int]) -> Iterator[Batch]:
        """The rows of ``pieces`` cut into batches of the given ``sizes`` (0 gives an empty one)."""
        pending_x: list[np.ndarray] = []
        pending_y: list[np.ndarray] = []
        pending, x, y, offset = 0, None, None, 0
        for size in sizes:
            while pending < size:
                if y is None or offset == len(y):
                    x, y = next(pieces)
                    offset = 0
                take = min(size - pending, len(y) - offset)
                pending_x.append(x[offset : offset + take])
                pending_y.append(y[offset : offset + take])
                pending += take
                offset += take
            if size == 0:
                pending_x, pending_y = [self._empty_x()], [self._empty_y()]
            yield self._batch(pending_x, pending_y)
            pending_x, pending_y, pending = [], [], 0

    def _empty_x(self) -> np.ndarray:
        return np.empty((0, max(1, self._feature_width())), dtype=np.float32)

    def _empty_y(self) -> np.ndarray:
        return np.empty((0,), dtype=np.int64 if self.target_kind == "class" else np.float32)

    def _batch(self, xs: list[np.ndarray], ys: list[np.ndarray]) -> Batch:
        """One batch from its pieces, its labels checked first when asked to (in the prefetch
        thread, on the CPU: free for the training step)."""
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        y = ys[0] if len(ys) == 1 else np.concatenate(ys)
        if self.classes is not None and self.target_kind == "class":
            check_class_labels(y, self.classes, self.reader.label)
        return torch.from_numpy(x), torch.from_numpy(y)

    # -- the BatchSource contract ---------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self._num_samples

    def batches(
        self,
        epoch: int,
        batch_size: int,
        *,
        start: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        n = self.num_samples
        end = n - n % batch_size if drop_last else n
        if start >= end:
            return iter(())
        plan = rank_rows(start, end, batch_size, rank, world_size)
        pieces = self._rows(epoch, plan.first, plan.stop)
        return run_ahead(self._cut_batches(pieces, iter(plan.shares)), self.prefetch)

    def as_class_labels(self) -> StreamSource:
        """This stream with a float target read as int64 class labels (a 2-D ``.npy`` keeps its
        labels as floats), for ``--loss cross_entropy``; each window is checked as it is read."""
        labels = copy.copy(self)
        labels._float_labels_as_classes = True
        labels.target_kind = "class"
        return labels

    def split(self, fraction: float, seed: int) -> tuple[StreamSource, StreamSource]:
        """Hold out exactly ``round(fraction * N)`` seeded rows as unshuffled validation data."""
        if self.holdout is not None:
            raise BatchfitError(
                "This stream is already one side of a training/validation split; split the "
                "whole stream once."
            )
        n = self.num_samples
        held_out = Holdout(n, validation_count(n, fraction), seed)
        common = dict(
            features=self.features,
            target=self.target,
            shuffle_buffer=self.shuffle_buffer,
            prefetch=self.prefetch,
            workers=self.workers,
        )
        train = StreamSource(
            self.reader,
            seed=self.seed,
            shuffle=self.shuffle,
            holdout=_Holdout(held_out, float(fraction), keep_validation=False),
            **common,
        )
        val = StreamSource(
            self.reader,
            shuffle=False,
            holdout=_Holdout(held_out, float(fraction), keep_validation=True),
            **common,
        )
        if self._float_labels_as_classes:
            train, val = train.as_class_labels(), val.as_class_labels()
        return train, val

    def _out_row_bytes(self) -> int:
        """Bytes of one row as batches hold it: float32 features and the target."""
        target = 8 if self.target_kind == "class" else 4
        return 4 * max(1, self._feature_width()) + target

    def _window_row_bytes(self) -> float:
        """Bytes one row takes in a window: decoded, converted, and the permuted copy."""
        return self.reader.row_bytes + 2 * self._out_row_bytes()

    def memory_bytes(self, batch_size: int) -> int:
        """About how many bytes the stream holds at once for ``batch_size``: the window being cut
        into batches, ``workers`` windows decoded ahead, and ``prefetch + 1`` batches."""
        window = min(self.shuffle_buffer, self.reader.num_rows) * self._window_row_bytes()
        batches = (self.prefetch + 1) * batch_size * self._out_row_bytes()
        return int(window * (1 + self.workers) + batches)

    def _feature_width(self) -> int:
        width = 0
        for name in self.features:
            kind = self.reader.column_type(name)
            width += getattr(kind, "list_size", 1) if isinstance(kind, pa.DataType) else 1
        return width

    def fingerprint(self) -> dict[str, Any]:
        """What decides the order: the files, the shuffle and, for block shuffling, the buffer
        (a full permutation does not depend on it), and the validation split."""
        block_shuffle = self.shuffle and not self.full_permutation
        return {
            "source": "stream",
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer if block_shuffle else None,
            "files": files_fingerprint(self.reader.files),
            "val_fraction": self.holdout.fraction if self.holdout else None,
            "val_seed": self.holdout.rows.seed if self.holdout else None,
        }

    def describe(self) -> str:
        order = (
            "full permutation"
            if self.full_permutation
            else f"shuffle buffer {self.shuffle_buffer:,} rows"
            if self.shuffle
            else "in file order"
        )
        threads = f"{self.workers} decode thread{'s' if self.workers > 1 else ''}"
        return (
            f"{self.num_samples} samples streamed from {self.reader.label} ({order}, {threads}, "
            f"prefetch {self.prefetch}; about {format_bytes(self.memory_bytes(0))} of windows "
            f"and {self.prefetch + 1} batches in memory)"
        )


def _is_flat(kind: object) -> bool:
    """One number per row (not a list): such columns go straight into the feature matrix."""
    if isinstance(kind, pa.DataType):
        return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
    return False


def _take(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    # np.take along axis 0 copies whole rows; fancy indexing (array[index]) is ~7x slower here.
    return np.take(array, index, axis=0)


def _chains(windows: list, first: int) -> list[list[int]]:
    """Windows ``first..`` grouped into runs where each window continues the previous one's last
    block exactly where it stopped (a block bigger than the buffer spans several windows)."""
    chains: list[list[int]] = []
    for w in range(first, len(windows)):
        window = windows[w]
        if chains and isinstance(window[0], _Segment):
            last, start = windows[w - 1][-1], window[0]
            if last.block == start.block and last.stop == start.start:
                chains[-1].append(w)
                continue
        chains.append([w])
    return chains


def open_stream(
    spec: str | Path,
    features: list[str] | None = None,
    target: str | None = None,
    *,
    seed: int = 0,
    shuffle: bool = True,
    shuffle_buffer: int | str | None = None,
    prefetch: int = DEFAULT_PREFETCH,
    workers: int = 1,
    match: str | None = None,
) -> StreamSource:
    """A :class:`StreamSource` over a file, folder or glob, columns checked from metadata.

    The target defaults as for in-memory files (a column named ``target``, ``label`` or ``y``;
    the last column of a plain 2-D ``.npy``). ``shuffle_buffer`` is rows (int) or the bytes of
    one window (``"64MiB"``); see :class:`StreamSource`. ``match`` names the training data when
    ``features`` are its columns (validation data; a plain ``.npy`` is then read by position).
    """
    options.check_optional("shuffle_buffer", shuffle_buffer)
    options.check("prefetch", prefetch)
    options.check("data_workers", workers)
    reader = open_reader(spec)
    names = reader.column_names
    label = reader.label
    fmt = file_format(reader.files[0])
    if match is not None and positional(names, fmt):
        features = None
    target = _pick_target(names, default_target(names, target, fmt), label)
    chosen = _pick_features(names, features, target, label, match)
    check_types(reader, chosen + [target])
    reader.select(chosen + [target])
    return StreamSource(
        reader,
        chosen,
        target,
        seed=seed,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        prefetch=prefetch,
        workers=workers,
    )


def estimated_bytes(spec: str | Path, files: list[Path] | None = None) -> int:
    """Bytes the data would take decoded in memory, from metadata or file sizes (no data read but
    the first record batch of an Arrow file). ``files``: ``spec`` already resolved."""
    files = files if files is not None else resolve_files(spec)
    fmt = file_format(files[0])
    if fmt == "arrow":
        return sum(_arrow_decoded_bytes(f) for f in files)
    if fmt != "parquet":
        return sum(f.stat().st_size for f in files)
    import pyarrow.parquet as pq

    total = 0
    for f in files:
        try:
            metadata = pq.read_metadata(f)
        except (pa.ArrowException, OSError):
            return sum(p.stat().st_size for p in files)  # the reader will name the bad file
        total += sum(metadata.row_group(g).total_byte_size for g in range(metadata.num_row_groups))
    return total


def _arrow_decoded_bytes(path: Path) -> int:
    """An Arrow IPC file's decoded size: its first record batch times the number of batches
    (writers cut equal batches), so a compressed file counts what it takes decoded, not on disk.
    Anything unreadable or unusual falls back to the file size (the reader names the problem)."""
    import pyarrow.ipc as ipc

    size = path.stat().st_size
    try:
        reader = ipc.open_file(pa.memory_map(str(path)))
        if reader.num_record_batches == 0:
            return size
        return max(size, reader.get_batch(0).nbytes * reader.num_record_batches)
    except (pa.ArrowException, OSError):
        return size


def should_stream(data_bytes: int, available_bytes: int) -> bool:
    """Stream when loading ``data_bytes`` would take over a quarter of the available memory.

    Examples:
        >>> should_stream(100 << 20, 16 << 30), should_stream(5 << 30, 16 << 30)
        (False, True)
    """
    return data_bytes * _LOAD_OVERHEAD > LOAD_SHARE_OF_AVAILABLE * available_bytes


def load_file(
    spec: str | Path,
    features: list[str] | None = None,
    target: str | None = None,
    *,
    seed: int = 0,
    shuffle: bool = True,
    stream: bool | None = None,
    shuffle_buffer: int | str | None = None,
    prefetch: int = DEFAULT_PREFETCH,
    workers: int = 1,
    available_bytes: int | None = None,
    reason: str | None = None,
    match: str | None = None,
) -> tuple[BatchSource, str, str]:
    """Return (source, target kind, why): in memory when the data is small, else streamed.

    ``stream=None`` chooses by :func:`should_stream` against ``available_bytes`` (default: what
    psutil reports available now); ``True``/``False`` force it, for ``reason`` (default: the
    flag). ``.npz`` is always loaded. ``match``: see :func:`open_stream`.
    """
    from batchfit.data.files import read_table
    from batchfit.data.tensors import TensorSource

    files = resolve_files(spec)
    fmt = file_format(files[0])
    many = len(files) > 1
    why = reason or f"forced by {opt_value('stream', bool(stream))}"
    if stream is None:
        if fmt == "npz":
            stream, why = False, ".npz archives cannot be streamed"
        else:
            import psutil

            size = estimated_bytes(spec, files)
            available = (
                psutil.virtual_memory().available if available_bytes is None else (available_bytes)
            )
            stream = should_stream(size, available)
            relation = "over" if stream else "under"
            why = (
                f"about {format_bytes(size)} decoded, {relation} a quarter of the "
                f"{format_bytes(available)} available with loading overhead; "
                f"--{'no-' if stream else ''}stream to override"
            )
    options = dict(
        seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer, prefetch=prefetch, match=match
    )
    if stream:
        source = open_stream(spec, features, target, workers=workers, **options)
        return source, source.target_kind, f"streaming {spec}: {why}"
    origin = files_fingerprint(files)
    if many:  # read through the stream reader, which checks that the schemas agree
        source = open_stream(spec, features, target, **{**options, "shuffle": False})
        x, y = next(iter(source.batches(0, source.num_samples)))
        loaded = TensorSource(x, y, seed=seed, shuffle=shuffle, files=origin)
        loaded.columns = source.columns
        return loaded, source.target_kind, f"loading {spec} into memory: {why}"
    table = read_table(spec, features, target, match)
    loaded = TensorSource(table.x, table.y, seed=seed, shuffle=shuffle, files=origin)
    loaded.columns = table.columns
    return loaded, table.target_kind, f"loading {spec} into memory: {why}"

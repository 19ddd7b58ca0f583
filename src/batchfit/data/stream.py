"""Train on files bigger than memory: streamed, shuffled, resumable, sharded batches.

A :class:`StreamSource` reads a Parquet file or folder (or glob), an Arrow IPC/Feather file, a
``.npy`` file or a CSV file piece by piece (:mod:`batchfit.data.readers`) and yields ready torch
batches. Memory depends on the shuffle buffer, the batch size and the prefetch depth, never on the
size of the data.

**Order of an epoch** (a pure function of ``(seed, epoch)`` and the file metadata, so resuming at
``(epoch, start)`` is exact and re-reads only one window):

- Block formats (Parquet, compressed Arrow, CSV): the blocks (row groups) are permuted per epoch;
  a block larger than the buffer is cut into consecutive pieces; the permuted pieces are packed
  into *windows* of at most ``shuffle_buffer`` rows, and the rows of window ``w`` are permuted by a
  generator seeded with ``(seed, epoch, w)``. Rows move anywhere their block goes, and within the
  window that holds them. Nothing depends on history (unlike a reservoir buffer, whose contents
  would have to be saved in the checkpoint).
- Random-access formats (``.npy`` memory map, uncompressed Arrow IPC): a full permutation of all
  rows (:class:`~batchfit.data.permute.IndexPermutation`, no memory per row), read a window at a
  time in sorted row order.

**Sharding**: every rank computes the same global batches and keeps its share
(:func:`~batchfit.schedule.split_evenly`), so shares are disjoint, every rank takes the same number
of steps and the training maths equals one process. Each rank decodes the whole stream.

**Validation** from the same files: :meth:`StreamSource.split` holds out exactly
``round(fraction * N)`` rows chosen by a seeded permutation of the row indices, with no pass over
the data; each evaluation then reads the files once (use ``--val-data`` for big data).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from batchfit.data.files import (
    _features_tensor,
    _numeric_column,
    _pick_features,
    _pick_target,
    _target_tensor,
    file_format,
)
from batchfit.data.permute import IndexPermutation
from batchfit.data.prefetch import prefetch as run_ahead
from batchfit.data.readers import Reader, check_types, open_reader, resolve_files
from batchfit.data.source import Batch, BatchSource, epoch_seed
from batchfit.errors import BatchfitError
from batchfit.schedule import split_evenly

#: Default shuffle buffer: as many rows as fit in this many bytes of decoded columns.
DEFAULT_SHUFFLE_BUFFER_BYTES = 32 << 20
DEFAULT_PREFETCH = 4
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
    """Rows whose permuted index is below ``count`` are validation rows (exactly ``count``)."""

    permutation: IndexPermutation
    count: int
    keep_validation: bool

    def mask(self, rows: np.ndarray) -> np.ndarray:
        held_out = self.permutation(rows) < self.count
        return held_out if self.keep_validation else ~held_out


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

    ``shuffle_buffer`` is in rows (default: 32 MiB worth); ``prefetch`` batches are prepared ahead
    in a background thread (0: none); ``workers`` threads decode windows in parallel, window ``w``
    by one worker only and delivered in order, so rows are never duplicated or lost.

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

    def __init__(
        self,
        reader: Reader,
        features: list[str],
        target: str,
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int | None = None,
        prefetch: int = DEFAULT_PREFETCH,
        workers: int = 1,
        holdout: _Holdout | None = None,
    ) -> None:
        self.reader, self.features, self.target = reader, list(features), target
        self.seed, self.shuffle = seed, shuffle
        self.prefetch, self.workers, self.holdout = prefetch, max(1, workers), holdout
        self.target_kind = _target_kind(reader.column_type(target))
        if shuffle_buffer is None:
            shuffle_buffer = max(1, int(DEFAULT_SHUFFLE_BUFFER_BYTES // max(1, reader.row_bytes)))
        self.shuffle_buffer = shuffle_buffer
        self.full_permutation = shuffle and reader.random_access
        self._flat = all(_is_flat(reader.column_type(c)) for c in self.features)
        self._pieces = [self._cut(b, rows) for b, rows in enumerate(reader.block_rows)]
        self._offsets = np.cumsum([0] + reader.block_rows)
        n = reader.num_rows
        if holdout is None:
            self._num_samples = n
        else:
            self._num_samples = holdout.count if holdout.keep_validation else n - holdout.count

    # -- the order of an epoch -------------------------------------------------------------
    def _cut(self, block: int, rows: int) -> list[_Segment]:
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
        rows = self._window_rows(epoch, window)
        if rows is not None:
            return len(rows)
        if self.holdout is None:
            return sum(s.stop - s.start for s in window)
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

    def _convert_many(self, parts: list) -> tuple[np.ndarray, np.ndarray]:
        """Convert the raw pieces of a window into one (x, y), copying each value once."""
        if not (self._flat and all(isinstance(raw, pa.Table) for raw, _ in parts)):
            converted = [self._convert(raw, where) for raw, where in parts]
            xs, ys = [c[0] for c in converted], [c[1] for c in converted]
            return (
                xs[0] if len(xs) == 1 else np.concatenate(xs),
                ys[0] if len(ys) == 1 else np.concatenate(ys),
            )
        total = sum(raw.num_rows for raw, _ in parts)
        x = np.empty((total, len(self.features)), dtype=np.float32)
        targets, offset = [], 0
        for raw, where in parts:
            for j, name in enumerate(self.features):
                column = raw.column(name)
                if column.null_count:
                    _numeric_column(raw, name, where)  # raises, naming column and count
                position = offset
                for chunk in column.chunks:
                    x[position : position + len(chunk), j] = chunk.to_numpy(zero_copy_only=False)
                    position += len(chunk)
            targets.append(_numeric_column(raw, self.target, where))
            offset += raw.num_rows
        # One fast pass: a finite sum means finite values (an overflow only costs the slow check).
        if not np.isfinite(x.sum()) and not np.isfinite(x).all():
            for raw, where in parts:
                self._convert(raw, where)  # raises, naming the column, the piece and the count
        y = targets[0] if len(targets) == 1 else np.concatenate(targets)
        return x, _target_tensor(y, self.target, parts[0][1])[0].numpy()

    def _decode(self, epoch: int, w: int, window) -> tuple[np.ndarray, np.ndarray]:
        """Window ``w`` as (x, y) arrays in the order the epoch visits them."""
        rows = self._window_rows(epoch, window)
        if rows is not None:
            order = np.argsort(rows, kind="stable")
            x_sorted, y_sorted = self._convert(self.reader.take(rows[order]), self.reader.label)
            back = np.empty_like(order)
            back[order] = np.arange(len(order))
            return _take(x_sorted, back), _take(y_sorted, back)
        parts = []
        for s in window:
            raw = self.reader.read(s.block, s.start, s.stop)
            if self.holdout is not None:
                base = self._offsets[s.block]
                mask = self.holdout.mask(np.arange(base + s.start, base + s.stop))
                raw = (
                    raw.filter(pa.array(mask))
                    if isinstance(raw, pa.Table)
                    else {k: v[mask] for k, v in raw.items()}
                )
            parts.append((raw, self.reader.where(s.block)))
        x, y = self._convert_many(parts)
        if self.shuffle:
            rng = np.random.default_rng((epoch_seed(self.seed, epoch), 1, w))
            perm = rng.permutation(len(y))
            x, y = _take(x, perm), _take(y, perm)
        return x, y

    def _decoded(self, epoch: int, windows: list, first: int) -> Iterator[tuple]:
        """Decoded windows from ``first`` on, in order; ``workers`` threads decode ahead."""
        if self.workers == 1:
            for w in range(first, len(windows)):
                yield self._decode(epoch, w, windows[w])
            return
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="batchfit-decode")
        pending: deque[Future] = deque()
        upcoming = iter(range(first, len(windows)))
        try:
            for w in upcoming:
                pending.append(pool.submit(self._decode, epoch, w, windows[w]))
                if len(pending) >= self.workers:
                    break
            while pending:
                done = pending.popleft().result()
                w = next(upcoming, None)
                if w is not None:
                    pending.append(pool.submit(self._decode, epoch, w, windows[w]))
                yield done
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)

    def _global_batches(
        self, epoch: int, batch_size: int, start: int, end: int, rank: int, world_size: int
    ) -> Iterator[Batch]:
        windows = self._windows(epoch)
        first, skip = 0, start
        while first < len(windows):
            size = self._window_size(epoch, windows[first])
            if skip < size:
                break
            skip -= size
            first += 1
        remaining = end - start
        pending_x: list[np.ndarray] = []
        pending_y: list[np.ndarray] = []
        pending = 0
        for x, y in self._decoded(epoch, windows, first):
            if skip:
                x, y, skip = x[skip:], y[skip:], 0
            if len(y) > remaining:
                x, y = x[:remaining], y[:remaining]
            remaining -= len(y)
            offset = 0
            while offset < len(y):
                take = min(batch_size - pending, len(y) - offset)
                pending_x.append(x[offset : offset + take])
                pending_y.append(y[offset : offset + take])
                pending += take
                offset += take
                if pending == batch_size:
                    yield _share(pending_x, pending_y, rank, world_size)
                    pending_x, pending_y, pending = [], [], 0
            if remaining == 0:
                break
        if pending:
            yield _share(pending_x, pending_y, rank, world_size)

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
        batches = self._global_batches(epoch, batch_size, start, end, rank, world_size)
        return run_ahead(batches, self.prefetch)

    def split(self, fraction: float, seed: int) -> tuple[StreamSource, StreamSource]:
        """Hold out exactly ``round(fraction * N)`` seeded rows as unshuffled validation data."""
        n = self.num_samples
        n_val = round(n * fraction)
        if self.holdout is not None or n_val < 1 or n_val >= n:
            raise BatchfitError(
                f"A validation fraction of {fraction:g} of {n} samples leaves {n_val} for "
                f"validation and {n - n_val} for training; choose a fraction that leaves at least "
                "one sample in each, or 0 for none."
            )
        permutation = IndexPermutation(n, epoch_seed(seed, -1))
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
            holdout=_Holdout(permutation, n_val, keep_validation=False),
            **common,
        )
        val = StreamSource(
            self.reader,
            shuffle=False,
            holdout=_Holdout(permutation, n_val, keep_validation=True),
            **common,
        )
        return train, val

    def memory_bytes(self, batch_size: int) -> int:
        """About how many bytes the stream holds at once for ``batch_size`` (see README)."""
        out_row = 4 * max(1, self._feature_width()) + 8
        window = self.shuffle_buffer * (self.reader.row_bytes + 2 * out_row)
        return int(window * (1 + self.workers) + (self.prefetch + 1) * batch_size * out_row)

    def _feature_width(self) -> int:
        width = 0
        for name in self.features:
            kind = self.reader.column_type(name)
            width += getattr(kind, "list_size", 1) if isinstance(kind, pa.DataType) else 1
        return width

    def describe(self) -> str:
        order = (
            "full permutation"
            if self.full_permutation
            else f"shuffle buffer {self.shuffle_buffer} rows"
            if self.shuffle
            else "in file order"
        )
        return (
            f"{self.num_samples} samples streamed from {self.reader.label} ({order}, "
            f"prefetch {self.prefetch})"
        )


def _is_flat(kind: object) -> bool:
    """One number per row (not a list): such columns go straight into the feature matrix."""
    if isinstance(kind, pa.DataType):
        return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
    return False


def _take(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    # np.take along axis 0 copies whole rows; fancy indexing (array[index]) is ~7x slower here.
    return np.take(array, index, axis=0)


def _share(xs: list[np.ndarray], ys: list[np.ndarray], rank: int, world_size: int) -> Batch:
    x = xs[0] if len(xs) == 1 else np.concatenate(xs)
    y = ys[0] if len(ys) == 1 else np.concatenate(ys)
    if world_size > 1:
        shares = split_evenly(len(y), world_size)
        offset = sum(shares[:rank])
        x, y = x[offset : offset + shares[rank]], y[offset : offset + shares[rank]]
    return torch.from_numpy(x), torch.from_numpy(y)


def open_stream(
    spec: str | Path,
    features: list[str] | None = None,
    target: str | None = None,
    *,
    seed: int = 0,
    shuffle: bool = True,
    shuffle_buffer: int | None = None,
    prefetch: int = DEFAULT_PREFETCH,
    workers: int = 1,
) -> StreamSource:
    """A :class:`StreamSource` over a file, folder or glob, columns checked from metadata.

    The target defaults as for in-memory files (a column named ``target``, ``label`` or ``y``;
    the last column of a plain 2-D ``.npy``).
    """
    reader = open_reader(spec)
    names = reader.column_names
    label = reader.label
    if target is None and names == [str(i) for i in range(len(names))]:
        target = names[-1]
    target = _pick_target(names, target, label)
    chosen = _pick_features(names, features, target, label)
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


def estimated_bytes(spec: str | Path) -> int:
    """Bytes the data would take decoded in memory, from metadata or file sizes (no data read)."""
    files = resolve_files(spec)
    if file_format(files[0]) != "parquet":
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


def should_stream(data_bytes: int, available_bytes: int) -> bool:
    """Stream when loading ``data_bytes`` would take over a quarter of the available memory.

    Examples:
        >>> should_stream(100 << 20, 16 << 30), should_stream(5 << 30, 16 << 30)
        (False, True)
    """
    return data_bytes * _LOAD_OVERHEAD > LOAD_SHARE_OF_AVAILABLE * available_bytes


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``.

    >>> format_bytes(1536), format_bytes(5 * 2**30)
    ('1.5 KiB', '5.0 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def load_file(
    spec: str | Path,
    features: list[str] | None = None,
    target: str | None = None,
    *,
    seed: int = 0,
    shuffle: bool = True,
    stream: bool | None = None,
    shuffle_buffer: int | None = None,
    prefetch: int = DEFAULT_PREFETCH,
    workers: int = 1,
    available_bytes: int | None = None,
) -> tuple[BatchSource, str, str]:
    """Return (source, target kind, why): in memory when the data is small, else streamed.

    ``stream=None`` chooses by :func:`should_stream` against ``available_bytes`` (default: what
    psutil reports available now); ``True``/``False`` force it. ``.npz`` is always loaded.
    """
    from batchfit.data.files import read_table
    from batchfit.data.memory import TensorSource

    files = resolve_files(spec)
    fmt = file_format(files[0])
    many = len(files) > 1
    why = "forced by --stream" if stream else "forced by --no-stream"
    if stream is None:
        if fmt == "npz":
            stream, why = False, ".npz archives cannot be streamed"
        else:
            import psutil

            size = estimated_bytes(spec)
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
    options = dict(seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer, prefetch=prefetch)
    if stream:
        source = open_stream(spec, features, target, workers=workers, **options)
        return source, source.target_kind, f"streaming {spec}: {why}"
    if many:  # read through the stream reader, which checks that the schemas agree
        source = open_stream(spec, features, target, **{**options, "shuffle": False})
        x, y = next(iter(source.batches(0, source.num_samples)))
        loaded = TensorSource(x, y, seed=seed, shuffle=shuffle)
        return loaded, source.target_kind, f"loading {spec} into memory: {why}"
    table = read_table(spec, features, target)
    loaded = TensorSource(table.x, table.y, seed=seed, shuffle=shuffle)
    return loaded, table.target_kind, f"loading {spec} into memory: {why}"

"""Train on files bigger than memory: streamed, shuffled, resumable, sharded batches.

A :class:`StreamSource` reads a Parquet file or folder (or glob), an Arrow IPC/Feather file, a
``.npy`` file or a CSV file piece by piece (:mod:`batchfit.data.readers`) and yields ready torch
batches. Memory depends on the shuffle buffer, the batch size and the prefetch depth, never on the
size of the data.

**Order of an epoch** (a pure function of ``(seed, epoch)`` and the file metadata, so resuming at
``(epoch, start)`` is exact and re-reads only one window; :mod:`batchfit.data.stream_order`):

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

**Decoding ahead** (:class:`~batchfit.data.decode_ahead.DecodeAhead`): ``workers`` threads
(default 1) decode the next windows while the current one is cut into batches, at most ``workers``
windows ahead. Consecutive windows that continue one block (a row group or CSV file bigger than the
buffer) go to the same thread, which keeps its read position in the block, so no block is decoded
twice.

**Validation** from the same files: :meth:`StreamSource.split` holds out exactly
``round(fraction * N)`` rows chosen by :class:`~batchfit.data.permute.Holdout`, with no pass over
the data, the same rows as the in-memory split; each evaluation then reads the files once (use
``--val-data`` for big data).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from batchfit.core import options
from batchfit.core.options import opt_value
from batchfit.core.units import format_bytes, parse_size
from batchfit.data.decode_ahead import DecodeAhead
from batchfit.data.files import (
    column_width,
    default_target,
    file_format,
    pick_features,
    pick_target,
    positional,
)
from batchfit.data.permute import Holdout, validation_count
from batchfit.data.prefetch import prefetch as run_ahead
from batchfit.data.readers import (
    Reader,
    check_types,
    files_fingerprint,
    open_reader,
    resolve_files,
)
from batchfit.data.source import Batch, BatchSource, check_class_labels, rank_rows
from batchfit.data.stream_batches import Rows, cut_batches, rows_from
from batchfit.data.stream_order import (
    Window,
    block_pieces,
    chains,
    epoch_windows,
    range_windows,
    window_span,
)
from batchfit.data.window_convert import target_kind
from batchfit.data.window_decode import HoldoutSide, WindowDecoder
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


class StreamSource(BatchSource):
    """Batches streamed from files through a seeded, resumable shuffle buffer.

    ``shuffle_buffer`` is in rows (an int) or the bytes of one window (text such as ``"64MiB"``:
    the decoded rows, their float32 copy and its permuted copy; default 96 MiB); the stream holds
    about ``1 + workers`` windows and ``prefetch + 1`` batches (:meth:`memory_bytes`). ``prefetch``
    batches are prepared ahead in a background thread (0: none); ``workers`` threads decode
    windows ahead, window ``w`` by one worker only and delivered in order, so rows are never
    duplicated or lost.

    It composes the pieces that do the work: the epoch's order (:mod:`~batchfit.data.stream_order`),
    decoding a window (:class:`~batchfit.data.window_decode.WindowDecoder`) in threads ahead of
    the consumer (:class:`~batchfit.data.decode_ahead.DecodeAhead`), and cutting the rows into
    batches (:mod:`~batchfit.data.stream_batches`).

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
        holdout: HoldoutSide | None = None,
    ) -> None:
        self.reader, self.features, self.target = reader, list(features), target
        #: Rows decoded from the files so far, all epochs together (what this process read).
        self.rows_decoded = 0
        self.seed, self.shuffle = seed, shuffle
        self.prefetch, self.workers, self.holdout = prefetch, max(1, workers), holdout
        self.target_kind = target_kind(reader.column_type(target))
        fmt = file_format(reader.files[0])
        if not positional(reader.column_names, fmt):
            self.columns = {c: column_width(reader.column_type(c)) for c in self.features}
        if shuffle_buffer is None or isinstance(shuffle_buffer, str):
            window_bytes = (
                DEFAULT_SHUFFLE_BUFFER_BYTES
                if shuffle_buffer is None
                else parse_size(shuffle_buffer)
            )
            shuffle_buffer = max(1, int(window_bytes // self._window_row_bytes()))
        self.shuffle_buffer = int(shuffle_buffer)
        self.full_permutation = shuffle and reader.random_access
        self._pieces = block_pieces(reader.block_rows, self.shuffle_buffer)
        self._decoder = WindowDecoder(
            reader, self.features, target, seed=seed, shuffle=shuffle, holdout=holdout
        )
        n = reader.num_rows
        if holdout is None:
            self._num_samples = n
        else:
            held = holdout.rows.count
            self._num_samples = held if holdout.keep_validation else n - held

    def _windows(self, epoch: int) -> Sequence[Window]:
        """The windows of epoch ``epoch``, in order (:mod:`~batchfit.data.stream_order`)."""
        if self.full_permutation:
            return range_windows(self.reader.num_rows, self.shuffle_buffer)
        return epoch_windows(self._pieces, self.shuffle_buffer, self.seed, epoch, self.shuffle)

    def _rows(self, epoch: int, lo: int, hi: int) -> Iterator[Rows]:
        """Rows ``lo..hi`` of the epoch's order as decoded (x, y) pieces; only the windows that
        hold them are decoded (and no window past them is decoded ahead)."""
        windows, decoder = self._windows(epoch), self._decoder
        span = window_span((decoder.size(epoch, window) for window in windows), lo, hi)
        if span is None:
            return
        first, stop, skip = span
        ahead = DecodeAhead(
            lambda w: decoder.decode(epoch, w, windows[w]),
            chains(windows[:stop], first),
            self.workers,
            on_decoded=self._count_decoded,
        )
        decoded = iter(ahead)
        try:
            yield from rows_from(decoded, skip, hi - lo)
        finally:
            decoded.close()  # stops and joins the decode threads

    def _count_decoded(self, rows: Rows) -> None:
        self.rows_decoded += len(rows[1])

    def _batches(self, pieces: Iterator[Rows], shares: Iterator[int]) -> Iterator[Batch]:
        """The rows cut into batches of ``shares`` rows, their labels checked first when asked
        to (in the prefetch thread, on the CPU: free for the training step)."""
        empty_y = np.int64 if self.target_kind == "class" else np.float32
        empty = (
            np.empty((0, max(1, self._feature_width())), dtype=np.float32),
            np.empty((0,), dtype=empty_y),
        )
        for x, y in cut_batches(pieces, shares, empty):
            if self.classes is not None and self.target_kind == "class":
                check_class_labels(y, self.classes, self.reader.label)
            yield torch.from_numpy(x), torch.from_numpy(y)

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
        return run_ahead(self._batches(pieces, iter(plan.shares)), self.prefetch)

    def as_class_labels(self) -> StreamSource:
        """This stream with a float target read as int64 class labels (a 2-D ``.npy`` keeps its
        labels as floats), for ``--loss cross_entropy``; each window is checked as it is read."""
        labels = copy.copy(self)
        labels._decoder = self._decoder.with_class_labels()
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
        common: dict[str, Any] = dict(
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
            holdout=HoldoutSide(held_out, float(fraction), keep_validation=False),
            **common,
        )
        val = StreamSource(
            self.reader,
            shuffle=False,
            holdout=HoldoutSide(held_out, float(fraction), keep_validation=True),
            **common,
        )
        if self._decoder.labels_as_classes:
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
    target = pick_target(names, default_target(names, target, fmt), label)
    chosen = pick_features(names, features, target, label, match)
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
                f"{opt_value('stream', not stream)} to override"
            )
    options: dict[str, Any] = dict(
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

"""Read rows of big files piece by piece: Parquet, Arrow IPC/Feather, ``.npy`` and CSV.

A reader knows, from file metadata alone, how a file splits into *blocks* (Parquet row groups,
Arrow record batches, fixed runs of ``.npy`` rows; a CSV file or an Arrow IPC *stream* is one
block, counted by one pass when opened) and how many rows each holds.
``read(block, start, stop)`` returns rows ``start..stop-1`` of one block with bounded memory: a
Parquet row group is decoded page by page (``buffer_size``, no pre-buffering), so a 1 GB row group
never sits in memory whole. Readers that can fetch any row cheaply (``.npy`` via a memory map,
uncompressed Arrow IPC) also have ``take(rows)``, which makes a full shuffle possible.

Every problem is one line naming the file (and the row group) and the fix. Places in messages
are already quoted (``'d.parquet'``, ``row group 3 of 'd.parquet'``) and are used as they are.
"""

from __future__ import annotations

import glob as globmod
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from batchfit.core.options import opt, opt_value
from batchfit.data.files import check_exists, check_numeric_type, file_format, numpy_load_error
from batchfit.errors import BatchfitError, first_line

#: Decoded-row target of one internal read; the pieces the source asks for are assembled from them.
READ_ROWS = 65_536
#: Bytes of a Parquet file read ahead; with pre-buffering off this is what bounds memory per read.
PARQUET_BUFFER_BYTES = 1 << 20
NPY_BLOCK_ROWS = 65_536
_ARROW_ERRORS = (pa.ArrowException, OSError)
#: Files and folders that a folder walk skips, as ``pyarrow.dataset`` does (``_SUCCESS``,
#: ``.crc`` files, ``_temporary/`` of Spark and Hadoop writers).
HIDDEN_PREFIXES = (".", "_")


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def resolve_files(spec: str | Path) -> list[Path]:
    """The files named by ``spec``: a file, a folder of Parquet files, or a glob pattern.

    Examples:
        >>> resolve_files("/nowhere/*.parquet")
        Traceback (most recent call last):
        ...
        batchfit.errors.BatchfitError: No files match '/nowhere/*.parquet'; check the pattern ...
    """
    text = str(spec)
    if _is_glob(text) and not Path(text).exists():
        files = sorted(Path(p) for p in globmod.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise BatchfitError(
                f"No files match '{text}'; check the pattern (quote it so the shell does not "
                "expand it)."
            )
    else:
        path = Path(text)
        check_exists(path)
        if not path.is_dir():
            return [path]
        _check_readable(path)
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and file_format_or_none(p)
            and not any(part.startswith(HIDDEN_PREFIXES) for part in p.relative_to(path).parts)
        )
        if not files:
            raise BatchfitError(
                f"The folder '{path}' holds no .parquet, .arrow, .feather, .csv or .npy files."
            )
    formats = {file_format(f) for f in files}
    if len(formats) > 1:
        raise BatchfitError(
            f"'{text}' mixes file formats ({', '.join(sorted(formats))}); give files of one format."
        )
    return files


def _check_readable(folder: Path) -> None:
    """Fail unless every folder under ``folder`` that a walk visits can be listed (hidden ones
    are skipped): a folder without read permission would otherwise look empty."""

    def refuse(error: OSError) -> None:
        where = error.filename or folder
        raise BatchfitError(
            f"Cannot list the folder '{where}': {error.strerror or first_line(error)}; give this "
            f"user read and search permission on it (chmod a+rx), or point {opt('data')} "
            "elsewhere."
        )

    for _, dirs, _ in os.walk(folder, onerror=refuse):
        dirs[:] = [d for d in dirs if not d.startswith(HIDDEN_PREFIXES)]


def files_fingerprint(files: list[Path]) -> str:
    """Names (relative to their common folder) and sizes of ``files`` in a short text, for the
    checkpoint: a resume on other files is refused. Modification times are left out on purpose:
    copying a data set to another machine changes them, and the data is the same.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "d.csv"
        >>> _ = path.write_text("a,y\\n1,0\\n")
        >>> files_fingerprint([path])
        '1 file, 8 bytes, sha256 b9191db9b046'
    """
    root = Path(*_common_parts(files))
    digest = hashlib.sha256()
    total = 0
    for f in files:
        size = f.stat().st_size
        total += size
        digest.update(f"{f.relative_to(root)}\0{size}\n".encode())
    many = "s" if len(files) != 1 else ""
    return f"{len(files)} file{many}, {total} bytes, sha256 {digest.hexdigest()[:12]}"


def file_format_or_none(path: Path) -> str | None:
    try:
        fmt = file_format(path)
    except BatchfitError:
        return None
    return None if fmt == "npz" else fmt


class Reader:
    """Blocks of rows with known sizes; subclasses implement :meth:`read` (and maybe ``take``)."""

    random_access = False
    #: Uncompressed size of one row in bytes (all selected columns), from metadata where possible.
    row_bytes: float = 8.0

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.block_rows: list[int] = []
        self.column_names: list[str] = []
        self._nulls: dict[str, int] = {}

    @property
    def num_rows(self) -> int:
        return sum(self.block_rows)

    @property
    def label(self) -> str:
        """The files, quoted, for messages: ``'d.parquet'`` or ``3 files under 'parts'``."""
        if len(self.files) == 1:
            return f"'{self.files[0]}'"
        return f"{len(self.files)} files under '{Path(*_common_parts(self.files))}'"

    def where(self, block: int) -> str:
        """The file (and part) of ``block``, for messages."""
        return f"'{self.files[0]}'"

    def piece(self, block: int, start: int, stop: int) -> str:
        """Rows ``start..stop-1`` of ``block``, for messages: exactly what a read returned."""
        if start == 0 and stop == self.block_rows[block]:
            return self.where(block)
        return f"rows {start}-{stop - 1} of {self.where(block)}"

    def select(self, columns: list[str]) -> None:
        """Read only ``columns`` from now on (features and target)."""
        self.columns = columns

    def read(self, block: int, start: int, stop: int) -> pa.Table | dict[str, np.ndarray]:
        raise NotImplementedError

    def take(self, rows: np.ndarray) -> pa.Table | dict[str, np.ndarray]:
        raise NotImplementedError

    def null_counts(self) -> dict[str, int]:
        """Nulls per column over all the rows, known without reading data again (from Parquet
        statistics, or counted by the pass that opening made); empty when unknown."""
        return dict(self._nulls)

    def _count_nulls(self, batch: pa.RecordBatch) -> None:
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            self._nulls[name] = self._nulls.get(name, 0) + column.null_count

    def column_type(self, name: str) -> object:
        return self.schema.field(name).type

    def _set_schema(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.column_names = list(schema.names)
        self.columns = self.column_names


def _selected_bytes(schema: pa.Schema, columns: list[str]) -> float:
    """Bytes of one row of ``columns``, from their types (Arrow formats)."""
    return float(sum(_type_bytes(schema.field(c).type) for c in columns))


def _common_parts(files: list[Path]) -> tuple[str, ...]:
    parts = files[0].parent.parts
    for f in files[1:]:
        other = f.parent.parts
        n = 0
        while n < min(len(parts), len(other)) and parts[n] == other[n]:
            n += 1
        parts = parts[:n]
    return parts or (".",)


def _one_file(files: list[Path], kind: str) -> None:
    if len(files) != 1:
        raise BatchfitError(
            f"A folder or glob of {kind} is not supported; give one file or convert the parts "
            "to Parquet."
        )


class _Cursor:
    """Sequential reads of exactly ``n`` rows from an iterator of record batches."""

    def __init__(self, batches: Iterator[pa.RecordBatch]) -> None:
        self._batches = batches
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.position = 0

    def take(self, n: int) -> pa.Table:
        while self._pending_rows < n:
            batch = next(self._batches, None)
            if batch is None:
                break
            self._pending.append(batch)
            self._pending_rows += batch.num_rows
        table = pa.Table.from_batches(self._pending) if self._pending else None
        if table is None or table.num_rows < n:
            got = 0 if table is None else table.num_rows
            raise EOFError(f"expected {n} more rows, found {got}")
        head, rest = table.slice(0, n), table.slice(n)
        self._pending = rest.to_batches() if rest.num_rows else []
        self._pending_rows = rest.num_rows
        self.position += n
        return head

    def skip(self, n: int) -> None:
        while n > 0:
            step = min(n, READ_ROWS)
            self.take(step)
            n -= step


class _CursorReader(Reader):
    """A reader whose blocks are read front to back; keeps one open cursor per thread."""

    def __init__(self, files: list[Path]) -> None:
        super().__init__(files)
        self._local = threading.local()

    def _open(self, block: int) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError

    def _scan(self, batches) -> None:
        """One block, its rows and nulls counted by one pass (for formats without metadata)."""
        self._set_schema(batches.schema)
        rows = 0
        for batch in batches:
            rows += batch.num_rows
            self._count_nulls(batch)
        self.block_rows = [rows] if rows else []

    def read(self, block: int, start: int, stop: int) -> pa.Table:
        cached = getattr(self._local, "cursor", None)
        try:
            if cached is not None and cached[0] == block and cached[1].position <= start:
                cursor = cached[1]  # continue where this thread stopped in the block
                cursor.skip(start - cursor.position)
            else:
                cursor = _Cursor(self._open(block))
                cursor.skip(start)
            table = cursor.take(stop - start)
        except _ARROW_ERRORS + (EOFError,) as exc:
            self._local.cursor = None
            raise BatchfitError(
                f"Cannot read {self.piece(block, start, stop)}: {first_line(exc)}. The file is "
                "damaged or changed while training; restore it or leave it out."
            ) from None
        self._local.cursor = (block, cursor) if stop < self.block_rows[block] else None
        return table


class ParquetReader(_CursorReader):
    """Row groups of one or more Parquet files with the same schema."""

    def __init__(self, files: list[Path]) -> None:
        import pyarrow.parquet as pq

        super().__init__(files)
        self._blocks: list[tuple[int, int]] = []
        self._group_bytes: list[int] = []
        first_schema = None
        for i, path in enumerate(files):
            try:
                metadata = pq.read_metadata(path)
                schema = metadata.schema.to_arrow_schema()
            except _ARROW_ERRORS as exc:
                raise BatchfitError(
                    f"Cannot read '{path}' as parquet: {first_line(exc)}. Check that the file is "
                    "complete and really Parquet."
                ) from None
            if first_schema is None:
                first_schema = schema
            elif difference := _schema_difference(first_schema, schema):
                raise BatchfitError(
                    f"'{path}' has a different schema from '{files[0]}': {difference}. Every "
                    "file of a data set needs the same columns and types."
                )
            for g in range(metadata.num_row_groups):
                group = metadata.row_group(g)
                if group.num_rows == 0:
                    continue  # an empty part file (or row group) holds nothing to read
                self._blocks.append((i, g))
                self.block_rows.append(group.num_rows)
                self._group_bytes.append(group.total_byte_size)
                self._collect_nulls(group)
        self._set_schema(first_schema)

    def _collect_nulls(self, group: Any) -> None:
        for c in range(group.num_columns):
            column = group.column(c)
            stats = column.statistics
            name = column.path_in_schema
            if stats is not None and stats.has_null_count:
                self._nulls[name] = self._nulls.get(name, 0) + stats.null_count

    def select(self, columns: list[str]) -> None:
        super().select(columns)
        total = sum(self._group_bytes) or 1
        share = sum(_type_bytes(self.schema.field(c).type) for c in columns) / max(
            1, sum(_type_bytes(f.type) for f in self.schema)
        )
        self.row_bytes = total * share / max(1, self.num_rows)

    def where(self, block: int) -> str:
        i, g = self._blocks[block]
        return f"row group {g} of '{self.files[i]}'"

    def _open(self, block: int) -> Iterator[pa.RecordBatch]:
        import pyarrow.parquet as pq

        i, g = self._blocks[block]
        handle = pq.ParquetFile(
            self.files[i], buffer_size=PARQUET_BUFFER_BYTES, pre_buffer=False, memory_map=False
        )
        return handle.iter_batches(
            batch_size=READ_ROWS, row_groups=[g], columns=self.columns, use_threads=False
        )


def _type_bytes(kind: pa.DataType) -> int:
    try:
        return max(1, kind.bit_width // 8)
    except ValueError:
        return 8


def _schema_difference(a: pa.Schema, b: pa.Schema) -> str | None:
    """How ``b`` differs from ``a`` by column names and types, or None. The order of the columns
    does not matter: they are read by name."""
    for name in a.names:
        if name not in b.names:
            return f"column '{name}' is missing"
        if not a.field(name).type.equals(b.field(name).type):
            return f"column '{name}' is {b.field(name).type} here and {a.field(name).type} there"
    extra = [n for n in b.names if n not in a.names]
    if extra:
        return f"it has the extra column '{extra[0]}'"
    return None


class IpcReader(Reader):
    """Record batches of an Arrow IPC (Feather v2) file, through a memory map.

    Uncompressed files are read without copies, so any row is cheap to reach (``take``); a
    compressed file is decompressed one record batch at a time instead. Opening counts the rows of
    each batch one batch at a time and keeps none, so even a compressed file never sits in memory
    whole (a compressed batch is decompressed to be counted, then dropped).
    """

    def __init__(self, files: list[Path]) -> None:
        import pyarrow.ipc as ipc

        super().__init__(files)
        _one_file(files, "Arrow IPC files")
        path = files[0]
        self._local = threading.local()
        try:
            mapped = pa.memory_map(str(path))
            self._reader = ipc.open_file(mapped)
            first = next(
                (b for i in range(self._reader.num_record_batches)
                 if (b := self._reader.get_batch(i)).num_rows),
                None,
            )  # fmt: skip
            self.random_access = first is not None and _is_mapped(first, mapped)
            if not self.random_access:
                # Compressed: read through plain file reads, so the pages of the whole file do
                # not pile up in RSS as a memory map's would; each batch is decompressed anyway.
                self._reader = ipc.open_file(pa.OSFile(str(path)))
            del first
            for i in range(self._reader.num_record_batches):
                batch = self._reader.get_batch(i)
                self.block_rows.append(batch.num_rows)
                self._count_nulls(batch)
                del batch
        except _ARROW_ERRORS as exc:
            raise BatchfitError(
                f"Cannot read '{path}' as arrow: {first_line(exc)}. Check that the file is "
                "complete and really Arrow IPC (Feather v2)."
            ) from None
        self._set_schema(self._reader.schema)
        self._table: pa.Table | None = None

    def select(self, columns: list[str]) -> None:
        super().select(columns)
        self.row_bytes = _selected_bytes(self.schema, columns)

    def where(self, block: int) -> str:
        return f"record batch {block} of '{self.files[0]}'"

    def _batch(self, block: int) -> pa.RecordBatch:
        if self.random_access:
            return self._reader.get_batch(block)  # zero-copy over the memory map
        # Decompressing is per record batch: keep the last one, so the consecutive pieces of a
        # big batch (read by one thread, see StreamSource) decompress it once, not once a piece.
        cached = getattr(self._local, "batch", None)
        if cached is None or cached[0] != block:
            self._local.batch = None  # drop the old batch before decompressing the next
            self._local.batch = cached = (block, self._reader.get_batch(block))
        return cached[1]

    def read(self, block: int, start: int, stop: int) -> pa.Table:
        try:
            batch = self._batch(block).select(self.columns)
        except _ARROW_ERRORS as exc:
            raise BatchfitError(
                f"Cannot read {self.where(block)}: {first_line(exc)}. The file is damaged or "
                "changed while training; restore it."
            ) from None
        return pa.Table.from_batches([batch.slice(start, stop - start)])

    def take(self, rows: np.ndarray) -> pa.Table:
        if self._table is None:
            self._table = self._reader.read_all().select(self.columns)  # zero-copy over the map
        return self._table.take(pa.array(rows))


def _is_mapped(batch: pa.RecordBatch, mapped: pa.MemoryMappedFile) -> bool:
    """Whether every buffer of ``batch`` lies in the memory map (the file is uncompressed)."""
    mapped.seek(0)
    base, size = mapped.read_buffer(1).address, mapped.size()
    mapped.seek(0)
    return all(
        base <= buffer.address < base + size
        for column in batch.columns
        for buffer in column.buffers()
        if buffer is not None and buffer.size
    )


class IpcStreamReader(_CursorReader):
    """An Arrow IPC *stream* (``pyarrow.ipc.new_stream``: no footer, so no random access): one
    block read front to back like CSV, its rows counted by one pass when opened."""

    def __init__(self, files: list[Path]) -> None:
        super().__init__(files)
        _one_file(files, "Arrow IPC streams")
        try:
            self._scan(self._stream())
        except _ARROW_ERRORS as exc:
            raise BatchfitError(
                f"Cannot read '{files[0]}' as an Arrow IPC stream: {first_line(exc)}. Check "
                "that the file is complete."
            ) from None

    def _stream(self):
        import pyarrow.ipc as ipc

        return ipc.open_stream(pa.memory_map(str(self.files[0])))

    def select(self, columns: list[str]) -> None:
        super().select(columns)
        self.row_bytes = _selected_bytes(self.schema, columns)

    def _open(self, block: int) -> Iterator[pa.RecordBatch]:
        return (batch.select(self.columns) for batch in self._stream())


def _open_arrow(files: list[Path]) -> Reader:
    """An Arrow IPC file (Feather v2), or else an Arrow IPC stream; say which format was found."""
    try:
        return IpcReader(files)
    except BatchfitError as file_error:
        if "Not an Arrow file" not in str(file_error):
            raise
        try:
            return IpcStreamReader(files)
        except BatchfitError:
            raise BatchfitError(
                f"Cannot read '{files[0]}' as arrow: it is neither an Arrow IPC file (Feather v2) "
                "nor an Arrow IPC stream. Check that the file is complete and really Arrow."
            ) from None


class NpyReader(Reader):
    """A ``.npy`` array through a memory map: a 2-D array (columns ``"0"``, ``"1"``, ...) or a
    structured array with named fields. Any row is cheap to reach."""

    random_access = True

    def __init__(self, files: list[Path]) -> None:
        super().__init__(files)
        _one_file(files, ".npy files")
        path = files[0]
        try:
            self._array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:  # EOFError: an empty or cut-off file
            raise numpy_load_error(path, "npy", exc) from None
        array = self._array
        if array.dtype.names:
            self.column_names = list(array.dtype.names)
        elif array.ndim == 2:
            self.column_names = [str(i) for i in range(array.shape[1])]
        else:
            raise BatchfitError(
                f"'{path}' holds an array of shape {array.shape}; a .npy file needs a 2-D array "
                "(samples x columns) or named fields."
            )
        n = len(array)
        self.block_rows = [min(NPY_BLOCK_ROWS, n - s) for s in range(0, n, NPY_BLOCK_ROWS)]
        self.columns = self.column_names
        self.row_bytes = float(array.itemsize * (array.shape[1] if array.ndim == 2 else 1))

    def where(self, block: int) -> str:
        return self.piece(block, 0, self.block_rows[block])

    def piece(self, block: int, start: int, stop: int) -> str:
        begin = block * NPY_BLOCK_ROWS
        return f"rows {begin + start}-{begin + stop - 1} of '{self.files[0]}'"

    def column_type(self, name: str) -> object:
        if self._array.dtype.names:
            return self._array.dtype[name]
        return self._array.dtype

    def _columns(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        if self._array.dtype.names:
            return {c: rows[c] for c in self.columns}
        return {c: rows[:, int(c)] for c in self.columns}

    def read(self, block: int, start: int, stop: int) -> dict[str, np.ndarray]:
        begin = block * NPY_BLOCK_ROWS
        return self._columns(np.asarray(self._array[begin + start : begin + stop]))

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return self._columns(self._array[rows])


class CsvReader(_CursorReader):
    """A CSV file read by PyArrow's streaming reader; one block, rows counted by one pass at open
    (CSV has no metadata)."""

    def __init__(self, files: list[Path]) -> None:
        super().__init__(files)
        _one_file(files, "CSV files")
        try:
            self._scan(self._stream(None))
        except _ARROW_ERRORS as exc:
            raise BatchfitError(
                f"Cannot read '{files[0]}' as csv: {first_line(exc)}. Check the file, or make "
                "every value of a column the same type."
            ) from None

    def _stream(self, columns: list[str] | None):
        import pyarrow.csv as pacsv

        convert = pacsv.ConvertOptions(include_columns=columns) if columns else None
        return pacsv.open_csv(
            self.files[0],
            read_options=pacsv.ReadOptions(block_size=1 << 22, use_threads=False),
            convert_options=convert,
        )

    def select(self, columns: list[str]) -> None:
        super().select(columns)
        self.row_bytes = 8.0 * len(columns)

    def _open(self, block: int) -> Iterator[pa.RecordBatch]:
        reader = self._stream(self.columns)
        return iter(reader)


READERS = {"parquet": ParquetReader, "arrow": _open_arrow, "npy": NpyReader, "csv": CsvReader}


def open_reader(spec: str | Path) -> Reader:
    """The reader for a file, folder or glob (the format from the file names).

    Examples:
        >>> import tempfile, pyarrow.parquet as pq
        >>> path = Path(tempfile.mkdtemp()) / "d.parquet"
        >>> pq.write_table(pa.table({"a": [1.0, 2.0, 3.0], "y": [0, 1, 0]}), path,
        ...                row_group_size=2)
        >>> open_reader(path).block_rows
        [2, 1]
    """
    files = resolve_files(spec)
    fmt = file_format(files[0])
    if fmt == "npz":
        raise BatchfitError(
            f"'{files[0]}' is a .npz archive, which cannot be streamed; save the arrays as .npy "
            f"or Parquet, or load it into memory with {opt_value('stream', False)}."
        )
    reader = READERS[fmt](files)
    if reader.num_rows == 0:
        raise BatchfitError(f"'{spec}' has no rows; give a file with at least one sample.")
    return reader


def check_types(reader: Reader, names: list[str]) -> None:
    """Fail before reading any data if a column holds strings, or nulls (counted over all rows
    from the metadata or the pass that opening made)."""
    where = reader.label
    for name in names:
        check_numeric_type(name, reader.column_type(name), where)
    nulls = reader.null_counts()
    for name in names:
        if nulls.get(name):
            raise BatchfitError(
                f"Column '{name}' in {where} has {nulls[name]} null values; fill or drop them, "
                f"or leave the column out with {opt('features')}."
            )

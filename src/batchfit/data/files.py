"""Read a data file that fits in memory into feature and target tensors.

Formats: Parquet (file or folder), CSV, Arrow IPC / Feather, ``.npy`` (a 2-D array whose columns
are named ``"0"``, ``"1"``, ... or a structured array with named fields) and ``.npz`` (arrays by
key). Every problem names the file and the column, and says what to do.

The helpers take the place to name in messages as ``where``: a :class:`~pathlib.Path` is quoted
(``'d.parquet'``); a string is a place already written for messages and is used as it is (the
streamed reader's ``rows 0-4999 of row group 3 of 'd.parquet'``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from batchfit.core.options import opt
from batchfit.errors import BatchfitError, first_line

TARGET_NAMES = ("target", "label", "y")


@dataclass(frozen=True)
class Table:
    """Features ``x`` (float32, one row per sample), target ``y`` and what they came from.

    ``target_kind`` is ``"class"`` (integer labels), ``"binary"`` (booleans, as 0/1 floats) or
    ``"real"`` (floats); it picks the default loss.
    """

    x: torch.Tensor
    y: torch.Tensor
    feature_names: tuple[str, ...]
    target_name: str
    target_kind: str
    #: Values per row of each feature, by name; None for columns without names (a plain .npy).
    columns: dict[str, int | None] | None = None


def column_width(kind: Any) -> int | None:
    """Values per row of a column of type ``kind`` (an Arrow type or a NumPy dtype): 1 for a
    number, the length of a fixed-size list or sub-array, ``None`` for lists of any length."""
    if isinstance(kind, pa.DataType):
        if pa.types.is_fixed_size_list(kind):
            return kind.list_size
        return None if pa.types.is_list(kind) or pa.types.is_large_list(kind) else 1
    return math.prod(np.dtype(kind).shape)


def _place(where: Path | str) -> str:
    """``where`` for a message: a path quoted, a place description as it is."""
    return f"'{where}'" if isinstance(where, Path) else where


def file_format(path: Path) -> str:
    """``'parquet'``, ``'csv'``, ``'arrow'``, ``'npy'`` or ``'npz'``, from the name.

    A folder is read as a Parquet data set.
    """
    if path.is_dir():
        return "parquet"
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".arrow", ".feather", ".ipc"):
        return "arrow"
    if suffix in (".csv", ".npy", ".npz"):
        return suffix[1:]
    raise BatchfitError(
        f"Cannot tell the format of '{path}' from its name; use a .parquet, .csv, .arrow, "
        ".feather, .npy or .npz file (or a folder of Parquet files)."
    )


def check_exists(path: Path) -> None:
    if not path.exists():
        raise BatchfitError(
            f"No such file or folder: '{path}'. Check the {opt('data')}/{opt('val_data')} path."
        )


#: The first bytes of every ``.npy`` file, and of every ``.npz`` (a zip archive).
NPY_MAGIC, NPZ_MAGIC = b"\x93NUMPY", b"PK"


def numpy_load_error(path: Path, fmt: str, exc: Exception) -> BatchfitError:
    """The one-line error for ``np.load(path, allow_pickle=False)`` failing with ``exc``.

    NumPy reads a file that is neither ``.npy`` nor ``.npz`` as a pickle and then advises
    ``allow_pickle=True``: wrong for a damaged file, and unsafe. Say what the file really is.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(NPY_MAGIC))
    except OSError as error:
        return BatchfitError(f"Cannot read '{path}': {first_line(error)}.")
    magic = NPY_MAGIC if fmt == "npy" else NPZ_MAGIC
    if not head.startswith(magic) and not magic.startswith(head):  # (not a cut-off header)
        kind = "a NumPy .npy file" if fmt == "npy" else "a NumPy .npz archive"
        save = "numpy.save" if fmt == "npy" else "numpy.savez"
        return BatchfitError(
            f"'{path}' is not {kind}: it does not start with the {fmt} header (it starts "
            f"with {head!r}), so it is damaged or of another format; write it again with {save}."
        )
    if any(sign in str(exc) for sign in ("allow_pickle", "Object arrays", "Python objects")):
        return BatchfitError(
            f"'{path}' holds Python objects (an object array), which are not loaded, for safety; "
            "save the data as numbers (a numeric dtype, or named numeric fields)."
        )
    return BatchfitError(
        f"Cannot read '{path}' as {fmt}: {first_line(exc)}. Check that the file is complete and "
        "really a NumPy file."
    )


def read_arrow_table(path: Path) -> pa.Table:
    """Read a whole Parquet, CSV or Arrow IPC file (or Parquet folder) into memory."""
    import pyarrow.csv as pacsv
    import pyarrow.feather as feather
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    fmt = file_format(path)
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        if fmt == "csv":
            return pacsv.read_csv(path)
        try:
            return feather.read_table(path)
        except pa.ArrowInvalid as not_a_file:
            try:
                with ipc.open_stream(pa.memory_map(str(path))) as stream:  # an Arrow IPC stream
                    return stream.read_all()
            except pa.ArrowInvalid:
                raise not_a_file from None  # neither: report what the file format said
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise BatchfitError(
            f"Cannot read '{path}' as {fmt}: {first_line(exc)}. Check that the file is complete "
            "and really in that format."
        ) from None


def numeric_column(table: pa.Table, name: str, path: Path | str) -> np.ndarray:
    """Column ``name`` of ``table`` as a NumPy array (a list column as a 2-D one), refusing
    nulls, lists of different lengths and values that are not numbers, naming ``path``."""
    column = table.column(name)
    kind = column.type
    if column.null_count:
        raise BatchfitError(
            f"Column '{name}' in {_place(path)} has {column.null_count} null values; fill or drop "
            f"them, or leave the column out with {opt('features')}."
        )
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
        values = column.combine_chunks()
        lengths = set(values.value_lengths().to_numpy(zero_copy_only=False).tolist())
        if len(lengths) != 1:
            raise BatchfitError(
                f"Column '{name}' in {_place(path)} holds lists of different lengths "
                f"{sorted(lengths)[:5]}; "
                "every sample needs the same number of values."
            )
        flat = values.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(table), lengths.pop())
    check_numeric_type(name, kind, path)
    return column.to_numpy(zero_copy_only=False)


def check_numeric_type(name: str, kind: Any, path: Path | str) -> None:
    """Raise unless ``kind`` (an Arrow type or NumPy dtype) holds numbers, lists of them or bools.

    Examples:
        >>> check_numeric_type("s", pa.string(), Path("d.parquet"))
        Traceback (most recent call last):
        ...
        batchfit.errors.BatchfitError: Column 's' in 'd.parquet' holds string values, not numbers...
    """
    if isinstance(kind, pa.DataType):
        if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind):
            kind = kind.value_type
        ok = pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
    else:
        ok = np.dtype(kind).kind in "biuf"
    if not ok:
        raise BatchfitError(
            f"Column '{name}' in {_place(path)} holds {kind} values, not numbers; encode it as "
            f"numbers or leave it out with {opt('features')}."
        )


def target_tensor(values: np.ndarray, name: str, path: Path | str) -> tuple[torch.Tensor, str]:
    """The target as a tensor and its kind (:attr:`Table.target_kind`): integers as int64 class
    labels, booleans and floats as float32, refusing NaN, infinities and other dtypes."""
    if values.ndim != 1:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)), "real"
    if values.dtype == np.bool_:
        return torch.from_numpy(values.astype(np.float32)), "binary"
    if np.issubdtype(values.dtype, np.integer):
        return torch.from_numpy(values.astype(np.int64)), "class"
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise BatchfitError(
                f"Target '{name}' in {_place(path)} has {bad} NaN or infinite values; fill or "
                "drop them."
            )
        return torch.from_numpy(values.astype(np.float32)), "real"
    raise BatchfitError(
        f"Target '{name}' in {_place(path)} holds {values.dtype} values; encode labels as "
        "integers 0..C-1 or use a numeric target."
    )


def features_tensor(arrays: list[np.ndarray], names: list[str], path: Path | str) -> torch.Tensor:
    """The feature columns as one float32 matrix, one row per sample, refusing values that are
    not finite numbers and multi-dimensional columns mixed with others."""
    for array, name in zip(arrays, names, strict=True):
        if array.dtype.kind not in "biuf":
            raise BatchfitError(
                f"Feature '{name}' in {_place(path)} holds {array.dtype} values, not numbers; "
                f"encode it as numbers or leave it out with {opt('features')}."
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise BatchfitError(
                f"Feature '{name}' in {_place(path)} has {bad} NaN or infinite values; fill or "
                "drop them."
            )
    if len(arrays) == 1:
        x = arrays[0]
    else:
        if any(a.ndim > 2 for a in arrays):
            raise BatchfitError(
                f"Features {names} in {_place(path)} mix multi-dimensional arrays with others; "
                "give a single multi-dimensional feature or only 1-D columns."
            )
        x = np.column_stack([a.reshape(len(a), -1) for a in arrays])
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def default_target(names: list[str], target: str | None, fmt: str) -> str | None:
    """A plain 2-D ``.npy`` has columns ``"0"``, ``"1"``, ...: its target defaults to the last.

    Only ``.npy``: a table whose columns happen to be named by numbers still needs ``--target``,
    loaded or streamed alike.

    >>> default_target(["0", "1", "2"], None, "npy"), default_target(["0", "1"], None, "parquet")
    ('2', None)
    """
    if target is None and fmt == "npy" and names == [str(i) for i in range(len(names))]:
        return names[-1]
    return target


def pick_target(columns: list[str], target: str | None, path: Path | str) -> str:
    """The target column: ``target`` if it is one of ``columns``, else the only column named
    ``target``, ``label`` or ``y``; anything else is refused, naming the columns."""
    if target is not None:
        if target not in columns:
            raise BatchfitError(
                f"Target column '{target}' is not in {_place(path)}; its columns are {columns}. "
                f"Pass one of them with {opt('target')}."
            )
        return target
    found = [c for c in TARGET_NAMES if c in columns]
    if len(found) == 1:
        return found[0]
    raise BatchfitError(
        f"Say which column of {_place(path)} is the target with {opt('target')}; its columns are "
        f"{columns}."
    )


def positional(names: list[str], fmt: str) -> bool:
    """Whether columns ``names`` are positions, not names: a plain 2-D ``.npy``'s ``"0"``, ..."""
    return fmt == "npy" and names == [str(i) for i in range(len(names))]


def pick_features(
    columns: list[str],
    features: list[str] | None,
    target: str,
    path: Path | str,
    match: str | None = None,
) -> list[str]:
    """The feature columns: ``features``, or every column but the target. ``match`` names the
    training data when ``features`` are its columns, which validation data must have too."""
    if features is None:
        chosen = [c for c in columns if c != target]
    else:
        missing = [c for c in features if c not in columns]
        if missing and match is not None:
            raise BatchfitError(
                f"The validation data {_place(path)} has no column {missing[0]!r} "
                f"({len(missing)} of the {len(features)} feature columns of {match} missing); "
                f"its columns are {columns}. Validation columns are matched to the training "
                "columns by name: give it the same column names."
            )
        if missing:
            raise BatchfitError(
                f"Feature column(s) {missing} not in {_place(path)}; its columns are {columns}. "
                f"Fix {opt('features')}."
            )
        if target in features:
            raise BatchfitError(
                f"Column '{target}' is both the target and a feature; remove it from "
                f"{opt('features')}."
            )
        chosen = list(features)
    if not chosen:
        raise BatchfitError(f"{_place(path)} has no feature columns besides the target '{target}'.")
    return chosen


def _columns_of_array(path: Path, data: object) -> dict[str, np.ndarray]:
    if isinstance(data, np.lib.npyio.NpzFile):
        return {key: data[key] for key in data.files}
    array = np.asarray(data)
    if array.dtype.names:
        return {name: array[name] for name in array.dtype.names}
    if array.ndim != 2:
        raise BatchfitError(
            f"'{path}' holds an array of shape {array.shape}; a .npy file needs a 2-D array "
            "(samples x columns) or named fields. Use .npz for separate x and y arrays."
        )
    return {str(i): array[:, i] for i in range(array.shape[1])}


def read_table(
    path: str | Path, features: list[str] | None, target: str | None, match: str | None = None
) -> Table:
    """Read ``path`` into a :class:`Table`.

    For a plain 2-D ``.npy`` the target defaults to the last column; elsewhere to a column named
    ``target``, ``label`` or ``y`` when exactly one exists. ``match`` names the training data
    when ``features`` are its columns (see :func:`pick_features`); a plain ``.npy`` has no
    names, so its columns are then taken by position.
    """
    path = Path(path)
    check_exists(path)
    fmt = file_format(path)
    if fmt in ("npy", "npz"):
        try:
            loaded = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:  # EOFError: an empty or cut-off file
            raise numpy_load_error(path, fmt, exc) from None
        columns = _columns_of_array(path, loaded)
        names = list(columns)
        if match is not None and positional(names, fmt):
            features = None
        target = pick_target(names, default_target(names, target, fmt), path)
        chosen = pick_features(names, features, target, path, match)
        lengths = {len(columns[c]) for c in chosen + [target]}
        if len(lengths) != 1:
            raise BatchfitError(
                f"Arrays {chosen + [target]} in '{path}' have different lengths {sorted(lengths)}; "
                "each needs one entry per sample."
            )
        x_arrays = [np.asarray(columns[c]) for c in chosen]
        y_values = np.asarray(columns[target])
    else:
        table = read_arrow_table(path)
        if table.num_rows == 0:
            raise BatchfitError(f"'{path}' has no rows; give a file with at least one sample.")
        names = table.column_names
        target = pick_target(names, target, path)
        chosen = pick_features(names, features, target, path, match)
        x_arrays = [numeric_column(table, c, path) for c in chosen]
        y_values = numeric_column(table, target, path)
    if len(y_values) == 0:
        raise BatchfitError(f"'{path}' has no rows; give a file with at least one sample.")
    y, kind = target_tensor(y_values, target, path)
    x = features_tensor(x_arrays, chosen, path)
    widths: dict[str, int | None] = {
        c: int(np.prod(a.shape[1:], dtype=int)) for c, a in zip(chosen, x_arrays, strict=True)
    }
    named = None if positional(names, fmt) else widths
    return Table(x, y, tuple(chosen), target, kind, named)

"""The raw pieces of a streamed window (Arrow tables or NumPy columns) as float32 features and
targets, with the checks of in-memory files (:mod:`batchfit.data.files`): the same messages,
naming the piece read.

Examples:
    >>> import pyarrow as pa
    >>> raw = pa.table({"a": [1.0, 2.0], "b": [3, 4], "y": [0, 1]})
    >>> x, y = convert_many([(raw, "rows 0-1 of 'd.parquet'")], ["a", "b"], "y", flat=True)
    >>> x.tolist(), y.tolist()
    ([[1.0, 3.0], [2.0, 4.0]], [0, 1])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa

from batchfit.core.options import opt_value
from batchfit.data.files import features_tensor, numeric_column, target_tensor
from batchfit.errors import BatchfitError

#: A piece as a reader returns it: an Arrow table, or NumPy columns by name (a ``.npy`` file).
Raw: TypeAlias = "pa.Table | dict[str, np.ndarray]"


def target_kind(kind: Any) -> str:
    """``"binary"``, ``"class"`` or ``"real"`` for a target column of type ``kind`` (an Arrow
    type or a NumPy dtype), as :func:`~batchfit.data.files.target_tensor` decides it."""
    if isinstance(kind, pa.DataType):
        if pa.types.is_boolean(kind):
            return "binary"
        return "class" if pa.types.is_integer(kind) else "real"
    dtype = np.dtype(kind)
    if dtype.kind == "b":
        return "binary"
    return "class" if dtype.kind in "iu" else "real"


def is_flat(kind: Any) -> bool:
    """One number per row (not a list): such columns go straight into the feature matrix."""
    if isinstance(kind, pa.DataType):
        return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
    return False


def take(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The rows of ``array`` at ``index``, in that order."""
    # np.take along axis 0 copies whole rows; fancy indexing (array[index]) is ~7x slower here.
    return np.take(array, index, axis=0)


def convert(
    raw: Raw, features: list[str], target: str, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """One piece as ``(x, y)``, through the checks of in-memory files (which name the column,
    the piece and how many values are bad)."""
    if isinstance(raw, pa.Table):
        arrays = [numeric_column(raw, c, where) for c in features]
        values = numeric_column(raw, target, where)
    else:
        arrays = [np.asarray(raw[c]) for c in features]
        values = np.asarray(raw[target])
    x = features_tensor(arrays, features, where).numpy()
    y = target_tensor(values, target, where)[0].numpy()
    return x, y


def convert_many(
    parts: Sequence[tuple[Raw, str]], features: list[str], target: str, flat: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The pieces of a window, each with the place it was read from, as one ``(x, y)``; with
    ``flat`` features (:func:`is_flat`) of Arrow tables, each value is copied once."""
    if not (flat and all(isinstance(raw, pa.Table) for raw, _ in parts)):
        converted = [convert(raw, features, target, where) for raw, where in parts]
        return _joined([c[0] for c in converted]), _joined([c[1] for c in converted])
    tables: list[tuple[Any, str]] = list(parts)  # Arrow tables, as checked above
    total = sum(raw.num_rows for raw, _ in tables)
    x = np.empty((total, len(features)), dtype=np.float32)
    targets, offset = [], 0
    for raw, where in tables:
        for j, name in enumerate(features):
            position = offset
            for chunk in raw.column(name).chunks:
                x[position : position + len(chunk), j] = chunk.to_numpy(zero_copy_only=False)
                position += len(chunk)
        targets.append(numeric_column(raw, target, where))
        offset += raw.num_rows
    # One fast pass: a finite sum means finite values (an overflow only costs the slow check).
    if not np.isfinite(x.sum()) and not np.isfinite(x).all():
        for raw, where in parts:
            convert(raw, features, target, where)  # raises, naming column, piece and count
    return x, target_tensor(_joined(targets), target, parts[0][1])[0].numpy()


def check_nulls(raw: Raw, columns: Sequence[str], where: str) -> None:
    """Refuse nulls in ``columns``, counted over the whole piece read (before the validation
    split keeps part of it), naming column, piece and count."""
    if isinstance(raw, pa.Table):
        for name in columns:
            if raw.column(name).null_count:
                numeric_column(raw, name, where)  # raises, naming column, piece and count


def class_labels(y: np.ndarray, target: str, label: str) -> np.ndarray:
    """Float targets as int64 class labels, refused unless they are whole numbers >= 0.

    >>> class_labels(np.array([0.0, 2.0]), "y", "'d.npy'").tolist()
    [0, 2]
    """
    if y.ndim != 1 or not (y == np.round(y)).all() or (y < 0).any():
        raise BatchfitError(
            f"The cross_entropy loss needs class labels 0..C-1, but the target '{target}' "
            f"in {label} holds other numbers; store the labels as integers, or "
            f"use {opt_value('loss', 'mse')}."
        )
    return y.astype(np.int64)


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

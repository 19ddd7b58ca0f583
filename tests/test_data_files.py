"""Reading the user's files into memory, and the errors for files that cannot be used."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import torch

from batchfit import BatchfitError
from batchfit.data.files import read_table


def table():
    rng = np.random.default_rng(0)
    return pa.table(
        {"a": rng.normal(size=20), "b": rng.integers(0, 5, 20), "label": rng.integers(0, 3, 20)}
    )


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".arrow", ".feather"])
def test_tabular_formats_give_the_same_tensors(tmp_path, suffix):
    t = table()
    path = tmp_path / f"d{suffix}"
    if suffix == ".parquet":
        pq.write_table(t, path)
    elif suffix == ".csv":
        pacsv.write_csv(t, path)
    else:
        feather.write_feather(t, path)
    got = read_table(path, None, None)
    assert got.target_name == "label" and got.feature_names == ("a", "b")
    assert got.x.dtype == torch.float32 and got.x.shape == (20, 2)
    assert got.y.dtype == torch.int64 and got.target_kind == "class"
    assert torch.allclose(got.x[:, 0].double(), torch.tensor(t.column("a").to_numpy()), atol=1e-6)


def test_parquet_folder_reads_all_files(tmp_path):
    t = table()
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(t.slice(0, 12), folder / "part-0.parquet")
    pq.write_table(t.slice(12), folder / "part-1.parquet")
    assert read_table(folder, None, "label").x.shape == (20, 2)


def test_npy_uses_the_last_column_as_target_and_npz_uses_keys(tmp_path):
    arr = np.arange(30, dtype=np.float64).reshape(10, 3)
    np.save(tmp_path / "d.npy", arr)
    got = read_table(tmp_path / "d.npy", None, None)
    assert got.x.shape == (10, 2) and got.target_kind == "real"
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 1, 8, 8), np.float32), y=np.arange(10))
    got = read_table(tmp_path / "d.npz", None, None)
    assert got.x.shape == (10, 1, 8, 8) and got.target_kind == "class"


def test_features_selects_columns_and_bool_targets_are_binary(tmp_path):
    t = table().append_column("flag", pa.array([True, False] * 10))
    pq.write_table(t, tmp_path / "d.parquet")
    got = read_table(tmp_path / "d.parquet", ["a"], "flag")
    assert got.feature_names == ("a",) and got.target_kind == "binary"


@pytest.mark.parametrize(
    ("make", "features", "target", "match"),
    [
        (None, None, "label", r"No such file or folder: '.*missing.parquet'"),
        ("ok", ["zz"], "label", r"Feature column\(s\) \['zz'\] not in .*columns are"),
        ("ok", None, "nope", r"Target column 'nope' is not in .*columns are"),
        ("nolabel", None, None, r"Say which column .* is the target with 'target'"),
        ("strings", None, "label", r"Column 's' .* holds string values, not numbers"),
        ("nulls", None, "label", r"Column 'a' .* has 3 null values"),
        ("empty", None, "label", r"has no rows"),
        ("corrupt", None, "label", r"Cannot read .* as parquet"),
    ],
)
def test_bad_files_get_one_line_errors_naming_the_fix(tmp_path, make, features, target, match):
    path = tmp_path / "missing.parquet"
    t = table()
    if make == "ok":
        pq.write_table(t, path)
    elif make == "nolabel":
        pq.write_table(t.drop(["label"]), path)
    elif make == "strings":
        pq.write_table(t.append_column("s", pa.array(["x"] * 20)), path)
    elif make == "nulls":
        a = pa.array([None, None, None] + [1.0] * 17)
        pq.write_table(t.set_column(0, "a", a), path)
    elif make == "empty":
        pq.write_table(t.slice(0, 0), path)
    elif make == "corrupt":
        pq.write_table(t, path)
        path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(BatchfitError, match=match) as info:
        read_table(path, features, target)
    assert "\n" not in str(info.value)

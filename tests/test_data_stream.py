"""Streaming files bigger than memory: every row once per epoch, seeded, resumable, sharded.

Rows carry an ``id`` feature column (their index in the files), so a test can see exactly which
rows a batch holds and in which order.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from batchfit import BatchfitError
from batchfit.core.accounting import split_evenly
from batchfit.core.options import named_as_flags
from batchfit.data.permute import IndexPermutation
from batchfit.data.prefetch import prefetch
from batchfit.data.readers import CsvReader, ParquetReader
from batchfit.data.stream import (
    StreamSource,
    estimated_bytes,
    load_file,
    open_stream,
    should_stream,
)
from batchfit.loop.train import train


def rows_table(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, n)
    return pa.table(
        {
            "id": np.arange(n, dtype=np.float32),
            "f0": (label == 0) + rng.normal(size=n).astype(np.float32) * 0.3,
            "f1": (label == 1) + rng.normal(size=n).astype(np.float32) * 0.3,
            "label": label,
        }
    )


def write(tmp_path, kind: str, n: int = 1000, row_group: int = 64):
    """Write ``n`` rows as ``kind``; return the --data spec."""
    t = rows_table(n)
    if kind == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(t, path, row_group_size=row_group)
        return path
    if kind in ("folder", "glob"):
        folder = tmp_path / "parts"
        folder.mkdir()
        cuts = [0, n // 3, n // 2, n]
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
            pq.write_table(
                t.slice(a, b - a), folder / f"part-{i}.parquet", row_group_size=row_group
            )
        return folder if kind == "folder" else str(folder / "part-*.parquet")
    if kind == "arrow-stream":
        path = tmp_path / "d.arrow"
        with pa.ipc.new_stream(str(path), t.schema) as writer:
            writer.write_table(t, max_chunksize=row_group)
        return path
    if kind in ("arrow", "arrow-zstd"):
        path = tmp_path / "d.arrow"
        compression = "zstd" if kind == "arrow-zstd" else "uncompressed"
        feather.write_feather(t, path, compression=compression, chunksize=row_group)
        return path
    if kind == "npy":
        path = tmp_path / "d.npy"
        columns = [t.column(c).to_numpy().astype(np.float64) for c in t.column_names]
        np.save(path, np.column_stack(columns))
        return path
    path = tmp_path / "d.csv"
    pacsv.write_csv(t, path)
    return path


def ids(batches) -> list[int]:
    return [int(v) for x, _ in batches for v in x[:, 0].tolist()]


def stream(spec, **kwargs) -> StreamSource:
    target = "3" if str(spec).endswith(".npy") else "label"
    return open_stream(spec, target=target, **kwargs)


FORMATS = ["parquet", "folder", "glob", "arrow", "arrow-zstd", "arrow-stream", "npy", "csv"]


@pytest.mark.parametrize("kind", FORMATS)
def test_every_epoch_visits_every_row_exactly_once_in_a_seeded_order(tmp_path, kind):
    spec = write(tmp_path, kind)
    src = stream(spec, shuffle_buffer=100, seed=3)
    assert src.num_samples == 1000
    first, second = ids(src.batches(0, 32)), ids(src.batches(1, 32))
    assert sorted(first) == sorted(second) == list(range(1000))
    assert first != second != list(range(1000))  # reshuffled every epoch
    assert ids(stream(spec, shuffle_buffer=100, seed=3).batches(0, 32)) == first


@pytest.mark.parametrize("kind", FORMATS)
def test_resuming_at_any_start_gives_the_rest_of_the_same_epoch(tmp_path, kind):
    src = stream(write(tmp_path, kind), shuffle_buffer=90, seed=1)
    whole = ids(src.batches(2, 25))
    for start in (0, 25, 75, 100, 475, 975, 999):
        assert ids(src.batches(2, 25, start=start)) == whole[start:]


def test_unshuffled_stream_is_in_file_order_and_the_same_seed_gives_the_same_order(tmp_path):
    spec = write(tmp_path, "parquet")
    assert ids(stream(spec, shuffle=False).batches(0, 64)) == list(range(1000))
    a = ids(stream(spec, seed=7, shuffle_buffer=128).batches(4, 64))
    b = ids(stream(spec, seed=7, shuffle_buffer=128).batches(4, 64))
    c = ids(stream(spec, seed=8, shuffle_buffer=128).batches(4, 64))
    assert a == b != c


#: A digest of every batch (ids and labels, in order) of each case of :func:`recorded_cases`,
#: per format: recorded before the stream's order and decoding moved out of ``StreamSource``.
RECORDED_BATCHES = {
    "parquet": {
        "e0": "f92c083d59c5db33",
        "e1_start": "742e20f5e146eba8",
        "train": "8b6a5b32e7bfe317",
        "val": "f636b8b2311e29de",
        "rank1of3": "c682bb25d0bd2ac6",
        "noshuffle": "692c4f1399a58fff",
    },
    "folder": {
        "e0": "bfa82a3fe8c5ea86",
        "e1_start": "bf3d14f844123a38",
        "train": "11e61c99e23b5f5d",
        "val": "f636b8b2311e29de",
        "rank1of3": "3cb1dca7f79e42f2",
        "noshuffle": "692c4f1399a58fff",
    },
    "glob": {
        "e0": "bfa82a3fe8c5ea86",
        "e1_start": "bf3d14f844123a38",
        "train": "11e61c99e23b5f5d",
        "val": "f636b8b2311e29de",
        "rank1of3": "3cb1dca7f79e42f2",
        "noshuffle": "692c4f1399a58fff",
    },
    "arrow": {
        "e0": "b1a3aac5bf925f5d",
        "e1_start": "4a1073dad1278382",
        "train": "6dc9dc3ae662a248",
        "val": "f636b8b2311e29de",
        "rank1of3": "32157c19978ef9d2",
        "noshuffle": "692c4f1399a58fff",
    },
    "arrow-zstd": {
        "e0": "f92c083d59c5db33",
        "e1_start": "742e20f5e146eba8",
        "train": "8b6a5b32e7bfe317",
        "val": "f636b8b2311e29de",
        "rank1of3": "c682bb25d0bd2ac6",
        "noshuffle": "692c4f1399a58fff",
    },
    "arrow-stream": {
        "e0": "5987b88675e6887b",
        "e1_start": "f207a2c61f765790",
        "train": "3776148d5f89d1ac",
        "val": "f636b8b2311e29de",
        "rank1of3": "eaf7ab03e444f34f",
        "noshuffle": "692c4f1399a58fff",
    },
    "npy": {
        "e0": "b1a3aac5bf925f5d",
        "e1_start": "4a1073dad1278382",
        "train": "6dc9dc3ae662a248",
        "val": "f636b8b2311e29de",
        "rank1of3": "32157c19978ef9d2",
        "noshuffle": "692c4f1399a58fff",
    },
    "csv": {
        "e0": "5987b88675e6887b",
        "e1_start": "f207a2c61f765790",
        "train": "3776148d5f89d1ac",
        "val": "f636b8b2311e29de",
        "rank1of3": "eaf7ab03e444f34f",
        "noshuffle": "692c4f1399a58fff",
    },
}

def digest(batches) -> str:
    """Every batch's ids and labels, in order, boundaries included, as a short hash."""
    h = hashlib.sha256()
    for x, y in batches:
        h.update(np.asarray(x[:, 0], dtype=np.int64).tobytes() + b"|")
        h.update(np.asarray(y, dtype=np.float64).tobytes() + b";")
    return h.hexdigest()[:16]


def recorded_cases(spec) -> dict[str, str]:
    """Shuffled epochs, a resumed one, both sides of a split with three decode threads, a rank's
    share and file order: each case's :func:`digest`."""
    src = stream(spec, shuffle_buffer=100, seed=3)
    train, val = stream(spec, shuffle_buffer=90, seed=4, workers=3).split(0.2, seed=5)
    return {
        "e0": digest(src.batches(0, 32)),
        "e1_start": digest(src.batches(1, 32, start=96)),
        "train": digest(train.batches(2, 50, drop_last=True)),
        "val": digest(val.batches(0, 64)),
        "rank1of3": digest(src.batches(2, 30, start=60, rank=1, world_size=3)),
        "noshuffle": digest(stream(spec, shuffle=False, shuffle_buffer=70).batches(0, 33)),
    }


@pytest.mark.parametrize("kind", FORMATS)
def test_the_same_seed_gives_the_batches_recorded_for_every_format(tmp_path, kind):
    assert recorded_cases(write(tmp_path, kind)) == RECORDED_BATCHES[kind]


def test_batches_have_the_batch_size_and_drop_last_drops_the_remainder(tmp_path):
    src = stream(write(tmp_path, "parquet"), shuffle_buffer=100)
    sizes = [len(y) for _, y in src.batches(0, 300)]
    assert sizes == [300, 300, 300, 100]
    assert [len(y) for _, y in src.batches(0, 300, drop_last=True)] == [300, 300, 300]
    x, y = next(iter(src.batches(0, 4)))
    assert x.dtype == torch.float32 and x.shape == (4, 3) and y.dtype == torch.int64


def test_ranks_get_disjoint_shares_of_every_batch_and_equal_step_counts(tmp_path):
    # Streams under W ranks: each rank reads its own run of the epoch's order, so a global batch
    # groups other rows than one process would; its size, the step count and the rows are the same.
    src = stream(write(tmp_path, "parquet"), shuffle_buffer=100, seed=2)
    whole = [ids([b]) for b in src.batches(0, 64)]
    shares = [[ids([b]) for b in src.batches(0, 64, rank=r, world_size=3)] for r in range(3)]
    assert len({len(s) for s in shares}) == 1 == len({len(whole)} | {len(shares[0])})
    for step, batch in enumerate(whole):
        assert [len(shares[r][step]) for r in range(3)] == split_evenly(len(batch), 3)
    every = [i for share in shares for batch in share for i in batch]
    assert sorted(every) == sorted(sum(whole, []))  # every row once, no rank repeats another's


@pytest.mark.parametrize(("depth", "workers"), [(0, 1), (1, 1), (8, 1), (2, 3), (0, 4)])
def test_prefetch_and_decode_workers_never_duplicate_or_lose_rows(tmp_path, depth, workers):
    spec = write(tmp_path, "parquet", n=3000)
    reference = ids(stream(spec, shuffle_buffer=200, prefetch=0).batches(1, 50))
    got = ids(stream(spec, shuffle_buffer=200, prefetch=depth, workers=workers).batches(1, 50))
    assert got == reference and sorted(got) == list(range(3000))


def test_prefetch_thread_stops_when_the_consumer_stops_early_or_fails():
    before = threading.active_count()
    it = prefetch(iter(range(10**9)), depth=3)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    it.close()
    assert threading.active_count() == before

    def broken():
        yield 1
        raise BatchfitError("row group 3 is damaged")

    it = prefetch(broken(), depth=2)
    assert next(it) == 1
    with pytest.raises(BatchfitError, match="row group 3 is damaged"):
        next(it)
    assert threading.active_count() == before


def test_shuffle_moves_rows_far_and_the_full_permutation_is_uniform(tmp_path):
    # Block shuffle: 64 row groups of 500 rows and a 4000-row buffer (1/8 of the data).
    n = 32000
    path = tmp_path / "d.parquet"
    pq.write_table(rows_table(n), path, row_group_size=500)
    order = np.array(ids(open_stream(path, target="label", shuffle_buffer=4000).batches(0, 512)))
    moved = np.abs(order - np.arange(n)) / n
    # A uniform random permutation moves a row by n/3 on average.
    assert 0.28 < moved.mean() < 0.39
    # Neighbours in the file end up apart: within a window rows are fully permuted.
    neighbours = np.abs(np.diff(order)) == 1
    assert neighbours.mean() < 0.01
    # Full permutation (memory-mapped formats): close to uniform, and a bijection.
    perm = IndexPermutation(n, seed=11)(np.arange(n))
    assert sorted(perm.tolist()) == list(range(n))
    assert abs(np.abs(perm - np.arange(n)).mean() / n - 1 / 3) < 0.01
    assert abs(np.corrcoef(perm, np.arange(n))[0, 1]) < 0.03


def test_validation_fraction_holds_out_exact_seeded_disjoint_rows(tmp_path):
    src = stream(write(tmp_path, "parquet"), shuffle_buffer=100)
    train_src, val_src = src.split(0.2, seed=4)
    assert (train_src.num_samples, val_src.num_samples) == (800, 200)
    train_ids, val_ids = ids(train_src.batches(0, 64)), ids(val_src.batches(0, 64))
    assert len(train_ids) == 800 and len(val_ids) == 200
    assert sorted(train_ids + val_ids) == list(range(1000))
    assert val_ids == sorted(val_ids)  # validation is read in file order
    assert ids(train_src.batches(1, 64, start=320)) == ids(train_src.batches(1, 64))[320:]
    assert ids(src.split(0.2, seed=5)[1].batches(0, 64)) != val_ids


def test_files_are_streamed_when_big_for_the_memory_and_loaded_when_small(tmp_path):
    spec = write(tmp_path, "parquet")
    small, kind, why = load_file(spec, target="label", available_bytes=16 << 30)
    assert not isinstance(small, StreamSource) and kind == "class" and "into memory" in why
    assert why.endswith("; stream=True to override")  # named for a Python caller
    big, _, why = load_file(spec, target="label", available_bytes=64 << 10)
    assert isinstance(big, StreamSource) and why.startswith("streaming")
    assert why.endswith("; stream=False to override") and "--no-stream" not in why
    with named_as_flags({"stream": "--stream"}):  # as the command line names it
        _, _, why = load_file(spec, target="label", available_bytes=64 << 10)
    assert why.endswith("; --no-stream to override")
    forced, _, why = load_file(spec, target="label", stream=True, available_bytes=16 << 30)
    assert isinstance(forced, StreamSource) and "forced by stream=True" in why
    assert should_stream(10 << 30, 16 << 30) and not should_stream(1 << 20, 16 << 30)


# -- the conformance test: resumed runs see the same ids and end bitwise identical -------------


class IdRecorder(nn.Module):
    """Ignores the id column for prediction but writes down the ids of every training batch."""

    def __init__(self, seen: list[int]) -> None:
        super().__init__()
        self.seen = seen
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.2), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.extend(int(v) for v in x[:, 0].tolist())
        return self.body(x[:, 1:])


def _conformance_run(tmp_path, spec, stops, **kwargs):
    seen: list[int] = []
    settings = dict(
        batch_size=40, epochs=2, seed=9, checkpoint_dir=tmp_path / "ckpt", resume=True, **kwargs
    )
    source = lambda: stream(spec, shuffle_buffer=150, seed=9, workers=2)  # noqa: E731
    for step in stops:
        train(IdRecorder(seen), source(), max_steps=step, **settings)
    result = train(IdRecorder(seen), source(), **settings)
    return seen, result


@pytest.mark.parametrize(
    "stops",
    [(), (7,), (25,), (3, 9, 17), (25, 26, 40)],
    ids=["uninterrupted", "mid-epoch", "epoch-boundary", "three-times-in-one-epoch", "boundary+"],
)
def test_resumed_runs_see_the_same_ids_and_end_bitwise_identical(tmp_path, stops):
    spec = write(tmp_path, "parquet", n=1000, row_group=70)
    reference, ref_result = _conformance_run(tmp_path / "ref", spec, ())
    assert len(reference) == 2000 and sorted(reference[:1000]) == list(range(1000))
    seen, result = _conformance_run(tmp_path / "run", spec, stops)
    assert seen == reference
    assert result.params_sha256 == ref_result.params_sha256 and result.steps == 50


def test_steps_per_epoch_continues_the_stream_across_epochs_and_resumes_exactly(tmp_path):
    spec = write(tmp_path, "parquet", n=1000, row_group=70)
    # 1000 rows at batch 40 = 25 steps per pass; epochs of 10 steps carve the stream into 4.
    a, ra = _conformance_run(tmp_path / "a", spec, (), steps_per_epoch=10)
    b, rb = _conformance_run(tmp_path / "b", spec, (4, 10, 23), steps_per_epoch=10)
    assert ra.epochs_completed == 2 and ra.steps == 20 and len(ra.history) == 2
    assert a == b and ra.params_sha256 == rb.params_sha256
    src = stream(spec, shuffle_buffer=150, seed=9)
    assert a == ids(src.batches(0, 40))[:800]  # epoch 2 continues where epoch 1 stopped


class Endless(torch.utils.data.IterableDataset):
    """A stream of unknown length: sample i has features (i, 1, 0) and label i % 3."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit

    def __iter__(self):
        i = 0
        while self.limit is None or i < self.limit:
            yield torch.tensor([float(i), 1.0, 0.0]), i % 3
            i += 1


def test_a_stream_of_unknown_length_has_epochs_with_steps_per_epoch(tmp_path):
    seen: list[int] = []
    kwargs = dict(batch_size=8, steps_per_epoch=5, epochs=3, val_data=Endless(16), seed=1)
    result = train(IdRecorder(seen), Endless(), **kwargs)
    assert result.epochs_completed == 3 and result.steps == 15
    assert [h["step"] for h in result.history] == [5, 10, 15] and "val_loss" in result.final
    assert seen == list(range(120))
    with pytest.raises(BatchfitError, match=r"give 'max_steps' .*or 'steps_per_epoch'"):
        train(IdRecorder([]), Endless(), batch_size=8, epochs=2)
    short = train(IdRecorder([]), Endless(limit=60), batch_size=8, steps_per_epoch=5, epochs=3)
    assert short.steps == 8 and short.epochs_completed == 2  # the stream ran dry in epoch 2
    resumed: list[int] = []
    ckpt = dict(checkpoint_dir=tmp_path / "c", resume=True)
    train(IdRecorder(resumed), Endless(), max_steps=7, **kwargs, **ckpt)
    again = train(IdRecorder(resumed), Endless(), **kwargs, **ckpt)
    assert resumed == seen and again.params_sha256 == result.params_sha256


# -- bad input: one line each, naming the file -------------------------------------------------


def _bad(tmp_path, make):
    t = rows_table(200)
    path = tmp_path / "bad.parquet"
    if make == "truncated":
        pq.write_table(t, path)
        path.write_bytes(path.read_bytes()[:300])
    elif make == "strings":
        pq.write_table(t.append_column("s", pa.array(["x"] * 200)), path)
    elif make == "nulls":
        f0 = pa.array([None] * 4 + [1.0] * 196, pa.float32())
        pq.write_table(t.set_column(1, "f0", f0), path)
    elif make == "empty":
        pq.write_table(t.slice(0, 0), path)
    elif make == "schemas":
        path = tmp_path / "mixed"
        path.mkdir()
        pq.write_table(t, path / "a.parquet")
        pq.write_table(t.set_column(0, "id", pa.array(np.arange(200.0))), path / "b.parquet")
    elif make == "glob":
        path = str(tmp_path / "nothing-*.parquet")
    elif make == "csv-folder":
        path = tmp_path / "csvs"
        path.mkdir()
        for name in ("a.csv", "b.csv"):
            pacsv.write_csv(t, path / name)
    elif make == "arrow":
        path = tmp_path / "bad.arrow"
        path.write_bytes(b"ARROW1 but then nothing of the kind" * 4)
    elif make == "npz":
        path = tmp_path / "d.npz"
        np.savez(path, x=np.zeros((3, 2)), label=np.arange(3))
    return path


@pytest.mark.parametrize(
    ("make", "match"),
    [
        ("truncated", r"Cannot read '.*bad.parquet' as parquet: .*Check that the file is complete"),
        ("strings", r"Column 's' in '.*bad.parquet' holds string values, not numbers"),
        ("nulls", r"Column 'f0' in '.*bad.parquet' has 4 null values"),
        ("empty", r"'.*bad.parquet' has no rows"),
        ("schemas", r"'.*b.parquet' has a different schema from '.*a.parquet': column 'id' is "),
        ("glob", r"No files match '.*nothing-\*.parquet'"),
        ("csv-folder", r"A folder or glob of CSV files is not supported; give one file or convert"),
        ("npz", r"'.*d.npz' is a .npz archive, which cannot be streamed"),
        ("arrow", r"'.*bad.arrow' as arrow: it is neither an Arrow IPC file .* nor an Arrow IPC"),
    ],
)
def test_bad_files_are_refused_in_one_line_before_any_data_is_read(tmp_path, make, match):
    with pytest.raises(BatchfitError, match=match) as info:
        open_stream(_bad(tmp_path, make), target="label")
    assert "\n" not in str(info.value) and ".." not in str(info.value)


def _damage_row_group(path, group: int) -> None:
    data = bytearray(path.read_bytes())
    offset = pq.read_metadata(path).row_group(group).column(1).data_page_offset
    data[offset + 2 : offset + 400] = b"\xab" * 398
    path.write_bytes(bytes(data))


def test_a_damaged_row_group_mid_epoch_names_the_row_group_and_keeps_a_checkpoint(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(rows_table(1000), path, row_group_size=100)
    _damage_row_group(path, 6)
    src = open_stream(path, target="label", shuffle=False, shuffle_buffer=100)
    with pytest.raises(BatchfitError, match=r"Cannot read row group 6 of '.*d.parquet'") as info:
        train(IdRecorder([]), src, batch_size=50, epochs=1, checkpoint_dir=tmp_path / "c")
    assert "\n" not in str(info.value)
    saved = torch.load(tmp_path / "c" / "last.pt", weights_only=True)
    assert saved["position"]["step"] == 12  # rows 0..599 were trained on, then it stopped


def test_nulls_not_in_the_metadata_are_found_when_read_naming_the_row_group(tmp_path):
    t = rows_table(300)
    f0 = pa.array([1.0] * 250 + [None] * 3 + [1.0] * 47, pa.float32())
    path = tmp_path / "d.parquet"
    pq.write_table(t.set_column(1, "f0", f0), path, row_group_size=100, write_statistics=False)
    src = open_stream(path, target="label", shuffle=False)
    with pytest.raises(
        BatchfitError, match=r"Column 'f0' in row group 2 of '.*d.parquet' has 3 null"
    ):
        list(src.batches(0, 10))


def _label_7_at_row_333(tmp_path):
    """400 rows in row groups of 100; row 333 has label 7, beyond the model's 3 outputs."""
    t = rows_table(400)
    labels = t.column("label").to_numpy().copy()
    labels[333] = 7
    path = tmp_path / "d.parquet"
    pq.write_table(t.set_column(3, "label", pa.array(labels)), path, row_group_size=100)
    return path


def test_a_label_beyond_the_models_outputs_mid_epoch_saves_a_checkpoint_then_stops(tmp_path):
    src = open_stream(_label_7_at_row_333(tmp_path), target="label", shuffle=False)
    with pytest.raises(BatchfitError, match=r"Target label 7 is outside the model's 3 outputs"):
        train(IdRecorder([]), src, batch_size=50, epochs=1, checkpoint_dir=tmp_path / "c")
    saved = torch.load(tmp_path / "c" / "last.pt", weights_only=True)
    assert saved["position"]["step"] == 6  # batches 1-6 trained; the 7th holds row 333


# -- memory: what a streamed epoch holds does not grow with the file ---------------------------

_EPOCH_PEAK = """
import sys
from batchfit.data.stream import open_stream
src = open_stream(sys.argv[1], target="y", shuffle_buffer=20000, prefetch=2)
rows = sum(len(y) for _, y in src.batches(0, 256))
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(rows, int(status["VmHWM"].split()[0]) * 1024)
"""


def _peak_rss_of_an_epoch(path) -> tuple[int, int]:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _EPOCH_PEAK, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    rows, peak = out.stdout.split()
    return int(rows), int(peak)


def test_peak_memory_of_a_streamed_epoch_does_not_grow_with_the_file(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {"small": 100_000, "large": 1_200_000}  # 7 MB and 86 MB of decoded rows
    peaks = {}
    for name, n in sizes.items():
        columns = {f"f{i}": rng.standard_normal(n, dtype=np.float32) for i in range(16)}
        path = tmp_path / f"{name}.parquet"
        pq.write_table(
            pa.table(columns | {"y": rng.integers(0, 10, n)}), path, row_group_size=50_000
        )
        rows, peaks[name] = _peak_rss_of_an_epoch(path)
        assert rows == n
    grown = peaks["large"] - peaks["small"]
    data_grown = (sizes["large"] - sizes["small"]) * 72
    assert grown < 0.25 * data_grown, (grown, data_grown)


# -- which shuffle each format gets, and formats and folders met in the wild -------------------


@pytest.mark.parametrize(
    ("kind", "full"),
    [
        ("parquet", False),
        ("folder", False),
        ("arrow", True),
        ("arrow-zstd", False),
        ("arrow-stream", False),
        ("npy", True),
        ("csv", False),
    ],
)
def test_each_format_gets_a_full_permutation_only_where_any_row_is_cheap_to_reach(
    tmp_path, kind, full
):
    assert stream(write(tmp_path, kind)).full_permutation is full


def test_a_folder_skips_empty_and_hidden_part_files_and_accepts_another_column_order(tmp_path):
    folder = write(tmp_path, "folder")
    pq.write_table(rows_table(0), folder / "part-8.parquet")  # a writer with nothing to write
    (folder / "_temporary").mkdir()
    pq.write_table(rows_table(50), folder / "_temporary" / "part-0.parquet")  # Spark leftovers
    pq.write_table(rows_table(50).append_column("s", pa.array(["x"] * 50)), folder / ".x.parquet")
    moved = folder / "part-2.parquet"  # the same columns in another order, read by name
    pq.write_table(pq.read_table(moved).select(["label", "f1", "id", "f0"]), moved)
    src = stream(folder, shuffle_buffer=100)
    assert src.num_samples == 1000
    assert sorted(ids(src.batches(0, 32))) == list(range(1000))


def test_a_compressed_arrow_file_is_counted_one_record_batch_at_a_time(tmp_path):
    """Opening a zstd Arrow file (counting its rows) decodes one record batch at a time: the
    memory it takes stays flat when the file doubles. (A flat allowance is needed: on a 16-core
    machine pyarrow's allocator kept ~25 MB of freed batches.)"""
    batch = 50_000  # 1.6 MB decoded; repeated values make the zstd file small

    def peak_growth(batches: int) -> tuple[int, pa.Table]:
        n = batches * batch
        values = np.repeat(np.arange(n // 100, dtype=np.float64), 100)
        table = pa.table({f"f{i}": values for i in range(3)} | {"y": np.zeros(n, dtype=np.int64)})
        path = tmp_path / f"d{batches}.arrow"
        feather.write_feather(table, path, compression="zstd", chunksize=batch)
        assert estimated_bytes(path) >= table.nbytes > 10 * path.stat().st_size  # decoded size
        child = (
            "import sys\n"
            "from batchfit.data.readers import open_reader\n"
            "def peak():\n"
            "    status = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)\n"
            "    return int(status['VmHWM'].split()[0]) * 1024\n"
            "before = peak()\n"
            "reader = open_reader(sys.argv[1])\n"
            "print(reader.num_rows, reader.random_access, peak() - before)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", child, str(path)], capture_output=True, text=True, check=True
        )
        rows, random_access, grown = out.stdout.split()
        assert int(rows) == n and random_access == "False"
        return int(grown), table

    small, small_table = peak_growth(24)  # 38 MB decoded
    big, big_table = peak_growth(48)  # 77 MB decoded
    assert big < 0.5 * big_table.nbytes, (big, big_table.nbytes)
    assert big - small < 0.25 * small_table.nbytes, (small, big)


# -- resume refuses another order; the split does not depend on streaming -----------------------


def test_resuming_with_another_shuffle_buffer_or_source_is_refused_naming_the_option(tmp_path):
    spec = write(tmp_path, "parquet", n=1000, row_group=70)
    settings = dict(batch_size=40, epochs=1, seed=9, checkpoint_dir=tmp_path / "c", resume=True)
    train(IdRecorder([]), stream(spec, shuffle_buffer=150, seed=9), max_steps=3, **settings)
    with pytest.raises(
        BatchfitError,
        match=r"made with shuffle_buffer=150, not 300; resume with shuffle_buffer=150",
    ):
        train(IdRecorder([]), stream(spec, shuffle_buffer=300, seed=9), **settings)
    loaded, _, _ = load_file(spec, target="label", stream=False, seed=9)
    with pytest.raises(
        BatchfitError, match=r"made with source='stream', not 'memory'; resume with stream=True,"
    ):
        train(IdRecorder([]), loaded, **settings)
    assert train(IdRecorder([]), stream(spec, shuffle_buffer=150, seed=9), **settings).steps == 25


def test_the_data_fingerprint_names_what_decides_the_order(tmp_path):
    spec = write(tmp_path, "parquet")
    src = stream(spec, shuffle_buffer=100)
    streamed = src.split(0.2, seed=4)[0].fingerprint()
    loaded = load_file(spec, target="label", stream=False)[0].split(0.2, seed=4)[0].fingerprint()
    assert streamed == {**loaded, "source": "stream", "shuffle_buffer": 100}
    assert streamed["val_fraction"] == 0.2 and streamed["val_seed"] == 4
    assert loaded["files"] == streamed["files"] and "1 file" in loaded["files"]
    pq.write_table(rows_table(1001), spec, row_group_size=64)  # the data changed
    assert stream(spec, shuffle_buffer=100).fingerprint()["files"] != streamed["files"]
    # A full permutation does not depend on the buffer: any buffer resumes the same order.
    npy = write(tmp_path, "npy")
    a, b = stream(npy, shuffle_buffer=50, seed=2), stream(npy, shuffle_buffer=300, seed=2)
    assert a.fingerprint() == b.fingerprint() and a.fingerprint()["shuffle_buffer"] is None
    assert ids(a.batches(1, 64)) == ids(b.batches(1, 64))


@pytest.mark.parametrize("kind", ["parquet", "npy", "csv", "arrow", "arrow-stream"])
def test_loaded_and_streamed_data_hold_out_the_same_validation_rows(tmp_path, kind):
    spec = write(tmp_path, kind)
    target = "3" if kind == "npy" else "label"
    loaded, _, _ = load_file(spec, target=target, stream=False)
    _, val_loaded = loaded.split(0.1, seed=3)
    _, val_streamed = stream(spec, shuffle_buffer=64).split(0.1, seed=3)
    assert val_loaded.x[:, 0].int().tolist() == ids(val_streamed.batches(0, 64))
    assert val_loaded.num_samples == 100


# -- empty windows, bad values counted over what the message names -------------------------------


@pytest.mark.parametrize(("kind", "buffer", "fraction"), [("npy", 1, 0.1), ("arrow", 4, 0.5)])
def test_windows_with_every_row_on_the_other_side_of_the_split_are_skipped(
    tmp_path, kind, buffer, fraction
):
    src = stream(write(tmp_path, kind, n=300), shuffle_buffer=buffer)
    train_src, val_src = src.split(fraction, seed=0)
    got = ids(train_src.batches(0, 16)) + ids(val_src.batches(0, 16))
    assert sorted(got) == list(range(300))


def test_nulls_are_counted_over_the_whole_file_when_opening_csv_and_arrow(tmp_path):
    t = rows_table(300)
    f1 = pa.array([None if i % 40 == 7 else 1.0 for i in range(300)], pa.float32())
    t = t.set_column(2, "f1", f1)
    pacsv.write_csv(t, tmp_path / "nulls.csv")
    feather.write_feather(t, tmp_path / "nulls.arrow", compression="uncompressed", chunksize=50)
    for name in ("nulls.csv", "nulls.arrow"):
        with pytest.raises(BatchfitError, match=rf"^Column 'f1' in '[^']*{name}' has 8 null "):
            open_stream(tmp_path / name, target="label", shuffle_buffer=3)


def test_nan_values_are_counted_over_the_piece_named_even_with_a_validation_split(tmp_path):
    t = rows_table(300)
    f0 = t.column("f0").to_numpy().copy()
    f0[[3, 10, 20, 30, 40, 41, 42, 60, 70]] = np.nan
    path = tmp_path / "nan.parquet"
    pq.write_table(t.set_column(1, "f0", pa.array(f0)), path, row_group_size=100)
    train_src, _ = open_stream(path, target="label", shuffle=False).split(0.5, seed=0)
    with pytest.raises(
        BatchfitError, match=r"^Feature 'f0' in row group 0 of '[^']*nan.parquet' has 9 NaN"
    ):
        list(train_src.batches(0, 10))
    with pytest.raises(
        BatchfitError, match=r"^Feature 'f0' in rows 0-49 of row group 0 of '[^']*' has 7 NaN"
    ):
        list(open_stream(path, target="label", shuffle=False, shuffle_buffer=50).batches(0, 10))


def test_an_empty_npy_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "d.npy"
    path.write_bytes(b"")
    for stream_it in (True, False):
        with pytest.raises(BatchfitError, match=r"Cannot read '.*d.npy' as npy: No data left"):
            load_file(path, stream=stream_it)


# -- labels checked on the CPU; bad validation data keeps the epoch ------------------------------


class BadLabelAt(torch.utils.data.IterableDataset):
    """Samples (i, 1, 0) with label i % 3, except label 7 at ``bad``."""

    def __init__(self, n: int, bad: int) -> None:
        self.n, self.bad = n, bad

    def __iter__(self):
        for i in range(self.n):
            yield torch.tensor([float(i), 1.0, 0.0]), 7 if i == self.bad else i % 3


def test_a_label_beyond_the_outputs_never_reaches_the_model(tmp_path):
    path = _label_7_at_row_333(tmp_path)
    for data in (open_stream(path, target="label", shuffle=False), BadLabelAt(400, bad=333)):
        seen: list[int] = []
        with pytest.raises(BatchfitError, match=r"Target label 7 is outside the model's 3 outp"):
            train(IdRecorder(seen), data, batch_size=50, max_steps=20)
        # On a GPU the bad batch would be a device-side assert: it must be caught on the CPU.
        assert seen == list(range(300)) if isinstance(data, StreamSource) else len(seen) == 300


def test_bad_validation_data_met_at_an_epoch_end_saves_the_epoch_then_stops(tmp_path):
    spec = write(tmp_path, "parquet", n=400, row_group=50)
    good, bad = tmp_path / "val.parquet", tmp_path / "bad-val.parquet"
    val = rows_table(200, seed=1)
    pq.write_table(val, good, row_group_size=50)
    labels = val.column("label").to_numpy().copy()
    labels[150] = 7  # past the first batch, which is checked before training
    pq.write_table(val.set_column(3, "label", pa.array(labels)), bad, row_group_size=50)

    def run(val_path, checkpoint_dir, **extra):
        val_src = open_stream(val_path, target="label", shuffle=False, shuffle_buffer=50)
        source = stream(spec, shuffle_buffer=150, seed=9)
        return train(
            IdRecorder([]), source, val_data=val_src, batch_size=40, epochs=2, seed=9,
            checkpoint_dir=checkpoint_dir, **extra,
        )  # fmt: skip

    with pytest.raises(
        BatchfitError, match=r"Target label 7 .* stopped at step 10 \(epoch 1\); checkpoint saved"
    ) as info:
        run(bad, tmp_path / "c")
    assert info.value.checkpoint_path == str(tmp_path / "c" / "last.pt")
    saved = torch.load(tmp_path / "c" / "last.pt", weights_only=True)["position"]
    assert (saved["step"], saved["epoch"], saved["sample_in_epoch"]) == (10, 0, 400)
    resumed = run(good, tmp_path / "c", resume=True)  # the data fixed, nothing trained is lost
    reference = run(good, tmp_path / "ref")
    assert resumed.params_sha256 == reference.params_sha256
    assert resumed.history == reference.history and resumed.steps == 20


def test_bad_labels_in_validation_tensors_are_refused_before_training(tmp_path):
    x = torch.cat([torch.arange(60.0).view(60, 1), torch.randn(60, 2)], dim=1)
    y = torch.arange(60) % 3
    seen: list[int] = []
    with pytest.raises(BatchfitError, match=r"Target label 5 is outside the model's 3 outputs"):
        train(IdRecorder(seen), (x, y), val_data=(x, torch.where(y == 2, 5, y)), batch_size=10,
              epochs=1)  # fmt: skip
    assert seen == []


# -- decoding: ahead of the consumer, one cursor per block ----------------------------------------


def test_decode_threads_read_a_block_bigger_than_the_buffer_front_to_back_once(tmp_path):
    class CountingCsv(CsvReader):
        opened = 0

        def _open(self, block):
            CountingCsv.opened += 1
            return super()._open(block)

    reader = CountingCsv([write(tmp_path, "csv", n=2000)])
    reader.select(["id", "f0", "f1", "label"])
    src = StreamSource(reader, ["id", "f0", "f1"], "label", shuffle_buffer=100, workers=3, seed=1)
    assert sorted(ids(src.batches(0, 64))) == list(range(2000))
    assert CountingCsv.opened == 1  # 20 windows by 3 threads: one pass over the file


def test_the_next_window_is_decoded_while_the_current_one_is_cut_into_batches(tmp_path):
    started = threading.Event()

    class Watched(ParquetReader):
        def read(self, block, start, stop):
            if block == 1:
                started.set()
            return super().read(block, start, stop)

    reader = Watched([write(tmp_path, "parquet", n=500, row_group=100)])
    reader.select(["id", "f0", "f1", "label"])
    src = StreamSource(reader, ["id", "f0", "f1"], "label", shuffle=False, shuffle_buffer=100)
    batches = src.batches(0, 10)
    assert ids([next(batches)]) == list(range(10))  # nine more batches of window 0 to go
    assert started.wait(timeout=60)  # ...and window 1 is being read already
    batches.close()


# -- the buffer in bytes, float labels as classes ------------------------------------------------


def test_the_shuffle_buffer_may_be_given_as_the_memory_of_one_window(tmp_path):
    spec = write(tmp_path, "parquet")
    by_rows = stream(spec, shuffle_buffer=100)
    row_bytes = by_rows.reader.row_bytes + 2 * (3 * 4 + 8)  # decoded + 2 float32 copies
    by_size = stream(spec, shuffle_buffer="64KiB")
    assert by_size.shuffle_buffer == int(65536 // row_bytes)
    assert "in memory" in by_size.describe() and "shuffle buffer" in by_size.describe()
    # 1 + 1 worker windows, but never more rows than the file holds
    window_rows = min(by_size.shuffle_buffer, by_size.num_samples)
    assert by_size.memory_bytes(0) == pytest.approx(2 * window_rows * row_bytes, rel=0.01)
    assert by_size.memory_bytes(0) <= 2 * 65536
    with pytest.raises(BatchfitError, match=r"The 'shuffle_buffer' option must be an int >= 1"):
        stream(spec, shuffle_buffer="lots")


def test_float_labels_of_a_streamed_npy_are_classes_for_cross_entropy(tmp_path, models_file):
    from batchfit.task import StreamOptions, load_task

    spec = write(tmp_path, "npy", n=300)
    task = load_task(
        model=f"{models_file}:wide", data=str(spec), loss="cross_entropy",
        stream=StreamOptions(stream=True, shuffle_buffer=64),
    )  # fmt: skip
    assert isinstance(task.train, StreamSource) and task.train.target_kind == "class"
    _, y = next(iter(task.train.batches(0, 300)))
    _, y_val = next(iter(task.val.batches(0, 30)))
    assert y.dtype == y_val.dtype == torch.int64 and len(y) + len(y_val) == 300


def test_a_table_with_numbered_columns_needs_a_target_whether_loaded_or_streamed(tmp_path):
    from batchfit.data.stream import load_file

    path = tmp_path / "numbered.parquet"
    pq.write_table(pa.table({"0": np.arange(10.0), "1": np.arange(10.0), "2": np.arange(10)}), path)
    for streamed in (True, False):
        with pytest.raises(BatchfitError, match="Say which column .* is the target with 'target'"):
            load_file(path, stream=streamed)
    np.save(tmp_path / "plain.npy", np.zeros((10, 3)))
    for streamed in (True, False):  # a plain 2-D .npy: the last column, both ways
        source, _, _ = load_file(tmp_path / "plain.npy", stream=streamed)
        assert source.num_samples == 10


def test_a_stream_is_split_once(tmp_path):
    train_part, _ = stream(write(tmp_path, "parquet")).split(0.2, seed=0)
    with pytest.raises(BatchfitError, match="already one side of a training/validation split"):
        train_part.split(0.2, seed=0)

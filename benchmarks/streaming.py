"""Streaming benchmark: throughput against bare PyArrow (and Hugging Face datasets), and peak RSS.

(a) rows/s of ``StreamSource`` into ready ``(x, y)`` torch batches, divided by two bare PyArrow
    loops over the same file in the same run: the one the issue names (``iter_batches`` at the
    batch size + ``torch.from_numpy``) and a stronger one (``iter_batches`` of 64k rows, sliced
    into batches). Rounds alternate between the contenders; medians are reported.
(b) the same against Hugging Face ``datasets`` (``Dataset.from_parquet(...).with_format("torch")``)
    when it is installed (``pip install -e '.[bench]'``).
(c) peak RSS of a child process that reads one shuffled epoch of a ~100 MB and a ~5 GB Parquet file
    of the same schema (16 float32 features + an int64 label), and the difference.
(d) shuffle quality: how far rows move in one epoch, per file layout and buffer size.
(e) with ``--reader-memory-mb M``: peak RSS of one pass over an M MB Parquet file with
    ``pyarrow.dataset(...).to_batches()`` and with ``ParquetFile.iter_batches`` (what batchfit
    uses), each in a fresh child process: why the stream reads row groups page by page.
(f) overlap: one shuffled epoch of a CSV file (the slowest format to decode) with a small MLP's
    training step per batch, against the data alone and the compute alone; prints how much of
    the smaller side hid behind the other (0% with no overlap, 100% when fully hidden).

Files are generated into ``--dir`` (default: a temporary folder) and deleted afterwards.

    python benchmarks/streaming.py                 # parts a-d and f, 5 GB file included (minutes)
    python benchmarks/streaming.py --big-gb 0      # skip the big file
    python benchmarks/streaming.py --big-gb 0 --reader-memory-mb 1400   # and part (e)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

FEATURES = [f"f{i}" for i in range(16)]
ROW_BYTES = 4 * len(FEATURES) + 8
ROW_GROUP = 131_072


def generate(path: Path, target_bytes: float, seed: int = 0) -> int:
    """Write about ``target_bytes`` of random rows; return the row count."""
    rows = max(ROW_GROUP, int(target_bytes / ROW_BYTES))
    rng = np.random.default_rng(seed)
    chunk = ROW_GROUP * 8
    schema = pa.schema([(f, pa.float32()) for f in FEATURES] + [("y", pa.int64())])
    # Random floats do not compress: no dictionary, so the file size is close to the data size.
    with pq.ParquetWriter(path, schema, compression="snappy", use_dictionary=False) as writer:
        for start in range(0, rows, chunk):
            m = min(chunk, rows - start)
            columns = {f: rng.standard_normal(m, dtype=np.float32) for f in FEATURES}
            columns["y"] = rng.integers(0, 10, m)
            writer.write_table(pa.table(columns, schema=schema), row_group_size=ROW_GROUP)
    return rows


def bare_loop(path: Path, batch_size: int) -> int:
    """The loop named in the issue: ``iter_batches`` at the batch size, then tensors."""
    n = 0
    for rb in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=FEATURES + ["y"]):
        x = torch.from_numpy(np.column_stack([rb.column(i).to_numpy() for i in range(16)]))
        y = torch.from_numpy(rb.column(16).to_numpy(zero_copy_only=False))
        n += len(y) + 0 * x.shape[0]
    return n


def bare_sliced(path: Path, batch_size: int) -> int:
    """A stronger bare loop: decode 64k rows at a time, then slice into batches."""
    n = 0
    for rb in pq.ParquetFile(path).iter_batches(batch_size=65_536, columns=FEATURES + ["y"]):
        x_all = np.column_stack([rb.column(i).to_numpy() for i in range(16)])
        y_all = rb.column(16).to_numpy(zero_copy_only=False)
        for a in range(0, len(y_all), batch_size):
            x = torch.from_numpy(x_all[a : a + batch_size])
            y = torch.from_numpy(y_all[a : a + batch_size])
            n += len(y) + 0 * x.shape[0]
    return n


def batchfit_loop(path: Path, batch_size: int, shuffle: bool) -> int:
    from batchfit.data.stream import open_stream

    src = open_stream(path, target="y", shuffle=shuffle)
    return sum(len(y) for _, y in src.batches(0, batch_size))


def hf_dataset(path: Path, cache: Path):
    import datasets

    datasets.disable_progress_bars()
    return datasets.Dataset.from_parquet(str(path), cache_dir=str(cache)).with_format("torch")


def hf_loop(ds, batch_size: int) -> int:
    n = 0
    for batch in ds.iter(batch_size=batch_size):
        x = torch.stack([batch[f] for f in FEATURES], dim=1)
        y = batch["y"]
        n += len(y) + 0 * x.shape[0]
    return n


def rows_per_s(fn) -> float:
    start = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - start)


def throughput(path: Path, batch_size: int, rounds: int, cache: Path) -> dict:
    contenders = {
        "bare_iter_batches": lambda: bare_loop(path, batch_size),
        "bare_sliced_64k": lambda: bare_sliced(path, batch_size),
        "batchfit_shuffled": lambda: batchfit_loop(path, batch_size, True),
        "batchfit_file_order": lambda: batchfit_loop(path, batch_size, False),
    }
    try:
        start = time.perf_counter()
        ds = hf_dataset(path, cache)
        hf_prepare_s = time.perf_counter() - start
        contenders["hf_datasets_torch"] = lambda: hf_loop(ds, batch_size)
    except ImportError:
        hf_prepare_s = None
    results: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):  # interleaved, so load on the machine hits every contender alike
        for name, fn in contenders.items():
            results[name].append(rows_per_s(fn))
    medians = {k: statistics.median(v) for k, v in results.items()}
    return {"rows_per_s": medians, "hf_prepare_seconds": hf_prepare_s}


CHILD = """
import json, sys, time
from batchfit.data.stream import open_stream
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
src = open_stream(sys.argv[1], target="y")
before = rss()
start = time.perf_counter()
rows = sum(len(y) for _, y in src.batches(0, int(sys.argv[2])))
seconds = time.perf_counter() - start
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec.
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
print(json.dumps({"rows": rows, "seconds": seconds,
                  "peak_rss_bytes": int(status["VmHWM"].split()[0]) * 1024,
                  "rss_before_epoch_bytes": before,
                  "shuffle_buffer_rows": src.shuffle_buffer,
                  "estimated_bytes": src.memory_bytes(int(sys.argv[2]))}))
"""


def epoch_rss(path: Path, batch_size: int) -> dict:
    """One shuffled epoch in a fresh child process: peak RSS and time."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(batch_size)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def _movement(source, n: int) -> tuple[float, float]:
    """Mean distance a row moved (over N) and the share of file neighbours still adjacent."""
    order = np.concatenate([x[:, 0].numpy() for x, _ in source.batches(0, 4096)]).astype(np.int64)
    return np.abs(order - np.arange(n)).mean() / n, (np.abs(np.diff(order)) == 1).mean()


def shuffle_quality(work: Path, n: int = 1_000_000) -> None:
    """How far rows move in one shuffled epoch, for a few layouts and buffer sizes."""
    from batchfit.data.stream import open_stream

    print(f"\n(d) shuffle quality over {n:,} rows (uniform random permutation: 0.333 and 0.000)")
    print("  layout                          buffer    mean |move| / N   file neighbours kept")
    ids = pa.table({"id": np.arange(n, dtype=np.float32), "y": np.zeros(n, dtype=np.int64)})
    for row_group, buffer in ((10_000, 10_000), (10_000, 100_000), (n, 100_000), (n, n)):
        path = work / f"quality-{row_group}.parquet"
        if not path.exists():
            pq.write_table(ids, path, row_group_size=row_group)
        moved, kept = _movement(open_stream(path, target="y", shuffle_buffer=buffer), n)
        groups = n // row_group
        layout = f"{groups} row group{'s' if groups > 1 else ''} of {row_group:,}"
        print(f"  {layout:30s} {buffer:>9,}   {moved:15.3f}   {kept:20.4f}")
    path = work / "quality.npy"
    np.save(path, np.column_stack([np.arange(n, dtype=np.float32), np.zeros(n, np.float32)]))
    moved, kept = _movement(open_stream(path), n)
    print(f"  {'.npy, full permutation':30s} {'-':>9}   {moved:15.3f}   {kept:20.4f}")


READER_CHILD = """
import json, sys
import pyarrow.dataset as ds
import pyarrow.parquet as pq
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
path, how = sys.argv[1], sys.argv[2]
before = rss()
if how == "to_batches":
    batches = ds.dataset(path, format="parquet").to_batches()
else:  # as batchfit's reader opens a row group: page by page, no pre-buffering, one thread
    buffer_bytes, read_rows = int(sys.argv[3]), int(sys.argv[4])  # batchfit's, from the parent
    f = pq.ParquetFile(path, buffer_size=buffer_bytes, pre_buffer=False)
    batches = f.iter_batches(read_rows, use_threads=False)
rows = sum(b.num_rows for b in batches)
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
print(json.dumps({"rows": rows, "before": before,
                  "peak_rss_bytes": int(status["VmHWM"].split()[0]) * 1024}))
"""


def reader_memory(work: Path, megabytes: float) -> None:
    """(e) Peak RSS of one pass with Dataset.to_batches and with ParquetFile.iter_batches."""
    from batchfit.data.readers import PARQUET_BUFFER_BYTES, READ_ROWS

    path = work / "reader.parquet"
    rows = generate(path, megabytes * 1e6, seed=2)
    size = path.stat().st_size / 2**20
    print(f"\n(e) peak RSS of one pass over {rows:,} rows ({size:,.0f} MiB), fresh child each")
    for how in ("to_batches", "iter_batches"):
        out = subprocess.run(
            [sys.executable, "-c", READER_CHILD, str(path), how]
            + [str(PARQUET_BUFFER_BYTES), str(READ_ROWS)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout)
        name = (
            "pyarrow.dataset(...).to_batches()"
            if how == "to_batches"
            else ("ParquetFile.iter_batches (batchfit)")
        )
        print(
            f"  {name:36s} peak RSS {r['peak_rss_bytes'] / 2**20:7,.0f} MiB "
            f"({r['before'] / 2**20:.0f} MiB before reading)"
        )
    path.unlink()


def overlap(work: Path, batch_size: int, rounds: int) -> None:
    """(f) Does decoding hide behind the training step? Data alone, compute alone, together.

    The file is CSV (the slowest format to decode) and the step a small MLP's forward, backward
    and update, so that the two costs are of the same order and an overlap can show at all; with
    Parquet the data side is too cheap to matter next to any real step.
    """
    import pyarrow.csv as pacsv

    from batchfit.data.stream import open_stream

    path = work / "overlap.csv"
    rng = np.random.default_rng(0)
    columns = {f"f{i}": rng.standard_normal(300_000).astype(np.float32) for i in range(64)}
    pacsv.write_csv(pa.table({**columns, "y": rng.integers(0, 10, 300_000)}), path)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def stream():
        return open_stream(path, target="y", shuffle_buffer=32_768).batches(0, batch_size)

    def data() -> None:
        for _ in stream():
            pass

    batches = list(open_stream(path, target="y", shuffle=False).batches(0, batch_size))

    def compute() -> None:
        for x, y in batches:
            step(x, y)

    def together() -> None:
        for x, y in stream():
            step(x, y)

    times: dict[str, list[float]] = {"data": [], "compute": [], "together": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the step on one core, as a data loader expects to find a spare one
    try:
        for _ in range(rounds):
            for name, fn in (("data", data), ("compute", compute), ("together", together)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
        path.unlink()
    t = {k: statistics.median(v) for k, v in times.items()}
    hidden = (t["data"] + t["compute"] - t["together"]) / min(t["data"], t["compute"])
    print(
        f"\n(f) overlap: CSV of 300,000 rows x 64 features, batch {batch_size}, an MLP step, "
        "defaults (1 decode thread, prefetch 4), 1 torch thread"
    )
    print(
        f"  data alone {t['data']:.2f} s, compute alone {t['compute']:.2f} s, together "
        f"{t['together']:.2f} s (serial would be {t['data'] + t['compute']:.2f} s, perfect "
        f"overlap {max(t['data'], t['compute']):.2f} s): {hidden:.0%} of the smaller side hidden"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="folder for generated files (default: a temp folder)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--small-mb", type=float, default=100)
    parser.add_argument("--big-gb", type=float, default=5, help="0 skips the big file")
    parser.add_argument("--quality-only", action="store_true", help="only part (d)")
    parser.add_argument(
        "--reader-memory-mb", type=float, default=0, help="run part (e) on a file this big"
    )
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="batchfit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print("command: python " + " ".join([sys.argv[0], *sys.argv[1:]]))
    print(f"torch {torch.__version__}, pyarrow {pa.__version__}, {os.cpu_count()} CPUs")
    try:
        shuffle_quality(work)
        if args.quality_only:
            return
        if args.reader_memory_mb > 0:
            reader_memory(work, args.reader_memory_mb)
        small = work / "small.parquet"
        rows = generate(small, args.small_mb * 1e6)
        size = small.stat().st_size / 1e6
        print(f"\n(a, b) throughput, {rows} rows ({size:.0f} MB), batch size {args.batch_size}")
        t = throughput(small, args.batch_size, args.rounds, work / "hf-cache")
        r = t["rows_per_s"]
        for name, value in r.items():
            print(f"  {name:22s} {value:>12,.0f} rows/s")
        for ours in ("batchfit_shuffled", "batchfit_file_order"):
            for ref in ("bare_iter_batches", "bare_sliced_64k", "hf_datasets_torch"):
                if ref in r:
                    print(f"  ratio {ours} / {ref}: {r[ours] / r[ref]:.2f}")
        if t["hf_prepare_seconds"] is None:
            print("  Hugging Face datasets not installed: pip install -e '.[bench]'")
        else:
            print(f"  (datasets.from_parquet conversion took {t['hf_prepare_seconds']:.1f} s)")

        overlap(work, args.batch_size, args.rounds)

        print(f"\n(c) peak RSS of one shuffled epoch (child process, batch {args.batch_size})")
        small_rss = epoch_rss(small, args.batch_size)
        _report("small", small, small_rss)
        if args.big_gb > 0:
            big = work / "big.parquet"
            start = time.perf_counter()
            generate(big, args.big_gb * 1e9, seed=1)
            took = time.perf_counter() - start
            print(f"  (generated {big.stat().st_size / 1e9:.1f} GB in {took:.0f} s)")
            big_rss = epoch_rss(big, args.batch_size)
            _report("big", big, big_rss)
            diff = (big_rss["peak_rss_bytes"] - small_rss["peak_rss_bytes"]) / 2**20
            print(f"  peak RSS difference big - small: {diff:+.0f} MiB (target < 200 MiB)")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for name in ("small.parquet", "big.parquet", "quality.npy", "reader.parquet"):
                (work / name).unlink(missing_ok=True)
            for path in work.glob("quality-*.parquet"):
                path.unlink()
            shutil.rmtree(work / "hf-cache", ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    print(f"(benchmark process max RSS {peak} MiB)")


def _report(label: str, path: Path, r: dict) -> None:
    print(
        f"  {label}: {path.stat().st_size / 1e6:,.0f} MB, {r['rows']:,} rows "
        f"in {r['seconds']:.1f} s "
        f"({r['rows'] / r['seconds']:,.0f} rows/s), peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB "
        f"({r['rss_before_epoch_bytes'] / 2**20:.0f} MiB before the epoch: Python, torch, pyarrow) "
        f"(buffer {r['shuffle_buffer_rows']:,} rows, estimated stream memory "
        f"{r['estimated_bytes'] / 2**20:.0f} MiB)"
    )


if __name__ == "__main__":
    main()

"""DDP scaling: samples/s of batchfit.train on 1 vs W ranks, and the communication share.

The launcher starts ``torch.distributed.run --nproc-per-node W`` on this same file for each W;
each worker initialises the process group itself (the Python API inside a user's group), trains
an MLP large enough that the gradient all-reduce matters (about 1.3 M parameters) on synthetic
data with the same global batch, and rank 0 prints one JSON line. The communication share is
measured on the rank's own share of a batch: step time with DDP's all-reduce vs the same step
under ``no_sync`` (no communication), ``1 - t_nosync / t_sync``.

Then the streamed-I/O figure: one epoch over a Parquet file of ``--stream-rows`` rows (written
once to a temporary folder), and the rows each rank decoded (``StreamSource.rows_decoded``): about
``1/W`` of the file per rank, plus the windows ranks share and one batch read to check the model.

    python benchmarks/ddp.py [--ranks 1,2] [--batch-size 256] [--steps 60] [--device auto]
                             [--stream-rows 20000]  (0: no streamed figure)

Runs unchanged on a multi-GPU node (NCCL, ``cuda:LOCAL_RANK``: batchfit.distributed).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

WIDTH, INPUTS, CLASSES, SAMPLES = 1024, 256, 10, 8192
#: Rows in one shuffle window of the streamed file (row groups of half that).
STREAM_WINDOW = 2000


def _model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(INPUTS, WIDTH),
        torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, WIDTH),
        torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, CLASSES),
    )


def _comm_share(model, device, share: int, repeats: int = 20) -> float:
    """1 - (step time without all-reduce) / (step time with it), on this rank's share."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    x = torch.randn(share, INPUTS, device=device)
    y = torch.randint(0, CLASSES, (share,), device=device)

    def timed(sync: bool) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(repeats):
            if sync:
                F.cross_entropy(ddp(x), y).backward()
            else:
                with ddp.no_sync():
                    F.cross_entropy(ddp(x), y).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed(True)  # warm-up
    with_sync, without = timed(True), timed(False)
    return max(0.0, 1 - without / with_sync)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import batchfit
    from batchfit import distributed
    from batchfit.step import resolve_device

    distributed.join_from_env()  # what a user's own script would do: init_process_group
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, INPUTS, generator=g)
    y = torch.randint(0, CLASSES, (SAMPLES,), generator=g)
    model = _model()
    result = batchfit.train(
        model, (x, y), batch_size=args.batch_size, max_steps=args.steps, device=args.device,
        progress=False, optimizer="sgd", lr=0.01,
    )  # fmt: skip
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = distributed.place(resolve_device(args.device))
    share = 0.0
    if world > 1:
        share = _comm_share(model, device, -(-args.batch_size // world))
    row = {
        "world_size": world,
        "device": str(device),
        "samples_per_s": round(result.samples_per_s, 1),
        "communication_share": round(share, 3),
        "steps": result.steps,
    }
    if args.stream:
        row |= _streamed_epoch(args, world)
    if distributed.is_main():
        print(json.dumps(row), flush=True)
    distributed.leave()


def _streamed_epoch(args: argparse.Namespace, world: int) -> dict:
    """One epoch streamed from the Parquet file: rows decoded by each rank, and samples/s."""
    import torch.distributed as dist

    import batchfit
    from batchfit.data.stream import open_stream

    source = open_stream(args.stream, target="y", shuffle_buffer=STREAM_WINDOW, seed=0)
    result = batchfit.train(
        _model(), source, batch_size=args.batch_size, epochs=1, device=args.device,
        progress=False, optimizer="sgd", lr=0.01,
    )  # fmt: skip
    decoded = [source.rows_decoded] * world
    if world > 1:
        dist.all_gather_object(decoded, source.rows_decoded)
    return {
        "stream_rows": source.num_samples,
        "stream_rows_decoded_per_rank": decoded,
        "stream_samples_per_s": round(result.samples_per_s, 1),
    }


def _write_stream(rows: int, folder: str) -> str:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    columns = {f"f{i}": rng.normal(size=rows).astype(np.float32) for i in range(INPUTS)}
    columns["y"] = rng.integers(0, CLASSES, size=rows)
    path = os.path.join(folder, "stream.parquet")
    pq.write_table(pa.table(columns), path, row_group_size=STREAM_WINDOW // 2)
    return path


def launch(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        stream = _write_stream(args.stream_rows, folder) if args.stream_rows else ""
        _launch_each(args, stream)


def _launch_each(args: argparse.Namespace, stream: str) -> None:
    rows = []
    for world in [int(w) for w in args.ranks.split(",")]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world)]
        cmd += ["--master-port", str(port), __file__, "--worker"]
        cmd += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
        cmd += ["--device", args.device, "--stream", stream]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    base = rows[0]["samples_per_s"]
    for row in rows[1:]:
        print(f"{row['world_size']} ranks: {row['samples_per_s'] / base:.2f}x the samples/s of 1")
    for row in rows if stream else []:
        share = [f"{d / row['stream_rows']:.0%}" for d in row["stream_rows_decoded_per_rank"]]
        print(
            f"streamed, {row['world_size']} rank(s): rows decoded per rank "
            f"{row['stream_rows_decoded_per_rank']} of {row['stream_rows']} ({', '.join(share)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--stream-rows", type=int, default=20000)
    parser.add_argument("--stream", default="", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    main()

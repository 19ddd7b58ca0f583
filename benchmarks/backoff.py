"""Out-of-memory back-off: a run forced to back off loses no step and ends where a run started at
the smaller micro-batch ends.

Two runs of ``batchfit train`` on the same data, model and seed, side by side in one run, each in
a process of its own:

- **backed off**: ``--batch-size 32768 --memory-limit 1500MB``: a micro-batch of 32768 does not
  fit (the model keeps ~40 KiB of activations per sample for backward), so the first step runs out
  of memory for real and is redone with half the micro-batch, and so on until one fits;
- **started small**: the same command without a limit, at the micro-batch the first run ended at.

It prints the steps, the final loss and the weights' SHA-256 of both, and the throughput ratio
(backed off / started small: what the failed attempts cost).

    python benchmarks/backoff.py [--rows 131072] [--epochs 2] [--memory-limit 1500MB]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

MODELS = """
from torch import nn


def hungry():
    return nn.Sequential(
        nn.Linear(16, 2048), nn.Tanh(), nn.Sigmoid(), nn.Tanh(), nn.Sigmoid(), nn.Linear(2048, 10)
    )
"""


def write_task(folder: Path, rows: int) -> tuple[Path, Path]:
    """A models file and a Parquet file of ``rows`` samples (16 features, 10 classes)."""
    models = folder / "models.py"
    models.write_text(MODELS)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 16, generator=g)
    y = (x[:, :4].sum(1) * 2).round().clamp(-4, 5).long() + 4  # learnable: a function of x
    data = folder / "big.parquet"
    pq.write_table(pa.table({f"f{i}": x[:, i].numpy() for i in range(16)} | {"y": y.numpy()}), data)
    return models, data


def run(models: Path, data: Path, out: Path, args: argparse.Namespace, *extra: str) -> dict:
    """One ``batchfit train --json`` in a child process: its result, and the micro-batch sizes
    its metrics.csv recorded."""
    command = [sys.executable, "-m", "batchfit", "train", "--model", f"{models}:hungry"]
    command += ["--data", str(data), "--target", "y", "--val-fraction", "0", "--device", "cpu"]
    command += ["--batch-size", str(args.batch_size), "--epochs", str(args.epochs)]
    command += ["--out", str(out), "--json", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"batchfit train failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    with (out / "metrics.csv").open() as f:
        result["micros"] = [int(row["micro_batch_size"]) for row in csv.DictReader(f)]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4 * 32768)
    parser.add_argument("--batch-size", type=int, default=32768)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--memory-limit", default="1500MB")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models, data = write_task(folder, args.rows)
        limited = run(
            models, data, folder / "backed-off", args, "--memory-limit", args.memory_limit
        )
        micro = limited["micros"][-1]
        small = run(models, data, folder / "small", args, "--micro-batch-size", str(micro))
    planned = args.epochs * -(-args.rows // args.batch_size)
    print(
        f"batch size {args.batch_size}, {args.rows} rows x {args.epochs} epochs = {planned} steps "
        f"planned; {args.threads} thread(s)"
    )
    print(f"{'':38s}{'steps':>6s} {'micro-batches':>22s} {'final loss':>11s} {'samples/s':>10s}")
    for name, r in (
        (f"backed off (--memory-limit {args.memory_limit})", limited),
        (f"started at micro-batch {micro}", small),
    ):
        micros = f"{r['micros'][0]}..{r['micros'][-1]}" if len(set(r["micros"])) > 1 else micro
        print(
            f"{name:38s}{r['steps']:6d} {str(micros):>22s} {r['final']['train_loss']:11.6f} "
            f"{r['samples_per_s']:10.0f}"
        )
    same = limited["params_sha256"] == small["params_sha256"]
    print(f"steps lost: {planned - limited['steps']}; identical final weights: {same}")
    print(
        f"throughput ratio (backed off / started small): "
        f"{limited['samples_per_s'] / small['samples_per_s']:.3f}"
    )


if __name__ == "__main__":
    main()

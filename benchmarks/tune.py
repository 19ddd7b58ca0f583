"""`batchfit tune` on the built-in example: wall and CPU time, and Lightning's batch-size finder
side by side on the same model and data.

1. `batchfit tune --json` in a fresh process, as a user runs it (target: under 60 s on 2 cores);
   wall time and CPU time (user + system of the child), because a shared CPU stretches wall time.
2. Lightning's `Tuner.scale_batch_size` (mode "power": double until out of memory or the data set
   size) on the same CNN and the same 4,000 MNIST-1D training samples; its answer and its time.
3. The throughput at each answer, measured side by side in this process by the same probe
   (`batchfit.probe.throughput.measure_throughput`), so the two answers are compared on samples/s
   (Lightning's finder only asks "does it fit?"; batchfit also asks "is it fast, and does it
   save steps?"), and batchfit's predicted time to a result at each, (B + B_noise) / samples/s
   relative to its best (a model, not a measured training run).

Needs the `bench` extra (`pip install -e '.[bench]'`, which brings `lightning`).

    python benchmarks/tune.py [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from batchfit import TensorSource
from batchfit.examples import EXAMPLES
from batchfit.probe.throughput import measure_throughput


def run_batchfit_tune(out: str, env: dict[str, str]) -> tuple[float, float, dict]:
    """Wall seconds, CPU seconds and the JSON report of one `batchfit tune` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "batchfit", "tune", "--json", "--quiet", "--out", out],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, json.loads(done.stdout)


def run_lightning(x: torch.Tensor, y: torch.Tensor, root: str) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and the batch size of Lightning's `scale_batch_size`."""
    import lightning as L
    from lightning.pytorch.tuner import Tuner
    from torch.utils.data import DataLoader, TensorDataset

    example = EXAMPLES["mnist1d"]

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 2
            self.model = example.make_model()

        def training_step(self, batch, _):
            xb, yb = batch
            return F.cross_entropy(self.model(xb), yb)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=example.lr)

        def train_dataloader(self):
            return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=True)

    torch.manual_seed(0)
    module = Module()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,  # its trial checkpoint goes here, not into the current folder
    )
    cpu_before = time.process_time()
    started = time.perf_counter()
    Tuner(trainer).scale_batch_size(module, mode="power")
    return time.perf_counter() - started, time.process_time() - cpu_before, module.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="batchfit tune runs (median)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    print(f"command: {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")

    walls, cpus, reports = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            wall, cpu, report = run_batchfit_tune(f"{tmp}/r{i}", env)
            walls.append(wall)
            cpus.append(cpu)
            reports.append(report)
            print(
                f"batchfit tune round {i + 1}: {wall:.1f} s wall, {cpu:.1f} s CPU -> batch size "
                f"{report['recommended']['batch_size']}, lr {report['recommended']['lr']:.3g}"
            )
    report = reports[walls.index(statistics.median_low(walls))]  # a run that happened

    data = EXAMPLES["mnist1d"].load()
    x, y = data.x_train, data.y_train
    try:
        with tempfile.TemporaryDirectory() as tmp:
            l_wall, l_cpu, l_batch = run_lightning(x, y, tmp)
        lightning_label = "Lightning Tuner.scale_batch_size (power)"
    except ImportError:
        print("lightning is not installed: pip install -e '.[bench]'")
        return

    ours = report["recommended"]["batch_size"]
    # Lightning may answer more than the data set holds (4096 of 4000): a step then takes it all.
    l_steps = min(l_batch, len(y))
    torch.manual_seed(0)
    speeds = measure_throughput(
        EXAMPLES["mnist1d"].make_model(),
        TensorSource(x, y),
        F.cross_entropy,
        sorted({ours, l_steps}),
        timed_steps=9,
    )
    speed = {p.batch_size: p.samples_per_s for p in speeds.points}
    speed[l_batch] = speed[l_steps]

    # batchfit's own model of time to a result at each answer (1 = its best), from its report.
    relative = {c["batch_size"]: c["relative_time"] for c in report["predicted_time"]}
    print()
    print(
        "| tool | answer (batch size) | wall s | CPU s | samples/s at the answer | "
        "predicted time to a result |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| batchfit tune (median of {args.rounds}) | {ours} | {statistics.median(walls):.1f} | "
        f"{statistics.median(cpus):.1f} | {speed[ours]:,.0f} | {relative.get(ours, 1.0):.2f} |"
    )
    l_relative = relative.get(l_steps)
    print(
        f"| {lightning_label} | {l_batch} | {l_wall:.1f} | {l_cpu:.1f} | {speed[l_batch]:,.0f} | "
        f"{'-' if l_relative is None else f'{l_relative:.2f}'} |"
    )
    print()
    print(
        f"batchfit tune wall time: {statistics.median(walls):.1f} s (target < 60 s); throughput "
        f"at batchfit's answer / at Lightning's: {speed[ours] / speed[l_batch]:.2f}"
    )
    print(
        f"batchfit's report: memory ceiling {report['memory']['max_micro_batch_size']}, noise "
        f"scale {report['noise']['b_simple']:.0f}, throughput flattens at "
        f"{report['throughput_flattens_at']}; phases {report['phase_seconds']}"
    )


if __name__ == "__main__":
    main()

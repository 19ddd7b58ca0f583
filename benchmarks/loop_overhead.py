"""Loop overhead: batchfit.train's throughput divided by a hand-written PyTorch loop.

Same model (the built-in MNIST-1D CNN), same tensors, same optimizer, same number of steps, measured
side by side in one run, alternating which goes first; the ratio is the median over rounds.
batchfit does its full job here (progress off): metrics rows for every step written to
metrics.csv, NaN checks, position bookkeeping. Target (docs/design.md): ratio >= 0.97.

    python benchmarks/loop_overhead.py [--rounds 5] [--seconds 1.5] [--device cuda]
    python benchmarks/loop_overhead.py --precision bf16-mixed   # both loops under autocast

On a GPU both loops keep the data in CPU memory and copy each batch to the device, as batchfit
does; the model lives on the device.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import batchfit
from batchfit.examples import EXAMPLES


def hand_written(
    model, x, y, batch_size: int, steps: int, seed: int, device: str, precision: str = "32"
) -> None:
    """What a user writes without batchfit: seeded permutation, slice, step (the forward and
    the loss under bfloat16 autocast with ``precision="bf16-mixed"``, as PyTorch's recipe says)."""
    on_device = device != "cpu"
    mixed = precision == "bf16-mixed"
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mixed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    n = len(y)
    epoch, i = 0, 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        if i >= n:
            epoch, i = epoch + 1, 0
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        idx = perm[i : i + batch_size]
        i += batch_size
        opt.zero_grad(set_to_none=True)
        xb, yb = x[idx], y[idx]
        if on_device:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        with autocast:
            loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        loss.item()  # a real loop logs its loss


def with_batchfit(
    model, x, y, batch_size: int, steps: int, seed: int, device: str, out: str, precision: str
):
    batchfit.train(
        model,
        (x, y),
        batch_size=batch_size,
        max_steps=steps,
        optimizer="adam",
        lr=1e-3,
        seed=seed,
        out_dir=out,
        loss="cross_entropy",
        device=device,
        precision=precision,
    )


def timed(fn, device: str = "cpu") -> float:
    start = time.perf_counter()
    fn()
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.5, help="target time per measurement")
    parser.add_argument("--batch-sizes", default="1,32,256")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    args = parser.parse_args()
    p = args.precision

    example = EXAMPLES["mnist1d"]
    data = example.load()
    x, y = data.x_train, data.y_train
    dev = args.device
    where = torch.cuda.get_device_name() if dev != "cpu" else f"{torch.get_num_threads()} threads"
    print(f"# {' '.join(sys.argv)}  (torch {torch.__version__}, {where}, precision {p})")
    print(f"{'B':>5} {'steps':>6} {'hand samples/s':>15} {'batchfit samples/s':>19} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as out:
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            warm = example.make_model().to(dev)
            hand_written(warm, x, y, batch_size, 20, 0, dev, p)
            probe = timed(
                lambda b=batch_size, m=warm: hand_written(m, x, y, b, 100, 0, dev, p), dev
            )
            steps = max(100, int(args.seconds / (probe / 100)))
            ratios, hand_rates, ours_rates = [], [], []
            for r in range(args.rounds):
                torch.manual_seed(r)
                m1, m2 = example.make_model().to(dev), example.make_model()
                runs = [
                    functools.partial(hand_written, m1, x, y, batch_size, steps, r, dev, p),
                    functools.partial(with_batchfit, m2, x, y, batch_size, steps, r, dev, out, p),
                ]
                order = [0, 1] if r % 2 == 0 else [1, 0]
                times = {}
                for i in order:
                    times[i] = timed(runs[i], dev)
                hand_rates.append(steps * batch_size / times[0])
                ours_rates.append(steps * batch_size / times[1])
                ratios.append(times[0] / times[1])
            print(
                f"{batch_size:>5} {steps:>6} {statistics.median(hand_rates):>15,.0f} "
                f"{statistics.median(ours_rates):>19,.0f} {statistics.median(ratios):>7.3f}"
            )


if __name__ == "__main__":
    main()

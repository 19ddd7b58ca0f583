"""Sweep overhead: evaluation and sharpness as a share of the time of ``batchfit sweep``.

Runs the default sweep on the built-in example (MNIST-1D; batch sizes 32, 64, 128, 256; 40 epochs
each; 20 validation points, a training-subset evaluation and a sharpness measurement per size;
report and plots written) and reads how long evaluation and sharpness took inside it. Side by
side, in the same rounds and alternating which goes first, the same runs are timed as plain
``batchfit.train`` calls with no evaluation and no sharpness: ``1 - plain / sweep`` is everything
the sweep adds (evaluation, sharpness, report, plots, bookkeeping). Target (issue 5): < 10%.

    python benchmarks/sweep.py [--rounds 3] [--epochs 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

import batchfit
from batchfit.core.lr_scaling import scale_lr
from batchfit.orchestrate.sweep import DEFAULT_BATCH_SIZES, DEFAULT_EPOCHS
from batchfit.task import load_task


def sweep_once(task, epochs: int, out: str) -> tuple[float, dict[str, float]]:
    torch.manual_seed(0)
    model = task.make_model()
    start = time.perf_counter()
    result = batchfit.sweep(
        model,
        task.train,
        val_data=task.val,
        loss=task.loss,
        lr=task.suggested_lr,
        epochs=epochs,
        out_dir=out,
    )
    return time.perf_counter() - start, result.timing


def plain_once(task, epochs: int) -> float:
    """The same runs (same sizes, lr, budget, weights) with nothing but training."""
    torch.manual_seed(0)
    model = task.make_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    for batch_size in DEFAULT_BATCH_SIZES:
        model.load_state_dict(initial)
        batchfit.train(
            model,
            task.train,
            loss=task.loss,
            batch_size=batch_size,
            epochs=epochs,
            lr=scale_lr(task.suggested_lr, 32, batch_size, "sqrt"),
        )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    args = parser.parse_args()

    task = load_task()
    print(f"# {' '.join(sys.argv)}  (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    sweeps, plains, evals, sharps = [], [], [], []
    with tempfile.TemporaryDirectory() as out:
        sweep_once(task, 1, out)  # warm-up: imports, first-call costs of torch.func and matplotlib
        for r in range(args.rounds):
            order = ["sweep", "plain"] if r % 2 == 0 else ["plain", "sweep"]
            for which in order:
                if which == "sweep":
                    seconds, timing = sweep_once(task, args.epochs, out)
                    sweeps.append(seconds)
                    evals.append(timing["eval_seconds"] / seconds)
                    sharps.append(timing["sharpness_seconds"] / seconds)
                else:
                    plains.append(plain_once(task, args.epochs))
            print(
                f"round {r + 1}: sweep {sweeps[-1]:.2f} s, plain training {plains[-1]:.2f} s, "
                f"evaluation {evals[-1]:.1%}, sharpness {sharps[-1]:.1%}"
            )
    sweep_s, plain_s = statistics.median(sweeps), statistics.median(plains)
    print(f"{'':<34}{'median':>10}")
    print(f"{'sweep at defaults (s)':<34}{sweep_s:>10.2f}")
    print(f"{'same runs, training only (s)':<34}{plain_s:>10.2f}")
    print(f"{'evaluation share of sweep':<34}{statistics.median(evals):>10.1%}")
    print(f"{'sharpness share of sweep':<34}{statistics.median(sharps):>10.1%}")
    print(
        f"{'evaluation + sharpness share':<34}"
        f"{statistics.median(e + s for e, s in zip(evals, sharps, strict=True)):>10.1%}"
    )
    print(f"{'all added by sweep (1 - plain/sweep)':<34}{1 - plain_s / sweep_s:>10.1%}")


if __name__ == "__main__":
    main()

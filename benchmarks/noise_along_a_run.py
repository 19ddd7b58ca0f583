"""The gradient noise scale along one long run: does a later reading say how large the batch of a
long run should be?

The critical batch grows as training goes on (McCandlish et al. 2018; Merrill et al. 2025), so a
tune for a long run might read ``B_simple`` again later in training (e.g. at the race winner's
weights) and recommend from that. This script measures how usable such a reading is: it trains
one run of each long task of ``benchmarks/long_horizon.py`` at a good fixed (B, lr) (Adam, the
oracle's plain loop, 1 torch thread) and reads ``batchfit.probe.noise.noise_scale`` (micro-batch
64 x 8, 60 batches, the finite-data correction on) at the initial weights and at a few steps
along the way, beside the validation loss there.

    python benchmarks/noise_along_a_run.py            # both tasks, ~5 min on 2 cores
    python benchmarks/noise_along_a_run.py mnist1d_long

Prints one line per reading and writes ``benchmarks/results/noise_along_a_run.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from quality_tasks import data as task_data  # noqa: E402
from quality_tasks import models as task_models  # noqa: E402
from quality_tasks.tasks import LONG_TASKS  # noqa: E402

from batchfit.probe.noise import noise_scale  # noqa: E402

#: Per task: the (B, lr) trained and the steps at which the noise scale is read.
RUNS = {
    "mnist1d_long": (512, 8e-3, [0, 200, 1000, 3000, 7000]),
    "friedman_long": (256, 4e-3, [0, 1000, 5000, 20000, 60000]),
}


def readings(name: str) -> list[dict]:
    """Train the task's run and read the noise scale at its marks."""
    task = LONG_TASKS[name]
    batch_size, lr, marks = RUNS[name]
    x, y, xv, yv = (torch.from_numpy(a) for a in task_data.load(task.data))
    loss_fn = F.mse_loss if task.loss == "mse" else F.cross_entropy
    torch.manual_seed(0)
    model = getattr(task_models, task.model)()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(0)
    out: list[dict] = []
    step, todo = 0, list(marks)
    while todo:
        permutation = torch.randperm(len(x), generator=order)
        for start in range(0, len(x) - batch_size + 1, batch_size):
            if todo and step == todo[0]:
                estimate = noise_scale(
                    model, (x, y), task.loss, micro_batch_size=64, batches=60, seed=step
                )
                model.eval()
                with torch.no_grad():
                    val_loss = loss_fn(model(xv), yv).item()
                model.train()
                out.append({"step": step, "val_loss": val_loss, "b_simple": estimate.b_simple})
                print(f"{name} step {step:>6}: val loss {val_loss:.4g}, B_simple "
                      f"{estimate.b_simple:.4g}", flush=True)  # fmt: skip
                todo.pop(0)
                if not todo:
                    break
            rows = permutation[start : start + batch_size]
            loss = loss_fn(model(x[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return out


def main() -> None:
    torch.set_num_threads(1)
    names = sys.argv[1:] or list(RUNS)
    results = {name: {"run": RUNS[name][:2], "readings": readings(name)} for name in names}
    path = BENCH / "results" / "noise_along_a_run.json"
    path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

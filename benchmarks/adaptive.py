"""`--adaptive` against the fixed batch `tune` recommends: time and examples to a validation target.

For each task (the built-in MNIST-1D and two of ``benchmarks/quality_tasks``: digits MLP and
Friedman regression) and each seed (0, 1, 2), three `batchfit.train` runs; the first two start
from the same batch size and Adam learning rate, the answer `batchfit tune` gave on this machine
(cached by ``benchmarks/recommend_quality.py`` in ``results/recommend_quality/<task>.json``):

- fixed: that batch size and lr throughout;
- adaptive: ``adaptive=True`` from there (the batch follows the noise scale, lr by the sqrt rule;
  by default it never goes below where it started);
- adaptive_from_32: ``adaptive=True`` from B=32, tune's lr scaled to 32 by the sqrt rule, with
  tune's batch as the micro-batch (so growing to it needs no accumulation): the "start small,
  grow the batch" schedule of Smith et al. 2018.

All validate every ``--eval-every`` steps (not counted in training time) and stop at the task's
target; time to target is the run's training seconds at that evaluation, examples the samples
seen. Each adaptive arm's ratio over the fixed batch is printed per task (means over the seeds)
and overall (geometric mean). The machine is shared, and its load swings measured seconds 2-3x
between runs, so a second time ratio prices each run's steps at the step times per batch size
that ``recommend_quality.py --retime`` measured at quiet moments (without the noise
measurement's own cost, which the overhead figure gives). A run that misses the target within
the task's ``max_epochs`` counts as infinite.

Overhead: samples/s of ``adaptive=True`` with the batch pinned (``min_batch_size ==
max_batch_size``: the noise is measured and decisions are made as usual, B cannot change) over
plain training, same B, same steps, alternating order, in samples per CPU second of the process
(the whole train call): best round against best round, and the median of the ``--rounds`` paired
ratios. Target < 3%.

    python benchmarks/adaptive.py                     # all, cached per task and seed
    python benchmarks/adaptive.py --tasks mnist1d --fresh

Results go to ``benchmarks/results/adaptive/<task>.json`` and ``overhead.json``; a rerun computes
only what is missing. Training uses 1 torch thread (deterministic, leaves a core free).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from quality_tasks import data as task_data  # noqa: E402
from quality_tasks import models as task_models  # noqa: E402
from quality_tasks.tasks import TASKS  # noqa: E402

import batchfit  # noqa: E402
from batchfit.core.lr_scaling import scale_lr  # noqa: E402

RESULTS = BENCH / "results" / "adaptive"
TUNED = BENCH / "results" / "recommend_quality"
DEFAULT_TASKS = ("mnist1d", "digits_mlp", "friedman")
SEEDS = (0, 1, 2)


def tuned_answer(name: str) -> tuple[int, float]:
    """The first `batchfit tune` answer (batch size, lr) recorded for the task on this machine."""
    answer = json.loads((TUNED / f"{name}.json").read_text())["tune"][0]
    return int(answer["batch_size"]), float(answer["lr"])


def tensors(name: str) -> tuple[torch.Tensor, ...]:
    x, y, xv, yv = task_data.load(TASKS[name].data)
    return tuple(torch.from_numpy(a) for a in (x, y, xv, yv))


#: The arms: (name, start batch size: None = tune's, adaptive). A start below tune's gets tune's
#: lr scaled by the sqrt rule, as --adaptive would give it.
ARMS = (("fixed", None, False), ("adaptive", None, True), ("adaptive_from_32", 32, True))


def run_to_target(name: str, seed: int, arm: str, eval_every: int, adapt_every: int) -> dict:
    """One training run stopped at the task's target; what it took, and its batch sizes."""
    task = TASKS[name]
    x, y, xv, yv = tensors(name)
    _, start, adaptive = next(a for a in ARMS if a[0] == arm)
    tuned_b, tuned_lr = tuned_answer(name)
    batch_size = start or tuned_b
    lr = scale_lr(tuned_lr, tuned_b, batch_size, "sqrt")
    key = "val_loss" if task.metric == "mse" else "val_accuracy"

    def at_target(record: dict) -> bool:
        value = record[key]
        return value <= task.target if task.metric == "mse" else value >= task.target

    torch.manual_seed(seed)
    model = getattr(task_models, task.model)()
    options = dict(adaptive=True, adapt_every=adapt_every) if adaptive else {}
    if adaptive and start:  # tune's batch runs in one pass: growing to it needs no accumulation
        options["micro_batch_size"] = tuned_b
    result = batchfit.train(
        model,
        (x, y),
        val_data=(xv, yv),
        loss=task.loss,
        on_eval=at_target,
        batch_size=batch_size,
        lr=lr,
        optimizer="adam",
        epochs=task.max_epochs,
        eval_every=eval_every,
        seed=seed,
        device="cpu",
        **options,
    )
    hit = next((e for e in result.evals if at_target(e)), None)
    return {
        "reached": hit is not None,
        "seconds": hit["train_seconds"] if hit else math.inf,
        "examples": hit["samples_seen"] if hit else math.inf,
        "steps": hit["step"] if hit else math.inf,
        "start_batch_size": batch_size,
        "micro_batch_size": result.micro_batch_size,
        "lr": lr,
        "final_batch_size": result.adaptive["batch_size"] if result.adaptive else batch_size,
        "changes": [
            {k: c[k] for k in ("step", "from", "to", "lr")}
            for c in (result.adaptive or {}).get("changes", [])
        ],
        "b_noise_end": result.adaptive["b_noise"] if result.adaptive else None,
    }


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def task_phase(name: str, args: argparse.Namespace) -> dict:
    """Every arm per seed, cached in results/adaptive/<task>.json."""
    path = RESULTS / f"{name}.json"
    cache = {} if args.fresh else load(path)
    for seed in SEEDS:
        for arm, _, _ in ARMS:
            key = f"{arm}/{seed}"
            if key not in cache:
                cache[key] = run_to_target(name, seed, arm, args.eval_every, args.adapt_every)
                cache["setup"] = {"eval_every": args.eval_every, "adapt_every": args.adapt_every}
                save(path, cache)
                print(
                    f"  {name} {key}: {cache[key]['seconds']:.3g} s, "
                    f"{cache[key]['examples']} examples, B {cache[key]['start_batch_size']} -> "
                    f"{cache[key]['final_batch_size']}"
                )
    return cache


def quiet_seconds(name: str, run: dict) -> float:
    """The run's steps to target priced at the step times recommend_quality.py measured per
    batch size at quiet moments (a shared machine's load swings the measured seconds 2-3x).

    A batch above the micro-batch costs its micro-batches."""
    if not run["reached"]:
        return math.inf
    times = json.loads((TUNED / f"{name}.json").read_text())["step_time"]
    micro = run["micro_batch_size"]
    bounds = [(0, micro)] + [(c["step"], c["to"]) for c in run["changes"]] + [(run["steps"], 0)]
    total = 0.0
    for (begin, size), (end, _) in zip(bounds, bounds[1:], strict=False):
        per_step = math.ceil(size / micro) * times[str(min(size, micro))]["seconds"]
        total += max(0, min(end, run["steps"]) - begin) * per_step
    return total


def ratios(name: str, cache: dict, arm: str) -> tuple[float, float, float]:
    """The arm over the fixed batch: mean measured time, mean time at quiet step times and mean
    examples over the seeds."""

    def mean(mode: str, what: str) -> float:
        return statistics.fmean(cache[f"{mode}/{s}"][what] for s in SEEDS)

    def quiet(mode: str) -> float:
        return statistics.fmean(quiet_seconds(name, cache[f"{mode}/{s}"]) for s in SEEDS)

    return (
        mean(arm, "seconds") / mean("fixed", "seconds"),
        quiet(arm) / quiet("fixed"),
        mean(arm, "examples") / mean("fixed", "examples"),
    )


def samples_per_s(x, y, batch_size: int, micro: int | None, steps: int, adaptive: bool) -> float:
    """Samples per CPU second of one run (process time, 1 torch thread: other processes on a
    shared machine slow the wall clock by 2-3x, not this)."""
    torch.manual_seed(0)
    model = task_models.make_mnist1d_convnet()
    # measured as usual (one step in 5 at adapt_every 50), decided as usual, B pinned by min = max
    options = dict(adaptive=True, min_batch_size=batch_size, max_batch_size=batch_size)
    started = time.process_time()
    r = batchfit.train(
        model,
        (x, y),
        batch_size=batch_size,
        micro_batch_size=micro,
        max_steps=steps,
        device="cpu",
        **(options if adaptive else {}),
    )
    return r.samples_seen / (time.process_time() - started)


def overhead_phase(args: argparse.Namespace) -> dict:
    """Throughput with the noise measured as usual over plain training (MNIST-1D): the best round
    of each, and the median of the rounds' paired ratios (each pair ran back to back)."""
    x, y, _, _ = tensors("mnist1d")
    out: dict = {"loadavg_1min_before": os.getloadavg()[0]}
    # tune's B (one micro-batch: split in halves), a small B (where the split's fixed cost shows)
    # and accumulation (the micro-batch gradients are computed anyway)
    for batch_size, micro in ((tuned_answer("mnist1d")[0], None), (32, None), (512, 128)):
        rounds = []
        for r in range(args.rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            speeds = {
                mode: samples_per_s(x, y, batch_size, micro, args.overhead_steps, mode == "on")
                for mode in order
            }
            rounds.append(speeds)
        best = {mode: max(r[mode] for r in rounds) for mode in ("off", "on")}
        paired = statistics.median(1 - r["on"] / r["off"] for r in rounds)
        name = f"B={batch_size}" + (f" micro={micro}" if micro else "")
        out[name] = {**best, "overhead": 1 - best["on"] / best["off"], "paired_median": paired}
        out[name]["rounds"] = rounds
        print(
            f"  overhead at {name}: best {best['off']:.0f} -> {best['on']:.0f} samples/s "
            f"({out[name]['overhead']:+.1%}); median of paired rounds {paired:+.1%}"
        )
    out["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out["loadavg_1min_after"] = os.getloadavg()[0]
    save(RESULTS / "overhead.json", out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--adapt-every", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--overhead-steps", type=int, default=500)
    parser.add_argument("--fresh", action="store_true", help="ignore cached runs")
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = [
        "task         B_tune  lr_tune   arm               time ratio  quiet-time ratio  "
        "examples ratio  B at end"
    ]
    logs: dict[str, list[tuple[float, ...]]] = {arm: [] for arm, _, _ in ARMS[1:]}
    for name in args.tasks.split(","):
        cache = task_phase(name, args)
        b, lr = tuned_answer(name)
        for arm, _, _ in ARMS[1:]:
            r = ratios(name, cache, arm)
            logs[arm].append(r)
            ends = sorted({cache[f"{arm}/{s}"]["final_batch_size"] for s in SEEDS})
            lines.append(
                f"{name:<12} {b:>6}  {lr:<8.4g}  {arm:<16} {r[0]:>10.2f}  {r[1]:>16.2f}  "
                f"{r[2]:>14.2f}  {ends}"
            )
    for arm, values in logs.items():
        geo = [math.exp(statistics.fmean(math.log(v[i]) for v in values)) for i in (0, 1, 2)]
        lines.append(
            f"{'geo. mean':<12} {'':>6}  {'':<8}  {arm:<16} {geo[0]:>10.2f}  {geo[1]:>16.2f}  "
            f"{geo[2]:>14.2f}"
        )
    print("\n".join(lines))
    save(RESULTS / "summary.json", {"table": lines})
    if not args.skip_overhead:
        overhead_phase(args)


if __name__ == "__main__":
    main()

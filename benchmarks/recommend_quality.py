"""Recommendation quality: hold `batchfit tune`'s batch size and learning rate against an oracle.

The oracle is exhaustive and independent of batchfit's code (a plain PyTorch loop written here:
Adam with default betas and a constant learning rate, shuffled epochs from a seeded generator,
the last partial batch kept, evaluation in eval mode without gradients). For each task of
``benchmarks/quality_tasks/tasks.py`` and every power-of-two batch size B from 8 to
min(max_batch_size, N/4), it finds the Adam learning rate that reaches the task's validation
target in the fewest steps, on a grid lr = 1e-3 x 2^k that grows upward or downward for as long as
its edge wins, averaging the steps to target over the task's seeds (2, or 4 where runs are cheap
and the validation curve noisy; a seed sets the initial weights and the data order). Time to
target = mean steps x the step time of B measured on this machine.

Then `batchfit tune` runs as a user runs it (default time budget, `--optimizer adam --json`), and
for each answer (B_rec, lr_rec):

- ratio_B  = oracle best time at B_rec (over its lr grid) / oracle best time over all (B, lr);
- ratio_BL = time of real runs at exactly (B_rec, lr_rec) (same seeds, loop and target) / best;
- B=32 at its best lr / best, for scale. Goals: ratio_B <= 1.15 and ratio_BL <= 1.25.

Phases (each caches its results in benchmarks/results/recommend_quality/<task>.json, so a rerun
computes only what is missing):

    python benchmarks/recommend_quality.py --list
    python benchmarks/recommend_quality.py --skip-tune               # 1. the oracle (1 thread)
    python benchmarks/recommend_quality.py --retime --skip-tune      # 2. step times, quiet machine
    python benchmarks/recommend_quality.py --tune-runs 2             # 3. tune, judged; summary.json
    python benchmarks/recommend_quality.py --tasks digits_mlp,friedman --skip-tune
    python benchmarks/recommend_quality.py --tune-runs 2 --fresh-tune  # new tune answers

A tune answer whose B the oracle has not searched (not a power of two, or outside the range) gets
its own lr search and step time, so ratio_B is always measured, never interpolated.

Steps to target: the validation metric is evaluated after every step up to step 20, then every 3%
of the steps done, and the crossing is interpolated linearly between the two evaluations around
it, so it is resolved well within 3% (a task with ``extra["smooth"] = k`` holds the mean of the
last k evaluations against the target instead of the last one). A run that has not reached the
target after the task's ``max_epochs`` never reaches it (infinite time); during the search, a run
is also stopped once it has taken 3x the mean steps of the best learning rate found so far at its
B (its lr is then taken as out of the running: seeds differ by far less than 3x on these tasks).
Training runs use 1 torch thread (deterministic given the seed, and they leave a core free); step
times are measured with torch's default thread count, in a separate pass (``--retime``): the
median of many steps after warm-up, in 3 rounds through all batch sizes, with the 1-minute load
average before and after recorded beside them (it includes the timing's own threads, ~2 on 2
cores). The fastest round counts, over this and earlier passes with the same torch, thread count
and machine: other work on a shared machine only slows a round, so repeating ``--retime`` at
quiet moments refines the figures.

Needs scikit-learn (the `bench` extra) for the digits, tabular and regression data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from quality_tasks import data as task_data  # noqa: E402
from quality_tasks import models as task_models  # noqa: E402
from quality_tasks.tasks import TASKS, QualityTask  # noqa: E402

RESULTS = BENCH / "results" / "recommend_quality"
MODELS_FILE = BENCH / "quality_tasks" / "models.py"
LR_BASE = 1e-3  # the grid is LR_BASE * 2**k
SMALLEST_BATCH = 8
PRUNE = 3.0  # a search run stops at this many times the best steps found so far at its B
EVAL_EVERY_STEP_UNTIL = 20
EVAL_SPACING = 1.03  # then evaluate when the step count has grown 3%
TIMED_STEPS, WARMUP_STEPS, MIN_TIMED_S, TIMING_ROUNDS = 40, 10, 0.5, 3
GOAL_B, GOAL_BL = 1.15, 1.25
DEFAULT_THREADS = torch.get_num_threads()  # read before the training runs set 1 thread


# ----------------------------------------------------------------------------- task and data


class Arrays:
    """A task's tensors: training and validation features and targets."""

    def __init__(self, task: QualityTask) -> None:
        x, y, xv, yv = task_data.load(task.data)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.xv, self.yv = torch.from_numpy(xv), torch.from_numpy(yv)
        self.n = len(self.x)


def batch_sizes(task: QualityTask, n: int) -> list[int]:
    """Powers of two from 8 (or the task's ``extra["smallest_batch"]``) to
    min(task.max_batch_size, n / 4)."""
    sizes, b = [], task.extra.get("smallest_batch", SMALLEST_BATCH)
    while b <= min(task.max_batch_size, n // 4):
        sizes.append(b)
        b *= 2
    return sizes


def loss_fn(task: QualityTask, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on logits, or mean squared error."""
    if task.loss == "mse":
        return F.mse_loss(output, target)
    return F.cross_entropy(output, target)


def evaluate(task: QualityTask, model: torch.nn.Module, arrays: Arrays) -> float:
    """The validation metric (accuracy or mse) in eval mode, without gradients."""
    model.eval()
    with torch.no_grad():
        output = model(arrays.xv)
        if task.metric == "mse":
            value = F.mse_loss(output, arrays.yv).item()
        else:
            value = (output.argmax(1) == arrays.yv).float().mean().item()
    model.train()
    return value


def reached(task: QualityTask, value: float) -> bool:
    """Whether a validation value meets the task's target."""
    return value <= task.target if task.metric == "mse" else value >= task.target


def max_steps(task: QualityTask, n: int, batch_size: int) -> int:
    """The step cap of a run: the task's max_epochs at this batch size."""
    return task.max_epochs * math.ceil(n / batch_size)


def lr_key(lr: float) -> str:
    """How a learning rate is written in the cache (6 significant digits)."""
    return f"{lr:.6g}"


def grid_lr(k: int) -> float:
    """The k-th point of the learning-rate grid."""
    return LR_BASE * 2.0**k


def grid_index(lr: float) -> int:
    """The grid point nearest to ``lr`` (in log scale)."""
    return round(math.log2(lr / LR_BASE))


# ----------------------------------------------------------------------------- training


def smoothed(task: QualityTask, values: list[float]) -> float:
    """The metric held against the target after an evaluation: the last value, or with
    ``task.extra["smooth"] = k`` the mean of the last k evaluations (a demanding target near a
    plateau is otherwise first reached by one lucky evaluation, and seeds differ 3x)."""
    k = task.extra.get("smooth", 1)
    return sum(values[-k:]) / len(values[-k:])


def _crossing(task: QualityTask, before: tuple[int, float], after: tuple[int, float]) -> float:
    """Steps at which the validation curve crosses the target, linear between two evaluations."""
    (s0, m0), (s1, m1) = before, after
    if m1 == m0:
        return float(s1)
    fraction = (task.target - m0) / (m1 - m0)
    return s0 + min(max(fraction, 0.0), 1.0) * (s1 - s0)


def _summary_curve(curve: list[tuple[int, float]], points: int = 10) -> list[list[float]]:
    """About ``points`` evaluations, log-spaced in their index, always the first and last."""
    if len(curve) <= points:
        chosen = range(len(curve))
    else:
        chosen = sorted({round(i) for i in np.geomspace(1, len(curve), points) - 1})
    return [[curve[i][0], round(curve[i][1], 5)] for i in chosen]


def train_to_target(
    task: QualityTask, arrays: Arrays, batch_size: int, lr: float, seed: int, cap: int
) -> dict:
    """Train from seeded weights with Adam at a constant ``lr`` until the validation target is met
    or ``cap`` steps have run. Returns the steps to target (interpolated; None if not reached),
    the cap, and a summary of the validation curve."""
    started, cpu_started = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    model = getattr(task_models, task.model)()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    curve = [(0, evaluate(task, model, arrays))]
    judged = list(curve)  # what is held against the target: the curve, smoothed if asked
    step, next_eval, steps, status, loss_value = 0, 1, None, "cap", float("nan")
    while step < cap and steps is None and status == "cap":
        permutation = torch.randperm(arrays.n, generator=order)
        for start in range(0, arrays.n, batch_size):
            rows = permutation[start : start + batch_size]
            loss = loss_fn(task, model(arrays.x[rows]), arrays.y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step < next_eval and step < cap:
                continue
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                status = "diverged"
                break
            curve.append((step, evaluate(task, model, arrays)))
            judged.append((step, smoothed(task, [m for _, m in curve])))
            if reached(task, judged[-1][1]):
                steps, status = _crossing(task, judged[-2], judged[-1]), "reached"
                break
            if step >= cap:
                break
            next_eval = step + 1 if step < EVAL_EVERY_STEP_UNTIL else math.ceil(step * EVAL_SPACING)
    values = [m for _, m in curve]
    best = min(values) if task.metric == "mse" else max(values)
    return {
        "steps": None if steps is None else round(steps, 2),
        "status": status,
        "cap": cap,
        "steps_run": step,
        "evals": len(curve),
        "best_metric": round(best, 5),
        "last_loss": round(loss_value, 5) if math.isfinite(loss_value) else None,
        "curve": _summary_curve(curve),
        "seconds": round(time.perf_counter() - started, 2),
        "cpu_seconds": round(time.process_time() - cpu_started, 2),
    }


# ----------------------------------------------------------------------------- cache


def results_folder(task: QualityTask) -> Path:
    """Where the task's cache lives: ``benchmarks/results/<task.results>``."""
    return BENCH / "results" / task.results


def cache_path(task: QualityTask) -> Path:
    return results_folder(task) / f"{task.name}.json"


def definition(task: QualityTask) -> dict:
    """What the cached training runs depend on; a cache made under another one is not used."""
    return {
        "target": task.target,
        "metric": task.metric,
        "max_epochs": task.max_epochs,
        "model": task.model,
        "data": f"{task.data}-{task_data.VERSION}",
        "lr_grid": f"{LR_BASE:g} x 2^k",
        "smooth": task.extra.get("smooth", 1),
    }


def load_cache(task: QualityTask) -> dict:
    """The task's cached results, or an empty skeleton when there are none or they were made
    for another definition of the task (another target, model or data)."""
    path = cache_path(task)
    if path.exists():
        cache = json.loads(path.read_text())
        now = definition(task)
        old = {k: v for k, v in cache.get("definition", {}).items() if k in now}
        if all(now[k] == v for k, v in old.items()):
            return cache
        print(f"{task.name}: cache made for {old}, now {definition(task)}: starting over")
    return {"task": task.name, "cells": {}, "step_time": {}, "recommended_runs": {}, "tune": []}


def save_cache(task: QualityTask, cache: dict) -> None:
    """Write atomically (a killed run leaves the last complete file)."""
    results_folder(task).mkdir(parents=True, exist_ok=True)
    cache["definition"] = {**definition(task), "seeds": task.seeds}
    path = cache_path(task)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path)


class Runner:
    """Runs cells (B, lr, seed) through the cache: a finished cell is never run again, and a cell
    stopped at a cap is rerun only when a larger cap is asked for."""

    def __init__(
        self, task: QualityTask, arrays: Arrays, cache: dict, log, prune: float = PRUNE
    ) -> None:
        self.task, self.arrays, self.cache, self.log = task, arrays, cache, log
        self.prune = prune  # a search run stops at this many times the best steps at its B

    def cell(self, table: str, batch_size: int, lr: float, seed: int, cap: int) -> dict:
        key = f"{batch_size}|{lr_key(lr)}|{seed}"
        cells = self.cache[table]
        old = cells.get(key)
        if old is not None and (old["steps"] is not None or old["status"] == "diverged"):
            return old
        if old is not None and old["cap"] >= cap:
            return old
        result = train_to_target(self.task, self.arrays, batch_size, lr, seed, cap)
        cells[key] = result
        save_cache(self.task, self.cache)
        shown = "-" if result["steps"] is None else f"{result['steps']:.0f}"
        self.log(
            f"  B={batch_size:<5} lr={lr_key(lr):<9} seed={seed}: steps {shown:>6} "
            f"({result['status']}, cap {cap}, best {result['best_metric']:.4g}, "
            f"{result['seconds']:.1f} s)"
        )
        return result

    def mean_steps(self, table: str, batch_size: int, lr: float, cap: int) -> float:
        """Mean steps to target over the seeds, or inf when a seed does not reach it."""
        total = 0.0
        for seed in range(self.task.seeds):
            result = self.cell(table, batch_size, lr, seed, cap)
            if result["steps"] is None:
                return math.inf
            total += result["steps"]
        return total / self.task.seeds

    def search(
        self,
        batch_size: int,
        start_lr: float,
        required: bool = True,
        step_cap: int | None = None,
    ) -> tuple[float, float]:
        """The grid lr with the fewest mean steps at ``batch_size`` (and those steps): start at
        the grid points around ``start_lr`` and extend while an edge of the grid wins.

        When no lr reaches the target, the grid grows by 2 more points on each side; if none of
        those does either, the target is out of reach at this batch size: an error for the
        oracle's own batch sizes (``required``), else (nan, inf).

        ``step_cap`` bounds every run at this batch size from outside (a long oracle's cap: the
        steps this size may take before it is slower than the best time found at any size);
        when none of the first three learning rates beats it, the size is out of the running
        and the search ends there with (nan, inf)."""
        full_cap = max_steps(self.task, self.arrays.n, batch_size)
        if step_cap is not None:
            full_cap = min(full_cap, step_cap)
        steps: dict[int, float] = {}

        def run(k: int) -> None:
            best = min(steps.values(), default=math.inf)
            cap = full_cap if math.isinf(best) else min(full_cap, math.ceil(self.prune * best))
            steps[k] = self.mean_steps("cells", batch_size, grid_lr(k), cap)

        centre = grid_index(start_lr)
        for k in (centre, centre + 1, centre - 1):
            run(k)
        while True:
            best_k = min(steps, key=lambda k: (steps[k], k))
            if math.isinf(steps[best_k]):
                if step_cap is not None and full_cap == step_cap:
                    return math.nan, math.inf  # slower than the cap at every lr tried
                if len(steps) < 7:
                    run(max(steps) + 1 if len(steps) % 2 else min(steps) - 1)
                    continue
                if not required:
                    return math.nan, math.inf
                raise RuntimeError(
                    f"{self.task.name}: no learning rate reached the target at B={batch_size} "
                    f"(tried {sorted(grid_lr(k) for k in steps)}); lower the target or raise "
                    "max_epochs"
                )
            if best_k == max(steps):
                run(best_k + 1)
            elif best_k == min(steps):
                run(best_k - 1)
            else:
                return grid_lr(best_k), steps[best_k]


# ----------------------------------------------------------------------------- oracle tables


def lr_table(cache: dict, seeds: int, table: str = "cells") -> dict[int, dict[str, float]]:
    """{B: {lr: mean steps (inf when a seed missed the target within its cap)}} from the cache;
    only (B, lr) pairs with every seed run."""
    runs: dict[tuple[int, str], list[float | None]] = {}
    for key, result in cache[table].items():
        b, lr, seed = key.split("|")
        if int(seed) < seeds:
            runs.setdefault((int(b), lr), []).append(result["steps"])
    out: dict[int, dict[str, float]] = {}
    for (b, lr), steps in runs.items():
        if len(steps) == seeds or None in steps:
            mean = math.inf if None in steps else sum(steps) / len(steps)
            out.setdefault(b, {})[lr] = mean
    return out


def best_per_batch(cache: dict, seeds: int) -> dict[int, tuple[float, float]]:
    """{B: (best lr, its mean steps)} over the grid."""
    out = {}
    for b, row in lr_table(cache, seeds).items():
        lr, steps = min(row.items(), key=lambda kv: (kv[1], float(kv[0])))
        if math.isfinite(steps):
            out[b] = (float(lr), steps)
    return out


def oracle(task: QualityTask, arrays: Arrays, cache: dict, sizes: list[int], log) -> None:
    """Search every batch size in ``sizes`` (smallest first, each starting from the best lr of
    the one before)."""
    runner = Runner(task, arrays, cache, log)
    start = task.first_lr
    for b in sizes:
        started = time.perf_counter()
        lr, steps = runner.search(b, start)
        seconds = time.perf_counter() - started
        log(f"{task.name} B={b}: best lr {lr:g}, {steps:.0f} steps ({seconds:.0f} s)")
        start = lr


# ----------------------------------------------------------------------------- step times


def time_steps(task: QualityTask, arrays: Arrays, batch_size: int) -> float:
    """Median seconds per training step at ``batch_size`` with torch's default thread count:
    after warm-up, at least TIMED_STEPS steps and MIN_TIMED_S seconds of them."""
    torch.set_num_threads(DEFAULT_THREADS)
    try:
        torch.manual_seed(0)
        model = getattr(task_models, task.model)()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        order = torch.Generator().manual_seed(0)
        times: list[float] = []
        done = 0
        while len(times) < TIMED_STEPS or sum(times) < MIN_TIMED_S:
            permutation = torch.randperm(arrays.n, generator=order)
            for start in range(0, arrays.n - batch_size + 1, batch_size):  # full batches only
                t0 = time.perf_counter()
                rows = permutation[start : start + batch_size]
                loss = loss_fn(task, model(arrays.x[rows]), arrays.y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss.item()
                if done >= WARMUP_STEPS:
                    times.append(time.perf_counter() - t0)
                done += 1
                if len(times) >= TIMED_STEPS and sum(times) >= MIN_TIMED_S:
                    break
        return statistics.median(times)
    finally:
        torch.set_num_threads(1)


def timing_setup() -> dict:
    """What a step time depends on besides the batch size: torch, its threads, the machine."""
    return {"torch": torch.__version__, "threads": DEFAULT_THREADS, "host": platform.node()}


def retime(
    task: QualityTask, arrays: Arrays, cache: dict, sizes: list[int], force: bool, log
) -> None:
    """Measure the step time of each batch size in ``sizes`` that has none (with ``force``: of
    all of them), in TIMING_ROUNDS rounds that go through the sizes in turn.

    The step time of a size is its fastest round, counting the rounds of earlier passes made with
    the same torch version, thread count and machine: other work on a shared machine can only
    slow a round, so each ``--retime`` can only bring the figure closer to a quiet machine's.
    Delete a task's ``step_time`` entries (or its JSON) to start over."""
    todo = [b for b in sizes if force or str(b) not in cache["step_time"]]
    if not todo:
        return
    setup = timing_setup()
    load_before = os.getloadavg()[0]
    rounds: dict[int, list[float]] = {b: [] for b in todo}
    for _ in range(TIMING_ROUNDS):
        for b in todo:
            rounds[b].append(time_steps(task, arrays, b))
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    for b in todo:
        old = cache["step_time"].get(str(b), {})
        kept = old.get("rounds", []) if all(old.get(k) == v for k, v in setup.items()) else []
        new = [{"ms": round(1e3 * t, 4), "when": when, "loadavg_1min": load} for t in rounds[b]]
        every = kept + new
        cache["step_time"][str(b)] = {
            "seconds": min(r["ms"] for r in every) / 1e3,
            "rounds": every,
            **setup,
        }
        log(
            f"  {task.name} B={b}: this pass {[r['ms'] for r in new]} ms/step (load {load}); "
            f"fastest of {len(every)} rounds: {min(r['ms'] for r in every):.3f} ms"
        )
    save_cache(task, cache)


# ----------------------------------------------------------------------------- tune, judged


def tune_command(task: QualityTask, out: str, extra: tuple[str, ...] = ()) -> list[str]:
    """`batchfit tune` as a user runs it on this task (default budget, Adam, JSON on stdout),
    with ``extra`` arguments after the task's."""
    command = [sys.executable, "-m", "batchfit", "tune"]
    if task.tune_example is None:
        train, val = task_data.paths(task.data)
        model = f"{MODELS_FILE.relative_to(BENCH.parent)}:{task.model}"
        command += ["--model", model, "--data", str(train), "--val-data", str(val)]
    return command + ["--optimizer", "adam", *extra, "--json", "--quiet", "--out", out]


def run_tune(task: QualityTask, extra: tuple[str, ...] = ()) -> dict:
    """One `batchfit tune` process: its answer, wall time, the load around it and its reasons."""
    with tempfile.TemporaryDirectory() as out:
        command = tune_command(task, out, extra)
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        done = subprocess.run(
            command, capture_output=True, text=True, cwd=BENCH.parent, check=False
        )
        wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    report = json.loads(done.stdout)
    recommended = report["recommended"]
    noise = report.get("noise") or {}
    return {
        "batch_size": recommended["batch_size"],
        "lr": recommended["lr"],
        "lr_rule": recommended.get("lr_rule"),
        "batch_size_range": recommended.get("batch_size_range"),
        "raced": report.get("race") is not None,
        "provisional": bool(recommended.get("provisional")),
        "b_simple": noise.get("b_simple"),
        "b_simple_interval": noise.get("interval"),
        "throughput_flattens_at": report.get("throughput_flattens_at"),
        "wall_s": round(wall, 1),
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "command": " ".join(command[1:]).replace(out, "<tmp>"),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "decision": report.get("decision"),
    }


def nearest_best_lr(best: dict[int, tuple[float, float]], batch_size: int, fallback: float):
    """The best lr of the searched batch size nearest to ``batch_size`` (log scale)."""
    if not best:
        return fallback
    b = min(best, key=lambda s: abs(math.log2(s / batch_size)))
    return best[b][0]


def judge_answers(task: QualityTask, arrays: Arrays, cache: dict, log) -> None:
    """For every cached tune answer: search the lr grid at its B if the oracle has not, time that
    B if needed, and train at exactly its (B, lr) with every seed (the task's full step cap)."""
    runner = Runner(task, arrays, cache, log)
    for answer in cache["tune"]:
        b = min(int(answer["batch_size"]), arrays.n)
        best = best_per_batch(cache, task.seeds)
        if b not in best and b not in lr_table(cache, task.seeds):
            log(f"{task.name}: searching the lr grid at tune's B={b}")
            runner.search(b, nearest_best_lr(best, b, task.first_lr), required=False)
        if str(b) not in cache["step_time"]:
            retime(task, arrays, cache, [b], False, log)
        runner.mean_steps("recommended_runs", b, float(answer["lr"]), max_steps(task, arrays.n, b))


# ----------------------------------------------------------------------------- tables


def time_to_target(cache: dict, batch_size: int, steps: float) -> float:
    """Seconds to the target: mean steps x the measured step time of the batch size."""
    return steps * cache["step_time"][str(batch_size)]["seconds"]


def best_overall(cache: dict, seeds: int) -> tuple[int, float, float]:
    """(B, lr, seconds) of the fastest (B, lr) of the grid search."""
    times = [
        (time_to_target(cache, b, steps), b, lr)
        for b, (lr, steps) in best_per_batch(cache, seeds).items()
        if str(b) in cache["step_time"]
    ]
    seconds, b, lr = min(times)
    return b, lr, seconds


def lr_slope(best: dict[int, tuple[float, float]], sizes: list[int]) -> float:
    """Least-squares slope of log2(best lr) against log2(B): 0 flat, 0.5 sqrt, 1 linear."""
    points = [(math.log2(b), math.log2(best[b][0])) for b in sizes if b in best]
    xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    return float(np.polyfit(xs, ys, 1)[0]) if len(points) >= 2 else math.nan


def steps_cell(steps: float, best: float, lr: str, cells: dict, b: int, seeds: int) -> str:
    """One lr-grid entry: mean steps, or why there is none (pruned, step cap, diverged)."""
    if math.isfinite(steps):
        text = f"{steps:.0f}"
        return f"**{text}**" if steps == best else text
    runs = [cells.get(f"{b}|{lr}|{seed}") for seed in range(seeds)]
    if any(r and r["status"] == "diverged" for r in runs):
        return "diverged"
    return f">{min(r['cap'] for r in runs if r and r['steps'] is None)}"


def oracle_table(task: QualityTask, cache: dict) -> list[str]:
    """Markdown: per B the best lr, steps, step time, time to target and the lr grid."""
    table, best = lr_table(cache, task.seeds), best_per_batch(cache, task.seeds)
    timed = {b for b in best if str(b) in cache["step_time"]}
    best_time = best_overall(cache, task.seeds)[2] if timed else math.nan
    lines = [
        f"**{task.name}**: {task.kind}; target val {task.metric} "
        f"{'<=' if task.metric == 'mse' else '>='} {task.target:g}; mean steps over seeds "
        f"0-{task.seeds - 1} per lr ('>S': not reached within a cap of S steps)",
        "",
        "| B | best lr | steps | ms/step | time to target s | / best | steps per lr |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for b in sorted(table):
        lr, steps = best.get(b, (math.nan, math.inf))
        row = table[b]
        grid = ", ".join(
            f"{lr_text}: {steps_cell(row[lr_text], steps, lr_text, cache['cells'], b, task.seeds)}"
            for lr_text in sorted(row, key=float)
        )
        if str(b) in cache["step_time"]:
            ms = 1e3 * cache["step_time"][str(b)]["seconds"]
            seconds = time_to_target(cache, b, steps)
            timing = f"{ms:.3f} | {seconds:.3f} | {seconds / best_time:.2f}"
        else:
            timing = "- | - | -"
        if math.isinf(steps):
            timing = timing.rsplit("|", 2)[0] + "| never | inf"
        lines.append(f"| {b} | {lr:g} | {steps:.0f} | {timing} | {grid} |")
    grid_sizes = [b for b in sorted(best) if b in batch_sizes(task, 10**9)]
    slope = lr_slope(best, grid_sizes)
    doubling = [
        f"{best[b2][0] / best[b1][0]:g}"
        for b1, b2 in zip(grid_sizes, grid_sizes[1:], strict=False)
        if b2 == 2 * b1
    ]
    cpu_s = sum(r["seconds"] for t in ("cells", "recommended_runs") for r in cache[t].values())
    lines += [
        "",
        f"Best lr as B doubles: x{', x'.join(doubling)}; log-log slope {slope:.2f} "
        "(0 flat, 0.5 sqrt, 1 linear). Oracle training runs: "
        f"{len(cache['cells'])} cells, {cpu_s / 60:.1f} min of wall time (1 thread each; "
        "longer on a shared machine).",
    ]
    return lines


def oracle_summary(task: QualityTask, cache: dict) -> dict:
    """The oracle's answer per batch size, for summary.json."""
    best = best_per_batch(cache, task.seeds)
    timed = {b for b in best if str(b) in cache["step_time"]}
    best_s = best_overall(cache, task.seeds)[2] if timed else math.nan
    per_batch = []
    for b in sorted(best):
        lr, steps = best[b]
        row = {"batch_size": b, "best_lr": lr, "mean_steps": steps}
        if b in timed:
            seconds = time_to_target(cache, b, steps)
            row |= {
                "step_ms": 1e3 * cache["step_time"][str(b)]["seconds"],
                "time_to_target_s": seconds,
                "relative_time": seconds / best_s,
            }
        per_batch.append(row)
    grid_sizes = [b for b in sorted(best) if b in batch_sizes(task, 10**9)]
    return {
        "kind": task.kind,
        "target": {"metric": task.metric, "value": task.target},
        "seeds": task.seeds,
        "per_batch": per_batch,
        "best_lr_log_log_slope": lr_slope(best, grid_sizes),
        "oracle_wall_minutes": sum(r["seconds"] for r in cache["cells"].values()) / 60,
    }


def judge(task: QualityTask, cache: dict, n: int) -> list[dict]:
    """The ratios of every cached tune answer (see the module docstring)."""
    best_b, best_lr, best_s = best_overall(cache, task.seeds)
    best = best_per_batch(cache, task.seeds)
    recommended = lr_table(cache, task.seeds, "recommended_runs")
    rows = []
    for i, answer in enumerate(cache["tune"], 1):
        b, lr = min(int(answer["batch_size"]), n), float(answer["lr"])
        lr_at_b, steps_at_b = best.get(b, (math.nan, math.inf))
        steps_bl = recommended[b][lr_key(lr)]
        rows.append(
            {
                "task": task.name,
                "run": i,
                "target": f"val {task.metric} {task.target:g}",
                "best_batch_size": best_b,
                "best_lr": best_lr,
                "best_time_s": best_s,
                "ratio_b32": time_to_target(cache, 32, best[32][1]) / best_s,
                "recommended_batch_size": answer["batch_size"],
                "recommended_lr": lr,
                "best_lr_at_recommended_b": lr_at_b,
                "ratio_B": time_to_target(cache, b, steps_at_b) / best_s,
                "ratio_BL": time_to_target(cache, b, steps_bl) / best_s,
                "step_cap_at_recommended_b": max_steps(task, n, b),
                # when the target was not reached: the ratio it would have had at the cap
                "ratio_BL_at_least": time_to_target(cache, b, max_steps(task, n, b)) / best_s,
                "steps_at_recommended": steps_bl,
                "tune_wall_s": answer["wall_s"],
                "tune_loadavg_1min": answer["loadavg_1min"],
                "tune_b_simple": answer.get("b_simple"),
                "tune_lr_rule": answer.get("lr_rule"),
                "tune_provisional": answer.get("provisional"),
            }
        )
    return rows


def summary_table(rows: list[dict]) -> list[str]:
    """Markdown: one row per tune answer."""
    lines = [
        "| task | target | oracle best (B, lr) | best time s | B=32 / best | tune run | "
        "tune (B, lr) | tune wall s | load | best lr at tune's B | ratio_B | ratio_BL | goals |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ok = r["ratio_B"] <= GOAL_B and r["ratio_BL"] <= GOAL_BL
        ratio_bl = r["ratio_BL"]
        # not reached within the step cap: at least the ratio the cap itself would give
        bl_text = f">{r['ratio_BL_at_least']:.1f}" if math.isinf(ratio_bl) else f"{ratio_bl:.2f}"
        lines.append(
            f"| {r['task']} | {r['target']} | ({r['best_batch_size']}, {r['best_lr']:g}) | "
            f"{r['best_time_s']:.3f} | {r['ratio_b32']:.2f} | {r['run']} | "
            f"({r['recommended_batch_size']}, {r['recommended_lr']:.3g}) | "
            f"{r['tune_wall_s']:.0f} | {r['tune_loadavg_1min'][0]:.1f} | "
            f"{r['best_lr_at_recommended_b']:g} | {r['ratio_B']:.2f} | "
            f"{bl_text} | "
            f"{'met' if ok else 'missed'} |"
        )
    return lines


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", help="comma-separated task names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the tasks and exit")
    parser.add_argument(
        "--retime",
        action="store_true",
        help="time every batch size again (best on a quiet machine); the fastest round over "
        "this and earlier passes counts",
    )
    parser.add_argument("--skip-tune", action="store_true", help="the oracle only")
    parser.add_argument("--tune-runs", type=int, default=1, help="batchfit tune answers per task")
    parser.add_argument(
        "--fresh-tune",
        action="store_true",
        help="run tune again (the cached answers move to the task's tune_history)",
    )
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def oracle_phase(task: QualityTask, args: argparse.Namespace) -> None:
    """The lr search at every batch size, then the step times (what is missing, or all with
    ``--retime``)."""
    arrays = Arrays(task)
    cache = load_cache(task)
    sizes = batch_sizes(task, arrays.n)
    started = time.perf_counter()
    oracle(task, arrays, cache, sizes, log)
    log(f"{task.name}: oracle complete ({time.perf_counter() - started:.0f} s this run)")
    timed = sorted(set(sizes) | set(best_per_batch(cache, task.seeds)))
    retime(task, arrays, cache, timed, args.retime, log)


def tune_phase(task: QualityTask, args: argparse.Namespace) -> None:
    """Collect ``--tune-runs`` answers of `batchfit tune` (cached ones count)."""
    cache = load_cache(task)
    if args.fresh_tune:  # the old answers stay in the record, judged runs and all
        cache.setdefault("tune_history", []).extend(cache["tune"])
        cache["tune"] = []
    while len(cache["tune"]) < args.tune_runs:
        log(f"{task.name}: batchfit tune, run {len(cache['tune']) + 1}")
        cache["tune"].append(run_tune(task))
        save_cache(task, cache)
        answer = cache["tune"][-1]
        log(
            f"  -> B={answer['batch_size']}, lr {answer['lr']:.3g} ({answer['lr_rule']}); "
            f"{answer['wall_s']} s, load {answer['loadavg_1min']}"
        )


def judge_phase(task: QualityTask, args: argparse.Namespace) -> tuple[list[str], list[dict], dict]:
    """Train at each tune answer (and search its B if needed); the oracle table, the judged
    rows and the oracle's summary."""
    arrays = Arrays(task)
    cache = load_cache(task)
    rows: list[dict] = []
    if not args.skip_tune:
        judge_answers(task, arrays, cache, log)
        rows = judge(task, cache, arrays.n)[: args.tune_runs]
    return oracle_table(task, cache), rows, oracle_summary(task, cache)


def chosen_tasks(args: argparse.Namespace, tasks: dict[str, QualityTask]) -> list[str]:
    """The names ``--tasks`` asks for (default: all of ``tasks``); with ``--list`` the tasks are
    printed and none is chosen; an unknown name exits with one line."""
    if args.list:
        for task in tasks.values():
            print(f"{task.name:<14} {task.kind}; target val {task.metric} {task.target:g}")
        return []
    names = args.tasks.split(",") if args.tasks else list(tasks)
    unknown = [n for n in names if n not in tasks]
    if unknown:
        sys.exit(f"unknown task(s) {unknown}; --list shows them")
    return names


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    names = chosen_tasks(args, TASKS)
    if not names:
        return
    torch.set_num_threads(1)  # training runs; step times switch to the default count
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, default {DEFAULT_THREADS} threads "
        f"(training runs: 1), load average now {os.getloadavg()[0]:.2f}"
    )
    tasks = [TASKS[name] for name in names]
    for task in tasks:
        oracle_phase(task, args)
    if not args.skip_tune:  # all tune runs together, with no training run beside them
        for task in tasks:
            tune_phase(task, args)
    rows: list[dict] = []
    oracles: dict[str, dict] = {}
    for task in tasks:
        table, task_rows, oracles[task.name] = judge_phase(task, args)
        rows += task_rows
        print()
        print("\n".join(table))
    if rows:
        print()
        print("\n".join(summary_table(rows)))
        print()
        print(f"Goals: ratio_B <= {GOAL_B}, ratio_BL <= {GOAL_BL} on every task.")
        summary = {
            "command": f"python {' '.join(sys.argv)}",
            "torch": torch.__version__,
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "goals": {"ratio_B": GOAL_B, "ratio_BL": GOAL_BL},
            "rows": rows,
            "oracle": oracles,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "summary.json").write_text(json.dumps(_json_safe(summary), indent=1) + "\n")


if __name__ == "__main__":
    main()

"""The long-horizon oracle: is tune's answer right for a run of minutes, and does a growing batch
(``--adaptive``) beat the best fixed one there?

Every task of ``recommend_quality.py`` reaches its target in under a second at its best fixed
(B, lr), so the race's own short runs are the oracle in miniature. The tasks here
(``LONG_TASKS`` in ``quality_tasks/tasks.py``: a regression close to its noise floor, a 1-D CNN
to a demanding accuracy, a character model on 200,000 windows) take minutes at their best.

Protocol (that of ``recommend_quality.py``, whose code this reuses: the same independent PyTorch
loop, Adam at a constant lr, lr grid 1e-3 x 2^k, 2 seeds, steps to target interpolated, step times
measured with torch's default threads and training runs on 1 thread), with two changes that keep
the oracle within a couple of hours on 2 cores:

- step times are measured first, and every run at a batch size B is capped at the steps it may
  take before it is TIME_PRUNE x slower than the best time to target found so far at any size,
  and at TIME_PRUNE x the best steps found at its own size (not 3x: these runs are long)
  (a size none of whose first three learning rates beats that is out of the running: its
  time is reported as "> TIME_PRUNE x");
- the search starts at the task's ``first_batch``, walks up to the largest size, then down from
  it, each size starting from the nearest searched size's best lr scaled by the square root of
  the batch ratio, so the slow extremes are pruned against a good time found early.

Then, for each task:

- **tune**: ``batchfit tune --epochs E`` at its default budget, E the task's ``planned_epochs``
  (the run a user would plan), judged as ``recommend_quality.py`` judges: ratio_B (the oracle's
  best time at B_rec over the best overall) and ratio_BL (real runs at exactly (B_rec, lr_rec),
  capped at RUN_CAP x the best time); and (tune's wall seconds + training at its answer) / the
  best fixed configuration's training alone;
- **schedule**: ``batchfit.train(adaptive=True)`` from a quarter of the best fixed batch (the best
  lr scaled to it by the square root rule), growing with the measured noise scale, and the best
  fixed (B, lr) through the same ``batchfit.train`` loop, both stopped at the target; their time
  is their steps priced at the oracle's quiet step times (sizes between the measured powers of
  two interpolated log-log), so the ratio compares schedules, not machine load.

Goals (issue 21): ratio_B <= 1.15, ratio_BL <= 1.25, (tune + training) / best <= 1.3, and the
schedule at most 0.85x the best fixed time on half of the tasks, never over 1.05x.

Everything is cached in ``benchmarks/results/long_horizon/<task>.json``; a rerun (or a run
killed midway) resumes from what is there:

    python benchmarks/long_horizon.py --list
    python benchmarks/long_horizon.py --skip-tune --skip-schedule   # 1. the oracle
    python benchmarks/long_horizon.py --retime --searched-only --skip-tune --skip-schedule
    python benchmarks/long_horizon.py --tune-only                   # 2. tune, quiet machine
    python benchmarks/long_horizon.py                               # 3. judged; the schedule

Each task can run in its own process (``--tasks NAME``) for steps 1 and 3; step 2 and
``--retime`` want the machine to themselves. ``--searched-only`` judges against the sizes
searched so far, and the summary names the ones still missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import recommend_quality as rq  # noqa: E402
from quality_tasks import models as task_models  # noqa: E402
from quality_tasks.tasks import LONG_TASKS, QualityTask  # noqa: E402

RESULTS = BENCH / "results" / "long_horizon"
TIME_PRUNE = 1.5  # a search run stops once it is this many times slower than the best found
RUN_CAP = 3.0  # a judged run at tune's (B, lr) stops at this many times the best time
SEEDS = (0, 1)
GOAL_B, GOAL_BL, GOAL_TOTAL = 1.15, 1.25, 1.3
GOAL_SCHEDULE_WIN, GOAL_SCHEDULE_NEVER = 0.85, 1.05


# ----------------------------------------------------------------------------- oracle


def search_order(task: QualityTask, sizes: list[int]) -> list[int]:
    """``sizes`` from the task's ``first_batch`` up, then down from it: on a long run the best
    batch is seldom small (the critical batch grows as the loss falls), so the sizes above are
    searched first and the slower small ones pruned against their best time.

    >>> from quality_tasks.tasks import LONG_TASKS
    >>> search_order(LONG_TASKS["mnist1d_long"], [32, 64, 128, 256, 512, 1024, 2048, 4096])
    [512, 1024, 2048, 4096, 256, 128, 64, 32]
    """
    start = task.first_batch if task.first_batch in sizes else sizes[0]
    i = sizes.index(start)
    return sizes[i:] + sizes[:i][::-1]


def best_time(cache: dict, seeds: int) -> float:
    """The best time to target found so far over every searched size (inf: none yet)."""
    times = [
        rq.time_to_target(cache, b, steps)
        for b, (_, steps) in rq.best_per_batch(cache, seeds).items()
        if str(b) in cache["step_time"]
    ]
    return min(times, default=math.inf)


def step_seconds(cache: dict, batch_size: int) -> float:
    """The quiet step time of ``batch_size``: measured, or interpolated log-log between the
    measured sizes around it (the adaptive batch takes sizes between the powers of two)."""
    measured = {int(b): t["seconds"] for b, t in cache["step_time"].items()}
    if batch_size in measured:
        return measured[batch_size]
    sizes = sorted(measured)
    x = np.log(sizes)
    y = np.log([measured[b] for b in sizes])
    return float(np.exp(np.interp(math.log(batch_size), x, y)))


def start_lr(task: QualityTask, cache: dict, batch_size: int) -> float:
    """The nearest searched size's best lr, scaled by sqrt(batch ratio); the task's first lr
    before any size is searched."""
    best = rq.best_per_batch(cache, task.seeds)
    if not best:
        return task.first_lr
    near = min(best, key=lambda b: abs(math.log2(b / batch_size)))
    return best[near][0] * math.sqrt(batch_size / near)


def time_cap(cache: dict, task: QualityTask, batch_size: int, factor: float) -> int | None:
    """The steps ``batch_size`` may take before it is ``factor`` x the best time (None: no best
    time yet)."""
    best = best_time(cache, task.seeds)
    if math.isinf(best):
        return None
    return max(1, math.ceil(factor * best / step_seconds(cache, batch_size)))


def oracle(task: QualityTask, arrays: rq.Arrays, cache: dict, sizes: list[int]) -> None:
    """Step times first, then the lr search at every size in :func:`search_order`, each run
    capped at TIME_PRUNE x the best time found so far."""
    rq.retime(task, arrays, cache, sizes, False, rq.log)
    runner = rq.Runner(task, arrays, cache, rq.log, prune=TIME_PRUNE)
    pruned = cache.setdefault("pruned", {})
    for b in search_order(task, sizes):
        cap = time_cap(cache, task, b, TIME_PRUNE)
        started = time.perf_counter()
        lr, steps = runner.search(b, start_lr(task, cache, b), required=cap is None, step_cap=cap)
        seconds = time.perf_counter() - started
        if math.isinf(steps):
            pruned[str(b)] = cap
            rq.log(f"{task.name} B={b}: slower than {TIME_PRUNE}x the best at every lr tried")
        else:
            pruned.pop(str(b), None)
            rq.log(f"{task.name} B={b}: best lr {lr:g}, {steps:.0f} steps ({seconds:.0f} s)")
        rq.save_cache(task, cache)


# ----------------------------------------------------------------------------- tune, judged


def tune_answer(task: QualityTask, cache: dict) -> dict:
    """tune's answer for the planned run (cached: one per task)."""
    if not cache.get("tune"):
        rq.log(f"{task.name}: batchfit tune --epochs {task.planned_epochs}")
        cache["tune"] = [rq.run_tune(task, extra=("--epochs", str(task.planned_epochs)))]
        rq.save_cache(task, cache)
    return cache["tune"][0]


def judge_tune(task: QualityTask, arrays: rq.Arrays, cache: dict) -> dict:
    """ratio_B, ratio_BL and (tune + training) / best for tune's answer."""
    answer = tune_answer(task, cache)
    b, lr = min(int(answer["batch_size"]), arrays.n), float(answer["lr"])
    runner = rq.Runner(task, arrays, cache, rq.log, prune=TIME_PRUNE)
    if str(b) not in cache["step_time"]:
        rq.retime(task, arrays, cache, [b], False, rq.log)
    searched = rq.lr_table(cache, task.seeds)
    if b not in searched:
        rq.log(f"{task.name}: searching the lr grid at tune's B={b}")
        cap = time_cap(cache, task, b, TIME_PRUNE)
        runner.search(b, start_lr(task, cache, b), required=False, step_cap=cap)
    best = rq.best_per_batch(cache, task.seeds)
    best_s = best_time(cache, task.seeds)
    cap = time_cap(cache, task, b, RUN_CAP)
    steps_bl = runner.mean_steps("recommended_runs", b, lr, cap or rq.max_steps(task, arrays.n, b))
    at_b = rq.time_to_target(cache, b, best[b][1]) if b in best else math.inf
    at_bl = rq.time_to_target(cache, b, steps_bl)
    return {
        "answer": {k: answer[k] for k in ("batch_size", "lr", "lr_rule", "wall_s", "provisional")},
        "decision": answer.get("decision"),
        "ratio_B": at_b / best_s,
        "ratio_BL": at_bl / best_s,
        "tune_plus_training_over_best": (answer["wall_s"] + at_bl) / best_s,
        "best_lr_at_b": best.get(b, (math.nan, math.inf))[0],
    }


# ----------------------------------------------------------------------------- schedule


def train_run(task: QualityTask, arrays: rq.Arrays, seed: int, **options) -> dict:
    """One ``batchfit.train`` run stopped at the target: its steps, per-step batch sizes (as
    changes) and reached or not."""
    import batchfit

    key = "val_loss" if task.metric == "mse" else "val_accuracy"
    values: list[float] = []
    hits: list[dict] = []

    def at_target(record: dict) -> bool:  # smoothed as the oracle smooths its curve
        values.append(record[key])
        if rq.reached(task, rq.smoothed(task, values)):
            hits.append(record)
            return True
        return False

    torch.manual_seed(seed)
    model = getattr(task_models, task.model)()
    result = batchfit.train(
        model,
        (arrays.x, arrays.y),
        val_data=(arrays.xv, arrays.yv),
        loss=task.loss,
        on_eval=at_target,
        optimizer="adam",
        epochs=task.max_epochs,
        seed=seed,
        device="cpu",
        progress=False,
        **options,
    )
    hit = hits[0] if hits else None
    adaptive = result.adaptive or {}
    return {
        "reached": hit is not None,
        "steps": hit["step"] if hit else None,
        "samples": hit["samples_seen"] if hit else None,
        "micro_batch_size": result.micro_batch_size,
        "start_batch_size": options["batch_size"],
        "changes": [{k: c[k] for k in ("step", "from", "to")} for c in adaptive.get("changes", [])],
        "b_noise_end": adaptive.get("b_noise"),
    }


def priced_seconds(cache: dict, run: dict) -> float:
    """A run's steps to target priced at the quiet step times; a step above the micro-batch
    costs its micro-batches."""
    if not run["reached"]:
        return math.inf
    micro = run["micro_batch_size"]
    start = run["start_batch_size"]
    bounds = [(0, start)] + [(c["step"], c["to"]) for c in run["changes"]] + [(run["steps"], 0)]
    total = 0.0
    for (begin, size), (end, _) in zip(bounds, bounds[1:], strict=False):
        chunks = math.ceil(size / micro)
        per_step = chunks * step_seconds(cache, math.ceil(size / chunks))
        total += max(0, min(end, run["steps"]) - begin) * per_step
    return total


def schedule(task: QualityTask, arrays: rq.Arrays, cache: dict) -> dict:
    """The adaptive arm and the best fixed (B, lr) through the same loop, per seed (cached)."""
    best_b, best_lr, _ = rq.best_overall(cache, task.seeds)
    start = max(task.extra.get("smallest_batch", rq.SMALLEST_BATCH), best_b // 4)
    arms = {
        "fixed_best": dict(batch_size=best_b, lr=best_lr, eval_every=task.extra["eval_every"]),
        "adaptive": dict(
            batch_size=start,
            lr=best_lr * math.sqrt(start / best_b),
            adaptive=True,
            max_batch_size=task.max_batch_size,
            micro_batch_size=task.max_batch_size,  # growing needs no accumulation
            eval_every=task.extra["eval_every"],
        ),
    }
    runs = cache.setdefault("schedule", {})
    for arm, options in arms.items():
        for seed in SEEDS:
            key = f"{arm}|{seed}|{options['batch_size']}|{rq.lr_key(options['lr'])}"
            if key not in runs:
                started = time.perf_counter()
                runs[key] = train_run(task, arrays, seed, **options)
                runs[key]["wall_s"] = round(time.perf_counter() - started, 1)
                rq.save_cache(task, cache)
                rq.log(f"  {task.name} {key}: {runs[key]}")
    out = {}
    for arm, options in arms.items():
        keys = [f"{arm}|{s}|{options['batch_size']}|{rq.lr_key(options['lr'])}" for s in SEEDS]
        seconds = [priced_seconds(cache, runs[k]) for k in keys]
        out[arm] = {
            "seconds": sum(seconds) / len(seconds),
            "start": options["batch_size"],
            "lr": options["lr"],
            "ends": sorted(
                {(runs[k]["changes"] or [{"to": options["batch_size"]}])[-1]["to"] for k in keys}
            ),
        }
    out["ratio"] = out["adaptive"]["seconds"] / out["fixed_best"]["seconds"]
    return out


# ----------------------------------------------------------------------------- main


def summary_lines(task: QualityTask, cache: dict, judged: dict | None, sched: dict | None):
    best_b, best_lr, best_s = rq.best_overall(cache, task.seeds)
    lines = rq.oracle_table(task, cache)
    pruned = cache.get("pruned", {})
    searched = set(rq.lr_table(cache, task.seeds)) | {int(b) for b in pruned}
    missing = [b for b in rq.batch_sizes(task, 10**9) if b not in searched]
    if missing:
        lines.append(f"Not searched yet (the oracle is partial): B={', '.join(map(str, missing))}.")
    if pruned:
        lines.append(
            f"Out of the running (slower than {TIME_PRUNE}x at every lr tried): "
            f"B={', '.join(sorted(pruned, key=int))}."
        )
    lines.append(
        f"Best fixed: B={best_b}, lr {best_lr:g}, {best_s:.1f} s to target "
        f"(planned run: {task.planned_epochs} epochs)."
    )
    if judged:
        a = judged["answer"]
        lines.append(
            f"tune --epochs {task.planned_epochs}: B={a['batch_size']}, lr {a['lr']:.3g} "
            f"({a['lr_rule']}), {a['wall_s']:.0f} s; ratio_B {judged['ratio_B']:.2f}, ratio_BL "
            f"{judged['ratio_BL']:.2f}, (tune + training) / best "
            f"{judged['tune_plus_training_over_best']:.2f}"
        )
    if sched:
        lines.append(
            f"schedule: adaptive from B={sched['adaptive']['start']} (ends at "
            f"{sched['adaptive']['ends']}): {sched['adaptive']['seconds']:.1f} s, fixed best "
            f"through batchfit.train {sched['fixed_best']['seconds']:.1f} s: ratio "
            f"{sched['ratio']:.2f}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", help="comma-separated task names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the tasks and exit")
    parser.add_argument("--retime", action="store_true", help="time every batch size again")
    parser.add_argument("--skip-tune", action="store_true")
    parser.add_argument("--skip-schedule", action="store_true")
    parser.add_argument(
        "--tune-only",
        action="store_true",
        help="only collect tune's answers (one task after another, nothing else running), so "
        "that the judging can then run the tasks side by side",
    )
    parser.add_argument(
        "--searched-only",
        action="store_true",
        help="judge against the sizes searched so far (the summary names the ones not searched)",
    )
    args = parser.parse_args(argv)
    names = rq.chosen_tasks(args, LONG_TASKS)
    if not names:
        return
    torch.set_num_threads(1)
    print(f"command: python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    summary = {}
    for name in names:
        task = LONG_TASKS[name]
        arrays, cache = rq.Arrays(task), rq.load_cache(task)
        sizes = rq.batch_sizes(task, arrays.n)
        if args.retime:
            rq.retime(task, arrays, cache, sizes, True, rq.log)
        if args.tune_only:
            tune_answer(task, cache)
            continue
        if not args.searched_only:
            oracle(task, arrays, cache, sizes)
        judged = None if args.skip_tune else judge_tune(task, arrays, cache)
        sched = None if args.skip_schedule else schedule(task, arrays, cache)
        rq.save_cache(task, cache)
        lines = summary_lines(task, cache, judged, sched)
        print("\n" + "\n".join(lines))
        summary[name] = {"lines": lines, "tune": judged, "schedule": sched}
    if args.tune_only:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("summary.json" if not args.tasks else f"summary-{args.tasks}.json")
    path.write_text(json.dumps(rq._json_safe(summary), indent=1) + "\n")


if __name__ == "__main__":
    main()

"""The horizon on short runs: `batchfit tune --epochs E` on the tasks of `recommend_quality.py`,
where E is what the oracle's best (B, lr) needs to reach the task's target.

Every task of that benchmark trains to its target in well under a second at its best fixed
(B, lr), while tune's default budget is a minute: tuning cannot pay for itself there. Told the
run's length, tune should see that after its throughput phase, end early with its cheap answer
(the throughput-based batch size and a range-test lr) and say so. This script measures, per task:

- whether tune ended early, and its wall seconds (against the default run's, cached by
  `recommend_quality.py`);
- ratio_B and ratio_BL of the cheap answer, judged exactly as `recommend_quality.py` judges
  (real runs at exactly (B_rec, lr_rec) with the task's seeds), beside the default answer's;
- (tune + training at the answer) / the best training alone: the issue's "tuning plus training
  within 1.3x the best configuration's training".

It reads the oracle from `benchmarks/results/recommend_quality/` (never recomputed here: the
runs at a new (B, lr) it needs are added to that cache, as `recommend_quality.py` would) and
caches its own answers in `benchmarks/results/horizon_short/`, so a rerun only judges.

    python benchmarks/horizon_short.py                 # every task with an oracle cache
    python benchmarks/horizon_short.py --tasks digits_mlp --fresh
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import recommend_quality as rq  # noqa: E402
from quality_tasks.tasks import TASKS  # noqa: E402

RESULTS = BENCH / "results" / "horizon_short"


def planned_epochs(task, cache: dict, n: int) -> int:
    """The epochs the oracle's best (B, lr) takes to the target, rounded up: the length a user
    who knew the best configuration would plan."""
    best_b, _, _ = rq.best_overall(cache, task.seeds)
    steps = rq.best_per_batch(cache, task.seeds)[best_b][1]
    return max(1, math.ceil(steps * best_b / n))


def ended_early(answer: dict) -> bool:
    """Whether tune said the run was too short to repay tuning (its decision says so)."""
    return any("cannot pay for itself" in line for line in answer["decision"])


def judged(task, arrays, cache: dict, answer: dict) -> dict:
    """``recommend_quality.judge``'s row for ``answer``, its real runs added to the oracle cache."""
    own = cache["tune"]
    cache["tune"] = [answer]
    try:
        rq.judge_answers(task, arrays, cache, rq.log)
        row = rq.judge(task, cache, arrays.n)[0]
    finally:
        cache["tune"] = own
    rq.save_cache(task, cache)
    return row


def default_row(name: str) -> dict | None:
    """The default tune's first judged answer on the task (recommend_quality's summary)."""
    summary = BENCH / "results" / "recommend_quality" / "summary.json"
    rows = json.loads(summary.read_text())["rows"] if summary.exists() else []
    return next((r for r in rows if r["task"] == name), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", help="comma-separated task names (default: every cached one)")
    parser.add_argument("--fresh", action="store_true", help="run tune again")
    args = parser.parse_args(argv)
    names = (
        args.tasks.split(",")
        if args.tasks
        else [t for t in TASKS if rq.cache_path(TASKS[t]).exists()]
    )
    torch.set_num_threads(1)  # the judged training runs, as recommend_quality.py trains them
    print(f"command: python {' '.join(sys.argv)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        task = TASKS[name]
        arrays, cache = rq.Arrays(task), rq.load_cache(task)
        epochs = planned_epochs(task, cache, arrays.n)
        path = RESULTS / f"{name}.json"
        saved = None if args.fresh or not path.exists() else json.loads(path.read_text())
        answer = saved["answer"] if saved else rq.run_tune(task, extra=("--epochs", str(epochs)))
        row = judged(task, arrays, cache, answer)
        best_s = row["best_time_s"]
        result = {
            "task": name,
            "epochs": epochs,
            "ended_early": ended_early(answer),
            "answer": answer,
            "row": row,
            "tune_plus_training_over_best": (answer["wall_s"] + row["ratio_BL"] * best_s) / best_s,
        }
        path.write_text(json.dumps(rq._json_safe(result), indent=1) + "\n")
        rows.append((result, default_row(name)))
    print(
        f"{'task':<11} {'E':>4} {'early':>5} {'wall':>6} {'B':>5} {'lr':>8} {'rB':>5} {'rBL':>5} "
        f"{'(tune+train)/best':>17} | default: {'wall':>6} {'B':>5} {'rB':>5} {'rBL':>5}"
    )
    for result, default in rows:
        r, a = result["row"], result["answer"]
        d = default or {}
        print(
            f"{result['task']:<11} {result['epochs']:>4} {str(result['ended_early']):>5} "
            f"{a['wall_s']:>6.1f} {a['batch_size']:>5} {a['lr']:>8.3g} {r['ratio_B']:>5.2f} "
            f"{r['ratio_BL']:>5.2f} {result['tune_plus_training_over_best']:>17.0f} | "
            f"{d.get('tune_wall_s', math.nan):>14.1f} {d.get('recommended_batch_size', '-'):>5} "
            f"{d.get('ratio_B', math.nan):>5.2f} {d.get('ratio_BL', math.nan):>5.2f}"
        )
    within = sum(
        1 for res, _ in rows if res["row"]["ratio_B"] <= 1.15 and res["row"]["ratio_BL"] <= 1.25
    )
    early = sum(res["ended_early"] for res, _ in rows)
    print(
        f"{within} of {len(rows)} cheap answers within both goals (ratio_B <= 1.15, "
        f"ratio_BL <= 1.25); {early} of {len(rows)} ended early."
    )
    (RESULTS / "summary.json").write_text(
        json.dumps(rq._json_safe([res for res, _ in rows]), indent=1) + "\n"
    )


if __name__ == "__main__":
    main()

"""Repeatability: run `batchfit tune` several times on the same task and print the spread.

A user who runs tune twice on the same model and data should get answers that agree: each run's
batch size inside every other run's stated range (``recommended.batch_size_range``, the sizes its
race found equally good), and the learning rates within 1.5x of each other. This script runs
`batchfit tune --json` as a user runs it (default budget, Adam, the same ``--seed``), ``--runs``
times per task, on the tasks of ``benchmarks/quality_tasks`` (the digits MLP and CNN on 1,400
training images among them), and prints per task:

- the batch sizes and their stated ranges, and whether every B lies in every range;
- the learning rates, their max/min ratio, and whether it is at most 1.5;
- whether each run raced (an answer without a race is provisional) and its wall time.

Answers are cached in ``benchmarks/results/repeatability/<task>.json`` (a rerun adds only the
runs missing; ``--fresh`` starts again). Run it on a quiet machine: tune times its trials, and a
busy CPU changes what it measures.

    python benchmarks/repeatability.py                          # 4 tasks x 5 runs (~20 min)
    python benchmarks/repeatability.py --tasks digits_mlp --runs 3
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from quality_tasks.tasks import TASKS  # noqa: E402
from recommend_quality import run_tune  # noqa: E402

RESULTS = BENCH / "results" / "repeatability"
DEFAULT_TASKS = ("digits_mlp", "digits_cnn", "mnist1d", "friedman")
#: Goal: the learning rates of repeated runs within this factor of each other.
LR_SPREAD_GOAL = 1.5


def agreement(answers: list[dict]) -> dict:
    """How far repeated answers agree: every batch size inside every stated range, and the
    spread of the learning rates.

    >>> a = [{"batch_size": 64, "batch_size_range": [32, 128], "lr": 1e-3},
    ...      {"batch_size": 128, "batch_size_range": [64, 128], "lr": 1.4e-3}]
    >>> agreement(a)["b_inside_every_range"], round(agreement(a)["lr_spread"], 2)
    (True, 1.4)
    >>> agreement(a + [{"batch_size": 512, "batch_size_range": [512, 512], "lr": 1e-3}])[
    ...     "b_inside_every_range"]
    False
    """
    sizes = [a["batch_size"] for a in answers]
    ranges = [a.get("batch_size_range") or [a["batch_size"]] * 2 for a in answers]
    inside = all(low <= b <= high for b in sizes for low, high in ranges)
    lrs = [a["lr"] for a in answers]
    spread = max(lrs) / min(lrs) if min(lrs) > 0 else math.inf
    return {
        "batch_sizes": sizes,
        "ranges": ranges,
        "b_inside_every_range": inside,
        "lrs": lrs,
        "lr_spread": spread,
        "lr_within_goal": spread <= LR_SPREAD_GOAL,
        "raced": [a.get("raced") for a in answers],
        "wall_s": [a.get("wall_s") for a in answers],
    }


def load(name: str) -> list[dict]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text())["runs"] if path.exists() else []


def save(name: str, runs: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"runs": runs}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fresh", action="store_true", help="forget cached answers")
    args = parser.parse_args(argv)
    print(f"command: python {' '.join(sys.argv)}")
    met = []
    for name in args.tasks.split(","):
        if name not in TASKS:
            sys.exit(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
        runs = [] if args.fresh else load(name)
        while len(runs) < args.runs:
            print(f"{name}: tune run {len(runs) + 1} of {args.runs}", file=sys.stderr, flush=True)
            runs.append(run_tune(TASKS[name], extra=("--seed", "0")))
            save(name, runs)
        got = agreement(runs[: args.runs])
        met.append(got["b_inside_every_range"] and got["lr_within_goal"])
        print(
            f"{name:<11} B {got['batch_sizes']} ranges {got['ranges']} -> every B in every "
            f"range: {got['b_inside_every_range']}; lr "
            f"{[float(f'{x:.3g}') for x in got['lrs']]} spread {got['lr_spread']:.2f}x "
            f"(goal <= {LR_SPREAD_GOAL}); raced {got['raced']}; wall {got['wall_s']} s"
        )
    print(f"{sum(met)} of {len(met)} tasks repeatable (B in every range and lr within goal).")


if __name__ == "__main__":
    main()

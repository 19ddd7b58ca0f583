"""`--adaptive` against the fixed batch `tune` recommends: time and examples to a validation target.

For each task (the built-in MNIST-1D and two of ``benchmarks/quality_tasks``: digits MLP and
Friedman regression) and each seed (0, 1, 2), two `batchfit.train` runs start from the same batch
size and Adam learning rate, the answer `batchfit tune` gave on this machine (cached by
``benchmarks/recommend_quality.py`` in ``results/recommend_quality/<task>.json``):

- fixed: that batch size and lr throughout;
- adaptive: ``adaptive=True`` from there (the batch follows the noise scale, lr by the sqrt rule).

Both validate every ``--eval-every`` steps (not counted in training time) and stop at the task's
target; time to target is the run's training seconds at that evaluation, examples the samples
seen. The ratio adaptive / fixed is printed per task (mean over seeds) and overall (geometric
mean). A run that misses the target within the task's ``max_epochs`` counts as infinite.

Overhead: samples/s of ``adaptive=True, adapt_every`` beyond the run (the noise is measured every
step, the batch never changes) over plain training, same B, same steps, alternating order, best of
``--rounds``. Target < 3%.

    python benchmarks/adaptive.py                     # all, cached per task and seed
    python benchmarks/adaptive.py --tasks mnist1d --fresh

Results go to ``benchmarks/results/adaptive/<task>.json`` and ``overhead.json``; a rerun computes
only what is missing. Training uses 1 torch thread (deterministic, leaves a core free).
"""

from __future__ import annotations

import argparse
import json
import math
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


def run_to_target(name: str, seed: int, adaptive: bool, eval_every: int, adapt_every: int) -> dict:
    """One training run stopped at the task's target; what it took, and its batch sizes."""
    task = TASKS[name]
    x, y, xv, yv = tensors(name)
    batch_size, lr = tuned_answer(name)
    key = "val_loss" if task.metric == "mse" else "val_accuracy"

    def at_target(record: dict) -> bool:
        value = record[key]
        return value <= task.target if task.metric == "mse" else value >= task.target

    torch.manual_seed(seed)
    model = getattr(task_models, task.model)()
    options = dict(adaptive=True, adapt_every=adapt_every) if adaptive else {}
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
    """Both runs per seed, cached in results/adaptive/<task>.json."""
    path = RESULTS / f"{name}.json"
    cache = {} if args.fresh else load(path)
    for seed in SEEDS:
        for mode in ("fixed", "adaptive"):
            key = f"{mode}/{seed}"
            if key not in cache:
                cache[key] = run_to_target(
                    name, seed, mode == "adaptive", args.eval_every, args.adapt_every
                )
                cache["setup"] = {"eval_every": args.eval_every, "adapt_every": args.adapt_every}
                save(path, cache)
                print(
                    f"  {name} {key}: {cache[key]['seconds']:.3g} s, "
                    f"{cache[key]['examples']} examples, B -> {cache[key]['final_batch_size']}"
                )
    return cache


def ratios(cache: dict) -> tuple[float, float]:
    """Adaptive over fixed, mean time and mean examples over the seeds."""

    def mean(mode: str, what: str) -> float:
        return statistics.fmean(cache[f"{mode}/{s}"][what] for s in SEEDS)

    return (
        mean("adaptive", "seconds") / mean("fixed", "seconds"),
        mean("adaptive", "examples") / mean("fixed", "examples"),
    )


def samples_per_s(x, y, batch_size: int, micro: int | None, steps: int, adaptive: bool) -> float:
    torch.manual_seed(0)
    model = task_models.make_mnist1d_convnet()
    options = dict(adaptive=True, adapt_every=10**9) if adaptive else {}
    r = batchfit.train(
        model,
        (x, y),
        batch_size=batch_size,
        micro_batch_size=micro,
        max_steps=steps,
        device="cpu",
        **options,
    )
    return r.samples_per_s


def overhead_phase(args: argparse.Namespace) -> dict:
    """Throughput with the noise measured every step over plain training (MNIST-1D)."""
    x, y, _, _ = tensors("mnist1d")
    out = {}
    # tune's B (one micro-batch: split in halves), a small B (where the split's fixed cost shows)
    # and accumulation (the micro-batch gradients are computed anyway)
    for batch_size, micro in ((tuned_answer("mnist1d")[0], None), (32, None), (512, 128)):
        best = {"off": 0.0, "on": 0.0}
        for r in range(args.rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for mode in order:
                speed = samples_per_s(x, y, batch_size, micro, args.overhead_steps, mode == "on")
                best[mode] = max(best[mode], speed)
        name = f"B={batch_size}" + (f" micro={micro}" if micro else "")
        out[name] = {**best, "overhead": 1 - best["on"] / best["off"]}
        print(
            f"  overhead at {name}: {best['off']:.0f} -> {best['on']:.0f} samples/s "
            f"({out[name]['overhead']:+.1%})"
        )
    out["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save(RESULTS / "overhead.json", out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--adapt-every", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--overhead-steps", type=int, default=300)
    parser.add_argument("--fresh", action="store_true", help="ignore cached runs")
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["task         B_tune  lr_tune   time ratio  examples ratio  B at end (adaptive)"]
    logs = []
    for name in args.tasks.split(","):
        cache = task_phase(name, args)
        t, e = ratios(cache)
        logs.append((t, e))
        ends = sorted({cache[f"adaptive/{s}"]["final_batch_size"] for s in SEEDS})
        b, lr = tuned_answer(name)
        lines.append(f"{name:<12} {b:>6}  {lr:<8.4g} {t:>10.2f}  {e:>14.2f}  {ends}")
    geo = [math.exp(statistics.fmean(math.log(v[i]) for v in logs)) for i in (0, 1)]
    lines.append(f"{'geo. mean':<12} {'':>6}  {'':<8} {geo[0]:>10.2f}  {geo[1]:>14.2f}")
    print("\n".join(lines))
    if not args.skip_overhead:
        overhead_phase(args)


if __name__ == "__main__":
    main()

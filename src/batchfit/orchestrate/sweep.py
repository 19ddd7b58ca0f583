"""``batchfit sweep``: one short run per batch size, to see what each size does to the result.

Every run starts from the same initial weights and seed and sees the same data in the same order
(one data-loading setup, shared); only the batch size and the learning rate that goes with it
change. The budget is equal *examples* (``epochs`` or ``examples``: the question "what does the
same data buy at each size?") or equal *updates* (``steps``: "what does the same number of steps
buy?"). Per size the sweep records:

- a validation curve (``eval_points`` evaluations spread over the run, plus the initial weights),
  so the best and the final validation metric and the time to a target come from one curve;
- the training loss, and loss and accuracy on a fixed subset of the training set measured in eval
  mode exactly like validation, so the train-validation gap compares like with like;
- the sharpness of the weights reached: the top Hessian eigenvalue of the training loss on a
  fixed batch (:func:`batchfit.probe.sharpness.sharpness`);
- samples/s, training seconds (evaluation excluded) and where the run reached the target.

A run whose loss or weights become NaN or infinite is recorded as *diverged* (its curve up to
then, no sharpness) and the sweep goes on: finding the learning rate that is too high is what
``lr_grid`` is for. A size the model cannot train at (batch norm with a 1-sample micro-batch) is
skipped with a note in the verdict.

Each finished run, diverged ones included, is written atomically to ``out_dir/runs/`` as soon as it
ends, so an interrupted sweep continues with ``resume=True``: finished runs are read back (after
checking they were made with the same settings, initial weights and data: sha256 of the training
data, or of its fixed subset for a stream, and of the validation data), and a run that was cut off
midway starts again from the initial weights. Runs are short by design, and restarting keeps every
run a single uninterrupted one, so its timings stay clean; being deterministic, it produces the
same numbers it would have.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from batchfit.core.configs import SweepConfig
from batchfit.core.options import default_of
from batchfit.core.sweep_inputs import Target, auto_target, higher_is_better
from batchfit.core.sweep_records import SizeSummary, best_point, choose_lr, time_to_target
from batchfit.core.sweep_tune_check import Recommendation
from batchfit.core.sweep_verdict import Verdict, verdict
from batchfit.inputs import optimizer_options
from batchfit.losses import Loss
from batchfit.orchestrate.sweep_runs import RunPlan, RunsDone, plan_runs, run_all
from batchfit.orchestrate.sweep_setup import (
    DEFAULT_EPOCHS,
    SweepSetup,
    describe_budget,
    prepare,
)
from batchfit.orchestrate.sweep_signals import (
    signals_stop_the_sweep,
    stopped_after_runs,
    stopped_before_runs,
)
from batchfit.progress import TrainProgress
from batchfit.report.sweep_report import write_report
from batchfit.threads import thread_warning, torch_threads

DEFAULT_BATCH_SIZES = default_of("batch_sizes")
FORMAT_VERSION = 1

__all__ = ["DEFAULT_BATCH_SIZES", "DEFAULT_EPOCHS", "FORMAT_VERSION", "SweepResult", "sweep"]


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep. ``sizes`` has one summary per batch size (the chosen learning rate's
    run, with the ``lr_grid`` it was chosen from); ``runs`` every run (``in_sweep`` false for the
    extra run at tune's batch size and learning rate, ``for_tune`` true for the run tune is judged
    on); ``skipped`` the sizes that could not be run and why; ``verdict`` the answer.

    ``sizes`` and ``runs`` are the JSON-ready dicts that ``sweep.json``, the report and the
    verdict read (a run's keys are those of
    :class:`~batchfit.orchestrate.sweep_runs.SweepRun`, plus ``in_sweep`` and ``for_tune``)."""

    sizes: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    metric: str
    target: Target
    initial: dict[str, float]
    verdict: Verdict
    settings: dict[str, Any]
    timing: dict[str, float]
    files: dict[str, str]
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["target"] = self.target.to_dict()
        out["verdict"] = self.verdict.to_dict()
        return {"version": FORMAT_VERSION, **out}


def sweep(
    model: nn.Module,
    data: object,
    *,
    val_data: object,
    loss: str | Loss | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    config: SweepConfig | None = None,
    **options: Any,
) -> SweepResult:
    """Train one short run per batch size from ``model``'s current weights and compare them.

    ``data`` and ``val_data`` are as in :func:`batchfit.train` (validation data is required: the
    sweep compares validation results); ``loss`` is a name, a :class:`~batchfit.losses.Loss` or
    None (inferred from the target). ``on_run`` is called with each run's record as it finishes.
    The options (keywords, or a :class:`~batchfit.core.configs.SweepConfig` as ``config``):

    - ``batch_sizes``: the sizes, a list or ``"32,64,128,256"``; ``N`` is the whole training set.
    - ``epochs`` (default 40) or ``examples`` (equal examples: the same number of samples at
      every size, give or take one batch) or ``steps`` (equal updates): the budget per size.
    - ``optimizer``, ``momentum`` (SGD), ``weight_decay``: as in :func:`batchfit.train`.
    - ``lr`` (tuned at ``lr_batch_size``), scaled to each size by ``lr_scaling`` (``none``,
      ``linear`` or ``sqrt``; default: the optimizer's usual rule).
    - ``lr_grid``: ``True`` for factors 0.25, 0.5, 1, 2, 4 of that scaled rate, or your own
      factors; each size keeps the grid point with the best validation result.
    - ``target``: ``"METRIC=VALUE"`` (``val_accuracy=0.9``, ``val_loss=0.5``; the option row
      ``target_level``, ``--target`` on the command line); without it the sweep picks one from the
      runs (:func:`batchfit.core.sweep_inputs.auto_target`).
    - ``report``: tune's ``report.json``; its recommended batch size joins the sweep (at the
      sweep's learning rate), one more run trains it at tune's learning rate, and the verdict says
      whether that run agrees with the sweep.
    - ``micro_batch_size``: splits large batches for memory and also bounds evaluation (unless
      ``eval_batch_size`` is given; default 1024) and the sharpness measurement.
    - ``eval_points``, ``train_subset_samples``, ``sharpness_samples``,
      ``sharpness_iterations``, ``sharpness_tolerance``: how each run is measured.
    - ``out_dir``: each finished run is saved under ``out_dir/runs`` and the sweep writes
      ``sweep.json``, ``sweep.md`` and PNG plots there; ``resume=True`` skips runs already saved.
    - ``seed``, ``device``, ``progress``, ``task_name`` (the report's name for the task).

    The model ends with the weights it started with.

    Examples:
        >>> import torch
        >>> x, y = torch.randn(256, 4), torch.randint(0, 2, (256,))
        >>> result = sweep(torch.nn.Linear(4, 2), (x, y), val_data=(x[:64], y[:64]),
        ...                batch_sizes=[16, 64], epochs=2)
        >>> [s["batch_size"] for s in result.sizes], [s["samples_seen"] for s in result.sizes]
        ([16, 64], [512, 512])
    """
    options = optimizer_options(options, ("lr", "momentum", "weight_decay"))  # a class, a factory
    config = SweepConfig.build(config, **options)
    with torch_threads(config.threads):
        return _sweep(model, data, val_data, loss, on_run, config)


def _sweep(
    model: nn.Module,
    data: object,
    val_data: object,
    loss: str | Loss | None,
    on_run: Callable[[dict[str, Any]], None] | None,
    config: SweepConfig,
) -> SweepResult:
    """:func:`sweep` on its checked config, within its torch threads."""
    started = time.perf_counter()
    with signals_stop_the_sweep():  # a signal in any phase says what was saved (sweep_signals)
        # setup: check every input, then measure the start all runs share
        try:
            setup = prepare(model, data, val_data, loss, config)
            plans = plan_runs(setup)
            bar = TrainProgress(config.progress)
            _announce(bar, setup)
            if config.threads is None and (warning := thread_warning()) is not None:
                bar.log(f"warning: {warning}")
        except KeyboardInterrupt as exc:
            raise stopped_before_runs(exc) from None
        # run all: each run trains, evaluates, measures sharpness and is saved (resume reads it)
        done = run_all(model, setup, plans, bar, on_run)
        # conclude: a summary per size, the target, the verdict and the report
        try:
            return _conclude(setup, plans, done, time.perf_counter() - started)
        except KeyboardInterrupt as exc:
            raise stopped_after_runs(exc, done.saved, setup.runs_dir) from None


def _announce(bar: TrainProgress, setup: SweepSetup) -> None:
    """What the sweep is about to do, and the notes worth reading before it does."""
    config, factors = setup.config, setup.lr_factors
    grid = f", lr grid x{list(factors)}" if len(factors) > 1 else ""
    bar.log(
        f"Sweeping batch sizes {', '.join(map(str, setup.sizes))} on {setup.source.describe()}: "
        f"{describe_budget(setup.budget)} each, {config.optimizer} lr {setup.lr:g} at batch size "
        f"{config.lr_batch_size} scaled by '{setup.lr_scaling}'{grid}"
    )
    for note in setup.notes:
        bar.log(f"Note: {note}")
    if setup.tune_not_run:
        bar.log(f"Note: {setup.tune_not_run}")
    given = setup.given_target
    if given is not None and given.reached(setup.start.initial[setup.metric]):
        bar.log(f"Note: the target {given.describe()} is met already at the initial weights.")


def _conclude(
    setup: SweepSetup, plans: list[RunPlan], done: RunsDone, seconds: float
) -> SweepResult:
    """Summaries per size, the target (given, or chosen from them), the verdict, the report."""
    metric = setup.metric
    runs = [
        run.to_dict() | {"in_sweep": planned.in_sweep, "for_tune": planned.for_tune}
        for run, planned in zip(done.runs, plans, strict=True)
    ]
    summaries = _summaries([r for r in runs if r["in_sweep"]], setup.sizes, metric)
    target = setup.given_target or _auto_target(metric, setup.start.initial, summaries)
    for summary in summaries:
        summary["time_to_target"] = time_to_target(summary["curve"], target).to_dict()
    tune_run = next((_summary_of(r, target, metric) for r in runs if r["for_tune"]), None)
    # the edge: sweep.json's dicts (made now, or read back by resume) become the verdict's records
    recommendation = setup.recommendation
    answer = verdict(
        [SizeSummary.from_dict(s) for s in summaries],
        metric,
        target,
        setup.val_source.num_samples,
        Recommendation.from_dict(recommendation) if recommendation is not None else None,
        samples=setup.samples,
        initial=setup.start.initial[metric],
        tune_run=SizeSummary.from_dict(tune_run) if tune_run is not None else None,
        tune_not_run=setup.tune_not_run,
        notes=setup.notes,
    )
    result = SweepResult(
        sizes=summaries,
        runs=runs,
        metric=metric,
        target=target,
        initial=setup.start.initial,
        verdict=answer,
        settings=setup.settings,
        timing=_timing(runs, seconds, done.read_back),
        files={},
        skipped=setup.skipped,
    )
    if setup.config.out_dir is None:
        return result
    files = write_report(result.to_dict(), setup.config.out_dir)
    return dataclasses.replace(result, files=files)


def _summaries(runs: list[dict[str, Any]], sizes: list[int], metric: str) -> list[dict[str, Any]]:
    """One summary per batch size: the chosen learning rate's run, plus the grid it beat."""
    out = []
    for size in sizes:
        mine = [r for r in runs if r["batch_size"] == size]
        blew_up = [bool(r.get("diverged")) for r in mine]
        chosen = mine[choose_lr([r["curve"] for r in mine], blew_up, metric)]
        grid = [
            {
                "lr": r["lr"],
                "factor": r["lr_factor"],
                "best": (best_point(r["curve"], metric) or {}).get("value"),
                "final": r["final"].get(metric),
                "chosen": r is chosen,
                "diverged": r["diverged"]["step"] if r.get("diverged") else None,
            }
            for r in mine
        ]
        keep = {k: v for k, v in chosen.items() if k not in ("settings", "in_sweep", "for_tune")}
        out.append(
            {
                **keep,
                "best": best_point(chosen["curve"], metric),
                "lr_grid": grid if len(grid) > 1 else None,
                "lr_at_grid_edge": len(grid) > 1 and (chosen is mine[0] or chosen is mine[-1]),
            }
        )
    return out


def _summary_of(run: dict[str, Any], target: Target, metric: str) -> dict[str, Any]:
    """A single run (tune's) in the shape of a size summary, for the verdict."""
    return {
        **{k: v for k, v in run.items() if k != "settings"},
        "best": best_point(run["curve"], metric),
        "time_to_target": time_to_target(run["curve"], target).to_dict(),
    }


def _auto_target(metric: str, initial: dict[str, float], sizes: list[dict[str, Any]]) -> Target:
    bests = [s["best"]["value"] for s in sizes if s.get("best") and not s.get("diverged")]
    if not bests:
        return auto_target(metric, initial[metric], initial[metric])
    pick = max if higher_is_better(metric) else min
    return auto_target(metric, initial[metric], pick(bests))


def _timing(runs: list[dict[str, Any]], total: float, read_back: int = 0) -> dict[str, float]:
    """Where the time went. Shares are of the runs' time (runs read back by resume included:
    ``total_seconds`` is this call's, which did not make those ``read_back`` runs)."""
    runs_s = sum(r["seconds"] for r in runs)
    eval_s = sum(r["eval_seconds"] for r in runs)
    sharp_s = sum(r["sharpness_seconds"] for r in runs)
    return {
        "total_seconds": total,
        "runs": len(runs),
        "runs_read_back": read_back,
        "runs_seconds": runs_s,
        "train_seconds": sum(r["train_seconds"] for r in runs),
        "eval_seconds": eval_s,
        "sharpness_seconds": sharp_s,
        "eval_share": eval_s / runs_s if runs_s > 0 else 0.0,
        "sharpness_share": sharp_s / runs_s if runs_s > 0 else 0.0,
    }

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

import gc
import hashlib
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batchfit.core import options
from batchfit.core.accounting import plan, single_sample_micro_batch_at
from batchfit.core.lr_scaling import default_rule, scale_lr
from batchfit.core.sweep_verdict import (
    METRICS,
    Target,
    Verdict,
    auto_target,
    best_point,
    choose_lr,
    format_seconds,
    gap,
    higher_is_better,
    parse_batch_sizes,
    parse_lr_grid,
    parse_target,
    steps_for_examples,
    time_to_target,
    verdict,
)
from batchfit.data.tensors import TensorSource
from batchfit.errors import BatchfitError, NonFiniteLossError, TrainingInterrupted, first_line
from batchfit.files import make_folder, prepare_report_folder
from batchfit.inputs import as_source, check_model_accepts_data, loss_for
from batchfit.loop.train import train
from batchfit.losses import LOSS_NAMES, Loss
from batchfit.probe.memory import is_out_of_memory, rss_bytes
from batchfit.probe.sharpness import sharpness
from batchfit.progress import TrainProgress
from batchfit.report.sweep_report import REPORT_FILES
from batchfit.step import DEFAULT_LR, evaluate, has_batch_norm, params_sha256, resolve_device

DEFAULT_BATCH_SIZES = (32, 64, 128, 256)
DEFAULT_EPOCHS = 40
#: Validation batch size when no --eval-batch-size or --micro-batch-size bounds it.
DEFAULT_EVAL_BATCH_SIZE = 1024
FORMAT_VERSION = 1
RUNS_FOLDER = "runs"


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep. ``sizes`` has one summary per batch size (the chosen learning rate's
    run, with the ``lr_grid`` it was chosen from); ``runs`` every run (``in_sweep`` false for the
    extra run at tune's batch size and learning rate, ``for_tune`` true for the run tune is judged
    on); ``skipped`` the sizes that could not be run and why; ``verdict`` the answer."""

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
    batch_sizes: str | Sequence[int | str] = DEFAULT_BATCH_SIZES,
    epochs: int | None = None,
    steps: int | None = None,
    examples: int | None = None,
    optimizer: str = "adam",
    lr: float | None = None,
    lr_batch_size: int = 32,
    lr_scaling: str | None = None,
    lr_grid: str | Sequence[float] | bool | None = None,
    momentum: float = 0.9,
    weight_decay: float | None = None,
    micro_batch_size: int | None = None,
    eval_batch_size: int | None = None,
    target: str | Target | None = None,
    seed: int = 0,
    eval_points: int = 20,
    train_subset_samples: int = 1000,
    sharpness_samples: int = 512,
    sharpness_iterations: int = 50,
    sharpness_tolerance: float = 1e-3,
    out_dir: str | Path | None = None,
    resume: bool = False,
    report: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    task_name: str | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> SweepResult:
    """Train one short run per batch size from ``model``'s current weights and compare them.

    The learning rate at each size is ``lr`` (tuned at ``lr_batch_size``) scaled by
    ``lr_scaling`` (``none``, ``linear`` or ``sqrt``; default: the optimizer's usual rule), or,
    with ``lr_grid`` (``True`` for factors 0.25, 0.5, 1, 2, 4 of that scaled rate, or your own
    factors), the grid point with the best validation result. ``momentum`` (SGD) and
    ``weight_decay`` are as in :func:`batchfit.train`. The budget is one of ``epochs``
    (default 40), ``examples`` (equal examples: the same number of samples at every size, give or
    take one batch) or ``steps`` (equal updates). ``target`` is ``"METRIC=VALUE"``
    (``val_accuracy=0.9``, ``val_loss=0.5``); without it the sweep picks one from the runs
    (:func:`batchfit.core.sweep_verdict.auto_target`). ``report`` is tune's ``report.json``: its
    recommended batch size joins the sweep (at the sweep's learning rate), one more run trains it
    at tune's learning rate, and the verdict says whether that run agrees with the sweep.

    ``micro_batch_size`` splits large batches for memory and also bounds evaluation (unless
    ``eval_batch_size`` is given; default 1024) and the sharpness measurement.

    With ``out_dir`` each finished run is saved under ``out_dir/runs`` and the sweep writes
    ``sweep.json``, ``sweep.md`` and PNG plots there; ``resume=True`` skips runs already saved.
    ``on_run`` is called with each run's record as it finishes. The model ends with the weights
    it started with.

    Examples:
        >>> import torch
        >>> x, y = torch.randn(256, 4), torch.randint(0, 2, (256,))
        >>> result = sweep(torch.nn.Linear(4, 2), (x, y), val_data=(x[:64], y[:64]),
        ...                batch_sizes=[16, 64], epochs=2)
        >>> [s["batch_size"] for s in result.sizes], [s["samples_seen"] for s in result.sizes]
        ([16, 64], [512, 512])
    """
    started = time.perf_counter()
    if val_data is None:
        raise BatchfitError(
            "sweep compares validation results, so it needs validation data; give --val-data "
            "or a --val-fraction above 0."
        )
    source = as_source(data, seed=seed)
    val_source = as_source(val_data, shuffle=False, what="validation data")
    n = source.num_samples
    loss = loss_for(source, loss)
    sizes = parse_batch_sizes(batch_sizes, n)
    budget = _budget(epochs, steps, examples, n)
    options.check("optimizer", optimizer)
    lr = DEFAULT_LR[optimizer] if lr is None else options.check("lr", lr)
    options.check("lr_batch_size", lr_batch_size)
    rule = default_rule(optimizer) if lr_scaling is None else lr_scaling
    options.check("lr_scaling", rule)
    factors = parse_lr_grid(lr_grid) or (1.0,)
    options.check("momentum", momentum)
    options.check_optional("weight_decay", weight_decay)
    options.check_optional("micro_batch_size", micro_batch_size)
    eval_batch_size = options.check_optional("eval_batch_size", eval_batch_size) or (
        micro_batch_size or DEFAULT_EVAL_BATCH_SIZE
    )
    for name, value in (
        ("eval_points", eval_points),
        ("train_subset_samples", train_subset_samples),
        ("sharpness_samples", sharpness_samples),
        ("sharpness_iterations", sharpness_iterations),
        ("sharpness_tolerance", sharpness_tolerance),
    ):
        options.check(name, value)
    metrics = METRICS if loss.has_accuracy else ("val_loss",)
    given = (
        target if isinstance(target, Target) or target is None else parse_target(target, metrics)
    )
    if given is not None and given.metric not in metrics:
        raise BatchfitError(f"{given.metric} is not measured for this task; use {metrics[0]}.")
    metric = given.metric if given else metrics[0]
    notes: list[str] = []
    if (
        given is not None
        and given.value < 0
        and not given.higher_is_better
        and loss.name in LOSS_NAMES
    ):
        notes.append(
            f"The target {given.describe()} can never be met: the {loss.name} loss is never "
            "negative; give a --target above 0."
        )
    recommendation, tune_not_run = None, None
    if report is not None:
        from batchfit.report.recommendation_file import read_recommendation

        recommendation = read_recommendation(report)
        wanted = recommendation["batch_size"]
        if n is not None and wanted > n:
            tune_not_run = (
                f"tune's B={wanted} is larger than this training set ({n} samples), so it was "
                "not run (was the report made on other data?)."
            )
        elif wanted not in sizes:
            sizes = sorted([*sizes, wanted])
    sizes, skipped = _trainable_sizes(model, sizes, n, micro_batch_size)
    if recommendation is not None and recommendation["batch_size"] in {
        s["batch_size"] for s in skipped
    }:
        tune_not_run = f"tune's B={recommendation['batch_size']} was not run (see above)."
    notes += [s["reason"] for s in skipped]
    if resume and out_dir is None:
        raise BatchfitError("resume needs out_dir, the folder that holds the finished runs.")
    runs_dir = Path(out_dir) / RUNS_FOLDER if out_dir is not None else None
    if runs_dir is not None:
        _prepare_folder(Path(out_dir), runs_dir)

    device = resolve_device(device)
    model.to(device)
    check_model_accepts_data(model, source, loss)
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    initial_sha = params_sha256(model)
    subset_x, subset_y = _first_samples(source, max(train_subset_samples, sharpness_samples))
    train_subset = TensorSource(
        subset_x[:train_subset_samples], subset_y[:train_subset_samples], shuffle=False
    )
    sharp_x = subset_x[:sharpness_samples].to(device)
    sharp_y = subset_y[:sharpness_samples].to(device)
    try:
        initial = {
            f"val_{k}": v
            for k, v in evaluate(model, val_source, loss, eval_batch_size, device).items()
        }
    except (RuntimeError, MemoryError) as exc:
        raise _out_of_memory(exc, "evaluating the initial weights") from None

    settings = {
        "task": task_name,
        "samples": n,
        "val_samples": val_source.num_samples,
        "batch_sizes": sizes,
        "skipped_batch_sizes": [s["batch_size"] for s in skipped],
        "budget": budget,
        "optimizer": optimizer,
        "lr": lr,
        "lr_batch_size": lr_batch_size,
        "lr_scaling": rule,
        "lr_grid": list(factors) if len(factors) > 1 else None,
        "momentum": momentum if optimizer == "sgd" else None,
        "weight_decay": weight_decay,
        "micro_batch_size": micro_batch_size,
        "eval_batch_size": eval_batch_size,
        "seed": seed,
        "loss": loss.name,
        "eval_points": eval_points,
        "train_subset_samples": len(train_subset.y),
        "sharpness_samples": len(sharp_y),
        "sharpness_iterations": sharpness_iterations,
        "sharpness_tolerance": sharpness_tolerance,
        "initial_params_sha256": initial_sha,
        "train_data_sha256": _data_sha256(source, (subset_x, subset_y)),
        "val_data_sha256": _data_sha256(val_source),
        "device": str(device),
        "report": str(report) if report is not None else None,
    }
    bar = TrainProgress(progress)
    plans = _plans(sizes, factors, lr, lr_batch_size, rule, recommendation, tune_not_run)
    bar.log(
        f"Sweeping batch sizes {', '.join(map(str, sizes))} on {source.describe()}: "
        f"{_describe_budget(budget)} each, {optimizer} lr {lr:g} at batch size {lr_batch_size} "
        f"scaled by '{rule}'" + (f", lr grid x{list(factors)}" if len(factors) > 1 else "")
    )
    for note in notes:
        bar.log(f"Note: {note}")
    if tune_not_run:
        bar.log(f"Note: {tune_not_run}")
    if given is not None and given.reached(initial[metric]):
        bar.log(f"Note: the target {given.describe()} is met already at the initial weights.")
    runs: list[dict[str, Any]] = []
    current, saved_runs, read_back = "the setup", 0, 0
    try:
        for index, run_plan in enumerate(plans, start=1):
            batch_size, run_lr = run_plan["batch_size"], run_plan["lr"]
            fingerprint = _fingerprint(settings, batch_size, run_lr)
            path = runs_dir / _run_file(batch_size, run_lr) if runs_dir is not None else None
            saved = _load_run(path, fingerprint) if resume and path is not None else None
            label = f"[{index}/{len(plans)}] B={batch_size}, lr {run_lr:.3g}" + (
                " (tune's)" if not run_plan["in_sweep"] else ""
            )
            current = f"run {label}"
            if saved is not None:
                bar.log(f"{label}: finished earlier, read from {path}")
                runs.append(saved)
                saved_runs += 1
                read_back += 1
                continue
            model.load_state_dict(initial_state)
            record = _one_run(
                model,
                source,
                val_source,
                train_subset,
                loss,
                (sharp_x, sharp_y),
                batch_size=batch_size,
                lr=run_lr,
                factor=run_plan["factor"],
                budget=budget,
                n=n,
                optimizer=optimizer,
                momentum=momentum,
                weight_decay=weight_decay,
                micro_batch_size=micro_batch_size,
                seed=seed,
                eval_points=eval_points,
                eval_batch_size=eval_batch_size,
                sharpness_iterations=sharpness_iterations,
                sharpness_tolerance=sharpness_tolerance,
                initial=initial,
                device=device,
                bar=bar,
                label=label,
            )
            record["initial_params_sha256"] = initial_sha
            record["settings"] = fingerprint
            if path is not None:
                from batchfit.files import write_json

                try:
                    write_json(path, record)
                except OSError as exc:
                    raise BatchfitError(
                        f"Cannot save the finished run to '{path}' ({exc.strerror}); free space "
                        "in --out or choose another folder."
                    ) from None
                saved_runs += 1
            bar.log(_run_summary(label, record, metric))
            runs.append(record)
            current = f"the pause after {label}"
            if on_run is not None:
                on_run(record)
    except (TrainingInterrupted, KeyboardInterrupt) as exc:
        raise _stopped(exc, current, saved_runs, runs_dir) from None
    except BatchfitError as exc:
        if saved_runs and runs_dir is not None:
            raise BatchfitError(
                f"{exc} ({saved_runs} finished run(s) are saved in {runs_dir}; add --resume to "
                "keep them.)"
            ) from None
        raise
    finally:
        model.load_state_dict(initial_state)

    for record, run_plan in zip(runs, plans, strict=True):
        record["in_sweep"], record["for_tune"] = run_plan["in_sweep"], run_plan["for_tune"]
    summaries = _summaries([r for r in runs if r["in_sweep"]], sizes, metric)
    chosen_target = given or _auto_target(metric, initial, summaries)
    for summary in summaries:
        summary["time_to_target"] = time_to_target(summary["curve"], chosen_target)
    tune_run = next((_summary_of(r, chosen_target, metric) for r in runs if r["for_tune"]), None)
    answer = verdict(
        summaries,
        metric,
        chosen_target,
        val_source.num_samples,
        recommendation,
        samples=n,
        initial=initial[metric],
        tune_run=tune_run,
        tune_not_run=tune_not_run,
        notes=notes,
    )
    timing = _timing(runs, time.perf_counter() - started, read_back)
    result = SweepResult(
        sizes=summaries,
        runs=runs,
        metric=metric,
        target=chosen_target,
        initial=initial,
        verdict=answer,
        settings=settings,
        timing=timing,
        files={},
        skipped=skipped,
    )
    if out_dir is not None:
        from batchfit.report.sweep_report import write_report

        files = write_report(result.to_dict(), out_dir)
        result = SweepResult(**{**result.__dict__, "files": files})
    return result


def _round_lr(value: float) -> float:
    # Six significant figures: what run files are named by and what resume compares.
    return float(f"{value:.6g}")


def _plans(
    sizes: list[int],
    factors: Sequence[float],
    lr: float,
    lr_batch_size: int,
    rule: str,
    recommendation: dict[str, Any] | None,
    tune_not_run: str | None,
) -> list[dict[str, Any]]:
    """The runs to make: each size at each grid factor of its rule-scaled lr, then, when tune's
    report gives an lr, tune's (batch size, lr), unless one of those runs is that already."""
    plans = []
    for batch_size in sizes:
        scaled = scale_lr(lr, lr_batch_size, batch_size, rule)
        for factor in factors:
            plans.append(
                {
                    "batch_size": batch_size,
                    "lr": _round_lr(scaled * factor),
                    "factor": factor,
                    "in_sweep": True,
                    "for_tune": False,
                }
            )
    if recommendation is None or recommendation["lr"] is None or tune_not_run:
        return plans
    batch_size, tune_lr = recommendation["batch_size"], _round_lr(recommendation["lr"])
    same = [p for p in plans if (p["batch_size"], p["lr"]) == (batch_size, tune_lr)]
    if same:
        same[0]["for_tune"] = True
        return plans
    scaled = scale_lr(lr, lr_batch_size, batch_size, rule)
    return [
        *plans,
        {
            "batch_size": batch_size,
            "lr": tune_lr,
            "factor": _round_lr(tune_lr / scaled),
            "in_sweep": False,
            "for_tune": True,
        },
    ]


def _trainable_sizes(
    model: nn.Module, sizes: list[int], n: int | None, micro_batch_size: int | None
) -> tuple[list[int], list[dict[str, Any]]]:
    """Split off the sizes that batch norm cannot train at (a 1-sample micro-batch), with why."""
    if not has_batch_norm(model):
        return sizes, []
    keep, skipped = [], []
    for size in sizes:
        micro = min(micro_batch_size, size) if micro_batch_size else size
        where = single_sample_micro_batch_at(n, size, micro)
        if where is None:
            keep.append(size)
            continue
        skipped.append(
            {
                "batch_size": size,
                "reason": f"B={size} was not run: the model has batch norm, which cannot train "
                f"on a 1-sample micro-batch, and B={size} makes one at {where}.",
            }
        )
    if not keep:
        raise BatchfitError(
            "The model has batch norm, which cannot train on a 1-sample micro-batch, and every "
            "size in --batch-sizes makes one; choose sizes (and --micro-batch-size) that leave "
            "2 or more samples in each micro-batch."
        )
    return keep, skipped


def _prepare_folder(out_dir: Path, runs_dir: Path) -> None:
    """Fail now, not after the first run was trained, on an --out that cannot hold the runs; and
    remove the report an earlier sweep left there (its finished runs stay, for --resume)."""
    prepare_report_folder(out_dir, REPORT_FILES)
    make_folder(runs_dir, "out_dir")
    if not os.access(runs_dir, os.W_OK | os.X_OK):
        raise BatchfitError(
            f"Cannot write to --out '{out_dir}' (its '{RUNS_FOLDER}' folder is not writable); "
            "choose a folder you can write to."
        )


def _out_of_memory(exc: BaseException, during: str) -> BaseException:
    """An out-of-memory error as one line with the fix; any other error unchanged."""
    if not is_out_of_memory(exc):
        return exc
    first = first_line(exc)
    return BatchfitError(
        f"Out of memory while {during} ({first}); give --micro-batch-size, which also bounds "
        "evaluation and sharpness, or lower --sharpness-samples."
    )


def _data_sha256(
    source, fixed: tuple[torch.Tensor, torch.Tensor] | None = None, chunk: int = 65536
) -> str:
    """SHA-256 of a data set's values: all of it when in memory (or when ``fixed`` is not given:
    validation data is read once more), else of ``fixed``, the samples every run shares."""
    if isinstance(source, TensorSource):
        parts: Iterable[tuple[torch.Tensor, torch.Tensor]] = [(source.x, source.y)]
    elif fixed is not None:
        parts = [fixed]
    else:
        parts = source.batches(0, chunk)
    digest = hashlib.sha256()
    for x, y in parts:
        for tensor in (x, y):
            # dtype and per-sample shape, not the batch length: the chunking must not matter
            digest.update(f"{tensor.dtype}|{tuple(tensor.shape[1:])}|".encode())
            for piece in tensor.detach().split(chunk):
                piece = piece.cpu().contiguous()
                if piece.numel():
                    digest.update(piece.view(torch.uint8).numpy())
    return digest.hexdigest()


def _stopped(
    exc: BaseException, during: str, saved_runs: int, runs_dir: Path | None
) -> TrainingInterrupted:
    # train() turns a signal into TrainingInterrupted; one between runs is a KeyboardInterrupt.
    signal_name = getattr(exc, "signal_name", "SIGINT")
    saved_note = (
        f"{saved_runs} finished run(s) are saved in {runs_dir}; continue with --resume."
        if runs_dir is not None
        else "nothing was saved because no output folder was given."
    )
    return TrainingInterrupted(
        f"Stopped by {signal_name} during {during}; {saved_note}",
        signal_name,
        getattr(exc, "step", 0),
    )


def _budget(
    epochs: int | None, steps: int | None, examples: int | None, n: int | None
) -> dict[str, int]:
    given = [
        k
        for k, v in (("epochs", epochs), ("steps", steps), ("examples", examples))
        if v is not None
    ]
    if len(given) > 1:
        raise BatchfitError(
            "Give one budget: --epochs or --examples (equal examples) or --steps (equal "
            f"updates), not {' and '.join('--' + k for k in given)}."
        )
    if not given:
        epochs = DEFAULT_EPOCHS
    if epochs is not None:
        options.check("epochs", epochs)
        if n is None:
            raise BatchfitError(
                "The training data is a stream of unknown length, so epochs cannot be counted; "
                "give --steps or --examples."
            )
        return {"epochs": epochs}
    if steps is not None:
        return {"steps": options.check("steps", steps)}
    return {"examples": options.check("examples", examples)}


def _total_steps(budget: dict[str, int], n: int | None, batch_size: int) -> int:
    if "epochs" in budget:
        return plan(n, batch_size, epochs=budget["epochs"]).total_steps
    if "steps" in budget:
        return budget["steps"]
    if n is None:
        return math.ceil(budget["examples"] / batch_size)
    return steps_for_examples(budget["examples"], n, batch_size)


def _describe_budget(budget: dict[str, int]) -> str:
    ((kind, value),) = budget.items()
    return f"{value} {kind}"


def _first_samples(source, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` samples of epoch 0 (seeded order): fixed for every run of the sweep."""
    if source.num_samples is not None:
        count = min(count, source.num_samples)
    xs, ys, have = [], [], 0
    for x, y in source.batches(0, count):
        xs.append(x)
        ys.append(y)
        have += len(y)
        if have >= count:
            break
    return torch.cat(xs)[:count], torch.cat(ys)[:count]


def _run_file(batch_size: int, lr: float) -> str:
    return f"b{batch_size}-lr{lr:.6g}.json"


def _fingerprint(settings: dict[str, Any], batch_size: int, lr: float) -> dict[str, Any]:
    """What decides a run's numbers: a saved run is reused only if all of it matches."""
    keys = (
        "task",
        "samples",
        "val_samples",
        "budget",
        "optimizer",
        "momentum",
        "weight_decay",
        "micro_batch_size",
        "seed",
        "loss",
        "eval_points",
        "train_subset_samples",
        "sharpness_samples",
        "sharpness_iterations",
        "sharpness_tolerance",
        "initial_params_sha256",
        "train_data_sha256",
        "val_data_sha256",
        "device",
    )
    return {k: settings[k] for k in keys} | {"batch_size": batch_size, "lr": lr}


def _load_run(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    import json

    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BatchfitError(
            f"Cannot read the finished run '{path}': {exc}. Delete it to run that size again."
        ) from None
    saved = record.get("settings", {}) if isinstance(record, dict) else {}
    for key, value in fingerprint.items():
        if saved.get(key) != value:
            raise BatchfitError(
                f"The finished run '{path}' was made with {key}={saved.get(key)!r}, not "
                f"{value!r}; use a new --out, or run without --resume to redo it."
            )
    return record


def _one_run(
    model: nn.Module,
    source,
    val_source,
    train_subset: TensorSource,
    loss: Loss,
    sharp_batch: tuple[torch.Tensor, torch.Tensor],
    *,
    batch_size: int,
    lr: float,
    factor: float,
    budget: dict[str, int],
    n: int | None,
    optimizer: str,
    momentum: float,
    weight_decay: float | None,
    micro_batch_size: int | None,
    seed: int,
    eval_points: int,
    eval_batch_size: int,
    sharpness_iterations: int,
    sharpness_tolerance: float,
    initial: dict[str, float],
    device: torch.device,
    bar: TrainProgress,
    label: str,
) -> dict[str, Any]:
    """Train one batch size from the weights in ``model``; measure it; return a plain record.

    A run whose loss or weights become non-finite comes back with ``diverged`` set (the step and
    why), its curve up to the last evaluation, and no final, gap or sharpness."""
    run_started = time.perf_counter()
    total = _total_steps(budget, n, batch_size)
    eval_every = max(1, round(total / eval_points))
    curve = [{"step": 0, "samples_seen": 0, "train_seconds": 0.0, **initial}]
    eval_seconds = 0.0

    def on_eval(record: dict[str, float]) -> None:
        # train() also calls this at every epoch end; keep to this run's own cadence so that every
        # size is evaluated at the same share of its budget.
        nonlocal eval_seconds
        step = int(record["step"])
        if step % eval_every and step != total:
            return
        t = time.perf_counter()
        values = evaluate(model, val_source, loss, eval_batch_size, device)
        eval_seconds += time.perf_counter() - t
        curve.append(
            {
                "step": step,
                "samples_seen": int(record["samples_seen"]),
                "train_seconds": record["train_seconds"],
                **{f"val_{k}": v for k, v in values.items()},
            }
        )
        speed = record["samples_seen"] / max(record["train_seconds"], 1e-9)
        bar.update(step, values["loss"], speed)

    micro = min(micro_batch_size, batch_size) if micro_batch_size else None
    during = f"training B={batch_size}"
    diverged = None
    bar.start_epoch(label, total)
    try:
        # train() times each step without a CUDA synchronisation (none per step, by design), so
        # on a GPU its training seconds can trail the device's work by the queued steps.
        result = train(
            model,
            source,
            loss=loss,
            batch_size=batch_size,
            max_steps=total,
            micro_batch_size=micro,
            optimizer=optimizer,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            seed=seed,
            eval_every=eval_every,
            on_eval=on_eval,
            device=device,
        )
        if curve[-1]["step"] != result.steps:  # e.g. a stream that ended before the budget
            on_eval(
                {
                    "step": result.steps,
                    "samples_seen": result.samples_seen,
                    "train_seconds": result.train_seconds,
                }
            )
        during = f"evaluating B={batch_size}"
        t = time.perf_counter()
        on_train = evaluate(model, train_subset, loss, eval_batch_size, device)
        eval_seconds += time.perf_counter() - t
        during = f"measuring the sharpness of B={batch_size}"
        t = time.perf_counter()
        sharp = sharpness(
            model,
            loss.fn,
            *sharp_batch,
            iterations=sharpness_iterations,
            tolerance=sharpness_tolerance,
            seed=seed,
            micro_batch_size=micro_batch_size,
        )
        sharpness_seconds = time.perf_counter() - t
    except NonFiniteLossError as exc:
        diverged = {"step": exc.step, "reason": _first_clause(str(exc))}
    except (RuntimeError, MemoryError) as exc:
        raise _out_of_memory(exc, during) from None
    finally:
        bar.end_epoch()
    gc.collect()
    if diverged is not None:
        steps = diverged["step"]
        return {
            "batch_size": batch_size,
            "lr": lr,
            "lr_factor": factor,
            "micro_batch_size": micro or batch_size,
            "steps": steps,
            "samples_seen": plan(n, batch_size, max_steps=steps).total_samples
            if n
            else steps * batch_size,
            "epochs": None,
            "eval_every": eval_every,
            "train_seconds": curve[-1]["train_seconds"],
            "eval_seconds": eval_seconds,
            "sharpness_seconds": 0.0,
            "seconds": time.perf_counter() - run_started,
            "samples_per_s": None,
            "train_loss": None,
            "final": {k: None for k in curve[0] if k.startswith("val_")},
            "train_subset": None,
            "gap": {},
            "sharpness": None,
            "curve": curve,
            "params_sha256": None,
            "rss_bytes": rss_bytes(),
            "diverged": diverged,
        }
    final = {k: v for k, v in curve[-1].items() if k.startswith("val_")}
    return {
        "batch_size": batch_size,
        "lr": lr,
        "lr_factor": factor,
        "micro_batch_size": result.micro_batch_size,
        "steps": result.steps,
        "samples_seen": result.samples_seen,
        "epochs": result.samples_seen / n if n else None,
        "eval_every": eval_every,
        "train_seconds": result.train_seconds,
        "eval_seconds": eval_seconds,
        "sharpness_seconds": sharpness_seconds,
        "seconds": time.perf_counter() - run_started,
        "samples_per_s": result.samples_seen / result.train_seconds
        if result.train_seconds > 0
        else None,
        "train_loss": result.final.get("train_loss"),
        "final": final,
        "train_subset": on_train,
        "gap": gap(final, on_train),
        "sharpness": sharp.to_dict(),
        "curve": curve,
        "params_sha256": result.params_sha256,
        "rss_bytes": rss_bytes(),
        "diverged": None,
    }


def _first_clause(message: str) -> str:
    """ "The training loss became nan at step 7 (epoch 1)" from train()'s longer message, whose
    advice about checkpoints does not apply to a sweep."""
    clause = message.split(";")[0].strip()
    return clause[:1].lower() + clause[1:] if clause.startswith("The ") else clause


def _run_summary(label: str, record: dict[str, Any], metric: str) -> str:
    best = best_point(record["curve"], metric)
    if record.get("diverged"):
        seen = f"best {best['value']:.4f} before that" if best else "no finite evaluation"
        return (
            f"{label}: diverged ({record['diverged']['reason']}); {metric} {seen}. Recorded; "
            "going on."
        )
    return (
        f"{label}: {metric} best {best['value']:.4f}, final {record['final'][metric]:.4f}; "
        f"sharpness {record['sharpness']['eigenvalue']:.4g}; {record['steps']} steps in "
        f"{format_seconds(record['train_seconds'])} ({record['samples_per_s']:,.0f} samples/s)"
    )


def _summaries(runs: list[dict[str, Any]], sizes: list[int], metric: str) -> list[dict[str, Any]]:
    """One summary per batch size: the chosen learning rate's run, plus the grid it beat."""
    out = []
    for size in sizes:
        mine = [r for r in runs if r["batch_size"] == size]
        chosen = choose_lr(mine, metric)
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
        "time_to_target": time_to_target(run["curve"], target),
    }


def _auto_target(metric: str, initial: dict[str, float], sizes: list[dict[str, Any]]) -> Target:
    bests = [s["best"]["value"] for s in sizes if s.get("best") and not s.get("diverged")]
    if not bests:
        return auto_target(metric, initial[metric], initial[metric])
    pick = max if higher_is_better(metric) else min
    return auto_target(metric, initial[metric], pick(bests))


def _timing(runs: list[dict[str, Any]], total: float, read_back: int = 0) -> dict[str, float]:
    """Where the time went. Shares are of the runs' time (runs read back by --resume included:
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

"""What a sweep fixes before its first run: checked options, data, sizes, target, starting point.

:func:`prepare` checks everything that can be wrong before any training (data, batch sizes,
budget, learning rates, target, tune's report, the output folder), then measures the start that
every run shares: the initial weights, a fixed subset of the training data (scored like
validation, and the batch sharpness is measured on) and the validation metrics at the initial
weights. The result is one frozen :class:`SweepSetup` that the runs and the verdict read.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batchfit.core.accounting import plan, single_sample_micro_batch_at
from batchfit.core.configs import SweepConfig
from batchfit.core.lr_scaling import default_rule
from batchfit.core.options import default_of, opt
from batchfit.core.sweep_inputs import (
    METRICS,
    Target,
    parse_batch_sizes,
    parse_lr_grid,
    parse_target,
    steps_for_examples,
)
from batchfit.data import BatchSource
from batchfit.data.tensors import TensorSource
from batchfit.errors import BatchfitError, first_line
from batchfit.files import make_folder, prepare_report_folder
from batchfit.inputs import as_source, check_model, check_model_accepts_data, loss_for
from batchfit.losses import LOSS_NAMES, Loss, LossFn
from batchfit.probe.memory import is_out_of_memory
from batchfit.report.recommendation_file import read_recommendation
from batchfit.report.sweep_report import REPORT_FILES
from batchfit.step import DEFAULT_LR, evaluate, has_batch_norm, params_sha256, resolve_device

#: The sweep's budget when none of ``epochs``, ``steps`` or ``examples`` is given (sweep's own
#: default for ``epochs`` in the option table: train has none, it needs one given).
DEFAULT_EPOCHS = default_of("epochs", "sweep")
#: The folder under ``out_dir`` that holds one JSON file per finished run.
RUNS_FOLDER = "runs"


@dataclass(frozen=True, eq=False)
class SweepSetup:
    """Everything fixed before the first run. ``sizes`` are the sizes to run (tune's included,
    those batch norm cannot train moved to ``skipped`` with why); ``budget`` is one of
    ``{"epochs": E}``, ``{"steps": S}`` or ``{"examples": N}``; ``lr`` is the learning rate at
    ``config.lr_batch_size``, scaled by ``lr_scaling`` and multiplied by each of ``lr_factors``;
    ``given_target`` is the target asked for (None: chosen from the runs at the end);
    ``notes`` open the verdict; :attr:`settings` is ``sweep.json``'s record of all this."""

    config: SweepConfig
    source: BatchSource
    val_source: BatchSource
    loss: Loss
    samples: int | None
    sizes: list[int]
    skipped: list[dict[str, Any]]
    budget: dict[str, int]
    lr: float
    lr_scaling: str
    lr_factors: tuple[float, ...]
    eval_batch_size: int
    metric: str
    given_target: Target | None
    notes: tuple[str, ...]
    recommendation: dict[str, Any] | None
    tune_not_run: str | None
    runs_dir: Path | None
    start: Start

    @property
    def settings(self) -> dict[str, Any]:
        """``sweep.json``'s ``settings``: what the sweep ran with (stable keys; those in
        :data:`batchfit.orchestrate.sweep_runs.FINGERPRINT_KEYS` decide a run's numbers)."""
        config = self.config
        return {
            "task": config.task_name,
            "samples": self.samples,
            "val_samples": self.val_source.num_samples,
            "batch_sizes": self.sizes,
            "skipped_batch_sizes": [s["batch_size"] for s in self.skipped],
            "budget": self.budget,
            "optimizer": config.optimizer,
            "lr": self.lr,
            "lr_batch_size": config.lr_batch_size,
            "lr_scaling": self.lr_scaling,
            "lr_grid": list(self.lr_factors) if len(self.lr_factors) > 1 else None,
            "momentum": config.momentum if config.optimizer == "sgd" else None,
            "weight_decay": config.weight_decay,
            "micro_batch_size": config.micro_batch_size,
            "eval_batch_size": self.eval_batch_size,
            "seed": config.seed,
            "loss": self.loss.name,
            "eval_points": config.eval_points,
            "train_subset_samples": len(self.start.train_subset.y),
            "sharpness_samples": len(self.start.sharpness_batch[1]),
            "sharpness_iterations": config.sharpness_iterations,
            "sharpness_tolerance": config.sharpness_tolerance,
            "initial_params_sha256": self.start.initial_params_sha256,
            "train_data_sha256": self.start.train_data_sha256,
            "val_data_sha256": self.start.val_data_sha256,
            "device": str(self.start.device),
            "precision": config.precision,
            "report": str(config.report) if config.report is not None else None,
        }


@dataclass(frozen=True)
class _Sizes:
    """The sizes to run, the ones skipped, and tune's recommendation with why it may not run."""

    sizes: list[int]
    skipped: list[dict[str, Any]]
    recommendation: dict[str, Any] | None
    tune_not_run: str | None


@dataclass(frozen=True, eq=False)
class Start:
    """Where every run starts: the device, the initial weights, the fixed training samples and
    the validation metrics at the initial weights."""

    device: torch.device
    initial_state: dict[str, torch.Tensor]
    initial_params_sha256: str
    train_subset: TensorSource
    sharpness_batch: tuple[torch.Tensor, torch.Tensor]
    initial: dict[str, float]
    train_data_sha256: str
    val_data_sha256: str


def prepare(
    model: nn.Module,
    data: object,
    val_data: object,
    loss: str | LossFn | Loss | None,
    config: SweepConfig,
) -> SweepSetup:
    """Check the sweep's inputs and measure its starting point (the model moves to the device)."""
    # check: model, data, sizes, budget, learning rates, target; all before any training
    check_model(model)
    if val_data is None:
        raise BatchfitError(
            "sweep compares validation results, so it needs validation data; give "
            f"{opt('val_data')} or a {opt('val_fraction')} above 0."
        )
    source = as_source(data, seed=config.seed)
    val_source = as_source(val_data, shuffle=False, what="validation data")
    samples = source.num_samples
    loss_fn = loss_for(source, loss)
    sizes = parse_batch_sizes(config.batch_sizes, samples)
    budget = budget_of(config, samples)
    lr = DEFAULT_LR[config.optimizer] if config.lr is None else config.lr
    lr_scaling = config.lr_scaling or default_rule(config.optimizer)
    lr_factors = parse_lr_grid(config.lr_grid) or (1.0,)
    eval_batch_size = (
        config.eval_batch_size or config.micro_batch_size or default_of("eval_batch_size")
    )
    metric, given, notes = _target(config.target, loss_fn)
    chosen = _sizes(model, sizes, samples, config)
    notes += [s["reason"] for s in chosen.skipped]
    # the output folder: refused now, not after the first run trained
    runs_dir = _runs_folder(config)
    # measure the start every run shares
    start = _measure_start(model, source, val_source, loss_fn, config, eval_batch_size)
    return SweepSetup(
        config=config,
        source=source,
        val_source=val_source,
        loss=loss_fn,
        samples=samples,
        sizes=chosen.sizes,
        skipped=chosen.skipped,
        budget=budget,
        lr=lr,
        lr_scaling=lr_scaling,
        lr_factors=lr_factors,
        eval_batch_size=eval_batch_size,
        metric=metric,
        given_target=given,
        notes=tuple(notes),
        recommendation=chosen.recommendation,
        tune_not_run=chosen.tune_not_run,
        runs_dir=runs_dir,
        start=start,
    )


def _target(target: str | Target | None, loss: Loss) -> tuple[str, Target | None, list[str]]:
    """The metric the sweep is judged on, the target asked for, and a note when the target can
    never be met."""
    metrics = METRICS if loss.has_accuracy else ("val_loss",)
    given = (
        target if isinstance(target, Target) or target is None else parse_target(target, metrics)
    )
    if given is not None and given.metric not in metrics:
        raise BatchfitError(f"{given.metric} is not measured for this task; use {metrics[0]}.")
    notes = []
    if (
        given is not None
        and given.value < 0
        and not given.higher_is_better
        and loss.name in LOSS_NAMES
    ):
        notes.append(
            f"The target {given.describe()} can never be met: the {loss.name} loss is never "
            f"negative; give a {opt('target_level')} above 0."
        )
    return (given.metric if given else metrics[0]), given, notes


def _sizes(model: nn.Module, sizes: list[int], samples: int | None, config: SweepConfig) -> _Sizes:
    """The swept sizes, plus tune's recommended size when a report is given, less the sizes
    batch norm cannot train at."""
    recommendation, tune_not_run = None, None
    if config.report is not None:
        recommendation = read_recommendation(config.report)
        wanted = recommendation["batch_size"]
        if samples is not None and wanted > samples:
            tune_not_run = (
                f"tune's B={wanted} is larger than this training set ({samples} samples), so it "
                "was not run (was the report made on other data?)."
            )
        elif wanted not in sizes:
            sizes = sorted([*sizes, wanted])
    sizes, skipped = trainable_sizes(model, sizes, samples, config.micro_batch_size)
    if recommendation is not None and recommendation["batch_size"] in {
        s["batch_size"] for s in skipped
    }:
        tune_not_run = f"tune's B={recommendation['batch_size']} was not run (see above)."
    return _Sizes(sizes, skipped, recommendation, tune_not_run)


def _runs_folder(config: SweepConfig) -> Path | None:
    """``out_dir/runs``, made and checked now; None without ``out_dir``."""
    if config.resume and config.out_dir is None:
        raise BatchfitError(
            f"{opt('resume')} needs {opt('out_dir')}, the folder that holds the finished runs."
        )
    if config.out_dir is None:
        return None
    runs_dir = Path(config.out_dir) / RUNS_FOLDER
    _prepare_folder(Path(config.out_dir), runs_dir)
    return runs_dir


def _measure_start(
    model: nn.Module,
    source: BatchSource,
    val_source: BatchSource,
    loss: Loss,
    config: SweepConfig,
    eval_batch_size: int,
) -> Start:
    device = resolve_device(config.device)
    model.to(device)
    check_model_accepts_data(model, source, loss)
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    subset_samples, sharpness_samples = config.train_subset_samples, config.sharpness_samples
    fixed_x, fixed_y = _first_samples(source, max(subset_samples, sharpness_samples))
    with naming_out_of_memory("evaluating the initial weights"):
        values = evaluate(model, val_source, loss, eval_batch_size, device)
    return Start(
        device=device,
        initial_state=initial_state,
        initial_params_sha256=params_sha256(model),
        train_subset=TensorSource(
            fixed_x[:subset_samples], fixed_y[:subset_samples], shuffle=False
        ),
        sharpness_batch=(
            fixed_x[:sharpness_samples].to(device),
            fixed_y[:sharpness_samples].to(device),
        ),
        initial={f"val_{k}": v for k, v in values.items()},
        train_data_sha256=data_sha256(source, (fixed_x, fixed_y)),
        val_data_sha256=data_sha256(val_source),
    )


def budget_of(config: SweepConfig, samples: int | None) -> dict[str, int]:
    """The one budget given (``epochs``, ``steps`` or ``examples``), or the default epochs."""
    given = [name for name in ("epochs", "steps", "examples") if getattr(config, name) is not None]
    if len(given) > 1:
        raise BatchfitError(
            f"Give one budget: {opt('epochs')} or {opt('examples')} (equal examples) or "
            f"{opt('steps')} (equal updates), not {' and '.join(opt(k) for k in given)}."
        )
    if config.steps is not None:
        return {"steps": config.steps}
    if config.examples is not None:
        return {"examples": config.examples}
    if samples is None:
        raise BatchfitError(
            "The training data is a stream of unknown length, so epochs cannot be counted; "
            f"give {opt('steps')} or {opt('examples')}."
        )
    return {"epochs": config.epochs or DEFAULT_EPOCHS}


def total_steps(budget: dict[str, int], samples: int | None, batch_size: int) -> int:
    """Optimizer steps a run of ``batch_size`` makes within ``budget``."""
    if "epochs" in budget:
        assert samples is not None  # budget_of gives epochs only to data of known length
        steps = plan(samples, batch_size, epochs=budget["epochs"]).total_steps
        assert steps is not None  # epochs of known data count their steps
        return steps
    if "steps" in budget:
        return budget["steps"]
    if samples is None:
        return math.ceil(budget["examples"] / batch_size)
    return steps_for_examples(budget["examples"], samples, batch_size)


def describe_budget(budget: dict[str, int]) -> str:
    ((kind, value),) = budget.items()
    return f"{value} {kind}"


def trainable_sizes(
    model: nn.Module, sizes: list[int], samples: int | None, micro_batch_size: int | None
) -> tuple[list[int], list[dict[str, Any]]]:
    """Split off the sizes that batch norm cannot train at (a 1-sample micro-batch), with why."""
    if not has_batch_norm(model):
        return sizes, []
    keep, skipped = [], []
    for size in sizes:
        micro = min(micro_batch_size, size) if micro_batch_size else size
        where = single_sample_micro_batch_at(samples, size, micro)
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
            f"size in {opt('batch_sizes')} makes one; choose sizes (and "
            f"{opt('micro_batch_size')}) that leave 2 or more samples in each micro-batch."
        )
    return keep, skipped


def _prepare_folder(out_dir: Path, runs_dir: Path) -> None:
    """Fail now, not after the first run was trained, on an ``out_dir`` that cannot hold the runs;
    and remove the report an earlier sweep left there (its finished runs stay, for resume)."""
    prepare_report_folder(out_dir, REPORT_FILES)
    make_folder(runs_dir, "out_dir")
    if not os.access(runs_dir, os.W_OK | os.X_OK):
        raise BatchfitError(
            f"Cannot write to {opt('out_dir')} '{out_dir}' (its '{RUNS_FOLDER}' folder is not "
            "writable); choose a folder you can write to."
        )


def out_of_memory(exc: BaseException, during: str) -> BaseException:
    """An out-of-memory error as one line with the fix; any other error unchanged."""
    if not is_out_of_memory(exc):
        return exc
    return BatchfitError(
        f"Out of memory while {during} ({first_line(exc)}); give {opt('micro_batch_size')}, "
        f"which also bounds evaluation and sharpness, or lower {opt('sharpness_samples')}."
    )


@contextlib.contextmanager
def naming_out_of_memory(during: str) -> Iterator[None]:
    """Within this block, an out-of-memory error becomes :func:`out_of_memory`'s one line."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        raise out_of_memory(exc, during) from None


def data_sha256(
    source: BatchSource, fixed: tuple[torch.Tensor, torch.Tensor] | None = None, chunk: int = 65536
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


def _first_samples(source: BatchSource, count: int) -> tuple[torch.Tensor, torch.Tensor]:
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

"""The sweep's runs: which to make, one run (train, evaluate, sharpness), its record and its file.

:func:`plan_runs` lists the runs (each size at each learning-rate factor, then tune's own), and
:func:`run_all` makes them in order from the same initial weights. Each finished run is a frozen
:class:`SweepRun`, saved atomically to ``out_dir/runs/`` as soon as it ends; with ``resume`` a
saved run whose settings match is read back instead of run again. A run's file holds exactly
:meth:`SweepRun.to_dict`'s keys, the same as before runs were dataclasses, so a sweep interrupted
by an older batchfit resumes with this one.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from batchfit.checkpoint import SETTINGS_BEFORE_THE_KEY
from batchfit.core.accounting import plan
from batchfit.core.lr_scaling import scale_lr
from batchfit.core.options import opt
from batchfit.core.sweep_records import best_point, format_seconds, gap
from batchfit.errors import BatchfitError, NonFiniteLossError, TrainingInterrupted
from batchfit.files import write_json
from batchfit.loop.train import TrainResult, train
from batchfit.orchestrate.sweep_setup import SweepSetup, naming_out_of_memory, total_steps
from batchfit.probe.memory import rss_bytes
from batchfit.probe.sharpness import SharpnessResult, sharpness
from batchfit.progress import TrainProgress
from batchfit.step import evaluate

#: The settings that decide a run's numbers: a saved run is reused only if all of them match
#: (with its batch size and learning rate).
FINGERPRINT_KEYS = (
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
    "precision",
)


@dataclass(frozen=True)
class RunPlan:
    """One run to make: a batch size at a learning rate (``lr_factor`` times the rule-scaled one).
    ``in_sweep`` is false for the extra run at tune's batch size and lr; ``for_tune`` marks the
    run tune is judged on."""

    batch_size: int
    lr: float
    lr_factor: float
    in_sweep: bool = True
    for_tune: bool = False

    def label(self, index: int, count: int) -> str:
        """``[2/5] B=64, lr 0.002``: how progress lines and messages name the run."""
        tune = "" if self.in_sweep else " (tune's)"
        return f"[{index}/{count}] B={self.batch_size}, lr {self.lr:.3g}{tune}"


@dataclass(frozen=True)
class SweepRun:
    """One finished run. ``final`` holds the validation metrics at the end, ``train_subset``
    the same metrics on the fixed training subset (eval mode), ``gap`` their difference,
    ``sharpness`` the top Hessian eigenvalue's record, ``curve`` the validation curve (step,
    samples_seen, train_seconds, val_*). A run that ``diverged`` (``{"step", "reason"}``) has
    its curve up to then and no final values, gap or sharpness. ``settings`` is the fingerprint
    that decides whether ``resume`` may reuse it. The fields are ``runs/*.json``'s keys."""

    batch_size: int
    lr: float
    lr_factor: float
    micro_batch_size: int
    steps: int
    samples_seen: int
    epochs: float | None
    eval_every: int
    train_seconds: float
    eval_seconds: float
    sharpness_seconds: float
    seconds: float
    samples_per_s: float | None
    train_loss: float | None
    final: Mapping[str, float | None]
    train_subset: dict[str, float] | None
    gap: dict[str, float]
    sharpness: dict[str, Any] | None
    curve: list[dict[str, float]]
    params_sha256: str | None
    rss_bytes: int
    diverged: dict[str, Any] | None
    initial_params_sha256: str
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any], path: Path) -> SweepRun:
        """A run read back from its file at ``path`` (named in the error if keys are missing)."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in record]
        if missing:
            raise BatchfitError(
                f"Cannot read the finished run '{path}': it has no {', '.join(missing)}. Delete "
                "it to run that size again."
            )
        return cls(**{name: record[name] for name in names})


def plan_runs(setup: SweepSetup) -> list[RunPlan]:
    """The runs to make: each size at each grid factor of its rule-scaled lr, then, when tune's
    report gives an lr, tune's (batch size, lr), unless one of those runs is that already."""
    config = setup.config
    plans = [
        RunPlan(size, _round_lr(scaled * factor), factor)
        for size in setup.sizes
        for scaled in [scale_lr(setup.lr, config.lr_batch_size, size, setup.lr_scaling)]
        for factor in setup.lr_factors
    ]
    tune = setup.recommendation
    if tune is None or tune["lr"] is None or setup.tune_not_run:
        return plans
    batch_size, tune_lr = tune["batch_size"], _round_lr(tune["lr"])
    for index, planned in enumerate(plans):
        if (planned.batch_size, planned.lr) == (batch_size, tune_lr):
            plans[index] = dataclasses.replace(planned, for_tune=True)
            return plans
    scaled = scale_lr(setup.lr, config.lr_batch_size, batch_size, setup.lr_scaling)
    factor = _round_lr(tune_lr / scaled)
    return [*plans, RunPlan(batch_size, tune_lr, factor, in_sweep=False, for_tune=True)]


def _round_lr(value: float) -> float:
    # Six significant figures: what run files are named by and what resume compares.
    return float(f"{value:.6g}")


@dataclass
class RunsDone:
    """The runs made so far, and what an interruption message needs: what was going on and how
    many runs are saved (``read_back`` of them came from an earlier sweep)."""

    runs: list[SweepRun] = field(default_factory=list)
    during: str = "the setup"
    saved: int = 0
    read_back: int = 0


def run_all(
    model: nn.Module,
    setup: SweepSetup,
    plans: list[RunPlan],
    bar: TrainProgress,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> RunsDone:
    """Make every planned run in order (or read it back); ``model`` ends with its initial weights.

    An interruption (a signal in a run, Ctrl-C between runs) becomes one
    :class:`~batchfit.errors.TrainingInterrupted` that says how many runs are saved; another error
    says it too, so that none of the finished work is lost."""
    done = RunsDone()
    try:
        for index, planned in enumerate(plans, start=1):
            made = _next_run(model, setup, planned, planned.label(index, len(plans)), bar, done)
            if made is not None and on_run is not None:
                on_run(made.to_dict())
    except (TrainingInterrupted, KeyboardInterrupt) as exc:
        raise _stopped(exc, done, setup.runs_dir) from None
    except BatchfitError as exc:
        if done.saved and setup.runs_dir is not None:
            raise BatchfitError(
                f"{exc} ({done.saved} finished run(s) are saved in {setup.runs_dir}; add "
                f"{opt('resume')} to keep them.)"
            ) from None
        raise
    finally:
        model.load_state_dict(setup.start.initial_state)
    return done


def _next_run(
    model: nn.Module,
    setup: SweepSetup,
    planned: RunPlan,
    label: str,
    bar: TrainProgress,
    done: RunsDone,
) -> SweepRun | None:
    """Read the planned run back (resume: returns None) or make it from the initial weights,
    save it and return it."""
    fingerprint = {k: setup.settings[k] for k in FINGERPRINT_KEYS} | {
        "batch_size": planned.batch_size,
        "lr": planned.lr,
    }
    path = setup.runs_dir / run_file(planned) if setup.runs_dir is not None else None
    done.during = f"run {label}"
    saved = load_run(path, fingerprint) if setup.config.resume and path is not None else None
    if saved is not None:
        bar.log(f"{label}: finished earlier, read from {path}")
        done.runs.append(saved)
        done.saved += 1
        done.read_back += 1
        return None
    model.load_state_dict(setup.start.initial_state)
    run = train_one(model, setup, planned, fingerprint, bar, label)
    if path is not None:
        save_run(path, run)
        done.saved += 1
    bar.log(run_summary(label, run, setup.metric))
    done.runs.append(run)
    done.during = f"the pause after {label}"
    return run


def _stopped(exc: BaseException, done: RunsDone, runs_dir: Path | None) -> TrainingInterrupted:
    # train() turns a signal into TrainingInterrupted; one between runs is a KeyboardInterrupt.
    signal_name = getattr(exc, "signal_name", "SIGINT")
    saved_note = (
        f"{done.saved} finished run(s) are saved in {runs_dir}; continue with {opt('resume')}."
        if runs_dir is not None
        else "nothing was saved because no output folder was given."
    )
    return TrainingInterrupted(
        f"Stopped by {signal_name} during {done.during}; {saved_note}",
        signal_name,
        getattr(exc, "step", 0),
    )


def run_file(planned: RunPlan) -> str:
    """The file name of a run in ``out_dir/runs``: ``b64-lr0.002.json``."""
    return f"b{planned.batch_size}-lr{planned.lr:.6g}.json"


def save_run(path: Path, run: SweepRun) -> None:
    try:
        write_json(path, run.to_dict())
    except OSError as exc:
        raise BatchfitError(
            f"Cannot save the finished run to '{path}' ({exc.strerror}); free space in "
            f"{opt('out_dir')} or choose another folder."
        ) from None


def load_run(path: Path, fingerprint: dict[str, Any]) -> SweepRun | None:
    """The run saved at ``path`` if there is one; an error if it was made with other settings."""
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
        then = saved.get(key, SETTINGS_BEFORE_THE_KEY.get(key))
        if then != value:
            raise BatchfitError(
                f"The finished run '{path}' was made with {key}={then!r}, not "
                f"{value!r}; use a new {opt('out_dir')}, or run without {opt('resume')} to redo "
                "it."
            )
    return SweepRun.from_dict(record, path)


@dataclass
class _Curve:
    """One run's validation curve, evaluated at the run's own cadence: ``on_eval`` is handed to
    :func:`batchfit.train`, which also calls it at every epoch end."""

    model: nn.Module
    setup: SweepSetup
    eval_every: int
    total_steps: int
    bar: TrainProgress
    points: list[dict[str, float]]
    eval_seconds: float = 0.0

    def on_eval(self, record: dict[str, float]) -> None:
        step = int(record["step"])
        # every size is evaluated at the same shares of its budget, not at its epoch ends
        if step % self.eval_every and step != self.total_steps:
            return
        setup = self.setup
        started = time.perf_counter()
        values = evaluate(
            self.model, setup.val_source, setup.loss, setup.eval_batch_size, setup.start.device
        )
        self.eval_seconds += time.perf_counter() - started
        self.points.append(
            {
                "step": step,
                "samples_seen": int(record["samples_seen"]),
                "train_seconds": record["train_seconds"],
                **{f"val_{k}": v for k, v in values.items()},
            }
        )
        speed = record["samples_seen"] / max(record["train_seconds"], 1e-9)
        self.bar.update(step, values["loss"], speed)


@dataclass(frozen=True)
class _Measured:
    """What a run measures after training: the training subset in eval mode, and sharpness."""

    train_subset: dict[str, float]
    sharpness: SharpnessResult
    sharpness_seconds: float


def train_one(
    model: nn.Module,
    setup: SweepSetup,
    planned: RunPlan,
    fingerprint: dict[str, Any],
    bar: TrainProgress,
    label: str,
) -> SweepRun:
    """Train one batch size from the weights in ``model``, measure it, and return its record.

    A run whose loss or weights become non-finite comes back with ``diverged`` set (the step and
    why), its curve up to the last evaluation, and no final, gap or sharpness."""
    started = time.perf_counter()
    total = total_steps(setup.budget, setup.samples, planned.batch_size)
    curve = _Curve(
        model,
        setup,
        eval_every=max(1, round(total / setup.config.eval_points)),
        total_steps=total,
        bar=bar,
        points=[{"step": 0, "samples_seen": 0, "train_seconds": 0.0, **setup.start.initial}],
    )
    diverged = None
    bar.start_epoch(label, total)
    try:
        result = _train(model, setup, planned, curve)
        measured = _measure(model, setup, planned.batch_size, curve)
    except NonFiniteLossError as exc:
        diverged = {"step": exc.step, "reason": _first_clause(str(exc))}
    finally:
        bar.end_epoch()
    gc.collect()
    common = {
        "batch_size": planned.batch_size,
        "lr": planned.lr,
        "lr_factor": planned.lr_factor,
        "eval_every": curve.eval_every,
        "curve": curve.points,
        "initial_params_sha256": setup.start.initial_params_sha256,
        "settings": fingerprint,
    }
    if diverged is not None:
        return _diverged_run(setup, planned, curve, diverged, started, common)
    return _finished_run(setup, curve, result, measured, started, common)


def _train(model: nn.Module, setup: SweepSetup, planned: RunPlan, curve: _Curve) -> TrainResult:
    config, batch_size = setup.config, planned.batch_size
    micro = min(config.micro_batch_size, batch_size) if config.micro_batch_size else None
    with naming_out_of_memory(f"training B={batch_size}"):
        # train() times each step without a CUDA synchronisation (none per step, by design), so
        # on a GPU its training seconds can trail the device's work by the queued steps.
        result = train(
            model,
            setup.source,
            loss=setup.loss,
            on_eval=curve.on_eval,
            batch_size=batch_size,
            max_steps=curve.total_steps,
            micro_batch_size=micro,
            optimizer=config.optimizer,
            lr=planned.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            seed=config.seed,
            eval_every=curve.eval_every,
            device=setup.start.device,
            precision=config.precision,
            compile=config.compile,
        )
        if curve.points[-1]["step"] != result.steps:  # e.g. a stream that ended before the budget
            curve.on_eval(
                {
                    "step": result.steps,
                    "samples_seen": result.samples_seen,
                    "train_seconds": result.train_seconds,
                }
            )
    return result


def _measure(model: nn.Module, setup: SweepSetup, batch_size: int, curve: _Curve) -> _Measured:
    """Score the training subset like validation, and measure the sharpness of the weights."""
    config = setup.config
    with naming_out_of_memory(f"evaluating B={batch_size}"):
        started = time.perf_counter()
        on_train = evaluate(
            model, setup.start.train_subset, setup.loss, setup.eval_batch_size, setup.start.device
        )
        curve.eval_seconds += time.perf_counter() - started
    with naming_out_of_memory(f"measuring the sharpness of B={batch_size}"):
        started = time.perf_counter()
        sharp = sharpness(
            model,
            setup.loss.fn,
            *setup.start.sharpness_batch,
            iterations=config.sharpness_iterations,
            tolerance=config.sharpness_tolerance,
            seed=config.seed,
            micro_batch_size=config.micro_batch_size,
        )
        sharpness_seconds = time.perf_counter() - started
    return _Measured(on_train, sharp, sharpness_seconds)


def _finished_run(
    setup: SweepSetup,
    curve: _Curve,
    result: TrainResult,
    measured: _Measured,
    started: float,
    common: dict[str, Any],
) -> SweepRun:
    final = {k: v for k, v in curve.points[-1].items() if k.startswith("val_")}
    samples = setup.samples
    return SweepRun(
        **common,
        micro_batch_size=result.micro_batch_size,
        steps=result.steps,
        samples_seen=result.samples_seen,
        epochs=result.samples_seen / samples if samples else None,
        train_seconds=result.train_seconds,
        eval_seconds=curve.eval_seconds,
        sharpness_seconds=measured.sharpness_seconds,
        seconds=time.perf_counter() - started,
        samples_per_s=result.samples_seen / result.train_seconds
        if result.train_seconds > 0
        else None,
        train_loss=result.final.get("train_loss"),
        final=final,
        train_subset=measured.train_subset,
        gap=gap(final, measured.train_subset),
        sharpness=measured.sharpness.to_dict(),
        params_sha256=result.params_sha256,
        rss_bytes=rss_bytes(),
        diverged=None,
    )


def _diverged_run(
    setup: SweepSetup,
    planned: RunPlan,
    curve: _Curve,
    diverged: dict[str, Any],
    started: float,
    common: dict[str, Any],
) -> SweepRun:
    steps, batch_size, samples = diverged["step"], planned.batch_size, setup.samples
    micro = setup.config.micro_batch_size
    return SweepRun(
        **common,
        micro_batch_size=min(micro, batch_size) if micro else batch_size,
        steps=steps,
        samples_seen=_samples_seen(samples, batch_size, steps),
        epochs=None,
        train_seconds=curve.points[-1]["train_seconds"],
        eval_seconds=curve.eval_seconds,
        sharpness_seconds=0.0,
        seconds=time.perf_counter() - started,
        samples_per_s=None,
        train_loss=None,
        final={k: None for k in curve.points[0] if k.startswith("val_")},
        train_subset=None,
        gap={},
        sharpness=None,
        params_sha256=None,
        rss_bytes=rss_bytes(),
        diverged=diverged,
    )


def _samples_seen(samples: int | None, batch_size: int, steps: int) -> int:
    """Samples a run of ``steps`` steps at ``batch_size`` drew (each epoch's last batch smaller,
    when the data's size is known)."""
    seen = plan(samples, batch_size, max_steps=steps).total_samples if samples else None
    return seen if seen is not None else steps * batch_size


def _first_clause(message: str) -> str:
    """ "The training loss became nan at step 7 (epoch 1)" from train()'s longer message, whose
    advice about checkpoints does not apply to a sweep."""
    clause = message.split(";")[0].strip()
    return clause[:1].lower() + clause[1:] if clause.startswith("The ") else clause


def run_summary(label: str, run: SweepRun, metric: str) -> str:
    """The progress line of a finished run."""
    best = best_point(run.curve, metric)
    if run.diverged:
        seen = f"best {best['value']:.4f} before that" if best else "no finite evaluation"
        return f"{label}: diverged ({run.diverged['reason']}); {metric} {seen}. Recorded; going on."
    # a run that did not diverge measured all three
    assert run.sharpness is not None and run.final is not None and best is not None
    return (
        f"{label}: {metric} best {best['value']:.4f}, final {run.final[metric]:.4f}; "
        f"sharpness {run.sharpness['eigenvalue']:.4g}; {run.steps} steps in "
        f"{format_seconds(run.train_seconds)} ({run.samples_per_s:,.0f} samples/s)"
    )

"""The training loop, :func:`train`: read it top to bottom.

A run is four phases: *prepare* checks everything that can fail before the first step and builds
the optimizer; *restore or seed* continues a checkpointed run or starts a reproducible one;
*epochs* train epoch after epoch (:mod:`batchfit.loop.epoch`), validating, recording and
checkpointing at each end; *finish* reports the final metrics, saves the last checkpoint and,
with ``out_dir``, the final weights (``model.pt``).
Training ends after ``epochs`` epochs or ``max_steps`` steps, whichever comes first.

Everything needed to continue is two integers of data position plus model, optimizer and RNG
state, so a run stopped at any step and resumed ends bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from batchfit.checkpoint import (
    check_same_model,
    check_same_settings,
    checkpoint_path,
    load_checkpoint,
    seed_everything,
)
from batchfit.compiling import compiled_forward, is_compiled, unwrapped, warm_up
from batchfit.core.accounting import Plan, check_sizes, plan, total_steps
from batchfit.core.configs import TrainConfig
from batchfit.core.options import default_of, opt, opt_value
from batchfit.data.source import BatchSource
from batchfit.distributed import check_world_size_matches, is_main, place, shard, world_size, wrap
from batchfit.errors import BatchfitError, NonFiniteLossError, users_frames_only
from batchfit.inputs import (
    as_source,
    check_model,
    check_model_accepts_data,
    loss_for,
    optimizer_options,
)
from batchfit.loop.adaptive import AdaptiveRun, batch_size_range
from batchfit.loop.backoff import memory_limited
from batchfit.loop.checks import (
    check_batch_norm,
    check_output_paths,
    check_stop_rule,
    run_lock,
)
from batchfit.loop.epoch import continuing_batches, end_epoch, train_epoch
from batchfit.loop.events import save, save_weights, validate_or_save, validation_values
from batchfit.loop.signals import StopSignals
from batchfit.loop.state import OnEval, Position, RunState, Setup, fresh_run, restore_run
from batchfit.losses import Loss, LossFn
from batchfit.metrics import MetricsLog
from batchfit.precision import Precision
from batchfit.progress import TrainProgress
from batchfit.step import (
    DEFAULT_LR,
    evaluate,
    make_optimizer,
    params_sha256,
    resolve_device,
    smallest_trainable_size,
)
from batchfit.threads import thread_warning, torch_threads

# Importable from here as before: the loop's position, its stream of batches, and evaluate (which
# batchfit/__init__.py takes from this module; its home is batchfit.step).
__all__ = ["Position", "TrainResult", "continuing_batches", "evaluate", "train"]


@dataclass(frozen=True)
class TrainResult:
    """What a finished run did. ``final`` holds ``train_loss`` (mean over the last epoch's steps),
    ``val_loss`` and, for classification, ``val_accuracy``."""

    steps: int
    iterations: int
    epochs_completed: int
    samples_seen: int
    params_sha256: str
    final: dict[str, float]
    history: list[dict[str, float]]
    evals: list[dict[str, float]]
    seconds: float
    train_seconds: float
    samples_per_s: float
    batch_size: int
    micro_batch_size: int
    lr: float
    optimizer: str
    metrics_path: str | None
    checkpoint_path: str | None
    resumed_from_step: int | None
    weights_path: str | None = None
    #: With ``adaptive``: the final batch size and lr, the noise scale, every change and why.
    adaptive: dict[str, Any] | None = None
    #: How many processes trained (torchrun's world size; 1 on one process). ``batch_size`` is
    #: the global batch, split among them.
    world_size: int = 1
    #: The micro-batch the run was configured with; ``micro_batch_size`` is the one it trained
    #: with at the end (smaller after an out-of-memory back-off).
    configured_micro_batch_size: int | None = None
    #: What the run warned about without stopping (e.g. a stream smaller than one batch).
    warnings: list[str] = field(default_factory=list)
    #: The precision the forward pass and the loss ran in ("32", "bf16-mixed" or "16-mixed").
    precision: str = "32"
    #: With 16-mixed: optimizer steps skipped because the scaled gradients overflowed (the
    #: scaler then lowered its scale; the batches were still counted).
    skipped_steps: int = 0
    #: With ``compile``: the graphs compiled before training and the seconds that took (not in
    #: ``train_seconds`` or ``samples_per_s``); None uncompiled.
    compile: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train(
    model: nn.Module,
    data: object,
    *,
    val_data: object | None = None,
    loss: str | LossFn | Loss | None = None,
    on_eval: OnEval | None = None,
    config: TrainConfig | None = None,
    **options: Any,
) -> TrainResult:
    """Train ``model`` in place on ``data`` with mini-batches of ``batch_size`` samples.

    ``data`` and ``val_data`` are ``(x, y)`` tensors or arrays, a torch ``Dataset`` or
    ``IterableDataset``, or a :class:`~batchfit.data.source.BatchSource`; ``loss`` is a name
    (cross_entropy, mse, bce), a function or a :class:`~batchfit.losses.Loss` (default: from the
    target). Validation runs at every epoch end and every ``eval_every`` steps; each evaluation is
    a record in ``TrainResult.evals`` (step, epoch, samples_seen, train_seconds: time spent
    training so far, without evaluation; val_loss, val_accuracy) and is passed to ``on_eval``,
    which may return True to stop training there.

    The options (fields of :class:`~batchfit.core.configs.TrainConfig`, given as keywords or as
    ``config``) that matter most:

    - ``batch_size``: samples per update; 1 is online learning, ``len(data)`` full-batch descent;
    - ``epochs``, ``max_steps``: how long; with both, whichever ends first;
    - ``micro_batch_size``: split each batch for memory, with exact accumulation;
    - ``steps_per_epoch``: an epoch is this many steps (Keras) of the data read as one continuing
      stream; how epochs work on a stream of unknown length (training ends if it runs dry);
    - ``optimizer``, ``lr``, ``momentum``, ``weight_decay``: sgd, adam or adamw (a name, or the
      ``torch.optim`` class) and its settings;
    - ``checkpoint_dir``: save a checkpoint at every epoch end, every ``checkpoint_every`` steps
      and on SIGINT/SIGTERM; ``resume=True`` continues from it exactly. The folder is locked for
      the run's life (a second run using it is refused), and it and ``out_dir`` are checked for
      writing before the first step;
    - ``out_dir``: write ``metrics.csv``, one row per step, and the final weights as
      ``model.pt`` (a ``state_dict``: ``model.load_state_dict(torch.load(path,
      weights_only=True))``), its path in ``TrainResult.weights_path``;
    - ``memory_limit``: bytes the run may use (CPU: the whole process, as an address-space limit;
      CUDA: the allocator's cap). A step that runs out of memory, limit or not, is redone on the
      same batch with half the micro-batch (the update is the same), and a larger one is tried
      again after ``regrow_after`` steps (0: never); one sample that does not fit stops the run
      with the checkpoint of the last completed step;
    - ``seed``, ``device``, ``drop_last``, ``eval_batch_size``, ``progress`` (bars on stderr).

    An exception from the user's code (their dataset, model or loss) stops training: the
    checkpoint of the last completed step is saved (when ``checkpoint_dir`` is given) and the
    user's own exception is re-raised, its type unchanged, with only their frames in its
    traceback, a note saying where training stopped and how to resume, and the attributes
    ``checkpoint_path`` (None when nothing was saved) and ``batchfit_step`` (the step that failed).

    Examples:
        >>> import torch
        >>> x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
        >>> result = train(torch.nn.Linear(3, 2), (x, y), batch_size=16, epochs=2)
        >>> result.steps, result.samples_seen
        (8, 128)
    """
    options = optimizer_options(options, ("lr", "momentum", "weight_decay"))  # class, factory
    config = TrainConfig.build(config, **options)
    if is_compiled(model):  # torch.compile's wrapper: its module trains, compiled our way
        config, model = replace(config, compile=True), unwrapped(model)
    with torch_threads(config.threads):
        # prepare: every check that can fail does so now, not an epoch into training
        return _run(prepare(model, data, val_data, loss, on_eval, config))


def _run(setup: Setup) -> TrainResult:
    """:func:`train` once prepared, within its torch threads."""
    config = setup.config
    # no other run writes into this checkpoint folder meanwhile (rank 0 holds it for all ranks)
    with run_lock(config) if is_main() else nullcontext():
        # restore or seed: continue the checkpointed run exactly, or start a reproducible one
        run = restore_or_seed(setup)
        bar = _progress(setup, run)
        started = time.perf_counter()
        try:
            with (
                compiled_forward(setup.model, config.compile),
                memory_limited(setup, run.backoff),  # real: out of memory backs off
            ):
                if config.compile:
                    run.compiled = _warmed_up(setup, bar)
                epoch_ended = _train_epochs(run, setup, bar)
                # finish: the final metrics (fresh ones if stopped mid-epoch), the last checkpoint
                return finish(run, setup, epoch_ended, started)
        except NonFiniteLossError as exc:
            exc.say_kept(_what_was_kept(run, config))
            raise
        except Exception as exc:
            users = users_frames_only(exc)
            if users is None:
                raise
            raise users  # noqa: B904 - the user's error: their frames only, and this call


def _progress(setup: Setup, run: RunState) -> TrainProgress:
    """The progress bar (rank 0's only), which also says what is trained how and each back-off."""
    bar = TrainProgress(setup.config.progress and is_main())
    run.backoff.log = bar.log
    announce(bar, setup, run)
    if bar.enabled and setup.config.threads is None and setup.device.type == "cpu":
        warning = thread_warning()
        if warning is not None:
            bar.log(f"warning: {warning}")
    slow = setup.precision.slow_here() if setup.precision is not None else None
    if bar.enabled and slow is not None:
        bar.log(f"warning: {slow}")
    return bar


def _train_epochs(run: RunState, setup: Setup, bar: TrainProgress) -> bool:
    """Epochs: each trains to its end (or a stop), then validates, records and checkpoints.
    Whether the last epoch ended (``False``: stopped mid-epoch)."""
    epoch_ended = False
    with StopSignals(enabled=True) as stop:
        while not _training_done(run.position, setup):
            epoch_ended = train_epoch(run, setup, bar, stop)
            if not epoch_ended:
                break
            end_epoch(run, setup, bar)
            if run.stop_requested:
                break
    return epoch_ended


def prepare(
    model: nn.Module,
    data: object,
    val_data: object | None,
    loss: str | LossFn | Loss | None,
    on_eval: OnEval | None,
    config: TrainConfig,
) -> Setup:
    """Check the sizes, the stop rule, the folders, the loss and the model against the data, then
    move the model to its device and build the optimizer."""
    check_model(model)
    source = as_source(data, seed=config.seed)
    val_source = (
        as_source(val_data, shuffle=False, what="validation data") if val_data is not None else None
    )
    the_plan, micro = _sizes(source.num_samples, config)
    check_stop_rule(config, source.num_samples)
    batch_size_range(config, source.num_samples)  # refuses bad adaptive bounds now
    if config.adaptive and world_size() > 1:
        raise BatchfitError(
            f"{opt_value('adaptive', True)} runs on one process only (every rank would have to "
            "change its batch together); leave it out under torchrun, or train on one process."
        )
    lr = DEFAULT_LR[config.optimizer] if config.lr is None else config.lr
    check_output_paths(config)
    loss = loss_for(source, loss)
    check_batch_norm(model, source.num_samples, config, micro)
    device = place(resolve_device(config.device))
    model.to(device)
    check_model_accepts_data(model, source, loss)
    if val_source is not None:  # bad validation data found now, not after an epoch of training
        check_model_accepts_data(model, val_source, loss, what="validation data")
    optimizer = make_optimizer(config.optimizer, model, lr, config.momentum, config.weight_decay)
    precision = Precision.of(config.precision, device)
    scaler = precision.scaler()
    if scaler is not None and config.adaptive:
        raise BatchfitError(
            f"{opt_value('adaptive', True)} measures the gradient noise from unscaled gradients, "
            f"which {opt_value('precision', '16-mixed')} does not keep; use "
            f"{opt_value('precision', 'bf16-mixed')} (no loss scaling) with it."
        )
    return Setup(
        config=config,
        model=model,
        source=shard(source),  # a stream: each rank reads its own rows
        val_source=val_source,
        loss=loss,
        device=device,
        optimizer=optimizer,
        plan=the_plan,
        micro_batch_size=micro,
        lr=lr,
        eval_batch_size=config.eval_batch_size or max(micro, default_of("eval_batch_size")),
        last_step=_last_step(config, the_plan),
        settings=_settings(config, source, lr),
        on_eval=on_eval,
        ddp=wrap(model, device),
        precision=precision,
        scaler=scaler,
    )


def restore_or_seed(setup: Setup) -> RunState:
    """The run's state: from the checkpoint when resuming one (refused if it was made by another
    model or with other settings), else fresh, with every generator seeded."""
    config = setup.config
    saved = load_checkpoint(config.checkpoint_dir) if config.resume else None
    if saved is not None:
        path = checkpoint_path(config.checkpoint_dir)
        check_same_model(saved, setup.model.state_dict(), path)
        check_world_size_matches(saved.get("settings", {}).get("world_size"), path)
        check_same_settings(saved, setup.settings, path)
    else:
        seed_everything(config.seed)
    metrics = MetricsLog(
        Path(config.out_dir) / "metrics.csv" if config.out_dir and is_main() else None,
        micro_batch_size=setup.micro_batch_size,
        lr=setup.lr,
        resume_step=saved["position"]["step"] if saved is not None else None,
    )
    run = restore_run(saved, setup, metrics) if saved is not None else fresh_run(setup, metrics)
    if config.adaptive:
        run.adaptive = AdaptiveRun(setup, saved.get("adaptive") if saved is not None else None)
        metrics.lr = run.adaptive.lr
    return run


def announce(bar: TrainProgress, setup: Setup, run: RunState) -> None:
    """Say what is trained how, and where a resumed run continues."""
    config, pos = setup.config, run.position
    per_epoch = f"{setup.plan.steps_per_epoch} steps per epoch" if setup.plan else "a stream"
    if config.steps_per_epoch is not None:
        per_epoch = f"{config.steps_per_epoch} steps per epoch ({opt('steps_per_epoch')})"
    bar.log(
        f"Training on {setup.source.describe()}: batch size {config.batch_size} (micro-batch "
        f"{setup.micro_batch_size}), {per_epoch}, loss {setup.loss.name}, {config.optimizer} "
        f"lr {setup.lr:g}"
    )
    if run.resumed_from_step is not None:
        bar.log(
            f"Resumed from {checkpoint_path(config.checkpoint_dir)} at step {pos.step} "
            f"(epoch {pos.epoch + 1}, {pos.sample_in_epoch} samples into it)."
        )
    elif config.resume:
        bar.log(f"No checkpoint in {config.checkpoint_dir} yet; starting from the beginning.")


def finish(run: RunState, setup: Setup, epoch_ended: bool, started: float) -> TrainResult:
    """The final metrics (the last epoch's record, or the partial epoch and a fresh validation
    when training stopped inside one), the last checkpoint, and the result."""
    pos, metrics, config = run.position, run.metrics, setup.config
    if run.history and (epoch_ended or metrics.epoch_samples == 0):
        final = {k: v for k, v in run.history[-1].items() if k not in ("epoch", "step")}
    else:
        evaluated = validate_or_save(run, setup)
        final = {"train_loss": metrics.epoch_mean_loss(), **validation_values(evaluated)}
    last = save(run, setup)
    trained_seconds = run.train_seconds - run.train_seconds_at_start
    return TrainResult(
        steps=pos.step,
        iterations=pos.iterations,
        epochs_completed=pos.epoch,
        samples_seen=pos.samples_seen,
        params_sha256=params_sha256(setup.model),
        final=final,
        history=run.history,
        seconds=time.perf_counter() - started,
        evals=run.evals,
        train_seconds=run.train_seconds,
        samples_per_s=(pos.samples_seen - run.samples_at_start) / trained_seconds
        if trained_seconds > 0
        else 0.0,
        batch_size=setup.batch_size,
        micro_batch_size=run.backoff.micro_batch_size,
        configured_micro_batch_size=setup.micro_batch_size,
        world_size=world_size(),
        lr=setup.lr,
        optimizer=config.optimizer,
        metrics_path=str(metrics.path) if metrics.path else None,
        checkpoint_path=last,
        resumed_from_step=run.resumed_from_step,
        weights_path=save_weights(setup),
        adaptive=run.adaptive.summary() if run.adaptive is not None else None,
        warnings=run.warnings,
        precision=config.precision,
        skipped_steps=setup.scaler.skipped if setup.scaler is not None else 0,
        compile=run.compiled,
    )


def _warmed_up(setup: Setup, bar: TrainProgress) -> dict[str, Any]:
    """Compile the graphs training and validation meet (:func:`batchfit.compiling.warm_up`)
    before the step clock starts, and say what that cost."""
    x, y = next(iter(setup.source.batches(0, 2)))
    model, loss_fn = setup.step_parts()
    smallest = smallest_trainable_size(setup.model)
    x, y = x.to(setup.device), y.to(setup.device)
    compiled = warm_up(setup.model, loss_fn, x, y, train_model=model, smallest=smallest)
    bar.log(
        f"Compiled with torch.compile (dynamic shapes): {compiled.graphs} graphs in "
        f"{compiled.seconds:.1f} s, before training; step times do not count it."
    )
    return compiled.to_dict()


def _what_was_kept(run: RunState, config: TrainConfig) -> str:
    """What is true of the checkpoints when training stopped on a NaN: for the error's message."""
    if config.checkpoint_dir is None:
        return f"training stopped; no checkpoint was saved, as no {opt('checkpoint_dir')} was given"
    path = checkpoint_path(config.checkpoint_dir)
    if run.last_checkpoint is not None:
        step, saved = run.last_checkpoint
        return f"training stopped; the last good checkpoint (step {step}) was kept in {saved}"
    if run.resumed_from_step is not None:
        return (
            f"training stopped; the checkpoint it resumed from (step {run.resumed_from_step}) "
            f"was kept in {path}"
        )
    return "training stopped before any checkpoint was saved; none was written"


def _sizes(num_samples: int | None, config: TrainConfig) -> tuple[Plan | None, int]:
    """The plan (on data of known length, checking the sizes against it) and the micro-batch.

    With ``adaptive`` the micro-batch may exceed the starting batch size: it is the ceiling the
    batch grows to in one pass before accumulation takes over."""
    micro, batch_size = config.micro_batch_size, config.batch_size
    assert isinstance(batch_size, int)  # auto is resolved before the loop
    ceiling = micro if config.adaptive and micro is not None and micro > batch_size else None
    given = None if ceiling is not None else micro
    if num_samples is None:
        return None, ceiling or check_sizes(batch_size, given, world_size())
    the_plan = plan(
        num_samples,
        batch_size,
        micro_batch_size=given,
        world_size=world_size(),
        epochs=config.epochs,
        max_steps=config.max_steps,
        drop_last=config.drop_last,
    )
    return the_plan, ceiling or the_plan.micro_batch_size


def _last_step(config: TrainConfig, the_plan: Plan | None) -> int:
    if config.adaptive:  # steps per epoch follow the batch size: epochs end by samples
        return config.max_steps or sys.maxsize
    if config.steps_per_epoch is not None:
        last = total_steps(config.steps_per_epoch, config.epochs, config.max_steps)
    else:
        last = the_plan.total_steps if the_plan else config.max_steps
    assert last is not None  # the length was checked: epochs or steps, countable on this data
    return last


def _training_done(pos: Position, setup: Setup) -> bool:
    return pos.step >= setup.last_step or _epochs_done(pos, setup.config)


def _epochs_done(pos: Position, config: TrainConfig) -> bool:
    return config.epochs is not None and pos.epoch >= config.epochs


def _settings(config: TrainConfig, source: BatchSource, lr: float) -> dict[str, Any]:
    """What a resume must match, as the checkpoint records it (these keys, in this order)."""
    return {
        "batch_size": config.batch_size,
        "seed": config.seed,
        "optimizer": config.optimizer,
        "drop_last": config.drop_last,
        "samples": source.num_samples,
        "steps_per_epoch": config.steps_per_epoch,
        "lr": lr,
        "momentum": config.momentum if config.optimizer == "sgd" else None,
        "weight_decay": config.weight_decay,
        "data": source.fingerprint(),  # streamed or loaded, files, shuffle buffer, split
        "world_size": world_size(),  # processes: another number splits the batches otherwise
        "adaptive": config.adaptive,
        "adapt_every": config.adapt_every if config.adaptive else None,
        "min_batch_size": config.min_batch_size,
        "max_batch_size": config.max_batch_size,
        "precision": config.precision,  # another one trains other numbers
    }

"""What a run knows while it trains, and how that goes into a checkpoint and comes back out.

:class:`Setup` is fixed before the first step (data, loss, device, optimizer, derived sizes);
:class:`RunState` changes with every step (position, history, evaluations, training seconds, the
metrics log, the newest checkpoint, a request to stop). A checkpoint holds the model, the
optimizer, every generator and the parts of :class:`RunState` that a resumed run needs, under the
keys written by :func:`checkpoint_state` and read by :func:`restore_run` (checkpoint format 1;
``backoff`` was added later, and a checkpoint without it loads at the configured sizes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from batchfit.checkpoint import rng_state, set_rng_state
from batchfit.core.accounting import Plan
from batchfit.core.configs import TrainConfig
from batchfit.data.source import BatchSource
from batchfit.losses import Loss, LossFn
from batchfit.metrics import MetricsLog
from batchfit.precision import LossScaler, Precision

#: Called with each evaluation record; returning True stops training there.
OnEval = Callable[[dict[str, float]], bool | None]


@dataclass
class Position:
    """Where the run is: the epoch in progress, samples of it consumed, and global counters."""

    epoch: int = 0
    sample_in_epoch: int = 0
    step: int = 0
    iterations: int = 0
    samples_seen: int = 0


@dataclass
class Backoff:
    """The sizes in use after out-of-memory back-offs (:mod:`batchfit.loop.backoff`): the training
    micro-batch, the evaluation batch, and the step after which a larger micro-batch is tried again
    (None: nothing to grow back to, or ``regrow_after`` is 0). ``log`` says each change once."""

    micro_batch_size: int
    eval_batch_size: int
    regrow_step: int | None = None
    log: Callable[[str], None] = field(default=lambda message: None, repr=False, compare=False)
    #: Measures the room under ``memory_limit`` again (after memory was freed); see
    #: :func:`batchfit.loop.backoff.memory_limited`.
    make_room: Callable[[], None] = field(default=lambda: None, repr=False, compare=False)
    #: Ends ``memory_limit`` early, for a run that stops for want of memory.
    lift_limit: Callable[[], None] = field(default=lambda: None, repr=False, compare=False)

    def to_dict(self) -> dict[str, int | None]:
        """What a checkpoint keeps, so a resumed run continues with the same sizes."""
        return {
            "micro_batch_size": self.micro_batch_size,
            "eval_batch_size": self.eval_batch_size,
            "regrow_step": self.regrow_step,
        }


@dataclass(frozen=True)
class Setup:
    """What :func:`~batchfit.loop.train.prepare` checked and built once for the whole run."""

    config: TrainConfig
    model: nn.Module
    source: BatchSource
    val_source: BatchSource | None
    loss: Loss
    device: torch.device
    optimizer: torch.optim.Optimizer
    #: The exact step counts of a source of known length; None for a stream.
    plan: Plan | None
    micro_batch_size: int
    lr: float
    eval_batch_size: int
    #: The step training ends at, whatever ends it (epochs, max_steps, steps_per_epoch).
    last_step: int
    #: What a resume must match: a run continued with other values would read other batches.
    settings: dict[str, Any]
    on_eval: OnEval | None
    #: The model in DistributedDataParallel when several processes train (batchfit.distributed).
    ddp: nn.Module | None = None
    #: What the forward pass and the loss run in (float32 unless ``precision`` says otherwise).
    precision: Precision | None = None
    #: float16's loss scaler (None in the other precisions); its state is in the checkpoint.
    scaler: LossScaler | None = None

    def step_parts(self) -> tuple[Any, LossFn]:
        """The model (DDP's when several processes train) and the loss as the step functions
        call them: under autocast in a mixed precision."""
        model = self.ddp if self.ddp is not None else self.model
        if self.precision is None:
            return model, self.loss.fn
        return self.precision.forward(model), self.precision.loss(self.loss.fn)

    @property
    def batch_size(self) -> int:
        """The configured batch size, a number here (``auto`` is resolved before the loop)."""
        size = self.config.batch_size
        assert isinstance(size, int), size
        return size


@dataclass
class RunState:
    """What changes while the run trains. ``samples_at_start`` and ``train_seconds_at_start``
    keep where this call began, so a resumed run reports its own throughput."""

    metrics: MetricsLog
    #: The micro-batch sizes in use (:func:`fresh_run` and :func:`restore_run` set them).
    backoff: Backoff
    position: Position = field(default_factory=Position)
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    resumed_from_step: int | None = None
    #: (step, path) of the newest checkpoint, so one step is never saved twice.
    last_checkpoint: tuple[int, str] | None = None
    #: on_eval asked to stop, or a stream ran dry before its epoch ended.
    stop_requested: bool = False
    #: With ``adaptive``: its :class:`~batchfit.loop.adaptive.AdaptiveRun` (None: off).
    adaptive: Any = None
    #: What the user should know about the run that did not stop it, one line each.
    warnings: list[str] = field(default_factory=list)
    #: With ``compile``: what compiling cost (:class:`batchfit.compiling.Compiled` as a dict).
    compiled: dict[str, Any] | None = None
    samples_at_start: int = field(init=False)
    train_seconds_at_start: float = field(init=False)

    def __post_init__(self) -> None:
        self.samples_at_start = self.position.samples_seen
        self.train_seconds_at_start = self.train_seconds


def checkpoint_state(run: RunState, setup: Setup) -> dict[str, Any]:
    """Everything a resumed run needs, as plain data (the checkpoint's keys)."""
    return {
        "model": setup.model.state_dict(),
        "optimizer": setup.optimizer.state_dict(),
        "rng": rng_state(),
        "position": asdict(run.position),
        "history": run.history,
        "evals": run.evals,
        "train_seconds": run.train_seconds,
        "epoch_loss": [run.metrics.epoch_loss_sum, run.metrics.epoch_samples],
        "settings": setup.settings,
        "backoff": run.backoff.to_dict(),
    } | (
        ({"adaptive": run.adaptive.to_checkpoint()} if run.adaptive is not None else {})
        | ({"scaler": setup.scaler.state_dict()} if setup.scaler is not None else {})
    )


def fresh_run(setup: Setup, metrics: MetricsLog) -> RunState:
    """The state of a run that starts at step 0, at the configured sizes."""
    return RunState(metrics, backoff=Backoff(setup.micro_batch_size, setup.eval_batch_size))


def restore_run(saved: dict[str, Any], setup: Setup, metrics: MetricsLog) -> RunState:
    """Load a checkpoint's model, optimizer and generators, and return its run state."""
    setup.model.load_state_dict(saved["model"])
    setup.optimizer.load_state_dict(saved["optimizer"])
    if setup.scaler is not None:  # the precision matched (settings), so the scaler was saved
        setup.scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"])
    metrics.epoch_loss_sum, metrics.epoch_samples = saved["epoch_loss"]
    position = Position(**saved["position"])
    # A checkpoint written before out-of-memory back-off existed has no "backoff": configured sizes
    backoff = Backoff(setup.micro_batch_size, setup.eval_batch_size)
    for key, value in saved.get("backoff", {}).items():
        setattr(backoff, key, value)
    metrics.micro_batch_size = backoff.micro_batch_size
    return RunState(
        metrics,
        backoff,
        position,
        list(saved["history"]),
        list(saved["evals"]),
        saved["train_seconds"],
        resumed_from_step=position.step,
    )

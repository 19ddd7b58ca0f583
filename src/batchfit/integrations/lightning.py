"""batchfit inside PyTorch Lightning: one callback, :class:`BatchfitTuner`.

At fit start (the hook Lightning's own ``BatchSizeFinder`` uses) it runs :func:`batchfit.tune` on
the ``LightningModule`` and the dataset of its train dataloader, then sets the answer where
Lightning's ``BatchSizeFinder`` and ``LearningRateFinder`` set theirs: the batch size on
``batch_size`` (attribute, ``hparams`` or datamodule), the learning rate on ``lr`` or
``learning_rate``, with the optimizers rebuilt from ``configure_optimizers``. When the batch
exceeds the memory ceiling it trains micro-batches and sets ``trainer.accumulate_grad_batches``
so that micro-batch x accumulation = the batch each step sees (Lightning's micro-batches are
equal: the accumulation is the smallest divisor of tune's batch at or above tune's accumulation,
or, where that would shrink micro-batches below half, tune's, with the batch rounded down).
tune's report is written once, beside the logger's files (``trainer.log_dir``, else
``default_root_dir``), under ``batchfit/``.

The loss is the module's own ``training_step`` by default: tune's probes call a small adapter
whose forward passes the features through and whose loss calls ``training_step((x, y), 0)``
with the module detached from the trainer (``self.log`` is then a no-op; a ``training_step``
that reads ``self.trainer`` needs the other way). The other way: give the callback a ``loss``
(a name such as ``"cross_entropy"`` or a function), and tune calls the module's ``forward(x)``
with that loss. Either way each sample of the dataset must be an ``(x, y)`` pair.

Lightning is an optional dependency; importing this module without it fails in one line that
names the extra.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Timer
    from lightning.pytorch.utilities.parsing import (
        lightning_getattr,
        lightning_hasattr,
        lightning_setattr,
    )
except ImportError as missing:  # one line, naming the extra
    raise ImportError(
        "batchfit.integrations.lightning needs PyTorch Lightning, which is not installed; "
        "install it with: pip install 'batchfit[lightning]'"
    ) from missing

import torch
from torch import nn

from batchfit.errors import BatchfitError
from batchfit.integrations.tune_log import PREFIX, log_tune_result, tune_precision
from batchfit.orchestrate.tune import TuneResult, tune
from batchfit.orchestrate.tune_result import Recommended

#: torch optimizer classes -> tune's optimizer names (AdamW checked before Adam).
_OPTIMIZERS = ((torch.optim.AdamW, "adamw"), (torch.optim.Adam, "adam"), (torch.optim.SGD, "sgd"))
#: The attributes Lightning's LearningRateFinder looks for, in its order.
_LR_NAMES = ("lr", "learning_rate")

logger = logging.getLogger(__name__)


class TrainingStepLoss(nn.Module):
    """The module as tune sees it when ``training_step`` gives the loss: forward passes the
    features through, and :meth:`loss` runs ``training_step((x, y), 0)`` on them."""

    def __init__(self, module: pl.LightningModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.module.training_step((x, y), 0)
        if isinstance(out, dict):
            out = out.get("loss")
        if not isinstance(out, torch.Tensor):
            raise BatchfitError(
                f"{type(self.module).__name__}.training_step returned "
                f"{type(out).__name__}, not a loss tensor; return the loss (or a dict with "
                "'loss'), or give BatchfitTuner a loss to use with the module's forward(x)."
            )
        return out


class BatchfitTuner(pl.Callback):
    """Measure, then set the batch size, accumulation and learning rate at fit start.

    ``loss``: ``None`` (default) to use the module's ``training_step``, or a loss name or
    function to use with its ``forward(x)``. ``batch_arg_name``: the attribute the train
    dataloader reads its batch size from. ``out_dir``: where the report goes (default
    ``<trainer.log_dir or default_root_dir>/batchfit``). Other keywords are tune's options
    (``time_budget``, ``memory_limit``, ``max_batch_size``, ``seed`` ...); the optimizer family
    comes from ``configure_optimizers`` unless given. After fit, :attr:`result` holds tune's
    result and :attr:`recommended` its answer.

    ``measure_lr``: True (default) measures the learning rate with the batch size, as
    ``LearningRateFinder`` would, with the learning rate ``configure_optimizers`` gives at your
    current batch size as the prior (tune's ``warmup_lr``: the noise probe warms up at it, and it
    is the one scaled to the chosen batch when the range test cannot pick one); False keeps that
    learning rate and scales it to the new batch size by the optimizer's rule (linear for SGD,
    square root for the Adam family).

    ``log``: receives tune's progress and, once it has measured, the answer, whether the race ran,
    each phase cut short or skipped, and PROVISIONAL when the time budget cut measurements short
    (default: the logger ``batchfit.integrations.lightning``, those as warnings).

    ``Trainer(max_time=...)`` does not count the tuning: Lightning's clock starts when training
    does, after this callback has measured (up to ``time_budget`` seconds: default 60 on CPU, 300
    on CUDA), so a fit takes up to that much longer; lower ``max_time`` by the budget to bound the
    whole fit. With ``max_time`` set, the callback logs how long it tuned.

    ``report``: the ``report.json`` of an earlier tune of this model on this machine (from
    ``batchfit tune --out`` or ``tune(out_dir=...)``) to train with its answer without measuring
    again; :attr:`result` then stays None.
    """

    def __init__(
        self,
        loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        *,
        batch_arg_name: str = "batch_size",
        out_dir: str | Path | None = None,
        report: str | Path | None = None,
        measure_lr: bool = True,
        log: Callable[[str], None] | None = None,
        **tune_options: Any,
    ) -> None:
        super().__init__()
        #: Not ``self.log``: Lightning sets that to the module's ``log`` on every callback.
        self.say = log
        self.measure_lr = measure_lr
        self.report = Path(report) if report is not None else None
        self.loss = loss
        self.batch_arg_name = batch_arg_name
        self.out_dir = out_dir
        self.tune_options = tune_options
        self.result: TuneResult | None = None
        self.recommended: Recommended | None = None
        #: What was set: the dataloader's batch size and the trainer's accumulation (their
        #: product is the batch each optimizer step sees).
        self.micro_batch_size: int | None = None
        self.accumulation: int | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recommended is not None:  # measured once, even across several fit calls
            return
        # Whether the train dataloader is the module's or datamodule's (and so reads the batch size
        # set here) has no public API in Lightning 2.6: trainer.train_dataloader is None until
        # after on_fit_start, and trainer.datamodule outlives the fit that passed it. Lightning's
        # own BatchSizeFinder reads this private source for the same check.
        source = trainer.fit_loop._data_source
        if not source.is_module() or not lightning_hasattr(pl_module, self.batch_arg_name):
            raise BatchfitError(
                f"BatchfitTuner sets the batch size on the module's '{self.batch_arg_name}' "
                "(attribute, hparams or datamodule), but the train dataloader does not read it; "
                f"build it in train_dataloader() from self.{self.batch_arg_name} (module or "
                "datamodule) instead of passing a DataLoader to fit."
            )
        if self.report is not None:
            self.recommended = recommended_in(self.report)
        else:
            self.result = self._tune(trainer, pl_module, source.dataloader().dataset)
            self.recommended = self.result.recommended
        self._apply(trainer, pl_module, self.recommended)
        if self.result is not None and trainer.is_global_zero:
            log_tune_result(self.result, self.say or logger.info, self.say or logger.warning)
            self._say_max_time(trainer, self.result.seconds)
            self._say_precision(trainer)

    def _say_precision(self, trainer: pl.Trainer) -> None:
        """A Trainer in a precision tune does not measure in was measured in float32: say what
        that means."""
        _, note = tune_precision(_precision_of(trainer))
        if note is not None:
            (self.say or logger.warning)(note)

    def _say_max_time(self, trainer: pl.Trainer, seconds: float) -> None:
        """With ``max_time`` set, that it does not count the tuning (its clock starts with
        training, after this callback's ``on_fit_start``)."""
        callbacks = getattr(trainer, "callbacks", [])  # a property the stubs do not show
        timer = next((c for c in callbacks if isinstance(c, Timer)), None)
        if timer is None or timer.time_remaining() is None:
            return
        (self.say or logger.info)(
            f"{PREFIX}Trainer max_time does not count the {seconds:.1f} s of tuning: its clock "
            "starts when training does, after this callback; lower max_time by that much to "
            "bound the whole fit."
        )

    def _tune(self, trainer: pl.Trainer, module: pl.LightningModule, dataset: Any) -> TuneResult:
        options = {**self._optimizer_options(module), **self.tune_options, "log": self._progress}
        options.setdefault("task_name", type(module).__name__)
        options.setdefault("out_dir", self.out_dir or _report_dir(trainer))
        for name, value in _run_length(trainer).items():  # the answer is for the Trainer's run
            options.setdefault(name, value)
        # measured in the Trainer's precision: its ceiling and step times are the run's
        options.setdefault("precision", tune_precision(_precision_of(trainer))[0])
        if self.loss is not None:
            return tune(module, dataset, loss=self.loss, **options)
        adapter = TrainingStepLoss(module)
        module.trainer = None  # self.log becomes a warning, silenced here
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*self.log.*")
                return tune(adapter, dataset, loss=adapter.loss, **options)
        finally:
            module.trainer = trainer  # at fit start the module is attached to this trainer

    def _progress(self, line: str) -> None:
        """tune's progress lines: to ``log``, else the module's logger (read at the time)."""
        (self.say or logger.info)(line)

    def _optimizer_options(self, module: pl.LightningModule) -> dict[str, Any]:
        """The optimizer family and its learning rate at the current batch size: with
        ``measure_lr`` the prior (``warmup_lr``), unless ``lr`` or ``warmup_lr`` was given;
        without, the lr tune scales by the family's rule instead of measuring one."""
        if "optimizer" in self.tune_options:
            return {}
        optimizer = _first_optimizer(module.configure_optimizers())
        name = next((n for cls, n in _OPTIMIZERS if isinstance(optimizer, cls)), None)
        if name is None:
            raise BatchfitError(
                f"configure_optimizers gives a {type(optimizer).__name__}, which tune does not "
                "measure; give BatchfitTuner optimizer='adam', 'adamw' or 'sgd' (the closest)."
            )
        lr = float(optimizer.param_groups[0]["lr"])
        # the batch attribute was found at fit start
        batch_size = int(cast(int, lightning_getattr(module, self.batch_arg_name)))
        if self.measure_lr:
            if {"lr", "warmup_lr"} & set(self.tune_options):  # the user's own: theirs alone
                return {"optimizer": name}
            return {"optimizer": name, "warmup_lr": lr, "lr_batch_size": batch_size}
        return {"optimizer": name, "lr": lr, "lr_batch_size": batch_size}

    def _apply(self, trainer: pl.Trainer, module: pl.LightningModule, rec: Recommended) -> None:
        accumulation = _exact_accumulation(rec.batch_size, rec.micro_batch_size, rec.accumulation)
        self.micro_batch_size = rec.batch_size // accumulation
        self.accumulation = accumulation
        lightning_setattr(module, self.batch_arg_name, self.micro_batch_size)
        trainer.accumulate_grad_batches = accumulation
        names = [n for n in _LR_NAMES if lightning_hasattr(module, n)]
        for name in names:
            lightning_setattr(module, name, rec.lr)
        if names:
            trainer.strategy.setup_optimizers(trainer)  # rebuilt from the new lr
        else:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = rec.lr


def recommended_in(report: Path) -> Recommended:
    """The answer recorded in a tune ``report.json``; a file that is not one is refused in one
    line."""
    try:
        answer = json.loads(report.read_text())["recommended"]
        return Recommended(**{name: answer[name] for name in Recommended.__dataclass_fields__})
    except FileNotFoundError:
        raise BatchfitError(
            f"BatchfitTuner(report='{report}'): no such file; give the report.json that "
            "batchfit tune wrote, or leave report out to measure at fit start."
        ) from None
    except (ValueError, KeyError, TypeError):
        raise BatchfitError(
            f"BatchfitTuner(report='{report}'): not a batchfit tune report (it has no "
            "'recommended' answer); give the report.json that batchfit tune wrote."
        ) from None


def _exact_accumulation(batch_size: int, micro_batch_size: int, accumulation: int) -> int:
    """Micro-batches per batch for Lightning, whose micro-batches are equal: the smallest divisor
    of ``batch_size`` at or above ``accumulation`` while it keeps micro-batches over half of
    tune's ``micro_batch_size``; else ``accumulation`` (the batch rounded down to a multiple).

    Examples:
        >>> _exact_accumulation(96, 96, 1), _exact_accumulation(96, 20, 5)
        (1, 6)
        >>> _exact_accumulation(97, 49, 2)
        2
    """
    k = max(accumulation, 1)
    divisor = next(d for d in range(k, batch_size + 1) if batch_size % d == 0)
    return divisor if 2 * (batch_size // divisor) > micro_batch_size else k


def _first_optimizer(configured: Any) -> Any:
    """The first optimizer of what ``configure_optimizers`` returns (an optimizer, a dict with
    ``optimizer``, or lists and tuples of those)."""
    if isinstance(configured, dict):
        return _first_optimizer(configured.get("optimizer"))
    if isinstance(configured, (list, tuple)) and configured:
        return _first_optimizer(configured[0])
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    raise BatchfitError(
        "configure_optimizers returned no optimizer that BatchfitTuner can read; return one "
        "(or give BatchfitTuner optimizer='adam', 'adamw' or 'sgd' and lr=...)."
    )


def _report_dir(trainer: pl.Trainer) -> Path:
    """Beside the logger's files: ``trainer.log_dir``, else ``default_root_dir``."""
    return Path(trainer.log_dir or trainer.default_root_dir) / "batchfit"


def _run_length(trainer: pl.Trainer) -> dict[str, int]:
    """The Trainer's run as tune's horizon: ``max_epochs`` and ``max_steps`` where set (Lightning
    counts -1 or None as no limit)."""
    length = {}
    epochs, steps = getattr(trainer, "max_epochs", None), getattr(trainer, "max_steps", -1)
    if isinstance(epochs, int) and epochs > 0:
        length["epochs"] = epochs
    if isinstance(steps, int) and steps > 0:
        length["max_steps"] = steps
    return length


def _precision_of(trainer: pl.Trainer) -> str:
    """The Trainer's precision in Lightning's names (``32-true``, ``bf16-mixed``, ...)."""
    return str(getattr(trainer, "precision", "32-true"))

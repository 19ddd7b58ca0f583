"""``batch_size="auto"``: run tune first, then train with its answer.

The loop (:mod:`batchfit.loop`) trains the batch size it is given and knows nothing of tune, which
sits above it; this module joins the two (``batchfit.train`` and ``batchfit train`` call it).
The choice must survive a resume: a second tune could choose another batch size (timings vary from
run to run), and the checkpoint's batch size and lr would then not match. So a run with a
checkpoint folder saves the choice there (``auto.json``, written atomically), and a resumed run
reads it back instead of tuning again; one stopped while tuning (no ``auto.json`` and no
checkpoint: nothing was trained) tunes again. With ``out_dir``, tune's report goes beside the run's
metrics (``tune.json``, the ``report.json`` object, and ``tune.md``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from torch import nn

from batchfit.checkpoint import checkpoint_path
from batchfit.core.configs import TrainConfig, TuneConfig
from batchfit.core.options import opt, opt_value
from batchfit.errors import BatchfitError, users_frames_only
from batchfit.files import write_json, write_text
from batchfit.inputs import optimizer_options
from batchfit.loop.checks import check_output_paths
from batchfit.loop.train import TrainResult
from batchfit.loop.train import train as train_batches
from batchfit.losses import Loss, LossFn
from batchfit.orchestrate.tune import tune
from batchfit.orchestrate.tune_result import TuneResult
from batchfit.report.tune_report import headline, reasons_line, render_markdown

AUTO = "auto"
#: The choice of an auto run, in its checkpoint folder.
AUTO_FILE = "auto.json"
#: Tune's report beside the run's metrics in ``out_dir``.
TUNE_JSON, TUNE_MARKDOWN = "tune.json", "tune.md"
#: The section of tune's report.md that an auto run replaces (see :func:`_auto_markdown`).
REPRODUCE_HEADING = "## Reproduce\n"

Log = Callable[[str], None]


@dataclass(frozen=True)
class AutoChoice:
    """What an auto run trains with, and tune's reasons in two lines (:meth:`lines`)."""

    batch_size: int
    micro_batch_size: int
    lr: float
    optimizer: str
    headline: str
    reasons: str

    def lines(self) -> tuple[str, str]:
        return f"tune chose {self.headline}", f"why: {self.reasons}"


@dataclass(frozen=True)
class AutoTrainResult(TrainResult):
    """A :class:`~batchfit.loop.train.TrainResult` of an auto run: ``batch_size`` is the one tune
    chose; ``auto`` is that choice; ``tune`` is tune's whole result (None for a resumed run, which
    read its choice from the checkpoint folder instead of tuning)."""

    auto: AutoChoice | None = None
    tune: TuneResult | None = None

    def to_dict(self) -> dict[str, Any]:
        plain = asdict(replace(self, auto=None, tune=None))
        plain["auto"] = asdict(self.auto) if self.auto else None
        plain["tune"] = self.tune.to_report() if self.tune else None
        return plain


def train(
    model: nn.Module,
    data: object,
    *,
    val_data: object | None = None,
    loss: str | LossFn | Loss | None = None,
    on_eval: Callable[[dict[str, float]], bool | None] | None = None,
    config: TrainConfig | None = None,
    log: Log | None = None,
    tune_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> TrainResult:
    """:func:`batchfit.loop.train.train`, and with ``batch_size="auto"`` tune first.

    An auto run tunes within ``tune_budget`` seconds (default: tune's own budget) with the run's
    optimizer, seed and device; ``lr``, when given, is the user's and tune picks the batch size
    only (scaling that lr to it by the optimizer's rule, as :func:`batchfit.tune` does). It then
    trains with tune's batch size, micro-batch (unless ``micro_batch_size`` is given) and lr, and
    returns an :class:`AutoTrainResult`. ``log`` receives tune's progress (with ``progress``) and
    the choice in two lines (default: stderr with ``progress``, else nothing); ``tune_options``
    are more :class:`~batchfit.core.configs.TuneConfig` fields (``memory_limit``,
    ``max_batch_size``, ...). ``optimizer`` may be a name, a ``torch.optim`` class or a factory
    (see :func:`batchfit.inputs.optimizer_options`).
    """
    options = optimizer_options(options, ("lr", "momentum", "weight_decay"))
    config = TrainConfig.build(config, **options)
    run = dict(val_data=val_data, loss=loss, on_eval=on_eval)
    try:
        return _tune_then_train(model, data, config, run, log, tune_options)
    except Exception as exc:
        users = users_frames_only(exc)
        if users is None:
            raise
        raise users  # noqa: B904 - the user's error: their frames only, and this call


def _tune_then_train(
    model: nn.Module,
    data: object,
    config: TrainConfig,
    run: dict[str, Any],
    log: Log | None,
    tune_options: Mapping[str, Any] | None,
) -> TrainResult:
    if config.batch_size != AUTO:
        return train_batches(model, data, config=config, **run)
    say = log or (_to_stderr if config.progress else (lambda _: None))
    check_output_paths(config)  # a folder that cannot be used fails now, not after tuning
    if config.resume and _stopped_before_training(config):  # nothing to resume: tune it
        say(
            f"resuming an auto run that stopped before it trained (no {AUTO_FILE} and no "
            f"checkpoint in '{config.checkpoint_dir}'): nothing was trained, so tuning again"
        )
        config = replace(config, resume=False)
    if config.resume:
        choice, tuned = _saved_choice(config), None
        say(
            f"resuming an auto run with the batch size tune chose at its start (batch size "
            f"{choice.batch_size}, micro-batch {choice.micro_batch_size}, lr {choice.lr:.3g}, "
            f"from {AUTO_FILE}); not tuning again"
        )
    else:
        tuned = _tune(model, data, run["val_data"], run["loss"], config, say, tune_options or {})
        choice = _choice_of(tuned)
        _save(choice, tuned, config)
        for line in choice.lines():
            say(line)
    micro = config.micro_batch_size
    if micro is None or micro > choice.batch_size:
        micro = choice.micro_batch_size
    chosen = replace(config, batch_size=choice.batch_size, micro_batch_size=micro, lr=choice.lr)
    if tuned is not None and config.threads is None and tuned.machine.threads_seconds:
        # tune found torch's own threads fighting over the cores (its answer's warning says so,
        # and names these): train on the ones it measured with
        chosen = replace(chosen, threads=tuned.machine.threads_used)
    trained = train_batches(model, data, config=chosen, **run)
    done = {f.name: getattr(trained, f.name) for f in fields(TrainResult)}
    return AutoTrainResult(**done, auto=choice, tune=tuned)


def _to_stderr(message: str) -> None:
    print(f"batchfit train: {message}", file=sys.stderr, flush=True)


def _tune(
    model: nn.Module,
    data: object,
    val_data: object | None,
    loss: Any,
    config: TrainConfig,
    say: Log,
    extra: Mapping[str, Any],
) -> TuneResult:
    """Tune with the run's optimizer, lr, seed, device and length (the answer is for this run),
    within its ``tune_budget``."""
    tune_config = TuneConfig.build(
        optimizer=config.optimizer,
        lr=config.lr,
        seed=config.seed,
        device=config.device,
        threads=config.threads,
        precision=config.precision,  # the ceiling and step times of the run's precision
        compile=config.compile,
        time_budget=config.tune_budget,
        **{"epochs": config.epochs, "max_steps": config.max_steps, **extra},  # the run's length
    )
    log = say if config.progress else None
    return tune(model, data, val_data=val_data, loss=loss, log=log, config=tune_config)


def _choice_of(tuned: TuneResult) -> AutoChoice:
    report, r = tuned.to_report(), tuned.recommended
    return AutoChoice(
        batch_size=r.batch_size,
        micro_batch_size=r.micro_batch_size,
        lr=r.lr,
        optimizer=r.optimizer,
        headline=headline(report),
        # a machine unfit for timing makes the answer doubtful: said where the answer is
        reasons=" ".join(
            [reasons_line(report)] + [f"Warning: {w}" for w in tuned.machine.warnings]
        ),
    )


def _save(choice: AutoChoice, tuned: TuneResult, config: TrainConfig) -> None:
    """The choice into the checkpoint folder (for a resume); tune's report beside the metrics."""
    if config.checkpoint_dir is not None:
        write_json(Path(config.checkpoint_dir) / AUTO_FILE, asdict(choice))
    if config.out_dir is not None:
        report = tuned.to_report()
        write_json(Path(config.out_dir) / TUNE_JSON, report)
        write_text(Path(config.out_dir) / TUNE_MARKDOWN, _auto_markdown(report, choice, config))


def _auto_markdown(report: dict[str, Any], choice: AutoChoice, config: TrainConfig) -> str:
    """tune's ``report.md`` with its closing "Reproduce" section (a train command to copy)
    replaced by what this run does with the answer: it trains with it already, and a resume
    reads it back."""
    text = render_markdown(report)
    closing = "\n".join(_trained_with(choice, config)) + "\n"
    start = text.find(REPRODUCE_HEADING)
    if start < 0:
        return text + "\n" + closing
    end = text.find("\n## ", start + len(REPRODUCE_HEADING))
    return text[:start] + closing + (text[end + 1 :] if end >= 0 else "")


def _trained_with(choice: AutoChoice, config: TrainConfig) -> list[str]:
    """The auto run's closing section: what it trains with, and how it continues."""
    if config.checkpoint_dir is not None:
        folder = str(config.checkpoint_dir)
        after = (
            f"To continue it after a stop, give the same command with {opt('resume')} (and "
            f"{opt_value('checkpoint_dir', folder)}): it reads this choice back from "
            f"{AUTO_FILE} there instead of tuning again."
        )
    else:
        after = (
            f"Without {opt('checkpoint_dir')} it cannot be resumed; give one to save checkpoints "
            f"and this choice ({AUTO_FILE}) for {opt('resume')}."
        )
    return [
        "## Trained with it",
        "",
        f"This run ({opt_value('batch_size', AUTO)}) tuned first and trains with this answer: "
        f"batch size {choice.batch_size} (micro-batch {choice.micro_batch_size}), lr "
        f"{choice.lr:.3g}, {choice.optimizer}. {after}",
    ]


def _stopped_before_training(config: TrainConfig) -> bool:
    """Whether the run being resumed saved neither its choice nor a checkpoint: it was stopped
    while tuning (the choice is saved before the first step), so nothing was trained."""
    folder = Path(config.checkpoint_dir)
    return not (folder / AUTO_FILE).exists() and not checkpoint_path(folder).exists()


def _saved_choice(config: TrainConfig) -> AutoChoice:
    """The choice the run being resumed saved, refused when it is missing or unreadable."""
    path = Path(config.checkpoint_dir) / AUTO_FILE
    try:
        saved = json.loads(path.read_text())
        return AutoChoice(**{f.name: saved[f.name] for f in fields(AutoChoice)})
    except FileNotFoundError:  # with a checkpoint: that run trained with its own batch size
        why = "which is not there (that run did not choose its batch size by tune)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = f"which cannot be read ({type(exc).__name__}: {exc})"
    raise BatchfitError(
        f"{opt_value('resume', True)} with {opt_value('batch_size', AUTO)} takes the batch size "
        f"the run chose from '{path}', {why}; resume with that run's own {opt('batch_size')}, "
        f"or start afresh without {opt('resume')}."
    )

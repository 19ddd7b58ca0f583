"""The ``batchfit`` command line: parse, build a config, call the Python API, print.

Every flag is generated from the option table (:data:`batchfit.core.options.OPTIONS`); this module
only says which options each command shows, in which groups, with which command-specific help
(:data:`COMMANDS`). Every command takes ``--json`` (one JSON object on stdout, nothing else there)
and otherwise prints a table. Errors are one line on stderr with exit status 2; library messages
name options, and while a command runs they name its flags instead
(:func:`batchfit.core.options.named_as_flags`).

Importing this module and running ``batchfit plan`` import no torch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from batchfit.core import budget_clock, options
from batchfit.core.options import OPTIONS
from batchfit.errors import (
    BatchfitError,
    ReportedByRank0,
    TrainingInterrupted,
    describe_user_failure,
)
from batchfit.examples.catalog import DESCRIPTIONS
from batchfit.files import to_json

EXIT_USAGE = 2
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}

#: One option as a command shows it: its name, then what differs from the table's row.
Shown = str | tuple[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Group:
    """A titled group of a command's options; ``exclusive`` options may not be given together."""

    title: str | None
    shown: tuple[Shown, ...]
    exclusive: tuple[str, ...] = ()


@dataclass(frozen=True)
class Command:
    """A subcommand: its help texts, its option groups and the function that runs it."""

    help: str
    description: str
    examples: tuple[str, ...]
    groups: tuple[Group, ...]
    run: Callable[[argparse.Namespace], int]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: Options that a flag of another option sets (sweep's --target METRIC=VALUE).
    shared_flags: Mapping[str, str] = field(default_factory=dict)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the command and pointing at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _typed(name: str) -> Callable[[str], Any]:
    """An argparse type that checks the value with the shared option table."""

    def convert(text: str) -> Any:
        try:
            return options.parse(name, text)
        except BatchfitError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class _TargetOrLevel(argparse.Action):
    """sweep's and tune's ``--target``: ``METRIC=VALUE`` is the level to reach
    (``target_level``); a bare name is the data's target column, as for every other command
    (``target``)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if "=" in values and getattr(namespace, "target_level", None) is not None:
            parser.error(
                f"--target {values} comes after --target {namespace.target_level}; a "
                "run reaches for one level, so give METRIC=VALUE once"
            )
        setattr(namespace, "target_level" if "=" in values else "target", values)


#: How an option row's ``cli`` settings become argparse arguments.
_ACTIONS = {"boolean_optional": argparse.BooleanOptionalAction, "target_or_level": _TargetOrLevel}


def _argument(
    name: str, changes: Mapping[str, Any], flags: Mapping[str, str], command: str
) -> tuple:
    """``(flags, argparse keywords)`` for option ``name`` as ``command`` shows it: its help with
    the row's default for this command appended, the only place a help text says a default."""
    row = OPTIONS[name]
    settings = {k: v for k, v in row.cli.items() if k != "aliases"} | dict(changes)
    help_text = settings.pop("help", row.help)
    shown = options.shown_default(name, command)
    if shown is not None:
        help_text += f" (default: {shown})"
    help_text = help_text.format_map(_FlagNames(flags)).replace("%", "%%")  # argparse's % format
    default = row.held_default(command, cli=True)
    kwargs: dict[str, Any] = {"dest": name, "help": help_text, "default": default}
    action = settings.pop("action", None)
    if action in ("store_true", "store_false"):
        kwargs["action"] = action
    elif isinstance(row.rule, options.Flag) and action is None:
        kwargs["action"] = "store_true"
    else:
        if action is not None:
            kwargs["action"] = _ACTIONS[action]
        elif settings.pop("list", False):
            kwargs["type"] = _comma_list
        elif not isinstance(row.rule, options.Text):
            kwargs["type"] = _typed(name)
        if kwargs.get("action") is not argparse.BooleanOptionalAction:
            kwargs["metavar"] = row.flags[0].lstrip("-").upper().replace("-", "_")
    kwargs.update(settings)
    return row.flags, kwargs


class _FlagNames(dict):
    """Help texts name other options as ``{name}``: shown as their flags."""

    def __missing__(self, name: str) -> str:
        return OPTIONS[name].flags[0]


def _flags(command: Command) -> dict[str, str]:
    """Option name -> the flag that sets it, for the options this command shows."""
    names = [s if isinstance(s, str) else s[0] for g in command.groups for s in g.shown]
    return {name: OPTIONS[name].flags[0] for name in names} | dict(command.shared_flags)


def _message_flags(name: str) -> dict[str, str]:
    """How messages name options while command ``name`` runs: by its own flags, and by another
    command's flag for advice about that command (tune saying "train with --drop-last")."""
    every: dict[str, str] = {}
    for command in COMMANDS.values():
        every |= _flags(command)
    return every | _flags(COMMANDS[name])


def _add_command(commands: argparse._SubParsersAction, name: str, command: Command) -> None:
    parser = commands.add_parser(
        name,
        help=command.help,
        description=command.description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join(f"  {line}" for line in command.examples),
    )
    flags = _flags(command)
    for group in command.groups:
        holder = parser if group.title is None else parser.add_argument_group(group.title)
        exclusive = holder.add_mutually_exclusive_group() if group.exclusive else None
        for shown in group.shown:
            option, changes = (shown, {}) if isinstance(shown, str) else shown
            names, kwargs = _argument(option, changes, flags, name)
            target = exclusive if exclusive is not None and option in group.exclusive else holder
            target.add_argument(*names, **kwargs)
    parser.set_defaults(run=command.run, **command.defaults)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="batchfit",
        description="Measure, then choose the batch size; then train with it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  batchfit tune\n  batchfit plan --samples 24000 --batch-size 32\n"
        "  batchfit train --batch-size 32 --epochs 3",
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, command in COMMANDS.items():
        _add_command(commands, name, command)
    return parser


def _version() -> str:
    from batchfit.version import __version__

    return f"batchfit {__version__}"


# -- running the commands ----------------------------------------------------------------------


def _print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    Console(highlight=False).print(table)


def _load_task(args: argparse.Namespace):
    """The task of the command line's options; how --data was read, and notes, go to stderr."""
    from batchfit.task import StreamOptions, load_task

    task = load_task(
        example=args.example,
        model=args.model,
        data=args.data,
        val_data=args.val_data,
        val_fraction=args.val_fraction,
        features=args.features,
        target=args.target,
        loss=args.loss,
        seed=args.seed,
        stream=StreamOptions(args.stream, args.shuffle_buffer, args.prefetch, args.data_workers),
        # train --resume: read --data as the run being resumed did (streamed or loaded)
        resume_from=getattr(args, "checkpoint_dir", None)
        if getattr(args, "resume", False)
        else None,
        purpose=args.command,
    )
    if args.progress:
        if task.data_choice:
            print(f"batchfit {args.command}: {task.data_choice}", file=sys.stderr)
        for note in task.notes:
            print(f"batchfit {args.command}: note: {note}", file=sys.stderr)
    return task


#: The task options tune passes on to the train command of its report (the same task, trained).
_TASK_OPTIONS = (
    *("example", "model", "data", "val_data", "val_fraction", "features", "target", "loss"),
    *("stream", "shuffle_buffer", "prefetch", "data_workers", "seed"),
)


def _task_options(args: argparse.Namespace) -> tuple[str, ...]:
    """The task options given on this command line, as ``batchfit train`` takes them (quoted for a
    shell): the ones left at their defaults are left out."""
    flags, options = _flags(COMMANDS["train"]), []
    for name in _TASK_OPTIONS:
        value = getattr(args, name, None)
        if value is None or value == OPTIONS[name].default:
            continue
        if isinstance(value, bool):
            options.append(flags[name] if value else "--no-" + flags[name][2:])
        else:
            text = ",".join(value) if isinstance(value, list) else str(value)
            options.append(f"{flags[name]} {shlex.quote(text)}")
    return tuple(options)


def _train_time(train_s: float, wall_s: float) -> str:
    """The train call's seconds, and the start-up before it (importing torch, loading the data)
    when it is a noticeable share: on a busy machine start-up can take longer than training."""
    startup = max(wall_s - train_s, 0.0)
    if startup < max(1.0, 0.1 * wall_s):
        return f"{train_s:.1f} s"
    before = f"{startup:.1f} s of start-up before it: importing torch, loading the data"
    return f"{train_s:.1f} s (and {before})"


def _resume_command(args: argparse.Namespace) -> str:
    """The command line as typed, with --resume added if it is not there; under torchrun, with
    the torchrun that launches as many processes again (a checkpoint is refused on another world
    size)."""
    command = "batchfit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    world, local = int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("LOCAL_WORLD_SIZE")
    if world > 1:
        per_node = int(local) if local else world
        nodes = ""
        if per_node < world:
            nodes = f"--nnodes {world // per_node} <your rendezvous options> "
        command = f"torchrun {nodes}--nproc-per-node {per_node} -m {command}"
    return command if args.resume else command + " --resume"


def _cmd_plan(args: argparse.Namespace) -> int:
    from batchfit.core.accounting import describe_plan, plan

    p = plan(
        args.samples,
        args.batch_size,
        micro_batch_size=args.micro_batch_size,
        world_size=args.world_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        drop_last=args.drop_last,
    )
    if args.json:
        print(to_json(p.to_dict()))
        return 0
    _print_table(f"batchfit plan: {p.samples} samples, batch size {p.batch_size}", describe_plan(p))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from batchfit.core.configs import TrainConfig
    from batchfit.orchestrate.train_auto import AUTO, train

    task = _load_task(args)
    model, lr = task.model_and_lr(args.seed, args.optimizer, args.lr)
    auto: dict[str, Any] = {}
    if args.batch_size == AUTO:  # tune first: the user's lr (if any) stays theirs, B is tune's
        tune_options = {"warmup_lr": lr, "task_name": task.name}
        auto = {"log": _say, "tune_options": tune_options | {"task_options": _task_options(args)}}
        lr = args.lr
    config = TrainConfig.from_mapping({**vars(args), "lr": lr})
    try:
        result = train(model, task.train, val_data=task.val, loss=task.loss, config=config, **auto)
    except TrainingInterrupted as exc:
        hint = f" Resume with: {_resume_command(args)}" if args.checkpoint_dir else ""
        print(f"batchfit train: {exc}{hint}", file=sys.stderr)
        return EXIT_SIGNAL.get(exc.signal_name, 1)
    except BatchfitError as exc:
        if exc.checkpoint_path:  # bad data met while training: fix it, then continue from there
            hint = f"Once {exc.resume_when}, resume with: {_resume_command(args)}"
            raise BatchfitError(f"{exc} {hint}") from exc
        raise
    except Exception as exc:  # the user's code raised: their frames, where it stopped, how to go on
        report = describe_user_failure(exc)
        if report is None:
            raise
        saved = getattr(exc, "checkpoint_path", None)  # set by the loop on what it saved
        hint = f" Resume with: {_resume_command(args)}" if saved else ""
        print(f"batchfit train: {report}{hint}", file=sys.stderr)
        return 1
    if args.json:
        print(to_json(result.to_dict()))
        return 0
    rows = [
        ("steps", f"{result.steps}   ({result.iterations} iterations)"),
        ("epochs completed", f"{result.epochs_completed}"),
        ("samples seen", f"{result.samples_seen}"),
        *((k, f"{v:.4f}") for k, v in result.final.items()),
        ("lr", f"{result.lr:g} ({result.optimizer})"),
        ("throughput", f"{result.samples_per_s:,.0f} samples/s"),
        ("time", _train_time(result.seconds, time.perf_counter() - args.wall_started)),
        ("metrics", result.metrics_path or "-"),
    ]
    if result.checkpoint_path:
        rows.append(("checkpoint", result.checkpoint_path))
    if getattr(result, "auto", None) is not None:
        chosen = f"{result.batch_size} (micro-batch {result.micro_batch_size}), chosen by tune"
        rows.insert(0, ("batch size", chosen))
    if result.adaptive is not None:  # where --adaptive took the batch, and why it stopped there
        a = result.adaptive
        rows.insert(
            3,
            (
                "batch size",
                f"{result.batch_size} -> {a['batch_size']}, lr {a['lr']:g} at the end "
                f"({len(a['changes'])} changes; noise scale ~{a['b_noise']:,.0f})",
            ),
        )
    _print_table("batchfit train: done", rows)
    if result.weights_path:  # in full, never cut to the terminal's width: a user copies it
        print(
            f"weights: {result.weights_path} (load: "
            "model.load_state_dict(torch.load(path, weights_only=True)))"
        )
    return 0


def _say(message: str) -> None:
    print(f"batchfit train: {message}", file=sys.stderr, flush=True)


def _cmd_tune(args: argparse.Namespace) -> int:
    from batchfit.core.configs import TuneConfig
    from batchfit.orchestrate.tune import tune
    from batchfit.progress import console

    started = args.started
    task = _load_task(args)
    model, warmup_lr = task.model_and_lr(args.seed, args.optimizer, args.lr)
    values = {**vars(args), "warmup_lr": warmup_lr, "task_name": task.name}
    values |= {"task_options": _task_options(args), "target": args.target_level}
    config = TuneConfig.from_mapping(values | {"budget_started": started})

    def log(message: str) -> None:
        if args.progress:
            console().print(f"[{budget_clock.now() - started:5.1f}s] {message}", markup=False)

    try:
        result = tune(model, task.train, val_data=task.val, loss=task.loss, log=log, config=config)
    except ReportedByRank0:  # under torchrun: said once, by rank 0
        return EXIT_USAGE
    report = result.to_report()  # the very object written to report.json
    if args.json:
        print(to_json(report))
        return 0
    _print_tune(args, result, report, budget_clock.now() - started)
    return 0


def _print_tune(args: argparse.Namespace, result: Any, report: dict, seconds: float) -> None:
    from rich.console import Console

    from batchfit.report.tune_report import headline, reasons_line, train_command

    out = Console(highlight=False, soft_wrap=True)
    out.print(f"[bold]batchfit tune: {headline(report)}[/bold]")
    for warning in result.machine.warnings:  # first: they say how far to trust the rest
        out.print(f"  [bold]warning:[/bold] {warning}")
    out.print(f"  {reasons_line(report)}", markup=False)
    out.print("why:")
    for line in result.decision:
        if not line.startswith("Warning: "):
            out.print(f"  - {line}", markup=False)
    if result.skipped:
        out.print("cut short or skipped:")
        for line in result.skipped:
            out.print(f"  - {line}", markup=False)
    out.print(f"train with it: {train_command(report)}", markup=False)
    plots = sum(1 for f in result.report_files if f.endswith(".png"))
    out.print(
        f"report: {args.out_dir}/report.md (and report.json, {plots} plots); "
        f"{seconds:.1f} s in all",
        markup=False,
    )


def _sweep_task(args: argparse.Namespace):
    """The task of a sweep, where ``--target`` may have meant a level without its ``=VALUE``."""
    from batchfit.core.sweep_inputs import METRICS

    if args.target is not None and args.data is None:
        raise BatchfitError(
            f"--target {args.target} names a data column, which needs --data; a target level is "
            "METRIC=VALUE, e.g. --target val_accuracy=0.9 or --target val_loss=0.5."
        )
    try:
        return _load_task(args)
    except BatchfitError as exc:
        if args.target in METRICS:  # meant as a level to reach, but it has no "=VALUE"
            raise BatchfitError(
                f"{exc} (for a level to reach, write --target {args.target}=VALUE)"
            ) from None
        raise


def _cmd_sweep(args: argparse.Namespace) -> int:
    from batchfit.core.configs import SweepConfig
    from batchfit.orchestrate.sweep import sweep

    task = _sweep_task(args)
    model, lr = task.model_and_lr(args.seed, args.optimizer, args.lr)
    values = {**vars(args), "lr": lr, "target": args.target_level, "task_name": task.name}
    try:
        result = sweep(
            model,
            task.train,
            val_data=task.val,
            loss=task.loss,
            config=SweepConfig.from_mapping(values),
        )
    except TrainingInterrupted as exc:
        print(f"batchfit sweep: {exc} Resume with: {_resume_command(args)}", file=sys.stderr)
        return EXIT_SIGNAL.get(exc.signal_name, 1)
    report = result.to_dict()
    if args.json:
        print(to_json(report))
        return 0
    _print_sweep(args, result, report)
    return 0


def _print_sweep(args: argparse.Namespace, result: Any, report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from batchfit.report.sweep_report import size_rows

    header, rows = size_rows(report, short=True)
    title = (
        f"batchfit sweep: {result.metric} per batch size; gap = train - validation "
        f"({'accuracy' if result.metric == 'val_accuracy' else 'loss'}), eval mode"
    )
    table = Table(
        title=title, title_justify="left", box=None, pad_edge=False, collapse_padding=True
    )
    for name in header:
        table.add_column(name, justify="left" if name == "B" else "right")
    for row in rows:
        table.add_row(*row)
    console = Console(highlight=False)
    console.print(table)
    console.print(f"target: {result.target.describe()} ({result.target.source})")
    for line in result.verdict.lines:
        console.print(f"- {line}")
    console.print(
        f"report: {result.files.get('markdown')} (and sweep.json, plots) in {args.out_dir}"
    )


# -- what each command shows -------------------------------------------------------------------


def _task_group(target: Shown = "target") -> Group:
    """The task options of train, tune and sweep (the built-in example unless --data is given)."""
    example_help = "built-in example: " + "; ".join(
        f"{name}: {text}" for name, text in DESCRIPTIONS.items()
    )
    return Group(
        "task (default: the built-in example)",
        (
            ("example", {"help": example_help}),
            "model",
            "data",
            "val_data",
            "val_fraction",
            ("features", {"list": True}),
            target,
            "loss",
            "stream",
            "shuffle_buffer",
            "prefetch",
            "data_workers",
            "seed",
        ),
    )


_OUTPUT = ("device", "threads", "progress", "json")

COMMANDS: dict[str, Command] = {
    "plan": Command(
        help="count steps, iterations and epochs for a batch size",
        description="Count steps per epoch, iterations, the last batch and total steps.",
        examples=(
            "batchfit plan --samples 24000 --batch-size 32          # 750 steps",
            "batchfit plan --samples 2000 --batch-size 10 --epochs 5  # 200 steps/epoch",
            "batchfit plan --samples 1000 --batch-size 300 --micro-batch-size 128 --drop-last",
        ),
        groups=(
            Group(
                None,
                (
                    ("samples", {"required": True}),
                    ("batch_size", {"required": True}),
                    (
                        "micro_batch_size",
                        {"help": "samples per forward/backward on one device"},
                    ),
                    "world_size",
                    ("epochs", {"help": "epochs to train"}),
                    ("max_steps", {"help": "optimizer steps to train"}),
                    ("drop_last", {"help": "drop the incomplete last batch of each epoch"}),
                    "json",
                ),
            ),
        ),
        run=_cmd_plan,
    ),
    "train": Command(
        help="train with mini-batches (epochs or steps, checkpoints, resume)",
        description="Train a model with mini-batches of --batch-size samples per step.",
        examples=(
            "batchfit train --batch-size 32 --epochs 3",
            "batchfit train --batch-size 1 --max-steps 2000            # online learning",
            "batchfit train --batch-size auto --tune-budget 30 --epochs 3  # tune, then train",
            "batchfit train --batch-size 4000 --epochs 20 --lr 0.01     # full batch",
            "batchfit train --batch-size 256 --micro-batch-size 64 --epochs 2 \\",
            "    --checkpoint-dir ckpt --checkpoint-every 50          # then add --resume",
            "batchfit train --model models.py:make_mlp --data train.parquet --target y \\",
            "    --batch-size 64 --epochs 5",
            "batchfit train --model models.py:make_mlp --data 'big/*.parquet' --target y \\",
            "    --batch-size 256 --epochs 2 --stream --shuffle-buffer 200000",
        ),
        groups=(
            _task_group(),
            Group(
                "batches and length",
                (
                    (
                        "batch_size",
                        {
                            "required": True,
                            "help": "samples per optimizer step (1: online learning; N: full "
                            "batch; auto: tune first, then train with its batch size and lr)",
                        },
                    ),
                    "tune_budget",
                    "micro_batch_size",
                    "epochs",
                    "max_steps",
                    "drop_last",
                    "steps_per_epoch",
                    "eval_batch_size",
                ),
            ),
            Group(
                "memory",
                (
                    (
                        "memory_limit",
                        {
                            "help": "peak memory allowed, e.g. 1500MB (on CPU the whole process, "
                            "enforced as an address-space limit; on CUDA the allocator's cap); "
                            "a step that runs out of memory is redone with half the micro-batch"
                        },
                    ),
                    "regrow_after",
                ),
            ),
            Group("optimizer", ("optimizer", "lr", "momentum", "weight_decay")),
            Group(
                "adaptive batch size",
                (
                    "adaptive",
                    "adapt_every",
                    "min_batch_size",
                    ("max_batch_size", {"help": "with {adaptive}: the largest batch size"}),
                ),
            ),
            Group(
                "checkpoints and output",
                (
                    "checkpoint_dir",
                    "checkpoint_every",
                    "resume",
                    (
                        "out_dir",
                        {"help": "folder for metrics.csv and the trained weights, model.pt"},
                    ),
                    "device",
                    "threads",
                    "precision",
                    "compile",
                    ("progress", {"help": "no progress bars"}),
                    "json",
                ),
            ),
        ),
        run=_cmd_train,
        shared_flags={"time_budget": "--tune-budget"},  # tune's budget, as train names it
    ),
    "tune": Command(
        help="measure memory, throughput and gradient noise; recommend a batch size and lr",
        description="Measure the memory ceiling, throughput and gradient noise scale of a model "
        "on its data, then recommend the batch size (and micro-batch) that minimises the "
        "predicted time to a result, and a learning rate for it. Writes report.json, report.md "
        "and PNG plots to --out. Measures on all of --data (no validation split unless "
        "--val-fraction is given).",
        examples=(
            "batchfit tune                                   # the built-in example",
            "batchfit tune --memory-limit 2GB --time-budget 120 --out report",
            "batchfit tune --lr 1e-3 --lr-batch-size 32      # scale your lr, no range test",
            "batchfit tune --epochs 50                       # the answer for a 50-epoch run",
            "batchfit tune --model models.py:make_mlp --data train.parquet --target y --json",
        ),
        groups=(
            _task_group(
                (
                    "target",
                    {
                        "action": "target_or_level",
                        "metavar": "COL | val_loss=VALUE",
                        "help": "target column, or with '=' the held-out loss your run should "
                        "reach (its horizon); may be given twice, once for each",
                    },
                )
            ),
            Group(
                "your run (the answer is for its length)",
                (
                    ("epochs", {"help": "epochs your run will train"}),
                    ("max_steps", {"help": "optimizer steps your run will train"}),
                ),
            ),
            Group("limits", ("memory_limit", "max_batch_size", "time_budget")),
            Group(
                "optimizer and learning rate",
                (
                    "optimizer",
                    (
                        "lr",
                        {
                            "help": "your learning rate, tuned at {lr_batch_size}; scaled to the "
                            "recommended batch"
                        },
                    ),
                    "lr_batch_size",
                    "lr_scaling",
                ),
            ),
            Group(
                "output",
                (
                    ("out_dir", {"help": "folder for the report"}),
                    "precision",
                    "compile",
                    *_OUTPUT,
                ),
            ),
        ),
        run=_cmd_tune,
        defaults={"target_level": None},
        shared_flags={"target_level": "--target"},
    ),
    "sweep": Command(
        help="train one short run per batch size; compare validation, sharpness, time to target",
        description="Train one short run per batch size from the same initial weights and seed, "
        "then compare validation quality, train-validation gap, sharpness (top Hessian "
        "eigenvalue) and time to a target. Writes sweep.json, sweep.md and plots to --out.",
        examples=(
            "batchfit sweep                                   # built-in example, B=32..256",
            "batchfit sweep --batch-sizes 1,32,256,N --epochs 5 --target val_accuracy=0.8",
            "batchfit sweep --steps 500 --lr-scaling none    # equal updates, same lr",
            "batchfit sweep --lr-grid --report batchfit-report/report.json",
            "batchfit sweep --model models.py:make_mlp --data train.parquet --target y \\",
            "    --batch-sizes 16,64,256 --epochs 10 --resume",
        ),
        groups=(
            _task_group(
                (
                    "target",
                    {
                        "action": "target_or_level",
                        "metavar": "COL | METRIC=VALUE",
                        "help": "target column, or with '=' the level to reach: "
                        "val_accuracy=0.9 or val_loss=0.5; may be given twice, once for each",
                    },
                )
            ),
            Group(
                "batch sizes and budget",
                (
                    "batch_sizes",
                    ("epochs", {"help": "equal examples: this many epochs at every size"}),
                    "examples",
                    "steps",
                    (
                        "micro_batch_size",
                        {
                            "help": "split larger batches into micro-batches of this size (exact "
                            "accumulation); also bounds evaluation and sharpness"
                        },
                    ),
                ),
                exclusive=("epochs", "examples", "steps"),
            ),
            Group(
                "learning rate",
                (
                    "optimizer",
                    (
                        "lr",
                        {"help": "learning rate at {lr_batch_size}"},
                    ),
                    "lr_batch_size",
                    "lr_scaling",
                    "lr_grid",
                    "momentum",
                    "weight_decay",
                ),
            ),
            Group(
                "measurements and output",
                (
                    "report",
                    "eval_points",
                    ("eval_batch_size", {"help": "batch size for evaluation"}),
                    "sharpness_samples",
                    ("resume", {"help": "skip the runs already finished in {out_dir}"}),
                    ("out_dir", {"help": "folder for the report"}),
                    "precision",
                    "compile",
                    *_OUTPUT,
                ),
            ),
        ),
        run=_cmd_sweep,
        defaults={"target_level": None},
        shared_flags={"target_level": "--target"},
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for bad input). tune's time budget
    counts from here, batchfit's own first line (importing torch and loading the data count),
    never from when the process was created: ``bash -c '...; batchfit tune'`` runs it in the
    shell's own process."""
    started = budget_clock.now()
    wall_started = time.perf_counter()  # the train summary's start-up, in wall seconds
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: argparse already printed
        return int(exc.code or 0)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    args.started, args.wall_started = started, wall_started
    try:
        with options.named_as_flags(_message_flags(args.command)):
            return args.run(args)
    except BatchfitError as exc:
        print(f"batchfit {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"batchfit {args.command}: interrupted.", file=sys.stderr)
        return EXIT_SIGNAL["SIGINT"]
    except BrokenPipeError:  # `batchfit ... --json | head`: the reader left; nothing to report
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep Python's exit flush quiet
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``batchfit`` command line: parse, call the Python API, print. No logic lives only here.

Every command takes ``--json`` (one JSON object on stdout, nothing else there) and otherwise prints
a table. Errors are one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from batchfit.core import options
from batchfit.errors import BatchfitError, TrainingInterrupted
from batchfit.examples import EXAMPLES
from batchfit.files import to_json

EXIT_USAGE = 2
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}


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


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout instead of tables"
    )


class _TargetOrLevel(argparse.Action):
    """sweep's ``--target``: ``METRIC=VALUE`` is the level to reach (``args.target_level``);
    a bare name is the data's target column, as for every other command (``args.target``)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if "=" in values and getattr(namespace, "target_level", None) is not None:
            parser.error(
                f"--target {values} comes after --target {namespace.target_level}; a sweep "
                "reaches for one level, so give METRIC=VALUE once"
            )
        setattr(namespace, "target_level" if "=" in values else "target", values)


def _add_task_options(parser: argparse.ArgumentParser, target_level: bool = False) -> None:
    """The task options. With ``target_level`` (sweep), ``--target`` also takes METRIC=VALUE."""
    group = parser.add_argument_group("task (default: the built-in example)")
    group.add_argument(
        "--example",
        help="built-in example (default mnist1d): "
        + "; ".join(f"{e.name}: {e.description}" for e in EXAMPLES.values()),
    )
    group.add_argument("--model", help="package.module:factory returning your nn.Module")
    group.add_argument(
        "--data",
        help="training data: .parquet/.csv/.arrow/.npy/.npz file, folder or quoted glob, or "
        "package.module:factory returning a torch Dataset or IterableDataset",
    )
    group.add_argument("--val-data", help="validation data, same forms as --data")
    group.add_argument(
        "--val-fraction",
        type=_typed("val_fraction"),
        help="seeded share of --data held out for validation (default 0.1; 0: none)",
    )
    group.add_argument(
        "--features",
        type=_comma_list,
        help="comma-separated feature columns (default: all but the target)",
    )
    if target_level:
        parser.set_defaults(target_level=None)
        group.add_argument(
            "--target",
            action=_TargetOrLevel,
            metavar="COL | METRIC=VALUE",
            help="target column (default: one named target, label or y); with '=', the level to "
            "reach: val_accuracy=0.9 or val_loss=0.5 (may be given twice, once for each)",
        )
    else:
        group.add_argument("--target", help="target column (default: one named target, label or y)")
    group.add_argument(
        "--loss",
        help="cross_entropy, mse, bce or package.module:fn "
        "(default: from the target: integers -> cross_entropy, floats -> mse)",
    )
    group.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        help="read --data files piece by piece (--stream) or load them (--no-stream); default: "
        "stream when the data would take over a quarter of the available memory",
    )
    group.add_argument(
        "--shuffle-buffer",
        type=_typed("shuffle_buffer"),
        metavar="ROWS|SIZE",
        help="rows shuffled together when streaming, or the memory of one such window, like "
        "256MiB (default 96MiB; the stream holds 1 + --data-workers windows, printed at start)",
    )
    group.add_argument(
        "--prefetch",
        type=_typed("prefetch"),
        default=4,
        help="batches prepared ahead in a background thread when streaming (default 4; 0: none)",
    )
    group.add_argument(
        "--data-workers",
        type=_typed("data_workers"),
        default=1,
        help="threads decoding streamed data ahead (default 1)",
    )
    group.add_argument(
        "--seed",
        type=_typed("seed"),
        default=0,
        help="seed for weights, shuffling and splits (default 0)",
    )


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
        resume_from=args.checkpoint_dir
        if getattr(args, "checkpoint_dir", None) and args.resume
        else None,
    )
    if not args.quiet:
        if task.data_choice:
            print(f"batchfit {args.command}: {task.data_choice}", file=sys.stderr)
        for note in task.notes:
            print(f"batchfit {args.command}: note: {note}", file=sys.stderr)
    return task


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
    for add_command in COMMANDS:
        add_command(commands)
    return parser


def _add_plan_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "plan",
        help="count steps, iterations and epochs for a batch size",
        description="Count steps per epoch, iterations, the last batch and total steps.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  batchfit plan --samples 24000 --batch-size 32          # 750 steps\n"
        "  batchfit plan --samples 2000 --batch-size 10 --epochs 5  # 200 steps/epoch\n"
        "  batchfit plan --samples 1000 --batch-size 300 --micro-batch-size 128 "
        "--drop-last",
    )
    p.add_argument("--samples", type=_typed("samples"), required=True, help="training samples N")
    p.add_argument(
        "--batch-size",
        type=_typed("batch_size"),
        required=True,
        help="samples per optimizer step B, over all devices",
    )
    p.add_argument(
        "--micro-batch-size",
        type=_typed("micro_batch_size"),
        help="samples per forward/backward on one device (default: B / world size)",
    )
    p.add_argument(
        "--world-size", type=_typed("world_size"), default=1, help="number of devices (default 1)"
    )
    p.add_argument("--epochs", type=_typed("epochs"), help="epochs to train")
    p.add_argument("--max-steps", type=_typed("max_steps"), help="optimizer steps to train")
    p.add_argument(
        "--drop-last", action="store_true", help="drop the incomplete last batch of each epoch"
    )
    _add_json(p)
    p.set_defaults(run=_cmd_plan)


def _add_train_command(commands: argparse._SubParsersAction) -> None:
    t = commands.add_parser(
        "train",
        help="train with mini-batches (epochs or steps, checkpoints, resume)",
        description="Train a model with mini-batches of --batch-size samples per step.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  batchfit train --batch-size 32 --epochs 3\n"
        "  batchfit train --batch-size 1 --max-steps 2000            # online learning\n"
        "  batchfit train --batch-size 4000 --epochs 20 --lr 0.01     # full batch\n"
        "  batchfit train --batch-size 256 --micro-batch-size 64 --epochs 2 \\\n"
        "      --checkpoint-dir ckpt --checkpoint-every 50          # then add --resume\n"
        "  batchfit train --model models.py:make_mlp --data train.parquet --target y \\\n"
        "      --batch-size 64 --epochs 5\n"
        "  batchfit train --model models.py:make_mlp --data 'big/*.parquet' --target y \\\n"
        "      --batch-size 256 --epochs 2 --stream --shuffle-buffer 200000",
    )
    _add_task_options(t)
    g = t.add_argument_group("batches and length")
    g.add_argument(
        "--batch-size",
        type=_typed("batch_size"),
        required=True,
        help="samples per optimizer step (1: online learning; N: full batch)",
    )
    g.add_argument(
        "--micro-batch-size",
        type=_typed("micro_batch_size"),
        help="split each batch into micro-batches of this size (exact accumulation)",
    )
    g.add_argument("--epochs", type=_typed("epochs"), help="passes over the training set")
    g.add_argument(
        "--max-steps",
        type=_typed("max_steps"),
        help="optimizer steps (with --epochs: whichever ends first)",
    )
    g.add_argument("--drop-last", action="store_true", help="drop each epoch's incomplete batch")
    g.add_argument(
        "--steps-per-epoch",
        type=_typed("steps_per_epoch"),
        help="an epoch is this many steps (Keras); needed for epochs on a stream of unknown length",
    )
    g.add_argument(
        "--eval-batch-size",
        type=_typed("eval_batch_size"),
        help="batch size for validation (default max(micro-batch, 1024))",
    )
    o = t.add_argument_group("optimizer")
    o.add_argument(
        "--optimizer",
        type=_typed("optimizer"),
        default="adam",
        help="sgd (momentum 0.9), adam or adamw (default adam)",
    )
    o.add_argument(
        "--lr",
        type=_typed("lr"),
        help="learning rate (default: the example's own with adam/adamw, else 1e-3 for "
        "adam/adamw and 0.01 for sgd)",
    )
    o.add_argument("--momentum", type=_typed("momentum"), default=0.9, help="SGD momentum")
    o.add_argument("--weight-decay", type=_typed("weight_decay"), help="weight decay")
    c = t.add_argument_group("checkpoints and output")
    c.add_argument(
        "--checkpoint-dir",
        help="save a checkpoint here each epoch, every "
        "--checkpoint-every steps and on Ctrl-C/SIGTERM",
    )
    c.add_argument(
        "--checkpoint-every",
        type=_typed("checkpoint_every"),
        help="also checkpoint every this many steps",
    )
    c.add_argument(
        "--resume",
        action="store_true",
        help="continue exactly from the checkpoint in --checkpoint-dir",
    )
    c.add_argument(
        "--out", default="batchfit-run", help="folder for metrics.csv (default ./batchfit-run)"
    )
    c.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_json(t)
    t.set_defaults(run=_cmd_train)


def _add_tune_command(commands: argparse._SubParsersAction) -> None:
    t = commands.add_parser(
        "tune",
        help="measure memory, throughput and gradient noise; recommend a batch size and lr",
        description="Measure the memory ceiling, throughput and gradient noise scale of a model "
        "on its data, then recommend the batch size (and micro-batch) that minimises the "
        "predicted time to a result, and a learning rate for it. Writes report.json, report.md "
        "and PNG plots to --out. Measures on all of --data (no validation split unless "
        "--val-fraction is given).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  batchfit tune                                   # the built-in example\n"
        "  batchfit tune --memory-limit 2GB --time-budget 120 --out report\n"
        "  batchfit tune --lr 1e-3 --lr-batch-size 32      # scale your lr, no range test\n"
        "  batchfit tune --model models.py:make_mlp --data train.parquet --target y --json",
    )
    _add_task_options(t)
    g = t.add_argument_group("limits")
    g.add_argument(
        "--memory-limit",
        type=_typed("memory_limit"),
        help="peak memory allowed, e.g. 4GB or 512MiB; on CPU it covers the whole process (torch "
        "alone takes ~370 MiB) (default on CPU: this process's memory plus half the available "
        "RAM; on CUDA: the device's memory)",
    )
    g.add_argument(
        "--max-batch-size",
        type=_typed("max_batch_size"),
        help="largest batch size to consider (default: the data set size)",
    )
    g.add_argument(
        "--time-budget",
        type=_typed("time_budget"),
        help="seconds for the whole tune (default 60 on CPU, 300 on CUDA); less time means "
        "fewer trials and wider intervals",
    )
    o = t.add_argument_group("optimizer and learning rate")
    o.add_argument(
        "--optimizer",
        type=_typed("optimizer"),
        default="adam",
        help="sgd (momentum 0.9), adam or adamw (default adam)",
    )
    o.add_argument(
        "--lr",
        type=_typed("lr"),
        help="your learning rate, tuned at --lr-batch-size; scaled to the recommended batch "
        "(default: a learning-rate range test at the recommended batch)",
    )
    o.add_argument(
        "--lr-batch-size",
        type=_typed("lr_batch_size"),
        default=32,
        help="the batch size --lr was tuned at (default 32)",
    )
    o.add_argument(
        "--lr-scaling",
        type=_typed("lr_scaling"),
        help="how lr follows the batch size: linear, sqrt or none (default: sqrt for "
        "adam/adamw, linear for sgd)",
    )
    c = t.add_argument_group("output")
    c.add_argument(
        "--out", default="batchfit-report", help="folder for the report (default ./batchfit-report)"
    )
    c.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    c.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    _add_json(t)
    # tune measures training only: all of --data is used unless a split is asked for.
    t.set_defaults(run=_cmd_tune, val_fraction=0.0)


def _process_started() -> float:
    """When the time budget starts: at the process start when this process is the ``batchfit``
    command (so that importing torch and loading data count), else now (called from Python)."""
    import time

    import psutil

    # `python -m pytest` also runs a __main__.py: only batchfit's own counts.
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if os.path.basename(sys.argv[0]) == "batchfit" or getattr(spec, "name", "") == (
        "batchfit.__main__"
    ):
        return psutil.Process().create_time()
    return time.time()


def _cmd_tune(args: argparse.Namespace) -> int:
    import time

    from batchfit.orchestrate.tune import tune
    from batchfit.progress import console
    from batchfit.report.tune_report import headline, reasons_line

    started = _process_started()
    task = _load_task(args)
    model, warmup_lr = _model_and_lr(args, task)

    def log(message: str) -> None:
        if not args.quiet:
            console().print(f"[{time.time() - started:5.1f}s] {message}", markup=False)

    result = tune(
        model,
        task.train,
        loss=task.loss,
        optimizer=args.optimizer,
        lr=args.lr,
        lr_batch_size=args.lr_batch_size,
        lr_scaling=args.lr_scaling,
        warmup_lr=warmup_lr,
        memory_limit=args.memory_limit,
        max_batch_size=args.max_batch_size,
        time_budget=args.time_budget,
        device=args.device,
        seed=args.seed,
        out_dir=args.out,
        task_name=task.name,
        budget_started=started,
        log=log,
    )
    report = result.to_report()  # the very object written to report.json
    if args.json:
        print(to_json(report))
        return 0
    from rich.console import Console

    out = Console(highlight=False, soft_wrap=True)
    out.print(f"[bold]batchfit tune: {headline(report)}[/bold]")
    out.print(f"  {reasons_line(report)}", markup=False)
    out.print("why:")
    for line in result.decision:
        out.print(f"  - {line}", markup=False)
    if result.skipped:
        out.print("cut short or skipped:")
        for line in result.skipped:
            out.print(f"  - {line}", markup=False)
    plots = sum(1 for f in result.report_files if f.endswith(".png"))
    out.print(
        f"report: {args.out}/report.md (and report.json, {plots} plots); "
        f"{time.time() - started:.1f} s in all",
        markup=False,
    )
    return 0


def _add_sweep_command(commands: argparse._SubParsersAction) -> None:
    s = commands.add_parser(
        "sweep",
        help="train one short run per batch size; compare validation, sharpness, time to target",
        description="Train one short run per batch size from the same initial weights and seed, "
        "then compare validation quality, train-validation gap, sharpness (top Hessian "
        "eigenvalue) and time to a target. Writes sweep.json, sweep.md and plots to --out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  batchfit sweep                                   # built-in example, B=32..256\n"
        "  batchfit sweep --batch-sizes 1,32,256,N --epochs 5 --target val_accuracy=0.8\n"
        "  batchfit sweep --steps 500 --lr-scaling none    # equal updates, same lr\n"
        "  batchfit sweep --lr-grid --report batchfit-report/report.json\n"
        "  batchfit sweep --model models.py:make_mlp --data train.parquet --target y \\\n"
        "      --batch-sizes 16,64,256 --epochs 10 --resume",
    )
    _add_task_options(s, target_level=True)
    g = s.add_argument_group("batch sizes and budget")
    g.add_argument(
        "--batch-sizes",
        default="32,64,128,256",
        help="comma-separated batch sizes; N means the whole training set (default 32,64,128,256)",
    )
    budget = g.add_mutually_exclusive_group()
    budget.add_argument(
        "--epochs",
        type=_typed("epochs"),
        help="equal examples: this many epochs at every size (default 40)",
    )
    budget.add_argument(
        "--examples",
        type=_typed("examples"),
        help="equal examples: this many samples at every size (give or take one batch)",
    )
    budget.add_argument(
        "--steps", type=_typed("steps"), help="equal updates: this many optimizer steps per size"
    )
    g.add_argument(
        "--micro-batch-size",
        type=_typed("micro_batch_size"),
        help="split larger batches into micro-batches of this size (exact accumulation); also "
        "bounds evaluation and sharpness",
    )
    o = s.add_argument_group("learning rate")
    o.add_argument(
        "--optimizer",
        type=_typed("optimizer"),
        default="adam",
        help="sgd (momentum 0.9), adam or adamw (default adam)",
    )
    o.add_argument(
        "--lr",
        type=_typed("lr"),
        help="learning rate at --lr-batch-size (default: the example's, or 1e-3 adam / 0.01 sgd)",
    )
    o.add_argument(
        "--lr-batch-size",
        type=_typed("lr_batch_size"),
        default=32,
        help="the batch size --lr was tuned at (default 32)",
    )
    o.add_argument(
        "--lr-scaling",
        type=_typed("lr_scaling"),
        help="how lr follows the batch size: none, linear or sqrt "
        "(default: linear for sgd, sqrt for adam/adamw)",
    )
    o.add_argument(
        "--lr-grid",
        nargs="?",
        const="",
        metavar="FACTORS",
        help="also try these factors of the scaled lr at each size and keep the best by "
        "validation (default factors 0.25,0.5,1,2,4)",
    )
    o.add_argument(
        "--momentum", type=_typed("momentum"), default=0.9, help="SGD momentum (default 0.9)"
    )
    o.add_argument("--weight-decay", type=_typed("weight_decay"), help="weight decay")
    r = s.add_argument_group("measurements and output")
    r.add_argument(
        "--report",
        metavar="PATH",
        help="tune's report.json: its recommended batch size joins the sweep, one more run "
        "trains it at tune's lr, and the verdict says whether that run agrees",
    )
    r.add_argument(
        "--eval-points",
        type=_typed("eval_points"),
        default=20,
        help="about this many validation evaluations per run, evenly spaced (default 20)",
    )
    r.add_argument(
        "--eval-batch-size",
        type=_typed("eval_batch_size"),
        help="batch size for evaluation (default: --micro-batch-size if given, else 1024)",
    )
    r.add_argument(
        "--sharpness-samples",
        type=_typed("sharpness_samples"),
        default=512,
        help="training samples in the fixed batch for sharpness (default 512)",
    )
    r.add_argument("--resume", action="store_true", help="skip the runs already finished in --out")
    r.add_argument(
        "--out", default="batchfit-sweep", help="folder for the report (default ./batchfit-sweep)"
    )
    r.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    r.add_argument("--quiet", action="store_true", help="no progress on stderr")
    _add_json(s)
    s.set_defaults(run=_cmd_sweep)


def _version() -> str:
    from batchfit import __version__

    return f"batchfit {__version__}"


def _print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    Console(highlight=False).print(table)


def _cmd_plan(args: argparse.Namespace) -> int:
    from batchfit.core.accounting import plan

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
    from batchfit.core.accounting import micro_batch_sizes

    division = "floor" if p.drop_last else "ceil"
    busiest = max(p.per_rank_batch_size)
    split = " + ".join(str(s) for s in micro_batch_sizes(busiest, p.micro_batch_size))
    per_device = f"{busiest} = micro-batches {split} (accumulation {p.accumulation})"
    if p.world_size > 1:
        shares = set(p.per_rank_batch_size)
        per_device += (
            f", on each of {p.world_size} devices"
            if len(shares) == 1
            else f"; devices get {list(p.per_rank_batch_size)}"
        )
    if p.dropped_per_epoch:
        last = f"{p.last_batch_size}   ({p.dropped_per_epoch} samples dropped per epoch)"
    elif p.last_batch_size != p.batch_size:
        last = f"{p.last_batch_size}   (the remainder)"
    else:
        last = f"{p.last_batch_size}"
    if p.last_batch_size != p.batch_size:
        full = p.steps_per_epoch - 1
        epoch = f"{p.samples_per_epoch} samples = {full} x {p.batch_size} + {p.last_batch_size}"
    else:
        epoch = f"{p.samples_per_epoch} samples = {p.steps_per_epoch} steps x {p.batch_size}"
    rows = [
        (
            "steps per epoch",
            f"{p.steps_per_epoch}   ({division}({p.samples} / {p.batch_size}); "
            "a step is one batch, one optimizer update)",
        ),
        ("batch size", f"{p.batch_size} samples per step, over all devices"),
        ("last batch size", last),
        ("per device, per step", per_device),
        (
            "iterations per epoch",
            f"{p.iterations_per_epoch}   (micro-batch forward+backward passes per device)",
        ),
        ("one epoch", epoch),
    ]
    if p.world_size > 1 and p.last_batch_size != p.batch_size:
        shares = list(p.per_rank_last_batch_size)
        idle = shares.count(0)
        note = (
            f"   ({idle} of {p.world_size} devices get no sample in the last step; "
            "--drop-last drops it)"
            if idle
            else "   (every device still takes the step: equal step counts)"
        )
        rows.append(("last batch per device", f"{shares}{note}"))
    if p.total_steps is not None:
        rows.append(
            (
                "total steps",
                f"{p.total_steps}   ({_fmt_epochs(p.epochs_run)} epochs, "
                f"{p.total_samples} samples, {p.total_iterations} "
                "iterations per device)",
            )
        )
    _print_table(f"batchfit plan: {p.samples} samples, batch size {p.batch_size}", rows)
    return 0


def _fmt_epochs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if value == int(value) else f"{value:.3f}"


def _model_and_lr(args: argparse.Namespace, task) -> tuple[Any, float | None]:
    """The task's model, seeded by --seed, and --lr or the task's suggestion for Adam-family."""
    import torch

    torch.manual_seed(args.seed)
    model = task.make_model()
    if args.lr is not None:
        return model, args.lr
    return model, task.suggested_lr if args.optimizer != "sgd" else None


def _resume_command(args: argparse.Namespace) -> str:
    """The command line as typed, with --resume added if it is not there."""
    command = "batchfit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return command if args.resume else command + " --resume"


def _cmd_train(args: argparse.Namespace) -> int:
    from batchfit.loop.train import train

    task = _load_task(args)
    model, lr = _model_and_lr(args, task)
    quiet = args.quiet
    try:
        result = train(
            model,
            task.train,
            val_data=task.val,
            loss=task.loss,
            batch_size=args.batch_size,
            micro_batch_size=args.micro_batch_size,
            epochs=args.epochs,
            max_steps=args.max_steps,
            drop_last=args.drop_last,
            optimizer=args.optimizer,
            lr=lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            seed=args.seed,
            eval_batch_size=args.eval_batch_size,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            out_dir=args.out,
            device=args.device,
            progress=not quiet,
            steps_per_epoch=args.steps_per_epoch,
        )
    except TrainingInterrupted as exc:
        hint = f" Resume with: {_resume_command(args)}" if args.checkpoint_dir else ""
        print(f"batchfit train: {exc}{hint}", file=sys.stderr)
        return EXIT_SIGNAL.get(exc.signal_name, 1)
    except BatchfitError as exc:
        if exc.checkpoint_path:  # bad data met while training: fix it, then continue from there
            exc.args = (f"{exc} Once the data is fixed, resume with: {_resume_command(args)}",)
        raise
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
        ("time", f"{result.seconds:.1f} s"),
        ("metrics", result.metrics_path or "-"),
    ]
    if result.checkpoint_path:
        rows.append(("checkpoint", result.checkpoint_path))
    _print_table("batchfit train: done", rows)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from batchfit.core.sweep_verdict import METRICS
    from batchfit.orchestrate.sweep import sweep

    if args.target is not None and args.data is None:
        raise BatchfitError(
            f"--target {args.target} names a data column, which needs --data; a target level is "
            "METRIC=VALUE, e.g. --target val_accuracy=0.9 or --target val_loss=0.5."
        )
    try:
        task = _load_task(args)
    except BatchfitError as exc:
        if args.target in METRICS:  # meant as a level to reach, but it has no "=VALUE"
            raise BatchfitError(
                f"{exc} (for a level to reach, write --target {args.target}=VALUE)"
            ) from None
        raise
    model, lr = _model_and_lr(args, task)
    try:
        result = sweep(
            model,
            task.train,
            val_data=task.val,
            loss=task.loss,
            batch_sizes=args.batch_sizes,
            epochs=args.epochs,
            steps=args.steps,
            examples=args.examples,
            optimizer=args.optimizer,
            lr=lr,
            lr_batch_size=args.lr_batch_size,
            lr_scaling=args.lr_scaling,
            lr_grid=args.lr_grid,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            micro_batch_size=args.micro_batch_size,
            eval_batch_size=args.eval_batch_size,
            target=args.target_level,
            seed=args.seed,
            eval_points=args.eval_points,
            sharpness_samples=args.sharpness_samples,
            out_dir=args.out,
            resume=args.resume,
            report=args.report,
            device=args.device,
            progress=not args.quiet,
            task_name=task.name,
        )
    except TrainingInterrupted as exc:
        print(f"batchfit sweep: {exc} Resume with: {_resume_command(args)}", file=sys.stderr)
        return EXIT_SIGNAL.get(exc.signal_name, 1)
    report = result.to_dict()
    if args.json:
        print(to_json(report))
        return 0
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
    console.print(f"report: {result.files.get('markdown')} (and sweep.json, plots) in {args.out}")
    return 0


#: One function per command adds its subparser; a command's handler is set as ``run``.
COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_plan_command,
    _add_train_command,
    _add_tune_command,
    _add_sweep_command,
)


def _flags_of(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """Option name -> the flag that sets it, for the command's own flags (library messages name
    options; while a command runs they show as its flags)."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = commands.choices[command]
    names = {"out": "out_dir"}
    return {
        names.get(a.dest, a.dest): a.option_strings[0]
        for a in sub._actions
        if a.option_strings and names.get(a.dest, a.dest) in options.OPTIONS
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: argparse already printed
        return int(exc.code or 0)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        with options.named_as_flags(_flags_of(parser, args.command)):
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

"""Every option in one table: its name, what it accepts, its default and its help.

:data:`OPTIONS` has one :class:`Option` row per option. The Python API checks values with
:func:`check`, the command line parses text with :func:`parse` (its flags are generated from the
same rows, see :mod:`batchfit.cli`), and the configs of :mod:`batchfit.core.configs` take their
fields' defaults from here; both raise :class:`~batchfit.errors.BatchfitError` with one message
template:

    The 'batch_size' option must be an int >= 1. Got 0 instead.

A row holds every default of its option: one value, or one per command, device type or optimizer
(:class:`Varies`); :func:`default_of` reads them, and the command line's help shows them
(:func:`shown_default`), so a help text never restates a default.

Messages name an option with :func:`opt`: ``'checkpoint_dir'`` for a Python caller, and
``--checkpoint-dir`` while the command line runs (:func:`named_as_flags`), so the library never
speaks in flags a Python user does not have.

Examples:
    >>> check("batch_size", 32)
    32
    >>> parse("lr", "3e-4")
    0.0003
    >>> OPTIONS["optimizer"].default, OPTIONS["out_dir"].flag
    ('adam', '--out')
    >>> default_of("val_fraction", "train"), default_of("val_fraction", "tune")
    (0.1, 0.0)
    >>> default_of("time_budget", device="cuda")
    300.0
    >>> check("batch_size", 0)
    Traceback (most recent call last):
    ...
    batchfit.errors.BatchfitError: The 'batch_size' option must be an int >= 1. Got 0 instead.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from batchfit.core.rules import (
    Choice,
    Flag,
    Float,
    Int,
    IntOrAuto,
    RowsOrSize,
    Rule,
    Size,
    Text,
)
from batchfit.core.units import SizeTooLarge
from batchfit.errors import BatchfitError

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCALING_RULES = ("none", "linear", "sqrt")
#: The precisions batchfit trains in (Lightning's names; batchfit.precision applies them).
PRECISIONS = ("32", "bf16-mixed", "16-mixed")


#: What a default may vary by: the running command, the device type or the optimizer.
VARIES_BY = ("command", "device", "optimizer")


@dataclass(frozen=True)
class Varies:
    """A default that is one value per command, device type or optimizer (``by``): ``values``
    holds each one's own; one not in it takes ``otherwise``.

    >>> Varies("device", {"cpu": 60.0, "cuda": 300.0}).of(device="cuda")
    300.0
    >>> Varies("command", {"tune": 0.0}, otherwise=0.1).of(command="train")
    0.1
    """

    by: str
    values: Mapping[str, Any]
    otherwise: Any = None

    def __post_init__(self) -> None:
        if self.by not in VARIES_BY:
            raise ValueError(f"a default varies by one of {VARIES_BY}, not {self.by!r}")

    def of(
        self, command: str | None = None, device: str | None = None, optimizer: str | None = None
    ) -> Any:
        key = {"command": command, "device": device, "optimizer": optimizer}[self.by]
        return self.values.get(key, self.otherwise) if key is not None else self.otherwise


@dataclass(frozen=True)
class Option:
    """One option and every default it has.

    ``default`` is the Python API's, the value a config holds when the option is not given;
    ``cli_default`` the command line's where the two differ on purpose (a library call writes no
    files unasked; the command shows progress), a :class:`Varies` by command where the commands
    differ. ``run_default`` is the value a run takes where both hold ``None`` ("not given")
    because the value depends on the command, the device or the optimizer, or because "not
    given" means more than the value (a built-in example keeps its own validation set).
    ``shown`` is how the help writes the default in words, ``{}`` standing for the value ("max(
    micro-batch, {})"); per command as a :class:`Varies`. ``help`` describes the option and never
    restates a default: :func:`shown_default` appends it. It may name other options as
    ``{name}``: the command line shows their flags there. ``cli`` holds extra argparse settings
    (``nargs``, ``metavar``, ``action``)."""

    name: str
    rule: Rule
    default: Any = None
    help: str = ""
    flag: str | None = None
    cli_default: Any = field(default=None)
    cli: Mapping[str, Any] = field(default_factory=dict)
    run_default: Any = None
    shown: str | Varies | None = None

    @property
    def flags(self) -> tuple[str, ...]:
        """The command-line spellings, the first one shown in messages."""
        return (self.flag or "--" + self.name.replace("_", "-"),) + tuple(
            self.cli.get("aliases", ())
        )

    def held_default(self, command: str | None = None, *, cli: bool = False) -> Any:
        """What a config (``cli=False``) or ``command``'s parser holds when the option is not
        given; ``None`` leaves the value to the run (:attr:`run_default`)."""
        held = self.cli_default if cli and self.cli_default is not None else self.default
        return held.of(command) if isinstance(held, Varies) else held


def _rows(*rows: Option) -> dict[str, Option]:
    return {row.name: row for row in rows}


#: Stream ``data`` files when loading them would take over this share of the available memory.
#: :func:`batchfit.data.stream.load_file` decides by its own ``LOAD_SHARE_OF_AVAILABLE``, held equal
#: to this one by tests/test_option_table.py until it reads this one.
STREAM_SHARE_OF_AVAILABLE = 0.25
#: tune's memory limit on CPU when none is given: this process's memory now plus this share of
#: the RAM still available (:func:`batchfit.probe.memory.default_memory_limit`).
CPU_RAM_SHARE = 0.5
#: SGD's momentum, unless ``momentum`` says otherwise (tune has no ``momentum`` option).
SGD_MOMENTUM = 0.9
#: tune's time budget when none is given, per device type; also train's ``tune_budget``.
_TIME_BUDGET = Varies("device", {"cpu": 60.0, "cuda": 300.0})

#: The table. Order is the order of the command line's help within a group.
OPTIONS: dict[str, Option] = _rows(
    # -- the task: which model, which data (train, tune, sweep)
    Option("example", Text(), help="built-in example", run_default="mnist1d"),
    Option("model", Text(), help="package.module:factory returning your nn.Module"),
    Option(
        "data",
        Text(),
        help="training data: .parquet/.csv/.arrow/.npy/.npz file, folder or quoted glob, or "
        "package.module:factory returning a torch Dataset or IterableDataset",
    ),
    Option("val_data", Text(), help="validation data, same forms as {data}"),
    Option(
        "val_fraction",
        Float(0.0, 1.0, open_high=True),
        help="seeded share of {data} held out for validation; 0: none",
        # tune measures training only, so it keeps all of the data (its race holds out its own)
        run_default=Varies("command", {"tune": 0.0}, otherwise=0.1),
    ),
    Option(
        "features",
        Text(objects=True),
        help="comma-separated feature columns",
        shown="all but the target",
    ),
    Option("target", Text(), help="target column", shown="one named target, label or y"),
    Option(
        "loss",
        Text(objects=True),
        help="cross_entropy, mse, bce or package.module:fn",
        shown="from the target: integers -> cross_entropy, floats -> mse",
    ),
    Option(
        "stream",
        Flag(),
        help="read {data} files piece by piece, or load them whole with --no-stream",
        cli={"action": "boolean_optional"},
        shown=f"stream when loading would take over {STREAM_SHARE_OF_AVAILABLE:.0%} of the "
        "available memory",
    ),
    Option(
        "shuffle_buffer",
        RowsOrSize(),
        help="rows shuffled together when streaming, or the memory of one such window, like "
        "256MiB; the stream holds 1 + {data_workers} windows, printed at start",
        cli={"metavar": "ROWS|SIZE"},
        run_default="96MiB",
    ),
    Option(
        "prefetch",
        Int(0),
        4,
        "batches prepared ahead in a background thread when streaming; 0: none",
    ),
    Option("data_workers", Int(1, 64), 1, "threads decoding streamed data ahead"),
    Option("seed", Int(0, 2**63 - 1), 0, "seed for weights, shuffling and splits"),
    Option(
        "threads",
        Int(1),
        help="torch threads for this run (set back afterwards)",
        shown=Varies(
            "command",
            {"tune": "torch's own, or on an oversubscribed CPU the fastest measured"},
            otherwise="torch's own",
        ),
    ),
    # -- sizes and length (plan, train, sweep)
    Option("samples", Int(1), help="training samples N"),
    Option(
        "batch_size",
        IntOrAuto(1),
        help="samples per optimizer step B, over all devices; train takes 'auto': tune first "
        "(within {tune_budget}), then train with its batch size and lr",
    ),
    Option(
        "micro_batch_size",
        Int(1),
        help="split each batch into micro-batches of this size (exact accumulation)",
        shown=Varies("command", {"plan": "B / world size"}),
    ),
    Option("world_size", Int(1), 1, "number of devices"),
    Option(
        "epochs",
        Int(1),
        help="passes over the training set",
        run_default=Varies("command", {"sweep": 40}),  # train needs epochs or steps given
    ),
    Option("max_steps", Int(1), help="optimizer steps (with {epochs}: whichever ends first)"),
    Option("drop_last", Flag(), False, "drop each epoch's incomplete batch"),
    Option(
        "steps_per_epoch",
        Int(1),
        help="an epoch is this many steps (Keras); needed for epochs on a stream of unknown length",
    ),
    Option(
        "eval_batch_size",
        Int(1),
        help="batch size for validation",
        run_default=1024,
        shown=Varies(
            "command",
            {"sweep": "{micro_batch_size} if given, else {}"},
            otherwise="max(micro-batch, {})",
        ),
    ),
    Option("eval_every", Int(1), help="also validate every this many steps"),
    Option(
        "regrow_after",
        Int(0),
        100,
        "after an out-of-memory back-off, try twice the micro-batch (up to the configured one) "
        "after this many clean steps; 0: never",
    ),
    Option(
        "adaptive",
        Flag(),
        False,
        "let the batch size follow the gradient noise scale measured while training, within "
        "{min_batch_size} and {max_batch_size}, rescaling {lr}",
    ),
    Option(
        "adapt_every",
        Int(1),
        50,
        "with {adaptive}: re-choose the batch size every this many steps",
    ),
    Option(
        "min_batch_size",
        Int(1),
        help="with {adaptive}: the smallest batch size",
        shown="the starting {batch_size}",
    ),
    # -- optimizer and learning rate
    Option(
        "optimizer",
        Choice(OPTIMIZERS),
        "adam",
        f"sgd (momentum {SGD_MOMENTUM:g}), adam or adamw",
    ),
    Option(
        "lr",
        Float(0.0, open_low=True),
        help="learning rate",
        run_default=Varies("optimizer", {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}),
        shown=Varies(
            "command",
            {"tune": "a learning-rate range test at the recommended batch"},
            otherwise="the example's own with adam/adamw; otherwise {}",
        ),
    ),
    Option("momentum", Float(0.0, 1.0, open_high=True), SGD_MOMENTUM, "SGD momentum"),
    Option("weight_decay", Float(0.0), help="weight decay"),
    Option("lr_batch_size", Int(1), 32, "the batch size {lr} was tuned at"),
    Option(
        "lr_scaling",
        Choice(LR_SCALING_RULES),
        help="how lr follows the batch size: none, linear or sqrt",
        run_default=Varies("optimizer", {"sgd": "linear", "adam": "sqrt", "adamw": "sqrt"}),
    ),
    Option("warmup_lr", Float(0.0, open_low=True), help="the noise probe's warm-up learning rate"),
    # -- checkpoints and output
    Option(
        "checkpoint_dir",
        Text(objects=True),
        help="save a checkpoint here each epoch, every {checkpoint_every} steps and on "
        "Ctrl-C/SIGTERM",
    ),
    Option("checkpoint_every", Int(1), help="also checkpoint every this many steps"),
    Option("resume", Flag(), False, "continue exactly from the checkpoint in {checkpoint_dir}"),
    Option(
        "out_dir",
        Text(objects=True),
        help="folder for the output files",
        flag="--out",
        # a library call writes no files unasked; each command writes its own folder
        cli_default=Varies(
            "command",
            {"train": "batchfit-run", "tune": "batchfit-report", "sweep": "batchfit-sweep"},
        ),
    ),
    Option("device", Text(objects=True), "auto", "auto, cpu, cuda or cuda:N"),
    Option(
        "precision",
        Choice(PRECISIONS),
        "32",
        "32 (float32), bf16-mixed or 16-mixed (forward and loss under bfloat16 or float16 "
        "autocast, weights float32; 16-mixed scales the loss)",
    ),
    Option(
        "progress",
        Flag(),
        False,
        "no progress on stderr",
        flag="--quiet",
        cli_default=True,
        cli={"action": "store_false"},
    ),
    Option("json", Flag(), False, "print one JSON object on stdout instead of tables"),
    Option(
        "compile",
        Flag(),
        False,
        "compile the model's forward with torch.compile (dynamic shapes: one graph for every "
        "batch size), warmed up before anything is timed",
    ),
    # -- tune
    Option(
        "memory_limit",
        Size(2**20),
        help="peak memory allowed, e.g. 4GB or 512MiB; on CPU it covers the whole process (torch "
        "alone takes ~370 MiB)",
        shown=Varies(
            "command",
            {
                "train": "no limit; out-of-memory errors still back off",
                "tune": f"on CPU, this process's memory plus {CPU_RAM_SHARE:.0%} of the "
                "available RAM; on CUDA, the device's memory",
            },
        ),
    ),
    Option(
        "max_batch_size",
        Int(1),
        help="largest batch size to consider",
        shown="the data set size",
    ),
    Option(
        "time_budget",
        Float(0.0, open_low=True),
        help=(
            "seconds for the whole tune; less time means fewer trials and wider intervals. The "
            "race that confirms the answer needs about 10 s of budget on a small model (the "
            "built-in example), more on a slower one; without it the answer is PROVISIONAL"
        ),
        run_default=_TIME_BUDGET,
    ),
    Option("headroom", Float(0.0, 1.0, open_high=True), 0.1, "memory kept free"),
    Option("batches", Int(1), help="batches to average the noise scale over"),
    Option(
        "tune_budget",
        Float(0.0, open_low=True),
        help="with {batch_size} auto: seconds for tune before training",
        run_default=_TIME_BUDGET,
        shown="tune's own time budget, {}",
    ),
    # -- sweep
    Option(
        "batch_sizes",
        Text(objects=True),
        (32, 64, 128, 256),
        "comma-separated batch sizes; N means the whole training set",
        cli_default="32,64,128,256",
    ),
    Option("steps", Int(1), help="equal updates: this many optimizer steps per size"),
    Option(
        "examples",
        Int(1),
        help="equal examples: this many samples at every size (give or take one batch)",
        flag="--examples-per-size",
        cli={"aliases": ("--examples",)},
    ),
    Option(
        "lr_grid",
        Text(objects=True),
        help="also try factors of the scaled lr at each size and keep the best by validation; "
        "given alone, the factors 0.25,0.5,1,2,4",
        cli={"nargs": "?", "const": "", "metavar": "FACTORS"},
        shown="no grid",
    ),
    Option("lr_grid_factor", Float(0.0, open_low=True), help="one factor of {lr_grid}"),
    Option(
        "target_level",
        Text(objects=True),
        help="the level to reach: val_accuracy=0.9 or val_loss=0.5",
    ),
    Option(
        "report",
        Text(objects=True),
        help="tune's report.json: its recommended batch size joins the sweep, one more run "
        "trains it at tune's lr, and the verdict says whether that run agrees",
        cli={"metavar": "PATH"},
    ),
    Option(
        "eval_points",
        Int(1),
        20,
        "about this many validation evaluations per run, evenly spaced",
    ),
    Option(
        "sharpness_samples",
        Int(1),
        512,
        "training samples in the fixed batch for sharpness",
    ),
    Option("sharpness_iterations", Int(1), 50, "power-iteration steps for sharpness"),
    Option("sharpness_tolerance", Float(0.0, open_low=True), 1e-3, "sharpness convergence"),
    Option("train_subset_samples", Int(1), 1000, "training samples scored like validation"),
)


def default_of(
    name: str,
    command: str | None = None,
    *,
    device: str | None = None,
    optimizer: str | None = None,
    cli: bool = False,
) -> Any:
    """The value option ``name`` takes when it is not given: from Python (or from ``command``'s
    command line, ``cli=True``), for ``command`` on a ``device`` type with an ``optimizer`` where
    the default varies with them; ``None`` where it has no default there.

    >>> default_of("momentum"), default_of("prefetch")
    (0.9, 4)
    >>> default_of("out_dir"), default_of("out_dir", "tune", cli=True)
    (None, 'batchfit-report')
    >>> default_of("lr", optimizer="sgd"), default_of("epochs", "sweep")
    (0.01, 40)
    >>> default_of("epochs", "train") is None  # train needs epochs or steps given
    True
    """
    row = OPTIONS[name]
    value = row.held_default(command, cli=cli)
    if value is None:
        value = row.run_default
    if isinstance(value, Varies):
        return value.of(command, device, optimizer)
    return value


def shown_default(name: str, command: str | None = None) -> str | None:
    """The default of option ``name`` as ``command``'s help writes it, from the row (``None``:
    none to show, as for a flag that is off unless given). ``{name}`` in it names another option.

    >>> shown_default("time_budget"), shown_default("val_fraction", "tune")
    ('60 on CPU, 300 on CUDA', '0')
    >>> shown_default("eval_batch_size", "train"), shown_default("lr_scaling")
    ('max(micro-batch, 1024)', 'linear for sgd, sqrt for adam/adamw')
    >>> shown_default("drop_last") is None
    True
    """
    row = OPTIONS[name]
    words = row.shown.of(command) if isinstance(row.shown, Varies) else row.shown
    value = row.held_default(command, cli=True)
    if value is None:
        value = row.run_default
    if isinstance(value, Varies) and value.by == "command":
        value = value.of(command)
    if words is None and (value is None or isinstance(row.rule, Flag)):
        return None
    text = "" if value is None else shown_value(value)
    return text if words is None else words.replace("{}", text)


def shown_value(value: Any) -> str:
    """A default value as the help writes it: as typed on the command line; one that varies by
    device type or optimizer as each one's value.

    >>> shown_value(0.001), shown_value((32, 64)), shown_value(Varies("device", {"cuda": 300.0}))
    ('0.001', '32,64', '300 on CUDA')
    """
    if isinstance(value, Varies):
        by_value: dict[str, list[str]] = {}
        for key, one in value.values.items():
            by_value.setdefault(shown_value(one), []).append(key)
        if value.by == "device":  # "60 on CPU, 300 on CUDA"
            parts = (f"{v} on {' or '.join(k.upper() for k in ks)}" for v, ks in by_value.items())
        else:  # "linear for sgd, sqrt for adam/adamw"
            parts = (f"{v} for {'/'.join(ks)}" for v, ks in by_value.items())
        return ", ".join(parts)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(shown_value(v) for v in value)
    return str(value)


def _message(name: str, got: Any, fix: str | None) -> str:
    rule = OPTIONS[name].rule
    text = f"The '{name}' option must be {rule.describe()}. Got {got!r} instead."
    fix = fix or (rule.hint(got) if isinstance(rule, IntOrAuto) else None)
    return f"{text} {fix}" if fix else text


def check(name: str, value: Any, fix: str | None = None) -> Any:
    """Return ``value`` if option ``name`` accepts it, else raise a BatchfitError naming both."""
    rule = OPTIONS[name].rule
    if not rule.accepts(value):
        raise BatchfitError(_message(name, value, fix))
    if isinstance(rule, IntOrAuto) and value != "auto":
        return int(value)
    if isinstance(rule, (Int, Size)) or (
        isinstance(rule, RowsOrSize) and not isinstance(value, str)
    ):
        return int(value)  # a NumPy integer becomes a plain int (JSON, checkpoints)
    return float(value) if isinstance(rule, Float) else value


def check_optional(name: str, value: Any, fix: str | None = None) -> Any:
    """Like :func:`check`, but ``None`` (option not given) passes through."""
    return None if value is None else check(name, value, fix)


def parse(name: str, text: str) -> Any:
    """Convert command-line text for option ``name`` and check it."""
    rule = OPTIONS[name].rule
    try:
        value = rule.convert(text)
    except (ValueError, TypeError) as exc:
        fix = str(exc) if isinstance(exc, SizeTooLarge) else None  # say why a number is refused
        raise BatchfitError(_message(name, text, fix)) from None
    if not rule.accepts(value):
        raise BatchfitError(_message(name, text, None))
    return value


# How messages name options: None while called from Python, else the running command's flags.
_FLAGS: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "batchfit_option_flags", default=None
)


def opt(name: str) -> str:
    """An option as a message should name it: ``'checkpoint_dir'`` for a Python caller, the flag
    (``--checkpoint-dir``) while a command that has it runs.

    >>> opt("checkpoint_dir")
    "'checkpoint_dir'"
    >>> with named_as_flags({"checkpoint_dir": "--checkpoint-dir"}):
    ...     opt("checkpoint_dir")
    '--checkpoint-dir'
    """
    if name not in OPTIONS:
        raise KeyError(f"no option named {name!r}")
    flags = _FLAGS.get()
    if flags is not None and name in flags:
        return flags[name]
    return f"'{name}'"


def opt_value(name: str, value: Any) -> str:
    """An option set to a value, as a user would write it: ``batch_size=10`` from Python,
    ``--batch-size 10`` on the command line (``--flag`` alone for a flag that is on; ``--no-stream``
    or ``no --drop-last`` for one that is off; ``no --weight-decay`` for a setting not given).

    >>> opt_value("batch_size", 10), opt_value("resume", True)
    ('batch_size=10', 'resume=True')
    >>> with named_as_flags({"batch_size": "--batch-size", "stream": "--stream"}):
    ...     opt_value("batch_size", 10), opt_value("stream", True), opt_value("stream", False)
    ('--batch-size 10', '--stream', '--no-stream')
    """
    flags = _FLAGS.get()
    if flags is None or name not in flags:
        return f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}"
    if value is True:
        return flags[name]
    if value is False and OPTIONS[name].cli.get("action") == "boolean_optional":
        return f"--no-{flags[name][2:]}"
    if value is None or value is False:  # a flag left out, a setting not given
        return f"no {flags[name]}"
    return f"{flags[name]} {value}"


@contextlib.contextmanager
def named_as_flags(flags: Mapping[str, str]) -> Iterator[None]:
    """Within this block, :func:`opt` names the options in ``flags`` (name -> flag) as flags."""
    token = _FLAGS.set(dict(flags))
    try:
        yield
    finally:
        _FLAGS.reset(token)


__all__ = [
    "CPU_RAM_SHARE",
    "OPTIMIZERS",
    "LR_SCALING_RULES",
    "OPTIONS",
    "SGD_MOMENTUM",
    "STREAM_SHARE_OF_AVAILABLE",
    "Option",
    "Choice",
    "Flag",
    "Float",
    "Int",
    "IntOrAuto",
    "RowsOrSize",
    "Size",
    "Text",
    "Varies",
    "check",
    "check_optional",
    "default_of",
    "named_as_flags",
    "opt",
    "opt_value",
    "parse",
    "shown_default",
    "shown_value",
]

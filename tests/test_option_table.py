"""One table of options: the command line's flags, the configs' defaults and the help all come from
it, and the policy the command line applies lives in the library, where Python callers get it too.
"""

from __future__ import annotations

import dataclasses
import re
import time

import pytest

from batchfit.cli import COMMANDS, build_parser
from batchfit.core import options
from batchfit.core.configs import SweepConfig, TrainConfig, TuneConfig
from batchfit.core.options import OPTIMIZERS, OPTIONS, default_of, named_as_flags, opt, opt_value
from batchfit.errors import BatchfitError

CONFIGS = {"train": TrainConfig, "tune": TuneConfig, "sweep": SweepConfig}


def _subparser(command: str):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return subparsers.choices[command]


def _shown(command: str) -> list[str]:
    return [s if isinstance(s, str) else s[0] for g in COMMANDS[command].groups for s in g.shown]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_a_command_shows_is_a_row_of_the_table(command):
    names = _shown(command)
    assert names and all(name in OPTIONS for name in names)
    dests = {a.dest for a in _subparser(command)._actions if a.option_strings}
    assert set(names) <= dests  # each row became a flag whose value lands under the row's name


@pytest.mark.parametrize("config", [TrainConfig, TuneConfig, SweepConfig])
def test_config_defaults_are_the_tables(config):
    for field in dataclasses.fields(config):
        name = config.checked_as.get(field.name, field.name)
        if name in OPTIONS and field.default is not dataclasses.MISSING:
            assert field.default == OPTIONS[name].default, field.name


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_a_command_builds_its_config_from_its_flags_in_one_call(command):
    required = {"train": ["--batch-size", "8"], "tune": [], "sweep": []}[command]
    args = build_parser().parse_args([command, *required])
    config = CONFIGS[command].from_mapping(vars(args))
    # what the command line does not set on purpose differently is the API's default
    for field in dataclasses.fields(config):
        row = OPTIONS.get(CONFIGS[command].checked_as.get(field.name, field.name))
        if row is None or field.name not in vars(args) or field.name == "batch_size":  # required
            continue
        expected = row.held_default(command, cli=True)  # out_dir: each command's own folder
        assert getattr(config, field.name) == expected, field.name
    assert (
        config.out_dir
        == f"batchfit-{ {'train': 'run', 'tune': 'report', 'sweep': 'sweep'}[command] }"
    )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_names_other_options_by_their_flags(command):
    helps = {a.dest: a.help or "" for a in _subparser(command)._actions}
    assert not [dest for dest, text in helps.items() if "{" in text or "}" in text]
    if command == "train":
        assert "every --checkpoint-every steps" in helps["checkpoint_dir"]
        assert helps["val_data"] == "validation data, same forms as --data"


def test_library_messages_name_options_and_the_command_line_names_flags():
    from batchfit.loop.checks import check_output_paths

    config = TrainConfig.build(batch_size=8, epochs=1, resume=True)
    with pytest.raises(BatchfitError, match=r"^'resume' needs 'checkpoint_dir'"):
        check_output_paths(config)
    flags = {"resume": "--resume", "checkpoint_dir": "--checkpoint-dir"}
    with named_as_flags(flags), pytest.raises(BatchfitError, match=r"^--resume needs --checkpoint"):
        check_output_paths(config)


def test_options_are_written_as_the_caller_writes_them():
    assert (opt("out_dir"), opt_value("out_dir", "x")) == ("'out_dir'", "out_dir='x'")
    flags = {"out_dir": "--out", "drop_last": "--drop-last", "stream": "--stream"}
    with named_as_flags(flags):
        assert (opt("out_dir"), opt_value("out_dir", "x")) == ("--out", "--out x")
        assert opt_value("drop_last", True) == "--drop-last"
        assert opt_value("drop_last", False) == "no --drop-last"
        assert opt_value("stream", False) == "--no-stream"
        assert opt("seed") == "'seed'"  # not a flag of this command: named as an option


def test_a_python_caller_gets_the_command_lines_policy(tmp_path):
    """tune keeps all of --data for measuring (an example keeps its own validation set); an
    example's lr is used for the Adam family."""
    import numpy as np

    from batchfit.task import load_task

    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((50, 3), np.float32), y=np.zeros(50, np.int64))
    own = {"model": "torch.nn:Identity", "data": str(data)}
    assert load_task(**own, purpose="tune").val is None
    assert load_task(**own, purpose="train").val.num_samples == 5
    assert load_task(example="linreg", purpose="tune").val is not None
    assert load_task(example="linreg", purpose="tune", val_fraction=0).val is None
    for_train = load_task(example="linreg", purpose="train")
    _, lr_adam = for_train.model_and_lr(0, "adam", None)
    _, lr_sgd = for_train.model_and_lr(0, "sgd", None)
    _, lr_given = for_train.model_and_lr(0, "sgd", 0.5)
    assert (lr_adam, lr_sgd, lr_given) == (for_train.suggested_lr, None, 0.5)


def test_an_unknown_option_is_a_type_error_that_suggests_the_right_name():
    with pytest.raises(TypeError, match=r"tune\(\) got an unknown option 'time_budgt'; did you "):
        TuneConfig.build(time_budgt=10)


# -- defaults: written once, in the row; the help shows them; the commands use them ----------


def _help_defaults(command: str) -> dict[str, str]:
    """Option name -> the default this command's --help shows for it."""
    found = {}
    for action in _subparser(command)._actions:
        match = re.search(r"\(default: (.*)\)$", (action.help or "").replace("%%", "%"))
        if match:
            found[action.dest] = match.group(1)
    return found


def _changes(command: str) -> list[tuple[str, dict]]:
    groups = COMMANDS[command].groups
    return [(s[0], dict(s[1])) for g in groups for s in g.shown if isinstance(s, tuple)]


def test_no_help_text_restates_a_default():
    """Help texts describe; the default is appended from the row, in one form, so the two cannot
    disagree (val_fraction's help once said 0.1 where tune takes 0)."""
    assert not [row.name for row in OPTIONS.values() if "default" in row.help]
    for command in COMMANDS:
        for name, change in _changes(command):
            assert "default" not in change, (command, name)  # the row holds it, per command
            assert "default" not in change.get("help", ""), (command, name)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_each_default_once_as_the_row_has_it(command):
    helps = {a.dest: a.help or "" for a in _subparser(command)._actions if a.dest in OPTIONS}
    shown = _help_defaults(command)
    for name, text in helps.items():
        expected = options.shown_default(name, command)
        assert text.count("(default") == (expected is not None), (name, text)
        if expected is not None:  # as the row has it, other options named by their flags
            assert re.fullmatch(re.sub(r"\\{\w+\\}", "--.*", re.escape(expected)), shown[name])


def test_tune_help_says_what_tune_does_with_the_validation_split():
    """Issue 24: tune's --help said "no validation split unless --val-fraction is given" and
    "--val-fraction ... default 0.1"; tune takes 0, train and sweep 0.1."""
    tune = _subparser("tune")
    assert "no validation split unless --val-fraction is given" in tune.description
    assert _help_defaults("tune")["val_fraction"] == "0"
    assert _help_defaults("train")["val_fraction"] == _help_defaults("sweep")["val_fraction"]
    assert _help_defaults("train")["val_fraction"] == "0.1"


def _pairs() -> list[tuple[str, str]]:
    return [(c, n) for c in sorted(COMMANDS) for n in _shown(c) if n in _help_defaults(c)]


def _parsed(command: str):
    required = {"plan": ["--samples", "8", "--batch-size", "2"], "train": ["--batch-size", "8"]}
    return build_parser().parse_args([command, *required.get(command, [])])


#: Defaults the help writes in words, with no value a command could be held to.
IN_WORDS = {
    "features", "target", "loss", "stream", "micro_batch_size", "memory_limit", "max_batch_size",
    "min_batch_size", "lr_grid", "threads",
}  # fmt: skip


@pytest.mark.parametrize(("command", "name"), _pairs())
def test_the_default_the_help_shows_is_the_one_the_command_uses(command, name, tmp_path):
    """For each option of each command: the default in --help is the value the parser and the
    config hold, or, where they hold None ("not given"), the value the run then takes."""
    text = _help_defaults(command)[name]
    args = _parsed(command)
    held = getattr(args, name)
    if held is not None:
        assert text == options.shown_value(held)
        if command in CONFIGS and name in {f.name for f in dataclasses.fields(CONFIGS[command])}:
            assert getattr(CONFIGS[command].from_mapping(vars(args)), name) == held
        return
    if name in IN_WORDS:  # a rule, not a value (its thresholds have tests of their own)
        return
    RUN_DEFAULTS[name](command, text, tmp_path)


def _own_data(tmp_path, rows: int = 50) -> dict:
    import numpy as np

    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((rows, 3), np.float32), y=np.zeros(rows, np.int64))
    return {"model": "torch.nn:Identity", "data": str(data)}


def _example_is(command, text, tmp_path):
    from batchfit.task import load_task

    assert load_task(purpose=command).name == f"example '{text}'"


def _val_fraction_is(command, text, tmp_path):
    from batchfit.task import load_task

    val = load_task(**_own_data(tmp_path), purpose=command).val
    assert (0 if val is None else val.num_samples) == round(50 * float(text))


def _shuffle_buffer_is(command, text, tmp_path):
    import numpy as np

    from batchfit.task import StreamOptions, load_task

    np.save(tmp_path / "rows.npy", np.zeros((64, 4), np.float32))

    def rows(**given) -> int:
        stream = StreamOptions(stream=True, **given)
        task = load_task(
            model="torch.nn:Identity", data=str(tmp_path / "rows.npy"), val_fraction=0,
            stream=stream, purpose=command,
        )  # fmt: skip
        return task.train.shuffle_buffer

    assert rows() == rows(shuffle_buffer=text) != rows(shuffle_buffer="1MiB")


def _time_budget_is(command, text, tmp_path):
    from batchfit.orchestrate.tune_budget import TimeBudget

    if command == "train":  # train hands its tune_budget to tune as tune's time_budget
        assert TrainConfig.build(batch_size="auto").tune_budget is None
    spent = {
        device: TimeBudget.start(None, device, time.time(), writes_report=False).total
        for device in ("cpu", "cuda")
    }
    assert text.endswith(options.shown_value(options.Varies("device", spent)))


def _blobs(n: int = 64):
    import torch

    return torch.randn(n, 3), torch.randint(0, 2, (n,))


def _prepared(command: str, **given):
    """The setup a run of ``command`` starts from, on a tiny model and data."""
    import torch

    torch.manual_seed(0)
    model, data = torch.nn.Linear(3, 2), _blobs()
    if command == "train":
        from batchfit.loop.train import prepare

        config = TrainConfig.build(**{"batch_size": 8, "epochs": 1, "device": "cpu"} | given)
        return prepare(model, data, None, None, None, config)
    from batchfit.orchestrate.sweep_setup import prepare

    config = SweepConfig.build(**{"batch_sizes": (8,), "epochs": 1, "device": "cpu"} | given)
    return prepare(model, data, _blobs(16), None, config)


def _eval_batch_size_is(command, text, tmp_path):
    value = int(re.findall(r"\d+", text)[-1])
    assert _prepared(command).eval_batch_size == value
    if command == "train":  # max(micro-batch, value)
        assert _prepared(command, batch_size=64, max_steps=1).eval_batch_size == max(64, value)
    else:  # the micro-batch when one is given
        assert _prepared(command, micro_batch_size=4).eval_batch_size == 4


def _by_optimizer(command: str, name: str) -> options.Varies:
    return options.Varies(
        "optimizer", {o: getattr(_prepared(command, optimizer=o), name) for o in OPTIMIZERS}
    )


def _lr_is(command, text, tmp_path):
    if command == "tune":
        assert text == "a learning-rate range test at the recommended batch"
        return
    assert text.endswith(options.shown_value(_by_optimizer(command, "lr")))


def _lr_scaling_is(command, text, tmp_path):
    from batchfit.core.lr_scaling import default_rule  # what tune applies without lr_scaling

    if command == "tune":
        used = options.Varies("optimizer", {o: default_rule(o) for o in OPTIMIZERS})
    else:
        used = _by_optimizer(command, "lr_scaling")
    assert text == options.shown_value(used)


def _epochs_is(command, text, tmp_path):
    from batchfit.orchestrate.sweep_setup import budget_of

    assert command == "sweep"  # train has no default: it needs epochs or steps given
    assert budget_of(SweepConfig.build(), 100) == {"epochs": int(text)}


#: How a run takes each default the parser leaves as None: checked against the help's text.
RUN_DEFAULTS = {
    "example": _example_is,
    "val_fraction": _val_fraction_is,
    "shuffle_buffer": _shuffle_buffer_is,
    "time_budget": _time_budget_is,
    "tune_budget": _time_budget_is,
    "eval_batch_size": _eval_batch_size_is,
    "lr": _lr_is,
    "lr_scaling": _lr_scaling_is,
    "epochs": _epochs_is,
}


def test_sweeps_lr_grid_alone_tries_the_factors_its_help_names():
    from batchfit.core.sweep_inputs import parse_lr_grid

    help_text = next(a.help for a in _subparser("sweep")._actions if a.dest == "lr_grid")
    factors = re.search(r"the factors ([\d.,]+) \(", help_text).group(1)
    assert parse_lr_grid("") == parse_lr_grid(factors)
    assert _parsed("sweep").lr_grid is None  # not given: no grid, as the help says


def test_the_stream_threshold_in_the_help_is_the_one_load_file_applies():
    from batchfit.data.stream import LOAD_SHARE_OF_AVAILABLE

    assert options.STREAM_SHARE_OF_AVAILABLE == LOAD_SHARE_OF_AVAILABLE
    assert f"{LOAD_SHARE_OF_AVAILABLE:.0%} of the available memory" in _help_defaults("train")[
        "stream"
    ]


def test_every_default_constant_reads_the_table():
    """The module constants that name option defaults are the table's, for each command."""
    from batchfit.data import stream
    from batchfit.examples import DEFAULT_EXAMPLE
    from batchfit.orchestrate.sweep_setup import DEFAULT_EPOCHS
    from batchfit.probe import memory, race
    from batchfit.step import DEFAULT_LR

    assert stream.DEFAULT_PREFETCH == default_of("prefetch") == 4
    assert stream.DEFAULT_SHUFFLE_BUFFER_BYTES == 96 << 20
    assert race.EVAL_BATCH_SIZE == default_of("eval_batch_size") == 1024
    assert DEFAULT_EPOCHS == default_of("epochs", "sweep") == 40
    assert DEFAULT_EXAMPLE == default_of("example") == "mnist1d"
    assert DEFAULT_LR == {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}
    assert memory.DEFAULT_HEADROOM == default_of("headroom") == 0.1
    assert memory.DEFAULT_RAM_SHARE == options.CPU_RAM_SHARE == 0.5
    assert [default_of("val_fraction", c) for c in ("train", "sweep", "tune")] == [0.1, 0.1, 0.0]
    assert [default_of("time_budget", device=d) for d in ("cpu", "cuda")] == [60.0, 300.0]


def test_a_default_varies_by_command_device_or_optimizer_only():
    with pytest.raises(ValueError, match="varies by one of"):
        options.Varies("dtype", {"float32": 1})
    assert options.Varies("command", {"tune": 0.0}, otherwise=0.1).of() == 0.1

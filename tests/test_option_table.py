"""One table of options: the command line's flags, the configs' defaults and the help all come from
it, and the policy the command line applies lives in the library, where Python callers get it too.
"""

from __future__ import annotations

import dataclasses

import pytest

from batchfit.cli import COMMANDS, build_parser
from batchfit.core.configs import SweepConfig, TrainConfig, TuneConfig
from batchfit.core.options import OPTIONS, named_as_flags, opt, opt_value
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
        per_command = ("out_dir", "batch_sizes", "batch_size")  # set by each command, or required
        if row is None or field.name not in vars(args) or field.name in per_command:
            continue
        expected = row.default if row.cli_default is None else row.cli_default
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

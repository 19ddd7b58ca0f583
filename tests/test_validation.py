"""One table of allowed values, one message template, used by the API and the command line."""

from __future__ import annotations

import pytest

from batchfit.cli import main
from batchfit.core import options
from batchfit.core.options import OPTIONS, Choice, Flag, Float, Int, RowsOrSize, Size, Text
from batchfit.core.rules import IntOrAuto
from batchfit.errors import BatchfitError

BAD_VALUES = {
    Int: [0.5, "3", True, None],
    IntOrAuto: [0.5, "3", "Auto", "banana", True, None],
    Size: [0.5, "4GB", True, None],
    RowsOrSize: [0, 0.5, "3", "lots", "0MiB", True, None],
    Float: ["x", float("nan"), float("inf"), None],
    Choice: ["nope", 3, None],
    Flag: [1, "yes", None],
    Text: ["", "   ", 3, None],
}


def _out_of_range(rule):
    if isinstance(rule, Size):
        return [rule.low - 1]
    if isinstance(rule, IntOrAuto):
        return [rule.low - 1]
    if isinstance(rule, Int):
        return [rule.low - 1] + ([rule.high + 1] if rule.high is not None else [])
    if isinstance(rule, Float):
        out = []
        if rule.low is not None:
            out.append(rule.low if rule.open_low else rule.low - 1)
        if rule.high is not None:
            out.append(rule.high if rule.open_high else rule.high + 1)
        return out
    return []


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_option_rejects_bad_values_with_one_message_template(name):
    rule = OPTIONS[name].rule
    bad = BAD_VALUES[type(rule)] if not getattr(rule, "objects", False) else [None]
    for value in bad + _out_of_range(rule):
        with pytest.raises(
            BatchfitError, match=rf"^The '{name}' option must be .*Got .* instead\."
        ):
            options.check(name, value)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_option_parses_its_text_form(name):
    rule = OPTIONS[name].rule
    good = {
        Int: str(rule.low) if isinstance(rule, Int) else None,
        IntOrAuto: str(getattr(rule, "low", None)),
        Float: "0.5",
        Choice: rule.choices[0] if isinstance(rule, Choice) else None,
        Size: "2GiB",
        RowsOrSize: "64MiB",
        Flag: "true",
        Text: "some/text",
    }[type(rule)]
    assert options.parse(name, good) == options.check(name, rule.convert(good))
    if isinstance(rule, IntOrAuto):
        assert options.parse(name, "auto") == options.parse(name, " AUTO ") == "auto"
    if not isinstance(rule, Text):  # any non-empty text is a Text value
        with pytest.raises(BatchfitError, match=rf"The '{name}' option"):
            options.parse(name, "not-a-value")


# Each command-line flag checked through the shared table: (command, flag, bad text).
CLI_FLAGS = [
    ("plan", "--samples", "0"),
    ("plan", "--batch-size", "-1"),
    ("plan", "--batch-size", "3.5"),
    ("plan", "--micro-batch-size", "0"),
    ("plan", "--world-size", "zero"),
    ("plan", "--epochs", "0"),
    ("plan", "--max-steps", "-5"),
    ("train", "--batch-size", "0"),
    ("train", "--micro-batch-size", "x"),
    ("train", "--lr", "-1"),
    ("train", "--lr", "nan"),
    ("train", "--optimizer", "lbfgs"),
    ("train", "--momentum", "1.5"),
    ("train", "--val-fraction", "1"),
    ("train", "--seed", "-1"),
    ("train", "--checkpoint-every", "0"),
    ("train", "--eval-batch-size", "0"),
    ("tune", "--memory-limit", "lots"),
    ("tune", "--memory-limit", "0"),
    ("tune", "--memory-limit", "512KB"),
    ("tune", "--max-batch-size", "0"),
    ("tune", "--time-budget", "0"),
    ("tune", "--time-budget", "soon"),
    ("tune", "--lr", "0"),
    ("tune", "--lr-batch-size", "0"),
    ("tune", "--lr-scaling", "cubic"),
    ("tune", "--optimizer", "lbfgs"),
]


@pytest.mark.parametrize(("command", "flag", "bad"), CLI_FLAGS)
def test_cli_rejects_each_bad_flag_in_one_line_with_exit_2(command, flag, bad, capsys):
    base = {
        "plan": ["--samples", "100", "--batch-size", "10"],
        "train": ["--batch-size", "10", "--epochs", "1"],
        "tune": ["--quiet"],
    }[command]
    assert main([command, *base, flag, bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert flag in err and "must be" in err

"""The tune report of a fixed tune result, held to the files recorded from it: ``report.json``
keys and values and ``report.md`` text change only when someone means them to.

``data/tune_report/result.json`` is a real tune result as plain data (``TuneResult.to_dict()``,
its race left out: the race's sections are ``tune_race_report``'s). ``full`` is the report of it;
``sparse`` is the report of the same result with the optional measurements missing, for the
other branches. To record them again after a deliberate change, write ``write_report(...)``'s
``report.md`` and its ``report.json`` (indented) over the files, and review the diff.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from batchfit.report.tune_report import REPORT_FILES, write_report
from batchfit.version import __version__

RECORDED = Path(__file__).parent / "data" / "tune_report"
RECORDED_VERSION = "0.1.0"  # the batchfit version in the recorded files, replaced by today's
PLOTS_WRITTEN = {
    "full": [
        "throughput.png",
        "time_to_result.png",
        "noise_scale.png",
        "gradient_error.png",
        "memory_and_step_time.png",
        "lr_range.png",
    ],
    "sparse": ["throughput.png", "time_to_result.png", "memory_and_step_time.png"],
}


def sparse(result: dict) -> dict:
    """The result with nothing optional measured: no noise scale, lr range or step-time fit, no
    runner-up, a memory search ended by time on two ranks, and the task's command-line options."""
    result = copy.deepcopy(result)
    result.update(noise=None, lr_range=None, step_time_fit=None, skipped=[])
    result["task_options"] = ["--model models.py:mlp", "--data d.parquet"]
    result["batch_size_choice"]["runner_up"] = None
    result["batch_size_choice"]["b_simple"] = None
    result["memory"].update(capped_by="time budget", per_rank=[64, 32])
    return result


def recorded_json(name: str) -> str:
    """The recorded ``report.json``, keys in their order (stored indented, for readable diffs)."""
    report = json.loads((RECORDED / f"{name}.json").read_text())
    assert report["batchfit_version"] == RECORDED_VERSION
    return json.dumps({**report, "batchfit_version": __version__})


def recorded_markdown(name: str) -> str:
    text = (RECORDED / f"{name}.md").read_text()
    return text.replace(f"batchfit {RECORDED_VERSION},", f"batchfit {__version__},")


@pytest.mark.parametrize("name", ["full", "sparse"])
def test_the_report_of_a_fixed_result_is_the_one_recorded(tmp_path, name):
    result = json.loads((RECORDED / "result.json").read_text())
    if name == "sparse":
        result = sparse(result)
    _, files = write_report(result, tmp_path)
    assert json.dumps(json.loads((tmp_path / "report.json").read_text())) == recorded_json(name)
    assert (tmp_path / "report.md").read_text() == recorded_markdown(name)
    assert [f.name for f in files] == ["report.json", "report.md", *PLOTS_WRITTEN[name]]
    assert set(REPORT_FILES) >= {f.name for f in files}

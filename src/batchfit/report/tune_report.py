"""The ``tune`` report: ``report.json`` (stable, versioned keys), ``report.md`` and PNG plots,
written together into one folder.

Each has its module: the JSON object in :mod:`batchfit.report.tune_json` (its keys listed
there), the Markdown and the lines the command line prints in :mod:`batchfit.report.tune_markdown`,
the plots in :mod:`batchfit.report.tune_plots`. They are imported here too, where callers have
always found them.

Everything consumes plain data: the tune result as a dict
(:meth:`batchfit.orchestrate.tune.TuneResult.to_dict`: its fields, each probe's result as a dict
of its fields) for :func:`build_report`, :func:`write_report` and the plots, and the
``report.json`` object for :func:`render_markdown`, :func:`headline` and :func:`reasons_line`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchfit.errors import space_checked
from batchfit.files import report_staging, write_json, write_text
from batchfit.report.tune_json import REPORT_VERSION, TuneData, build_report
from batchfit.report.tune_markdown import (
    REPRODUCE_EPOCHS,
    headline,
    reasons_line,
    render_markdown,
    train_command,
)
from batchfit.report.tune_plots import PLOT_FILES, write_plots

__all__ = [
    "PLOT_FILES",
    "REPORT_FILES",
    "REPORT_VERSION",
    "REPRODUCE_EPOCHS",
    "TuneData",
    "build_report",
    "headline",
    "reasons_line",
    "render_markdown",
    "train_command",
    "write_report",
]

#: Every file a tune report may hold: what an earlier run left is removed before a new one.
REPORT_FILES = ("report.json", "report.md", *PLOT_FILES.values())


def write_report(result: TuneData, out_dir: Path) -> tuple[dict[str, Any], list[Path]]:
    """Write ``report.json``, ``report.md`` and the plots for a tune result given as plain data
    (``result.to_dict()``) into ``out_dir``; return the report object as written and the paths
    (only plots that have something to show are written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(result)
    # Written beside the old report and swapped in whole: an interrupted run leaves the old one.
    with space_checked(out_dir), report_staging(out_dir, REPORT_FILES) as staging:
        written = [p.name for p in write_plots(result, staging) if p is not None]
        report["files"] = ["report.json", "report.md", *written]
        write_json(staging / "report.json", report)
        write_text(staging / "report.md", render_markdown(report))
    return report, [out_dir / name for name in report["files"]]

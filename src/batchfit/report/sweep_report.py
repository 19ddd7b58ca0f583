"""Write a sweep's report: ``sweep.json`` (everything), ``sweep.md`` (for people) and the plots.

``sweep.json`` keys: ``version``, ``settings``, ``metric``, ``target``, ``initial`` (validation at
the initial weights), ``sizes`` (one summary per batch size), ``runs`` (every run, with the
learning-rate grid), ``verdict`` (best, fastest, claims, tune), ``timing`` and ``files``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from batchfit.core.options import opt
from batchfit.core.sweep_inputs import AUTO_TARGET_SHARE
from batchfit.core.sweep_records import format_seconds
from batchfit.errors import space_checked
from batchfit.files import report_staging, write_json, write_text
from batchfit.report.markdown import table
from batchfit.report.sweep_plots import PLOT_FILES, write_plots

#: Every file a sweep's report writes into ``out_dir`` (its finished runs are kept in runs/).
REPORT_FILES = ("sweep.json", "sweep.md", *PLOT_FILES.values())


def write_report(result: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write the plots, ``sweep.md`` and ``sweep.json`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written beside the old report and swapped in whole: an interrupted run leaves the old one.
    with space_checked(out_dir), report_staging(out_dir, REPORT_FILES) as staging:
        drawn = write_plots(result, staging)
        files = {name: str(out_dir / Path(path).name) for name, path in drawn.items()}
        files["markdown"] = str(out_dir / "sweep.md")
        files["json"] = str(out_dir / "sweep.json")
        result = {**result, "files": files}
        write_text(staging / "sweep.md", markdown(result))
        write_json(staging / "sweep.json", result)
    return files


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers for tables: ``-`` for missing, ``digits`` significant figures otherwise."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


#: The per-size table's columns: (short header for the command line, header for sweep.md);
#: ``{metric}`` and ``{gap}`` are filled in.
SIZE_COLUMNS = (
    ("B", "B"),
    ("lr", "lr"),
    ("steps", "steps"),
    ("best", "best {metric}"),
    ("final", "final {metric}"),
    ("train loss", "train loss"),
    ("gap", "gap ({gap})"),
    ("sharpness", "sharpness"),
    ("to target", "to target: s / examples"),
    ("samples/s", "samples/s"),
)

#: The plots sweep.md shows, by their key in ``files``, with their titles.
PLOT_TITLES = {
    "curves": "Validation curves",
    "metric": "Metric vs batch size",
    "sharpness": "Sharpness vs batch size",
    "time_to_target": "Time to target vs batch size",
    "lr_grid": "Learning-rate grid",
}


def _gap_key(metric: str) -> str:
    return "accuracy" if metric == "val_accuracy" else "loss"


def size_rows(result: dict[str, Any], short: bool = False) -> tuple[list[str], list[list[str]]]:
    """The per-size table (``sweep.md``; ``short`` headers for the command line).

    >>> point = {"reached": True, "steps": 5, "samples_seen": 320, "seconds": 0.5}
    >>> size = {"batch_size": 64, "lr": 1e-3, "steps": 10, "best": {"value": 0.9},
    ...         "final": {"val_accuracy": 0.88}, "train_loss": 0.3, "gap": {"accuracy": 0.02},
    ...         "sharpness": {"eigenvalue": 12.5, "converged": True}, "time_to_target": point,
    ...         "samples_per_s": 1234.5}
    >>> header, rows = size_rows({"metric": "val_accuracy", "sizes": [size]}, short=True)
    >>> rows[0]
    ['64', '0.001', '10', '0.9', '0.88', '0.3', '0.02', '12.5', '500 ms', '1,234']
    """
    metric = result["metric"]
    names = {"metric": metric, "gap": _gap_key(metric)}
    header = [(short_name if short else name).format(**names) for short_name, name in SIZE_COLUMNS]
    return header, [_size_row(s, metric, short) for s in result["sizes"]]


def _size_row(s: dict[str, Any], metric: str, short: bool) -> list[str]:
    sharp = (
        fmt(s["sharpness"]["eigenvalue"]) + ("" if s["sharpness"]["converged"] else "*")
        if s.get("sharpness")
        else "-"
    )
    return [
        str(s["batch_size"]),
        fmt(s["lr"], 3),
        fmt(s["steps"]),
        fmt(s["best"]["value"] if s.get("best") else None),
        fmt(s["final"].get(metric)),
        fmt(s["train_loss"]),
        fmt((s.get("gap") or {}).get(_gap_key(metric)), 3),
        sharp,
        _reach(s, short),
        fmt(round(s["samples_per_s"]) if s["samples_per_s"] else None),
    ]


def _reach(s: dict[str, Any], short: bool) -> str:
    """Time to target in a table cell: seconds (and examples), or why there is none."""
    ttt = s["time_to_target"]
    if s.get("diverged"):
        return f"diverged (step {s['diverged']['step']})"
    if not ttt["reached"]:
        return "missed" if short else "not reached"
    if short:
        return format_seconds(ttt["seconds"])
    return f"{format_seconds(ttt['seconds'])} / {ttt['samples_seen']:,}"


def _budget_text(settings: dict[str, Any]) -> str:
    ((kind, value),) = settings["budget"].items()
    meaning = "equal updates" if kind == "steps" else "equal examples"
    return f"{value:,} {kind} per batch size ({meaning})"


def _target_source(target: dict[str, Any]) -> str:
    if target["source"] == "given":
        return f"given with {opt('target_level')}"
    return (
        f"automatic: {AUTO_TARGET_SHARE:.0%} of the way from the initial value to the best value "
        "any size reached"
    )


def markdown(result: dict[str, Any]) -> str:
    """``sweep.md``: settings, the verdict, the per-size table, the claims, the learning-rate grid,
    tune's recommendation, the plots and where the time went."""
    sections = (
        _settings_section,
        _verdict_section,
        _sizes_section,
        _claims_section,
        _grid_section,
        _tune_section,
        _plots_section,
        _time_section,
    )
    return "\n".join(line for section in sections for line in section(result))


def _settings_section(result: dict[str, Any]) -> list[str]:
    st, metric, target = result["settings"], result["metric"], result["target"]
    grid = f", then the best of the grid x{st['lr_grid']}" if st["lr_grid"] else ""
    return [
        "# batchfit sweep",
        "",
        f"Task: {st['task'] or 'Python API'}; {fmt(st['samples'])} training samples, "
        f"{fmt(st['val_samples'])} validation samples. Budget: {_budget_text(st)}. "
        f"Optimizer {st['optimizer']}, lr {st['lr']:g} at batch size {st['lr_batch_size']}, "
        f"scaled by '{st['lr_scaling']}'{grid}. Seed {st['seed']}; every size starts from the "
        f"same weights (sha256 {st['initial_params_sha256'][:12]}...).",
        "",
        f"Target: {target['text']} ({_target_source(target)}). "
        f"At the initial weights {metric} = {fmt(result['initial'].get(metric))}.",
        "",
    ]


def _verdict_section(result: dict[str, Any]) -> list[str]:
    return ["## Verdict", "", *[f"- {line}" for line in result["verdict"]["lines"]], ""]


def _sizes_section(result: dict[str, Any]) -> list[str]:
    st = result["settings"]
    header, rows = size_rows(result)
    return [
        "## Per batch size",
        "",
        table(header, rows),
        "",
        "Train loss: mean over the last epoch's steps (train mode). Gap: training subset "
        f"({fmt(st['train_subset_samples'])} samples) against validation, both in eval mode, at "
        "the end of the run. Sharpness: top Hessian eigenvalue of the training loss on a fixed "
        f"batch of {fmt(st['sharpness_samples'])} samples (* = power iteration did not converge). "
        "Time to target: training seconds (evaluation excluded) and examples at the first "
        "evaluation point that met it. Diverged: the loss or the weights became NaN or infinite "
        "at that step; such a size is left out of the verdict.",
        "",
    ]


def _claims_section(result: dict[str, Any]) -> list[str]:
    rows = [
        [c["claim"], c["outcome"], fmt(c["rho"], 3), c["detail"]]
        for c in result["verdict"]["claims"]
    ]
    return [
        "## The seed's claims",
        "",
        table(["claim", "outcome", "Spearman rho", "numbers"], rows, align="llrl"),
        "",
        "One seed per size: differences smaller than run-to-run noise can flip with another seed.",
        "",
    ]


def _grid_section(result: dict[str, Any]) -> list[str]:
    grids = [s for s in result["sizes"] if s.get("lr_grid")]
    if not grids:
        return []
    metric = result["metric"]
    rows = [
        [
            str(s["batch_size"]),
            fmt(g["lr"], 3),
            fmt(g["factor"], 3),
            fmt(g["best"]),
            fmt(g["final"]),
            "yes" if g["chosen"] else "",
            f"at step {g['diverged']}" if g.get("diverged") else "",
        ]
        for s in grids
        for g in s["lr_grid"]
    ]
    header = ["B", "lr", "factor", f"best {metric}", f"final {metric}", "chosen", "diverged"]
    return ["## Learning-rate grid", "", table(header, rows, align="rrrrrll"), ""]


def _tune_section(result: dict[str, Any]) -> list[str]:
    tune = result["verdict"].get("tune")
    if not tune:
        return []
    lr = f", lr {tune['recommended_lr']:.3g}" if tune["recommended_lr"] else ""
    return [
        "## Tune's recommendation",
        "",
        f"report.json recommends B={tune['recommended_batch_size']}{lr}. Judged on: "
        f"{tune['judged']} (B={tune['swept_batch_size']}, lr {tune['swept_lr']:.3g}; best "
        f"{result['metric']} {fmt(tune['best'])}). {tune['reason']}",
        "",
    ]


def _plots_section(result: dict[str, Any]) -> list[str]:
    lines = ["## Plots", ""]
    for key, title in PLOT_TITLES.items():
        if key in result["files"]:
            lines += [f"![{title}]({Path(result['files'][key]).name})", ""]
    return lines


def _time_section(result: dict[str, Any]) -> list[str]:
    timing = result["timing"]
    read_back = timing.get("runs_read_back", 0)
    resumed = (
        f" ({read_back} of the {timing['runs']} runs were read back from an earlier sweep "
        f"with {opt('resume')}; their time is in the runs' total, not in this one)"
        if read_back
        else ""
    )
    return [
        "## Time",
        "",
        f"{timing['total_seconds']:.1f} s in all{resumed}; of the runs' "
        f"{timing['runs_seconds']:.1f} s, training {timing['train_seconds']:.1f} s, evaluation "
        f"{timing['eval_share']:.1%}, sharpness {timing['sharpness_share']:.1%}.",
        "",
    ]

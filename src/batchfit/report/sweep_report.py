"""Write a sweep's report: ``sweep.json`` (everything), ``sweep.md`` (for people) and the plots.

``sweep.json`` keys: ``version``, ``settings``, ``metric``, ``target``, ``initial`` (validation at
the initial weights), ``sizes`` (one summary per batch size), ``runs`` (every run, with the
learning-rate grid), ``verdict`` (best, fastest, claims, tune), ``timing`` and ``files``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from batchfit.core.sweep_verdict import format_seconds
from batchfit.files import write_json, write_text
from batchfit.report.markdown import table
from batchfit.report.sweep_plots import PLOT_FILES, write_plots

#: Every file a sweep's report writes into --out (its finished runs are kept in runs/).
REPORT_FILES = ("sweep.json", "sweep.md", *PLOT_FILES.values())


def write_report(result: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write the plots, ``sweep.md`` and ``sweep.json`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_plots(result, out_dir)
    files["markdown"] = str(out_dir / "sweep.md")
    files["json"] = str(out_dir / "sweep.json")
    result = {**result, "files": files}
    write_text(files["markdown"], markdown(result))
    write_json(files["json"], result)
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


def size_rows(result: dict[str, Any], short: bool = False) -> tuple[list[str], list[list[str]]]:
    """The per-size table (``sweep.md``; ``short`` headers for the command line)."""
    metric = result["metric"]
    gap_key = "accuracy" if metric == "val_accuracy" else "loss"
    if short:
        header = [
            "B",
            "lr",
            "steps",
            "best",
            "final",
            "train loss",
            "gap",
            "sharpness",
            "to target",
            "samples/s",
        ]
    else:
        header = [
            "B",
            "lr",
            "steps",
            f"best {metric}",
            f"final {metric}",
            "train loss",
            f"gap ({gap_key})",
            "sharpness",
            "to target: s / examples",
            "samples/s",
        ]
    rows = []
    for s in result["sizes"]:
        ttt = s["time_to_target"]
        if s.get("diverged"):
            reach = f"diverged (step {s['diverged']['step']})"
        elif not ttt["reached"]:
            reach = "missed" if short else "not reached"
        elif short:
            reach = format_seconds(ttt["seconds"])
        else:
            reach = f"{format_seconds(ttt['seconds'])} / {ttt['samples_seen']:,}"
        sharp = (
            fmt(s["sharpness"]["eigenvalue"]) + ("" if s["sharpness"]["converged"] else "*")
            if s.get("sharpness")
            else "-"
        )
        rows.append(
            [
                str(s["batch_size"]),
                fmt(s["lr"], 3),
                fmt(s["steps"]),
                fmt(s["best"]["value"] if s.get("best") else None),
                fmt(s["final"].get(metric)),
                fmt(s["train_loss"]),
                fmt((s.get("gap") or {}).get(gap_key), 3),
                sharp,
                reach,
                fmt(round(s["samples_per_s"]) if s["samples_per_s"] else None),
            ]
        )
    return header, rows


def _budget_text(settings: dict[str, Any]) -> str:
    ((kind, value),) = settings["budget"].items()
    meaning = "equal updates" if kind == "steps" else "equal examples"
    return f"{value:,} {kind} per batch size ({meaning})"


def _target_source(target: dict[str, Any]) -> str:
    if target["source"] == "given":
        return "given with --target"
    return "automatic: 90% of the way from the initial value to the best value any size reached"


def markdown(result: dict[str, Any]) -> str:
    """``sweep.md``: settings, the per-size table, the verdict, the claims and the plots."""
    st, metric, target = result["settings"], result["metric"], result["target"]
    header, rows = size_rows(result)
    lines = [
        "# batchfit sweep",
        "",
        f"Task: {st['task'] or 'Python API'}; {fmt(st['samples'])} training samples, "
        f"{fmt(st['val_samples'])} validation samples. Budget: {_budget_text(st)}. "
        f"Optimizer {st['optimizer']}, lr {st['lr']:g} at batch size {st['lr_batch_size']}, "
        f"scaled by '{st['lr_scaling']}'"
        + (f", then the best of the grid x{st['lr_grid']}" if st["lr_grid"] else "")
        + f". Seed {st['seed']}; every size starts from the same weights "
        f"(sha256 {st['initial_params_sha256'][:12]}...).",
        "",
        f"Target: {target['text']} ({_target_source(target)}). "
        f"At the initial weights {metric} = {fmt(result['initial'].get(metric))}.",
        "",
        "## Verdict",
        "",
        *[f"- {line}" for line in result["verdict"]["lines"]],
        "",
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
        "## The seed's claims",
        "",
        table(
            ["claim", "outcome", "Spearman rho", "numbers"],
            [
                [c["claim"], c["outcome"], fmt(c["rho"], 3), c["detail"]]
                for c in result["verdict"]["claims"]
            ],
            align="llrl",
        ),
        "",
        "One seed per size: differences smaller than run-to-run noise can flip with another seed.",
        "",
    ]
    grids = [s for s in result["sizes"] if s.get("lr_grid")]
    if grids:
        lines += ["## Learning-rate grid", ""]
        grid_rows = [
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
        lines += [
            table(
                ["B", "lr", "factor", f"best {metric}", f"final {metric}", "chosen", "diverged"],
                grid_rows,
                align="rrrrrll",
            ),
            "",
        ]
    tune = result["verdict"].get("tune")
    if tune:
        lines += [
            "## Tune's recommendation",
            "",
            f"report.json recommends B={tune['recommended_batch_size']}"
            + (f", lr {tune['recommended_lr']:.3g}" if tune["recommended_lr"] else "")
            + f". Judged on: {tune['judged']} (B={tune['swept_batch_size']}, lr "
            f"{tune['swept_lr']:.3g}; best {metric} {fmt(tune['best'])}). {tune['reason']}",
            "",
        ]
    titles = {
        "curves": "Validation curves",
        "metric": "Metric vs batch size",
        "sharpness": "Sharpness vs batch size",
        "time_to_target": "Time to target vs batch size",
        "lr_grid": "Learning-rate grid",
    }
    lines += ["## Plots", ""]
    for key, title in titles.items():
        if key in result["files"]:
            lines += [f"![{title}]({Path(result['files'][key]).name})", ""]
    timing = result["timing"]
    read_back = timing.get("runs_read_back", 0)
    resumed = (
        f" ({read_back} of the {timing['runs']} runs were read back from an earlier sweep "
        "with --resume; their time is in the runs' total, not in this one)"
        if read_back
        else ""
    )
    lines += [
        "## Time",
        "",
        f"{timing['total_seconds']:.1f} s in all{resumed}; of the runs' "
        f"{timing['runs_seconds']:.1f} s, training {timing['train_seconds']:.1f} s, evaluation "
        f"{timing['eval_share']:.1%}, sharpness {timing['sharpness_share']:.1%}.",
        "",
    ]
    return "\n".join(lines)

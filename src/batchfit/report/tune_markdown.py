"""``report.md`` of a tune report, and the lines the command line prints from it: the headline,
the reasons and the train command that uses the recommendation.

Everything here reads the ``report.json`` object (:func:`batchfit.report.tune_json.build_report`).
"""

from __future__ import annotations

import math
from typing import Any

from batchfit.core.options import OPTIONS
from batchfit.core.units import format_bytes
from batchfit.report.markdown import table
from batchfit.report.tune_horizon_report import markdown_horizon
from batchfit.report.tune_race_report import markdown_race, markdown_warnings


def headline(report: dict[str, Any]) -> str:
    """One line: ``batch size 256 (micro-batch 256), lr 2.8e-03 (adam, ...)``, marked
    provisional when measurements cut short by time left larger sizes unjudged, or when the race
    did not run."""
    r = report["recommended"]
    acc = f" = {r['accumulation']} x {r['micro_batch_size']}" if r["accumulation"] > 1 else ""
    mark = (
        f"PROVISIONAL ({provisional_why(r.get('provisional') or [])}) "
        if r.get("provisional")
        else ""
    )
    low, high = r["batch_size_range"]
    span = f"; {low}-{high} equally good" if report.get("race") and low != high else ""
    return (
        f"{mark}batch size {r['batch_size']}{acc} (micro-batch {r['micro_batch_size']}{span}), "
        f"lr {r['lr']:.3g} ({r['lr_rule']})"
    )


def provisional_why(reasons: list[str]) -> str:
    """The headline's few words for why an answer is provisional."""
    words = []
    short = [r for r in reasons if not r.startswith("The race") and "cannot pay" not in r]
    if short:
        words.append("the time budget cut the measurements short")
    if any("cannot pay for itself" in r for r in reasons):
        words.append("tuning cannot pay for itself on a run this short, so no batch sizes raced")
    elif any(r.startswith("The race") for r in reasons):
        words.append("the race did not run, so nothing confirmed it")
    return "; ".join(words)


def reasons_line(report: dict[str, Any]) -> str:
    """The short why: ``throughput flattens after 256; gradient noise scale ~180, so beyond ~360
    extra samples buy few steps; fits in memory up to 8192``."""
    parts = []
    flat = report["throughput_flattens_at"]
    if flat is not None:
        parts.append(f"throughput flattens after {flat}")
    else:
        points = [(p["batch_size"], p["samples_per_s"]) for p in report["throughput"]]
        peak = max(points, key=lambda p: (p[1], -p[0]), default=None)
        if peak is not None and peak[0] < max(b for b, _ in points):
            parts.append(f"throughput peaks at {peak[0]} and falls at larger sizes")
        else:
            parts.append("throughput still grows at the largest size measured")
    noise = report["noise"]["b_simple"]
    if noise is not None and math.isfinite(noise):
        parts.append(
            f"gradient noise scale ~{noise:.0f}, so beyond ~{2 * noise:.0f} extra samples buy "
            "few steps"
        )
    elif noise is not None:
        parts.append("gradient noise scale unbounded (signal not resolved)")
    else:
        parts.append("gradient noise scale not measured")
    mem = report["memory"]
    if mem["capped_by"] == "time budget":
        parts.append(
            f"fits in memory up to at least {mem['max_micro_batch_size']} (the time budget "
            "ended the search)"
        )
    else:
        parts.append(f"fits in memory up to {mem['max_micro_batch_size']} ({mem['capped_by']})")
    return "; ".join(parts)


def number(x: Any, digits: int = 3) -> str:
    """A measurement as the report writes it: ``-`` for none, ``unbounded`` for infinity, large
    floats with thousands separators, others to ``digits`` significant digits.

    >>> number(None), number(math.inf), number(185162.8), number(0.001716), number(64)
    ('-', 'unbounded', '185,163', '0.00172', '64')
    """
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-" if x is None else "unbounded"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.{digits}g}"
    return f"{x}"


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the recommendation, its reasons, the measurements and the plots."""
    sections = (
        _md_summary,
        markdown_race,
        markdown_horizon,
        _md_predicted_time,
        _md_throughput,
        _md_noise,
        _md_memory,
        _md_lr_range,
        _md_reproduce,
    )
    return "\n".join(line for section in sections for line in section(report))


def _md_summary(report: dict[str, Any]) -> list[str]:
    """The title, the recommendation, where it was measured, why, and what was cut short."""
    lines = [
        f"# batchfit tune: {report['task']}",
        "",
        f"**Recommended: {headline(report)}.**",
        "",
        *markdown_warnings(report),
        f"Measured on {report['device']} in {report['seconds']:.1f} s (time budget "
        f"{report['time_budget_s']:g} s), {report['num_samples'] or 'a stream of'} training "
        f"samples. batchfit {report['batchfit_version']}, report version {report['version']}.",
        "",
        "## Why",
        "",
        *[f"- {d}" for d in report["decision"]],
        "",
    ]
    if report["skipped"]:
        lines += ["## Cut short or skipped", "", *[f"- {s}" for s in report["skipped"]], ""]
    return lines


def _md_predicted_time(report: dict[str, Any]) -> list[str]:
    rows = [
        [
            c["batch_size"],
            f"{c['micro_batch_size']} x {c['accumulation']}",
            number(c["samples_per_s"]),
            "yes" if c["measured"] else "no",
            f"{c['relative_time']:.2f}",
        ]
        for c in report["predicted_time"]
    ]
    headers = ["B", "micro-batch x accumulation", "samples/s", "measured", "relative time"]
    return [
        "## Predicted time to a result",
        "",
        "Relative to the best: `(B + B_noise) / samples_per_s(B)`; sizes past the measured range "
        "use the throughput of the largest one (accumulation adds no speed on one device).",
        "",
        "![predicted time](time_to_result.png)",
        "",
        table(headers, rows),
        "",
    ]


def _md_throughput(report: dict[str, Any]) -> list[str]:
    rows = [
        [
            p["batch_size"],
            number(p["samples_per_s"]),
            f"{p['step_seconds'] * 1e3:.3g} ms",
            "-" if p["gain_from_doubling"] is None else f"{p['gain_from_doubling']:+.0%}",
        ]
        for p in report["throughput"]
    ]
    return [
        "## Throughput",
        "",
        "End-to-end training steps (data included), median of the timed steps after warm-up.",
        "",
        "![throughput](throughput.png)",
        "",
        table(["B", "samples/s", "step time", "gain from doubling"], rows),
        "",
    ]


def _md_noise(report: dict[str, Any]) -> list[str]:
    noise = report["noise"]
    lines = ["## Gradient noise scale", ""]
    if noise["b_simple"] is None and not noise["steps_averaged"]:
        return [*lines, "Not measured (see above).", ""]
    low, high = noise["interval"]
    return [
        *lines,
        f"B_simple = tr(Sigma) / |G|^2 ~ **{number(noise['b_simple'])}** "
        f"({noise['confidence']:.0%} interval {number(low)} to {number(high)}), from "
        f"{noise['steps_averaged']} steps with micro-batches of "
        f"{noise['micro_batch_size']} and batches of {noise['batch_size']}, corrected for "
        f"drawing from {noise['finite_data_samples'] or 'an endless stream of'} samples. "
        f"At the initial weights ({noise['start_steps']} steps without updates) it was "
        f"~{number(noise['b_simple_at_start'])}; the warm-up took the loss from "
        f"{noise['loss_start']:.3g} to {noise['loss_end']:.3g}.",
        "",
        "![noise scale](noise_scale.png)",
        "",
        "The seed's law, measured: the error of a batch gradient shrinks only as 1/sqrt(B).",
        "",
        "![gradient error](gradient_error.png)",
        "",
    ]


def _per_rank_sentence(per_rank: list[int]) -> str:
    """Under torchrun: the ceiling is the smallest of the ranks' (each measured on its device)."""
    if len(per_rank) < 2:
        return ""
    each = ", ".join(f"rank {r}: {c}" for r, c in enumerate(per_rank))
    least = per_rank.index(min(per_rank))
    return (
        f"It is the minimum of the {len(per_rank)} ranks' ceilings, each measured on its own "
        f"device ({each}); the limit and trials here are rank {least}'s. "
    )


def _md_memory(report: dict[str, Any]) -> list[str]:
    mem = report["memory"]
    rows = [
        [
            t["micro_batch_size"],
            "yes" if t["fits"] else "no",
            format_bytes(t["peak_bytes"]) if t["peak_bytes"] else "-",
            t["error"] or "",
        ]
        for t in mem["trials"]
    ]
    return [
        "## Memory",
        "",
        f"Limit {format_bytes(mem['limit_bytes'])} ({mem['limit_source']}), "
        f"{mem['headroom']:.0%} headroom; measured as {mem['peak_measure']}. "
        f"Ceiling: micro-batch **{mem['max_micro_batch_size']}** ({mem['capped_by']}). "
        + _per_rank_sentence(mem.get("per_rank", []))
        + f"Check in a limited child process: {mem['confirmation']}.",
        "",
        "![memory and step time](memory_and_step_time.png)",
        "",
        table(["micro-batch", "fits", "peak memory", "error"], rows, "rrrl"),
        "",
    ]


def _md_lr_range(report: dict[str, Any]) -> list[str]:
    lr_range = report["lr_range"]
    if not lr_range:
        return []
    outcome = (
        f"pick {lr_range['pick']:.3g} ({lr_range['rule']})"
        if lr_range["pick"] is not None
        else f"no pick: {lr_range['verdict']}; the lr is rule-scaled instead"
    )
    return [
        "## Learning rate",
        "",
        f"Range test at batch size {lr_range['batch_size']}: lowest smoothed loss at lr "
        f"{lr_range['lr_at_min_loss']:.3g}; {outcome}; stopped: {lr_range['stopped_by']}.",
        "",
        "![lr range test](lr_range.png)",
        "",
    ]


#: The epochs the report's train command names: a start, to set to the run's length.
REPRODUCE_EPOCHS = 10


def train_command(report: dict[str, Any]) -> str:
    """The whole ``batchfit train`` command that trains with the recommendation on the task tune
    measured (its ``--model/--data/...`` options, when tune ran from the command line), to copy
    and run; it names the train command's flags (from the option table) whoever made the report."""
    r = report["recommended"]
    settings = {
        "batch_size": r["batch_size"],
        "micro_batch_size": r["micro_batch_size"],
        "lr": f"{r['lr']:.3g}",
        "optimizer": r["optimizer"],
        **_run_length(report),
        **_threads(report),
        **({} if report.get("precision", "32") == "32" else {"precision": report["precision"]}),
    }
    flags = [OPTIONS["compile"].flags[0]] if report.get("compile") else []
    options = [*(report.get("task_options") or ())]
    options += [f"{OPTIONS[name].flags[0]} {value}" for name, value in settings.items()]
    return " ".join(["batchfit train", *options, *flags])


def _threads(report: dict[str, Any]) -> dict[str, int]:
    """The train command's threads: the ones tune measured with when it chose them (torch's own
    fought over the cores) or was given them; none when torch's own were used."""
    machine = report.get("machine") or {}
    if machine.get("threads_how", "torch's own") == "torch's own":
        return {}
    return {"threads": machine["threads_used"]}


def _run_length(report: dict[str, Any]) -> dict[str, int]:
    """The train command's length: the run's as tune was told it, else a start of
    :data:`REPRODUCE_EPOCHS` epochs."""
    h = report.get("horizon") or {}
    length = {k: h[k] for k in ("epochs", "max_steps") if h.get(k) is not None}
    return length or {"epochs": REPRODUCE_EPOCHS}


def _md_reproduce(report: dict[str, Any]) -> list[str]:
    """The train command that trains with the recommendation (see :func:`train_command`)."""
    epochs = OPTIONS["epochs"].flags[0]
    task = (
        f" (with your task's options: tune ran from Python, so {OPTIONS['model'].flags[0]} and "
        f"{OPTIONS['data'].flags[0]} name your model factory and data)"
        if report.get("task_options") is None
        else ""
    )
    return [
        "## Reproduce",
        "",
        (
            f"Train with it (the length tune was told){task}:"
            if _run_length(report) != {"epochs": REPRODUCE_EPOCHS}
            or (report.get("horizon") or {}).get("epochs") == REPRODUCE_EPOCHS
            else f"Train with it ({REPRODUCE_EPOCHS} epochs to start; set {epochs} to your run's "
            f"length){task}:"
        ),
        "",
        "```bash",
        train_command(report),
        "```",
        "",
    ]

"""``tune``'s decision in words: every rule applied, in the order applied.

The lines go into ``report.json``'s ``decision[]``, ``report.md``'s "Why" and the command's
output: what fits in memory, what the noise probe read and how it moved, what failed, the batch
size's reasons (from :func:`batchfit.core.recommend.recommend`), a cross-check of the choice
against the step-time fit, and where the learning rate came from.
"""

from __future__ import annotations

import math

from batchfit.core.lr_scaling import scale_lr
from batchfit.core.options import opt
from batchfit.core.race import EQUALLY_GOOD
from batchfit.core.recommend import BatchSizeChoice
from batchfit.core.units import format_bytes
from batchfit.orchestrate.tune_result import Recommended
from batchfit.probe.lr_range import LRRange
from batchfit.probe.memory import MemoryCeiling
from batchfit.probe.noise import NoiseMeasurement
from batchfit.probe.race import RaceResult


def decision(
    memory: MemoryCeiling,
    noise: NoiseMeasurement | None,
    choice: BatchSizeChoice,
    lr: float,
    lr_rule: str,
    lr_range: LRRange | None,
    step_time_fit: tuple[float, float] | None,
    failures: list[str],
    raced: bool = False,
) -> list[str]:
    """Every rule applied, in plain words, in the order they were applied; ``lr`` and
    ``lr_rule`` are the learning rate before the race (the answer when there was no race) and
    where it came from."""
    lines = [_memory_line(memory)]
    if memory.confirmed:
        lines.append(
            f"Memory check: micro-batch {memory.max_micro_batch_size} {memory.confirmation}."
        )
    if noise is not None:
        lines.append(noise_line(noise))
    lines.extend(failures)
    lines.extend(choice.decision)
    if step_time_fit is not None and noise is not None and math.isfinite(noise.estimate.b_simple):
        lines.append(_cross_check(step_time_fit, noise.estimate.b_simple))
    line = _lr_line(lr, lr_rule, lr_range)
    lines.append(f"Before the race: {line[0].lower()}{line[1:]}" if raced else line)
    return lines


def _memory_line(memory: MemoryCeiling) -> str:
    """The ceiling, its limit and headroom, and what ended the search."""
    peak = f"peak {format_bytes(memory.peak_bytes)}, " if memory.peak_bytes else ""
    capped = {
        "memory": "more did not fit",
        "data size": "the whole training set: the data size capped the search",
        "max_batch_size": f"{opt('max_batch_size')} capped the search",
        "time budget": "the time budget ended the search, so larger ones may fit too",
        "stream cap": "the search stops there for a stream",
    }[memory.capped_by]
    return (
        f"Memory: micro-batches up to {memory.max_micro_batch_size} fit ({peak}limit "
        f"{format_bytes(memory.limit_bytes)}, {memory.limit_source}; {memory.headroom:.0%} "
        f"headroom kept; {capped}). Measured in {_precision_words(memory.precision)} on the "
        "model's forward as written: "
        "activation checkpointing or a channels_last memory format, where it uses them, count."
    )


def _precision_words(precision: str) -> str:
    """How the memory line names a precision (where the trials ran, the memory check's line
    says: a compiled model's stay in the tune process).

    >>> _precision_words("32"), _precision_words("bf16-mixed")
    ('float32', 'bf16-mixed (bfloat16 autocast)')
    """
    if precision == "32":
        return "float32"
    dtype = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}[precision]
    return f"{precision} ({dtype} autocast)"


def noise_line(noise: NoiseMeasurement) -> str:
    """The noise reading in words: where it ended, where it started, and which way it moved."""
    est = noise.estimate
    text = (
        f"Noise scale measured over {est.pairs} steps after a {noise.warmup_steps}-step warm-up "
        f"(loss {noise.loss_start:.3g} at the initial weights -> {noise.loss_end:.3g}): B_simple "
        f"~{est.b_simple:.0f}, {est.confidence:.0%} interval {est.low:.0f}-{est.high:.0f}."
    )
    start = noise.at_start.b_simple if noise.at_start else math.nan
    if math.isfinite(start) and math.isfinite(est.b_simple):
        if est.b_simple >= start:
            moved = (
                f"it grew from ~{start:.0f} as the loss fell, as McCandlish et al. found; it "
                "usually keeps growing through training, so later on larger batches pay off"
            )
        else:
            moved = (
                f"it fell from ~{start:.0f} as the loss fell (it usually grows through training; "
                "the warm-up may have been too short to show it)"
            )
        text += f" At the initial weights ({noise.start_steps} steps without updates) {moved}."
    elif math.isinf(start):
        text += " At the initial weights it was unbounded (the mean gradient not resolved)."
    return text + (
        " B_simple is a prior for the critical batch size (on image tasks it ran 2-8x above it)."
    )


def _cross_check(step_time_fit: tuple[float, float], b_simple: float) -> str:
    """docs/design.md's closed form: the time is smallest near sqrt(B_noise x a/c)."""
    a, c = step_time_fit
    return (
        f"Cross-check: step time ~ {a * 1e3:.3g} ms + {c * 1e6:.3g} us x B, a throughput knee "
        f"at a/c ~{a / c:.0f}; sqrt(B_noise x a/c) ~{math.sqrt(b_simple * a / c):.0f}."
    )


def _lr_line(lr: float, lr_rule: str, lr_range: LRRange | None) -> str:
    """Where the learning rate came from: the range test's pick, or the rule."""
    if lr_range is not None and lr_range.pick is not None:
        return (
            f"Learning rate {lr:.3g}: range test at batch {lr_range.batch_size} "
            f"({len(lr_range.lrs)} steps, lr {lr_range.lrs[0]:.0e} to {lr_range.lrs[-1]:.2g}); "
            f"lowest smoothed loss at {lr_range.lr_at_min_loss:.3g}, divided by 10."
        )
    if lr_range is not None:
        return (
            f"The learning-rate range test at batch {lr_range.batch_size} was "
            f"{lr_range.verdict}; so learning rate {lr:.3g} ({lr_rule})."
        )
    return f"Learning rate {lr:.3g} ({lr_rule})."


def race_lines(raced: RaceResult | None, prior: Recommended) -> list[str]:
    """The race in words: what ran, who won, who came close, and whether it confirms the
    prediction of the noise-scale model and the range test (``prior``)."""
    if raced is None:
        return []
    winner, horizon, lanes = raced.winner, raced.rounds[-1].horizon_s, raced.contenders_raced
    relative = dict(raced.finalists)[winner]
    pace = "first" if relative <= 1.0 else f"at {relative:.2f}x the fastest's time"
    lines = [
        f"Race: {lanes} short training runs from the initial weights in {len(raced.rounds)} "
        f"round(s), the last {horizon:.2g} s of training each (steps x the measured step time), "
        f"judged on held-out loss: {winner.label()} reached {raced.level:.4g} {pace}."
    ]
    others = [(c, r) for c, r in raced.finalists if c != winner]
    close = [f"{c.label()} ({r:.2f}x)" for c, r in others[:3] if r < math.inf]
    if close:
        lines.append(f"Next in the race: {', '.join(close)}.")
    sizes = sorted({c.batch_size for c in raced.equally_good})
    if len(raced.equally_good) > 1:
        span = f"batch sizes {sizes[0]}-{sizes[-1]}" if len(sizes) > 1 else f"batch size {sizes[0]}"
        lines.append(
            f"Equally good within {EQUALLY_GOOD:.0%} of the fastest: {len(raced.equally_good)} "
            f"runs, {span}; the answer is the one with the lowest learning rate for its batch "
            "size, the furthest from instability."
        )
    noisy = sorted({c.batch_size for c in raced.within_noise})
    if raced.order_spread is not None and noisy and (noisy[0], noisy[-1]) != (sizes[0], sizes[-1]):
        lines.append(
            f"Within the race's own noise (a run's time to the level differs by "
            f"{raced.order_spread:.0%} between the two data orders, median): batch sizes "
            f"{noisy[0]}-{noisy[-1]} are not told apart from the winner; that is the range given."
        )
    lines.append(_against_prior(raced, prior))
    if raced.still_improving:
        lines.append(
            "The winner's held-out loss was still falling when the race ended, so a long run may "
            f"favour a larger batch than this; a larger {opt('time_budget')} races further."
        )
    return lines + _for_the_run_lines(raced) + list(raced.notes)


def _for_the_run_lines(raced: RaceResult) -> list[str]:
    """The learning rate for the planned run's length, measured after the race, in words."""
    longer = raced.for_the_run
    if longer is None:
        return []
    ended = f"lr {longer.observed_lr:.3g} ended lowest"
    run = f"{longer.run_steps} steps" if longer.run_steps else "to its target"
    return [
        f"The lr for your run: B={longer.batch_size} trained at lr "
        + ", ".join(f"{lane.contender.lr:.3g}" for lane in longer.lanes)
        + f" for {longer.steps} steps each ({longer.horizon_s:.2g} s; your run: {run}); {ended}. "
        "Over a short race the boldest stable rate wins, "
        f"and a long run at a constant rate ends at the floor its rate sets: lr {longer.lr:.3g}, "
        f"{longer.how}."
    ]


def _against_prior(raced: RaceResult, prior: Recommended) -> str:
    """Whether the race confirms the noise-scale model's batch size and the range test's lr."""
    winner = raced.winner
    if winner.batch_size == prior.batch_size:
        size = f"It confirms the noise-scale model's batch size {prior.batch_size}"
    else:
        at_prior = [r for c, r in raced.finalists if c.batch_size == prior.batch_size]
        slower = (
            f", which took {at_prior[0]:.2f}x the winner's time"
            if at_prior and at_prior[0] < math.inf
            else ", which did not make the final"
        )
        size = (
            f"It disagrees with the noise-scale model, which predicted batch size "
            f"{prior.batch_size}{slower}"
        )
    ratio = winner.lr / scale_lr(prior.lr, prior.batch_size, winner.batch_size, "sqrt")
    return f"{size}; its learning rate is {ratio:.2g}x the prior's ({prior.lr_rule}), scaled."

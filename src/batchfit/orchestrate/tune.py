"""``batchfit tune``: measure memory, throughput and gradient noise, then recommend a batch size
and a learning rate, with the reasons and the evidence.

Read :func:`tune` top to bottom: each phase is one probe (``batchfit.probe``) that returns a plain
result; the pure :func:`batchfit.core.recommend.recommend` turns them into a choice; the report
module writes ``report.json``, ``report.md`` and plots. The whole run keeps to a time budget: each
phase gets a share of the time left, probes do fewer trials when time is short, and what was cut is
listed in the report; a recommendation that measurements cut short could not settle is marked
provisional. The noise and learning-rate phases may fail (a diverging warm-up, no time, out of
memory) without losing what memory and throughput measured. The user's model is the same after
tuning as before.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batchfit.core import options
from batchfit.core.lr_scaling import default_rule, scale_lr
from batchfit.core.recommend import Recommendation, fit_step_time, recommend
from batchfit.core.units import format_bytes
from batchfit.data.source import BatchSource
from batchfit.errors import BatchfitError, first_line
from batchfit.files import prepare_report_folder
from batchfit.inputs import as_source, check_model_accepts_data, loss_for
from batchfit.losses import Loss, LossFn
from batchfit.probe.harness import (
    Deadline,
    Diverged,
    OutOfTime,
)
from batchfit.probe.lr_range import LRRange, lr_range_test
from batchfit.probe.memory import (
    MemoryCeiling,
    find_max_micro_batch_size,
    is_out_of_memory,
    release_memory,
)
from batchfit.probe.noise import NoiseMeasurement, warmup_and_measure
from batchfit.probe.throughput import Throughput, measure_throughput, powers_of_two_up_to
from batchfit.step import (
    DEFAULT_LR,
    make_optimizer,
    model_device,
    resolve_device,
    smallest_trainable_size,
)

DEFAULT_TIME_BUDGET_S = {"cpu": 60.0, "cuda": 300.0}
#: Shares of the time budget per phase; what a phase leaves unused goes to the next ones.
PHASE_SHARES = {"memory": 0.15, "throughput": 0.25, "noise": 0.35, "lr": 0.25}
#: Time kept back for writing the report and plots (at most 15% of the budget).
REPORT_RESERVE_S = 4.0
#: A budget that leaves less than this for measuring, after start-up and the report, is refused.
MIN_MEASURE_S = 2.0
#: The noise probe's micro-batch and accumulation: b = 32, B = 256 unless memory or data are less.
NOISE_MICRO_BATCH = 32
NOISE_ACCUMULATION = 8
LR_RANGE_STEPS = 60
DEFAULT_LR_BATCH_SIZE = 32


@dataclass(frozen=True)
class Recommended:
    """What to train with."""

    batch_size: int
    micro_batch_size: int
    accumulation: int
    lr: float
    lr_rule: str
    optimizer: str


@dataclass(frozen=True)
class TuneResult:
    """Everything ``tune`` measured and decided; :meth:`to_report` is ``report.json``."""

    task: str
    device: str
    num_samples: int | None
    recommended: Recommended
    memory: MemoryCeiling
    throughput: Throughput
    noise: NoiseMeasurement | None
    lr_range: LRRange | None
    recommendation: Recommendation
    step_time_fit: tuple[float, float] | None
    decision: tuple[str, ...]
    skipped: tuple[str, ...]
    time_budget_s: float
    seconds: float
    phase_seconds: dict[str, float]
    report_files: tuple[str, ...] = field(default=())
    #: The very object written to ``report.json`` (None when no report was written).
    report: dict[str, Any] | None = None

    @property
    def provisional(self) -> bool:
        """True when measurements cut short left larger batch sizes unjudged."""
        return bool(self.recommendation.provisional)

    def to_report(self) -> dict[str, Any]:
        """``report.json``: the object written to disk, or built now when none was written."""
        from batchfit.report.tune_report import build_report

        return self.report if self.report is not None else build_report(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Budget:
    """Hands each phase its share of the time that is left."""

    def __init__(self, seconds: float, started: float, reserve: float) -> None:
        self.total = seconds
        self.end = started + seconds
        self.reserve = reserve
        self.shares = dict(PHASE_SHARES)

    def remaining(self) -> float:
        return self.end - time.time() - self.reserve

    def phase(self, name: str) -> Deadline:
        share = self.shares.pop(name)
        fraction = share / (share + sum(self.shares.values()))
        return Deadline(max(self.remaining(), 0.0) * fraction)

    def give_share_away(self, name: str) -> None:
        """A phase that will not run: the phases after it share its time."""
        self.shares.pop(name)


def _noise_sizes(ceiling: int, n: int | None, smallest: int = 1) -> tuple[int, int] | None:
    """``(micro-batch b, accumulation k)`` for the noise probe: ``smallest <= b <= 32`` and
    ``k <= 8``, ``b k <= N / 2`` so that a measurement run sees several distinct batches.

    >>> _noise_sizes(4000, 4000), _noise_sizes(4000, 40), _noise_sizes(4000, 40, smallest=2)
    ((32, 8), (8, 2), (8, 2))
    >>> _noise_sizes(4000, 6), _noise_sizes(4000, 6, smallest=2)
    ((1, 2), None)
    """
    b = smallest
    while b * 2 <= min(NOISE_MICRO_BATCH, ceiling):
        b *= 2
    k = NOISE_ACCUMULATION
    limit = n // 2 if n is not None else math.inf
    while b * k > limit and k > 2:
        k //= 2
    while b * k > limit and b // 2 >= smallest:
        b //= 2
    return (b, k) if b * k <= limit else None


def tune(
    model: nn.Module,
    data: object,
    *,
    loss: str | LossFn | Loss | None = None,
    optimizer: str = "adam",
    lr: float | None = None,
    lr_batch_size: int = DEFAULT_LR_BATCH_SIZE,
    lr_scaling: str | None = None,
    warmup_lr: float | None = None,
    memory_limit: int | None = None,
    max_batch_size: int | None = None,
    time_budget: float | None = None,
    headroom: float = 0.1,
    device: str | torch.device | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    task_name: str = "your model",
    budget_started: float | None = None,
    log: Callable[[str], None] | None = None,
) -> TuneResult:
    """Measure ``model`` on ``data`` and recommend a batch size, micro-batch and learning rate.

    ``data`` is what :func:`batchfit.train` accepts. ``lr`` (tuned at ``lr_batch_size``) is scaled
    to the recommended batch by ``lr_scaling`` (default: sqrt for Adam/AdamW, linear for SGD);
    without it a learning-rate range test runs at the recommended batch. ``warmup_lr`` is the
    learning rate for the noise probe's warm-up, at ``lr_batch_size`` (default ``lr``, else the
    optimizer's default). ``memory_limit`` (bytes) caps the process's peak memory on CPU (default:
    its memory now plus half the available RAM) or the device's on CUDA. ``time_budget`` (seconds,
    default 60 on CPU) bounds the whole run, counted from ``budget_started`` (a ``time.time()``,
    default now); a budget that leaves under 2 s to measure is refused. With ``out_dir`` the report
    files are written there (checked before measuring; report files of an earlier run are removed
    first). ``log`` receives progress lines. The model's parameters, buffers, mode and device, and
    torch's random state, are the same afterwards.

    Examples:
        >>> import torch
        >>> x = torch.randn(512, 8); y = (x[:, 0] > 0).long()
        >>> result = tune(torch.nn.Linear(8, 2), (x, y), lr=1e-3, time_budget=5, max_batch_size=128)
        >>> result.recommended.batch_size <= 128, result.recommended.lr_rule
        (True, 'adam, sqrt rule from 0.001 at 32')
    """
    wall_start = time.perf_counter()
    budget_started = time.time() if budget_started is None else budget_started
    log = log or (lambda _: None)
    options.check("optimizer", optimizer)
    options.check_optional("lr", lr)
    options.check_optional("lr", warmup_lr, fix="(This was warmup_lr.)")
    options.check("lr_batch_size", lr_batch_size)
    rule = options.check("lr_scaling", lr_scaling) if lr_scaling else default_rule(optimizer)
    options.check_optional("memory_limit", memory_limit)
    options.check_optional("max_batch_size", max_batch_size)
    options.check_optional("time_budget", time_budget)
    options.check("headroom", headroom)
    options.check("seed", seed)
    out = None
    if out_dir is not None:
        from batchfit.report.tune_report import REPORT_FILES  # it imports this module

        out = prepare_report_folder(out_dir, REPORT_FILES)
    source = as_source(data, seed=seed)
    loss = loss_for(source, loss)
    dev = resolve_device(device)
    budget_s = time_budget or DEFAULT_TIME_BUDGET_S["cuda" if dev.type == "cuda" else "cpu"]
    reserve = min(REPORT_RESERVE_S, 0.15 * budget_s) if out is not None else 0.0
    _check_budget_left(budget_s, budget_started, reserve)
    user_device = model_device(model)
    model.to(dev)
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            result = _measure_and_recommend(
                model, source, loss, optimizer, lr, lr_batch_size, rule, warmup_lr,
                memory_limit, max_batch_size, headroom, seed, task_name, log,
                _Budget(budget_s, budget_started, reserve),
            )  # fmt: skip
    finally:
        model.to(user_device)
    result = replace(result, seconds=round(time.perf_counter() - wall_start, 3))
    if out is not None:
        from batchfit.report.tune_report import write_report

        report, files = write_report(result, out)
        result = replace(result, report_files=tuple(str(f) for f in files), report=report)
    return result


def _check_budget_left(budget_s: float, started: float, reserve: float) -> None:
    """Refuse a budget that start-up already used (importing torch, loading data) or that leaves
    too little to measure anything."""
    startup = max(time.time() - started, 0.0)
    left = budget_s - startup - reserve
    if left >= MIN_MEASURE_S:
        return
    need = math.ceil(budget_s)
    while need - startup - (min(REPORT_RESERVE_S, 0.15 * need) if reserve else 0) < MIN_MEASURE_S:
        need += 1
    spent = []
    if startup >= 0.05:
        spent.append(f"start-up took {startup:.1f} s (importing torch, loading the data)")
    if reserve:
        spent.append(f"{reserve:.1f} s are kept for writing the report")
    raise BatchfitError(
        f"The time budget of {budget_s:g} s leaves {max(left, 0.0):.1f} s to measure"
        + (f": {' and '.join(spent)}" if spent else "")
        + f"; tuning needs at least {MIN_MEASURE_S:g} s. Give --time-budget {need} or more "
        f"(default {DEFAULT_TIME_BUDGET_S['cpu']:g} on CPU)."
    )


def _measure_and_recommend(
    model: nn.Module,
    source: BatchSource,
    loss: Loss,
    optimizer: str,
    lr: float | None,
    lr_batch_size: int,
    rule: str,
    warmup_lr: float | None,
    memory_limit: int | None,
    max_batch_size: int | None,
    headroom: float,
    seed: int,
    task_name: str,
    log: Callable[[str], None],
    budget: _Budget,
) -> TuneResult:
    """The phases of :func:`tune`, in order, on the model already on its device."""
    n = source.num_samples
    dev = model_device(model)
    check_model_accepts_data(model, source, loss)
    smallest = smallest_trainable_size(model)
    skipped: list[str] = []
    failures: list[str] = []
    phase_seconds: dict[str, float] = {}

    def timed(name: str, started: float) -> None:
        phase_seconds[name] = round(time.perf_counter() - started, 3)

    # 1. Memory: the largest micro-batch that fits.
    t0 = time.perf_counter()
    log(f"tune: {task_name}, {source.describe()}; time budget {budget.total:g} s")
    opt = make_optimizer(optimizer, model, lr or DEFAULT_LR[optimizer])
    memory = find_max_micro_batch_size(
        model,
        source,
        loss.fn,
        optimizer=opt,
        limit_bytes=memory_limit,
        max_batch_size=max_batch_size,
        headroom=headroom,
        deadline=budget.phase("memory"),
        log=log,
    )
    skipped += memory.notes
    ceiling = memory.max_micro_batch_size
    timed("memory", t0)

    # 2. Throughput at powers of two up to the ceiling.
    t0 = time.perf_counter()
    # The memory search already stopped at --max-batch-size and the data size.
    throughput = measure_throughput(
        model,
        source,
        loss.fn,
        powers_of_two_up_to(ceiling, smallest),
        optimizer=opt,
        max_micro_batch_size=ceiling,
        deadline=budget.phase("throughput"),
        log=log,
    )
    skipped += throughput.notes
    if throughput.out_of_memory_at is not None:
        ceiling = max(p.batch_size for p in throughput.points)
    timed("throughput", t0)

    # 3. Gradient noise scale, at the initial weights and after a short warm-up from them.
    t0 = time.perf_counter()
    noise = None
    sizes = _noise_sizes(ceiling, n, smallest)
    if lr is not None:
        budget.give_share_away("lr")  # no range test: its time goes to the noise probe
    noise_deadline = budget.phase("noise")
    if sizes is None:
        skipped.append(f"Noise scale not measured: {n} samples are too few for two batch sizes.")
    else:
        b, k = sizes
        base_lr = warmup_lr or lr or DEFAULT_LR[optimizer]
        run_lr = scale_lr(base_lr, lr_batch_size, b * k, rule)
        log(
            f"noise: warm-up from the initial weights, batch {b * k} = {k} x {b}, "
            f"{optimizer} lr {run_lr:.3g}"
        )
        error_sizes = powers_of_two_up_to(max(smallest, (n or 8192) // 4), smallest)
        noise = _skip_on_failure(
            "Noise scale",
            skipped,
            failures,
            dev,
            lambda: warmup_and_measure(
                model,
                source,
                loss.fn,
                micro_batch_size=b,
                accumulation=k,
                optimizer=optimizer,
                lr=run_lr,
                deadline=noise_deadline,
                gradient_error_sizes=[s for s in error_sizes if s & (s - 1) == 0],
                max_micro_batch_size=ceiling,
                seed=seed,
                log=log,
            ),
        )
        if noise is not None:
            skipped += noise.notes
            est = noise.estimate
            log(
                f"noise: B_simple ~{est.b_simple:.0f} ({est.confidence:.0%} interval "
                f"{est.low:.0f}-{est.high:.0f}) after {noise.steps} steps"
            )
    timed("noise", t0)

    # 4. The recommendation (pure).
    rec = recommend(
        throughput.pairs(),
        b_noise=noise.estimate.b_simple if noise else None,
        max_micro_batch_size=ceiling,
        num_samples=n,
        max_batch_size=max_batch_size,
        b_noise_interval=(noise.estimate.low, noise.estimate.high) if noise else None,
        ceiling_is_final=memory.capped_by != "time budget",
        min_micro_batch_size=smallest,
    )

    # 5. The learning rate: scaled from the user's, or a range test at the chosen batch.
    t0 = time.perf_counter()
    lr_range = None
    if lr is not None:
        chosen_lr = scale_lr(lr, lr_batch_size, rec.batch_size, rule)
        lr_rule = f"{optimizer}, {rule} rule from {lr:g} at {lr_batch_size}"
    else:
        lr_deadline = budget.phase("lr")
        log(f"lr: range test at batch size {rec.batch_size}")
        lr_range = _skip_on_failure(
            "Learning-rate range test",
            skipped,
            failures,
            dev,
            lambda: lr_range_test(
                model,
                source,
                loss.fn,
                batch_size=rec.batch_size,
                micro_batch_size=rec.micro_batch_size,
                optimizer=optimizer,
                steps=LR_RANGE_STEPS,
                deadline=lr_deadline,
                log=log,
            ),
        )
        if lr_range is not None and lr_range.pick is not None:
            chosen_lr = lr_range.pick
            lr_rule = f"{optimizer}, range test at {rec.batch_size}: {lr_range.rule}"
            if lr_range.stopped_by == "time budget":
                skipped.append(
                    f"The learning-rate range test stopped at lr {lr_range.lrs[-1]:.3g} for "
                    "lack of time, before the loss diverged; the pick may be low."
                )
        else:
            base = warmup_lr or DEFAULT_LR[optimizer]
            chosen_lr = scale_lr(base, lr_batch_size, rec.batch_size, rule)
            lr_rule = f"{optimizer}, {rule} rule from the default {base:g} at {lr_batch_size}"
    timed("lr", t0)
    fit = fit_step_time(throughput.pairs())
    recommended = Recommended(
        batch_size=rec.batch_size,
        micro_batch_size=rec.micro_batch_size,
        accumulation=rec.accumulation,
        lr=chosen_lr,
        lr_rule=lr_rule,
        optimizer=optimizer,
    )
    decision = _decision(memory, noise, rec, recommended, lr_range, fit, failures)
    return TuneResult(
        task=task_name,
        device=str(dev),
        num_samples=n,
        recommended=recommended,
        memory=memory,
        throughput=throughput,
        noise=noise,
        lr_range=lr_range,
        recommendation=rec,
        step_time_fit=fit,
        decision=tuple(decision),
        skipped=tuple(skipped),
        time_budget_s=budget.total,
        seconds=0.0,
        phase_seconds=phase_seconds,
    )


def _skip_on_failure(
    what: str,
    skipped: list[str],
    failures: list[str],
    device: torch.device,
    probe: Callable[[], Any],
) -> Any:
    """Run a probe that the recommendation can do without; when it ran out of time, diverged or
    ran out of memory, say so in ``skipped`` (and a divergence or out-of-memory error also in
    ``failures``, for the decision) and return None. Every other error propagates."""
    try:
        return probe()
    except OutOfTime as exc:
        skipped.append(f"{what} not measured: {exc}")
    except Diverged as exc:
        skipped.append(f"{what} not measured: {exc}")
        failures.append(str(exc))
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        release_memory(device, collect=True)
        message = (
            f"{what} not measured: it ran out of memory ({first_line(exc)[:200]}); "
            "the measurements before it stand."
        )
        skipped.append(message)
        failures.append(message)
    return None


def _decision(
    memory: MemoryCeiling,
    noise: NoiseMeasurement | None,
    rec: Recommendation,
    recommended: Recommended,
    lr_range: LRRange | None,
    fit: tuple[float, float] | None,
    failures: list[str],
) -> list[str]:
    """Every rule applied, in plain words, in the order they were applied."""
    out = []
    peak = f"peak {format_bytes(memory.peak_bytes)}, " if memory.peak_bytes else ""
    capped = {
        "memory": "more did not fit",
        "data size": "the whole training set: the data size capped the search",
        "max_batch_size": "--max-batch-size capped the search",
        "time budget": "the time budget ended the search, so larger ones may fit too",
        "stream cap": "the search stops there for a stream",
    }[memory.capped_by]
    out.append(
        f"Memory: micro-batches up to {memory.max_micro_batch_size} fit ({peak}limit "
        f"{format_bytes(memory.limit_bytes)}, {memory.limit_source}; {memory.headroom:.0%} "
        f"headroom kept; {capped})."
    )
    if memory.confirmed:
        out.append(
            f"Memory check: micro-batch {memory.max_micro_batch_size} {memory.confirmation}."
        )
    if noise is not None:
        out.append(_noise_decision(noise))
    out.extend(failures)
    out.extend(rec.decision)
    if fit is not None and noise is not None and math.isfinite(noise.estimate.b_simple):
        a, c = fit
        out.append(
            f"Cross-check: step time ~ {a * 1e3:.3g} ms + {c * 1e6:.3g} us x B, a throughput knee "
            f"at a/c ~{a / c:.0f}; sqrt(B_noise x a/c) ~"
            f"{math.sqrt(noise.estimate.b_simple * a / c):.0f}."
        )
    if lr_range is not None and lr_range.pick is not None:
        out.append(
            f"Learning rate {recommended.lr:.3g}: range test at batch {lr_range.batch_size} "
            f"({len(lr_range.lrs)} steps, lr {lr_range.lrs[0]:.0e} to {lr_range.lrs[-1]:.2g}); "
            f"lowest smoothed loss at {lr_range.lr_at_min_loss:.3g}, divided by 10."
        )
    elif lr_range is not None:
        out.append(
            f"The learning-rate range test at batch {lr_range.batch_size} was "
            f"{lr_range.verdict}; so learning rate {recommended.lr:.3g} ({recommended.lr_rule})."
        )
    else:
        out.append(f"Learning rate {recommended.lr:.3g} ({recommended.lr_rule}).")
    return out


def _noise_decision(noise: NoiseMeasurement) -> str:
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

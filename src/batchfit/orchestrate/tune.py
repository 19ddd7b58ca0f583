"""``batchfit tune``: measure memory, throughput and gradient noise, then recommend a batch size
and a learning rate, with the reasons and the evidence.

Read :func:`tune` top to bottom, then :func:`_measure_and_recommend`: each phase is one probe
(``batchfit.probe``) that returns a plain result; the pure :func:`batchfit.core.recommend.recommend`
turns them into a choice; :mod:`batchfit.report.tune_report` writes ``report.json``, ``report.md``
and plots from the result as plain data. The whole run keeps to a time budget
(:mod:`~batchfit.orchestrate.tune_budget`): each phase gets a share of the time left, probes do
fewer trials when time is short, and what was cut is listed in the report; a recommendation that
measurements cut short could not settle is marked provisional. The noise and learning-rate phases
may fail (a diverging warm-up, no time, out of memory) without losing what memory and throughput
measured. The decision in words comes from :mod:`~batchfit.orchestrate.tune_decision`. The user's
model is the same after tuning as before.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from batchfit.core.accounting import split_batch
from batchfit.core.configs import TuneConfig
from batchfit.core.lr_scaling import default_rule, scale_lr
from batchfit.core.options import opt
from batchfit.core.recommend import BatchSizeChoice, fit_step_time, recommend
from batchfit.distributed import is_main, place, rank, world_size
from batchfit.errors import BatchfitError
from batchfit.files import discard_report, prepare_report_folder
from batchfit.inputs import (
    as_source,
    check_model,
    check_model_accepts_data,
    loss_for,
    optimizer_options,
)
from batchfit.losses import Loss, LossFn
from batchfit.orchestrate.tune_budget import TimeBudget
from batchfit.orchestrate.tune_decision import decision, race_lines
from batchfit.orchestrate.tune_race import race_phase
from batchfit.orchestrate.tune_ranks import tune_on_ranks
from batchfit.orchestrate.tune_result import Recommended, TuneResult
from batchfit.orchestrate.tune_state import MeasuredNoise, TuneRun
from batchfit.probe.harness import Deadline
from batchfit.probe.lr_range import LRRange, lr_range_test
from batchfit.probe.machine import check_machine
from batchfit.probe.memory import (
    MemoryCeiling,
    batch_norm_cap_error,
    find_max_micro_batch_size,
)
from batchfit.probe.noise import NoiseMeasurement, warmup_and_measure
from batchfit.probe.noise_ranks import FROM_RANKS, JointProbe, follow_noise_probe, lead_noise_probe
from batchfit.probe.race import RaceResult
from batchfit.probe.throughput import Throughput, measure_throughput, powers_of_two_up_to
from batchfit.report.tune_report import REPORT_FILES, write_report
from batchfit.step import (
    DEFAULT_LR,
    make_optimizer,
    model_device,
    resolve_device,
    smallest_trainable_size,
)

#: The noise probe's micro-batch and accumulation: b = 32, B = 256 unless memory or data are less.
NOISE_MICRO_BATCH = 32
NOISE_ACCUMULATION = 8
LR_RANGE_STEPS = 60
T = TypeVar("T")
#: A noise scale read over fewer steps than this is marked provisional.
MIN_NOISE_STEPS = 16


def tune(
    model: nn.Module,
    data: object,
    *,
    val_data: object | None = None,
    loss: str | LossFn | Loss | None = None,
    log: Callable[[str], None] | None = None,
    config: TuneConfig | None = None,
    **options: Any,
) -> TuneResult:
    """Measure ``model`` on ``data`` and recommend a batch size, micro-batch and learning rate.

    ``data`` is what :func:`batchfit.train` accepts; ``val_data`` (the same forms) judges the
    race of short training runs that confirms the batch size and measures the learning rate
    (default: a seeded fifth of ``data``, held out from the race's training); ``loss`` a loss
    name, function or ``None`` (inferred from the target); ``log`` receives progress lines. The
    options (fields of :class:`~batchfit.core.configs.TuneConfig`, keywords or ``config``):

    - ``optimizer``: ``adam`` (default), ``adamw`` or ``sgd``; the optimizer that is measured.
    - ``lr``: your learning rate, tuned at ``lr_batch_size`` (default 32), scaled to the
      recommended batch by ``lr_scaling`` (default: sqrt for Adam/AdamW, linear for SGD); without
      it a learning-rate range test runs at the recommended batch.
    - ``warmup_lr``: the noise probe's warm-up learning rate at ``lr_batch_size`` (default
      ``lr``, else the optimizer's default).
    - ``memory_limit`` (bytes): the peak allowed; on CPU for the whole process (default: its
      memory now plus half the available RAM), on CUDA for the device (default: its memory).
    - ``max_batch_size``: the largest batch size to consider (default: the data set size).
    - ``time_budget`` (seconds, default 60 on CPU, 300 on CUDA): the whole run, counted from
      ``budget_started`` (a ``time.time()``, default now); one that leaves under 2 s to measure
      is refused.
    - ``out_dir``: write the report there (checked before measuring). The new report replaces an
      earlier run's at the end; an interrupted run leaves the earlier one, a failed one removes it.
    - ``headroom``, ``device``, ``seed``, ``task_name``: memory kept free, where to measure, the
      seed, the name in the report.

    The model's parameters, buffers, mode and device, and torch's random state, are the same
    afterwards.

    Under torchrun (or inside a process group of several processes), every rank searches its
    memory ceiling on its own device at the same time, under its own limit; the smallest ceiling
    wins (the report lists each rank's), and an error on any rank (nothing fits) is raised on
    every rank. Then every rank measures the gradient noise scale together from rank 0's
    weights: each rank's gradient over its micro-batch ``b`` is the small batch, their
    all-reduced mean the large one (``b W``), read by the same estimator
    (:mod:`~batchfit.probe.noise_ranks`; the measurement's notes say so). Then rank 0 alone
    measures the rest (throughput, learning rate, race) within that ceiling while the other
    ranks wait, and every rank returns rank 0's result: one decision, the report written once
    (:mod:`~batchfit.orchestrate.tune_ranks`).

    Examples:
        >>> import torch
        >>> x = torch.randn(512, 8); y = (x[:, 0] > 0).long()
        >>> result = tune(torch.nn.Linear(8, 2), (x, y), lr=1e-3, time_budget=5, max_batch_size=128)
        >>> result.recommended.batch_size <= 128, result.recommended.lr_rule
        (True, 'adam, sqrt rule from 0.001 at 32')
    """
    config = _checked_config(model, config, options)
    if world_size() > 1:  # under torchrun: every rank's ceiling, the minimum wins; then rank 0
        config = replace(config, budget_started=config.budget_started or time.time())
        try:
            wait_s = 3 * (config.time_budget or 300) + 300
            return tune_on_ranks(
                lambda: _memory_here(model, data, loss, log, config),
                lambda memory: _noise_here(model, data, loss, log, config, memory, wait_s),
                lambda memory, noise, seconds: _tune(
                    model, data, val_data, loss, log, config, (memory, seconds), noise
                ),
                wait_s=wait_s,
            )
        except BatchfitError:
            if config.out_dir is not None and is_main():  # another rank's error: no old report
                discard_report(config.out_dir, REPORT_FILES)
            raise
    return _tune(model, data, val_data, loss, log, config)


def _tune(
    model: nn.Module,
    data: object,
    val_data: object | None,
    loss: str | LossFn | Loss | None,
    log: Callable[[str], None] | None,
    config: TuneConfig,
    measured: tuple[MemoryCeiling, float] | None = None,
    noise: MeasuredNoise | None = None,
) -> TuneResult:
    """Every phase and the report, in this process; with ``measured`` (the memory ceiling and
    the seconds it took: under torchrun, the minimum over the ranks) every phase but memory, and
    with ``noise`` (under torchrun, measured by the ranks together; its seconds are part of
    ``measured``'s) not the noise phase either."""
    wall_start = time.perf_counter() - (measured[1] if measured else 0.0)
    out = None
    if config.out_dir is not None:
        out = prepare_report_folder(config.out_dir, REPORT_FILES)
    run = _new_run(model, data, val_data, loss, log, config, measuring_began=bool(measured))
    if measured is not None:
        run.memory, run.phase_seconds["memory"] = measured
    if noise is not None:  # its share of the budget is spent
        run.noise, run.phase_seconds["memory"] = noise, round(measured[1] - noise.seconds, 3)
        run.budget.give_share_away("noise")
        if config.lr is not None:
            run.budget.give_share_away("lr")
    result = _measured_on(run, _measure_and_recommend, out)
    result = replace(result, seconds=round(time.perf_counter() - wall_start, 3))
    return result if out is None else _with_report(result, out)


def _memory_here(
    model: nn.Module,
    data: object,
    loss: str | LossFn | Loss | None,
    log: Callable[[str], None] | None,
    config: TuneConfig,
) -> MemoryCeiling:
    """This rank's memory ceiling, on its own device (under torchrun every rank at once):
    :func:`_tune`'s checks and its memory phase, nothing written."""
    if config.out_dir is not None and is_main():
        prepare_report_folder(config.out_dir, REPORT_FILES)  # checked before measuring
    run = _new_run(model, data, None, loss, log, config)
    return _measured_on(run, lambda r: _memory_phase(r, _checked_optimizer(r)), None)


def _noise_here(
    model: nn.Module,
    data: object,
    loss: str | LossFn | Loss | None,
    log: Callable[[str], None] | None,
    config: TuneConfig,
    memory: MemoryCeiling,
    wait_s: float,
) -> MeasuredNoise | None:
    """Under torchrun, on every rank at once: the noise phase from the ranks' gradients within
    the combined ceiling (:mod:`~batchfit.probe.noise_ranks`); rank 0 returns what it measured
    (the others None)."""
    run = _new_run(model, data, None, loss, log, config, measuring_began=True)
    run.memory = memory
    run.budget.give_share_away("memory")
    probe = JointProbe(wait_s)
    try:
        if not is_main():
            steps = _measured_on(
                run, lambda r: follow_noise_probe(r.model, r.source, r.loss_fn, probe), None
            )
            run.log(f"noise: rank {rank()} of {world_size()} took {steps} joint gradient steps")
            return None
        try:
            noise = _measured_on(
                run, lambda r: _noise_phase(r, memory.max_micro_batch_size, probe), None
            )
        finally:
            probe.stop()  # the others wait for it even when rank 0 measured nothing
    finally:
        probe.close()
    return MeasuredNoise(
        noise, tuple(run.skipped), tuple(run.failures), run.phase_seconds.get("noise", 0.0)
    )


def _new_run(
    model: nn.Module,
    data: object,
    val_data: object | None,
    loss: str | LossFn | Loss | None,
    log: Callable[[str], None] | None,
    config: TuneConfig,
    *,
    measuring_began: bool = False,
) -> TuneRun:
    """The run's state: data, loss, device, the time budget (counted from ``budget_started``;
    checked for time left to measure unless ``measuring_began``)."""
    budget_started = time.time() if config.budget_started is None else config.budget_started
    source = as_source(data, seed=config.seed)
    device = place(resolve_device(config.device))
    return TuneRun(
        config=config,
        model=model,
        source=source,
        loss=loss_for(source, loss),
        budget=TimeBudget.start(
            config.time_budget,
            device.type,
            budget_started,
            writes_report=config.out_dir is not None,
            measuring_began=measuring_began,
        ),
        log=log or (lambda _: None),
        smallest=smallest_trainable_size(model),
        lr_scaling=config.lr_scaling or default_rule(config.optimizer),
        val_data=as_source(val_data, shuffle=False, what="validation data")
        if val_data is not None
        else None,
        device=device,
    )


def _checked_config(model: nn.Module, config: TuneConfig | None, options: dict) -> TuneConfig:
    """The run's options, checked with the model before anything is measured or written."""
    # a torch.optim class as its name; a factory as its family and lr (the user's: B only)
    options = optimizer_options(options, ("lr",))
    config = TuneConfig.build(config, **options)
    check_model(model)
    _check_batch_norm_cap(model, config.max_batch_size)
    return config


def _measured_on(run: TuneRun, phases: Callable[[TuneRun], T], out: Path | None) -> T:
    """``phases(run)`` on the run's device with tune's own seed; the model goes back to its
    device and torch's random state is untouched. A run that fails leaves no earlier report in
    ``out`` that could look like its answer (an interrupted one keeps it)."""
    user_device, device = model_device(run.model), run.device
    run.model.to(device)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(run.config.seed)
            return phases(run)
    except BatchfitError:
        if out is not None:
            discard_report(out, REPORT_FILES)
        raise
    finally:
        run.model.to(user_device)


def _check_batch_norm_cap(model: object, max_batch_size: int | None) -> None:
    """Before anything is measured or written: no probe trains batch norm on one sample, so a
    ``max_batch_size`` below the model's smallest trainable size leaves nothing to measure (the
    loop refuses batch norm with a 1-sample micro-batch the same way)."""
    if (
        isinstance(model, nn.Module)
        and max_batch_size is not None
        and max_batch_size < smallest_trainable_size(model)
    ):
        raise batch_norm_cap_error(max_batch_size, "max_batch_size")


def _measure_and_recommend(run: TuneRun) -> TuneResult:
    """The phases of :func:`tune`, in order, on the model already on its device."""
    optimizer = _checked_optimizer(run)
    budget = f"time budget {run.budget.total:g} s"
    run.log(f"tune: {run.config.task_name}, {run.source.describe()}; {budget}")
    # Timings on a shared or oversubscribed CPU are slow alike and say nothing: look first.
    machine = check_machine(model_device(run.model))
    for warning in machine.warnings:
        run.log(f"warning: {warning}")
    memory = _memory_phase(run, optimizer)
    throughput, ceiling = _throughput_phase(run, optimizer, memory.max_micro_batch_size)
    noise = _noise_phase(run, ceiling)
    choice = _choose_batch_size(run, memory, throughput, noise, ceiling)
    prior, lr_range = _lr_phase(run, choice)
    with run.timed("race"):
        raced = race_phase(
            run, choice, throughput, ceiling, prior.lr, run.val_data, run.budget.phase("race")
        )
    recommended = _answer(run, prior, raced, ceiling)
    fit = fit_step_time(throughput.pairs())
    why = [f"Warning: {w}" for w in machine.warnings]
    why += decision(
        memory, noise, choice, prior.lr, prior.lr_rule, lr_range, fit, run.failures, bool(raced)
    ) + race_lines(raced, prior)
    return TuneResult(
        task=run.config.task_name,
        task_options=run.config.task_options,
        device=str(model_device(run.model)),
        num_samples=run.source.num_samples,
        recommended=recommended,
        memory=memory,
        throughput=throughput,
        noise=noise,
        lr_range=lr_range,
        race=raced,
        machine=machine,
        batch_size_choice=choice,
        step_time_fit=fit,
        decision=tuple(why),
        skipped=tuple(run.skipped),
        time_budget_s=run.budget.total,
        seconds=0.0,
        phase_seconds=run.phase_seconds,
    )


def _checked_optimizer(run: TuneRun) -> torch.optim.Optimizer:
    """The measured optimizer, once the model is known to accept the data. Its state counts in
    the memory trials; its step is timed too."""
    check_model_accepts_data(run.model, run.source, run.loss)
    config = run.config
    return make_optimizer(config.optimizer, run.model, config.lr or DEFAULT_LR[config.optimizer])


def _memory_phase(run: TuneRun, optimizer: torch.optim.Optimizer) -> MemoryCeiling:
    """The largest micro-batch that fits (under torchrun: measured already, on every rank)."""
    if run.memory is not None:
        run.budget.give_share_away("memory")
        run.skipped += run.memory.notes
        return run.memory
    with run.timed("memory"):
        memory = find_max_micro_batch_size(
            run.model,
            run.source,
            run.loss_fn,
            optimizer=optimizer,
            limit_bytes=run.config.memory_limit,
            max_batch_size=run.config.max_batch_size,
            headroom=run.config.headroom,
            deadline=run.budget.phase("memory"),
            log=run.log,
        )
        run.skipped += memory.notes
    return memory


def _throughput_phase(
    run: TuneRun, optimizer: torch.optim.Optimizer, ceiling: int
) -> tuple[Throughput, int]:
    """Samples/s at powers of two up to the memory ceiling; returns the throughput and the
    ceiling, lowered to the largest size timed when a larger one ran out of memory."""
    with run.timed("throughput"):
        # The memory search already stopped at max_batch_size and the data size.
        throughput = measure_throughput(
            run.model,
            run.source,
            run.loss_fn,
            powers_of_two_up_to(ceiling, run.smallest),
            optimizer=optimizer,
            max_micro_batch_size=ceiling,
            deadline=run.budget.phase("throughput"),
            log=run.log,
        )
        run.skipped += throughput.notes
    if throughput.out_of_memory_at is not None:
        ceiling = max(p.batch_size for p in throughput.points)
    return throughput, ceiling


def _noise_sizes(
    ceiling: int, n: int | None, smallest: int = 1, ranks: int = 1
) -> tuple[int, int] | None:
    """``(micro-batch b, accumulation k)`` for the noise probe: ``smallest <= b <= 32`` and
    ``k <= 8``, ``b k <= N / 2`` so that a measurement run sees several distinct batches (with
    several ``ranks``, each one micro-batch: ``k`` is the number of ranks).

    >>> _noise_sizes(4000, 4000), _noise_sizes(4000, 40), _noise_sizes(4000, 40, smallest=2)
    ((32, 8), (8, 2), (8, 2))
    >>> _noise_sizes(4000, 6), _noise_sizes(4000, 6, smallest=2)
    ((1, 2), None)
    """
    b = smallest
    while b * 2 <= min(NOISE_MICRO_BATCH, ceiling):
        b *= 2
    k = NOISE_ACCUMULATION if ranks == 1 else ranks
    limit = n // 2 if n is not None else math.inf
    while b * k > limit and k > 2 and ranks == 1:
        k //= 2
    while b * k > limit and b // 2 >= smallest:
        b //= 2
    return (b, k) if b * k <= limit else None


def _noise_phase(
    run: TuneRun, ceiling: int, probe: JointProbe | None = None
) -> NoiseMeasurement | None:
    """The gradient noise scale, at the initial weights and after a short warm-up from them;
    None when the data are too few or the probe failed (``skipped`` says why). With ``probe``
    (under torchrun, on rank 0) every rank measures together, the ranks' gradients the small
    batch and their all-reduce the large one; with ``run.noise`` it was measured so already."""
    if run.noise is not None:
        run.skipped += run.noise.skipped
        run.failures += run.noise.failures
        run.phase_seconds["noise"] = run.noise.seconds
        return run.noise.measurement
    config, n = run.config, run.source.num_samples
    with run.timed("noise"):
        ranks = 1 if probe is None else world_size()
        sizes = _noise_sizes(ceiling, n, run.smallest, ranks)
        if config.lr is not None:
            run.budget.give_share_away("lr")  # no range test: its time goes to the noise probe
        deadline = run.budget.phase("noise")
        if sizes is None:
            run.skipped.append(
                f"Noise scale not measured: {n} samples are too few for two batch sizes."
            )
            return None
        noise = run.unless_it_fails(
            "Noise scale", lambda: _noise_probe(run, sizes, ceiling, deadline, probe)
        )
        if noise is not None:
            run.skipped += [m for m in noise.notes if not m.startswith(FROM_RANKS.split("{")[0])]
            if noise.estimate.pairs < MIN_NOISE_STEPS:
                run.skipped.append(
                    f"The noise scale comes from {noise.estimate.pairs} steps only, so it is "
                    f"provisional (its interval is wide); a larger {opt('time_budget')} reads it "
                    "over more steps."
                )
            est = noise.estimate
            run.log(
                f"noise: B_simple ~{est.b_simple:.0f} ({est.confidence:.0%} interval "
                f"{est.low:.0f}-{est.high:.0f}) after {noise.steps} steps"
            )
    return noise


def _noise_probe(
    run: TuneRun,
    sizes: tuple[int, int],
    ceiling: int,
    deadline: Deadline,
    probe: JointProbe | None,
) -> NoiseMeasurement:
    """The noise probe at micro-batch ``b`` and accumulation ``k`` (``sizes``), or with ``probe``
    at micro-batch ``b`` on each of the ranks."""
    config, n = run.config, run.source.num_samples
    b, k = sizes
    big, parts = (
        (b * k, f"{k} x {b}")
        if probe is None
        else (b * world_size(), f"{world_size()} ranks x {b}")
    )
    base_lr = config.warmup_lr or config.lr or DEFAULT_LR[config.optimizer]
    lr = scale_lr(base_lr, config.lr_batch_size, big, run.lr_scaling)
    run.log(
        f"noise: warm-up from the initial weights, batch {big} = {parts}, "
        f"{config.optimizer} lr {lr:.3g}"
    )
    error_sizes = powers_of_two_up_to(max(run.smallest, (n or 8192) // 4), run.smallest)
    common = dict(
        optimizer=config.optimizer,
        lr=lr,
        deadline=deadline,
        gradient_error_sizes=[s for s in error_sizes if s & (s - 1) == 0],
        max_micro_batch_size=ceiling,
        seed=config.seed,
        log=run.log,
    )
    if probe is not None:
        return lead_noise_probe(
            run.model, run.source, run.loss_fn, probe, micro_batch_size=b, **common
        )
    return warmup_and_measure(
        run.model, run.source, run.loss_fn, micro_batch_size=b, accumulation=k, **common
    )


def _choose_batch_size(
    run: TuneRun,
    memory: MemoryCeiling,
    throughput: Throughput,
    noise: NoiseMeasurement | None,
    ceiling: int,
) -> BatchSizeChoice:
    """The batch size that minimises the predicted time to a result (pure)."""
    return recommend(
        throughput.pairs(),
        b_simple=noise.estimate.b_simple if noise else None,
        max_micro_batch_size=ceiling,
        num_samples=run.source.num_samples,
        max_batch_size=run.config.max_batch_size,
        b_simple_interval=(noise.estimate.low, noise.estimate.high) if noise else None,
        ceiling_is_final=memory.capped_by != "time budget",
        min_micro_batch_size=run.smallest,
    )


def _lr_phase(run: TuneRun, choice: BatchSizeChoice) -> tuple[Recommended, LRRange | None]:
    """The learning rate: the user's, scaled by the rule, or a range test at the chosen batch
    (rule-scaled from the default when the test failed or was inconclusive)."""
    config = run.config
    lr_range = None
    with run.timed("lr"):
        if config.lr is not None:
            lr = scale_lr(config.lr, config.lr_batch_size, choice.batch_size, run.lr_scaling)
            lr_rule = (
                f"{config.optimizer}, {run.lr_scaling} rule from {config.lr:g} at "
                f"{config.lr_batch_size}"
            )
        else:
            lr_range, lr, lr_rule = _lr_from_range_test(run, choice)
    recommended = Recommended(
        batch_size=choice.batch_size,
        micro_batch_size=choice.micro_batch_size,
        accumulation=choice.accumulation,
        lr=lr,
        lr_rule=lr_rule,
        optimizer=config.optimizer,
    )
    return recommended, lr_range


def _lr_from_range_test(run: TuneRun, choice: BatchSizeChoice) -> tuple[LRRange | None, float, str]:
    """``(range test, lr, where the lr came from)`` at the chosen batch size."""
    config = run.config
    deadline = run.budget.phase("lr")
    run.log(f"lr: range test at batch size {choice.batch_size}")
    lr_range = run.unless_it_fails(
        "Learning-rate range test",
        lambda: lr_range_test(
            run.model,
            run.source,
            run.loss_fn,
            batch_size=choice.batch_size,
            micro_batch_size=choice.micro_batch_size,
            optimizer=config.optimizer,
            steps=LR_RANGE_STEPS,
            deadline=deadline,
            log=run.log,
        ),
    )
    if lr_range is not None and lr_range.pick is not None:
        if lr_range.stopped_by == "time budget":
            run.skipped.append(
                f"The learning-rate range test stopped at lr {lr_range.lrs[-1]:.3g} for "
                "lack of time, before the loss diverged; the pick may be low."
            )
        rule = f"{config.optimizer}, range test at {choice.batch_size}: {lr_range.rule}"
        return lr_range, lr_range.pick, rule
    base = config.warmup_lr or DEFAULT_LR[config.optimizer]
    lr = scale_lr(base, config.lr_batch_size, choice.batch_size, run.lr_scaling)
    rule = (
        f"{config.optimizer}, {run.lr_scaling} rule from the default {base:g} at "
        f"{config.lr_batch_size}"
    )
    return lr_range, lr, rule


def _answer(
    run: TuneRun, prior: Recommended, raced: RaceResult | None, ceiling: int
) -> Recommended:
    """The race's winner when there was a race, else the prior. The user's own learning rate
    stays theirs, scaled by the rule to the winning batch size, as without a race."""
    if raced is None:
        return prior
    size = raced.winner.batch_size
    micro, accumulation = split_batch(size, ceiling)
    config = run.config
    if config.lr is not None:
        lr = scale_lr(config.lr, config.lr_batch_size, size, run.lr_scaling)
        rule = prior.lr_rule
    else:
        lr, rule = raced.winner.lr, f"{prior.optimizer}, the fastest of {_lanes(raced)} short runs"
    return Recommended(size, micro, accumulation, lr, rule, prior.optimizer)


def _lanes(raced: RaceResult) -> int:
    return len({lane.contender for r in raced.rounds for lane in r.lanes})


def _with_report(result: TuneResult, out: Path) -> TuneResult:
    """Write the report files into ``out``; the result then lists them and holds the report."""
    report, files = write_report(result.to_dict(), out)
    return replace(result, report_files=tuple(str(f) for f in files), report=report)

"""``batchfit tune``: measure memory, throughput and gradient noise, then recommend a batch size
and a learning rate, with the reasons and the evidence.

Read :func:`tune` top to bottom, then :func:`_measure_and_recommend`: each phase is one probe
(``batchfit.probe``) that returns a plain result, wrapped in a
:class:`~batchfit.orchestrate.tune_state.Phase` with what it cut short, what failed and its
seconds, which :func:`_measure_and_recommend` alone records; the pure
:func:`batchfit.core.recommend.recommend` turns the results into a choice;
:mod:`batchfit.report.tune_report` writes ``report.json``, ``report.md`` and plots from the
result as plain data. The noise phase is :mod:`~batchfit.orchestrate.tune_noise`, the
learning-rate phase :mod:`~batchfit.orchestrate.tune_lr`, the race
:mod:`~batchfit.orchestrate.tune_race`. The whole run keeps to a time budget
(:mod:`~batchfit.orchestrate.tune_budget`): each phase gets a share of the time left, probes do
fewer trials when time is short, and what was cut is listed in the report; a recommendation that
measurements cut short could not settle is marked provisional. The noise and learning-rate phases
may fail (a diverging warm-up, no time, out of memory) without losing what memory and throughput
measured. The decision in words comes from :mod:`~batchfit.orchestrate.tune_decision`. The user's
model is the same after tuning as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from batchfit.compiling import (
    Compiled,
    compiled_forward,
    graphs_compiled,
    is_compiled,
    unwrapped,
    warm_up,
)
from batchfit.core import budget_clock
from batchfit.core.configs import TuneConfig
from batchfit.core.horizon import Horizon
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
from batchfit.orchestrate.tune_horizon import after_race, read_horizon
from batchfit.orchestrate.tune_lr import answer, lr_phase
from batchfit.orchestrate.tune_noise import noise_phase
from batchfit.orchestrate.tune_race import horizon_batch, race_phase, step_seconds
from batchfit.orchestrate.tune_ranks import tune_on_ranks
from batchfit.orchestrate.tune_result import Recommended, TuneResult
from batchfit.orchestrate.tune_state import LearningRates, MeasuredByRanks, Phase, TuneRun, timed
from batchfit.precision import Precision, measured_in
from batchfit.probe.machine import check_machine, choose_threads
from batchfit.probe.memory import (
    MemoryCeiling,
    batch_norm_cap_error,
    find_max_micro_batch_size,
)
from batchfit.probe.noise import NoiseMeasurement
from batchfit.probe.noise_ranks import JointProbe, follow_noise_probe
from batchfit.probe.throughput import Throughput, measure_throughput, powers_of_two_up_to
from batchfit.report.tune_json import ENDED_EARLY
from batchfit.report.tune_report import REPORT_FILES, write_report
from batchfit.step import make_optimizer, model_device, resolve_device, smallest_trainable_size
from batchfit.threads import use_threads

__all__ = ["Recommended", "TuneResult", "tune"]

T = TypeVar("T")

#: The memory check of a compiled model on the CPU, which no forked child can run.
COMPILED_NO_CHILD = (
    "not run: a compiled model's kernels start OpenMP threads, which hang in a forked child "
    "(measured), so the trials ran in this process under the address-space limit"
)


@dataclass(frozen=True)
class _Inputs:
    """What the caller gave ``tune``, its options checked: every run of it starts from these."""

    model: nn.Module
    data: object
    val_data: object | None
    loss: str | LossFn | Loss | None
    log: Callable[[str], None] | None
    config: TuneConfig


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
      ``budget_started`` (a :func:`~batchfit.core.budget_clock.now` reading, default now). One
      that leaves under 2 s to measure even without start-up is refused; one that start-up
      (importing torch, loading the data) left too little of counts from the end of start-up,
      with a note.
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
    if is_compiled(model):  # torch.compile's wrapper: its module is measured, compiled our way
        model, options = unwrapped(model), {**options, "compile": True}
    inputs = _Inputs(model, data, val_data, loss, log, _checked_config(model, config, options))
    if world_size() > 1:  # under torchrun: memory and noise on every rank, then rank 0 alone
        return _tune_on_ranks(inputs)
    return _tune(inputs)


def _tune_on_ranks(inputs: _Inputs) -> TuneResult:
    """:func:`tune` under torchrun: every rank's memory ceiling (the minimum wins) and the joint
    noise probe on every rank, then the rest on rank 0 (:mod:`~batchfit.orchestrate.tune_ranks`)."""
    config = replace(
        inputs.config, budget_started=inputs.config.budget_started or budget_clock.now()
    )
    inputs = replace(inputs, config=config)
    wait_s = 3 * (config.time_budget or 300) + 300
    try:
        return tune_on_ranks(
            lambda: _memory_on_this_rank(inputs),
            lambda memory: _noise_on_every_rank(inputs, memory, wait_s),
            lambda measured: _tune(inputs, measured),
            wait_s=wait_s,
        )
    except BatchfitError:
        if config.out_dir is not None and is_main():  # another rank's error: no old report
            discard_report(config.out_dir, REPORT_FILES)
        raise


def _tune(inputs: _Inputs, by_ranks: MeasuredByRanks | None = None) -> TuneResult:
    """Every phase and the report, in this process; with ``by_ranks`` (under torchrun) the
    memory and noise phases as every rank measured them together."""
    wall_start = time.perf_counter() - (by_ranks.seconds if by_ranks else 0.0)
    out = None
    if inputs.config.out_dir is not None:
        out = prepare_report_folder(inputs.config.out_dir, REPORT_FILES)
    run = _new_run(inputs, spent=by_ranks.PHASES if by_ranks else ())
    result = _measured_on(run, lambda r: _measure_and_recommend(r, by_ranks), out)
    result = replace(result, seconds=round(time.perf_counter() - wall_start, 3))
    return result if out is None else _with_report(result, out)


def _memory_on_this_rank(inputs: _Inputs) -> Phase[MemoryCeiling]:
    """This rank's memory ceiling, on its own device (under torchrun every rank at once):
    :func:`_tune`'s checks and its memory phase, nothing written."""
    if inputs.config.out_dir is not None and is_main():
        prepare_report_folder(inputs.config.out_dir, REPORT_FILES)  # checked before measuring
    run = _new_run(replace(inputs, val_data=None))  # only the race, on rank 0, judges on it
    return _measured_on(run, _rank_memory_phase, None)


def _rank_memory_phase(run: TuneRun) -> Phase[MemoryCeiling]:
    """:func:`_memory_on_this_rank`'s phase: compiled first when asked, so no trial compiles."""
    optimizer = _checked_optimizer(run)
    if run.config.compile:
        _warmed_up(run)
    return _memory_phase(run, optimizer)


def _noise_on_every_rank(
    inputs: _Inputs, memory: MemoryCeiling, wait_s: float
) -> Phase[NoiseMeasurement | None] | None:
    """Under torchrun, on every rank at once: the noise phase from the ranks' gradients within
    the combined ceiling (:mod:`~batchfit.probe.noise_ranks`); rank 0 returns its phase (the
    others None)."""
    run = _new_run(replace(inputs, val_data=None), spent=("memory",))
    probe = JointProbe(wait_s)
    try:
        if not is_main():
            steps = _measured_on(
                run, lambda r: follow_noise_probe(r.model, r.source, r.loss_fn, probe), None
            )
            run.log(f"noise: rank {rank()} of {world_size()} took {steps} joint gradient steps")
            return None
        try:
            return _measured_on(
                run, lambda r: noise_phase(r, memory.max_micro_batch_size, probe), None
            )
        finally:
            probe.stop()  # the others wait for it even when rank 0 measured nothing
    finally:
        probe.close()


def _new_run(inputs: _Inputs, spent: tuple[str, ...] = ()) -> TuneRun:
    """The run's state: data, loss, device, the learning rates and the time budget (counted from
    ``budget_started``; the phases ``spent`` ran before this run, and a run after them is not
    checked for time left to measure)."""
    config = inputs.config
    budget_started = budget_clock.now() if config.budget_started is None else config.budget_started
    source = as_source(inputs.data, seed=config.seed)
    device = place(resolve_device(config.device))
    return TuneRun(
        config=config,
        model=inputs.model,
        source=source,
        loss=loss_for(source, inputs.loss),
        budget=TimeBudget.start(
            config.time_budget,
            device.type,
            budget_started,
            writes_report=config.out_dir is not None,
            spent=spent,
            skipped=("lr",) if config.lr is not None else (),  # no range test
        ),
        log=inputs.log or (lambda _: None),
        smallest=smallest_trainable_size(inputs.model),
        lr=LearningRates.of(config),
        val_data=as_source(inputs.val_data, shuffle=False, what="validation data")
        if inputs.val_data is not None
        else None,
        device=device,
        horizon=Horizon.of(config.epochs, config.max_steps, config.target),
        precision=Precision.of(config.precision, device),
    )


def _checked_config(model: nn.Module, config: TuneConfig | None, options: dict) -> TuneConfig:
    """The run's options, checked with the model before anything is measured or written."""
    # a torch.optim class as its name; a factory as its family and lr (the user's: B only)
    options = optimizer_options(options, ("lr",))
    config = TuneConfig.build(config, **options)
    # the horizon's target parsed (a bad one refused) before anything is measured
    config = replace(config, target=Horizon.of(None, None, config.target).target)
    check_model(model)
    _check_batch_norm_cap(model, config.max_batch_size)
    return config


def _measured_on(run: TuneRun, phases: Callable[[TuneRun], T], out: Path | None) -> T:
    """``phases(run)`` on the run's device with tune's own seed; the model goes back to its
    device and torch's random state and thread count are untouched. A run that fails leaves no
    earlier report in ``out`` that could look like its answer (an interrupted one keeps it)."""
    user_device, device = model_device(run.model), run.device
    user_threads = torch.get_num_threads()
    use_threads(run.config.threads)  # every pass tune makes, from the first
    run.model.to(device)
    try:
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            compiled_forward(run.model, run.config.compile),
            measured_in(run.precision, run.model, run.loss) as loss,
        ):
            torch.manual_seed(run.config.seed)
            return phases(replace(run, loss=loss))
    except BatchfitError:
        if out is not None:
            discard_report(out, REPORT_FILES)
        raise
    finally:
        run.model.to(user_device)
        use_threads(user_threads)


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


def _measure_and_recommend(run: TuneRun, by_ranks: MeasuredByRanks | None) -> TuneResult:
    """The phases of :func:`tune`, in order, on the model already on its device (memory and
    noise as every rank measured them, ``by_ranks``, under torchrun); then the answer, with what
    each phase noted, what failed, and each phase's seconds."""
    optimizer = _checked_optimizer(run)
    compiled = _warmed_up(run) if run.config.compile else None
    budget = f"time budget {run.budget.total:g} s"
    run.log(f"tune: {run.config.task_name}, {run.source.describe()}; {budget}")
    if run.budget.note:
        run.log(f"note: {run.budget.note}")
    # Timings on a shared or oversubscribed CPU are slow alike and say nothing: look first.
    machine = choose_threads(check_machine(model_device(run.model)), run.config.threads)
    use_threads(machine.threads_used)  # _measured_on sets the caller's back
    slow = run.precision.slow_here()
    if slow is not None:
        machine = replace(machine, warnings=(*machine.warnings, slow))
    for warning in machine.warnings:
        run.log(f"warning: {warning}")
    phases: dict[str, Phase[Any]] = {}
    phases["memory"] = by_ranks.memory if by_ranks else _memory_phase(run, optimizer)
    memory: MemoryCeiling = phases["memory"].result
    phases["throughput"] = _throughput_phase(run, optimizer, memory.max_micro_batch_size)
    throughput: Throughput = phases["throughput"].result
    ceiling = _ceiling(memory, throughput)
    cheap = _choose_batch_size(run, memory, throughput, None, ceiling).batch_size
    at = horizon_batch(throughput, cheap)  # the run's length, before its batch is known
    reading = read_horizon(run, at, step_seconds(throughput, [at], ceiling)[at])
    # the noise scale runs even when tune ends early: without it the batch size is throughput's
    # alone, which on held-out short tasks never reached the target on half of them
    phases["noise"] = by_ranks.noise if by_ranks else noise_phase(run, ceiling)
    noise: NoiseMeasurement | None = phases["noise"].result
    choice = _choose_batch_size(run, memory, throughput, noise, ceiling)
    phases["lr"] = lr_phase(run, choice)
    prior, lr_range = phases["lr"].result
    phases["race"] = race_phase(
        run, choice, throughput, ceiling, prior.lr, one_size=reading.ends_early
    )
    raced = phases["race"].result
    failures = [f for phase in phases.values() for f in phase.failures]
    fit = fit_step_time(throughput.pairs())
    why = [f"Warning: {w}" for w in machine.warnings]
    why += [run.budget.note] if run.budget.note else []
    why += decision(
        memory, noise, choice, prior.lr, prior.lr_rule, lr_range, fit, failures, bool(raced)
    ) + race_lines(raced, prior)
    horizon = after_race(reading, raced, run.source.num_samples)
    why += [ENDED_EARLY] if reading.ends_early else []
    why += [horizon.holds] if horizon.holds else []
    why += [_compile_line(compiled)] if compiled else []
    return TuneResult(
        task=run.config.task_name,
        task_options=run.config.task_options,
        device=str(model_device(run.model)),
        num_samples=run.source.num_samples,
        recommended=answer(run, prior, raced, ceiling),
        memory=memory,
        throughput=throughput,
        noise=noise,
        lr_range=lr_range,
        race=raced,
        machine=machine,
        batch_size_choice=choice,
        step_time_fit=fit,
        decision=tuple(why),
        skipped=tuple(note for phase in phases.values() for note in phase.notes),
        time_budget_s=run.budget.total,
        seconds=0.0,
        phase_seconds=_seconds(phases),
        horizon=horizon,
        precision=run.precision.name,
        compile=_compile_record(compiled),
    )


def _warmed_up(run: TuneRun) -> tuple[Compiled, int]:
    """Compile every graph the probes meet before any is timed (:func:`batchfit.compiling.warm_up`
    on two samples of the data): the cost, and the graph count after it, against which the
    probes' recompilations are counted."""
    x, y = next(iter(run.source.batches(0, 2)))
    x, y = x.to(run.device), y.to(run.device)
    compiled = warm_up(run.model, run.loss_fn, x, y, smallest=run.smallest)
    run.budget.postpone(
        compiled.seconds,
        f"Compiling took {compiled.seconds:.1f} s, so the time budget counts from after it.",
    )
    run.log(
        f"compile: {compiled.graphs} graphs in {compiled.seconds:.1f} s (torch.compile, dynamic "
        "shapes), before measuring; no probe's time counts it"
    )
    return compiled, graphs_compiled()


def _compile_record(compiled: tuple[Compiled, int] | None) -> dict[str, Any] | None:
    """report.json's ``compile``: the warm-up's graphs and seconds, and the graphs compiled while
    measuring (a recompilation there would have been timed)."""
    if compiled is None:
        return None
    done, after = compiled
    return {**done.to_dict(), "recompiled_while_measuring": graphs_compiled() - after}


def _compile_line(compiled: tuple[Compiled, int]) -> str:
    record = _compile_record(compiled)
    assert record is not None
    return (
        f"Compiled with torch.compile (dynamic shapes): {record['graphs']} graphs in "
        f"{record['seconds']:.1f} s before measuring, not counted in any step time; "
        f"{record['recompiled_while_measuring']} recompiled while measuring."
    )


def _seconds(phases: Mapping[str, Phase[Any]]) -> dict[str, float]:
    """Each phase's seconds, by name, in the order they ran."""
    return {name: phase.seconds for name, phase in phases.items()}


def _checked_optimizer(run: TuneRun) -> torch.optim.Optimizer:
    """The measured optimizer, once the model is known to accept the data. Its state counts in
    the memory trials; its step is timed too."""
    check_model_accepts_data(run.model, run.source, run.loss)
    return make_optimizer(run.lr.optimizer, run.model, run.lr.measured)


@timed
def _memory_phase(run: TuneRun, optimizer: torch.optim.Optimizer) -> Phase[MemoryCeiling]:
    """The largest micro-batch that fits."""
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
        # a kernel that crashes on a refused allocation (oneDNN's bf16, measured) ends a child;
        # a compiled model's kernels start OpenMP threads that hang in a forked child
        trials_in_child=run.precision.mixed and not run.config.compile,
        confirm=not run.config.compile,
        precision=run.precision.name,
    )
    if run.config.compile and memory.confirmed is None and run.device.type == "cpu":
        memory = replace(memory, confirmation=COMPILED_NO_CHILD)
    return Phase(memory, memory.notes)


@timed
def _throughput_phase(
    run: TuneRun, optimizer: torch.optim.Optimizer, ceiling: int
) -> Phase[Throughput]:
    """Samples/s at powers of two up to the memory ceiling."""
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
    return Phase(throughput, throughput.notes)


def _ceiling(memory: MemoryCeiling, throughput: Throughput) -> int:
    """The micro-batch ceiling: the memory search's, lowered to the largest size timed when a
    larger one ran out of memory in the throughput probe."""
    if throughput.out_of_memory_at is not None:
        return max(p.batch_size for p in throughput.points)
    return memory.max_micro_batch_size


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


def _with_report(result: TuneResult, out: Path) -> TuneResult:
    """Write the report files into ``out``; the result then lists them and holds the report."""
    report, files = write_report(result.to_dict(), out)
    return replace(result, report_files=tuple(str(f) for f in files), report=report)

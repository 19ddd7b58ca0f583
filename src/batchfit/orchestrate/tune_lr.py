"""``tune``'s learning-rate phase: the user's lr scaled by the rule to the chosen batch size, or a
range test there (:mod:`batchfit.probe.lr_range`), or, when the test settles nothing, the
rule-scaled default (:meth:`~batchfit.orchestrate.tune_state.LearningRates.at`); the race then
starts from it (:mod:`batchfit.orchestrate.tune_race`), and :func:`answer` makes its winner the
answer.
"""

from __future__ import annotations

from batchfit.core.accounting import split_batch
from batchfit.core.recommend import BatchSizeChoice
from batchfit.orchestrate.tune_result import Recommended
from batchfit.orchestrate.tune_state import Phase, TuneRun, timed
from batchfit.probe.lr_range import LRRange, lr_range_test
from batchfit.probe.race import RaceResult

LR_RANGE_STEPS = 60


@timed
def lr_phase(run: TuneRun, choice: BatchSizeChoice) -> Phase[tuple[Recommended, LRRange | None]]:
    """The answer before the race, ``choice`` with its learning rate: the user's, scaled by the
    rule, or a range test's pick at the chosen batch (the rule-scaled default when the test
    failed or was inconclusive); and the range test, if one ran."""
    lrs = run.lr
    tried: Phase[LRRange | None] = Phase(None)
    if lrs.given is None:
        tried = _range_test(run, choice)
    lr, rule, lr_range = lrs.at(choice.batch_size), lrs.came_from(), tried.result
    if lr_range is not None and lr_range.pick is not None:
        lr = lr_range.pick
        rule = lrs.came_from(f"range test at {choice.batch_size}: {lr_range.rule}")
    prior = Recommended(
        batch_size=choice.batch_size,
        micro_batch_size=choice.micro_batch_size,
        accumulation=choice.accumulation,
        lr=lr,
        lr_rule=rule,
        optimizer=lrs.optimizer,
    )
    return Phase((prior, lr_range), tried.notes, tried.failures)


def _range_test(run: TuneRun, choice: BatchSizeChoice) -> Phase[LRRange | None]:
    """The range test at the chosen batch size, with a note when time stopped it early."""
    deadline = run.budget.phase("lr")
    run.log(f"lr: range test at batch size {choice.batch_size}")
    tried = run.unless_it_fails(
        "Learning-rate range test",
        lambda: lr_range_test(
            run.model,
            run.source,
            run.loss_fn,
            batch_size=choice.batch_size,
            micro_batch_size=choice.micro_batch_size,
            optimizer=run.lr.optimizer,
            steps=LR_RANGE_STEPS,
            deadline=deadline,
            log=run.log,
        ),
    )
    lr_range = tried.result
    if lr_range is not None and lr_range.pick is not None and lr_range.stopped_by == "time budget":
        note = (
            f"The learning-rate range test stopped at lr {lr_range.lrs[-1]:.3g} for "
            "lack of time, before the loss diverged; the pick may be low."
        )
        return Phase(lr_range, (*tried.notes, note), tried.failures)
    return tried


def answer(run: TuneRun, prior: Recommended, raced: RaceResult | None, ceiling: int) -> Recommended:
    """The race's winner when there was a race, else the prior. The user's own learning rate
    stays theirs, scaled by the rule to the winning batch size, as without a race."""
    if raced is None:
        return prior
    size = raced.winner.batch_size
    micro, accumulation = split_batch(size, ceiling)
    if run.lr.given is not None:
        lr, rule = run.lr.at(size), prior.lr_rule
    else:
        runs = raced.contenders_raced
        lr, rule = raced.winner.lr, run.lr.came_from(f"the fastest of {runs} short runs")
        longer = raced.for_the_run
        if longer is not None:
            lr = longer.lr
            rule = run.lr.came_from(
                f"the fastest of {runs} short runs, then {longer.how} from "
                f"{len(longer.lanes)} runs of {longer.steps} steps"
            )
    return Recommended(size, micro, accumulation, lr, rule, prior.optimizer)

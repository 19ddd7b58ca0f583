"""``tune``'s time budget: one clock for the whole run, shared out among the probe phases.

Each phase gets its share of the time that is left (:data:`PHASE_SHARES`), so what a phase leaves
unused goes to the phases after it. Which phases run is known when the budget starts, and the
budget alone hands out their shares: a phase spent before this run (under torchrun, memory and
noise measured by every rank together) has none left, and a phase that will not run (the range
test, when the lr is given) stops counting once the phase before it begins, so its time goes to
that phase and the ones after it (the noise probe and the race). Time for writing the report is
kept back. The budget counts on :mod:`~batchfit.core.budget_clock` (wall seconds by default).

A budget that leaves too little to measure even without start-up is refused before anything is
measured. One that start-up (importing torch, loading the data) ate into, after the user already
waited for it, is not refused: it counts from the end of start-up instead, and says so.

Examples:
    >>> budget = TimeBudget(100.0, started=budget_clock.now(), reserve=0.0)
    >>> round(budget.phase("memory").remaining())  # its share of what is left
    10
    >>> now = budget_clock.now()
    >>> later = TimeBudget(100.0, now, 0.0, spent=("memory", "noise"), skipped=("lr",))
    >>> round(later.phase("throughput").remaining())  # its share against the race's
    23
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from batchfit.core import budget_clock
from batchfit.core.options import default_of, opt_value
from batchfit.errors import BatchfitError
from batchfit.probe.harness import Deadline

#: Shares of the time budget per phase; what a phase leaves unused goes to the next ones.
PHASE_SHARES = {"memory": 0.1, "throughput": 0.15, "noise": 0.2, "lr": 0.05, "race": 0.5}
#: Time kept back for writing the report and plots (at most 15% of the budget).
REPORT_RESERVE_S = 4.0
#: A budget that leaves less than this for measuring, after start-up and the report, is refused.
MIN_MEASURE_S = 2.0


class TimeBudget:
    """Hands each phase its share of the time that is left, counted from ``started`` (a
    :func:`~batchfit.core.budget_clock.now` reading), less ``reserve`` seconds kept for the
    report. The phases in ``spent`` ran before this run; those in ``skipped`` will not run (see
    the module's docstring). ``note`` says why the budget counts from later than asked."""

    def __init__(
        self,
        seconds: float,
        started: float,
        reserve: float,
        *,
        spent: Sequence[str] = (),
        skipped: Sequence[str] = (),
        note: str | None = None,
    ) -> None:
        self.total = seconds
        self.note = note
        #: How the budget was set, for the report (the caller's, the default, or a long run's).
        self.set_by = "given"
        self.end = started + seconds
        self.reserve = reserve
        self.skipped = frozenset(skipped)
        self.shares = dict(PHASE_SHARES)
        for name in spent:
            self._close(name)

    @classmethod
    def start(
        cls,
        time_budget: float | None,
        device_type: str,
        started: float,
        *,
        writes_report: bool,
        spent: Sequence[str] = (),
        skipped: Sequence[str] = (),
    ) -> TimeBudget:
        """The budget of a run: ``time_budget`` seconds (default per device type), with time kept
        for the report when one is written. Unless phases were ``spent`` already (measuring
        began: under torchrun, on every rank), one too short to measure is refused, and one that
        start-up left too little of counts from now (see the module's docstring)."""
        device = "cuda" if device_type == "cuda" else "cpu"
        seconds = time_budget or default_of("time_budget", device=device)
        reserve = min(REPORT_RESERVE_S, 0.15 * seconds) if writes_report else 0.0
        note = None
        if not spent:
            check_budget_left(seconds, reserve)
            started, note = _after_start_up(seconds, started, reserve)
        budget = cls(seconds, started, reserve, spent=spent, skipped=skipped, note=note)
        if not time_budget:
            budget.set_by = f"the default for {device.upper()}"
        return budget

    def drop(self, *names: str) -> None:
        """Phases that will not run after all (tune ended early): their shares go to the phases
        still to come."""
        for name in names:
            self.shares.pop(name, None)

    def cut_to(self, seconds_left: float) -> None:
        """Leave ``seconds_left`` of the budget from now (never more than is left): a run too
        short to repay tuning ends it early.

        >>> budget = TimeBudget(60.0, started=budget_clock.now(), reserve=0.0)
        >>> budget.cut_to(10.0)
        >>> round(budget.remaining())
        10
        """
        self.end = min(self.end, budget_clock.now() + seconds_left + self.reserve)

    def extend_to(self, seconds: float, set_by: str) -> None:
        """Make the whole budget ``seconds``, counted from the same start: a long run, known
        once its step time is measured, earns the phases still to come more time.

        >>> budget = TimeBudget(60.0, started=budget_clock.now(), reserve=0.0)
        >>> budget.extend_to(300.0, "3% of the predicted run")
        >>> budget.total, round(budget.remaining() / 10)
        (300.0, 30)
        """
        self.end += seconds - self.total
        self.total = seconds
        self.set_by = set_by

    def postpone(self, seconds: float, why: str) -> None:
        """Count the budget ``seconds`` later, saying ``why`` in its note: compiling, like
        start-up, is not measuring, and a budget it used up would leave the probes nothing.

        >>> budget = TimeBudget(60.0, started=budget_clock.now(), reserve=0.0)
        >>> budget.postpone(20.0, "compiling took 20 s")
        >>> round(budget.remaining() / 10), budget.note
        (8, 'compiling took 20 s')
        """
        self.end += seconds
        self.note = why if self.note is None else f"{self.note} {why}"

    def remaining(self) -> float:
        return self.end - budget_clock.now() - self.reserve

    def phase(self, name: str) -> Deadline:
        """The deadline of phase ``name``: its share of the time left, against the shares of the
        phases still to come."""
        share = self._close(name)
        fraction = share / (share + sum(self.shares.values()))
        return Deadline(max(self.remaining(), 0.0) * fraction)

    def _close(self, name: str) -> float:
        """Take phase ``name``'s share out of the pool (returned), and with it the share of each
        skipped phase that comes right after it."""
        share = self.shares.pop(name)
        order = list(PHASE_SHARES)
        for later in order[order.index(name) + 1 :]:
            if later not in self.skipped:
                break
            self.shares.pop(later, None)
        return share


def check_budget_left(budget_s: float, reserve: float) -> None:
    """Refuse a budget too short to measure anything even if start-up took no time; the message
    names the smallest budget that would do."""
    left = budget_s - reserve
    if left >= MIN_MEASURE_S:
        return
    need = math.ceil(budget_s)
    while need - (min(REPORT_RESERVE_S, 0.15 * need) if reserve else 0) < MIN_MEASURE_S:
        need += 1
    kept = f": {reserve:.1f} s are kept for writing the report" if reserve else ""
    raise BatchfitError(
        f"The time budget of {budget_s:g} s leaves {max(left, 0.0):.1f} s to measure{kept}; "
        f"tuning needs at least {MIN_MEASURE_S:g} s. Give {opt_value('time_budget', need)} "
        f"or more (default {default_of('time_budget', device='cpu'):g} on CPU)."
    )


def _after_start_up(budget_s: float, started: float, reserve: float) -> tuple[float, str | None]:
    """When the budget counts from: ``started``, or now with a note when start-up (importing
    torch, loading the data) left under :data:`MIN_MEASURE_S` to measure. The user has waited for
    start-up already; refusing then would waste that wait."""
    now = budget_clock.now()
    startup = max(now - started, 0.0)
    if budget_s - startup - reserve >= MIN_MEASURE_S:
        return started, None
    return now, (
        f"Start-up (importing torch, loading the data) took {startup:.1f} s of the "
        f"{budget_s:g} s time budget, leaving too little to measure; the budget counts from the "
        f"end of start-up instead, so this run takes about {startup + budget_s:.0f} s."
    )

"""What an integration logs of a tune: the answer, whether the race ran, every phase cut short
or skipped, and the reasons.

The Hugging Face helper and the Lightning callback hand tune's answer to a trainer that runs on
its own, so their log is the only place a user sees that the answer was not raced, or was
measured in too little time to trust (PROVISIONAL): those lines go to ``warn``, the rest to
``info``.
"""

from __future__ import annotations

from collections.abc import Callable

from batchfit.core.options import opt
from batchfit.orchestrate.tune_result import TuneResult
from batchfit.report.tune_report import headline

Log = Callable[[str], None]
#: Every line starts with this, so that it stands out among the trainer's own.
PREFIX = "batchfit: "


def log_tune_result(result: TuneResult, info: Log, warn: Log) -> None:
    """Log ``result``: the headline, a PROVISIONAL line with its reasons, whether the race ran,
    each skipped phase, then the decision's reasons."""
    cut = result.provisional
    (warn if cut else info)(PREFIX + headline(result.to_report()))
    if result.batch_size_choice.provisional:
        reasons = "; ".join(result.batch_size_choice.provisional)
        warn(
            f"{PREFIX}PROVISIONAL: measurements cut short left larger batch sizes unjudged "
            f"({reasons}); a larger {opt('time_budget')} settles them."
        )
    elif cut:
        warn(f"{PREFIX}PROVISIONAL: the race did not run, so nothing confirmed the prediction.")
    say_race, line = race_line(result)
    (info if say_race else warn)(PREFIX + line)
    for skipped in result.skipped:
        warn(f"{PREFIX}skipped: {skipped}")
    for reason in result.decision:
        info(PREFIX + reason)


#: A trainer's mixed precisions that tune measures as they train (Lightning's names).
MEASURED_AS_TRAINED = ("bf16-mixed", "16-mixed")


def tune_precision(trainer_precision: str | None) -> tuple[str, str | None]:
    """The precision tune measures a trainer's run in (its own where tune has it: ``32``,
    ``bf16-mixed``, ``16-mixed``), and the line to log where it is not the trainer's own (None:
    it is; a trainer in float64 counts as float32's footprint doubled, so nothing is said).

    >>> tune_precision("bf16-mixed"), tune_precision("32-true"), tune_precision(None)
    (('bf16-mixed', None), ('32', None), ('32', None))
    >>> tune_precision("bf16-true")[1].startswith("batchfit: tune measured in float32, while")
    True
    """
    name = "32" if trainer_precision is None else str(trainer_precision)
    if name in MEASURED_AS_TRAINED:
        return name, None
    if name.startswith(("32", "64")):
        return "32", None
    return "32", (
        f"{PREFIX}tune measured in float32, while this trainer trains in {name}, which tune "
        f"does not measure in (it has {', '.join(MEASURED_AS_TRAINED)}): its memory ceiling is "
        "conservative (lower-precision weights and activations take less) and its step times "
        "are float32's."
    )


def race_line(result: TuneResult) -> tuple[bool, str]:
    """``(whether the race ran, the line that says so)``; when it did not, why."""
    race = result.race
    if race is not None:
        lanes = len({lane.contender for r in race.rounds for lane in r.lanes})
        return True, (
            f"race: ran, {lanes} short training runs in {len(race.rounds)} round(s); its winner "
            f"is the answer ({race.winner.label()})."
        )
    why = next((s for s in result.skipped if s.startswith("The race")), None)
    why = why or next((s for s in result.decision if s.startswith("The race")), None)
    reason = f": {why}" if why else "."
    return False, (
        "race: not run, so the answer is the prediction before the race, unconfirmed by short "
        f"training runs{reason}"
    )

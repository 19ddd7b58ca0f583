"""Pure accounting of batches: epochs, steps, iterations, accumulation and world size.

The words are the ones of docs/design.md. A *batch* of ``batch_size`` samples makes one optimizer
*step*; it is split over ``world_size`` devices and, on each device, into *micro-batches* of at
most ``micro_batch_size`` samples; one forward+backward of one micro-batch on one device is an
*iteration*. An *epoch* is one pass over the training set: ``ceil(N / B)`` steps, the last one
holding the remainder (``floor(N / B)`` with ``drop_last``, the remainder then unused).

No torch here: numbers in, a frozen dataclass out.

Examples:
    >>> p = plan(24000, 32)
    >>> p.steps_per_epoch, p.last_batch_size
    (750, 32)
    >>> plan(2000, 10).steps_per_epoch
    200
    >>> p = plan(1000, 300, micro_batch_size=128, epochs=2)
    >>> p.steps_per_epoch, p.last_batch_size, p.accumulation, p.iterations_per_epoch, p.total_steps
    (4, 100, 3, 10, 8)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from batchfit.core import options
from batchfit.core.options import opt, opt_value
from batchfit.errors import BatchfitError


@dataclass(frozen=True)
class Plan:
    """What a training run with these sizes does, counted exactly.

    ``iterations_per_epoch`` counts the micro-batch passes on one device (the busiest one when the
    batch does not split evenly over devices). ``total_steps`` is ``None`` when neither ``epochs``
    nor ``max_steps`` was given.
    """

    samples: int
    batch_size: int
    micro_batch_size: int
    world_size: int
    accumulation: int
    drop_last: bool
    steps_per_epoch: int
    iterations_per_epoch: int
    last_batch_size: int
    dropped_per_epoch: int
    samples_per_epoch: int
    per_rank_batch_size: tuple[int, ...]
    per_rank_last_batch_size: tuple[int, ...]
    epochs: int | None
    max_steps: int | None
    total_steps: int | None
    total_iterations: int | None
    total_samples: int | None
    epochs_run: float | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        for key in ("per_rank_batch_size", "per_rank_last_batch_size"):
            out[key] = list(out[key])
        return out


def split_evenly(n: int, parts: int) -> list[int]:
    """Split ``n`` samples over ``parts`` holders as evenly as possible, larger shares first.

    >>> split_evenly(10, 3)
    [4, 3, 3]
    >>> split_evenly(1, 2)
    [1, 0]
    """
    base, extra = divmod(n, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


def rank_share(n: int, rank: int, world_size: int) -> slice:
    """The slice of an ``n``-sample global batch that rank ``rank`` of ``world_size`` takes.

    >>> [rank_share(10, r, 3) for r in range(3)]
    [slice(0, 4, None), slice(4, 7, None), slice(7, 10, None)]
    """
    shares = split_evenly(n, world_size)
    offset = sum(shares[:rank])
    return slice(offset, offset + shares[rank])


def micro_batch_sizes(n: int, micro_batch_size: int) -> list[int]:
    """Sizes of the micro-batches that one device runs for ``n`` samples; the last is smaller.

    >>> micro_batch_sizes(10, 4)
    [4, 4, 2]
    >>> micro_batch_sizes(8, 8)
    [8]
    """
    full, rest = divmod(n, micro_batch_size)
    return [micro_batch_size] * full + ([rest] if rest else [])


def single_sample_micro_batch_at(
    samples: int | None, batch_size: int, micro_batch_size: int, drop_last: bool = False
) -> str | None:
    """Where an epoch has a micro-batch of exactly one sample (one device), in words, or None.

    Batch norm cannot train on one sample, so the loop and the sweep check this first.

    >>> single_sample_micro_batch_at(100, 33, 33)      # the last batch holds 100 - 99 = 1
    'the last batch of each epoch (100 % 33 = 1 sample)'
    >>> single_sample_micro_batch_at(100, 33, 33, drop_last=True) is None
    True
    >>> single_sample_micro_batch_at(100, 10, 3), single_sample_micro_batch_at(None, 10, 3)
    ('every step', 'every step')
    >>> single_sample_micro_batch_at(103, 10, 10)      # 103 % 10 = 3 -> one micro-batch of 3
    >>> single_sample_micro_batch_at(102, 10, 4)       # last batch of 2 -> fine; 10 = 4 + 4 + 2
    >>> single_sample_micro_batch_at(105, 10, 4)       # last batch 5 = 4 + 1
    "the last micro-batch of each epoch's last batch"
    """
    if 1 in micro_batch_sizes(batch_size, micro_batch_size):
        return "every step"
    remainder = samples % batch_size if samples is not None and not drop_last else 0
    if remainder == 1:
        return f"the last batch of each epoch ({samples} % {batch_size} = 1 sample)"
    if remainder and 1 in micro_batch_sizes(remainder, micro_batch_size):
        return "the last micro-batch of each epoch's last batch"
    return None


def has_single_sample_micro_batch(
    samples: int | None, batch_size: int, micro_batch_size: int, drop_last: bool = False
) -> bool:
    """Whether some micro-batch of an epoch holds exactly one sample (see above).

    >>> has_single_sample_micro_batch(100, 33, 33), has_single_sample_micro_batch(100, 34, 34)
    (True, False)
    """
    return (
        single_sample_micro_batch_at(samples, batch_size, micro_batch_size, drop_last) is not None
    )


def _iterations_for_batch(n: int, micro_batch_size: int, world_size: int) -> int:
    busiest = math.ceil(n / world_size)
    return math.ceil(busiest / micro_batch_size)


def total_steps(steps_per_epoch: int, epochs: int | None, max_steps: int | None) -> int | None:
    """Steps until ``epochs`` epochs or ``max_steps`` steps, whichever comes first (None: neither).

    >>> total_steps(10, 3, None), total_steps(10, 3, 25), total_steps(10, None, 25)
    (30, 25, 25)
    """
    by_epochs = epochs * steps_per_epoch if epochs is not None else None
    limits = [s for s in (by_epochs, max_steps) if s is not None]
    return min(limits) if limits else None


def check_sizes(batch_size: int, micro_batch_size: int | None = None, world_size: int = 1) -> int:
    """Check batch, micro-batch and world size against each other; return the micro-batch size.

    The default micro-batch is the whole per-device share of the batch (no accumulation).
    """
    options.check("batch_size", batch_size)
    if batch_size == "auto":
        raise BatchfitError(
            f"{opt_value('batch_size', 'auto')} is chosen by running tune first, which train "
            f"does; here give a number of samples, e.g. {opt_value('batch_size', 32)}."
        )
    options.check("world_size", world_size)
    if batch_size < world_size:
        raise BatchfitError(
            f"The batch size ({batch_size}) is smaller than the world size ({world_size}): "
            f"some devices would get no samples. Use a batch size >= {world_size}."
        )
    per_device = math.ceil(batch_size / world_size)
    if micro_batch_size is None:
        return per_device
    options.check("micro_batch_size", micro_batch_size)
    if micro_batch_size > per_device:
        raise BatchfitError(
            f"The micro-batch size ({micro_batch_size}) is larger than the batch size "
            f"({batch_size}) per device ({per_device} on each of {world_size}). "
            f"Use a micro-batch size <= {per_device}, or omit it."
        )
    return micro_batch_size


def check_batch_fits_data(batch_size: int, samples: int) -> None:
    """A batch cannot hold more samples than the data set has."""
    if batch_size > samples:
        raise BatchfitError(
            f"The batch size ({batch_size}) is larger than the training set ({samples} samples). "
            f"Use {opt_value('batch_size', samples)} for full-batch training, or a smaller batch."
        )


def plan(
    samples: int,
    batch_size: int,
    *,
    micro_batch_size: int | None = None,
    world_size: int = 1,
    epochs: int | None = None,
    max_steps: int | None = None,
    drop_last: bool = False,
) -> Plan:
    """Count steps, iterations and samples for a run; raise BatchfitError on impossible sizes.

    Training ends after ``epochs`` epochs or ``max_steps`` steps, whichever comes first.

    Examples:
        >>> plan(24000, 32, epochs=3).total_steps
        2250
        >>> plan(1000, 300, drop_last=True).steps_per_epoch
        3
        >>> plan(100, 32, max_steps=10).epochs_run
        2.5
    """
    options.check("samples", samples)
    micro = check_sizes(batch_size, micro_batch_size, world_size)
    check_batch_fits_data(batch_size, samples)
    options.check_optional("epochs", epochs)
    options.check_optional("max_steps", max_steps)

    full_batches, remainder = divmod(samples, batch_size)
    if drop_last or remainder == 0:
        steps_per_epoch, last = full_batches, batch_size
        dropped = remainder if drop_last else 0
    else:
        steps_per_epoch, last, dropped = full_batches + 1, remainder, 0
    samples_per_epoch = samples - dropped

    full_iterations = _iterations_for_batch(batch_size, micro, world_size)
    iterations_per_epoch = (steps_per_epoch - 1) * full_iterations + _iterations_for_batch(
        last, micro, world_size
    )
    accumulation = full_iterations

    steps = total_steps(steps_per_epoch, epochs, max_steps)
    if steps is None:
        total_iterations = total_samples = epochs_run = None
    else:
        whole_epochs, extra_steps = divmod(steps, steps_per_epoch)
        # A partial epoch never reaches the last (remainder) batch, so its steps are full.
        total_samples = whole_epochs * samples_per_epoch + extra_steps * batch_size
        total_iterations = whole_epochs * iterations_per_epoch + extra_steps * full_iterations
        epochs_run = steps / steps_per_epoch

    return Plan(
        samples=samples,
        batch_size=batch_size,
        micro_batch_size=micro,
        world_size=world_size,
        accumulation=accumulation,
        drop_last=drop_last,
        steps_per_epoch=steps_per_epoch,
        iterations_per_epoch=iterations_per_epoch,
        last_batch_size=last,
        dropped_per_epoch=dropped,
        samples_per_epoch=samples_per_epoch,
        per_rank_batch_size=tuple(split_evenly(batch_size, world_size)),
        per_rank_last_batch_size=tuple(split_evenly(last, world_size)),
        epochs=epochs,
        max_steps=max_steps,
        total_steps=steps,
        total_iterations=total_iterations,
        total_samples=total_samples,
        epochs_run=epochs_run,
    )


def balanced_split(total: int, max_chunk: int) -> list[int]:
    """The fewest chunks of at most ``max_chunk`` that sum to ``total``, sizes differing by at most
    one, so that no chunk is a small remainder (batch norm cannot train on a chunk of one).

    >>> balanced_split(10, 4), balanced_split(1025, 341), balanced_split(3, 8)
    ([4, 3, 3], [257, 256, 256, 256], [3])
    """
    return split_evenly(total, math.ceil(total / max_chunk))


def split_batch(batch_size: int, max_micro_batch_size: int) -> tuple[int, int]:
    """``(micro_batch_size, accumulation)``: the fewest micro-batches that fit, sized evenly.

    >>> split_batch(256, 4000), split_batch(512, 300), split_batch(1000, 300)
    ((256, 1), (256, 2), (250, 4))
    """
    accumulation = math.ceil(batch_size / max_micro_batch_size)
    return math.ceil(batch_size / accumulation), accumulation


def describe_plan(p: Plan) -> list[tuple[str, str]]:
    """``plan``'s explanation, one ``(what, value and why)`` row per line: the table that
    ``batchfit plan`` prints, here so that Python callers get the same words.

    >>> dict(describe_plan(plan(1000, 300, micro_batch_size=128)))["per device, per step"]
    '300 = micro-batches 128 + 128 + 44 (accumulation 3)'
    """
    division = "floor" if p.drop_last else "ceil"
    rows = [
        (
            "steps per epoch",
            f"{p.steps_per_epoch}   ({division}({p.samples} / {p.batch_size}); "
            "a step is one batch, one optimizer update)",
        ),
        ("batch size", f"{p.batch_size} samples per step, over all devices"),
        ("last batch size", _last_batch_text(p)),
        ("per device, per step", _per_device_text(p)),
        (
            "iterations per epoch",
            f"{p.iterations_per_epoch}   (micro-batch forward+backward passes per device)",
        ),
        ("one epoch", _epoch_text(p)),
    ]
    if p.world_size > 1 and p.last_batch_size != p.batch_size:
        rows.append(("last batch per device", _last_batch_per_device_text(p)))
    if p.total_steps is not None and p.epochs_run is not None:
        run = p.epochs_run
        epochs = f"{run:g}" if run == int(run) else f"{run:.3f}"
        rows.append(
            (
                "total steps",
                f"{p.total_steps}   ({epochs} epochs, {p.total_samples} samples, "
                f"{p.total_iterations} iterations per device)",
            )
        )
    return rows


def _per_device_text(p: Plan) -> str:
    busiest = max(p.per_rank_batch_size)
    split = " + ".join(str(s) for s in micro_batch_sizes(busiest, p.micro_batch_size))
    text = f"{busiest} = micro-batches {split} (accumulation {p.accumulation})"
    if p.world_size == 1:
        return text
    if len(set(p.per_rank_batch_size)) == 1:
        return text + f", on each of {p.world_size} devices"
    return text + f"; devices get {list(p.per_rank_batch_size)}"


def _last_batch_text(p: Plan) -> str:
    if p.dropped_per_epoch:
        return f"{p.last_batch_size}   ({p.dropped_per_epoch} samples dropped per epoch)"
    if p.last_batch_size != p.batch_size:
        return f"{p.last_batch_size}   (the remainder)"
    return f"{p.last_batch_size}"


def _epoch_text(p: Plan) -> str:
    if p.last_batch_size != p.batch_size:
        full = p.steps_per_epoch - 1
        return f"{p.samples_per_epoch} samples = {full} x {p.batch_size} + {p.last_batch_size}"
    return f"{p.samples_per_epoch} samples = {p.steps_per_epoch} steps x {p.batch_size}"


def _last_batch_per_device_text(p: Plan) -> str:
    shares = list(p.per_rank_last_batch_size)
    idle = shares.count(0)
    if idle:
        return (
            f"{shares}   ({idle} of {p.world_size} devices get no sample in the last step; "
            f"{opt('drop_last')} drops it)"
        )
    return f"{shares}   (every device still takes the step: equal step counts)"

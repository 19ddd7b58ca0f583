"""The gradient noise scale of a real model, measured on real training steps.

Each measured step takes a batch of ``B = k b`` samples, computes the mean gradient of each of its
``k`` micro-batches of ``b`` samples (one backward each, as gradient accumulation does anyway), and
records the mean squared norm of those micro-batch gradients and the squared norm of their average:
the batch gradient. :mod:`batchfit.core.noise_estimator` turns many such pairs into ``B_simple``
with a confidence interval, correcting for drawing batches without replacement from a finite data
set.

The noise scale grows as the loss falls (McCandlish et al. 2018 report a tenfold rise over a run),
so a reading at initialisation is a lower bound. :func:`warmup_and_measure` therefore reads it at
the initial weights (a few steps without updates), then trains a short while (using the measured
batch gradient for each update, so measuring costs no extra passes), and keeps the steps after the
loss has clearly fallen below its initial value; it also records how the estimate moved. A warm-up
whose loss rises instead (the learning rate is too large) is refused, not measured. Everything is
undone afterwards.

The probe's steps take its state (:class:`WarmUp`) and return the next one, optax's habit: the
readings at the initial weights, the warm-up and its readings, the gradient-error curve at the
warmed-up weights (:func:`~batchfit.probe.gradients.gradient_error_curve`, the seed's
O(sqrt(m)) claim measured directly), then the summary; under torchrun the same steps run on
every rank together (:mod:`batchfit.probe.noise_ranks`).

Memory stays within what training itself needs: gradients are kept per parameter and their
squared norms summed a slice at a time (:mod:`batchfit.probe.gradients`), and large batches are
read and backpropagated in micro-batches no larger than the memory ceiling.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from batchfit.core import budget_clock, options
from batchfit.core.noise_estimator import NoiseScale, estimate_noise_scale, expected_relative_error
from batchfit.core.options import opt
from batchfit.data.source import BatchSource
from batchfit.errors import BatchfitError
from batchfit.inputs import as_source, loss_for
from batchfit.losses import Loss, LossFn
from batchfit.probe.gradients import (
    MIN_REFERENCE,
    REFERENCE_SAMPLES,
    GradientErrorPoint,
    gradient_error_curve,
    gradients_of,
    squared_norm,
    trainable_parameters,
)
from batchfit.probe.harness import Deadline, Diverged, OutOfTime, cycle_batches, preserved
from batchfit.step import make_optimizer, smallest_trainable_size

#: The loss has "clearly fallen" once its recent mean is this share below its initial value ...
LOSS_DROP = 0.25
#: ... and its first fast fall is over once a window's mean is less than this share below the
#: window's before it. On a target with a large mean, the first steps only fit the mean: the
#: loss falls a hundredfold while the noise scale reads near zero (measured: ~0.3 where the
#: critical batch later was ~100), so the reading waits until that fall has run its course.
STILL_FALLING = 0.2
#: Steps per window of the estimate's trajectory, and update-free steps at the initial weights.
WINDOW = 8
#: The warm-up diverged when a step's loss exceeds the initial loss this many times ...
DIVERGED_FACTOR = 10.0
#: ... or when its recent mean ends above the initial loss by this share.
ROSE_BY = 0.1


def measured_step(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    micro_batch_size: int,
) -> tuple[float, float, float]:
    """Gradients of the micro-batches of one batch: returns ``(mean |g_b|^2, |g_B|^2, loss)``
    and leaves the batch gradient ``g_B`` in ``p.grad``, ready for an optimizer step.

    The batch must split into equal micro-batches (``len(y)`` a multiple of ``micro_batch_size``).
    Memory: the running sum of the gradients and the current micro-batch's gradient, one copy of
    the parameters each.
    """
    if len(y) % micro_batch_size:
        raise BatchfitError(
            f"A measured batch of {len(y)} does not split into micro-batches of "
            f"{micro_batch_size}; use a multiple."
        )
    params = trainable_parameters(model)
    device = params[0].device
    total: list[torch.Tensor] | None = None
    small_sq = torch.zeros((), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    parts = len(y) // micro_batch_size
    for xs, ys in zip(x.split(micro_batch_size), y.split(micro_batch_size), strict=True):
        for p in params:
            p.grad = None
        loss = loss_fn(model(xs.to(device)), ys.to(device))
        loss.backward()
        grads = gradients_of(params)
        small_sq += squared_norm(grads)
        loss_sum += loss.detach().double()
        if total is None:
            total = grads  # the next backward makes new .grad tensors; these become the sum
        else:
            for t, g in zip(total, grads, strict=True):
                t.add_(g)
        del grads, loss  # or they stay alive through the next micro-batch's backward
    assert total is not None
    for p, t in zip(params, total, strict=True):
        p.grad = t.div_(parts)
    big_sq = squared_norm(total)
    values = torch.stack([small_sq / parts, big_sq, loss_sum / parts]).tolist()
    return values[0], values[1], values[2]


def noise_scale(
    model: nn.Module,
    data: object,
    loss_fn: str | LossFn | Loss | None,
    micro_batch_size: int,
    batches: int,
    *,
    accumulation: int = 8,
    confidence: float = 0.9,
    seed: int = 0,
) -> NoiseScale:
    """``B_simple`` at the model's current parameters, from ``batches`` batches of
    ``micro_batch_size x accumulation`` samples; the model is left exactly as it was.

    ``data`` is what :func:`batchfit.train` accepts; ``loss_fn`` a function, a loss name
    (``cross_entropy``, ``mse``, ``bce``) or ``None`` (the default for the target). The model runs
    in training mode (the gradients training would see); buffers such as batch-norm statistics are
    restored afterwards.

    Examples:
        >>> import torch
        >>> from batchfit.examples.linreg import load, make_model
        >>> d = load()
        >>> est = noise_scale(make_model(), (d.x_train, d.y_train), "mse",
        ...                   micro_batch_size=4, batches=100, accumulation=16)
        >>> 50 < est.b_simple < 80   # analytic: 65
        True
    """
    options.check("micro_batch_size", micro_batch_size)
    options.check("batches", batches, fix="Give the number of batches to average over.")
    if accumulation < 2:
        raise BatchfitError(
            f"The noise scale needs at least 2 micro-batches per batch; got accumulation "
            f"{accumulation}."
        )
    smallest = smallest_trainable_size(model)
    if micro_batch_size < smallest:
        raise BatchfitError(
            f"The model has batch norm, which cannot train on a micro-batch of {micro_batch_size}; "
            f"use micro_batch_size >= {smallest}."
        )
    source = as_source(data, seed=seed)
    loss_fn = loss_for(source, loss_fn)
    big = micro_batch_size * accumulation
    n = source.num_samples
    if n is not None and big > n:
        raise BatchfitError(
            f"A batch of {micro_batch_size} x {accumulation} = {big} samples is larger than the "
            f"data set ({n}); use a smaller micro-batch or accumulation."
        )
    small_sq, big_sq = [], []
    with preserved(model):
        model.train()
        stream = cycle_batches(source, big)
        for _ in range(batches):
            x, y = next(stream)
            s, b, _ = measured_step(model, loss_fn.fn, x, y, micro_batch_size)
            small_sq.append(s)
            big_sq.append(b)
    return estimate_noise_scale(
        small_sq, big_sq, micro_batch_size, big, n, confidence=confidence, seed=seed
    )


@dataclass(frozen=True)
class NoiseWindow:
    """The estimate over a few consecutive steps of the warm-up run."""

    first_step: int
    last_step: int
    loss: float
    b_simple: float
    low: float
    high: float


@dataclass(frozen=True)
class NoiseMeasurement:
    """The noise probe's result: the estimate after warm-up, where it started, how it moved.

    ``at_start`` is read at the initial weights (``start_steps`` steps without updates);
    ``loss_start`` is the loss there; ``steps`` and ``warmup_steps`` count training steps.
    ``notes`` is everything the probe has to say, for the report: what it cut short
    (``cut_short``, which ``tune`` lists with what else was cut short) and facts about how it
    measured (under torchrun, from the ranks' gradients).
    """

    estimate: NoiseScale
    at_start: NoiseScale | None
    windows: tuple[NoiseWindow, ...]
    steps: int
    warmup_steps: int
    loss_start: float
    loss_end: float
    lr: float
    optimizer: str
    stopped_by: str
    seconds: float
    start_steps: int = 0
    gradient_error: tuple[GradientErrorPoint, ...] = ()
    gradient_error_reference_samples: int | None = None
    notes: tuple[str, ...] = field(default=())
    cut_short: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _diverged(lr: float, loss_start: float, loss: float, step: int, why: str) -> Diverged:
    return Diverged(
        f"The noise-scale warm-up diverged at lr {lr:.3g}: the loss {why} ({loss_start:.3g} at the "
        f"initial weights, {loss:.3g} by step {step}); give a smaller {opt('lr')}."
    )


#: One measured step: reads a batch's gradients, returns ``(mean |g_b|^2, |g_B|^2, loss)`` and
#: leaves the batch gradient in ``.grad`` for the optimizer (in this process, or on every rank).
Step = Callable[[], tuple[float, float, float]]


@dataclass(frozen=True)
class NoiseSettings:
    """How the noise probe runs: batches of ``micro_batch_size x accumulation`` (under torchrun,
    one micro-batch per rank: ``accumulation`` is the number of ranks); the warm-up's optimizer
    and learning rate; at most ``max_steps`` training steps, of which at least
    ``min_measure_steps`` after the warm-up when time allows; the gradient-error curve's batch
    sizes (none: no curve), its repeats and its micro-batch (default: the measured batch); the
    estimate's confidence and the seed."""

    micro_batch_size: int
    accumulation: int
    optimizer: str = "adam"
    lr: float = 1e-3
    max_steps: int = 400
    min_measure_steps: int = 24
    gradient_error_sizes: tuple[int, ...] = ()
    gradient_error_repeats: int = 8
    max_micro_batch_size: int | None = None
    confidence: float = 0.9
    seed: int = 0

    @property
    def batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation


@dataclass(frozen=True)
class Readings:
    """Per step: the mean squared norm of its micro-batch gradients, that of the batch gradient,
    and the loss."""

    small_sq: tuple[float, ...] = ()
    big_sq: tuple[float, ...] = ()
    losses: tuple[float, ...] = ()

    def add(self, small_sq: float, big_sq: float, loss: float) -> Readings:
        return Readings((*self.small_sq, small_sq), (*self.big_sq, big_sq), (*self.losses, loss))

    def estimate(
        self, start: int, stop: int, settings: NoiseSettings, num_samples: int | None
    ) -> NoiseScale:
        """``B_simple`` over steps ``start`` to ``stop`` (0-based, ``stop`` excluded)."""
        return estimate_noise_scale(
            self.small_sq[start:stop],
            self.big_sq[start:stop],
            settings.micro_batch_size,
            settings.batch_size,
            num_samples,
            confidence=settings.confidence,
            seed=settings.seed,
        )


@dataclass(frozen=True)
class WarmUp:
    """The noise probe's state, which each of its steps takes and returns anew (as optax's
    transforms do): the readings at the initial weights and during training, where the warm-up
    ended (None: not yet), why training stopped and its seconds, the gradient-error curve and
    the samples behind its reference gradient, what the probe cut short (``notes``) and facts
    about how it measured (``facts``: under torchrun, from the ranks' gradients)."""

    at_start: Readings = Readings()
    readings: Readings = Readings()
    warmup_end: int | None = None
    stopped_by: str = "steps"
    train_seconds: float = 0.0
    curve: tuple[GradientErrorPoint, ...] = ()
    reference: int | None = None
    notes: tuple[str, ...] = ()
    facts: tuple[str, ...] = ()

    @property
    def loss_start(self) -> float:
        """The mean loss at the initial weights."""
        return _mean(self.at_start.losses)


def warmup_and_measure(
    model: nn.Module,
    data: BatchSource,
    loss_fn: LossFn,
    settings: NoiseSettings,
    *,
    deadline: Deadline | None = None,
    log: Callable[[str], None] | None = None,
) -> NoiseMeasurement:
    """Read the noise scale at the model's current weights, then train from them with batches of
    ``settings.micro_batch_size x settings.accumulation``, measuring at every step, then undo the
    training.

    The first :data:`WINDOW` steps make no update: they read the noise scale and the loss at the
    initial weights. The warm-up ends when the mean loss of the last :data:`WINDOW` steps is
    :data:`LOSS_DROP` below the initial loss and no longer falling fast (or at half the steps or
    half the time); the estimate is taken over the steps after it (at least
    ``settings.min_measure_steps`` when time allows). A loss that is not finite, exceeds
    :data:`DIVERGED_FACTOR` times the initial loss, or ends above it raises
    :class:`~batchfit.probe.harness.Diverged`: such a run measures a diverging model, not the
    noise scale. With ``settings.gradient_error_sizes`` the error of batch gradients is then
    measured at the warmed-up weights (:func:`measure_gradient_error`).
    """
    deadline = deadline or Deadline(None)
    started = time.perf_counter()
    with preserved(model):
        model.train()
        optim = make_optimizer(settings.optimizer, model, settings.lr)
        stream = cycle_batches(data, settings.batch_size)

        def step() -> tuple[float, float, float]:
            x, y = next(stream)
            return measured_step(model, loss_fn, x, y, settings.micro_batch_size)

        # 1. The noise scale and the loss at the initial weights: steps without updates.
        state = read_at_initial_weights(WarmUp(), step, deadline)
        # 2. Warm up from them, then measure, reading every step.
        state = train_and_read(state, step, optim, settings, deadline, log or (lambda _: None))
        # 3. The error of batch gradients at the warmed-up weights.
        state = measure_gradient_error(state, model, data, loss_fn, settings, deadline)
    # 4. The estimate over the measured steps, and how it moved.
    return summarise_noise(state, settings, data.num_samples, started)


def read_at_initial_weights(state: WarmUp, step: Step, deadline: Deadline) -> WarmUp:
    """:data:`WINDOW` readings at the initial weights (no updates), and so the loss there."""
    at_start = state.at_start
    for _ in range(WINDOW):
        if deadline.expired():
            raise OutOfTime(
                "no time was left to read the noise scale at the initial weights; give a "
                f"larger {opt('time_budget')}."
            )
        at_start = at_start.add(*step())
    state = replace(state, at_start=at_start)
    if not math.isfinite(state.loss_start):
        raise BatchfitError(
            f"The loss at the initial weights is {state.loss_start}; check the data and the model."
        )
    return state


def train_and_read(
    state: WarmUp,
    step: Step,
    optim: torch.optim.Optimizer,
    settings: NoiseSettings,
    deadline: Deadline,
    log: Callable[[str], None],
) -> WarmUp:
    """Train with the measured batch gradients, reading each step, until enough steps after the
    warm-up were read or time is up; refuse a run whose loss diverged."""
    loss_start = state.loss_start
    # Losses may be negative (a log-likelihood), so changes are measured against |loss|.
    scale = abs(loss_start)
    half_time = deadline.remaining() / 2
    # Leave time for the gradient-error curve after the warm-up run.
    run_deadline = Deadline(deadline.remaining() * (0.8 if settings.gradient_error_sizes else 1.0))
    started, clock_started = time.perf_counter(), budget_clock.now()
    readings, warmup_end, stopped_by, notes = state.readings, state.warmup_end, "steps", state.notes
    for done in range(1, settings.max_steps + 1):
        small_sq, big_sq, loss = step()
        if not math.isfinite(loss) or loss - loss_start > (DIVERGED_FACTOR - 1) * scale:
            why = (
                "became non-finite"
                if not math.isfinite(loss)
                else f"rose over {DIVERGED_FACTOR:g}-fold"
            )
            raise _diverged(settings.lr, loss_start, loss, done, why)
        optim.step()
        readings = readings.add(small_sq, big_sq, loss)
        if warmup_end is None and done >= 2 * WINDOW:
            halfway = (
                done >= settings.max_steps // 2 or budget_clock.now() - clock_started >= half_time
            )
            ended = _end_of_warm_up(readings.losses, loss_start, halfway)
            if ended is not None:
                warmup_end, (why, note) = done, ended
                log(f"noise: warm-up done after {done} steps ({why}); measuring")
                notes += (note,) if note else ()
        if (
            warmup_end is not None
            and done - warmup_end >= settings.min_measure_steps
            and (done >= 2 * warmup_end or run_deadline.remaining() < 0.3 * half_time)
        ):
            stopped_by = "enough steps"
            break
        if run_deadline.expired():
            stopped_by = "time budget"
            break
    seconds = time.perf_counter() - started
    loss_end = _mean(readings.losses[-WINDOW:])
    if readings.losses and loss_end > loss_start + ROSE_BY * scale:
        why = "rose instead of falling"
        raise _diverged(settings.lr, loss_start, loss_end, len(readings.losses), why)
    return replace(
        state,
        readings=readings,
        warmup_end=warmup_end,
        stopped_by=stopped_by,
        train_seconds=seconds,
        notes=notes,
    )


def _end_of_warm_up(
    losses: Sequence[float], loss_start: float, halfway: bool
) -> tuple[str, str | None] | None:
    """Whether the warm-up is over after ``losses`` (one per training step): once the loss has
    clearly fallen (:data:`LOSS_DROP`) and its first fast fall is over (:data:`STILL_FALLING`),
    or ``halfway`` (half the steps or time have passed: the estimate then comes earlier in
    training than intended). Returns why it ended and, when earlier than intended, a note that
    says so; None while it goes on.

    >>> _end_of_warm_up([0.6] * 8 + [0.55] * 8, 1.0, halfway=False)
    ('the loss fell by 25% and its fast fall is over', None)
    >>> _end_of_warm_up([1.0] * 16, 1.0, halfway=False) is None
    True
    """
    scale, done = abs(loss_start), len(losses)
    recent, before = _mean(losses[-WINDOW:]), _mean(losses[-2 * WINDOW : -WINDOW])
    fell = recent <= loss_start - LOSS_DROP * scale
    slowed = recent >= before - STILL_FALLING * abs(before)
    if not ((fell and slowed) or halfway):
        return None
    if fell and slowed:
        return f"the loss fell by {LOSS_DROP:.0%} and its fast fall is over", None
    why = "half the warm-up allowance passed"
    if not fell:
        return why, (
            f"The loss had not fallen by {LOSS_DROP:.0%} after {done} warm-up steps; the "
            "estimate is taken earlier in training than intended (a lower bound)."
        )
    return why, (
        f"The loss was still falling fast after {done} warm-up steps; the estimate is "
        "taken earlier in training than intended (likely a lower bound)."
    )


def measure_gradient_error(
    state: WarmUp,
    model: nn.Module,
    data: BatchSource,
    loss_fn: LossFn,
    settings: NoiseSettings,
    deadline: Deadline,
) -> WarmUp:
    """:func:`gradient_error_curve` at the warmed-up weights for ``settings.gradient_error_sizes``
    (none, or no training steps: nothing to do), in micro-batches of
    ``settings.max_micro_batch_size`` (default: the measured batch) to stay within memory, with
    a reference gradient over as many samples as 30% of the time left allows (at the warm-up's
    cost per sample); a note when it could not be measured."""
    steps = len(state.readings.losses)
    if not settings.gradient_error_sizes or not steps:
        return state
    per_sample = max(state.train_seconds, 1e-9) / (steps * settings.batch_size)
    allowance = 0.3 * deadline.remaining()
    reference = REFERENCE_SAMPLES
    if math.isfinite(allowance):
        reference = min(reference, int(allowance / per_sample))
    n = data.num_samples
    if n is not None:
        reference = min(reference, n)
    if reference >= MIN_REFERENCE:
        curve, reference = gradient_error_curve(
            model,
            data,
            loss_fn,
            settings.gradient_error_sizes,
            micro_batch_size=settings.max_micro_batch_size or settings.batch_size,
            repeats=settings.gradient_error_repeats,
            reference_samples=reference,
            deadline=deadline,
        )
        if curve:
            return replace(state, curve=curve, reference=reference)
    why = (
        f"{n} samples are too few"
        if n is not None and n < MIN_REFERENCE
        else "there was not enough time"
    )
    note = f"The gradient-error curve was not measured: {why}."
    return replace(state, notes=(*state.notes, note))


def summarise_noise(
    state: WarmUp, settings: NoiseSettings, num_samples: int | None, started: float
) -> NoiseMeasurement:
    """The estimate over the steps after the warm-up (when time ended the run before the warm-up
    did, over the second half of them, and a note says so), the reading at the initial weights,
    the trajectory per :data:`WINDOW` steps, and the curve's predictions from the estimate; the
    probe's time is counted from ``started`` (a ``perf_counter``)."""
    readings = state.readings
    steps = len(readings.losses)
    warmup_end = state.warmup_end
    late: tuple[str, ...] = ()
    if warmup_end is None:
        warmup_end = steps // 2
        late = (
            f"Time allowed only {steps} steps: the first half counts as warm-up, the estimate "
            "uses the second half.",
        )
    if steps - warmup_end < 2:
        raise OutOfTime(
            f"Only {steps} noise-scale steps fit in the time budget; give a larger "
            f"{opt('time_budget')}."
        )
    estimate = readings.estimate(warmup_end, steps, settings, num_samples)
    windows = []
    for lo in range(0, steps - WINDOW + 1, WINDOW):
        w = readings.estimate(lo, lo + WINDOW, settings, num_samples)
        loss = _mean(readings.losses[lo : lo + WINDOW])
        windows.append(NoiseWindow(lo + 1, lo + WINDOW, loss, w.b_simple, w.low, w.high))
    curve = state.curve
    if math.isfinite(estimate.b_simple):
        curve = tuple(
            replace(
                p,
                predicted=expected_relative_error(estimate.b_simple, p.batch_size, state.reference),
            )
            for p in curve
        )
    return NoiseMeasurement(
        estimate=estimate,
        at_start=state.at_start.estimate(0, WINDOW, settings, num_samples),
        windows=tuple(windows),
        steps=steps,
        warmup_steps=warmup_end,
        loss_start=state.loss_start,
        loss_end=_mean(readings.losses[-WINDOW:]),
        lr=settings.lr,
        optimizer=settings.optimizer,
        stopped_by=state.stopped_by,
        seconds=time.perf_counter() - started,
        start_steps=WINDOW,
        gradient_error=curve,
        gradient_error_reference_samples=state.reference,
        notes=(*state.notes, *state.facts, *late),
        cut_short=(*state.notes, *late),
    )

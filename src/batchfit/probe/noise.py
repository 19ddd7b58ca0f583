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

:func:`gradient_error_curve` measures the seed's O(sqrt(m)) claim directly: the error of a batch
gradient against the full gradient, for growing batch sizes.

Memory stays within what training itself needs: gradients are kept per parameter (no flattened
copy), squared norms are summed in float64 a slice at a time, and large batches are read and
backpropagated in micro-batches no larger than the memory ceiling.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from batchfit.core import options
from batchfit.core.noise_estimator import NoiseScale, estimate_noise_scale, expected_relative_error
from batchfit.core.options import opt
from batchfit.data.source import Batch, BatchSource
from batchfit.errors import BatchfitError
from batchfit.inputs import as_source, loss_for
from batchfit.losses import Loss, LossFn
from batchfit.probe.harness import (
    Deadline,
    Diverged,
    OutOfTime,
    SampleReader,
    cycle_batches,
    preserved,
)
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
#: Squared norms are summed in float64 over slices of this many elements (a float64 copy of a
#: whole large weight matrix would double its memory for a moment).
NORM_SLICE = 2**18
#: The gradient-error curve's reference gradient: over at most this many samples, and at least
#: this many, or the curve is not measured.
REFERENCE_SAMPLES = 16384
MIN_REFERENCE = 64


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise BatchfitError("The model has no trainable parameters; nothing to measure.")
    return params


def gradients_of(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def squared_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum |t|^2`` over ``tensors`` in float64, without a float64 copy of any whole tensor.

    >>> float(squared_norm([torch.ones(3), torch.full((2, 2), 2.0)]))
    19.0
    """
    total: torch.Tensor | None = None
    for t in tensors:
        for part in t.detach().reshape(-1).split(NORM_SLICE):
            sq = torch.linalg.vector_norm(part, dtype=torch.float64).square()
            total = sq if total is None else total + sq
    return total if total is not None else torch.zeros((), dtype=torch.float64)


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
class GradientErrorPoint:
    """RMS of ``|g_B - G| / |G|`` over ``repeats`` batches, and its prediction from ``B_simple``."""

    batch_size: int
    relative_error: float
    predicted: float | None
    repeats: int


@dataclass(frozen=True)
class NoiseMeasurement:
    """The noise probe's result: the estimate after warm-up, where it started, how it moved.

    ``at_start`` is read at the initial weights (``start_steps`` steps without updates);
    ``loss_start`` is the loss there; ``steps`` and ``warmup_steps`` count training steps.
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _diverged(lr: float, loss_start: float, loss: float, step: int, why: str) -> Diverged:
    return Diverged(
        f"The noise-scale warm-up diverged at lr {lr:.3g}: the loss {why} ({loss_start:.3g} at the "
        f"initial weights, {loss:.3g} by step {step}); give a smaller {opt('lr')}."
    )


@dataclass
class _Readings:
    """Per step: the mean squared norm of its micro-batch gradients, that of the batch gradient,
    and the loss."""

    small_sq: list[float] = field(default_factory=list)
    big_sq: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def add(self, small_sq: float, big_sq: float, loss: float) -> None:
        self.small_sq.append(small_sq)
        self.big_sq.append(big_sq)
        self.losses.append(loss)

    def estimate(self, start: int, stop: int, run: WarmUp) -> NoiseScale:
        """``B_simple`` over steps ``start`` to ``stop`` (0-based, ``stop`` excluded)."""
        return estimate_noise_scale(
            self.small_sq[start:stop],
            self.big_sq[start:stop],
            run.micro_batch_size,
            run.batch_size,
            run.num_samples,
            confidence=run.confidence,
            seed=run.seed,
        )


@dataclass
class WarmUp:
    """One run of the noise probe: its settings, the readings at the initial weights and during
    training, where the warm-up ended, why the run stopped, and what it has to say."""

    model: nn.Module
    loss_fn: LossFn
    micro_batch_size: int
    batch_size: int
    num_samples: int | None
    optimizer: str
    lr: float
    confidence: float
    seed: int
    log: Callable[[str], None]
    at_start: _Readings = field(default_factory=_Readings)
    readings: _Readings = field(default_factory=_Readings)
    loss_start: float = math.nan
    warmup_end: int | None = None
    stopped_by: str = "steps"
    started: float = 0.0  # when training began (perf_counter): the cost per sample comes from it
    notes: list[str] = field(default_factory=list)

    def step(self, stream: Iterator[Batch]) -> tuple[float, float, float]:
        """Read one batch's gradients; its batch gradient is left in ``.grad``."""
        x, y = next(stream)
        return measured_step(self.model, self.loss_fn, x, y, self.micro_batch_size)


def warmup_and_measure(
    model: nn.Module,
    data: BatchSource,
    loss_fn: LossFn,
    *,
    micro_batch_size: int,
    accumulation: int,
    optimizer: str = "adam",
    lr: float = 1e-3,
    max_steps: int = 400,
    min_measure_steps: int = 24,
    deadline: Deadline | None = None,
    gradient_error_sizes: Sequence[int] = (),
    gradient_error_repeats: int = 8,
    max_micro_batch_size: int | None = None,
    confidence: float = 0.9,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> NoiseMeasurement:
    """Read the noise scale at the model's current weights, then train from them with batches of
    ``micro_batch_size x accumulation``, measuring at every step, then undo the training.

    The first :data:`WINDOW` steps make no update: they read the noise scale and the loss at the
    initial weights. The warm-up ends when the mean loss of the last :data:`WINDOW` steps is 25%
    below the initial loss (or at half the steps or half the time); the estimate is taken over the
    steps after it (at least ``min_measure_steps`` when time allows). A loss that is not finite,
    exceeds 10x the initial loss, or ends above it raises :class:`~batchfit.probe.harness.Diverged`:
    such a run measures a diverging model, not the noise scale. With ``gradient_error_sizes`` the
    error of batch gradients is then measured at the warmed-up weights
    (:func:`gradient_error_curve`), in micro-batches of ``max_micro_batch_size`` (default: the
    measured batch) to stay within memory, with a reference gradient over as many samples as the
    time left allows.
    """
    deadline = deadline or Deadline(None)
    started = time.perf_counter()
    run = WarmUp(
        model=model,
        loss_fn=loss_fn,
        micro_batch_size=micro_batch_size,
        batch_size=micro_batch_size * accumulation,
        num_samples=data.num_samples,
        optimizer=optimizer,
        lr=lr,
        confidence=confidence,
        seed=seed,
        log=log or (lambda _: None),
    )
    curve: tuple[GradientErrorPoint, ...] = ()
    reference = None
    with preserved(model):
        model.train()
        optim = make_optimizer(optimizer, model, lr)
        stream = cycle_batches(data, run.batch_size)
        # 1. The noise scale and the loss at the initial weights: steps without updates.
        read_at_initial_weights(run, stream, deadline)
        # 2. Warm up from them, then measure, reading every step.
        train_and_read(
            run, optim, stream, max_steps, min_measure_steps, deadline, bool(gradient_error_sizes)
        )
        # 3. The error of batch gradients at the warmed-up weights.
        if gradient_error_sizes and run.readings.losses:
            curve, reference = measure_gradient_error(
                run,
                data,
                gradient_error_sizes,
                repeats=gradient_error_repeats,
                micro_batch_size=max_micro_batch_size or run.batch_size,
                deadline=deadline,
            )
    # 4. The estimate over the measured steps, and how it moved.
    return summarise_noise(run, curve, reference, started)


def read_at_initial_weights(run: WarmUp, stream: Iterator[Batch], deadline: Deadline) -> None:
    """:data:`WINDOW` readings at the initial weights (no updates), and the loss there."""
    for _ in range(WINDOW):
        if deadline.expired():
            raise OutOfTime(
                "no time was left to read the noise scale at the initial weights; give a "
                f"larger {opt('time_budget')}."
            )
        run.at_start.add(*run.step(stream))
    run.loss_start = _mean(run.at_start.losses)
    if not math.isfinite(run.loss_start):
        raise BatchfitError(
            f"The loss at the initial weights is {run.loss_start}; check the data and the model."
        )


def train_and_read(
    run: WarmUp,
    optim: torch.optim.Optimizer,
    stream: Iterator[Batch],
    max_steps: int,
    min_measure_steps: int,
    deadline: Deadline,
    curve_follows: bool,
) -> None:
    """Train with the measured batch gradients, reading each step, until enough steps after the
    warm-up were read or time is up; refuse a run whose loss diverged."""
    # Losses may be negative (a log-likelihood), so changes are measured against |loss|.
    scale = abs(run.loss_start)
    half_time = deadline.remaining() / 2
    # Leave time for the gradient-error curve after the warm-up run.
    run_deadline = Deadline(deadline.remaining() * (0.8 if curve_follows else 1.0))
    run.started = time.perf_counter()
    for step in range(max_steps):
        small_sq, big_sq, loss = run.step(stream)
        if not math.isfinite(loss) or loss - run.loss_start > (DIVERGED_FACTOR - 1) * scale:
            why = "became non-finite" if not math.isfinite(loss) else "rose over tenfold"
            raise _diverged(run.lr, run.loss_start, loss, step + 1, why)
        optim.step()
        run.readings.add(small_sq, big_sq, loss)
        done = step + 1
        if run.warmup_end is None and done >= 2 * WINDOW:
            _end_warmup_when_due(run, done, max_steps, half_time)
        if (
            run.warmup_end is not None
            and done - run.warmup_end >= min_measure_steps
            and (done >= 2 * run.warmup_end or run_deadline.remaining() < 0.3 * half_time)
        ):
            run.stopped_by = "enough steps"
            break
        if run_deadline.expired():
            run.stopped_by = "time budget"
            break
    losses = run.readings.losses
    loss_end = _mean(losses[-WINDOW:])
    if losses and loss_end > run.loss_start + ROSE_BY * scale:
        raise _diverged(run.lr, run.loss_start, loss_end, len(losses), "rose instead of falling")


def _end_warmup_when_due(run: WarmUp, done: int, max_steps: int, half_time: float) -> None:
    """End the warm-up once the loss has clearly fallen and its first fast fall is over, or half
    the steps or time have passed (then the estimate comes earlier in training than intended,
    and a note says so)."""
    scale = abs(run.loss_start)
    losses = run.readings.losses
    recent, before = _mean(losses[-WINDOW:]), _mean(losses[-2 * WINDOW : -WINDOW])
    fell = recent <= run.loss_start - LOSS_DROP * scale
    slowed = recent >= before - STILL_FALLING * abs(before)
    elapsed = time.perf_counter() - run.started
    if (fell and slowed) or done >= max_steps // 2 or elapsed >= half_time:
        run.warmup_end = done
        why = (
            "the loss fell by 25% and its fast fall is over"
            if fell and slowed
            else "half the warm-up allowance passed"
        )
        run.log(f"noise: warm-up done after {done} steps ({why}); measuring")
        if not fell:
            run.notes.append(
                f"The loss had not fallen by 25% after {done} warm-up steps; the "
                "estimate is taken earlier in training than intended (a lower bound)."
            )
        elif not slowed:
            run.notes.append(
                f"The loss was still falling fast after {done} warm-up steps; the estimate is "
                "taken earlier in training than intended (likely a lower bound)."
            )


def measure_gradient_error(
    run: WarmUp,
    data: BatchSource,
    sizes: Sequence[int],
    *,
    repeats: int,
    micro_batch_size: int,
    deadline: Deadline,
) -> tuple[tuple[GradientErrorPoint, ...], int | None]:
    """:func:`gradient_error_curve` with a reference gradient over as many samples as 30% of the
    time left allows (at the run's cost per sample); a note when it could not be measured."""
    steps = len(run.readings.losses)
    per_sample = max(time.perf_counter() - run.started, 1e-9) / (steps * run.batch_size)
    allowance = 0.3 * deadline.remaining()
    reference = REFERENCE_SAMPLES
    if math.isfinite(allowance):
        reference = min(reference, int(allowance / per_sample))
    n = run.num_samples
    if n is not None:
        reference = min(reference, n)
    curve: tuple[GradientErrorPoint, ...] = ()
    if reference >= MIN_REFERENCE:
        curve, reference = gradient_error_curve(
            run.model,
            data,
            run.loss_fn,
            sizes,
            micro_batch_size=micro_batch_size,
            repeats=repeats,
            reference_samples=reference,
            deadline=deadline,
        )
    if curve:
        return curve, reference
    why = (
        f"{n} samples are too few"
        if n is not None and n < MIN_REFERENCE
        else "there was not enough time"
    )
    run.notes.append(f"The gradient-error curve was not measured: {why}.")
    return (), None


def summarise_noise(
    run: WarmUp,
    curve: tuple[GradientErrorPoint, ...],
    reference: int | None,
    started: float,
) -> NoiseMeasurement:
    """The estimate over the steps after the warm-up, the reading at the initial weights, the
    trajectory per :data:`WINDOW` steps, and the curve's predictions from the estimate; the
    probe's time is counted from ``started`` (a ``perf_counter``)."""
    readings = run.readings
    steps = len(readings.losses)
    if run.warmup_end is None:
        run.warmup_end = steps // 2
        run.notes.append(
            f"Time allowed only {steps} steps: the first half counts as warm-up, the estimate "
            "uses the second half."
        )
    if steps - run.warmup_end < 2:
        raise OutOfTime(
            f"Only {steps} noise-scale steps fit in the time budget; give a larger "
            f"{opt('time_budget')}."
        )
    estimate = readings.estimate(run.warmup_end, steps, run)
    windows = []
    for lo in range(0, steps - WINDOW + 1, WINDOW):
        w = readings.estimate(lo, lo + WINDOW, run)
        loss = _mean(readings.losses[lo : lo + WINDOW])
        windows.append(NoiseWindow(lo + 1, lo + WINDOW, loss, w.b_simple, w.low, w.high))
    if math.isfinite(estimate.b_simple):
        curve = tuple(
            replace(
                p, predicted=expected_relative_error(estimate.b_simple, p.batch_size, reference)
            )
            for p in curve
        )
    return NoiseMeasurement(
        estimate=estimate,
        at_start=run.at_start.estimate(0, WINDOW, run),
        windows=tuple(windows),
        steps=steps,
        warmup_steps=run.warmup_end,
        loss_start=run.loss_start,
        loss_end=_mean(readings.losses[-WINDOW:]),
        lr=run.lr,
        optimizer=run.optimizer,
        stopped_by=run.stopped_by,
        seconds=time.perf_counter() - started,
        start_steps=WINDOW,
        gradient_error=curve,
        gradient_error_reference_samples=reference,
        notes=tuple(run.notes),
    )


def _mean_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    chunks: Iterable[Batch],
    total: int,
    deadline: Deadline,
) -> list[torch.Tensor]:
    """The mean gradient over ``total`` samples that arrive in ``chunks``, each weighted by its
    size, per parameter. Raises :class:`OutOfTime` when the ``deadline`` passes midway."""
    params = trainable_parameters(model)
    device = params[0].device
    for p in params:
        p.grad = None
    for xs, ys in chunks:
        if deadline.expired():
            raise OutOfTime("The deadline passed while computing a mean gradient.")
        loss = loss_fn(model(xs.to(device)), ys.to(device)) * (len(ys) / total)
        loss.backward()
    grads = gradients_of(params)
    for p in params:
        p.grad = None
    return grads


def gradient_error_curve(
    model: nn.Module,
    data: BatchSource,
    loss_fn: LossFn,
    batch_sizes: Sequence[int],
    *,
    micro_batch_size: int,
    repeats: int = 8,
    reference_samples: int = REFERENCE_SAMPLES,
    deadline: Deadline | None = None,
) -> tuple[tuple[GradientErrorPoint, ...], int]:
    """RMS relative error ``|g_B - G| / |G|`` of batch gradients at the current weights.

    ``G`` is the mean gradient over the whole training set, or over its first
    ``reference_samples`` when larger (then itself an estimate). Every batch, the reference one
    included, is read and backpropagated in micro-batches of at most ``micro_batch_size``, so no
    more than that is ever in memory at once. Returns the points (ascending batch size; sizes the
    ``deadline`` left no time for are left out: no points when even ``G`` could not be computed)
    and the number of samples behind ``G``. ``predicted`` is filled in by the caller, who knows
    ``B_simple``.
    """
    deadline = deadline or Deadline(None)
    n = data.num_samples
    reference = min(n, reference_samples) if n is not None else reference_samples
    smallest = smallest_trainable_size(model)
    points: list[GradientErrorPoint] = []
    with preserved(model):
        model.train()
        try:
            full = _mean_gradient(
                model,
                loss_fn,
                SampleReader(data, micro_batch_size).chunks(reference, micro_batch_size),
                reference,
                deadline,
            )
        except OutOfTime:
            return (), reference
        full_sq = float(squared_norm(full))
        reader = SampleReader(data, micro_batch_size, first_epoch=1)
        for size in sorted(batch_sizes):
            if size > reference or size < smallest or deadline.expired():
                continue
            errors = []
            for _ in range(repeats):
                try:
                    g = _mean_gradient(
                        model, loss_fn, reader.chunks(size, micro_batch_size), size, deadline
                    )
                except OutOfTime:
                    break
                errors.append(float(squared_norm(a.sub_(b) for a, b in zip(g, full, strict=True))))
            if len(errors) < 2:
                break
            rel = math.sqrt(_mean(errors) / full_sq) if full_sq > 0 else math.inf
            points.append(GradientErrorPoint(size, rel, None, len(errors)))
    return tuple(points), reference

"""The gradient noise scale of a real model, measured on real training steps.

Each measured step takes a batch of ``B = k b`` samples, computes the mean gradient of each of its
``k`` micro-batches of ``b`` samples (one backward each, as gradient accumulation does anyway), and
records the mean squared norm of those micro-batch gradients and the squared norm of their average:
the batch gradient. :mod:`batchfit.noise_estimator` turns many such pairs into ``B_simple`` with a
confidence interval, correcting for drawing batches without replacement from a finite data set.

The noise scale grows as the loss falls (McCandlish et al. 2018 report a tenfold rise over a run),
so a reading at initialisation is a lower bound. :func:`warmup_and_measure` therefore trains a
short while from the user's initial weights (using the measured batch gradient for each update, so
measuring costs no extra passes), and keeps the steps after the loss has clearly fallen; it also
records how the estimate moved. Everything is undone afterwards.

:func:`gradient_error_curve` measures the seed's O(sqrt(m)) claim directly: the error of a batch
gradient against the full gradient, for growing batch sizes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from batchfit import validation
from batchfit.data.source import BatchSource
from batchfit.errors import BatchfitError
from batchfit.losses import LossFn
from batchfit.noise_estimator import NoiseScale, estimate_noise_scale, expected_relative_error
from batchfit.probe.common import Deadline, OutOfTime, cycle_batches, preserved
from batchfit.task import as_source
from batchfit.train import make_optimizer

#: The loss has "clearly fallen" once its recent mean is this share below its starting mean.
LOSS_DROP = 0.25
#: Steps per window of the estimate's trajectory.
WINDOW = 8


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise BatchfitError("The model has no trainable parameters; nothing to measure.")
    return params


def _flat_grad(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )


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
    """
    if len(y) % micro_batch_size:
        raise BatchfitError(
            f"A measured batch of {len(y)} does not split into micro-batches of "
            f"{micro_batch_size}; use a multiple."
        )
    params = _trainable(model)
    device = params[0].device
    total = None
    small_sq = torch.zeros((), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    parts = len(y) // micro_batch_size
    for xs, ys in zip(x.split(micro_batch_size), y.split(micro_batch_size), strict=True):
        for p in params:
            p.grad = None
        loss = loss_fn(model(xs.to(device)), ys.to(device))
        loss.backward()
        g = _flat_grad(params)
        small_sq += g.double().square().sum()
        loss_sum += loss.detach().double()
        total = g if total is None else total.add_(g)
    batch_grad = total / parts
    big_sq = batch_grad.double().square().sum()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = batch_grad[offset : offset + n].view_as(p).to(p.dtype)
        offset += n
    values = torch.stack([small_sq / parts, big_sq, loss_sum / parts]).tolist()
    return values[0], values[1], values[2]


def noise_scale(
    model: nn.Module,
    data: object,
    loss_fn: LossFn,
    micro_batch_size: int,
    batches: int,
    *,
    accumulation: int = 8,
    confidence: float = 0.9,
    seed: int = 0,
) -> NoiseScale:
    """``B_simple`` at the model's current parameters, from ``batches`` batches of
    ``micro_batch_size x accumulation`` samples; the model is left exactly as it was.

    ``data`` is what :func:`batchfit.train` accepts. The model runs in training mode (the gradients
    training would see); buffers such as batch-norm statistics are restored afterwards.

    Examples:
        >>> import torch
        >>> from batchfit.examples.linreg import load, make_model
        >>> from batchfit.losses import mse
        >>> d = load()
        >>> est = noise_scale(make_model(), (d.x_train, d.y_train), mse,
        ...                   micro_batch_size=4, batches=100, accumulation=16)
        >>> 50 < est.b_simple < 80   # analytic: 65
        True
    """
    validation.check("micro_batch_size", micro_batch_size)
    validation.check("batch_size", batches, fix="Give the number of batches to average over.")
    if accumulation < 2:
        raise BatchfitError(
            f"The noise scale needs at least 2 micro-batches per batch; got accumulation "
            f"{accumulation}."
        )
    source = as_source(data, seed=seed)
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
            s, b, _ = measured_step(model, loss_fn, x, y, micro_batch_size)
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
    """The noise probe's result: the estimate after warm-up, where it started, how it moved."""

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
    gradient_error: tuple[GradientErrorPoint, ...] = ()
    gradient_error_reference_samples: int | None = None
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


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
    """Train from the model's current weights with batches of ``micro_batch_size x
    accumulation``, measuring the noise scale at every step, then undo the training.

    The warm-up ends when the mean loss of the last :data:`WINDOW` steps is 25% below that of the
    first (or at half the steps or half the time); the estimate is taken over the steps after it
    (at least ``min_measure_steps`` when time allows). With ``gradient_error_sizes`` the error of
    batch gradients is then measured at the warmed-up weights (:func:`gradient_error_curve`), in
    chunks of ``max_micro_batch_size`` (default: the measured batch) to stay within memory.
    """
    log = log or (lambda _: None)
    deadline = deadline or Deadline(None)
    big = micro_batch_size * accumulation
    n = data.num_samples
    started = time.perf_counter()
    small_sq: list[float] = []
    big_sq: list[float] = []
    losses: list[float] = []
    notes: list[str] = []
    warmup_end: int | None = None
    stopped_by = "steps"
    curve: tuple[GradientErrorPoint, ...] = ()
    reference = None
    with preserved(model):
        model.train()
        opt = make_optimizer(optimizer, model, lr)
        stream = cycle_batches(data, big)
        half_time = deadline.remaining() / 2
        # Leave time for the gradient-error curve after the warm-up run.
        run_deadline = Deadline(deadline.remaining() * (0.8 if gradient_error_sizes else 1.0))
        for step in range(max_steps):
            x, y = next(stream)
            s, b, loss = measured_step(model, loss_fn, x, y, micro_batch_size)
            if not math.isfinite(loss):
                raise BatchfitError(
                    f"The loss became {loss} at step {step + 1} of the noise-scale warm-up (lr "
                    f"{lr:g}); give a smaller --lr."
                )
            opt.step()
            small_sq.append(s)
            big_sq.append(b)
            losses.append(loss)
            done = step + 1
            if warmup_end is None and done >= 2 * WINDOW:
                fell = _mean(losses[-WINDOW:]) <= (1 - LOSS_DROP) * _mean(losses[:WINDOW])
                elapsed = time.perf_counter() - started
                if fell or done >= max_steps // 2 or elapsed >= half_time:
                    warmup_end = done
                    why = "the loss fell by 25%" if fell else "half the warm-up allowance passed"
                    log(f"noise: warm-up done after {done} steps ({why}); measuring")
                    if not fell:
                        notes.append(
                            f"The loss had not fallen by 25% after {done} warm-up steps; the "
                            "estimate is taken earlier in training than intended (a lower bound)."
                        )
            if (
                warmup_end is not None
                and done - warmup_end >= min_measure_steps
                and (done >= 2 * warmup_end or run_deadline.remaining() < 0.3 * half_time)
            ):
                stopped_by = "enough steps"
                break
            if run_deadline.expired():
                stopped_by = "time budget"
                break
        if gradient_error_sizes:
            curve, reference = gradient_error_curve(
                model,
                data,
                loss_fn,
                gradient_error_sizes,
                micro_batch_size=max_micro_batch_size or big,
                repeats=gradient_error_repeats,
                deadline=deadline,
            )
    steps = len(losses)
    if warmup_end is None:
        warmup_end = steps // 2
        notes.append(
            f"Time allowed only {steps} steps: the first half counts as warm-up, the estimate "
            "uses the second half."
        )
    if steps - warmup_end < 2:
        raise OutOfTime(
            f"Only {steps} noise-scale steps fit in the time budget; give a larger --time-budget."
        )
    measure = slice(warmup_end, steps)
    estimate = estimate_noise_scale(
        small_sq[measure], big_sq[measure], micro_batch_size, big, n,
        confidence=confidence, seed=seed,
    )  # fmt: skip
    first = min(WINDOW, steps)
    at_start = estimate_noise_scale(
        small_sq[:first], big_sq[:first], micro_batch_size, big, n,
        confidence=confidence, seed=seed,
    )  # fmt: skip
    windows = []
    for lo in range(0, steps - WINDOW + 1, WINDOW):
        w = estimate_noise_scale(
            small_sq[lo : lo + WINDOW], big_sq[lo : lo + WINDOW], micro_batch_size, big, n,
            confidence=confidence, seed=seed,
        )  # fmt: skip
        windows.append(
            NoiseWindow(
                lo + 1, lo + WINDOW, _mean(losses[lo : lo + WINDOW]), w.b_simple, w.low, w.high
            )
        )
    if curve:
        curve = tuple(
            GradientErrorPoint(
                p.batch_size,
                p.relative_error,
                expected_relative_error(estimate.b_simple, p.batch_size, reference)
                if math.isfinite(estimate.b_simple)
                else None,
                p.repeats,
            )
            for p in curve
        )
    return NoiseMeasurement(
        estimate=estimate,
        at_start=at_start,
        windows=tuple(windows),
        steps=steps,
        warmup_steps=warmup_end,
        loss_start=_mean(losses[:first]),
        loss_end=_mean(losses[-first:]),
        lr=lr,
        optimizer=optimizer,
        stopped_by=stopped_by,
        seconds=time.perf_counter() - started,
        gradient_error=curve,
        gradient_error_reference_samples=reference,
        notes=tuple(notes),
    )


def _mean_gradient(
    model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, micro_batch_size: int
) -> torch.Tensor:
    """The mean gradient over ``(x, y)``, in chunks of ``micro_batch_size`` weighted by size."""
    params = _trainable(model)
    device = params[0].device
    for p in params:
        p.grad = None
    for xs, ys in zip(x.split(micro_batch_size), y.split(micro_batch_size), strict=True):
        loss = loss_fn(model(xs.to(device)), ys.to(device)) * (len(ys) / len(y))
        loss.backward()
    grad = _flat_grad(params).double()
    for p in params:
        p.grad = None
    return grad


def gradient_error_curve(
    model: nn.Module,
    data: BatchSource,
    loss_fn: LossFn,
    batch_sizes: Sequence[int],
    *,
    micro_batch_size: int,
    repeats: int = 8,
    reference_samples: int = 16384,
    deadline: Deadline | None = None,
) -> tuple[tuple[GradientErrorPoint, ...], int]:
    """RMS relative error ``|g_B - G| / |G|`` of batch gradients at the current weights.

    ``G`` is the mean gradient over the whole training set, or over its first
    ``reference_samples`` when larger (then itself an estimate). Returns the points (ascending
    batch size; sizes that the deadline left no time for are left out) and the number of samples
    behind ``G``. ``predicted`` is filled in by the caller, who knows ``B_simple``.
    """
    deadline = deadline or Deadline(None)
    n = data.num_samples
    reference = min(n, reference_samples) if n is not None else reference_samples
    with preserved(model):
        model.train()
        x, y = next(iter(data.batches(0, reference)))
        full = _mean_gradient(model, loss_fn, x, y, micro_batch_size)
        full_sq = float(full.square().sum())
        points = []
        for size in sorted(batch_sizes):
            if size > reference or deadline.expired():
                break
            stream = cycle_batches(data, size, first_epoch=1)
            errors = []
            for _ in range(repeats):
                bx, by = next(stream)
                g = _mean_gradient(model, loss_fn, bx, by, micro_batch_size)
                errors.append(float((g - full).square().sum()))
            rel = math.sqrt(_mean(errors) / full_sq) if full_sq > 0 else math.inf
            points.append(GradientErrorPoint(size, rel, None, repeats))
    return tuple(points), reference

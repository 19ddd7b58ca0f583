"""The gradients of a real model, read without extra copies, and the error of batch gradients.

The noise probes (:mod:`batchfit.probe.noise`, :mod:`batchfit.probe.noise_ranks`) read squared
gradient norms at every step: gradients are kept per parameter (no flattened copy) and their
squared norms summed in float64 a slice at a time. :func:`gradient_error_curve` measures the
seed's O(sqrt(m)) claim directly: the error of a batch gradient against the full gradient, for
growing batch sizes, read and backpropagated in micro-batches no larger than the memory ceiling.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from batchfit.data.source import Batch, BatchSource
from batchfit.errors import BatchfitError
from batchfit.losses import LossFn
from batchfit.probe.harness import Deadline, OutOfTime, SampleReader, preserved
from batchfit.step import smallest_trainable_size

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


@dataclass(frozen=True)
class GradientErrorPoint:
    """RMS of ``|g_B - G| / |G|`` over ``repeats`` batches, and its prediction from ``B_simple``."""

    batch_size: int
    relative_error: float
    predicted: float | None
    repeats: int


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
            rel = math.sqrt(sum(errors) / len(errors) / full_sq) if full_sq > 0 else math.inf
            points.append(GradientErrorPoint(size, rel, None, len(errors)))
    return tuple(points), reference

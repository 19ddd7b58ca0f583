"""Sharpness: the largest eigenvalue of the Hessian of the training loss, by power iteration.

The seed claims that large batches end in *sharp* minima and small batches in *flat* ones
(Keskar et al. 2017, "On Large-Batch Training for Deep Learning: Generalization Gap and Sharp
Minima"). The usual number for "sharp" is the top eigenvalue of the Hessian of the loss at the
weights reached (Cohen et al. 2021 track the same quantity). The Hessian is never formed: power
iteration needs only Hessian-vector products, computed with ``torch.func`` as the vector-Jacobian
product of the gradient (reverse-over-reverse; the Hessian is symmetric, so ``v^T H = (H v)^T``).
The graph of the gradient is built once and reused for every product.

The loss is taken with the model in eval mode (no dropout, batch norm on its running statistics),
so the number is deterministic, and through ``torch.func.functional_call`` on detached copies of
the parameters, so the model's parameters, buffers and ``.grad`` stay exactly as they were.

References:
    Keskar et al. 2017, https://arxiv.org/abs/1609.04836;
    Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of
    Stability", https://arxiv.org/abs/2103.00065.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vjp

from batchfit.core import options
from batchfit.errors import BatchfitError
from batchfit.losses import LossFn


@dataclass(frozen=True)
class SharpnessResult:
    """The top Hessian eigenvalue found, the Hessian-vector products spent, and whether the
    estimate settled within the tolerance before the iteration limit."""

    eigenvalue: float
    iterations: int
    converged: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    iterations: int = 50,
    tolerance: float = 1e-3,
    seed: int = 0,
    micro_batch_size: int | None = None,
) -> SharpnessResult:
    """The largest eigenvalue of the Hessian of ``loss_fn(model(x), y)`` w.r.t. the parameters.

    Power iteration from a seeded random direction: ``v <- Hv / |Hv|``, with the Rayleigh quotient
    ``v.Hv`` as the estimate; it stops when the estimate changes by at most ``tolerance`` (relative)
    between two products, or after ``iterations`` products. Power iteration finds the eigenvalue of
    largest *magnitude*; if that one is negative (a saddle, not a minimum), a second pass on
    ``H - lambda I`` finds the largest one, so the result is always the top of the spectrum.
    Parameters with ``requires_grad=False`` are held fixed. Nothing in ``model`` changes.

    ``micro_batch_size`` bounds memory: each product is then summed over chunks of that many
    samples, weighted by their share of the batch (exact for a mean loss, as every batchfit loss
    is), at the price of rebuilding each chunk's gradient graph for every product. Without it the
    whole batch's graph is built once and reused.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
        >>> # mean squared error: H = 2 x^T x / n = diag(9, 1)
        >>> mse = lambda out, y: ((out.squeeze(1) - y) ** 2).mean()
        >>> result = sharpness(model, mse, x, torch.zeros(2), tolerance=1e-9)
        >>> round(result.eigenvalue, 4), result.converged
        (9.0, True)
    """
    options.check("sharpness_iterations", iterations)
    options.check("sharpness_tolerance", tolerance)
    options.check_optional("micro_batch_size", micro_batch_size)
    weights = _Weights.of(model)
    was_training = model.training
    model.eval()
    try:
        hvp = _hessian_vector_product(model, loss_fn, weights, x, y, micro_batch_size)
        generator = torch.Generator().manual_seed(seed)
        flat = weights.flat
        start = torch.randn(flat.shape, generator=generator, dtype=flat.dtype).to(flat.device)
        top, used, converged = _power_iteration(hvp, start, 0.0, iterations, tolerance)
        if top < 0:
            shifted, more, converged = _power_iteration(
                hvp, start, top, max(iterations - used, 1), tolerance
            )
            top, used = shifted + top, used + more
    finally:
        model.train(was_training)
    return SharpnessResult(eigenvalue=top, iterations=used, converged=converged)


@dataclass(frozen=True)
class _Weights:
    """The trainable parameters as one detached flat vector (the Hessian's coordinates), how to
    cut it back into named tensors, and the tensors held fixed (frozen parameters, buffers)."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    sizes: tuple[int, ...]
    fixed: dict[str, torch.Tensor]
    flat: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module) -> _Weights:
        names, shapes, sizes, tensors, fixed = [], [], [], [], {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                names.append(name)
                shapes.append(param.shape)
                sizes.append(param.numel())
                tensors.append(param.detach().reshape(-1))
            else:
                fixed[name] = param.detach()
        if not tensors:
            raise BatchfitError(
                "The model has no trainable parameters, so its loss has no Hessian to measure; "
                "leave requires_grad=True on the weights."
            )
        fixed.update({name: buffer.detach() for name, buffer in model.named_buffers()})
        return cls(tuple(names), tuple(shapes), tuple(sizes), fixed, torch.cat(tensors))

    def as_params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = flat.split(list(self.sizes))
        return {
            name: part.view(shape)
            for name, part, shape in zip(self.names, parts, self.shapes, strict=True)
        }


def _hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    weights: _Weights,
    x: torch.Tensor,
    y: torch.Tensor,
    micro_batch_size: int | None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> H v`` at ``weights.flat``: over the whole batch with the gradient's graph built
    once, or summed over chunks of ``micro_batch_size`` weighted by their share of the batch."""

    def loss_of(flat: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        params = weights.as_params(flat)
        return loss_fn(functional_call(model, (params, weights.fixed), (xs,)), ys)

    if micro_batch_size is None or micro_batch_size >= len(y):
        # Built once: every call of hvp reuses the graph of the gradient at ``flat``.
        pullback = vjp(grad(functools.partial(loss_of, xs=x, ys=y)), weights.flat)[1]

        def hvp(v: torch.Tensor) -> torch.Tensor:
            return pullback(v)[0]

        return hvp

    chunks = list(zip(x.split(micro_batch_size), y.split(micro_batch_size), strict=True))

    def chunked_hvp(v: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(weights.flat)
        for xs, ys in chunks:
            pullback = vjp(grad(functools.partial(loss_of, xs=xs, ys=ys)), weights.flat)[1]
            total += pullback(v)[0] * (len(ys) / len(y))
        return total

    return chunked_hvp


def _power_iteration(hvp, start: torch.Tensor, shift: float, iterations: int, tolerance: float):
    """Top-magnitude eigenvalue of ``H - shift I``: (estimate, products used, converged)."""
    v = start / start.norm()
    estimate: float | None = None
    for used in range(1, iterations + 1):
        hv = hvp(v) - shift * v
        new = float(torch.dot(v, hv))
        norm = hv.norm()
        # relative to the eigenvalue of H itself (new + shift), not of the shifted matrix
        if estimate is not None and abs(new - estimate) <= tolerance * abs(new + shift):
            return new, used, True
        estimate = new
        if norm == 0:  # v is in the null space: H is zero along every direction tried
            return 0.0, used, True
        v = hv / norm
    assert estimate is not None  # iterations >= 1 set it
    return estimate, iterations, False

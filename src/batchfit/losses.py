"""Loss functions by name, the default loss for a target, and the metrics reported with them.

Every loss returns the *mean* over the samples it is given: the training loop weights micro-batch
losses by their sample counts, which makes accumulated gradients equal the full-batch mean gradient.
A user loss (``package.module:fn``) must follow the same convention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchfit.core.options import opt, opt_value
from batchfit.data.source import check_class_labels
from batchfit.errors import BatchfitError
from batchfit.imports import import_object

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSS_NAMES = ("cross_entropy", "mse", "bce")
DEFAULT_FOR_TARGET = {"class": "cross_entropy", "real": "mse", "binary": "bce"}


def _match_shape(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # A (B, 1) output against a (B,) target would broadcast to (B, B) in mse: a silent, classic bug.
    if output.shape != target.shape and output.numel() == target.numel():
        return output.reshape(target.shape)
    if output.shape != target.shape:
        hint = (
            f"; if the target holds class labels, use {opt_value('loss', 'cross_entropy')}"
            if output.ndim == 2 and target.ndim == 1 and output.shape[0] == target.shape[0]
            else ""
        )
        raise BatchfitError(
            f"The model's output has shape {tuple(output.shape)} but the target has shape "
            f"{tuple(target.shape)}; make the model output one value per target value{hint}."
        )
    return output


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # The target in the output's dtype: an integer target fails in backward on CUDA (not on CPU).
    return F.mse_loss(_match_shape(output, target), target.to(output.dtype))


def bce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # The target in the output's dtype: a float64 model keeps a float64 loss.
    return F.binary_cross_entropy_with_logits(_match_shape(output, target), target.to(output.dtype))


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    try:
        return F.cross_entropy(output, target)
    except IndexError:
        # Classes sit on dimension 1 ((N, C) or (N, C, d...)), as the up-front check counts them.
        check_class_labels(target.cpu(), output.shape[1] if output.ndim > 1 else output.shape[0])
        raise


@dataclass(frozen=True)
class Loss:
    """A loss function with its name and the kind of task, which decides the reported metrics."""

    name: str
    fn: LossFn
    kind: str  # "class", "binary" or "real"

    @property
    def has_accuracy(self) -> bool:
        return self.kind in ("class", "binary")


_BUILTIN = {"cross_entropy": (cross_entropy, "class"), "mse": (mse, "real"), "bce": (bce, "binary")}


def resolve_loss(spec: str | LossFn | None, target_kind: str) -> Loss:
    """The loss named by ``spec`` (a built-in name, ``package.module:fn`` or a callable).

    ``None`` picks the default for the target: integer labels -> cross_entropy, booleans -> bce,
    floats -> mse.

    Examples:
        >>> resolve_loss(None, "class").name
        'cross_entropy'
        >>> resolve_loss("mse", "real").kind
        'real'
    """
    if spec is None:
        spec = DEFAULT_FOR_TARGET[target_kind]
    if callable(spec):
        return Loss(getattr(spec, "__name__", "custom"), spec, "real")
    if spec in _BUILTIN:
        fn, kind = _BUILTIN[spec]
        if kind == "class" and target_kind != "class":
            raise BatchfitError(
                f"The cross_entropy loss needs integer class labels, but the target is "
                f"{target_kind}; use {opt_value('loss', 'mse')} (or bce for 0/1 targets), or "
                "integer labels."
            )
        return Loss(spec, fn, kind)
    if ":" in spec:
        fn = import_object(spec, what="loss function")
        if not callable(fn):
            raise BatchfitError(
                f"The loss '{spec}' is not callable; point {opt('loss')} at a function."
            )
        return Loss(spec, fn, "real")
    raise BatchfitError(
        f"Unknown loss '{spec}'; use one of {', '.join(LOSS_NAMES)} or package.module:function."
    )


def correct_count(output: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """How many predictions in a batch are right (classification only)."""
    if kind == "class":
        return (output.argmax(dim=-1) == target).sum()
    predicted = (_match_shape(output, target) > 0).to(target.dtype)
    return (predicted == target).sum()

"""What every probe needs: leave the user's model as it was, draw batches, respect a deadline."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from batchfit.data.source import Batch, BatchSource
from batchfit.errors import BatchfitError


class OutOfTime(BatchfitError):
    """A probe could not take a usable measurement in the time it was given."""


@contextmanager
def preserved(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
    """Run a probe, then put back the model's parameters, buffers, gradients and train/eval mode,
    the optimizer's state and torch's RNG, so that probing changes nothing the user can see.

    The copy is kept on the CPU so that a model filling a GPU can still be probed.

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> before = model.weight.detach().clone()
        >>> with preserved(model):
        ...     _ = model.weight.data.add_(1.0)
        >>> torch.equal(model.weight, before)
        True
    """
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    opt_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    training = model.training
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            model.load_state_dict(state)
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g
        if optimizer is not None:
            optimizer.load_state_dict(opt_state)
        model.train(training)
        torch.set_rng_state(rng)


def cycle_batches(source: BatchSource, batch_size: int, first_epoch: int = 0) -> Iterator[Batch]:
    """Full batches of ``batch_size`` forever, epoch after epoch (the incomplete last batch of
    each epoch is dropped so that every batch has the same size; a batch of the whole data set
    is allowed)."""
    epoch = first_epoch
    while True:
        got = False
        for batch in source.batches(epoch, batch_size, drop_last=True):
            got = True
            yield batch
        if not got:
            return
        epoch += 1


class Deadline:
    """A point in time (``seconds`` from now; ``None``: never) that probes check between trials.

    >>> Deadline(None).remaining()
    inf
    """

    def __init__(self, seconds: float | None) -> None:
        self.at = math.inf if seconds is None else time.perf_counter() + max(seconds, 0.0)

    def remaining(self) -> float:
        return self.at - time.perf_counter()

    def expired(self) -> bool:
        return self.remaining() <= 0


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a timing or a memory reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))

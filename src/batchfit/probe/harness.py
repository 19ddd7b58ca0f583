"""What every probe needs: leave the user's model as it was, draw batches, respect a deadline,
and never train on fewer samples than the model can take."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from batchfit.core import budget_clock
from batchfit.core.accounting import balanced_split
from batchfit.data.source import Batch, BatchSource
from batchfit.errors import BatchfitError


class OutOfTime(BatchfitError):
    """A probe could not take a usable measurement in the time it was given."""


class Diverged(BatchfitError):
    """A probe's training run diverged at the learning rate it was given, so its reading is not
    to be used."""


class SampleReader:
    """Samples of a source in order, epoch after epoch from ``first_epoch``, handed out in chunks
    of any size while holding at most one read piece (``piece`` samples) besides the chunk: a
    large batch is then never one tensor in memory.

    >>> from batchfit import TensorSource
    >>> reader = SampleReader(TensorSource(torch.arange(10.0), torch.arange(10)), piece=4)
    >>> [len(reader.take(3)[1]) for _ in range(4)]
    [3, 3, 3, 3]
    """

    def __init__(self, source: BatchSource, piece: int, first_epoch: int = 0) -> None:
        self._pieces = cycle_batches(source, piece, first_epoch, drop_last=False)
        self._left: Batch | None = None

    def take(self, count: int) -> Batch:
        """The next ``count`` samples as one ``(x, y)``."""
        xs, ys, have = [], [], 0
        while have < count:
            if self._left is None:
                self._left = next(self._pieces)
            x, y = self._left
            need = count - have
            xs.append(x[:need])
            ys.append(y[:need])
            have += min(need, len(y))
            self._left = (x[need:], y[need:]) if len(y) > need else None
        if len(xs) == 1:
            return xs[0], ys[0]
        return torch.cat(xs), torch.cat(ys)

    def chunks(self, total: int, max_chunk: int) -> Iterator[Batch]:
        """The next ``total`` samples, in :func:`balanced_split` chunks read one at a time."""
        for size in balanced_split(total, max_chunk):
            yield self.take(size)


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
        if optimizer is not None and opt_state is not None:
            optimizer.load_state_dict(opt_state)
        model.train(training)
        torch.set_rng_state(rng)


def cycle_batches(
    source: BatchSource, batch_size: int, first_epoch: int = 0, *, drop_last: bool = True
) -> Iterator[Batch]:
    """Batches of ``batch_size`` forever, epoch after epoch. With ``drop_last`` (the default) the
    incomplete last batch of each epoch is dropped so that every batch has the same size (a batch
    of the whole data set is allowed)."""
    epoch = first_epoch
    while True:
        got = False
        for batch in source.batches(epoch, batch_size, drop_last=drop_last):
            got = True
            yield batch
        if not got:
            return
        epoch += 1


class Deadline:
    """A point in time (``seconds`` from now; ``None``: never) that probes check between trials,
    on the budget's clock (:mod:`~batchfit.core.budget_clock`).

    >>> Deadline(None).remaining()
    inf
    """

    def __init__(self, seconds: float | None) -> None:
        self.at = math.inf if seconds is None else budget_clock.now() + max(seconds, 0.0)

    def remaining(self) -> float:
        return self.at - budget_clock.now()

    def expired(self) -> bool:
        return self.remaining() <= 0

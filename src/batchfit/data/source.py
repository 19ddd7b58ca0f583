"""The contract between data and the training loop: a :class:`BatchSource`.

A source yields the batches of one epoch as ``(x, y)`` tensor pairs. The order is a pure function
of ``(seed, epoch)``, so a run can resume at any position by asking for the epoch again with
``start`` samples already consumed: nothing but two integers needs to be saved. With
``world_size > 1`` each rank receives its own disjoint share of every global batch: a slice of
the one-process batch for in-memory data, rows from its own run of the epoch's order for a stream
(:func:`rank_rows`, :attr:`BatchSource.reads_rank_share`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from batchfit.core.accounting import rank_share, split_evenly
from batchfit.errors import BatchfitError

Batch = tuple[torch.Tensor, torch.Tensor]


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for one epoch's shuffle (SplitMix64 of seed and epoch).

    >>> epoch_seed(0, 0) != epoch_seed(0, 1) != epoch_seed(1, 0)
    True
    """
    z = (seed * 0x9E3779B97F4A7C15 + (epoch + 1) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & (2**63 - 1)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The sample indices of one epoch in visiting order: a permutation seeded by (seed, epoch).

    >>> epoch_order(5, 0, 0, shuffle=False).tolist()
    [0, 1, 2, 3, 4]
    >>> sorted(epoch_order(5, 0, 1).tolist())
    [0, 1, 2, 3, 4]
    """
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


def index_batches(
    order: torch.Tensor,
    batch_size: int,
    *,
    start: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """The indices of each batch of ``order`` after its first ``start``, this rank's share only.

    >>> [b.tolist() for b in index_batches(torch.arange(7), 3, start=2)]
    [[2, 3, 4], [5, 6]]
    >>> [b.tolist() for b in index_batches(torch.arange(7), 3, rank=1, world_size=2)]
    [[2], [5], []]
    """
    end = len(order) - len(order) % batch_size if drop_last else len(order)
    for begin in range(start, end, batch_size):
        index = order[begin : min(begin + batch_size, end)]
        yield index[rank_share(len(index), rank, world_size)] if world_size > 1 else index


@dataclass(frozen=True)
class RankRows:
    """The rows one rank reads from an epoch's order, and its share of each global step."""

    first: int
    stop: int
    shares: list[int]


def rank_rows(start: int, end: int, batch_size: int, rank: int, world_size: int) -> RankRows:
    """Which rows of an epoch's order rank ``rank`` reads from sample ``start`` to ``end``, and
    how many of them go into each global step: the same arithmetic on every rank, from positions
    only (no data), so every rank takes the same number of steps.

    Global step ``k`` covers ``batch_size`` samples (the last one the remainder), split over the
    ranks as :func:`~batchfit.core.accounting.split_evenly` does. Rank ``r`` reads one contiguous
    run of the epoch's order: the rows ranks ``0..r-1`` take over the whole epoch come before it.
    So the union over ranks is every row once, each rank reads about ``1/W`` of them, and a resume
    at ``start`` (a whole number of steps into the epoch) continues each rank where it stood.

    Examples:
        >>> rank_rows(0, 10, 4, 0, 1)
        RankRows(first=0, stop=10, shares=[4, 4, 2])
        >>> rank_rows(0, 10, 4, 0, 2), rank_rows(0, 10, 4, 1, 2)
        (RankRows(first=0, stop=5, shares=[2, 2, 1]), RankRows(first=5, stop=10, shares=[2, 2, 1]))
        >>> rank_rows(4, 9, 4, 1, 2)  # resumed after one step: rank 1 read 2 of its rows then
        RankRows(first=7, stop=9, shares=[2, 0])
    """
    if start >= end:
        return RankRows(end, end, [])
    if world_size == 1:  # one process: batches from wherever it stands
        full, last = divmod(end - start, batch_size)
        return RankRows(start, end, [batch_size] * full + ([last] if last else []))
    done, offset = divmod(start, batch_size)
    if offset:
        raise BatchfitError(
            f"A resume position of {start} samples is not a whole number of batches of "
            f"{batch_size} when {world_size} processes share the data; resume from a checkpoint "
            "saved between steps with the same batch size."
        )
    full, last = divmod(end, batch_size)
    per_step, in_last = split_evenly(batch_size, world_size), split_evenly(last, world_size)
    takes = [full * per_step[r] + in_last[r] for r in range(world_size)]
    first = sum(takes[:rank]) + done * per_step[rank]
    shares = [per_step[rank]] * (full - done) + ([in_last[rank]] if last else [])
    return RankRows(first, sum(takes[: rank + 1]), shares)


def check_class_labels(y: torch.Tensor | np.ndarray, classes: int, where: str = "") -> None:
    """Raise unless every label in ``y`` is in ``0..classes-1`` (``where`` names the data).

    Checked on the CPU: on a GPU a label out of range is a device-side assert that kills the
    process instead of an error that can be caught, reported and checkpointed.

    Examples:
        >>> check_class_labels(np.array([0, 2, 1]), 3)
        >>> check_class_labels(torch.tensor([0, 3]), 3)
        Traceback (most recent call last):
        ...
        batchfit.errors.BatchfitError: Target label 3 is outside the model's 3 outputs (labels ...
    """
    if len(y) == 0:
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        at = f", in {where}" if where else ""
        raise BatchfitError(
            f"Target label {bad} is outside the model's {classes} outputs (labels must be "
            f"0..{classes - 1}){at}; fix the labels or the model's output size."
        )


class BatchSource(ABC):
    """Batches for the training loop, reproducible per ``(seed, epoch)`` and resumable."""

    #: Labels must be below this (set by :meth:`expect_classes`); ``None``: not checked.
    classes: int | None = None
    #: The feature columns by name, each with its values per row (1 for a number, ``None`` for
    #: lists of unknown length), for data read from files with named columns; ``None`` for data
    #: whose columns have no names (arrays, a plain 2-D ``.npy``), which are matched by position.
    columns: dict[str, int | None] | None = None
    #: Whether ``batches(rank=r, world_size=W)`` reads only rank ``r``'s rows (a stream, so the
    #: data is read once across ranks, grouped otherwise than on one process) rather than taking
    #: a share of each one-process batch (in-memory data: exactly the one-process order).
    reads_rank_share: bool = False

    @property
    @abstractmethod
    def num_samples(self) -> int | None:
        """Samples in one epoch, or ``None`` for a stream of unknown length."""

    @abstractmethod
    def batches(
        self,
        epoch: int,
        batch_size: int,
        *,
        start: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        """Yield epoch ``epoch`` in batches of ``batch_size``, skipping its first ``start`` samples.

        ``batch_size`` is the global batch; with ``world_size > 1`` this rank gets its share
        (:func:`batchfit.core.accounting.split_evenly`) of every batch.
        """

    def describe(self) -> str:
        """A short human description, e.g. ``'4000 samples in memory'``."""
        n = self.num_samples
        return f"{n} samples" if n is not None else "a stream of unknown length"

    def fingerprint(self) -> dict[str, Any]:
        """Plain data naming what decides the order of the batches, besides seed and batch size.

        A checkpoint records it and a resume with a different fingerprint is refused, so a run
        never continues with another order (rows seen twice or never). Sources override it.
        """
        return {"source": type(self).__name__}

    def expect_classes(self, classes: int) -> None:
        """Check the labels of every batch against ``classes`` outputs, on the CPU, before the
        batch reaches a device (see :func:`check_class_labels`). Sources check where the batch
        is built; a source whose labels are all in memory checks them all at once."""
        self.classes = classes

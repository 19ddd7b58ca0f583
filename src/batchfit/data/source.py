"""The contract between data and the training loop: a :class:`BatchSource`.

A source yields the batches of one epoch as ``(x, y)`` tensor pairs. The order is a pure function
of ``(seed, epoch)``, so a run can resume at any position by asking for the epoch again with
``start`` samples already consumed: nothing but two integers needs to be saved. With
``world_size > 1`` each rank receives its own disjoint share of every global batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch

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


class BatchSource(ABC):
    """Batches for the training loop, reproducible per ``(seed, epoch)`` and resumable."""

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
        (:func:`batchfit.schedule.split_evenly`) of every batch.
        """

    def describe(self) -> str:
        """A short human description, e.g. ``'4000 samples in memory'``."""
        n = self.num_samples
        return f"{n} samples" if n is not None else "a stream of unknown length"

    def close(self) -> None:  # noqa: B027 - optional hook, most sources hold nothing
        """Release files or workers; the default holds nothing."""

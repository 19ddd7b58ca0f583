"""Data that fits in memory: tensors indexed by a seeded permutation, no copies, no workers.

This is the fast path. A hand-written PyTorch loop does the same thing (``x[perm[i:i+B]]``),
which is why the loop overhead benchmark compares against exactly that.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from batchfit.data.permute import Holdout, validation_count
from batchfit.data.source import (
    Batch,
    BatchSource,
    check_class_labels,
    epoch_order,
    index_batches,
)
from batchfit.errors import BatchfitError


def as_tensor(array: object, name: str) -> torch.Tensor:
    """Turn a NumPy array or tensor into a tensor without copying when possible."""
    if isinstance(array, torch.Tensor):
        return array
    if isinstance(array, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(array))
    raise BatchfitError(
        f"The {name} must be a torch.Tensor or numpy.ndarray; got {type(array).__name__}."
    )


class TensorSource(BatchSource):
    """Batches drawn from in-memory tensors ``x`` and ``y`` (same first dimension).

    Each epoch is a permutation drawn from a generator seeded by ``(seed, epoch)``; with
    ``shuffle=False`` the order is the stored one. ``files`` names the files the tensors were
    read from (:func:`batchfit.data.readers.files_fingerprint`), for the checkpoint.

    Examples:
        >>> src = TensorSource(torch.arange(10.0).view(10, 1), torch.arange(10), shuffle=False)
        >>> [y.tolist() for _, y in src.batches(0, 4)]
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        >>> [y.tolist() for _, y in src.batches(0, 4, start=8)]
        [[8, 9]]
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        seed: int = 0,
        shuffle: bool = True,
        files: str | None = None,
    ) -> None:
        x, y = as_tensor(x, "features"), as_tensor(y, "target")
        if len(x) != len(y):
            raise BatchfitError(
                f"Features and target have different lengths ({len(x)} and {len(y)} samples); "
                "give one target per sample."
            )
        if len(x) == 0:
            raise BatchfitError("The data set is empty (0 samples); give at least one sample.")
        self.x, self.y = x, y
        self.seed, self.shuffle = seed, shuffle
        self.files = files
        self.val_split: tuple[float, int] | None = None  # (fraction, seed) when split() made it

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def order(self, epoch: int) -> torch.Tensor:
        """The sample indices of epoch ``epoch``, in the order they are visited."""
        return epoch_order(self.num_samples, self.seed, epoch, self.shuffle)

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
        x, y = self.x, self.y
        walk = index_batches(
            self.order(epoch),
            batch_size,
            start=start,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
        )
        for index in walk:
            yield x[index], y[index]

    def split(self, fraction: float, seed: int) -> tuple[TensorSource, TensorSource]:
        """Split off a seeded ``fraction`` of the samples as an unshuffled validation source."""
        n_val = validation_count(self.num_samples, fraction)
        # The same rows as StreamSource.split holds out, so streaming never changes the split.
        held_out = Holdout(self.num_samples, n_val, seed).all_rows()
        val_idx = torch.from_numpy(np.flatnonzero(held_out))
        train_idx = torch.from_numpy(np.flatnonzero(~held_out))
        train = TensorSource(
            self.x[train_idx],
            self.y[train_idx],
            seed=self.seed,
            shuffle=self.shuffle,
            files=self.files,
        )
        val = TensorSource(self.x[val_idx], self.y[val_idx], shuffle=False, files=self.files)
        train.val_split = val.val_split = (float(fraction), int(seed))
        train.columns = val.columns = self.columns
        return train, val

    def fingerprint(self) -> dict[str, Any]:
        fraction, seed = self.val_split or (None, None)
        return {
            "source": "memory",
            "shuffle": self.shuffle,
            "shuffle_buffer": None,
            "files": self.files,
            "val_fraction": fraction,
            "val_seed": seed,
        }

    def expect_classes(self, classes: int) -> None:
        super().expect_classes(classes)
        if not self.y.is_floating_point():
            check_class_labels(self.y, classes)  # every label, once: no check per batch

    def describe(self) -> str:
        shape = tuple(self.x.shape[1:])
        return f"{self.num_samples} samples in memory, features {shape}"

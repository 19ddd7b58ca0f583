"""Adapters for the user's own ``torch.utils.data`` datasets.

A map-style ``Dataset`` is read through a ``DataLoader`` whose batch sampler walks the same seeded
permutation as :class:`~batchfit.data.tensors.TensorSource`, so resume and sharding behave the same.
An ``IterableDataset`` is a stream: it is batched as it comes, its length may be unknown, and a
resume skips the samples already consumed by reading past them (a stream cannot seek).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate

from batchfit.core.accounting import rank_share
from batchfit.data.source import (
    Batch,
    BatchSource,
    check_class_labels,
    epoch_order,
    epoch_seed,
    index_batches,
)
from batchfit.errors import BatchfitError


def _as_pair(item: object) -> Batch:
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise BatchfitError(
        "Each sample of the dataset must be a pair (features, target); got "
        f"{type(item).__name__}. Return (x, y) from __getitem__/__iter__."
    )


def _collated(collate_fn: Callable[[list], Any] | None) -> Callable[[list], Batch]:
    """The collate function of a source: the user's (from their ``DataLoader``), whose result must
    be a pair (x, y), or the default one over (x, y) samples."""
    if collate_fn is None:
        return lambda items: default_collate([_as_pair(i) for i in items])

    def collate(items: list) -> Batch:
        batch = collate_fn(items)
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise BatchfitError(
            f"The DataLoader's collate_fn returned a {type(batch).__name__}; batchfit needs a "
            "pair (x, y) from it: return (features, target)."
        )

    return collate


class DatasetSource(BatchSource):
    """Batches from a map-style ``torch.utils.data.Dataset`` through a ``DataLoader``; a
    ``collate_fn`` (from the user's own ``DataLoader``) makes each batch, else the default one."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        collate_fn: Callable[[list], Any] | None = None,
    ) -> None:
        try:
            n = len(dataset)  # type: ignore[arg-type]  # Dataset has no __len__ in the stubs
        except TypeError:
            raise BatchfitError(
                "The dataset has no __len__; a map-style Dataset needs one "
                "(or make it an IterableDataset)."
            ) from None
        if n == 0:
            raise BatchfitError("The dataset is empty (len 0); give at least one sample.")
        self.dataset, self.seed, self.shuffle = dataset, seed, shuffle
        self.num_workers = num_workers
        self.collate_fn = collate_fn

    @property
    def num_samples(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # Dataset has no __len__ in the stubs

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
        order = epoch_order(self.num_samples, self.seed, epoch, self.shuffle)
        walk = index_batches(
            order, batch_size, start=start, drop_last=drop_last, rank=rank, world_size=world_size
        )
        loader = DataLoader(
            self.dataset,
            batch_sampler=[index.tolist() for index in walk],
            # Without a generator of its own, every DataLoader iterator draws its base seed from
            # torch's global RNG: a resumed run would shift every later dropout mask.
            generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)),
            num_workers=self.num_workers,
            collate_fn=_collated(self.collate_fn),
        )
        for x, y in loader:
            if self.classes is not None:
                check_class_labels(y, self.classes, f"a batch from {type(self.dataset).__name__}")
            yield x, y

    def fingerprint(self) -> dict[str, Any]:
        return {"source": "dataset", "shuffle": self.shuffle}

    def describe(self) -> str:
        return f"{self.num_samples} samples from {type(self.dataset).__name__}"


class IterableSource(BatchSource):
    """Batches from a ``torch.utils.data.IterableDataset``, in the order it yields them.

    Each epoch iterates the dataset again. With ``world_size > 1`` rank ``r`` keeps its share of
    every global batch, so ranks never see the same sample. ``limit``: an epoch ends after this
    many samples even if the dataset goes on (validation data, which is read to its end).
    """

    def __init__(
        self,
        dataset: IterableDataset,
        *,
        limit: int | None = None,
        collate_fn: Callable[[list], Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.limit = limit
        self.collate_fn = collate_fn

    @property
    def num_samples(self) -> int | None:
        try:
            return len(self.dataset)  # type: ignore[arg-type]  # Dataset has no __len__ in the stubs
        except TypeError:
            return None

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
        samples = itertools.islice(iter(self.dataset), start, self.limit)
        while True:
            chunk = list(itertools.islice(samples, batch_size))
            if not chunk or (drop_last and len(chunk) < batch_size):
                return
            x, y = _collated(self.collate_fn)(chunk[rank_share(len(chunk), rank, world_size)])
            if self.classes is not None:
                check_class_labels(y, self.classes, f"a batch from {type(self.dataset).__name__}")
            yield x, y

    def fingerprint(self) -> dict[str, Any]:
        return {"source": "iterable"}

    def describe(self) -> str:
        n = self.num_samples
        name = type(self.dataset).__name__
        return f"a stream from {name}" + (f" ({n} samples)" if n is not None else "")

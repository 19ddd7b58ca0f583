"""In-memory and torch-dataset batch sources: seeded order, exact resume, disjoint shards."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

from batchfit import BatchfitError
from batchfit.data import DatasetSource, IterableSource, TensorSource


def ids(batches):
    return [int(i) for _, y in batches for i in y]


def make_source(n=103, seed=7):
    return TensorSource(torch.arange(n, dtype=torch.float32).view(n, 1), torch.arange(n), seed=seed)


def test_each_epoch_visits_every_sample_once_in_a_seeded_order():
    src = make_source()
    e0, e1 = ids(src.batches(0, 10)), ids(src.batches(1, 10))
    assert sorted(e0) == sorted(e1) == list(range(103))
    assert e0 != e1
    assert e0 == ids(make_source().batches(0, 10))
    assert e0 != ids(make_source(seed=8).batches(0, 10))


def test_start_skips_exactly_the_consumed_samples():
    src = make_source()
    full = ids(src.batches(2, 10))
    assert ids(src.batches(2, 10, start=30)) == full[30:]
    assert ids(src.batches(2, 10, start=103)) == []


def test_drop_last_drops_the_remainder():
    src = make_source()
    sizes = [len(y) for _, y in src.batches(0, 10, drop_last=True)]
    assert sizes == [10] * 10


def test_ranks_get_disjoint_shares_that_cover_each_batch():
    src = make_source()
    per_rank = [list(src.batches(0, 10, rank=r, world_size=3)) for r in range(3)]
    assert len({len(batches) for batches in per_rank}) == 1  # equal step counts
    everything = sum((ids(b) for b in per_rank), [])
    assert sorted(everything) == list(range(103))


def test_validation_split_is_seeded_and_disjoint():
    train, val = make_source().split(0.2, seed=3)
    train2, val2 = make_source().split(0.2, seed=3)
    assert torch.equal(val.y, val2.y)
    assert val.num_samples == 21 and train.num_samples == 82
    assert set(train.y.tolist()).isdisjoint(val.y.tolist())


def test_mismatched_or_empty_data_is_rejected():
    with pytest.raises(BatchfitError, match=r"different lengths \(3 and 2 samples\)"):
        TensorSource(torch.zeros(3, 1), torch.zeros(2))
    with pytest.raises(BatchfitError, match="empty"):
        TensorSource(torch.zeros(0, 1), torch.zeros(0))


class Squares(Dataset):
    def __len__(self):
        return 50

    def __getitem__(self, i):
        return torch.tensor([float(i)]), i


class Counter(IterableDataset):
    def __iter__(self):
        for i in range(25):
            yield torch.tensor([float(i)]), i


def test_map_style_dataset_follows_the_same_order_as_tensors():
    ds = DatasetSource(Squares(), seed=7)
    tensors = TensorSource(torch.arange(50.0).view(50, 1), torch.arange(50), seed=7)
    assert ids(ds.batches(1, 8)) == ids(tensors.batches(1, 8))
    assert ids(ds.batches(1, 8, start=16)) == ids(tensors.batches(1, 8))[16:]


def test_iterable_dataset_is_batched_in_order_and_skips_on_resume():
    src = IterableSource(Counter())
    assert src.num_samples is None
    assert [len(y) for _, y in src.batches(0, 10)] == [10, 10, 5]
    assert ids(src.batches(0, 10, start=20)) == list(range(20, 25))

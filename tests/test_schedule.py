"""The seed's accounting: epochs, steps, iterations, remainders, accumulation and world size."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from batchfit import BatchfitError, plan
from batchfit.core.accounting import micro_batch_sizes, split_evenly


def test_seed_example_24000_samples_batch_32_is_750_steps():
    p = plan(24000, 32)
    assert p.steps_per_epoch == 750
    assert p.iterations_per_epoch == 750
    assert p.last_batch_size == 32


def test_seed_example_2000_samples_batch_10_is_200_steps():
    assert plan(2000, 10).steps_per_epoch == 200


def test_remainder_is_the_last_batch_unless_dropped():
    p = plan(1000, 300)
    assert (p.steps_per_epoch, p.last_batch_size, p.dropped_per_epoch) == (4, 100, 0)
    d = plan(1000, 300, drop_last=True)
    assert (d.steps_per_epoch, d.last_batch_size, d.dropped_per_epoch) == (3, 300, 100)
    assert d.samples_per_epoch == 900


def test_online_learning_is_one_step_per_sample_and_full_batch_is_one_step_per_epoch():
    assert plan(500, 1).steps_per_epoch == 500
    assert plan(500, 500).steps_per_epoch == 1


def test_micro_batches_and_accumulation():
    p = plan(1000, 300, micro_batch_size=128)
    assert p.accumulation == 3  # 128 + 128 + 44
    assert p.iterations_per_epoch == 3 * 3 + 1  # three full batches, then 100 in one micro-batch


def test_world_size_splits_each_batch_and_reports_the_remainder():
    p = plan(1000, 300, micro_batch_size=64, world_size=4)
    assert p.per_rank_batch_size == (75, 75, 75, 75)
    assert p.per_rank_last_batch_size == (25, 25, 25, 25)
    assert p.accumulation == 2  # 64 + 11 on each rank
    assert plan(10, 3, world_size=2).per_rank_last_batch_size == (1, 0)


def test_epochs_and_max_steps_end_at_whichever_comes_first():
    assert plan(100, 10, epochs=3).total_steps == 30
    assert plan(100, 10, max_steps=25).total_steps == 25
    assert plan(100, 10, epochs=3, max_steps=25).total_steps == 25
    assert plan(100, 10, epochs=2, max_steps=25).total_steps == 20
    assert plan(100, 10).total_steps is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"samples": 100, "batch_size": 0}, r"'batch_size' option must be an int >= 1\. Got 0"),
        ({"samples": 100, "batch_size": -3}, r"Got -3"),
        ({"samples": 100, "batch_size": 2.5}, r"Got 2\.5"),
        (
            {"samples": 100, "batch_size": 101},
            r"larger than the training set \(100 samples\).*batch_size=100 for full-batch",
        ),
        (
            {"samples": 100, "batch_size": 10, "micro_batch_size": 20},
            r"micro-batch size \(20\) is larger",
        ),
        ({"samples": 100, "batch_size": 1, "world_size": 2}, r"smaller than the world size"),
        ({"samples": 0, "batch_size": 1}, r"'samples' option"),
        ({"samples": 100, "batch_size": 10, "epochs": 0}, r"'epochs' option"),
    ],
)
def test_impossible_sizes_are_rejected_with_the_fix(kwargs, match):
    with pytest.raises(BatchfitError, match=match):
        plan(**kwargs)


sizes = st.integers(min_value=1, max_value=5000)


@given(n=sizes, b=sizes, drop=st.booleans())
def test_steps_times_batch_covers_the_epoch_exactly(n, b, drop):
    assume(b <= n)
    p = plan(n, b, drop_last=drop)
    assert (p.steps_per_epoch - 1) * b + p.last_batch_size == p.samples_per_epoch
    assert p.samples_per_epoch + p.dropped_per_epoch == n
    assert p.steps_per_epoch == (n // b if drop else math.ceil(n / b))
    assert 1 <= p.last_batch_size <= b


@given(
    n=sizes,
    b=sizes,
    micro=sizes,
    world=st.integers(1, 8),
    epochs=st.integers(1, 4),
    extra=st.integers(0, 50),
)
def test_iterations_and_samples_add_up(n, b, micro, world, epochs, extra):
    assume(world <= b <= n and micro <= math.ceil(b / world))
    p = plan(
        n,
        b,
        micro_batch_size=micro,
        world_size=world,
        epochs=epochs,
        max_steps=p_steps if (p_steps := extra + 1) else None,
    )
    assert sum(p.per_rank_batch_size) == b and sum(p.per_rank_last_batch_size) == p.last_batch_size
    assert p.iterations_per_epoch >= p.steps_per_epoch
    whole, part = divmod(p.total_steps, p.steps_per_epoch)
    assert p.total_samples == whole * p.samples_per_epoch + part * b
    assert p.total_steps == min(epochs * p.steps_per_epoch, extra + 1)


@given(n=st.integers(0, 10_000), k=st.integers(1, 64))
def test_micro_batch_sizes_and_even_splits_sum_to_the_whole(n, k):
    assert sum(micro_batch_sizes(n, k)) == n
    assert all(0 < s <= k for s in micro_batch_sizes(n, k))
    shares = split_evenly(n, k)
    assert sum(shares) == n and max(shares) - min(shares) <= 1

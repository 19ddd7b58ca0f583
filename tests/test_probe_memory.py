"""The memory probe: a real out-of-memory error (address-space limit) is caught and backed off
from, memory does not grow across trials, only tested sizes are returned, state is restored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from batchfit import TensorSource
from batchfit.errors import BatchfitError
from batchfit.probe.harness import Deadline
from batchfit.probe.memory import (
    confirm_in_child,
    find_max_micro_batch_size,
    is_out_of_memory,
    rss_bytes,
    search_ceiling,
)
from helpers import blobs, cpu_only_env

MiB = 2**20

OOM_SCRIPT = textwrap.dedent(
    """
    import json, torch, torch.nn.functional as F
    from torch import nn
    from batchfit import TensorSource
    from batchfit.probe.memory import find_max_micro_batch_size, rss_bytes
    torch.manual_seed(0)
    # ~256 KiB of activations and their gradients per sample: 1024 samples need ~256 MiB.
    model = nn.Sequential(nn.Linear(64, 16384), nn.ReLU(), nn.Linear(16384, 2))
    source = TensorSource(torch.randn(4096, 64), torch.randint(0, 2, (4096,)))
    # One-time costs first (the first optimizer step imports a good deal of torch).
    opt = torch.optim.Adam(model.parameters())
    F.cross_entropy(model(source.x[:2]), source.y[:2]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    # No headroom: only the allocator's real error can stop the search.
    limit = rss_bytes() + 96 * 2**20
    result = find_max_micro_batch_size(
        model, source, F.cross_entropy, optimizer=opt, limit_bytes=limit, headroom=0.0
    )
    print(json.dumps(result.to_dict()))
    """
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_real_out_of_memory_error_is_caught_and_the_search_backs_off(tmp_path):
    # A fixed mmap threshold makes glibc return every large block to the kernel when freed, so
    # the address-space limit is exact; with its dynamic threshold, freed blocks stay mapped in
    # the heap and a later trial can grow resident memory past the limit without a new mapping
    # (the probe then judges it "too big" by its peak instead of meeting a real error).
    env = dict(cpu_only_env(), MALLOC_MMAP_THRESHOLD_="131072")
    done = subprocess.run(
        [sys.executable, "-c", OOM_SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    trials = result["trials"]
    ooms = [t for t in trials if t["out_of_memory"]]
    assert ooms, trials
    assert all("allocate memory" in t["error"] or "memory" in t["error"].lower() for t in ooms)
    best = result["max_micro_batch_size"]
    assert best < min(t["micro_batch_size"] for t in ooms)
    assert best in [t["micro_batch_size"] for t in trials if t["fits"]]  # never untested
    assert result["capped_by"] == "memory"
    assert result["confirmed"] is True  # and it ran in a limited child process
    # Memory is freed between trials: resident memory after each is flat, OOM or not.
    after = [t["rss_after_bytes"] for t in trials]
    assert max(after) - after[0] < 24 * MiB, [a // MiB for a in after]


def test_the_model_and_optimizer_are_unchanged_by_the_probe():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = blobs(200)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in opt.state.values()]
    result = find_max_micro_batch_size(
        model, TensorSource(x, y), F.cross_entropy, optimizer=opt, confirm=False
    )
    assert result.max_micro_batch_size == 200 and result.capped_by == "data size"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(
        torch.equal(m, s["exp_avg"]) for m, s in zip(moments, opt.state.values(), strict=True)
    )
    # Batch norm needs two samples to train, so the search starts at 2.
    assert [t.micro_batch_size for t in result.trials] == [2, 4, 8, 16, 32, 64, 128, 200]


def test_max_batch_size_caps_the_search_and_the_default_limit_is_reported():
    x, y = blobs(300)
    result = find_max_micro_batch_size(
        nn.Linear(4, 3), TensorSource(x, y), F.cross_entropy, max_batch_size=50, confirm=False
    )
    assert result.max_micro_batch_size == 50 and result.capped_by == "max_batch_size"
    assert result.limit_source.startswith("default: this process's")
    assert result.limit_bytes > rss_bytes()


def test_a_limit_too_small_for_one_sample_is_a_clear_error():
    # 64 MiB of weights: gradients and Adam's moments need 192 MiB more at any micro-batch.
    model = nn.Linear(4096, 4096)
    source = TensorSource(torch.randn(8, 4096), torch.randint(0, 10, (8,)))
    # One backward first: on a GPU machine the first one loads GPU libraries (tens of MiB).
    F.cross_entropy(nn.Linear(4, 3)(torch.randn(2, 4)), torch.tensor([0, 1])).backward()
    with pytest.raises(
        BatchfitError, match=r"too small for even a micro-batch of 1.*Raise 'memory_limit'"
    ):
        find_max_micro_batch_size(
            model, source, F.cross_entropy, limit_bytes=rss_bytes() + 64 * MiB, headroom=0.0
        )
    with pytest.raises(BatchfitError, match="leaves no room: this process already holds"):
        find_max_micro_batch_size(model, source, F.cross_entropy, limit_bytes=rss_bytes() // 2)


class FailsAbove(nn.Module):
    """A model with a bug that shows only at larger batches: not an out-of-memory error."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x):
        if len(x) > 4:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        return self.layer(x)


def test_errors_other_than_out_of_memory_are_not_swallowed():
    x, y = blobs(64)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        find_max_micro_batch_size(FailsAbove(), TensorSource(x, y), F.cross_entropy, confirm=False)


def test_out_of_memory_predicate():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(
        RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory")
    )
    assert not is_out_of_memory(RuntimeError("expected scalar type Float but found Double"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only allocator error types


def test_a_child_killed_by_a_signal_does_not_fit():
    # The kernel's out-of-memory killer sends SIGKILL: that size must not be accepted.
    ok, detail = confirm_in_child(lambda: os.kill(os.getpid(), 9), rss_bytes() + 256 * MiB, 0.0)
    assert ok is False and "killed by SIGKILL" in detail


def test_a_child_that_autograd_refuses_to_train_leaves_the_size_unconfirmed():
    """PyTorch's own error for a backward in a child forked after autograd started GPU threads
    (raised here by hand; tests/test_cuda.py meets the real one on a GPU machine)."""

    def refused():
        raise RuntimeError(
            "Unable to handle autograd's threading in combination with fork-based "
            "multiprocessing. See https://github.com/pytorch/pytorch/wiki/Autograd-and-Fork"
        )

    ok, detail = confirm_in_child(refused, rss_bytes() + 256 * MiB, 0.0)
    assert ok is None and detail.startswith("not run: on a machine with GPUs")


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="a forked child cannot train once autograd has GPU threads"
)
def test_the_memory_probe_backs_off_from_a_size_whose_child_was_killed():
    class KilledAbove(nn.Module):
        """Dies of SIGKILL at 64 samples or more in a forked child, as under the OOM killer."""

        def __init__(self, parent: int) -> None:
            super().__init__()
            self.layer, self.parent = nn.Linear(4, 3), parent

        def forward(self, x):
            if len(x) >= 64 and os.getpid() != self.parent:
                os.kill(os.getpid(), 9)
            return self.layer(x)

    x, y = blobs(100)
    result = find_max_micro_batch_size(
        KilledAbove(os.getpid()), TensorSource(x, y), F.cross_entropy
    )
    assert result.max_micro_batch_size == 32 and result.confirmed is True
    assert any("100 failed in the child process" in n for n in result.notes)


def test_the_search_makes_its_first_doublings_even_after_the_deadline():
    tried = []
    best, _, why = search_ceiling(lambda b: tried.append(b) or True, 4096, deadline=Deadline(0))
    assert tried == [1, 2, 4, 8, 16, 32] and (best, why) == (32, "time budget")
    tried.clear()
    search_ceiling(lambda b: tried.append(b) or True, 4096, start=2, deadline=Deadline(0))
    assert tried == [2, 4, 8, 16, 32, 64]


def test_the_child_check_sees_the_real_allocator_error():
    ok, detail = confirm_in_child(lambda: torch.ones(1000).sum(), rss_bytes() + 256 * MiB, 0.0)
    assert ok is True and "peak" in detail
    ok, detail = confirm_in_child(lambda: torch.ones(100 * MiB).sum(), rss_bytes() + 64 * MiB, 0.0)
    assert ok is False and "out of memory in the child" in detail and "allocate" in detail


@given(limit=st.integers(1, 5000), cap=st.integers(1, 5000), start=st.integers(1, 64))
def test_search_returns_only_tried_sizes_and_the_largest_fit_within_precision(limit, cap, start):
    tried = []

    def fits(b):
        tried.append(b)
        return b <= limit

    best, bad, why = search_ceiling(fits, cap, start=start)
    assert best == 0 or best in tried
    assert len(tried) == len(set(tried))  # each size run once
    if min(start, cap) > limit:
        assert best == 0
    elif cap <= limit:
        assert (best, bad, why) == (cap, None, "cap")
    else:
        assert best <= limit < bad and why == "memory"
        assert bad - best <= max(1, best // 16)

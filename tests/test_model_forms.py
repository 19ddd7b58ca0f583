"""Models that already trade compute for memory or lay their weights out for speed are measured
as they run: activation checkpointing (``torch.utils.checkpoint``) moves the memory ceiling, and
neither it nor ``channels_last`` weights break a probe."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from batchfit.orchestrate.tune import tune
from helpers import blobs, cpu_only_env

pytestmark = pytest.mark.usefixtures("one_thread")

CEILINGS = textwrap.dedent(
    """
    import json, torch, torch.nn.functional as F
    from torch import nn
    from torch.utils.checkpoint import checkpoint
    from batchfit import TensorSource
    from batchfit.probe.memory import find_max_micro_batch_size, rss_bytes

    class Deep(nn.Module):  # four blocks of two wide layers: 16 saved activations per sample
        def __init__(self, checkpointed):
            super().__init__()
            self.checkpointed = checkpointed
            self.inp = nn.Linear(64, 1024)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU())
                for _ in range(4)
            )
            self.out = nn.Linear(1024, 2)

        def forward(self, x):
            h = self.inp(x)
            for block in self.blocks:
                h = checkpoint(block, h, use_reentrant=False) if self.checkpointed else block(h)
            return self.out(h)

    source = TensorSource(torch.randn(8192, 64), torch.randint(0, 2, (8192,)))
    ceilings = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = Deep(checkpointed)
        opt = torch.optim.Adam(model.parameters())
        F.cross_entropy(model(source.x[:2]), source.y[:2]).backward()  # one-time costs first
        opt.step()
        opt.zero_grad(set_to_none=True)
        result = find_max_micro_batch_size(
            model, source, F.cross_entropy, optimizer=opt, limit_bytes=rss_bytes() + 160 * 2**20,
            headroom=0.0, confirm=False,
        )
        ceilings[str(checkpointed)] = [result.max_micro_batch_size, result.capped_by]
    print(json.dumps(ceilings))
    """
)


def test_activation_checkpointing_raises_the_measured_ceiling_under_the_same_limit():
    env = dict(cpu_only_env(), MALLOC_MMAP_THRESHOLD_="131072", MALLOC_ARENA_MAX="1")
    done = subprocess.run(
        [sys.executable, "-c", CEILINGS], capture_output=True, text=True, env=env, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ceilings = json.loads(done.stdout.strip().splitlines()[-1])
    (plain, plain_cap), (saved, _) = ceilings["False"], ceilings["True"]
    assert plain_cap == "memory", ceilings  # the limit, not the data, ended the plain search
    assert saved > plain, ceilings  # recomputing the blocks' insides frees their activations


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self.body, x, use_reentrant=False))


class ChannelsLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = x.view(-1, 1, 2, 2).contiguous(memory_format=torch.channels_last)
        return self.head(torch.relu(self.conv(image)).flatten(1))


@pytest.mark.parametrize(
    "make", [Checkpointed, ChannelsLast], ids=["checkpointed", "channels_last"]
)
def test_every_probe_runs_on_the_model_as_it_is(make):
    torch.manual_seed(0)
    model = make()
    if make is ChannelsLast:
        model = model.to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = tune(model, blobs(1000), time_budget=15)
    assert result.memory.max_micro_batch_size >= 32 and result.throughput.points
    assert result.noise is not None and result.lr_range is not None and result.race is not None
    assert not [s for s in result.skipped if "not measured" in s], result.skipped
    memory_line = next(line for line in result.decision if line.startswith("Memory: "))
    assert "on the model's forward as written: activation checkpointing" in memory_line
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    if make is ChannelsLast:  # its weights keep their layout
        assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)

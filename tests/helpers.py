"""Small data and a subprocess runner shared by the tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def blobs(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 4-D: a tiny classification problem."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    x = centers[y] + torch.randn(n, 4, generator=g)
    return x, y


def busy(seconds: float) -> None:
    """Compute for ``seconds`` of the time budget's clock: a slow step that every budget clock
    counts (the suite's CPU clock does not count a sleep)."""
    from batchfit.core import budget_clock

    end = budget_clock.now() + seconds
    while budget_clock.now() < end:
        pass


def subprocess_env() -> dict[str, str]:
    """The environment for child processes: one torch thread each.

    The suite runs on 2 cores with 2 xdist workers; children with 2 OpenMP threads each would
    oversubscribe the cores, and OpenMP's spin-waiting then slows them down many times over.
    """
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def cpu_only_env() -> dict[str, str]:
    """:func:`subprocess_env` with the GPUs hidden, for a child that tests CPU memory limits: on a
    GPU machine the model would otherwise go to the GPU, and PyTorch's autograd cannot train in
    a child forked after it started its GPU threads."""
    return {**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""}


def run_cli(args: list[str], cwd: Path | None = None, timeout: float = 120, **kwargs):
    """Run ``python -m batchfit`` in a real subprocess."""
    import subprocess

    env = subprocess_env()
    return subprocess.run(
        [sys.executable, "-m", "batchfit", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )

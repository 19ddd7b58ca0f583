"""Shared fixtures: a data cache per test session, small models and data files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import blobs

HERE = Path(__file__).parent


#: The suite counts tune's time budgets in CPU seconds (each process's own), and every child
#: process inherits it: a phase never skips because other work shares the machine. The tests
#: that the wall clock is meant for set it back (``wall_clock``).
os.environ["BATCHFIT_BUDGET_CLOCK"] = "cpu"


@pytest.fixture()
def wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The time budget on the wall clock (the default users get) for this test."""
    monkeypatch.setenv("BATCHFIT_BUDGET_CLOCK", "wall")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Shared by xdist workers (one level above each worker's base temp); writes are atomic.
    cache = tmp_path_factory.getbasetemp().parent / "batchfit-cache"
    os.environ["BATCHFIT_CACHE"] = str(cache)


@pytest.fixture()
def models_file(tmp_path: Path) -> Path:
    """A user's models.py with a few factories, as a user would write it."""
    path = tmp_path / "user_models.py"
    path.write_text(
        "import torch\n"
        "from torch import nn\n\n"
        "def mlp():\n"
        "    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))\n\n"
        "def regressor():\n"
        "    return nn.Linear(4, 1)\n\n"
        "def wide():\n"
        "    return nn.Sequential(nn.Linear(7, 3))\n\n"
        "def mnist_mlp():\n"
        "    return nn.Sequential(nn.Linear(40, 8), nn.ReLU(), nn.Linear(8, 10))\n\n"
        "def broken():\n"
        "    raise ValueError('boom')\n\n"
        "def batch_norm():\n"
        "    layers = [nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)]\n"
        "    return nn.Sequential(*layers)\n\n"
        "def not_a_model():\n"
        "    return 42\n\n"
        "def needs_args(width):\n"
        "    return nn.Linear(4, width)\n"
    )
    return path


@pytest.fixture()
def blobs_parquet(tmp_path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    x, y = blobs()
    table = pa.table({f"f{i}": x[:, i].numpy() for i in range(4)} | {"y": y.numpy()})
    path = tmp_path / "blobs.parquet"
    pq.write_table(table, path)
    return path


@pytest.fixture()
def one_thread():
    """One intra-op thread for the test: the suite's workers share the CPU, and oversubscribed
    OpenMP threads make timing-driven code (tune's time budget) crawl."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

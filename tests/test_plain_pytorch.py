"""The plain-PyTorch path of the README: three lines give the batch size, micro-batch and lr,
then the user's own DataLoader and loop train with them."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import batchfit
from helpers import blobs

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    """The README's "Plain PyTorch" code block, as written there."""
    text = README.read_text()
    section = text[text.index("### Plain PyTorch") :]
    return section[section.index("```python\n") + len("```python\n") : section.index("```\n", 10)]


def test_the_documented_three_lines_give_batch_micro_batch_lr_and_a_loader_that_trains():
    torch.manual_seed(0)
    x, y = blobs(400)
    dataset = TensorDataset(x, y)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    scope = {"batchfit": batchfit, "DataLoader": DataLoader, "model": model, "dataset": dataset}
    assert "batchfit.tune(model, dataset" in _snippet()
    exec(_snippet(), scope)
    b, loader = scope["b"], scope["loader"]
    assert b.micro_batch_size * b.accumulation == b.batch_size
    assert b.lr > 0 and scope["result"].decision
    assert loader.batch_size == b.micro_batch_size
    # The user's own loop at that size and lr: one epoch lowers the loss.
    optimizer = torch.optim.Adam(model.parameters(), lr=b.lr)  # tune measured adam
    before = nn.functional.cross_entropy(model(x), y).item()
    for xb, yb in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    assert nn.functional.cross_entropy(model(x), y).item() < before

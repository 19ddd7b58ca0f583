"""What a built-in example provides."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


def cache_dir() -> Path:
    """Where generated data sets are kept: ``$BATCHFIT_CACHE`` or ``~/.cache/batchfit``."""
    root = os.environ.get("BATCHFIT_CACHE") or Path.home() / ".cache" / "batchfit"
    return Path(root)


@dataclass(frozen=True)
class ExampleData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    target_kind: str  # "class" or "real", as in batchfit.data.files.Table


@dataclass(frozen=True)
class Example:
    """A built-in task: a description, a data loader and a model factory."""

    name: str
    description: str
    load: Callable[[], ExampleData]
    make_model: Callable[[], nn.Module]
    lr: float  # a learning rate that works with Adam at batch size 32

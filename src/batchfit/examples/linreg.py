"""Least squares with Gaussian inputs: the task whose gradient noise scale is known exactly.

Inputs ``x ~ N(0, I_d)``, target ``y = w*.x + sigma*eps`` with ``|w*| = sigma = 1`` and ``d = 32``,
and a bias-free linear model that starts at ``w = 0``. For the mean squared error the per-sample
gradient is ``2(w.x - y)x``; with ``delta = w - w*`` this gives ``|G|^2 = 4|delta|^2`` and
``tr(Sigma) = 4(d(|delta|^2 + sigma^2) + |delta|^2)``, so at initialisation
``B_simple = d(1 + sigma^2) + 1 = 65`` (see :func:`analytic_noise_scale`).
"""

from __future__ import annotations

import torch
from torch import nn

from batchfit.examples.base import Example, ExampleData
from batchfit.examples.catalog import DESCRIPTIONS

DIM, SIGMA, N_TRAIN, N_VAL, SEED = 32, 1.0, 8192, 2048, 1234


def true_weights() -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    w = torch.randn(DIM, generator=generator)
    return w / w.norm()


def analytic_noise_scale(distance_sq: float, dim: int = DIM, sigma: float = SIGMA) -> float:
    """``B_simple = tr(Sigma)/|G|^2`` for the MSE at squared distance ``|w - w*|^2`` from w*.

    >>> analytic_noise_scale(1.0)
    65.0
    """
    return (dim * (distance_sq + sigma**2) + distance_sq) / distance_sq


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=generator)
    y = x @ true_weights() + SIGMA * torch.randn(n, generator=generator)
    return x, y


def load() -> ExampleData:
    x_train, y_train = make_data(N_TRAIN, SEED + 1)
    x_val, y_val = make_data(N_VAL, SEED + 2)
    return ExampleData(x_train, y_train, x_val, y_val, "real")


def make_model() -> nn.Module:
    model = nn.Linear(DIM, 1, bias=False)
    nn.init.zeros_(model.weight)
    return model


LINREG = Example(
    name="linreg",
    description=DESCRIPTIONS["linreg"],
    load=load,
    make_model=make_model,
    lr=1e-2,
)

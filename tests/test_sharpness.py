"""Sharpness by power iteration on Hessian-vector products, checked against closed forms and a
brute-force float64 Hessian."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from batchfit.errors import BatchfitError
from batchfit.probe.sharpness import sharpness
from helpers import blobs


class Point(nn.Module):
    """A model whose output is its own parameter vector: the loss decides the Hessian."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, generator=torch.Generator().manual_seed(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w


def quadratic(eigenvalues: list[float], seed: int = 0):
    """``0.5 w^T A w`` with ``A = Q diag(eigenvalues) Q^T`` in a random orthonormal basis."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g))
    a = q @ torch.diag(torch.tensor(eigenvalues)) @ q.T

    def loss(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * w @ a @ w

    return loss


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.py


def test_sharpness_finds_the_top_eigenvalue_of_a_quadratic_within_one_percent():
    eigenvalues = [10.0, 7.0, 5.0, 3.0, 1.0, 0.5, 0.1] + [0.01] * 13
    result = sharpness(Point(20), quadratic(eigenvalues), torch.zeros(1), torch.zeros(1))
    assert result.converged
    assert abs(result.eigenvalue - 10.0) / 10.0 < 0.01
    assert 1 < result.iterations <= 50


def test_sharpness_returns_the_top_eigenvalue_even_when_a_negative_one_is_larger_in_magnitude():
    # A saddle: plain power iteration would return -20; the top of the spectrum is 5.
    loss = quadratic([-20.0, 5.0, 3.0, 1.0], seed=3)
    result = sharpness(
        Point(4), loss, torch.zeros(1), torch.zeros(1), iterations=1000, tolerance=1e-7
    )
    assert result.converged
    assert result.eigenvalue == pytest.approx(5.0, rel=1e-3)


# 10 does not divide 64: the last chunk is smaller and must weigh less.
@pytest.mark.parametrize("micro_batch_size", [None, 10])
def test_sharpness_matches_a_brute_force_float64_hessian_of_a_tiny_network(micro_batch_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = blobs(64)
    x = x.double()
    loss_fn = nn.functional.cross_entropy
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, w.split(sizes), shapes, strict=True)}
        return loss_fn(functional_call(model, params, (x,)), y)

    hessian = torch.autograd.functional.hessian(loss_of, flat)
    top = torch.linalg.eigvalsh(hessian)[-1].item()
    result = sharpness(
        model, loss_fn, x, y, iterations=5000, tolerance=1e-13, micro_batch_size=micro_batch_size
    )
    assert result.converged
    assert result.eigenvalue == pytest.approx(top, rel=1e-6)


def test_sharpness_leaves_parameters_buffers_grads_and_mode_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)
    )
    x, y = blobs(32)
    nn.functional.cross_entropy(model(x), y).backward()
    model[4].bias.grad = None  # one grad set, one absent: both must stay so
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    result = sharpness(model, nn.functional.cross_entropy, x, y, iterations=5)
    assert result.eigenvalue > 0 and result.iterations <= 5
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for name, param in model.named_parameters():
        if grads[name] is None:
            assert param.grad is None, name
        else:
            assert torch.equal(param.grad, grads[name]), name


def test_sharpness_is_deterministic_and_says_when_it_ran_out_of_iterations():
    loss = quadratic([1.0, 0.999, 0.998, 0.5])
    a = sharpness(Point(4), loss, torch.zeros(1), torch.zeros(1), iterations=3, tolerance=1e-12)
    b = sharpness(Point(4), loss, torch.zeros(1), torch.zeros(1), iterations=3, tolerance=1e-12)
    assert a == b
    assert (a.iterations, a.converged) == (3, False)


def test_sharpness_holds_frozen_parameters_fixed():
    model = nn.Linear(2, 1, bias=True)
    model.bias.requires_grad_(False)
    x = torch.tensor([[3.0, 0.0], [0.0, 1.0]])

    def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out.squeeze(1) - y) ** 2).mean()

    result = sharpness(model, mse, x, torch.zeros(2), tolerance=1e-10)
    assert result.eigenvalue == pytest.approx(9.0, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"iterations": 0}, "'sharpness_iterations' option must be an int >= 1"),
        ({"tolerance": 0.0}, "'sharpness_tolerance' option must be a number > 0"),
        ({"micro_batch_size": 0}, "'micro_batch_size' option must be an int >= 1"),
    ],
)
def test_sharpness_rejects_bad_settings(kwargs, message):
    with pytest.raises(BatchfitError, match=message):
        sharpness(Point(3), quadratic([1.0, 2.0, 3.0]), torch.zeros(1), torch.zeros(1), **kwargs)


def test_sharpness_of_a_model_without_trainable_parameters_is_refused():
    model = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(BatchfitError, match="no trainable parameters"):
        sharpness(model, nn.functional.mse_loss, torch.zeros(3, 2), torch.zeros(3, 1))

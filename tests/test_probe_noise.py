"""The noise probe on real models: the closed-form linear-regression value, a brute-force
per-sample check, the warm-up run, the O(sqrt B) law, and the model left untouched."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchfit
from batchfit import TensorSource
from batchfit.errors import BatchfitError
from batchfit.examples.linreg import analytic_noise_scale, load, make_model
from batchfit.losses import mse
from batchfit.probe.common import Deadline
from batchfit.probe.noise import gradient_error_curve, warmup_and_measure
from batchfit.train import params_sha256
from helpers import blobs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_linear_regression_noise_scale_is_within_10_percent_of_the_closed_form():
    data = load()
    model = make_model()  # w = 0, so |w - w*|^2 = 1
    estimate = batchfit.noise_scale(
        model, (data.x_train, data.y_train), mse, micro_batch_size=8, batches=400, accumulation=8
    )
    exact = analytic_noise_scale(1.0)
    assert exact == 65.0
    assert estimate.b_simple == pytest.approx(exact, rel=0.10)
    assert estimate.low < exact < estimate.high
    assert estimate.num_samples == 8192 and estimate.pairs == 400


def _exact_noise_scale(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """tr(Sigma) / |G|^2 from every per-sample gradient, in float64 (the brute-force reference)."""
    params = list(model.parameters())
    grads = []
    for i in range(len(y)):
        g = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        grads.append(torch.cat([t.reshape(-1) for t in g]).double())
    per_sample = torch.stack(grads)
    mean = per_sample.mean(0)
    return float((per_sample - mean).square().sum(1).mean() / mean.square().sum())


def test_estimate_matches_brute_force_per_sample_gradients_on_a_finite_set():
    torch.manual_seed(1)
    x, y = blobs(256, seed=1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():  # move away from init, where |G| is large and the problem easy
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    exact = _exact_noise_scale(model, x, y)
    estimate = batchfit.noise_scale(
        model, (x, y), F.cross_entropy, micro_batch_size=4, batches=600, accumulation=16
    )
    assert estimate.b_simple == pytest.approx(exact, rel=0.10)


def test_noise_scale_changes_nothing_in_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Dropout(0.1), nn.Linear(16, 3))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    batchfit.noise_scale(model, blobs(200), F.cross_entropy, micro_batch_size=4, batches=5)
    assert not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_warmup_measures_after_the_loss_falls_and_reports_how_it_moved():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    sha = params_sha256(model)
    x, y = blobs(2000)
    result = warmup_and_measure(
        model,
        TensorSource(x, y),
        F.cross_entropy,
        micro_batch_size=8,
        accumulation=8,
        lr=3e-3,
        gradient_error_sizes=[1, 4, 16, 64],
        deadline=Deadline(30),
    )
    assert params_sha256(model) == sha
    assert result.loss_end < 0.75 * result.loss_start
    assert 2 * 8 <= result.warmup_steps < result.steps
    assert result.estimate.pairs == result.steps - result.warmup_steps
    assert result.at_start is not None and result.windows
    assert [p.batch_size for p in result.gradient_error] == [1, 4, 16, 64]
    assert all(p.predicted is not None for p in result.gradient_error)


def test_batch_gradient_error_falls_as_one_over_sqrt_b():
    data = load()
    source = TensorSource(data.x_train, data.y_train)
    points, reference = gradient_error_curve(
        make_model(), source, mse, [1, 4, 16, 64, 256], micro_batch_size=512, repeats=16
    )
    assert reference == 8192
    sizes = [p.batch_size for p in points]
    errors = [p.relative_error for p in points]
    slope = (math.log(errors[-1]) - math.log(errors[0])) / (
        math.log(sizes[-1]) - math.log(sizes[0])
    )
    assert slope == pytest.approx(-0.5, abs=0.08)
    # sqrt(B_simple / B) at B = 1 with B_simple = 65 at w = 0
    assert errors[0] == pytest.approx(math.sqrt(65.0), rel=0.35)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accumulation": 1}, "at least 2 micro-batches"),
        ({"micro_batch_size": 64, "accumulation": 8}, "larger than the data set"),
        ({"batches": 0}, "'batch_size' option"),
    ],
)
def test_noise_scale_refuses_bad_settings(kwargs, message):
    args = {"micro_batch_size": 4, "batches": 2} | kwargs
    with pytest.raises(BatchfitError, match=message):
        batchfit.noise_scale(nn.Linear(4, 3), blobs(300), F.cross_entropy, **args)

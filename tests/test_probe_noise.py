"""The noise probe on real models: the closed-form linear-regression value, a brute-force
per-sample check, the warm-up run, the O(sqrt B) law, and the model left untouched."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchfit
from batchfit import TensorSource
from batchfit.errors import BatchfitError
from batchfit.examples.linreg import analytic_noise_scale, load, make_model
from batchfit.losses import mse
from batchfit.probe.gradients import gradient_error_curve
from batchfit.probe.harness import Deadline, Diverged, cycle_batches
from batchfit.probe.noise import (
    NoiseSettings,
    Readings,
    WarmUp,
    measured_step,
    read_at_initial_weights,
    summarise_noise,
    train_and_read,
    warmup_and_measure,
)
from batchfit.step import params_sha256
from helpers import blobs, subprocess_env

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
        NoiseSettings(
            micro_batch_size=8, accumulation=8, lr=3e-3, gradient_error_sizes=(1, 4, 16, 64)
        ),
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
        ({"batches": 0}, "'batches' option"),
        ({"micro_batch_size": 1, "model": "batch_norm"}, "batch norm.*micro_batch_size >= 2"),
    ],
)
def test_noise_scale_refuses_bad_settings(kwargs, message):
    args = {"micro_batch_size": 4, "batches": 2} | kwargs
    model = nn.Linear(4, 3)
    if args.pop("model", None) == "batch_norm":
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    with pytest.raises(BatchfitError, match=message):
        batchfit.noise_scale(model, blobs(300), F.cross_entropy, **args)


def test_noise_scale_takes_a_loss_by_name():
    x, y = blobs(300)
    model = nn.Linear(4, 3)
    by_name = batchfit.noise_scale(model, (x, y), "cross_entropy", 4, 20)
    by_function = batchfit.noise_scale(model, (x, y), F.cross_entropy, 4, 20)
    assert by_name.b_simple == pytest.approx(by_function.b_simple)


def test_the_start_reading_is_taken_at_the_initial_weights():
    # Linear regression at w = 0: B_simple = 65 in closed form. The reading used to come from
    # the first training steps, which had already moved the weights (~86).
    data = load()
    result = warmup_and_measure(
        make_model(),
        TensorSource(data.x_train, data.y_train),
        mse,
        NoiseSettings(micro_batch_size=8, accumulation=8, lr=1e-2),
        deadline=Deadline(20),
    )
    assert result.start_steps == 8 and result.at_start.pairs == 8
    assert result.at_start.b_simple == pytest.approx(analytic_noise_scale(1.0), rel=0.2)
    assert result.loss_start == pytest.approx(2.0, rel=0.1)  # |w*|^2 + sigma^2 at w = 0


@pytest.mark.parametrize(("lr", "why"), [(100.0, "rose over 10-fold"), (1e30, "non-finite")])
def test_a_diverging_warm_up_raises_instead_of_measuring(lr, why):
    # lr 100 once "fell by 25%" from 1e14 to 4e9 and gave B_simple ~212.
    with pytest.raises(
        Diverged, match=rf"diverged at lr {re.escape(f'{lr:.3g}')}: the loss .*{why}.*smaller 'lr'"
    ):
        warmup_and_measure(
            nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)),
            TensorSource(*blobs(2000)),
            F.cross_entropy,
            NoiseSettings(micro_batch_size=8, accumulation=8, lr=lr),
            deadline=Deadline(20),
        )


class CountingSource(TensorSource):
    """A real in-memory source that records the largest batch it was asked for and the samples
    it handed out."""

    def __init__(self, x, y):
        super().__init__(x, y)
        self.largest = 0
        self.samples = 0

    def batches(self, epoch, batch_size, **kwargs):
        self.largest = max(self.largest, batch_size)
        for x, y in super().batches(epoch, batch_size, **kwargs):
            self.samples += len(y)
            yield x, y


def test_the_gradient_error_curve_reads_in_micro_batches_and_keeps_its_deadline():
    source = CountingSource(*blobs(4000))
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    points, reference = gradient_error_curve(
        model, source, F.cross_entropy, [4, 64, 512], micro_batch_size=100, repeats=4
    )
    assert [p.batch_size for p in points] == [4, 64, 512] and reference == 4000
    assert source.largest == 100  # the reference batch of 4000 was never one tensor
    source = CountingSource(*blobs(4000))
    points, _ = gradient_error_curve(
        model, source, F.cross_entropy, [4, 64], micro_batch_size=100, deadline=Deadline(0)
    )
    assert points == () and source.samples <= 100  # no reference gradient past the deadline


def test_a_batch_norm_model_gets_no_one_sample_chunk_in_the_gradient_error_curve():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    # 1025 = 4 x 256 + 1: chunks of 256 would leave one sample for batch norm.
    points, reference = gradient_error_curve(
        model, TensorSource(*blobs(1025)), F.cross_entropy, [1, 2, 512], micro_batch_size=256
    )
    assert reference == 1025 and [p.batch_size for p in points] == [2, 512]


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, torch, torch.nn.functional as F
    from torch import nn
    from batchfit.probe.memory import _peak_bytes, _reset_peak, release_memory, rss_bytes
    from batchfit.probe.noise import measured_step
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 1024))  # 4.5M params
    x, y = torch.randn(64, 64), torch.randint(0, 1024, (64,))

    def accumulate():  # what training does with 8 micro-batches of 8
        for xs, ys in zip(x.split(8), y.split(8)):
            F.cross_entropy(model(xs), ys).backward()

    def peak_above_baseline(step):
        step()  # one-time allocations
        for p in model.parameters():
            p.grad = None
        release_memory(collect=True)
        base = rss_bytes()
        _reset_peak()
        step()
        above = _peak_bytes(True) - base
        for p in model.parameters():
            p.grad = None
        return above

    print(json.dumps({
        "training": peak_above_baseline(accumulate),
        "noise": peak_above_baseline(lambda: measured_step(model, F.cross_entropy, x, y, 8)),
        "params": sum(p.numel() * p.element_size() for p in model.parameters()),
    }))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs Linux")
def test_a_measured_step_needs_one_gradient_copy_more_than_training():
    # Flattened float64 copies once made a 16.8M-parameter MLP peak 516 MiB above its baseline
    # where an Adam step needs 194 MiB. A fixed mmap threshold makes glibc give every large
    # block back when it is freed, so that peak resident memory is peak live memory.
    env = subprocess_env() | {"MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    peak = json.loads(done.stdout)
    # The running sum of the micro-batch gradients, and small slices for the float64 norms.
    assert peak["noise"] < peak["training"] + 0.5 * peak["params"], peak


def _state_after(steps: int, **fields) -> WarmUp:
    """A noise probe's state after ``steps`` training steps of made-up readings."""
    rng = random.Random(0)
    readings = Readings()
    for i in range(steps):
        readings = readings.add(2.0 + rng.random(), 1.0 + 0.1 * rng.random(), 1.0 / (i + 1))
    at_start = Readings((2.5,) * 8, (1.05,) * 8, (2.0,) * 8)
    return WarmUp(at_start=at_start, readings=readings, **fields)


def test_a_run_cut_short_before_its_warm_up_ended_measures_its_second_half_and_says_so():
    settings = NoiseSettings(micro_batch_size=8, accumulation=8)
    state = _state_after(20, notes=("cut short earlier",), facts=("Measured from 2 ranks.",))
    result = summarise_noise(state, settings, 4000, time.perf_counter())
    assert result.warmup_steps == 10 and result.estimate.pairs == 10
    assert state.warmup_end is None  # the summary decides for itself, its input stays as it was
    late = "Time allowed only 20 steps: the first half counts as warm-up"
    # Facts about how it measured are the report's notes, never something cut short.
    assert result.notes[:2] == ("cut short earlier", "Measured from 2 ranks.")
    assert result.notes[2].startswith(late) and len(result.notes) == 3
    assert result.cut_short == (result.notes[0], result.notes[2])
    ended = summarise_noise(replace(state, warmup_end=4), settings, 4000, time.perf_counter())
    assert ended.warmup_steps == 4 and ended.cut_short == ("cut short earlier",)


def test_each_step_of_the_warm_up_returns_a_new_state_and_leaves_the_one_it_was_given():
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    source = TensorSource(*blobs(2000))
    settings = NoiseSettings(micro_batch_size=8, accumulation=4, lr=3e-3, max_steps=40)
    stream = cycle_batches(source, settings.batch_size)

    def step():
        x, y = next(stream)
        return measured_step(model, F.cross_entropy, x, y, settings.micro_batch_size)

    empty = WarmUp()
    started = read_at_initial_weights(empty, step, Deadline(20))
    assert empty == WarmUp() and len(started.at_start.losses) == 8 and not started.readings.losses
    optim = torch.optim.Adam(model.parameters(), lr=settings.lr)
    trained = train_and_read(started, step, optim, settings, Deadline(20), lambda _: None)
    assert not started.readings.losses and started.warmup_end is None
    assert 0 < len(trained.readings.losses) <= 40 and trained.train_seconds > 0
    assert trained.at_start == started.at_start and trained.stopped_by in ("steps", "enough steps")

"""tune in a mixed precision (``precision="bf16-mixed"`` / ``"16-mixed"``): every probe's forward
pass and loss run under autocast, the memory trials each run in a child process limited to the
memory limit (a kernel that crashes on a refused allocation ends the child, not tune), the ceiling
is the precision's own, and the report and its train command say which precision was measured."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch import nn

from batchfit import TensorSource, train, tune
from batchfit.integrations.tune_log import tune_precision
from batchfit.losses import resolve_loss
from batchfit.memory_limits import rss_bytes
from batchfit.precision import PROBE_LOSS_SCALE, Precision, measured_in
from batchfit.probe.memory import child_trial, find_max_micro_batch_size
from helpers import blobs

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def wide_tanh(seed: int = 0) -> nn.Module:
    """Activations, not weights, fill its memory: eight tanh layers of 1,024 per sample, which
    autocast keeps in the precision of the matmul before them."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 1024), *[nn.Tanh() for _ in range(8)], nn.Linear(1024, 2))


def test_measured_in_runs_the_forward_under_autocast_and_puts_the_module_back():
    model, loss = nn.Linear(3, 2), resolve_loss(None, "class")
    with measured_in(Precision.of("bf16-mixed", CPU), model, loss) as mixed:
        assert model(torch.ones(4, 3)).dtype == torch.bfloat16
        assert mixed.fn is not loss.fn and mixed.name == loss.name
    assert model(torch.ones(4, 3)).dtype == torch.float32 and "forward" not in vars(model)
    with (
        pytest.raises(RuntimeError, match="probe failed"),
        measured_in(Precision.of("bf16-mixed", CPU), model, loss),
    ):
        raise RuntimeError("probe failed")
    assert "forward" not in vars(model)  # put back after an error too
    own = model.forward
    model.forward = lambda x: own(x) * 2  # a forward the user set on the instance
    users = model.forward
    with measured_in(Precision.of("bf16-mixed", CPU), model, loss):
        assert model(torch.ones(1, 3)).dtype == torch.bfloat16
    assert model.forward is users
    with measured_in(Precision.of("32", CPU), model, loss) as same:
        assert same is loss and model.forward is users


def test_16_mixed_probes_read_true_gradients_that_unscaled_float16_would_lose():
    """A loss whose gradient at the output is far below float16's smallest number: without a
    scale the float16 backward flushes it to zero; the probes' fixed scale keeps it, and every
    parameter's gradient arrives unscaled, as float32 computes it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(16, 8)
    tiny = resolve_loss(lambda out, y: out.float().mean() * 1e-6, "real")

    def grads(loss_fn) -> list[torch.Tensor]:
        model.zero_grad()
        loss_fn(model(x), x[:, 0]).backward()
        return [p.grad.clone() for p in model.parameters()]

    def error(got: torch.Tensor, want: torch.Tensor) -> float:
        return float((got - want).norm() / want.norm())

    exact = grads(tiny.fn)
    with torch.autocast("cpu", dtype=torch.float16):
        flushed = grads(tiny.fn)
    assert float(flushed[0].abs().max()) == 0.0  # float16 lost the first layer's gradient
    with measured_in(Precision.of("16-mixed", CPU), model, tiny) as scaled:
        kept = grads(scaled.fn)
        with torch.no_grad():
            value = float(scaled.fn(model(x), x[:, 0]))
    assert all(k.dtype == torch.float32 for k in kept)
    assert max(error(k, e) for k, e in zip(kept, exact, strict=True)) < 0.02
    with torch.no_grad():
        assert value == pytest.approx(float(tiny.fn(model(x), x[:, 0])), rel=1e-2)  # unscaled
    assert PROBE_LOSS_SCALE > 1 and model.zero_grad() is None
    model(x).sum().backward()  # the unscaling hooks are gone: a plain backward is as before
    assert float(model[2].bias.grad) == pytest.approx(16.0)


def test_a_child_trial_killed_by_a_signal_did_not_fit_and_an_answer_is_read():
    limit = rss_bytes() + 2**30
    crashed = child_trial(lambda: os.kill(os.getpid(), signal.SIGSEGV), 64, limit, 0.1)
    assert crashed is not None and not crashed.fits and crashed.out_of_memory
    assert "SIGSEGV" in crashed.error
    fine = child_trial(lambda: torch.ones(1000).sum(), 8, limit, 0.1)
    assert fine is not None and fine.fits and fine.peak_bytes > 0 and fine.error is None


def test_a_search_whose_large_trials_crash_stops_below_them_and_tune_survives():
    """Trials above 100 samples kill their process (as oneDNN's bf16 kernels, measured, do under
    a very tight limit): in children, the search reads them as not fitting and goes on."""

    def crashes_above_100(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if len(y) > 100:
            os.kill(os.getpid(), signal.SIGSEGV)
        return nn.functional.cross_entropy(output, y)

    x, y = blobs(512)
    ceiling = find_max_micro_batch_size(
        nn.Linear(4, 3), TensorSource(x, y), crashes_above_100,
        limit_bytes=rss_bytes() + 2**30, trials_in_child=True, precision="bf16-mixed",
    )  # fmt: skip
    assert 64 <= ceiling.max_micro_batch_size <= 100
    assert ceiling.confirmed and ceiling.confirmation.endswith("as every trial did")
    assert any("SIGSEGV" in (t.error or "") for t in ceiling.trials)
    assert ceiling.precision == "bf16-mixed"


def test_the_ceiling_measured_in_a_mixed_precision_is_its_own_under_the_same_limit():
    name = "bf16-mixed"  # 16-mixed holds float16 activations, the same size
    x = torch.randn(8192, 16)
    source = TensorSource(x, (x[:, 0] > 0).long())
    loss = resolve_loss(None, "class")
    ceilings = {}
    for precision in ("32", name):
        model = wide_tanh()
        limit = rss_bytes() + 120 * 2**20
        with measured_in(Precision.of(precision, CPU), model, loss) as measured:
            ceilings[precision] = find_max_micro_batch_size(
                model, source, measured.fn, limit_bytes=limit,
                trials_in_child=precision != "32", precision=precision,
            )  # fmt: skip
    fp32, mixed = ceilings["32"], ceilings[name]
    assert fp32.capped_by == "memory" and fp32.confirmed  # float32's own child check
    assert mixed.confirmed and mixed.confirmation.endswith("as every trial did")
    # half-size activations: about twice the samples fit under the same limit
    assert mixed.max_micro_batch_size >= 1.4 * fp32.max_micro_batch_size


def test_tune_in_a_mixed_precision_reports_it_and_its_train_command_trains_in_it(tmp_path):
    name = "16-mixed"  # its probes' loss scale too; train --batch-size auto tunes in bf16 below
    x, y = blobs(600)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = tune(model, (x, y), precision=name, time_budget=5, max_batch_size=256,
                  out_dir=tmp_path, seed=0)  # fmt: skip
    report = json.loads((tmp_path / "report.json").read_text())
    assert result.precision == report["precision"] == report["memory"]["precision"] == name
    assert result.memory.confirmation.endswith("as every trial did")
    assert f"Measured in {name} (" in next(d for d in result.decision if d.startswith("Memory"))
    assert result.noise is not None and result.noise.estimate.b_simple > 0
    assert f"--precision {name}" in (tmp_path / "report.md").read_text()
    assert "forward" not in vars(model)  # the model as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model(x[:2]).dtype == torch.float32


def test_train_auto_tunes_in_the_runs_precision():
    x, y = blobs(400)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    done = train(model, (x, y), batch_size="auto", max_steps=5, precision="bf16-mixed",
                 tune_budget=8, progress=False)  # fmt: skip
    assert done.tune is not None and done.tune.precision == "bf16-mixed"
    assert done.precision == "bf16-mixed" and done.batch_size == done.auto.batch_size


def test_a_trainers_precision_names_what_tune_measures_in():
    assert tune_precision("bf16-mixed") == ("bf16-mixed", None)
    assert tune_precision("16-mixed") == ("16-mixed", None)
    assert tune_precision("32-true") == ("32", None) and tune_precision("64-true")[1] is None
    measured, note = tune_precision("bf16-true")
    assert measured == "32" and "bf16-true" in note and "conservative" in note


def test_a_mixed_precision_emulated_on_this_cpu_is_named_in_one_warning(monkeypatch):
    bf16 = Precision.of("bf16-mixed", CPU)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    warning = bf16.slow_here()
    assert warning is not None and "no torch.bfloat16 instructions" in warning
    assert "slower than float32" in warning and "\n" not in warning
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert bf16.slow_here() is None
    assert Precision.of("32", CPU).slow_here() is None
    assert Precision("bf16-mixed", "cuda", torch.bfloat16).slow_here() is None

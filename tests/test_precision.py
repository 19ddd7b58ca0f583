"""Mixed precision in ``train`` (``precision="bf16-mixed"``): the forward pass and the loss under
bfloat16 autocast, weights and optimizer state in float32, on the CPU as on CUDA.

bf16 rounds to 8 bits of mantissa, so runs in it match float32 within bf16's tolerance, not
bitwise; a resumed bf16 run still matches the run straight through bitwise (the same ops in the
same order)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from batchfit import train
from batchfit.errors import BatchfitError
from batchfit.examples import EXAMPLES
from batchfit.precision import Precision
from helpers import blobs, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


class Records(nn.Module):
    """A small MLP that records the dtype its first layer computed in while training (train's
    up-front check of the model against the data runs in eval mode, in float32)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 32), nn.Linear(32, 3)
        self.dtypes: set[torch.dtype] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.training:
            self.dtypes.add(h.dtype)
        return self.b(torch.relu(h))


def test_bf16_mixed_runs_the_forward_in_bfloat16_and_keeps_the_weights_float32(tmp_path):
    x, y = blobs(256)
    model = Records()
    result = train(model, (x, y), batch_size=32, max_steps=8, precision="bf16-mixed",
                   out_dir=tmp_path)  # fmt: skip
    assert model.dtypes == {torch.bfloat16}  # the forward ran under autocast
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the weights did not
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert {t.dtype for t in saved.values()} == {torch.float32}  # loadable into float32 as is
    assert result.precision == "bf16-mixed"
    plain = Records()
    assert train(plain, (x, y), batch_size=32, max_steps=8).precision == "32"
    assert plain.dtypes == {torch.float32}


def test_bf16_mixed_follows_the_float32_loss_curve_on_the_built_in_example():
    data = EXAMPLES["mnist1d"].load()
    curves = {}
    for precision in ("32", "bf16-mixed"):
        torch.manual_seed(0)
        model = EXAMPLES["mnist1d"].make_model()
        result = train(model, (data.x_train, data.y_train), val_data=(data.x_val, data.y_val),
                       batch_size=64, max_steps=120, eval_every=40, lr=2e-3, seed=0,
                       precision=precision)  # fmt: skip
        curves[precision] = [e["val_loss"] for e in result.evals]
    assert len(curves["32"]) >= 3
    # the loss falls alike: within 3% at every evaluation (bf16's 8-bit mantissa, 120 updates)
    torch.testing.assert_close(curves["bf16-mixed"], curves["32"], rtol=0.03, atol=0.0)
    assert curves["bf16-mixed"][-1] < 0.9 * curves["bf16-mixed"][0]  # and it did fall


def test_exact_accumulation_matches_the_single_batch_update_within_bf16_tolerance():
    x, y = blobs(384)
    runs = {}
    for micro in (96, 24):  # one micro-batch per step, or four
        model = Records()
        train(model, (x, y), batch_size=96, micro_batch_size=micro, max_steps=6, lr=1e-2,
              precision="bf16-mixed")  # fmt: skip
        runs[micro] = torch.cat([p.detach().flatten() for p in model.parameters()])
    moved = (runs[96] - torch.cat([p.flatten() for p in Records().parameters()])).abs().max()
    gap = (runs[96] - runs[24]).abs().max()
    assert gap < 0.02 * moved, (gap, moved)  # bf16 rounds each part's forward, not the sum


def test_a_resumed_bf16_run_matches_the_run_straight_through_bitwise(tmp_path):
    x, y = blobs(256)
    options = dict(batch_size=32, micro_batch_size=16, precision="bf16-mixed", seed=1)
    straight = train(Records(), (x, y), max_steps=12, **options)
    train(Records(), (x, y), max_steps=5, checkpoint_dir=tmp_path, **options)
    resumed = train(Records(), (x, y), max_steps=12, checkpoint_dir=tmp_path, resume=True,
                    **options)  # fmt: skip
    assert resumed.resumed_from_step == 5
    assert resumed.params_sha256 == straight.params_sha256


def test_a_checkpoint_of_one_precision_is_not_resumed_in_another(tmp_path):
    x, y = blobs(256)
    train(Records(), (x, y), batch_size=32, max_steps=4, checkpoint_dir=tmp_path)
    with pytest.raises(BatchfitError, match="made with precision='32', not 'bf16-mixed'"):
        train(Records(), (x, y), batch_size=32, max_steps=8, checkpoint_dir=tmp_path,
              resume=True, precision="bf16-mixed")  # fmt: skip


def test_an_unknown_precision_is_refused_in_one_line():
    x, y = blobs(64)
    with pytest.raises(BatchfitError, match="precision"):
        train(Records(), (x, y), batch_size=32, max_steps=1, precision="fp8")
    with pytest.raises(BatchfitError, match="precision"):
        train(Records(), (x, y), batch_size="auto", max_steps=1, precision="fp8")
    assert not Precision.of("32", torch.device("cpu")).mixed


def test_the_command_line_trains_in_bf16_and_refuses_an_unknown_precision():
    done = run_cli(["train", "--example", "linreg", "--batch-size", "64", "--max-steps", "5",
                    "--precision", "bf16-mixed", "--quiet", "--json"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["precision"] == "bf16-mixed"
    bad = run_cli(["train", "--example", "linreg", "--batch-size", "64", "--max-steps", "5",
                   "--precision", "fp16"])  # fmt: skip
    assert bad.returncode == 2 and "fp16" in bad.stderr and "Traceback" not in bad.stderr


# -- 16-mixed: float16 with loss scaling ------------------------------------------------------


def test_16_mixed_trains_in_float16_with_one_scaled_update_per_step(monkeypatch):
    from batchfit.precision import LossScaler

    updates = []
    step = LossScaler.step

    def counted(self, optimizer):
        updates.append(self.scaler.get_scale())
        step(self, optimizer)

    monkeypatch.setattr(LossScaler, "step", counted)
    x, y = blobs(256)
    model = Records()
    result = train(model, (x, y), batch_size=64, micro_batch_size=16, max_steps=6,
                   precision="16-mixed")  # fmt: skip
    assert model.dtypes == {torch.float16}
    assert len(updates) == 6 and updates[0] == 2.0**16  # one scaler update per step, not per part
    assert result.precision == "16-mixed" and result.skipped_steps == 0
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_16_mixed_matches_float32_within_float16_tolerance_with_accumulation():
    x, y = blobs(384)
    runs = {}
    for precision, micro in (("32", 96), ("16-mixed", 96), ("16-mixed", 24)):
        model = Records()
        train(model, (x, y), batch_size=96, micro_batch_size=micro, max_steps=6, lr=1e-2,
              precision=precision)  # fmt: skip
        runs[precision, micro] = torch.cat([p.detach().flatten() for p in model.parameters()])
    moved = (runs["32", 96] - torch.cat([p.flatten() for p in Records().parameters()])).abs().max()
    assert (runs["16-mixed", 96] - runs["32", 96]).abs().max() < 0.02 * moved
    assert (runs["16-mixed", 24] - runs["16-mixed", 96]).abs().max() < 0.02 * moved


class Overflows(Records):
    """Records, whose output is multiplied by a huge factor at its 3rd training forward: the
    scaled gradients of that step overflow float16 and the scaler skips it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
        out = super().forward(x)
        return out * 6e4 if self.training and self.calls == 3 else out


def test_an_overflowed_16_mixed_step_is_skipped_counted_and_resumed_bitwise(tmp_path):
    x, y = blobs(256)
    options = dict(batch_size=32, precision="16-mixed", seed=2, loss="cross_entropy")
    straight = train(Overflows(), (x, y), max_steps=8, **options)
    assert straight.skipped_steps >= 1 and straight.steps == 8
    train(Overflows(), (x, y), max_steps=4, checkpoint_dir=tmp_path, **options)
    model = Overflows()
    model.calls = 4  # the resumed run's forwards continue past the overflowing one
    resumed = train(model, (x, y), max_steps=8, checkpoint_dir=tmp_path, resume=True, **options)
    assert resumed.params_sha256 == straight.params_sha256  # the scaler's state came back too
    assert resumed.skipped_steps == straight.skipped_steps


def test_16_mixed_with_adaptive_is_refused_in_one_line_naming_bf16():
    x, y = blobs(256)
    with pytest.raises(BatchfitError, match="use precision='bf16-mixed'"):
        train(Records(), (x, y), batch_size=32, max_steps=2, adaptive=True, precision="16-mixed")

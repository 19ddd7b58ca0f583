"""The training loop: accumulation, online and full batch, stop rules, resume, NaN, metrics."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

from batchfit import BatchfitError, NonFiniteLossError, TensorSource, train
from batchfit.checkpoint import load_checkpoint
from batchfit.core.configs import TrainConfig
from helpers import blobs


def tiny_model(seed=0, dropout=0.0, dtype=torch.float32):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 16), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(16, 3))
    return nn.Sequential(*layers).to(dtype)


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("micro", [1, 3, 4, 7, 10])
def test_accumulated_micro_batches_equal_the_full_batch_mean_gradient(micro):
    x, y = blobs(10)
    x = x.double()
    ref = tiny_model(dtype=torch.float64)
    start = params(ref).clone()
    # Independent reference: one plain autograd pass over the whole batch.
    nn.functional.cross_entropy(ref(x), y).backward()
    expected = start - 0.5 * torch.cat([p.grad.flatten() for p in ref.parameters()])

    model = tiny_model(dtype=torch.float64)
    train(
        model,
        (x, y),
        batch_size=10,
        micro_batch_size=micro,
        max_steps=1,
        optimizer="sgd",
        lr=0.5,
        momentum=0.0,
        device="cpu",  # the reference above ran on the CPU
    )
    assert torch.allclose(params(model), expected, rtol=0, atol=1e-13)


def test_online_learning_updates_once_per_sample():
    x, y = blobs(50)
    result = train(tiny_model(), (x, y), batch_size=1, epochs=2)
    assert (result.steps, result.samples_seen, result.epochs_completed) == (100, 100, 2)


def test_full_batch_is_one_step_per_epoch():
    x, y = blobs(50)
    result = train(tiny_model(), (x, y), batch_size=50, epochs=3)
    assert result.steps == 3 and result.iterations == 3


def test_max_steps_alone_or_with_epochs_ends_at_whichever_comes_first():
    x, y = blobs(100)
    assert train(tiny_model(), (x, y), batch_size=10, max_steps=25).steps == 25
    r = train(tiny_model(), (x, y), batch_size=10, max_steps=25, epochs=2)
    assert (r.steps, r.epochs_completed) == (20, 2)
    r = train(tiny_model(), (x, y), batch_size=10, max_steps=15, epochs=2)
    assert (r.steps, r.epochs_completed, r.samples_seen) == (15, 1, 150)


def test_last_batch_holds_the_remainder_and_micro_batches_count_as_iterations(tmp_path):
    x, y = blobs(105)
    r = train(tiny_model(), (x, y), batch_size=20, micro_batch_size=8, epochs=1, out_dir=tmp_path)
    assert r.steps == 6 and r.iterations == 5 * 3 + 1
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(row["batch_size"]) for row in rows] == [20] * 5 + [5]


def test_metrics_csv_has_one_row_per_step_with_the_named_columns(tmp_path):
    x, y = blobs(60)
    train(tiny_model(), (x, y), batch_size=16, epochs=2, out_dir=tmp_path, lr=0.01)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert list(rows[0]) == [
        "step",
        "epoch",
        "batch_size",
        "micro_batch_size",
        "loss",
        "lr",
        "samples_per_s",
    ]
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert {r["epoch"] for r in rows} == {"1", "2"}
    assert all(math.isfinite(float(r["loss"])) and float(r["samples_per_s"]) > 0 for r in rows)
    assert float(rows[0]["lr"]) == 0.01


def test_final_metrics_and_validation_accuracy_are_reported():
    x, y = blobs(200)
    xv, yv = blobs(100, seed=1)
    r = train(tiny_model(), (x, y), val_data=(xv, yv), batch_size=16, epochs=5, lr=0.01)
    assert set(r.final) == {"train_loss", "val_loss", "val_accuracy"}
    assert r.final["val_accuracy"] > 0.8  # blobs are easy; a broken loop stays near 1/3
    assert len(r.history) == 5 and r.history[-1]["val_loss"] == r.final["val_loss"]


def _run(tmp_path, *, stop_at=(), epochs=3, batch_size=16, micro=None):
    """Train with a dropout model; stop (and resume) at the given steps; return the sha256."""
    x, y = blobs(150)
    ckpt = tmp_path / "ckpt"
    kwargs = dict(
        batch_size=batch_size, micro_batch_size=micro, optimizer="adam", seed=5, checkpoint_dir=ckpt
    )
    for step in stop_at:
        train(tiny_model(dropout=0.3), (x, y), epochs=epochs, max_steps=step, resume=True, **kwargs)
    return train(tiny_model(dropout=0.3), (x, y), epochs=epochs, resume=True, **kwargs)


@pytest.mark.parametrize(
    "stop_at",
    [(7,), (10,), (3, 5, 8), (10, 11), (1, 20, 29)],
    ids=["mid-epoch", "epoch-boundary", "three-times-in-one-epoch", "boundary-then-next", "many"],
)
def test_resume_at_any_step_is_bitwise_identical(tmp_path, stop_at):
    uninterrupted = _run(tmp_path / "a")
    resumed = _run(tmp_path / "b", stop_at=stop_at)
    assert resumed.resumed_from_step == stop_at[-1]
    assert resumed.params_sha256 == uninterrupted.params_sha256
    assert resumed.steps == uninterrupted.steps == 30
    assert resumed.final == uninterrupted.final


def test_resume_with_micro_batches_is_bitwise_identical(tmp_path):
    a = _run(tmp_path / "a", micro=5)
    b = _run(tmp_path / "b", stop_at=(4, 13), micro=5)
    assert a.params_sha256 == b.params_sha256


def test_resume_keeps_metrics_rows_of_the_finished_steps_only(tmp_path):
    x, y = blobs(100)
    kwargs = dict(batch_size=10, checkpoint_dir=tmp_path / "c", out_dir=tmp_path)
    train(tiny_model(), (x, y), epochs=2, max_steps=13, checkpoint_every=5, **kwargs)
    train(tiny_model(), (x, y), epochs=2, resume=True, **kwargs)
    steps = [int(r["step"]) for r in csv.DictReader((tmp_path / "metrics.csv").open())]
    assert steps == list(range(1, 21))


def test_checkpoint_from_another_model_is_refused(tmp_path):
    x, y = blobs(50)
    train(tiny_model(), (x, y), batch_size=10, epochs=1, checkpoint_dir=tmp_path)
    other = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
    with pytest.raises(BatchfitError, match=r"saved from a different model: '0.weight' has shape"):
        train(other, (x, y), batch_size=10, epochs=2, checkpoint_dir=tmp_path, resume=True)


def test_resume_with_another_batch_size_is_refused(tmp_path):
    x, y = blobs(50)
    train(tiny_model(), (x, y), batch_size=10, epochs=1, checkpoint_dir=tmp_path)
    with pytest.raises(
        BatchfitError, match=r"made with batch_size=10, not 5; resume with batch_size=10"
    ):
        train(tiny_model(), (x, y), batch_size=5, epochs=2, checkpoint_dir=tmp_path, resume=True)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    x, y = blobs(100)
    x[37] = float("nan")
    source = TensorSource(x, y, seed=3)
    bad_step = (source.order(0) == 37).nonzero().item() // 10 + 1
    with pytest.raises(
        NonFiniteLossError, match=rf"became nan at step {bad_step} \(epoch 1\)"
    ) as info:
        train(
            tiny_model(),
            source,
            batch_size=10,
            epochs=1,
            checkpoint_every=1,
            checkpoint_dir=tmp_path,
            seed=3,
        )
    assert info.value.step == bad_step
    saved = load_checkpoint(tmp_path)
    if bad_step > 1:
        assert saved["position"]["step"] < bad_step
        assert all(torch.isfinite(t).all() for t in saved["model"].values())
    else:
        assert saved is None


def test_empty_or_mismatched_data_is_refused_before_training(models_file):
    with pytest.raises(BatchfitError, match="empty"):
        train(
            tiny_model(),
            (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
            batch_size=1,
            epochs=1,
        )
    x, y = torch.randn(20, 7), torch.randint(0, 3, (20,))
    with pytest.raises(
        BatchfitError,
        match=r"each sample has shape \(7,\), but the model's first "
        r"layer expects 4 features",
    ):
        train(tiny_model(), (x, y), batch_size=4, epochs=1)
    with pytest.raises(BatchfitError, match=r"Target label 5 is outside the model's 3 outputs"):
        train(tiny_model(), (torch.randn(20, 4), torch.full((20,), 5)), batch_size=4, epochs=1)


def test_stream_without_length_needs_max_steps():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            x, y = blobs(40)
            yield from zip(x, y, strict=True)

    with pytest.raises(BatchfitError, match="stream of unknown length.*'max_steps'"):
        train(tiny_model(), Stream(), batch_size=4, epochs=1)
    r = train(tiny_model(), Stream(), batch_size=4, max_steps=25)
    assert r.steps == 25 and r.epochs_completed == 2  # 10 steps per pass over the stream


def test_a_stream_smaller_than_one_batch_trains_but_says_each_step_was_smaller(capsys):
    class Stream(torch.utils.data.IterableDataset):  # no length: the plan cannot check it
        def __iter__(self):
            x, y = blobs(40)
            yield from zip(x, y, strict=True)

    r = train(tiny_model(), Stream(), batch_size=64, max_steps=3, progress=True)
    assert r.steps == 3 and r.samples_seen == 3 * 40  # every step took the whole stream
    (warning,) = r.warnings  # said once, not once per pass
    assert warning == (
        "The training stream ended after 40 samples, fewer than 'batch_size' 64, so each step "
        "trained on 40; give batch_size=40 or less to train the batch you name."
    )
    assert f"warning: {warning}" in capsys.readouterr().err
    assert train(tiny_model(), Stream(), batch_size=8, max_steps=3).warnings == []


def test_parameters_hash_is_stable_and_sensitive():
    from batchfit.step import params_sha256

    a, b = tiny_model(), tiny_model()
    assert params_sha256(a) == params_sha256(b)
    with torch.no_grad():
        b[0].weight[0, 0] += 1e-7
    assert params_sha256(a) != params_sha256(b)


def test_eval_every_records_validation_during_epochs_and_on_eval_can_stop():
    x, y = blobs(100)
    xv, yv = blobs(50, seed=1)
    seen = []
    r = train(
        tiny_model(),
        (x, y),
        val_data=(xv, yv),
        batch_size=10,
        epochs=2,
        eval_every=4,
        on_eval=seen.append,
    )
    assert [e["step"] for e in r.evals] == [4, 8, 10, 12, 16, 20]
    assert [e["step"] for e in seen] == [4, 8, 10, 12, 16, 20]
    assert all("val_accuracy" in e and e["train_seconds"] > 0 for e in r.evals)
    assert r.evals[-1]["samples_seen"] == 200
    stopped = train(
        tiny_model(),
        (x, y),
        val_data=(xv, yv),
        batch_size=10,
        epochs=5,
        eval_every=3,
        on_eval=lambda e: e["step"] >= 6,
    )
    assert stopped.steps == 6 and stopped.final["val_loss"] == stopped.evals[-1]["val_loss"]


def test_resume_keeps_the_evaluations_made_before_the_stop(tmp_path):
    x, y = blobs(100)
    kwargs = dict(val_data=blobs(30, seed=1), batch_size=10, eval_every=4, checkpoint_dir=tmp_path)
    full = train(tiny_model(), (x, y), epochs=2, **kwargs)
    train(
        tiny_model(),
        (x, y),
        epochs=2,
        max_steps=9,
        checkpoint_dir=tmp_path / "b",
        **{k: v for k, v in kwargs.items() if k != "checkpoint_dir"},
    )
    resumed = train(
        tiny_model(),
        (x, y),
        epochs=2,
        resume=True,
        checkpoint_dir=tmp_path / "b",
        **{k: v for k, v in kwargs.items() if k != "checkpoint_dir"},
    )
    assert [e["step"] for e in resumed.evals] == [4, 8, 9, 10, 12, 16, 20]
    assert [e["val_loss"] for e in resumed.evals if e["step"] != 9] == [
        e["val_loss"] for e in full.evals
    ]


class _Samples(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_resume_with_a_torch_dataset_and_dropout_is_bitwise_identical(tmp_path):
    data = _Samples(*blobs(150))
    kwargs = dict(batch_size=16, epochs=2, seed=3)
    full = train(tiny_model(dropout=0.5), data, **kwargs)
    train(tiny_model(dropout=0.5), data, max_steps=7, checkpoint_dir=tmp_path, **kwargs)
    resumed = train(tiny_model(dropout=0.5), data, checkpoint_dir=tmp_path, resume=True, **kwargs)
    assert resumed.params_sha256 == full.params_sha256


class _NumpyNoise(nn.Module):
    """A model that draws from NumPy's and Python's global generators, as user code may."""

    def __init__(self):
        super().__init__()
        self.net = tiny_model()

    def forward(self, x):
        import random

        import numpy as np

        noise = float(np.random.normal()) + random.random()
        return self.net(x + 0.01 * noise)


def test_resume_restores_numpy_and_python_generators(tmp_path):
    x, y = blobs(100)
    kwargs = dict(batch_size=10, epochs=2, seed=4)
    full = train(_NumpyNoise(), (x, y), **kwargs)
    train(_NumpyNoise(), (x, y), max_steps=13, checkpoint_dir=tmp_path, **kwargs)
    resumed = train(_NumpyNoise(), (x, y), checkpoint_dir=tmp_path, resume=True, **kwargs)
    assert resumed.params_sha256 == full.params_sha256


@pytest.mark.parametrize(
    ("first", "then", "match"),
    [
        ({"lr": 0.001}, {"lr": 0.5}, r"made with lr=0.001, not 0.5; resume with lr=0.001"),
        ({"drop_last": True}, {"drop_last": False}, r"resume with drop_last=True,"),
        ({"drop_last": False}, {"drop_last": True}, r"resume with drop_last=False,"),
        ({"weight_decay": None}, {"weight_decay": 0.1}, r"resume with weight_decay=None,"),
    ],
)
def test_resume_refuses_changed_settings_and_names_the_option_to_use(tmp_path, first, then, match):
    x, y = blobs(95)
    train(tiny_model(), (x, y), batch_size=10, max_steps=3, checkpoint_dir=tmp_path, **first)
    with pytest.raises(BatchfitError, match=match):
        train(
            tiny_model(),
            (x, y),
            batch_size=10,
            epochs=1,
            checkpoint_dir=tmp_path,
            resume=True,
            **then,
        )


def test_resume_on_other_data_names_the_data_options(tmp_path):
    x, y = blobs(95)
    train(tiny_model(), (x, y), batch_size=10, max_steps=3, checkpoint_dir=tmp_path)
    with pytest.raises(BatchfitError, match=r"the same training data \(95 samples then\)"):
        train(
            tiny_model(),
            (x[:90], y[:90]),
            batch_size=10,
            epochs=1,
            checkpoint_dir=tmp_path,
            resume=True,
        )


class _Overflowing(nn.Module):
    """Finite loss, infinite gradient: d/dz sqrt(z) at z = 0."""

    def __init__(self):
        super().__init__()
        self.net = tiny_model()
        self.z = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.net(x) + 0 * torch.sqrt(self.z)


def test_non_finite_weights_with_a_finite_loss_are_never_checkpointed(tmp_path):
    x, y = blobs(50)
    with pytest.raises(NonFiniteLossError, match=r"Parameter 'z' became NaN or infinite by step 1"):
        train(
            _Overflowing(),
            (x, y),
            batch_size=10,
            epochs=1,
            checkpoint_every=1,
            checkpoint_dir=tmp_path,
            optimizer="sgd",
            lr=0.1,
        )
    assert load_checkpoint(tmp_path) is None


def test_batch_norm_refuses_single_sample_micro_batches_up_front():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    x, y = blobs(101)
    with pytest.raises(BatchfitError, match=r"at every step"):
        train(model, (x, y), batch_size=1, epochs=1)
    with pytest.raises(
        BatchfitError, match=r"the last batch of each epoch \(101 % 10 = 1 sample\)"
    ):
        train(model, (x, y), batch_size=10, epochs=1)
    assert train(model, (x, y), batch_size=10, epochs=1, drop_last=True).steps == 10


def test_plan_and_train_accept_numpy_integers():
    import numpy as np

    from batchfit import plan

    assert plan(np.int64(24000), np.int32(32)).steps_per_epoch == 750
    x, y = blobs(40)
    assert train(tiny_model(), (x, y), batch_size=np.int64(8), epochs=np.int64(1)).steps == 5


def test_a_model_with_a_scalar_parameter_trains_and_is_hashed():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.scale = tiny_model(), nn.Parameter(torch.tensor(1.0))

        def forward(self, x):
            return self.net(x) * self.scale

    x, y = blobs(40)
    result = train(Scaled(), (x, y), batch_size=8, epochs=1)
    assert len(result.params_sha256) == 64


def test_a_bad_label_under_a_sequence_output_names_the_class_axis():
    from batchfit.losses import cross_entropy

    output = torch.zeros(2, 3, 7)  # (N, C, d): 3 classes, 7 positions
    with pytest.raises(BatchfitError, match=r"Target label 5 is outside the model's 3 outputs"):
        cross_entropy(output, torch.full((2, 7), 5))


@pytest.mark.parametrize("name", ["mse", "bce"])
def test_mse_and_bce_take_the_target_in_the_models_dtype(name):
    """An integer target against a float32 output fails in backward on CUDA, and a float32 target
    against a float64 model used to give a float32 bce loss."""
    from batchfit.losses import bce, mse

    output = torch.randn(6, 1, dtype=torch.float64, requires_grad=True)
    loss = {"mse": mse, "bce": bce}[name](output, torch.tensor([0, 1, 1, 0, 1, 0]))
    loss.backward()
    assert loss.dtype == torch.float64 and output.grad.dtype == torch.float64


def test_a_config_trains_the_same_run_as_keyword_options_and_keywords_override_it():
    x, y = blobs(60)
    keywords = train(tiny_model(), (x, y), batch_size=16, epochs=2, optimizer="sgd", lr=0.1)
    config = TrainConfig.build(batch_size=16, epochs=2, optimizer="sgd", lr=0.1)
    assert train(tiny_model(), (x, y), config=config).params_sha256 == keywords.params_sha256
    longer = train(tiny_model(), (x, y), config=config, epochs=3)
    assert (longer.steps, longer.epochs_completed, longer.optimizer) == (12, 3, "sgd")


def test_an_unknown_option_is_a_type_error_that_suggests_the_one_meant():
    x, y = blobs(20)
    with pytest.raises(TypeError, match=r"train\(\) got an unknown option 'epoch'; did you mean"):
        train(tiny_model(), (x, y), batch_size=4, epoch=1)

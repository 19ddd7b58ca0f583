"""``adaptive``: the batch size follows the gradient noise scale measured while training.

Real training runs on the least-squares example (whose noise scale is known and grows as the loss
falls) and on small blobs; real checkpoints and resumes; the command line in a subprocess.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

from batchfit import BatchfitError, train
from batchfit.examples.linreg import analytic_noise_scale, load, make_model, true_weights
from batchfit.probe.noise import noise_scale
from helpers import blobs, run_cli


def linreg():
    d = load()
    return (d.x_train, d.y_train), (d.x_val, d.y_val)


def rows(out_dir):
    with open(out_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("micro", [None, 16], ids=["halves", "micro-batches"])
def test_noise_scale_measured_in_the_loop_agrees_with_the_probe_and_the_analytic_value(micro):
    data, _ = linreg()
    model = make_model()
    # B pinned by min = max; one step in 4 measured, averaged over the last ~10 readings. The
    # weights barely move (a tiny lr), so the noise scale the loop averaged is the final one.
    r = train(
        model,
        data,
        batch_size=64,
        micro_batch_size=micro,
        max_steps=200,
        optimizer="sgd",
        lr=1e-5,
        adaptive=True,
        adapt_every=20,
        min_batch_size=64,
        max_batch_size=64,
        seed=0,
    )
    assert r.adaptive["changes"] == [] and r.adaptive["batch_size"] == 64
    measured = r.adaptive["b_noise"]
    probe = noise_scale(model, data, "mse", micro_batch_size=8, batches=100, accumulation=8)
    distance_sq = float((model.weight.detach().flatten() - true_weights()).square().sum())
    analytic = analytic_noise_scale(distance_sq)
    # ~10 readings against 100 batches of the probe: a loose factor
    assert 1 / 1.5 < measured / probe.b_simple < 1.5, (measured, probe.b_simple)
    assert 1 / 1.5 < measured / analytic < 1.5, (measured, analytic)


def test_batch_size_grows_as_the_noise_scale_grows_and_lr_follows_the_linear_rule(tmp_path):
    data, val = linreg()
    r = train(
        make_model(),
        data,
        val_data=val,
        batch_size=8,
        epochs=1,
        optimizer="sgd",
        lr=0.01,
        adaptive=True,
        adapt_every=25,
        out_dir=tmp_path,
    )
    changes = r.adaptive["changes"]
    assert changes and all(c["to"] > c["from"] for c in changes)  # the noise scale only grows
    assert r.adaptive["batch_size"] >= 64
    table = rows(tmp_path)
    for row in table[:-1]:  # the epoch's last batch may be short
        size, lr = int(row["batch_size"]), float(row["lr"])
        assert lr == pytest.approx(0.01 * size / 8, rel=1e-5)  # sgd: linear in B
    assert [int(r["batch_size"]) for r in table[:25]] == [8] * 25
    assert int(table[25]["batch_size"]) == 16  # the first decision, at step 25


def test_adam_rescales_lr_by_the_square_root(tmp_path):
    data, _ = linreg()
    r = train(
        make_model(),
        data,
        batch_size=8,
        max_steps=120,
        optimizer="adam",
        lr=1e-3,
        adaptive=True,
        adapt_every=30,
        out_dir=tmp_path,
    )
    assert r.adaptive["changes"]
    for row in rows(tmp_path):
        assert float(row["lr"]) == pytest.approx(
            1e-3 * math.sqrt(int(row["batch_size"]) / 8), rel=1e-5
        )


def test_batch_size_stays_within_min_and_max(tmp_path):
    data, _ = linreg()
    r = train(
        make_model(),
        data,
        batch_size=8,
        max_steps=200,
        optimizer="sgd",
        lr=0.01,
        adaptive=True,
        adapt_every=10,
        min_batch_size=4,
        max_batch_size=24,
        out_dir=tmp_path,
    )
    sizes = [int(row["batch_size"]) for row in rows(tmp_path)]
    assert max(sizes) == 24 and min(sizes) >= 4  # 8 -> 16 -> 24, the cap; never beyond
    assert r.adaptive["batch_size"] == 24 and r.adaptive["range"] == [4, 24]


def test_shrinks_when_the_noise_scale_is_below_the_batch_size(tmp_path):
    # Blobs far apart: a clean signal, a noise scale of a few samples, so a big start halves.
    x, y = blobs(600)
    r = train(
        nn.Linear(4, 3),
        (x * 3, y),
        batch_size=128,
        max_steps=60,
        optimizer="sgd",
        lr=0.05,
        adaptive=True,
        adapt_every=10,
        min_batch_size=16,
    )
    first = r.adaptive["changes"][0]
    assert (first["step"], first["from"], first["to"]) == (10, 128, 64)
    assert "below half the batch size 128: halving it" in first["reason"]
    assert min(c["to"] for c in r.adaptive["changes"]) >= 16


def test_by_default_the_batch_never_goes_below_where_it_started():
    x, y = blobs(600)  # the run above, without a floor: the noise scale asks for less than 128
    r = train(
        nn.Linear(4, 3),
        (x * 3, y),
        batch_size=128,
        max_steps=60,
        optimizer="sgd",
        lr=0.05,
        adaptive=True,
        adapt_every=10,
    )
    assert r.adaptive["range"][0] == 128
    assert all(c["to"] >= 128 for c in r.adaptive["changes"])


def test_accounting_stays_exact_when_the_batch_changes_mid_epoch(tmp_path):
    x, y = blobs(301)  # no batch size divides 301
    r = train(
        nn.Linear(4, 3),
        (x, y),
        batch_size=4,
        epochs=3,
        optimizer="sgd",
        lr=0.01,
        adaptive=True,
        adapt_every=7,
        out_dir=tmp_path,
    )
    table = rows(tmp_path)
    assert len({int(row["batch_size"]) for row in table}) > 2  # it did change, mid-epoch
    assert r.samples_seen == sum(int(row["batch_size"]) for row in table) == 3 * 301
    assert r.steps == len(table) == int(table[-1]["step"])
    for epoch in (1, 2, 3):
        assert sum(int(row["batch_size"]) for row in table if row["epoch"] == str(epoch)) == 301
    assert r.epochs_completed == 3 and [h["step"] for h in r.history][-1] == r.steps


def test_a_micro_batch_above_the_start_lets_the_batch_grow_in_one_pass(tmp_path):
    data, _ = linreg()
    kwargs = dict(batch_size=8, max_steps=150, optimizer="sgd", lr=0.01, adaptive=True)
    grown = train(make_model(), data, micro_batch_size=64, adapt_every=25, **kwargs)
    split = train(make_model(), data, adapt_every=25, **kwargs)  # micro-batch 8, the start
    assert grown.adaptive["batch_size"] >= 64 and grown.micro_batch_size == 64
    # one pass per step up to 64 (two on a measured step), against B/8 passes when split
    assert grown.iterations <= 150 * 2 < split.iterations


def test_max_steps_still_counts_steps():
    x, y = blobs(301)
    r = train(
        nn.Linear(4, 3),
        (x, y),
        batch_size=4,
        epochs=50,
        max_steps=33,
        optimizer="sgd",
        lr=0.01,
        adaptive=True,
        adapt_every=5,
    )
    assert r.steps == 33 and r.adaptive["changes"]


def _dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def _adaptive_run(tmp_path, stop_at=(), micro=None):
    x, y = blobs(150)
    kwargs = dict(
        batch_size=8,
        micro_batch_size=micro,
        epochs=4,
        optimizer="adam",
        seed=5,
        adaptive=True,
        adapt_every=6,
        checkpoint_dir=tmp_path / "ckpt",
        out_dir=tmp_path / "out",
    )
    for step in stop_at:
        train(_dropout_model(), (x, y), max_steps=step, resume=True, **kwargs)
    return train(_dropout_model(), (x, y), resume=True, **kwargs)


@pytest.mark.parametrize(
    ("stop_at", "micro"),
    [((5,), None), ((12,), None), ((6, 13, 30), 4)],
    ids=["between-decisions", "at-a-decision", "three-stops-micro-batches"],
)
def test_resume_is_bitwise_identical_to_an_uninterrupted_adaptive_run(tmp_path, stop_at, micro):
    whole = _adaptive_run(tmp_path / "a", micro=micro)
    resumed = _adaptive_run(tmp_path / "b", stop_at, micro=micro)
    assert whole.adaptive["changes"]  # the batch size did change
    assert resumed.resumed_from_step == stop_at[-1]
    assert resumed.params_sha256 == whole.params_sha256
    assert resumed.steps == whole.steps and resumed.samples_seen == whole.samples_seen == 600
    assert resumed.adaptive == whole.adaptive
    assert rows(tmp_path / "b" / "out") == [
        {**row, "samples_per_s": r2["samples_per_s"]}
        for row, r2 in zip(rows(tmp_path / "a" / "out"), rows(tmp_path / "b" / "out"), strict=True)
    ]


def test_the_default_is_off_and_unchanged():
    x, y = blobs(64)
    r = train(nn.Linear(4, 3), (x, y), batch_size=8, epochs=1)
    assert r.adaptive is None and r.steps == 8


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (dict(adaptive=True, min_batch_size=64, max_batch_size=32), "is above"),
        # no min_batch_size given: the start is named, not a min_batch_size the user never gave
        (dict(adaptive=True, max_batch_size=4), r"^The starting batch_size=8 is above max_batch"),
        (dict(adaptive=True, min_batch_size=16), "outside the adaptive range"),
        (dict(adaptive=True, min_batch_size=2, max_batch_size=4), "outside the adaptive range"),
        (dict(adaptive=True, min_batch_size=1), ">= 2"),
        (dict(min_batch_size=4), "add adaptive=True"),
        (dict(adaptive=True, steps_per_epoch=5), "steps_per_epoch"),
    ],
)
def test_bad_adaptive_settings_are_refused_before_training(options, words):
    x, y = blobs(64)
    with pytest.raises(BatchfitError, match=words) as info:
        train(nn.Linear(4, 3), (x, y), batch_size=8, epochs=1, **options)
    assert "\n" not in str(info.value)


def test_cli_adaptive_logs_each_change_and_records_batch_size_and_lr(tmp_path):
    out = tmp_path / "run"
    done = run_cli(
        [
            "train",
            "--example",
            "linreg",
            "--batch-size",
            "8",
            "--max-steps",
            "60",
            "--optimizer",
            "sgd",
            "--lr",
            "0.01",
            "--adaptive",
            "--adapt-every",
            "20",
            "--out",
            str(out),
        ]
    )
    assert done.returncode == 0, done.stderr
    assert "step 20: batch size 8 -> 16, lr 0.02 (the noise scale" in done.stderr + done.stdout
    table = rows(out)
    assert {(int(r["batch_size"]), float(r["lr"])) for r in table[20:40]} == {(16, 0.02)}
    assert "batch size" in done.stdout and "8 -> " in done.stdout  # the summary says where it went


def test_cli_refuses_min_above_max_in_one_line():
    done = run_cli(
        [
            "train",
            "--example",
            "linreg",
            "--batch-size",
            "8",
            "--max-steps",
            "5",
            "--adaptive",
            "--min-batch-size",
            "64",
            "--max-batch-size",
            "32",
        ]
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--min-batch-size 64 is above --max-batch-size 32" in lines[0]


class _Stream(torch.utils.data.IterableDataset):
    """1,000 samples of unknown length: the source is a stream."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(1000):
            x = torch.randn(4, generator=g)
            yield x, (x.sum() > 0).long()


def test_on_a_stream_the_batch_grows_and_every_sample_is_counted(tmp_path):
    r = train(
        nn.Linear(4, 2),
        _Stream(),
        batch_size=4,
        max_steps=100,
        optimizer="sgd",
        lr=0.01,
        adaptive=True,
        adapt_every=10,
        min_batch_size=2,
        out_dir=tmp_path,
    )
    table = rows(tmp_path)
    assert r.adaptive["changes"] and r.adaptive["range"] == [2, 4 * 64]  # no size: 64x the start
    assert r.steps == len(table) == 100
    assert r.samples_seen == sum(int(row["batch_size"]) for row in table)


def test_resuming_a_fixed_run_with_adaptive_is_refused(tmp_path):
    x, y = blobs(64)
    kwargs = dict(batch_size=8, epochs=2, checkpoint_dir=tmp_path / "ckpt")
    train(nn.Linear(4, 3), (x, y), max_steps=3, **kwargs)
    with pytest.raises(BatchfitError, match="adaptive=False") as info:
        train(nn.Linear(4, 3), (x, y), resume=True, adaptive=True, **kwargs)
    assert "\n" not in str(info.value)

"""The optimizer as a name, a ``torch.optim`` class or a factory (``lambda params: SGD(params,
lr=..., momentum=...)``), for train, tune and sweep: a factory's family sets the lr-scaling rule,
its lr is the user's (tune then picks the batch size only), its momentum and weight decay are
kept; one batchfit cannot build the same way is refused in one line."""

from __future__ import annotations

import pytest
import torch

import batchfit
from batchfit.errors import BatchfitError
from helpers import blobs

DATA = blobs(300)


def _train(**options):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return batchfit.train(model, DATA, batch_size=32, max_steps=6, seed=0, **options)


def test_train_sgd_factory_equals_the_same_sgd_by_name():
    made = _train(optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.8))
    named = _train(optimizer="sgd", lr=0.05, momentum=0.8)
    assert (made.optimizer, made.lr) == ("sgd", 0.05)
    assert made.params_sha256 == named.params_sha256
    assert made.params_sha256 != _train(optimizer="sgd", lr=0.05).params_sha256  # momentum kept


def test_train_adamw_factory_keeps_weight_decay_and_class_form_works():
    made = _train(optimizer=lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.3))
    named = _train(optimizer="adamw", lr=0.01, weight_decay=0.3)
    by_class = _train(optimizer=torch.optim.AdamW, lr=0.01, weight_decay=0.3)
    assert made.optimizer == by_class.optimizer == "adamw"
    assert made.params_sha256 == named.params_sha256 == by_class.params_sha256
    assert made.params_sha256 != _train(optimizer="adamw", lr=0.01).params_sha256


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda p: torch.optim.RMSprop(p, lr=0.01), "returned RMSprop.*'sgd', 'adam', 'adamw'"),
        (lambda p: torch.optim.Adam(p, betas=(0.8, 0.9)), "sets betas=.*would not keep"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), "nesterov=True"),
        (lambda: None, "raised TypeError.*takes a name, a class, or a callable"),
    ],
)
def test_factory_batchfit_cannot_build_is_one_line_error(factory, message):
    for run in (_train, lambda **o: batchfit.tune(torch.nn.Linear(4, 3), DATA, **o)):
        with pytest.raises(BatchfitError, match=message) as caught:
            run(optimizer=factory)
        assert "\n" not in str(caught.value)


def test_factory_and_lr_both_given_is_refused():
    with pytest.raises(BatchfitError, match="give the lr in one place"):
        _train(optimizer=lambda p: torch.optim.SGD(p, lr=0.05), lr=0.1)


@pytest.mark.parametrize(
    ("optimizer", "family", "rule"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8), "sgd", "linear rule from 0.05 at 32"),
        (torch.optim.AdamW, "adamw", None),
    ],
)
def test_tune_takes_factory_and_class(optimizer, family, rule):
    torch.manual_seed(0)
    result = batchfit.tune(
        torch.nn.Linear(4, 3), DATA, optimizer=optimizer, time_budget=4, max_batch_size=64
    )
    assert result.recommended.optimizer == family
    if rule is not None:  # the factory's lr is the user's: no range test, B only
        assert rule in result.recommended.lr_rule and result.lr_range is None


def test_sweep_takes_a_factory():
    def run(**options):
        torch.manual_seed(0)
        result = batchfit.sweep(
            torch.nn.Linear(4, 3),
            DATA,
            val_data=blobs(60, seed=1),
            batch_sizes=[16, 32],
            steps=3,
            sharpness_iterations=2,
            **options,
        )
        return [(s["batch_size"], s["params_sha256"]) for s in result.sizes], result.settings

    made, settings = run(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8))
    named, _ = run(optimizer="sgd", lr=0.05, momentum=0.8)
    assert made == named
    assert (settings["optimizer"], settings["lr"], settings["momentum"]) == ("sgd", 0.05, 0.8)

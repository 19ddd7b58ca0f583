"""The built-in examples: generated locally, cached, and repaired when the cache is damaged."""

from __future__ import annotations

import numpy as np

from batchfit.examples import EXAMPLES
from batchfit.examples.mnist1d import CACHE_NAME


def test_mnist1d_is_4000_train_and_1000_validation_samples_in_10_classes():
    data = EXAMPLES["mnist1d"].load()
    assert data.x_train.shape == (4000, 40) and data.x_val.shape == (1000, 40)
    assert set(data.y_train.tolist()) == set(range(10))
    assert EXAMPLES["mnist1d"].make_model()(data.x_train[:3]).shape == (3, 10)


def test_a_damaged_cache_is_regenerated_and_repaired(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHFIT_CACHE", str(tmp_path))
    (tmp_path / CACHE_NAME).write_bytes(b"half a file")
    data = EXAMPLES["mnist1d"].load()
    assert data.x_train.shape == (4000, 40)
    with np.load(tmp_path / CACHE_NAME) as repaired:
        assert np.array_equal(repaired["y_val"], data.y_val.numpy())


def test_an_unwritable_cache_folder_costs_time_not_the_run(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("BATCHFIT_CACHE", str(blocker / "cache"))
    assert EXAMPLES["mnist1d"].load().x_val.shape == (1000, 40)
    assert "cannot cache MNIST-1D" in capsys.readouterr().err


def test_the_catalog_describes_each_example_as_its_module_builds_it():
    """The catalog (read by --help without torch) says what the example's own constants make."""
    from batchfit.examples import catalog, example
    from batchfit.examples.linreg import DIM, N_TRAIN, N_VAL

    assert sorted(catalog.DESCRIPTIONS) == sorted(catalog.MODULES)
    assert example("linreg").description == (
        f"least squares, {DIM} Gaussian inputs, {N_TRAIN} train / {N_VAL} validation"
    )
    data = example("mnist1d").load()
    assert f"{len(data.y_train):,} train / {len(data.y_val):,} validation" in (
        example("mnist1d").description
    )

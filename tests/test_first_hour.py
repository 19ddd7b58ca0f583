"""A new user's first hour with their own model: the trained weights are kept and load back, the
README's quick start runs as written."""

from __future__ import annotations

import json

import torch

from helpers import blobs, run_cli


def test_cli_train_saves_the_final_weights_in_out_loadable_weights_only(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["train", "--batch-size", "64", "--epochs", "1", "--out", str(out), "--json"])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    path = out / "model.pt"
    assert result["weights_path"] == str(path) and result["checkpoint_path"] is None
    state = torch.load(path, weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    proc = run_cli(["train", "--batch-size", "64", "--epochs", "1", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert f"weights: {path} " in proc.stdout


def test_train_saves_the_returned_models_weights_in_out_dir(tmp_path):
    import batchfit

    torch.manual_seed(0)
    x, y = blobs(120)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    result = batchfit.train(model, (x, y), batch_size=32, epochs=2, out_dir=tmp_path, seed=0)
    assert result.weights_path == str(tmp_path / "model.pt")
    saved = torch.load(result.weights_path, weights_only=True)
    expected = model.state_dict()
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor.cpu()), name
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    fresh.load_state_dict(saved)
    assert torch.equal(fresh(x), model(x))


def test_train_without_out_dir_writes_no_weights(tmp_path, monkeypatch):
    import batchfit

    monkeypatch.chdir(tmp_path)
    x, y = blobs(64)
    result = batchfit.train(torch.nn.Linear(4, 3), (x, y), batch_size=32, epochs=1)
    assert result.weights_path is None and not list(tmp_path.iterdir())

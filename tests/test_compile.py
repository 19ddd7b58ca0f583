"""``compile=True`` (``--compile``): the model's forward compiled once with dynamic shapes and
warmed up before anything is timed, in train and in tune; a probe over many batch sizes
recompiles nothing (counted by ``torch._dynamo``), the loop trains the compiled forward, and
weights and checkpoints are the user's module's own, loadable uncompiled."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from batchfit import train, tune
from batchfit.compiling import compiled_forward, graphs_compiled, unwrapped, warm_up
from batchfit.orchestrate.tune import COMPILED_NO_CHILD
from helpers import blobs

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Module:
    """One architecture for every test here: inductor's cache then compiles it once per run."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))


def test_a_warmed_up_forward_compiles_nothing_more_for_any_batch_size_or_split():
    model, (x, y) = mlp(), blobs(300)
    loss_fn = nn.functional.cross_entropy
    with compiled_forward(model):
        done = warm_up(model, loss_fn, x, y)
        assert done.graphs <= 4 and done.seconds > 0  # none where an earlier test compiled it
        before = graphs_compiled()
        for n in (1, 2, 3, 17, 64, 255, 300):
            loss_fn(model(x[:n]), y[:n]).backward()  # a slice is a view: still no new graph
            for part in x[:n].split(7):
                model(part)
        model.eval()
        with torch.no_grad():
            model(x[:5]), model(x[:1])
        assert graphs_compiled() == before
    assert "forward" not in vars(model)  # the module's own forward is back


def test_warm_up_leaves_the_weights_gradients_mode_and_random_state_as_they_were():
    model, (x, y) = mlp(), blobs(8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with compiled_forward(model):
        warm_up(model, nn.functional.cross_entropy, x, y)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_train_compiled_matches_eager_and_saves_the_modules_own_weights(tmp_path):
    data, val = blobs(300), blobs(60, seed=1)
    eager = train(mlp(), data, batch_size=64, micro_batch_size=32, epochs=2, val_data=val)
    model = mlp()
    done = train(model, data, batch_size=64, micro_batch_size=32, epochs=2, val_data=val,
                 compile=True, out_dir=tmp_path / "out", checkpoint_dir=tmp_path)  # fmt: skip
    assert eager.compile is None and done.compile is not None and done.compile["graphs"] <= 4
    assert done.final["val_loss"] == pytest.approx(eager.final["val_loss"], rel=1e-4)
    assert "forward" not in vars(model)
    saved = torch.load(done.weights_path, weights_only=True)
    fresh = mlp()
    fresh.load_state_dict(saved)  # no _orig_mod. prefix: loads uncompiled
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    checkpoint = torch.load(done.checkpoint_path, weights_only=False)
    assert set(checkpoint["model"]) == set(mlp().state_dict())


def test_a_model_compiled_by_the_user_trains_its_own_module():
    model = mlp()
    done = train(torch.compile(model), blobs(200), batch_size=50, max_steps=4)
    assert done.compile is not None and unwrapped(torch.compile(model)) is model
    assert not torch.equal(model.state_dict()["0.weight"], mlp().state_dict()["0.weight"])


def test_tune_compiled_times_many_batch_sizes_without_a_recompilation(tmp_path):
    """A compiled model's OpenMP threads hang in a forked child, so on the CPU its memory trials
    stay in this process and the report says the child check was not run."""
    result = tune(mlp(), blobs(2048), compile=True, time_budget=8, seed=0, out_dir=tmp_path)
    assert result.memory.confirmation == COMPILED_NO_CHILD
    record = json.loads((tmp_path / "report.json").read_text())["compile"]
    assert record == result.compile and record["graphs"] <= 4
    assert record["recompiled_while_measuring"] == 0
    assert len({p.batch_size for p in result.throughput.points}) >= 6
    assert "--compile" in (tmp_path / "report.md").read_text()
    assert any(d.startswith("Compiled with torch.compile") for d in result.decision)
    # compiling is not measuring: the budget counts from after it, and says so
    assert any("so the time budget counts from after it" in d for d in result.decision)


def test_sweep_on_the_command_line_takes_the_precision_and_compile(tmp_path, capsys, monkeypatch):
    from batchfit.cli import main
    from batchfit.orchestrate import sweep_runs

    asked = []  # what each run's train was asked; it then trains eager (compiling is above)
    trained = sweep_runs.train
    monkeypatch.setattr(sweep_runs, "train", lambda *a, **k: asked.append(k["compile"])
                        or trained(*a, **{**k, "compile": False}))  # fmt: skip
    code = main(["sweep", "--example", "linreg", "--batch-sizes", "16,64", "--steps", "6",
                 "--eval-points", "2", "--precision", "bf16-mixed", "--compile", "--quiet",
                 "--json", "--out", str(tmp_path)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["settings"]["precision"] == "bf16-mixed"
    assert [s["steps"] for s in report["sizes"]] == [6, 6] and asked == [True, True]

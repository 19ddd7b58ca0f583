"""A new user's first hour with their own model: the trained weights are kept and load back, the
README's quick start runs as written."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import blobs, run_cli, subprocess_env


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


class _Records(torch.utils.data.Dataset):
    """Samples as dicts, as many users' datasets give them: only a custom collate makes pairs."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.x[i], "label": self.y[i]}


def _to_pair(items: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([i["features"] for i in items]), torch.stack([i["label"] for i in items])


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def test_train_reads_a_dataloaders_dataset_and_collate_fn_as_the_same_run_as_tensors():
    import batchfit

    x, y = blobs(200)
    loader = torch.utils.data.DataLoader(_Records(x, y), batch_size=7, collate_fn=_to_pair)
    from_loader = batchfit.train(_mlp(), loader, batch_size=32, epochs=2, seed=3)
    from_tensors = batchfit.train(_mlp(), (x, y), batch_size=32, epochs=2, seed=3)
    assert from_loader.steps == from_tensors.steps == 14
    assert from_loader.params_sha256 == from_tensors.params_sha256
    plain = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), shuffle=True)
    assert batchfit.train(_mlp(), plain, batch_size=32, epochs=2, seed=3).params_sha256 == (
        from_tensors.params_sha256
    )


def test_tune_accepts_a_dataloader_over_a_tensor_dataset_with_a_custom_collate():
    import batchfit

    x, y = blobs(600)
    loader = torch.utils.data.DataLoader(_Records(x, y), batch_size=16, collate_fn=_to_pair)
    result = batchfit.tune(_mlp(), loader, lr=1e-2, time_budget=10, seed=0)
    assert 1 <= result.recommended.batch_size <= 600


def test_a_dataloader_with_a_sampler_batchfit_cannot_honour_is_refused_in_one_line():
    import batchfit

    x, y = blobs(100)
    weights = torch.ones(100)
    sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=50)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), sampler=sampler)
    with pytest.raises(batchfit.BatchfitError, match="WeightedRandomSampler") as info:
        batchfit.train(_mlp(), loader, batch_size=32, epochs=1)
    assert "\n" not in str(info.value) and "without a custom sampler" in str(info.value)


def test_tune_report_gives_one_complete_train_command_that_runs(
    tmp_path, models_file, blobs_parquet
):
    import shlex

    out = tmp_path / "tune"
    argv = ["tune", "--model", f"{models_file}:mlp", "--data", str(blobs_parquet), "--target"]
    argv += ["y", "--lr", "1e-3", "--time-budget", "12", "--quiet", "--out", str(out)]
    proc = run_cli(argv, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    markdown = (out / "report.md").read_text()
    reproduce = markdown.split("## Reproduce", 1)[1]
    (command,) = [line for line in reproduce.splitlines() if line.startswith("batchfit train ")]
    for part in (f"--model {models_file}:mlp", f"--data {blobs_parquet}", "--target y"):
        assert part in command
    assert "--epochs 10" in command and f"train with it: {command}" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert f"--batch-size {report['recommended']['batch_size']} " in command
    proc = run_cli([*shlex.split(command)[1:], "--out", str(tmp_path / "run")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "model.pt").exists()


class _NoForward(torch.nn.Module):
    """Layers, a training step, but no forward: as many LightningModules are written."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)


class _ForwardNotImplemented(_NoForward):
    def forward(self, *args):
        raise NotImplementedError("subclass must implement forward")


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (_NoForward, "does not define one"),
        (_ForwardNotImplemented, "raised NotImplementedError"),
    ],
)
def test_tune_names_a_model_without_a_forward_in_one_line(make, why):
    import batchfit

    with pytest.raises(batchfit.BatchfitError) as info:
        batchfit.tune(make(), blobs(100), time_budget=5)
    message = str(info.value)
    assert "no usable forward()" in message and why in message and "\n" not in message
    assert "input" not in message.split("forward(x)")[0]  # not about the input's shape


def test_tune_names_a_lightning_module_without_a_forward():
    import batchfit

    lightning = pytest.importorskip("lightning.pytorch")

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 3)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

    with pytest.raises(batchfit.BatchfitError, match="no usable forward"):
        batchfit.tune(Module(), blobs(100), time_budget=5)


README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_block(marker: str) -> str:
    """The fenced code block right after ``<!-- marker -->`` in the README."""
    after = README.read_text().split(f"<!-- {marker} -->\n", 1)[1]
    assert after.startswith("```python\n"), marker
    return after[len("```python\n") :].split("\n```", 1)[0]


def test_readme_python_quick_start_runs_as_written(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_readme_block("quickstart-python"), "README quick start", "exec"), namespace)
    assert (tmp_path / "run" / "model.pt").exists() and (tmp_path / "tune-report").is_dir()
    assert namespace["trained"].weights_path == "run/model.pt"


def test_readme_model_factory_trains_from_a_table_and_its_weights_load(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "models.py").write_text(_readme_block("quickstart-models"))
    x, y = blobs(300)
    table = pa.table({f"f{i}": x[:, i].numpy() for i in range(4)} | {"y": y.numpy()})
    pq.write_table(table, tmp_path / "train.parquet")
    argv = ["train", "--model", "models.py:make_model", "--data", "train.parquet", "--target"]
    proc = run_cli([*argv, "y", "--batch-size", "64", "--epochs", "2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {}
    exec(compile(_readme_block("quickstart-load"), "README load", "exec"), namespace)
    sys.modules.pop("models", None)  # the README's models.py, not another test's
    model = namespace["model"]
    assert not model.training and model(x).shape == (300, 3)


def test_readme_starts_with_the_quick_start_and_names_no_internal_documents():
    text = README.read_text()
    assert text.index("## Quick start with your own model") < text.index("## A first tour")
    for internal in ("seed's", "DESIGN.md", "../shared"):
        assert internal not in text, internal


def test_train_takes_the_optimizer_as_a_torch_optim_class_as_its_name():
    import batchfit

    x, y = blobs(128)
    by_class = batchfit.train(_mlp(), (x, y), batch_size=32, epochs=1, optimizer=torch.optim.SGD)
    by_name = batchfit.train(_mlp(), (x, y), batch_size=32, epochs=1, optimizer="sgd")
    assert by_class.optimizer == "sgd" and by_class.params_sha256 == by_name.params_sha256


def test_tune_takes_the_optimizer_as_a_class_and_scales_its_lr_by_its_family(one_thread):
    import batchfit

    result = batchfit.tune(_mlp(), blobs(600), optimizer=torch.optim.SGD, lr=0.05, time_budget=5)
    assert result.recommended.optimizer == "sgd" and "linear" in result.recommended.lr_rule


def test_an_optimizer_class_batchfit_cannot_scale_is_refused_in_one_line():
    import batchfit

    with pytest.raises(batchfit.BatchfitError, match="RMSprop") as info:
        batchfit.train(_mlp(), blobs(64), batch_size=32, epochs=1, optimizer=torch.optim.RMSprop)
    assert "\n" not in str(info.value) and "torch.optim.SGD, Adam or AdamW" in str(info.value)


def test_a_progress_line_longer_than_the_console_stays_one_line_when_piped(tmp_path):
    """stderr piped to a file is 80 columns to rich: a long path must not split a message (a
    test, a log collector or grep reading it line by line would miss it)."""
    script = (
        "from batchfit.progress import console\n"
        "console().print('Training on ' + 'x' * 300 + ' done', markup=False)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    lines = [line for line in proc.stderr.splitlines() if line]
    assert lines == ["Training on " + "x" * 300 + " done"]


def test_the_budget_clock_starts_at_batchfits_first_line_not_when_bash_began(tmp_path, wall_clock):
    # bash runs the last command of `bash -c` in its own process, created before the sleep: a
    # budget counted from the process's creation was all spent on the sleep and refused
    python = shlex.quote(sys.executable)
    command = f"sleep 6 && {python} -m batchfit tune --example linreg --time-budget 4 --json"
    done = subprocess.run(
        ["bash", "-c", command + f" --out {shlex.quote(str(tmp_path))}"],
        capture_output=True, text=True, timeout=120, env=subprocess_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["memory"]["max_micro_batch_size"] >= 1 and report["throughput"]  # it measured
    for line in report["decision"]:  # start-up alone may have been long (a busy machine)
        took = re.match(r"Start-up \(importing torch, loading the data\) took ([\d.]+) s", line)
        assert took is None or float(took.group(1)) < 6, line

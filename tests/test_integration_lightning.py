"""batchfit inside PyTorch Lightning: the callback sets the measured batch size, accumulation and
learning rate where Lightning's own finders do, training then runs at them, the report is written
once, and importing the integration without Lightning fails in one line naming the extra."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from helpers import blobs, subprocess_env

pl = pytest.importorskip("lightning.pytorch")

from batchfit.errors import BatchfitError  # noqa: E402
from batchfit.integrations.lightning import BatchfitTuner  # noqa: E402

#: Batches above this size fail to allocate their memory (a real allocation failure), which
#: makes a memory ceiling of this size on any machine.
CEILING = 8


class Blobs(pl.LightningModule):
    def __init__(
        self, batch_size: int = 16, lr: float = 1e-3, ceiling: int | None = None, n: int = 384
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
        )
        self.seen: list[int] = []

    def forward(self, x):
        if self.hparams.ceiling is not None and x.shape[0] > self.hparams.ceiling:
            torch.empty(2**60, dtype=torch.uint8)  # more than any machine has
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        self.seen.append(len(batch[0]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(*blobs(self.hparams.n)), batch_size=self.hparams.batch_size)


def _fit(tmp_path, module, callback, epochs=1, **trainer_options):
    trainer = pl.Trainer(
        **trainer_options,
        max_epochs=epochs,
        callbacks=[callback],
        default_root_dir=tmp_path,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module)
    return trainer


def test_callback_sets_batch_size_and_lr_and_training_runs_at_that_size(tmp_path):
    torch.manual_seed(0)
    module = Blobs()
    callback = BatchfitTuner(time_budget=8, max_batch_size=128, seed=0)
    trainer = _fit(tmp_path, module, callback)
    rec = callback.result.recommended
    assert rec.optimizer == "sgd"  # the family from configure_optimizers
    assert module.hparams.batch_size == callback.micro_batch_size
    assert callback.micro_batch_size * callback.accumulation <= rec.batch_size
    assert trainer.accumulate_grad_batches == callback.accumulation
    assert module.hparams.lr == rec.lr
    assert trainer.optimizers[0].param_groups[0]["lr"] == rec.lr  # rebuilt with it
    full, last = divmod(384, callback.micro_batch_size)
    assert module.seen == [callback.micro_batch_size] * full + ([last] if last else [])
    assert module.trainer is trainer  # detached while tune ran its training_step, then back


def test_the_lr_is_measured_by_default_and_scaled_from_the_modules_with_measure_lr_false(
    tmp_path,
):
    torch.manual_seed(0)
    # a long planned run (over the Trainer's one epoch), so that tune measures in full
    measured = BatchfitTuner(time_budget=8, max_batch_size=128, seed=0, epochs=10_000)
    _fit(tmp_path / "a", Blobs(), measured)
    rule = measured.recommended.lr_rule
    # the module's lr is only tune's prior: measured, or (where a busy machine left the range
    # test and the race no time) named as the unmeasured prior, never scaled as the user's lr
    assert "at 16" not in rule or "from your prior 0.001 at 16" in rule, rule
    if "at 16" in rule:
        assert measured.result.provisional_reasons, rule  # and the answer says it is unmeasured
    torch.manual_seed(0)
    kept = BatchfitTuner(time_budget=8, max_batch_size=128, seed=0, measure_lr=False, epochs=10_000)
    _fit(tmp_path / "b", Blobs(), kept)
    rec = kept.recommended
    assert rec.lr_rule.startswith("sgd, linear rule from 0.001 at 16")
    assert rec.lr == pytest.approx(0.001 * rec.batch_size / 16)


def test_training_stays_within_the_memory_ceiling_with_exact_accumulation(tmp_path):
    torch.manual_seed(0)
    module = Blobs(ceiling=CEILING)
    callback = BatchfitTuner("cross_entropy", time_budget=8, max_batch_size=96, seed=0)
    trainer = _fit(tmp_path, module, callback)
    rec = callback.result.recommended
    assert rec.micro_batch_size <= CEILING
    k = callback.accumulation
    assert module.hparams.batch_size == callback.micro_batch_size <= CEILING
    assert trainer.accumulate_grad_batches == k
    if rec.batch_size > CEILING:
        assert k > 1
    assert callback.micro_batch_size * k == rec.batch_size  # exact: equal micro-batches
    assert set(module.seen[: len(module.seen) // k * k]) == {callback.micro_batch_size}
    assert trainer.global_step == -(-len(module.seen) // k)  # one step per k micro-batches


@pytest.fixture(scope="module")
def race_skipped(tmp_path_factory):
    """100 samples, too few for the race (by its time or its held-out share) on any machine; the
    module's SGD lr 3e-3 at batch size 16; the Trainer's max_time set."""
    torch.manual_seed(0)
    lines: list[str] = []
    # A long planned run (tune's horizon, given over the Trainer's one epoch), so that tuning
    # pays for itself and every phase runs.
    callback = BatchfitTuner(
        time_budget=6, max_batch_size=32, seed=0, log=lines.append, epochs=10_000
    )
    trainer = pl.Trainer(
        max_epochs=1,
        max_time={"minutes": 5},
        callbacks=[callback],
        default_root_dir=tmp_path_factory.mktemp("pl"),
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Blobs(lr=3e-3, n=100))
    return lines, callback.result


def test_the_modules_lr_is_the_prior_at_its_batch_size(race_skipped):
    """The noise probe warms up at the module's lr (3e-3 at 16, scaled linearly for SGD), not at
    batchfit's SGD default of 0.01 at 32; the range test still measures (not frozen)."""
    lines, result = race_skipped
    (line,) = [s for s in lines if s.startswith("noise: warm-up from the initial weights")]
    match = re.search(r"batch (\d+) = .* lr ([0-9.e+-]+)$", line)
    assert match, line
    assert float(match[2]) == pytest.approx(3e-3 * int(match[1]) / 16, rel=1e-2)
    assert "rule from 0.003 at 16" not in result.recommended.lr_rule


def test_the_callback_logs_whether_the_race_ran_and_every_skipped_phase(race_skipped):
    lines, result = race_skipped
    assert result.race is None and result.skipped
    assert any(s.startswith("batchfit: batch size") or "PROVISIONAL" in s for s in lines)
    (race,) = [s for s in lines if s.startswith("batchfit: race: ")]
    why = next(s for s in result.skipped if s.startswith("The race"))
    assert race.startswith("batchfit: race: not run") and race.endswith(why)
    for skipped in result.skipped:
        assert f"batchfit: skipped: {skipped}" in lines


def test_max_time_not_counting_the_tuning_is_logged(race_skipped):
    lines, _ = race_skipped
    (said,) = [s for s in lines if "max_time" in s]
    assert said.startswith("batchfit: ") and "does not count" in said and "s of tuning" in said


def test_without_max_time_nothing_is_said_of_it(tmp_path):
    lines: list[str] = []
    _fit(tmp_path, Blobs(n=100), BatchfitTuner(time_budget=4, seed=0, log=lines.append))
    assert not [s for s in lines if "max_time" in s]
    assert [s for s in lines if s.startswith("batchfit: race: ")]
    assert not [s for s in lines if "measured in float32" in s]  # the Trainer's own precision


def test_the_trainers_precision_is_the_one_tune_measures_in(tmp_path):
    """A bf16-mixed Trainer is measured in bf16-mixed (every probe under autocast; the ceiling
    bf16 activations allow is tested on the memory probe itself in test_tune_precision)."""
    lines: list[str] = []
    tuner = BatchfitTuner(time_budget=4, seed=0, log=lines.append)
    _fit(tmp_path, Blobs(n=100), tuner, precision="bf16-mixed")
    assert tuner.result is not None and tuner.result.precision == "bf16-mixed"
    assert tuner.result.memory.precision == "bf16-mixed"
    assert any("Measured in bf16-mixed (" in s for s in lines)
    assert not [s for s in lines if "tune measured in float32" in s]  # measured as trained


def _report(tmp_path, **answer):
    path = tmp_path / "report.json"
    rule = {"lr_rule": "given", "optimizer": "sgd"}
    path.write_text(json.dumps({"recommended": {**answer, **rule}}))
    return path


def test_a_batch_over_the_ceiling_trains_as_equal_micro_batches_with_the_exact_batch_update(
    tmp_path,
):
    """A batch of 24 where only 8 fit: Lightning trains 3 micro-batches of 8 per step, and the
    first update equals one plain SGD step on the whole batch of 24."""
    torch.manual_seed(0)
    module = Blobs(ceiling=CEILING)
    initial = {k: v.clone() for k, v in module.net.state_dict().items()}
    path = _report(tmp_path, batch_size=24, micro_batch_size=8, accumulation=3, lr=0.05)
    callback = BatchfitTuner(report=path)
    trainer = pl.Trainer(
        max_steps=1,
        callbacks=[callback],
        default_root_dir=tmp_path,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    trainer.fit(module)
    assert (callback.micro_batch_size, callback.accumulation) == (8, 3)
    assert trainer.accumulate_grad_batches == 3 and module.hparams.batch_size == 8
    assert module.seen == [8, 8, 8] and trainer.global_step == 1
    reference = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    reference.load_state_dict(initial)
    x, y = blobs(384)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    F.cross_entropy(reference(x[:24]), y[:24]).backward()
    optimizer.step()
    for name, value in reference.state_dict().items():
        assert torch.allclose(module.net.state_dict()[name], value, atol=1e-6), name
    assert not torch.equal(module.net.state_dict()["0.weight"], initial["0.weight"])
    assert callback.result is None  # nothing measured again


def test_a_report_that_is_not_a_tune_report_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "notes.json"
    bad.write_text('{"hello": 1}')
    for path, says in ((bad, "not a batchfit tune report"), (tmp_path / "gone.json", "no such")):
        with pytest.raises(BatchfitError, match=says) as caught:
            _fit(tmp_path, Blobs(), BatchfitTuner(report=path))
        assert "\n" not in str(caught.value)


def test_a_dataloader_passed_to_fit_is_refused_and_a_datamodules_takes_the_batch_size(tmp_path):
    loader = DataLoader(TensorDataset(*blobs(64)), batch_size=16)
    trainer = pl.Trainer(max_epochs=1, default_root_dir=tmp_path, callbacks=[BatchfitTuner()])
    with pytest.raises(BatchfitError, match="the train dataloader does not read it") as caught:
        trainer.fit(Blobs(), train_dataloaders=loader)  # its batch size is fixed already
    assert "\n" not in str(caught.value)
    # a datamodule that builds the loader from its batch_size: set there, trained at it
    answer = {"batch_size": 12, "micro_batch_size": 12, "accumulation": 1, "lr": 0.01}
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"recommended": answer | {"lr_rule": "-", "optimizer": "sgd"}}))

    class Data(pl.LightningDataModule):
        batch_size = 16

        def train_dataloader(self):
            return DataLoader(TensorDataset(*blobs(48)), batch_size=self.batch_size)

    module, data = Blobs(), Data()
    del module.hparams["batch_size"]  # the datamodule's batch_size is the one read
    trainer = pl.Trainer(
        max_epochs=1, default_root_dir=tmp_path, callbacks=[BatchfitTuner(report=report)],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert data.batch_size == 12 and module.seen == [12] * 4


def test_the_report_is_written_once_beside_the_logger_files(tmp_path):
    torch.manual_seed(0)
    callback = BatchfitTuner(time_budget=8, max_batch_size=64, seed=0)
    trainer = _fit(tmp_path, Blobs(), callback, epochs=2)
    reports = sorted(tmp_path.rglob("report.json"))
    assert reports == [tmp_path / "lightning_logs" / "version_0" / "batchfit" / "report.json"]
    assert trainer.log_dir == str(reports[0].parent.parent)
    first = reports[0].stat().st_mtime_ns
    trainer.fit(trainer.lightning_module)  # a second fit with the same callback: not again
    assert reports[0].stat().st_mtime_ns == first


BLOCKED = """
import sys
sys.modules["lightning"] = None
sys.modules["lightning.pytorch"] = None
import batchfit, batchfit.integrations
assert "lightning" not in [m for m in sys.modules if sys.modules[m] is not None]
import batchfit.integrations.lightning
"""


def test_without_lightning_the_import_fails_in_one_line_naming_the_extra():
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED], capture_output=True, text=True, env=subprocess_env()
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ")
    assert "pip install 'batchfit[lightning]'" in last


def test_importing_batchfit_and_its_integrations_never_imports_lightning():
    code = "import sys, batchfit, batchfit.integrations; print('lightning' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env()
    )
    assert done.stdout.strip() == "False", done.stderr

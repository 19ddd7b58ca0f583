"""Lightning's `Tuner.scale_batch_size` and batchfit's `BatchfitTuner` callback, on the same
`LightningModule`, then trained by the same `Trainer` for the same training time.

The module is the built-in example's 1-D CNN on its 4,000 MNIST-1D training samples (Adam at
lr 1e-3 and batch size 32 as the user's starting point). Three arms, each from the same initial
weights and trained for `--seconds` of training (Lightning's `max_time`; tuning not counted):

1. **as written**: batch size 32, lr 1e-3, no tuner;
2. **Lightning**: `Tuner(trainer).scale_batch_size(module, mode="power")` (double until out of
   memory or the data set size; lr unchanged);
3. **batchfit**: `Trainer(callbacks=[BatchfitTuner(time_budget=...)])` (batch size, accumulation
   and lr measured at fit start).

Each validates on the example's 1,000 validation samples every `--val-every-s` seconds of training
(not counted) and prints the training seconds to reach each target validation accuracy
(`--targets`, default 0.8 and 0.9) and the best validation accuracy and loss reached.
The arms run one after another in this process, so run it on a quiet machine.

    python benchmarks/lightning_side_by_side.py [--seconds 40] [--targets 0.8 0.9]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner
except ImportError:
    sys.exit("lightning is not installed: pip install -e '.[lightning]'")

from batchfit.examples import EXAMPLES
from batchfit.integrations.lightning import BatchfitTuner

EXAMPLE = EXAMPLES["mnist1d"]


class ExampleModule(pl.LightningModule):
    """The built-in example as a user writes it for Lightning."""

    def __init__(self, data, batch_size: int = 32, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["data"])
        self.data = data
        self.model = EXAMPLE.make_model()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        d = self.data
        dataset = TensorDataset(d.x_train, d.y_train)
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=True)


class TrainingClock(pl.Callback):
    """Validates every ``every`` seconds of training (validation time excluded), the same for
    every arm whatever its batch size: (training seconds, val loss, val accuracy) points."""

    def __init__(self, x_val: torch.Tensor, y_val: torch.Tensor, every: float) -> None:
        self.x_val, self.y_val, self.every = x_val, y_val, every
        self.points: list[tuple[float, float, float]] = []
        self.trained = 0.0
        self._since = 0.0

    def on_train_batch_start(self, *_):
        self._since = time.perf_counter()

    def on_train_batch_end(self, trainer, module, *_):
        self.trained += time.perf_counter() - self._since
        if not self.points or self.trained - self.points[-1][0] >= self.every:
            module.eval()
            with torch.no_grad():
                out = module(self.x_val)
            module.train()
            accuracy = float((out.argmax(1) == self.y_val).float().mean())
            self.points.append((self.trained, float(F.cross_entropy(out, self.y_val)), accuracy))


def _trainer(root: str, seconds: float, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_time={"seconds": seconds},
        max_epochs=10_000,
        callbacks=callbacks,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def run_arm(name: str, args, data, initial: dict) -> dict:
    torch.manual_seed(0)
    module = ExampleModule(data)
    module.model.load_state_dict(initial)
    clock = TrainingClock(data.x_val, data.y_val, args.val_every_s)
    with tempfile.TemporaryDirectory() as root:
        tuning = 0.0
        callbacks: list = [clock]
        if name == "Lightning scale_batch_size":
            started = time.perf_counter()
            finder = _trainer(root, 1e6, [])
            finder.fit_loop.max_epochs = 1
            Tuner(finder).scale_batch_size(module, mode="power")
            tuning = time.perf_counter() - started
        elif name == "batchfit BatchfitTuner":
            tuner = BatchfitTuner(time_budget=args.tune_budget, seed=0)
            callbacks.insert(0, tuner)
        started = time.perf_counter()
        trainer = _trainer(root, args.seconds, callbacks)
        trainer.fit(module)
        if name == "batchfit BatchfitTuner":
            tuning = tuner.result.seconds
    reached = {
        target: next((t for t, _, acc in clock.points if acc >= target), math.nan)
        for target in args.targets
    }
    batch = module.hparams.batch_size * trainer.accumulate_grad_batches
    return {
        "arm": name,
        "batch_size": batch,
        "lr": module.hparams.lr,
        "tuning_s": tuning,
        "epochs": trainer.current_epoch,
        "to_target_s": reached,
        "best_acc": max((p[2] for p in clock.points), default=math.nan),
        "best_loss": min((p[1] for p in clock.points), default=math.nan),
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="training seconds per arm")
    parser.add_argument(
        "--targets", type=float, nargs="+", default=[0.8, 0.9], help="validation accuracy targets"
    )
    parser.add_argument("--val-every-s", type=float, default=0.5, help="training s per check")
    parser.add_argument("--tune-budget", type=float, default=60.0, help="BatchfitTuner budget")
    args = parser.parse_args()
    print(f"command: {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    data = EXAMPLE.load()
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in EXAMPLE.make_model().state_dict().items()}
    arms = ("as written (32, 1e-3)", "Lightning scale_batch_size", "batchfit BatchfitTuner")
    rows = [run_arm(name, args, data, initial) for name in arms]
    print(
        f"\n{args.seconds:g} s of training each; training seconds to each validation accuracy\n"
        f"{'arm':28} {'batch':>6} {'lr':>9} {'tuning s':>9} {'epochs':>7} "
        + "".join(f"{f'to {t:g}':>9}" for t in args.targets)
        + f" {'best acc':>9} {'best loss':>10}"
    )
    for r in rows:
        print(
            f"{r['arm']:28} {r['batch_size']:>6} {r['lr']:>9.3g} {r['tuning_s']:>9.1f} "
            f"{r['epochs']:>7} "
            + "".join(f"{r['to_target_s'][t]:>9.1f}" for t in args.targets)
            + f" {r['best_acc']:>9.3f} {r['best_loss']:>10.4f}"
        )


if __name__ == "__main__":
    main()

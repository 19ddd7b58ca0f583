"""batchfit: measure, then choose the batch size; then train with it.

The Python API mirrors the command line:

- :func:`plan` counts steps, iterations and epochs for a batch size (``batchfit plan``);
- :func:`train` trains a model with mini-batches, exact accumulation and resumable checkpoints
  (``batchfit train``);
- :func:`tune` measures memory, throughput and gradient noise and recommends a batch size and a
  learning rate (``batchfit tune``); :func:`noise_scale` measures the gradient noise scale alone.
- :func:`sweep` trains one short run per batch size and compares validation quality, the
  train-validation gap, sharpness and time to a target (``batchfit sweep``);
- :func:`sharpness` measures the top Hessian eigenvalue of a model's loss.

Each name is imported on first use (PEP 562), so ``import batchfit`` is cheap and
``batchfit.plan`` needs no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from batchfit.errors import BatchfitError, NonFiniteLossError, TrainingInterrupted
from batchfit.version import __version__

#: Public name -> the module that defines it.
_EXPORTS = {
    "plan": "batchfit.core.accounting",
    "Plan": "batchfit.core.accounting",
    "scale_lr": "batchfit.core.lr_scaling",
    "NoiseScale": "batchfit.core.noise_estimator",
    "TrainConfig": "batchfit.core.configs",
    "TuneConfig": "batchfit.core.configs",
    "SweepConfig": "batchfit.core.configs",
    "BatchSource": "batchfit.data.source",
    "TensorSource": "batchfit.data.tensors",
    "DatasetSource": "batchfit.data.torch_dataset",
    "IterableSource": "batchfit.data.torch_dataset",
    "evaluate": "batchfit.step",
    "train": "batchfit.orchestrate.train_auto",
    "TrainResult": "batchfit.loop.train",
    "noise_scale": "batchfit.probe.noise",
    "sharpness": "batchfit.probe.sharpness",
    "SharpnessResult": "batchfit.probe.sharpness",
    "tune": "batchfit.orchestrate.tune",
    "TuneResult": "batchfit.orchestrate.tune",
    "sweep": "batchfit.orchestrate.sweep",
    "SweepResult": "batchfit.orchestrate.sweep",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'batchfit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from batchfit.core.accounting import Plan, plan
    from batchfit.core.configs import SweepConfig, TrainConfig, TuneConfig
    from batchfit.core.lr_scaling import scale_lr
    from batchfit.core.noise_estimator import NoiseScale
    from batchfit.data.source import BatchSource
    from batchfit.data.tensors import TensorSource
    from batchfit.data.torch_dataset import DatasetSource, IterableSource
    from batchfit.loop.train import TrainResult
    from batchfit.orchestrate.sweep import SweepResult, sweep
    from batchfit.orchestrate.train_auto import train
    from batchfit.orchestrate.tune import TuneResult, tune
    from batchfit.probe.noise import noise_scale
    from batchfit.probe.sharpness import SharpnessResult, sharpness
    from batchfit.step import evaluate

__all__ = [
    "BatchfitError",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "plan",
    "Plan",
    "scale_lr",
    "NoiseScale",
    "TrainConfig",
    "TuneConfig",
    "SweepConfig",
    "BatchSource",
    "TensorSource",
    "DatasetSource",
    "IterableSource",
    "evaluate",
    "train",
    "TrainResult",
    "noise_scale",
    "sharpness",
    "SharpnessResult",
    "tune",
    "TuneResult",
    "sweep",
    "SweepResult",
    "__version__",
]

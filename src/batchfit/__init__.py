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
"""

from batchfit.core.accounting import Plan, plan
from batchfit.core.lr_scaling import scale_lr
from batchfit.core.noise_estimator import NoiseScale
from batchfit.data import BatchSource, DatasetSource, IterableSource, TensorSource
from batchfit.errors import BatchfitError, NonFiniteLossError, TrainingInterrupted
from batchfit.loop.train import TrainResult, evaluate, train
from batchfit.orchestrate.sweep import (  # batchfit.sweep is the function from here on
    SweepResult,
    sweep,
)
from batchfit.orchestrate.tune import TuneResult, tune
from batchfit.probe.noise import noise_scale
from batchfit.probe.sharpness import SharpnessResult, sharpness

__version__ = "0.1.0"

__all__ = [
    "BatchSource",
    "BatchfitError",
    "DatasetSource",
    "IterableSource",
    "NoiseScale",
    "NonFiniteLossError",
    "Plan",
    "SharpnessResult",
    "SweepResult",
    "TensorSource",
    "TrainResult",
    "TrainingInterrupted",
    "TuneResult",
    "evaluate",
    "noise_scale",
    "plan",
    "scale_lr",
    "sharpness",
    "sweep",
    "train",
    "tune",
    "__version__",
]

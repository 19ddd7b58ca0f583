"""batchfit: measure, then choose the batch size; then train with it.

The Python API mirrors the command line:

- :func:`plan` counts steps, iterations and epochs for a batch size (``batchfit plan``);
- :func:`train` trains a model with mini-batches, exact accumulation and resumable checkpoints
  (``batchfit train``);
- :func:`sweep` trains one short run per batch size and compares validation quality, the
  train-validation gap, sharpness and time to a target (``batchfit sweep``);
- :func:`sharpness` measures the top Hessian eigenvalue of a model's loss.
"""

from batchfit.data import BatchSource, DatasetSource, IterableSource, TensorSource
from batchfit.errors import BatchfitError, NonFiniteLossError, TrainingInterrupted
from batchfit.lr_scaling import scale_lr
from batchfit.probe.sharpness import SharpnessResult, sharpness
from batchfit.schedule import Plan, plan
from batchfit.sweep import SweepResult, sweep  # batchfit.sweep is the function from here on
from batchfit.train import TrainResult, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "BatchSource",
    "BatchfitError",
    "DatasetSource",
    "IterableSource",
    "NonFiniteLossError",
    "Plan",
    "SharpnessResult",
    "SweepResult",
    "TensorSource",
    "TrainResult",
    "TrainingInterrupted",
    "evaluate",
    "plan",
    "scale_lr",
    "sharpness",
    "sweep",
    "train",
    "__version__",
]

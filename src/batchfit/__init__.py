"""batchfit: measure, then choose the batch size; then train with it.

The Python API mirrors the command line:

- :func:`plan` counts steps, iterations and epochs for a batch size (``batchfit plan``);
- :func:`train` trains a model with mini-batches, exact accumulation and resumable checkpoints
  (``batchfit train``).
"""

from batchfit.data import BatchSource, DatasetSource, IterableSource, TensorSource
from batchfit.errors import BatchfitError, NonFiniteLossError, TrainingInterrupted
from batchfit.lr_scaling import scale_lr
from batchfit.schedule import Plan, plan
from batchfit.train import TrainResult, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "BatchSource",
    "BatchfitError",
    "DatasetSource",
    "IterableSource",
    "NonFiniteLossError",
    "Plan",
    "TensorSource",
    "TrainResult",
    "TrainingInterrupted",
    "evaluate",
    "plan",
    "scale_lr",
    "train",
    "__version__",
]

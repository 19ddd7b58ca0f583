"""Batch sources for the training loop: in-memory tensors, torch datasets, files."""

from batchfit.data.memory import TensorSource
from batchfit.data.source import Batch, BatchSource, epoch_seed
from batchfit.data.torch_dataset import DatasetSource, IterableSource

__all__ = ["Batch", "BatchSource", "DatasetSource", "IterableSource", "TensorSource", "epoch_seed"]

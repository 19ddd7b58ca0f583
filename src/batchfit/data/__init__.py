"""Batch sources for the training loop: in-memory tensors, torch datasets, streamed files."""

from batchfit.data.source import Batch, BatchSource, epoch_seed
from batchfit.data.stream import StreamSource, open_stream
from batchfit.data.tensors import TensorSource
from batchfit.data.torch_dataset import DatasetSource, IterableSource

__all__ = [
    "Batch",
    "BatchSource",
    "DatasetSource",
    "IterableSource",
    "StreamSource",
    "TensorSource",
    "epoch_seed",
    "open_stream",
]

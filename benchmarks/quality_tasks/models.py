"""Model factories for the recommendation-quality tasks (``benchmarks/recommend_quality.py``).

Each factory takes no arguments and returns a fresh ``nn.Module``, so ``batchfit tune`` can load it
as a user's model::

    batchfit tune --model benchmarks/quality_tasks/models.py:make_digits_mlp \\
        --data ~/.cache/batchfit/quality/digits-v1-train.npz \\
        --val-data ~/.cache/batchfit/quality/digits-v1-val.npz

batchfit hands a model a float32 ``(B, n_features)`` tensor read from a table, so a model whose
input has structure (an image, a window of characters) reshapes or converts it itself. This file
imports nothing but torch (and batchfit's own example model), because batchfit imports it by path.
"""

from __future__ import annotations

import torch
from torch import nn

DIGITS_SIDE = 8  # sklearn's load_digits: 8 x 8 images, flattened to 64 features
DIGITS_CLASSES = 10
TABULAR_FEATURES = 20
TABULAR_CLASSES = 5
FRIEDMAN_FEATURES = 10
CHAR_CONTEXT = 16  # characters of context per sample (the features of the char-LM table)
CHAR_VOCAB = 98  # printable ASCII, newline, tab, and one id for everything else


def make_mnist1d_convnet() -> nn.Module:
    """batchfit's built-in MNIST-1D model (three 1-D convolutions, ~9k parameters)."""
    from batchfit.examples.mnist1d import ConvNet1D

    return ConvNet1D()


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, outputs),
    )


def make_digits_mlp() -> nn.Module:
    """Two hidden layers of 128 on the 64 pixels of sklearn's digits; 10 logits."""
    return _mlp(DIGITS_SIDE * DIGITS_SIDE, 128, DIGITS_CLASSES)


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions and a max-pool on the 8x8 digits, then a small linear head.

    Takes the flat ``(B, 64)`` rows batchfit reads from the table and reshapes them to
    ``(B, 1, 8, 8)`` itself.
    """

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = DIGITS_SIDE // 2
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * channels * side * side, 64),
            nn.ReLU(),
            nn.Linear(64, DIGITS_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, 1, DIGITS_SIDE, DIGITS_SIDE)))


def make_digits_cnn() -> nn.Module:
    """:class:`DigitsCNN` with 16 and 32 channels."""
    return DigitsCNN()


def make_tabular_mlp() -> nn.Module:
    """Two hidden layers of 128 on 20 generated features; 5 logits."""
    return _mlp(TABULAR_FEATURES, 128, TABULAR_CLASSES)


class Regressor(nn.Module):
    """An MLP with one output per sample, returned as shape ``(B,)`` to match a ``(B,)`` target."""

    def __init__(self, inputs: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = _mlp(inputs, hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(-1)


def make_friedman_mlp() -> nn.Module:
    """Two hidden layers of 128 on Friedman #1's 10 inputs; one real output."""
    return Regressor(FRIEDMAN_FEATURES)


class CharMLP(nn.Module):
    """A Bengio-style character model: embed each of the context characters, concatenate, one
    hidden layer, logits over the vocabulary.

    The table holds character ids as float32 features; they are turned back into ids here.
    """

    def __init__(self, embedding: int = 16, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(CHAR_VOCAB, embedding)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(CHAR_CONTEXT * embedding, hidden),
            nn.ReLU(),
            nn.Linear(hidden, CHAR_VOCAB),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x.long()))


def make_char_mlp() -> nn.Module:
    """:class:`CharMLP` with 16-dimensional embeddings and 256 hidden units."""
    return CharMLP()

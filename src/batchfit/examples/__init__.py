"""Built-in tasks that need no download: data generated locally, a model sized for a CPU.

``mnist1d`` (the default) is MNIST-1D (Greydanus 2020): 4,000 training and 1,000 validation
sequences of 40 values in 10 classes, made by the ``mnist1d`` package's own generator and cached.
``linreg`` is least squares with Gaussian inputs, where the gradient noise scale is known in
closed form (DESIGN.md): a check that the probes measure what they claim.
"""

from __future__ import annotations

from batchfit.examples.base import Example
from batchfit.examples.linreg import LINREG
from batchfit.examples.mnist1d import MNIST1D

EXAMPLES: dict[str, Example] = {e.name: e for e in (MNIST1D, LINREG)}
DEFAULT_EXAMPLE = "mnist1d"

__all__ = ["EXAMPLES", "DEFAULT_EXAMPLE", "Example"]

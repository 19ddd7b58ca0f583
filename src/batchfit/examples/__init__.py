"""Built-in tasks that need no download: data generated locally, a model sized for a CPU.

``mnist1d`` (the default) is MNIST-1D (Greydanus 2020): 4,000 training and 1,000 validation
sequences of 40 values in 10 classes, made by the ``mnist1d`` package's own generator and cached.
``linreg`` is least squares with Gaussian inputs, where the gradient noise scale is known in
closed form: a check that the probes measure what they claim.

Their names and descriptions (:mod:`batchfit.examples.catalog`) need no torch; an example's module
is imported when it is first used, through :func:`example` or :data:`EXAMPLES`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from batchfit.examples.catalog import DEFAULT_EXAMPLE, DESCRIPTIONS, MODULES

if TYPE_CHECKING:
    from batchfit.examples.base import Example


def example(name: str) -> Example:
    """The built-in example called ``name`` (a KeyError for an unknown name)."""
    module, attribute = MODULES[name]
    return getattr(importlib.import_module(module), attribute)


def __getattr__(name: str) -> Any:
    # EXAMPLES imports every example's module (and torch): built on first use only.
    if name == "EXAMPLES":
        return {n: example(n) for n in MODULES}
    raise AttributeError(f"module 'batchfit.examples' has no attribute {name!r}")


__all__ = ["DEFAULT_EXAMPLE", "DESCRIPTIONS", "EXAMPLES", "example"]

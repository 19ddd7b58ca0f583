"""The built-in examples by name, with their descriptions: no torch, so that ``batchfit --help``
and ``batchfit plan`` stay light. Each example's data and model live in its own module, imported
when the example is used (:func:`batchfit.examples.example`).

>>> sorted(DESCRIPTIONS) == sorted(MODULES)
True
"""

from __future__ import annotations

from batchfit.core.options import default_of

DEFAULT_EXAMPLE = default_of("example")

#: name -> one line for ``--help`` and the report.
DESCRIPTIONS = {
    "mnist1d": "MNIST-1D: 4,000 train / 1,000 validation sequences of 40 values, 10 classes",
    "linreg": "least squares, 32 Gaussian inputs, 8192 train / 2048 validation",
}

#: name -> (module, attribute) holding its :class:`~batchfit.examples.base.Example`.
MODULES = {
    "mnist1d": ("batchfit.examples.mnist1d", "MNIST1D"),
    "linreg": ("batchfit.examples.linreg", "LINREG"),
}

"""Learning-rate scaling rules: how the learning rate should move when the batch size does.

Pure numbers. ``linear`` (Goyal et al. 2017, for SGD with warm-up) multiplies the learning rate
by ``B / B_ref``; ``sqrt`` (Hoffer et al. 2017; Malladi et al. 2022 for Adam) by
``sqrt(B / B_ref)``; ``none`` keeps it.

Examples:
    >>> scale_lr(1e-3, 32, 128, "sqrt")
    0.002
    >>> scale_lr(0.1, 256, 1024, "linear")
    0.4
    >>> default_rule("adamw")
    'sqrt'
"""

from __future__ import annotations

import math

from batchfit.core import options


def default_rule(optimizer: str) -> str:
    """The usual rule for an optimizer: ``linear`` for SGD, ``sqrt`` for the Adam family."""
    options.check("optimizer", optimizer)
    return options.default_of("lr_scaling", optimizer=optimizer)


def scale_lr(lr: float, from_batch_size: int, to_batch_size: int, rule: str) -> float:
    """The learning rate for ``to_batch_size``, given ``lr`` tuned at ``from_batch_size``."""
    options.check("lr", lr)
    options.check("batch_size", from_batch_size)
    options.check("batch_size", to_batch_size)
    options.check("lr_scaling", rule)
    ratio = to_batch_size / from_batch_size
    if rule == "linear":
        factor = ratio
    elif rule == "sqrt":
        factor = math.sqrt(ratio)
    else:
        factor = 1.0
    return float(f"{lr * factor:.12g}")

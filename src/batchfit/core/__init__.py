"""The pure core: plain numbers in, plain numbers (and frozen dataclasses) out.

Accounting of batches, steps and epochs (:mod:`~batchfit.core.accounting`), the option table and
the configs built from it (:mod:`~batchfit.core.options`, :mod:`~batchfit.core.configs`), the
gradient noise-scale estimator, the batch-size recommendation, learning-rate scaling and the sweep
verdict. Nothing here imports torch, pyarrow or matplotlib, or touches a file, so it is importable
alone and tested with plain numbers (``batchfit plan`` runs on it without torch).
"""

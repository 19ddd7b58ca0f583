"""Data of the recommendation-quality tasks, made locally and cached as ``.npz`` files.

Nothing is downloaded: MNIST-1D comes from batchfit's built-in example (the ``mnist1d`` package's
generator), the digits images ship with scikit-learn, the tabular and regression sets are drawn by
scikit-learn's generators with a fixed seed, and the character model reads two modules of
Python's own standard library. Each task gets ``<name>-v1-train.npz`` and ``<name>-v1-val.npz``
(arrays ``x``: float32 ``(N, features)``, ``y``: int64 labels or float32 targets) in
``$BATCHFIT_CACHE/quality`` (default ``~/.cache/batchfit/quality``), written on first use, so
``batchfit tune --data ... --val-data ...`` reads exactly the rows the oracle trains on.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

VERSION = "v1"
SEED = 0


def cache_folder() -> Path:
    """``$BATCHFIT_CACHE/quality`` or ``~/.cache/batchfit/quality``."""
    root = os.environ.get("BATCHFIT_CACHE") or Path.home() / ".cache" / "batchfit"
    return Path(root) / "quality"


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_val, y_val


def _split(x: np.ndarray, y: np.ndarray, n_val: int) -> Arrays:
    """A seeded random split: the last ``n_val`` rows of a fixed permutation are validation."""
    order = np.random.default_rng(SEED).permutation(len(x))
    train, val = order[:-n_val], order[-n_val:]
    return x[train], y[train], x[val], y[val]


def mnist1d() -> Arrays:
    """batchfit's built-in MNIST-1D: 4,000 train / 1,000 validation sequences of 40 values."""
    from batchfit.examples import EXAMPLES

    data = EXAMPLES["mnist1d"].load()
    return (data.x_train.numpy(), data.y_train.numpy(), data.x_val.numpy(), data.y_val.numpy())


def digits() -> Arrays:
    """scikit-learn's 1,797 8x8 digit images, pixels scaled to [0, 1]: 1,400 train / 397 val."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return _split((x / 16.0).astype(np.float32), y.astype(np.int64), len(x) - 1400)


def tabular() -> Arrays:
    """``make_classification``: 6,000 rows of 20 features (12 informative, 4 redundant), 5
    classes of 2 clusters each, 3% of labels flipped: 4,000 train / 2,000 val."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=6000,
        n_features=20,
        n_informative=12,
        n_redundant=4,
        n_classes=5,
        n_clusters_per_class=2,
        flip_y=0.03,
        class_sep=1.0,
        random_state=SEED,
    )
    return _split(x.astype(np.float32), y.astype(np.int64), 2000)


FRIEDMAN_OFFSET = 20.0


def friedman() -> Arrays:
    """Friedman #1 regression (``make_friedman1``, 10 inputs in [0, 1], 5 used, noise sd 0.5)
    with 20 added to the target (mean ~34, sd ~5): 4,000 train / 2,000 val.

    The target's large mean is the point: early in training the gradient is dominated by fitting
    that mean, so a noise scale read then says little about the demanding part of the fit.
    """
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=6000, n_features=10, noise=0.5, random_state=SEED)
    return _split(x.astype(np.float32), (y + FRIEDMAN_OFFSET).astype(np.float32), 2000)


CHAR_CONTEXT = 16
CHAR_MODULES = ("argparse", "difflib")  # standard-library source read as text (~180k chars)
CHAR_TRAIN, CHAR_VAL = 20000, 4000


def _char_ids(text: str) -> np.ndarray:
    """Printable ASCII 32..126 -> 0..94, newline -> 95, tab -> 96, anything else -> 97."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    ids = np.full(len(codes), 97, dtype=np.int64)
    printable = (codes >= 32) & (codes <= 126)
    ids[printable] = codes[printable] - 32
    ids[codes == 10] = 95
    ids[codes == 9] = 96
    return ids


def _windows(ids: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    starts = rng.choice(len(ids) - CHAR_CONTEXT, size=count, replace=False)
    x = ids[starts[:, None] + np.arange(CHAR_CONTEXT)]
    return x.astype(np.float32), ids[starts + CHAR_CONTEXT]


def chars() -> Arrays:
    """Next-character prediction on Python's own ``argparse.py`` and ``difflib.py``: 16
    characters of context -> the next one. Training windows come from the first 85% of the text,
    validation windows from the rest, so no validation target was seen in training."""
    import importlib

    text = "\n".join(
        Path(importlib.import_module(name).__file__).read_text(encoding="utf-8")
        for name in CHAR_MODULES
    )
    ids = _char_ids(text)
    cut = int(0.85 * len(ids))
    rng = np.random.default_rng(SEED)
    x_train, y_train = _windows(ids[:cut], CHAR_TRAIN, rng)
    x_val, y_val = _windows(ids[cut:], CHAR_VAL, rng)
    return x_train, y_train, x_val, y_val


# ----------------------------------------------------------------------------- long-horizon sets
# Larger draws of the same kinds, for benchmarks/long_horizon.py: enough rows that the model does
# not overfit before it reaches a demanding target, so the best runs take minutes, not seconds.

MNIST1D_BIG_SAMPLES = 40000  # 32,000 train / 8,000 validation (the package's 80/20 split)


def mnist1d_big() -> Arrays:
    """MNIST-1D from the ``mnist1d`` package's generator with its default arguments but 40,000
    samples instead of 5,000 (same seed): 32,000 train / 8,000 validation sequences of 40."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = MNIST1D_BIG_SAMPLES
    data = make_dataset(args)
    return (
        data["x"].astype(np.float32),
        data["y"].astype(np.int64),
        data["x_test"].astype(np.float32),
        data["y_test"].astype(np.int64),
    )


def friedman_big() -> Arrays:
    """:func:`friedman` drawn 42,000 times: 40,000 train / 2,000 validation rows, so a long fit
    approaches the noise floor (mse 0.25) instead of overfitting 4,000 rows."""
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=42000, n_features=10, noise=0.5, random_state=SEED)
    return _split(x.astype(np.float32), (y + FRIEDMAN_OFFSET).astype(np.float32), 2000)


BUILDERS: dict[str, Callable[[], Arrays]] = {
    "mnist1d_big": mnist1d_big,
    "friedman_big": friedman_big,
    "mnist1d": mnist1d,
    "digits": digits,
    "tabular": tabular,
    "friedman": friedman,
    "chars": chars,
}


def paths(name: str) -> tuple[Path, Path]:
    """The train and validation files of data set ``name`` (written if missing)."""
    folder = cache_folder()
    train = folder / f"{name}-{VERSION}-train.npz"
    val = folder / f"{name}-{VERSION}-val.npz"
    if not (train.exists() and val.exists()):
        x_train, y_train, x_val, y_val = BUILDERS[name]()
        folder.mkdir(parents=True, exist_ok=True)
        for path, x, y in ((train, x_train, y_train), (val, x_val, y_val)):
            partial = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(partial, x=x, y=y)
            os.replace(partial, path)  # atomic: a reader never sees half a file
    return train, val


def load(name: str) -> Arrays:
    """The arrays of data set ``name``, read from its cache files (made on first use)."""
    train, val = paths(name)
    with np.load(train) as t, np.load(val) as v:
        return t["x"], t["y"], v["x"], v["y"]


if __name__ == "__main__":
    for name in sys.argv[1:] or BUILDERS:
        x_train, y_train, x_val, y_val = load(name)
        print(name, x_train.shape, y_train.dtype, x_val.shape, paths(name)[0])

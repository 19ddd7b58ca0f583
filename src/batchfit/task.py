"""A task: a model factory, training and validation data, and a loss.

This is where the command line's ``--example``, ``--model``, ``--data``, ``--val-data``,
``--val-fraction``, ``--features``, ``--target`` and ``--loss`` become objects, so that ``train``,
``tune`` and ``sweep`` all read their inputs the same way.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from batchfit.core import options
from batchfit.data.permute import Holdout, validation_count
from batchfit.data.source import BatchSource
from batchfit.data.stream import DEFAULT_PREFETCH, StreamSource, load_file
from batchfit.data.tensors import TensorSource
from batchfit.data.torch_dataset import DatasetSource, IterableSource
from batchfit.errors import BatchfitError, first_line
from batchfit.examples import DEFAULT_EXAMPLE, EXAMPLES
from batchfit.imports import import_object
from batchfit.inputs import as_source, target_kind_of
from batchfit.losses import Loss, resolve_loss

DEFAULT_VAL_FRACTION = 0.1


@dataclass
class Task:
    """Everything a run needs besides the batch-size settings."""

    name: str
    make_model: Callable[[], nn.Module]
    train: BatchSource
    val: BatchSource | None
    loss: Loss
    suggested_lr: float | None = None
    data_choice: str | None = None  # how --data was read (in memory or streamed) and why
    notes: list[str] = field(default_factory=list)  # what the user should know (printed on stderr)


def model_factory(spec: str) -> Callable[[], nn.Module]:
    """A no-argument callable that builds the model named by ``package.module:factory``."""
    factory = import_object(spec, what="model factory")
    if not callable(factory):
        raise BatchfitError(
            f"The model factory '{spec}' is not callable; point --model at a function."
        )

    required = _required_parameters(factory)
    if required:
        raise BatchfitError(
            f"The model factory '{spec}' needs arguments ({', '.join(required)}); --model needs a "
            "function that takes no arguments and returns an nn.Module (wrap yours in one)."
        )

    def build() -> nn.Module:
        try:
            model = factory()
        except BatchfitError:
            raise
        except Exception as exc:
            raise BatchfitError(
                f"The model factory '{spec}' raised {type(exc).__name__}: {first_line(exc)}"
            ) from exc
        if not isinstance(model, nn.Module):
            raise BatchfitError(
                f"The model factory '{spec}' returned {type(model).__name__}, not a "
                "torch.nn.Module; return the model itself."
            )
        return model

    return build


def _required_parameters(function: Callable) -> list[str]:
    """Names of the parameters a call with no arguments would be missing."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return []
    return [
        p.name
        for p in signature.parameters.values()
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _is_factory(spec: str) -> bool:
    return ":" in spec and not Path(spec).exists()


def _load_data(
    spec: str,
    features: list[str] | None,
    target: str | None,
    seed: int,
    shuffle: bool,
    stream: StreamOptions | None = None,
):
    """Return (source, target_kind, why) for a file path, folder or glob, or a
    ``module:factory`` returning a dataset. Files are loaded or streamed (see ``load_file``)."""
    if _is_factory(spec):
        data = import_object(spec, what="data factory")
        if callable(data) and not isinstance(data, (Dataset, BatchSource)):
            data = data()
        source = as_source(data, seed=seed, shuffle=shuffle, what=f"data from '{spec}'")
        return source, target_kind_of(source), None
    stream_options = stream or StreamOptions()
    return load_file(
        spec,
        features,
        target,
        seed=seed,
        shuffle=shuffle,
        stream=stream_options.stream,
        shuffle_buffer=stream_options.shuffle_buffer,
        prefetch=stream_options.prefetch,
        workers=stream_options.workers,
        reason=stream_options.reason,
    )


@dataclass(frozen=True)
class StreamOptions:
    """How to read ``--data`` files (``stream=None``: by size); see :mod:`batchfit.data.stream`.

    ``shuffle_buffer`` is rows (int) or the bytes of one window (``"64MiB"``); ``reason`` says
    why ``stream`` was forced when it was not by the flag.
    """

    stream: bool | None = None
    shuffle_buffer: int | str | None = None
    prefetch: int = DEFAULT_PREFETCH
    workers: int = 1
    reason: str | None = None


def _as_resumed(stream_options: StreamOptions, resume_from: str | Path | None) -> StreamOptions:
    """Read --data as the run being resumed read it (streamed or loaded), unless a flag forces
    it: the choice by free memory could differ now, and with it the order of the batches."""
    if stream_options.stream is not None or resume_from is None:
        return stream_options
    from batchfit.checkpoint import saved_settings

    source = saved_settings(resume_from).get("data", {}).get("source")
    if source not in ("stream", "memory"):
        return stream_options
    return replace(
        stream_options,
        stream=source == "stream",
        reason=f"as the run being resumed from '{resume_from}' did",
    )


def load_task(
    *,
    example: str | None = None,
    model: str | None = None,
    data: str | None = None,
    val_data: str | None = None,
    val_fraction: float | None = None,
    features: list[str] | None = None,
    target: str | None = None,
    loss: str | None = None,
    seed: int = 0,
    stream: StreamOptions | None = None,
    resume_from: str | Path | None = None,
) -> Task:
    """Build a :class:`Task` from command-line style stream_options.

    With no ``model`` and no ``data`` the built-in ``example`` (default ``mnist1d``) is used.
    ``model`` alone trains the user's model on the example's data; ``data`` needs ``model``.
    ``resume_from``, the checkpoint folder of a run being resumed, makes ``data`` be read as
    that run read it (streamed or loaded), unless ``stream`` forces a choice.
    """
    if data is None and (val_data is not None or features or target is not None):
        raise BatchfitError("--val-data, --features and --target describe --data; give --data too.")
    if val_fraction is not None:
        options.check("val_fraction", val_fraction)
    if data is not None and example is not None:
        raise BatchfitError("Give either --example or --data, not both.")
    if data is not None and model is None:
        raise BatchfitError(
            "--data needs --model package.module:factory (a function returning your nn.Module)."
        )

    if data is None:
        name = example or DEFAULT_EXAMPLE
        if name not in EXAMPLES:
            raise BatchfitError(
                f"Unknown example '{name}'; choose one of {', '.join(sorted(EXAMPLES))}."
            )
        ex = EXAMPLES[name]
        loaded = ex.load()
        train: BatchSource = TensorSource(loaded.x_train, loaded.y_train, seed=seed)
        val: BatchSource | None = TensorSource(loaded.x_val, loaded.y_val, shuffle=False)
        if val_fraction == 0:
            val = None
        elif val_fraction is not None:
            raise BatchfitError(
                f"The example '{name}' has its own validation set; --val-fraction only takes 0 "
                "there (no validation)."
            )
        kind = loaded.target_kind
        factory = model_factory(model) if model else ex.make_model
        label = f"example '{name}'" + (f" with model {model}" if model else "")
        return Task(label, factory, train, val, resolve_loss(loss, kind), ex.lr)

    stream_options = _as_resumed(stream or StreamOptions(), resume_from)
    train, kind, choice = _load_data(
        data, features, target, seed, shuffle=True, stream=stream_options
    )
    notes = []
    if val_data is not None:
        if val_fraction:
            raise BatchfitError("Give either --val-data or --val-fraction, not both.")
        val, _, _ = _load_data(val_data, features, target, seed, shuffle=False, stream=stream)
    elif val_fraction is None and isinstance(train, IterableSource):
        val = None  # the default fraction cannot apply: a stream of unknown length has no rows
        notes.append(
            f"no validation: data from '{data}' is an IterableDataset, which cannot be split; "
            "give --val-data for validation (--val-fraction 0 silences this note)."
        )
    else:
        fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        val = None
        if fraction > 0:
            train, val = _split(train, fraction, seed)
            if isinstance(train, StreamSource):
                notes.append(
                    f"validation holds out {fraction:g} of the streamed rows, so each evaluation "
                    "reads all of --data again; for big data give --val-data (a smaller file) "
                    "instead."
                )
    if loss == "cross_entropy" and kind == "real":
        train, val, kind = _as_class_labels(train), val and _as_class_labels(val), "class"
    name = f"{model} on {data}"
    return Task(
        name,
        model_factory(model),
        train,
        val,
        resolve_loss(loss, kind),
        data_choice=choice,
        notes=notes,
    )


def _as_class_labels(source: BatchSource) -> BatchSource:
    """Float targets holding whole numbers (a 2-D ``.npy`` keeps labels as floats) as int64 labels,
    for ``--loss cross_entropy``."""
    if isinstance(source, StreamSource) and source.target_kind == "real":
        return source.as_class_labels()  # checked window by window as the stream is read
    if isinstance(source, TensorSource) and source.y.is_floating_point():
        y = source.y
        if y.ndim == 1 and bool((y == y.round()).all()) and bool((y >= 0).all()):
            labels = copy.copy(source)  # keeps seed, shuffle and what the checkpoint records
            labels.y = y.long()
            return labels
    raise BatchfitError(
        "The cross_entropy loss needs class labels 0..C-1, but the target holds other numbers; "
        "store the labels as integers, or use --loss mse."
    )


def _split(source: BatchSource, fraction: float, seed: int) -> tuple[BatchSource, BatchSource]:
    if isinstance(source, (TensorSource, StreamSource)):
        return source.split(fraction, seed)
    if isinstance(source, DatasetSource):
        n = source.num_samples
        # The same rows as TensorSource.split and StreamSource.split hold out.
        held_out = Holdout(n, validation_count(n, fraction), seed).all_rows()
        train_rows, val_rows = np.flatnonzero(~held_out).tolist(), np.flatnonzero(held_out).tolist()
        workers = source.num_workers
        train = DatasetSource(
            torch.utils.data.Subset(source.dataset, train_rows),
            seed=source.seed,
            num_workers=workers,
        )
        val = DatasetSource(
            torch.utils.data.Subset(source.dataset, val_rows), shuffle=False, num_workers=workers
        )
        return train, val
    raise BatchfitError(
        "A stream cannot be split for validation; give --val-data, or --val-fraction 0."
    )

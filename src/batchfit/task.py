"""A task: a model factory, training and validation data, and a loss.

This is where the command line's ``--example``, ``--model``, ``--data``, ``--val-data``,
``--val-fraction``, ``--features``, ``--target`` and ``--loss`` become objects, so that ``train``,
``tune`` and ``sweep`` all read their inputs the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from batchfit.core import options
from batchfit.core.options import default_of, opt, opt_value
from batchfit.data.source import BatchSource
from batchfit.data.stream import StreamSource, load_file
from batchfit.data.tensors import TensorSource
from batchfit.data.torch_dataset import IterableSource
from batchfit.errors import BatchfitError, first_line
from batchfit.examples import DEFAULT_EXAMPLE, DESCRIPTIONS, example
from batchfit.imports import import_object, required_parameters
from batchfit.inputs import as_source, split_off, target_kind_of
from batchfit.losses import Loss, resolve_loss


@dataclass
class Task:
    """Everything a run needs besides the batch-size settings."""

    name: str
    make_model: Callable[[], nn.Module]
    train: BatchSource
    val: BatchSource | None
    loss: Loss
    suggested_lr: float | None = None  # an example's learning rate for the Adam family at B=32
    data_choice: str | None = None  # how the data was read (in memory or streamed) and why
    notes: list[str] = field(default_factory=list)  # what the user should know (printed on stderr)

    def model_and_lr(
        self, seed: int, optimizer: str, lr: float | None
    ) -> tuple[nn.Module, float | None]:
        """A fresh model seeded by ``seed``, and ``lr``, or else the example's own learning rate
        when the optimizer is of the Adam family (None: the optimizer's default)."""
        torch.manual_seed(seed)
        model = self.make_model()
        if lr is not None:
            return model, lr
        return model, self.suggested_lr if optimizer != "sgd" else None


def model_factory(spec: str) -> Callable[[], nn.Module]:
    """A no-argument callable that builds the model named by ``package.module:factory``."""
    factory = import_object(spec, what="model factory")
    if not callable(factory):
        raise BatchfitError(
            f"The model factory '{spec}' is not callable; point {opt('model')} at a function."
        )

    required = required_parameters(factory)
    if required:
        raise BatchfitError(
            f"The model factory '{spec}' needs arguments ({', '.join(required)}); {opt('model')} "
            "needs a function that takes no arguments and returns an nn.Module (wrap yours in "
            "one)."
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


def _is_factory(spec: str) -> bool:
    return ":" in spec and not Path(spec).exists()


def _load_data(
    spec: str,
    features: list[str] | None,
    target: str | None,
    seed: int,
    shuffle: bool,
    stream: StreamOptions | None = None,
    match: str | None = None,
):
    """Return (source, target_kind, why) for a file path, folder or glob, or a
    ``module:factory`` returning a dataset. Files are loaded or streamed (see ``load_file``);
    ``match`` names the training data whose feature columns ``features`` are."""
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
        match=match,
    )


@dataclass(frozen=True)
class StreamOptions:
    """How to read ``--data`` files (``stream=None``: by size); see :mod:`batchfit.data.stream`.

    ``shuffle_buffer`` is rows (int) or the bytes of one window (``"64MiB"``); ``reason`` says
    why ``stream`` was forced when it was not by the flag.
    """

    stream: bool | None = None
    shuffle_buffer: int | str | None = None
    prefetch: int = default_of("prefetch")
    workers: int = default_of("data_workers")
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
    purpose: str = "train",
) -> Task:
    """Build a :class:`Task` from the task options of the command line.

    With no ``model`` and no ``data`` the built-in ``example`` (default ``mnist1d``) is used.
    ``model`` alone trains the user's model on the example's data; ``data`` needs ``model``.
    ``resume_from``, the checkpoint folder of a run being resumed, makes ``data`` be read as
    that run read it (streamed or loaded), unless ``stream`` forces a choice. ``purpose`` is the
    command the task is for: without ``val_fraction`` it holds out that command's default share
    of ``data`` (the option table's; ``tune`` keeps all of it for measuring, its race holds out its
    own share). A built-in example keeps its own validation set unless ``val_fraction`` is 0.
    """
    _check_task_options(example, model, data, val_data, val_fraction, features, target)
    if data is None:  # an example's own validation set is kept unless val_fraction is 0
        _check_no_stream_options(stream, example or DEFAULT_EXAMPLE)
        return _example_task(example or DEFAULT_EXAMPLE, model, val_fraction, loss, seed)
    default_fraction = default_of("val_fraction", purpose)
    if val_fraction is None and default_fraction == 0:
        val_fraction = 0.0  # none to hold out: no note that a stream of unknown length cannot split
    stream_options = _as_resumed(stream or StreamOptions(), resume_from)
    train, kind, choice = _load_data(
        data, features, target, seed, shuffle=True, stream=stream_options
    )
    notes: list[str] = []
    val: BatchSource | None
    if val_data is not None:
        val = _validation_data(val_data, train, data, features, target, seed, stream)
    else:
        train, val = _held_out(train, data, val_fraction, default_fraction, seed, notes)
    if loss == "cross_entropy" and kind == "real":
        train, val, kind = _as_class_labels(train), val and _as_class_labels(val), "class"
    factory = model_factory(model)  # type: ignore[arg-type]  # checked: data needs model
    task_loss = resolve_loss(loss, kind)
    return Task(f"{model} on {data}", factory, train, val, task_loss, None, choice, notes)


def _validation_data(
    spec: str,
    train: BatchSource,
    data: str,
    features: list[str] | None,
    target: str | None,
    seed: int,
    stream: StreamOptions | None,
) -> BatchSource:
    """``--val-data``, its feature columns chosen by the training data's names (in the training
    order, whatever the order in the file) and each checked to hold the same values per row;
    data without column names (a plain ``.npy``) is matched by position."""
    named = train.columns
    chosen = list(named) if named is not None else features
    match = f"the training data '{data}'" if named is not None else None
    val, _, _ = _load_data(spec, chosen, target, seed, shuffle=False, stream=stream, match=match)
    for name, width in (val.columns or {}).items():
        expected = (named or {}).get(name, width)
        if None not in (width, expected) and width != expected:
            raise BatchfitError(
                f"Column '{name}' of the validation data '{spec}' holds {_values(width)} per row, "
                f"but in the training data '{data}' it holds {_values(expected)}; store it as "
                "the training data does."
            )
    return val


def _values(width: int | None) -> str:
    return "a list" if width is None else "one number" if width == 1 else f"{width} numbers"


def _check_task_options(
    example: str | None,
    model: str | None,
    data: str | None,
    val_data: str | None,
    val_fraction: float | None,
    features: list[str] | None,
    target: str | None,
) -> None:
    """Options that contradict each other, before anything is loaded."""
    if features is not None and not features:
        raise BatchfitError(
            f"The list of {opt('features')} is empty (no column name between its commas); give "
            "comma-separated column names such as f0,f1, or leave it out to use every column "
            "but the target."
        )
    if data is None and (val_data is not None or features or target is not None):
        raise BatchfitError(
            f"{opt('val_data')}, {opt('features')} and {opt('target')} describe {opt('data')}; "
            f"give {opt('data')} too."
        )
    if val_fraction is not None:
        options.check("val_fraction", val_fraction)
    if data is not None and example is not None:
        raise BatchfitError(f"Give either {opt('example')} or {opt('data')}, not both.")
    if data is not None and model is None:
        raise BatchfitError(
            f"{opt('data')} needs {opt('model')} package.module:factory (a function returning "
            "your nn.Module)."
        )
    if val_data is not None and val_fraction:
        raise BatchfitError(f"Give either {opt('val_data')} or {opt('val_fraction')}, not both.")


def _check_no_stream_options(stream: StreamOptions | None, name: str) -> None:
    """Streaming options read ``data`` files; a built-in example is in memory, so they would be
    ignored: refused, as other options that do not apply are."""
    given, default = stream or StreamOptions(), StreamOptions()
    ignored = [
        option
        for option, applies in (
            ("stream", given.stream is True),  # --no-stream: in memory, as the example is
            ("shuffle_buffer", given.shuffle_buffer != default.shuffle_buffer),
            ("prefetch", given.prefetch != default.prefetch),
            ("data_workers", given.workers != default.workers),
        )
        if applies
    ]
    if ignored:
        raise BatchfitError(
            f"{' and '.join(opt(o) for o in ignored)} "
            f"{'applies' if len(ignored) == 1 else 'apply'} only to {opt('data')} files, and "
            f"the built-in example '{name}' is held in memory; leave "
            f"{'it' if len(ignored) == 1 else 'them'} out, or give {opt('data')}."
        )


def _example_task(
    name: str, model: str | None, val_fraction: float | None, loss: str | None, seed: int
) -> Task:
    """A built-in example, with its own validation set (or none, for ``val_fraction`` 0)."""
    if name not in DESCRIPTIONS:
        raise BatchfitError(
            f"Unknown example '{name}'; choose one of {', '.join(sorted(DESCRIPTIONS))}."
        )
    if val_fraction not in (None, 0):
        raise BatchfitError(
            f"The example '{name}' has its own validation set; {opt('val_fraction')} only takes 0 "
            "there (no validation)."
        )
    ex = example(name)
    loaded = ex.load()
    train = TensorSource(loaded.x_train, loaded.y_train, seed=seed)
    val = None if val_fraction == 0 else TensorSource(loaded.x_val, loaded.y_val, shuffle=False)
    factory = model_factory(model) if model else ex.make_model
    label = f"example '{name}'" + (f" with model {model}" if model else "")
    return Task(label, factory, train, val, resolve_loss(loss, loaded.target_kind), ex.lr)


def _held_out(
    train: BatchSource,
    data: str,
    val_fraction: float | None,
    default_fraction: float,
    seed: int,
    notes: list[str],
) -> tuple[BatchSource, BatchSource | None]:
    """Split a validation share off the training data (``val_fraction``, else the command's
    ``default_fraction``)."""
    if val_fraction is None and isinstance(train, IterableSource):
        # The default fraction cannot apply: a stream of unknown length has no rows to hold out.
        notes.append(
            f"no validation: data from '{data}' is an IterableDataset, which cannot be split; "
            f"give {opt('val_data')} for validation ({opt_value('val_fraction', 0)} silences "
            "this note)."
        )
        return train, None
    fraction = default_fraction if val_fraction is None else val_fraction
    if fraction == 0:
        return train, None
    train, val = split_off(train, fraction, seed)
    if isinstance(train, StreamSource):
        notes.append(
            f"validation holds out {fraction:g} of the streamed rows, so each evaluation reads "
            f"all of {opt('data')} again; for big data give {opt('val_data')} (a smaller file) "
            "instead."
        )
    return train, val


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
        f"store the labels as integers, or use {opt_value('loss', 'mse')}."
    )

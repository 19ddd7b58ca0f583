"""What the Python API accepts, turned into what the loop and the probes use.

Data given as ``(x, y)`` tensors or arrays, a torch ``Dataset`` or ``IterableDataset``, a
``DataLoader`` (its dataset and collate function: batchfit chooses the batch size and order, which
is what it measures), or a :class:`~batchfit.data.source.BatchSource` becomes a ``BatchSource``;
a loss given by name, as a function or not at all becomes a :class:`~batchfit.losses.Loss`; and
a model is checked (a module with trainable parameters that hold data) and tried on two samples
before any training, so that a mismatch is one clear error, not a traceback mid-epoch. Validation
data is read to its end at every evaluation, so a stream of unknown length given for it must end
(checked once, up front).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    default_collate,
    default_convert,
)

from batchfit.core.options import opt, opt_value
from batchfit.data.permute import Holdout, validation_count
from batchfit.data.source import BatchSource
from batchfit.data.stream import StreamSource
from batchfit.data.tensors import TensorSource
from batchfit.data.torch_dataset import DatasetSource, IterableSource
from batchfit.errors import BatchfitError, first_line
from batchfit.imports import required_parameters
from batchfit.losses import Loss, LossFn, resolve_loss

#: A DataLoader's collate function: samples in, a batch out.
Collate = Callable[[list[Any]], Any]

#: How train, tune and sweep name their validation data to :func:`as_source`.
VALIDATION = "validation data"
#: Samples a validation ``IterableDataset`` without ``__len__`` may yield: validation reads it to
#: its end at every evaluation, so one that yields more is refused as endless.
VALIDATION_STREAM_LIMIT = 100_000


def as_source(
    data: object, *, seed: int = 0, shuffle: bool = True, what: str = "data"
) -> BatchSource:
    """Wrap what the user gave (tensors, arrays, a Dataset, a BatchSource) as a BatchSource.

    ``what`` names the data in messages. For :data:`VALIDATION` an ``IterableDataset`` must end:
    one with ``__len__`` is read up to that many samples, one without is counted once now and
    refused if it yields over :data:`VALIDATION_STREAM_LIMIT` samples (it would never end).

    Examples:
        >>> src = as_source((torch.zeros(5, 2), torch.zeros(5)))
        >>> src.num_samples
        5
    """
    if isinstance(data, BatchSource):
        return data
    collate_fn, num_workers = None, 0
    if isinstance(data, DataLoader):
        collate_fn, num_workers = _loader_parts(data, what)
        data = data.dataset
    if isinstance(data, IterableDataset):
        if what == VALIDATION:
            return _validation_stream(data, collate_fn)
        return IterableSource(data, collate_fn=collate_fn)
    if isinstance(data, Dataset):
        return DatasetSource(
            data, seed=seed, shuffle=shuffle, num_workers=num_workers, collate_fn=collate_fn
        )
    if isinstance(data, (tuple, list)) and len(data) == 2:
        source = TensorSource(data[0], data[1], seed=seed, shuffle=shuffle)
        # the user's arrays: every value checked now, as a file's are when read
        _check_finite(source.x, "features", what)
        _check_finite(source.y, "target", what)
        return source
    raise BatchfitError(
        f"The {what} must be an (x, y) pair of tensors or arrays, a torch Dataset, "
        f"IterableDataset or DataLoader, or a BatchSource; got {type(data).__name__}."
    )


def _loader_parts(loader: DataLoader, what: str) -> tuple[Collate | None, int]:
    """The collate function and worker count of the user's ``DataLoader``, whose dataset batchfit
    reads in batches of its own sizes; a sampler that picks other samples than one pass over the
    dataset (weighted, a subset, a shard) cannot be honoured, and is refused."""
    sampler = loader.sampler
    if not isinstance(loader.dataset, IterableDataset):
        batch_sampler = loader.batch_sampler
        plain = isinstance(sampler, SequentialSampler) or (
            isinstance(sampler, RandomSampler)
            and not sampler.replacement
            and sampler.num_samples == len(loader.dataset)  # type: ignore[arg-type]  # map-style: sized
        )
        if not plain or (batch_sampler is not None and type(batch_sampler) is not BatchSampler):
            custom = sampler if not plain else batch_sampler
            raise BatchfitError(
                f"The {what} is a DataLoader with a {type(custom).__name__}, which batchfit "
                "cannot honour (it draws its own batches of each size it measures, one pass over "
                "the dataset per epoch); pass a DataLoader without a custom sampler, or its "
                "dataset."
            )
    own = loader.collate_fn not in (default_collate, default_convert)
    return (loader.collate_fn if own else None), loader.num_workers


def _validation_stream(
    dataset: IterableDataset, collate_fn: Collate | None = None
) -> IterableSource:
    """``dataset`` as validation data that ends (see :func:`as_source`)."""
    try:
        length = len(dataset)  # type: ignore[arg-type]  # TypeError when unsized
    except TypeError:
        length = None
    if length is not None:
        return IterableSource(dataset, limit=length, collate_fn=collate_fn)
    name = type(dataset).__name__
    count = sum(1 for _ in itertools.islice(iter(dataset), VALIDATION_STREAM_LIMIT + 1))
    if count > VALIDATION_STREAM_LIMIT:
        raise BatchfitError(
            f"The validation data ({name}, an IterableDataset without __len__) yielded over "
            f"{VALIDATION_STREAM_LIMIT:,} samples without ending, and validation reads it to "
            "its end; give a finite one, or define __len__ to read that many samples of it."
        )
    return IterableSource(dataset, limit=VALIDATION_STREAM_LIMIT, collate_fn=collate_fn)


#: The torch optimizers batchfit builds and scales the lr of, by its names for them.
OPTIMIZER_CLASSES = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}
#: Settings of an optimizer that change how it computes, not what: ignored when reading a factory's.
_IMPLEMENTATION = {"params", "foreach", "fused", "capturable", "differentiable"}


def optimizer_name(optimizer: object) -> object:
    """The optimizer as the option table names it: ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (the
    class) becomes ``sgd``, ``adam`` or ``adamw``, whose lr scaling rule batchfit knows (linear for
    SGD, sqrt for the Adam family); anything else is returned for the option's own check."""
    if not isinstance(optimizer, type):
        return optimizer
    if optimizer in OPTIMIZER_CLASSES:
        return OPTIMIZER_CLASSES[optimizer]
    raise BatchfitError(
        f"The optimizer {optimizer.__name__} is not one batchfit builds and scales the lr of; "
        f"give {opt('optimizer')} as torch.optim.SGD, Adam or AdamW (or 'sgd', 'adam', 'adamw')."
    )


def optimizer_options(options: dict[str, Any], settings: tuple[str, ...]) -> dict[str, Any]:
    """``options`` with ``optimizer`` as the option table names it: a class becomes its name
    (:func:`optimizer_name`), and a factory (a callable that takes the parameters and returns a
    ``torch.optim`` SGD, Adam or AdamW) becomes its family, with its lr as the user's ``lr`` and,
    of ``settings`` (the options the caller takes), its ``momentum`` and ``weight_decay``.

    Examples:
        >>> make = lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.8)
        >>> optimizer_options({"optimizer": make}, ("lr", "momentum"))
        {'optimizer': 'sgd', 'lr': 0.05, 'momentum': 0.8}
    """
    given = options.get("optimizer")
    if "optimizer" not in options or isinstance(given, (str, type)) or not callable(given):
        return (
            options
            if "optimizer" not in options
            else options | {"optimizer": optimizer_name(given)}
        )
    name, group = _factory_settings(given)
    if options.get("lr") is not None:
        raise BatchfitError(
            f"The optimizer factory sets the lr ({group['lr']:g}) and {opt('lr')} is given too "
            f"({options['lr']:g}); give the lr in one place."
        )
    found = {"lr": group["lr"], "weight_decay": group["weight_decay"]}
    if name == "sgd":
        found["momentum"] = group["momentum"]
    return options | {"optimizer": name} | {k: v for k, v in found.items() if k in settings}


def _factory_settings(factory: Any) -> tuple[str, dict[str, Any]]:
    """The family and settings of the optimizer ``factory`` builds (tried on one parameter);
    refused when batchfit could not build the same one from its family, lr, momentum and weight
    decay."""
    works = (
        "a callable taking the parameters and returning torch.optim.SGD, Adam or AdamW, e.g. "
        "lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.8)"
    )
    probe = [nn.Parameter(torch.zeros(1))]
    try:
        built = factory(probe)
    except Exception as exc:  # the user's factory: say what it must be
        raise BatchfitError(
            f"The optimizer factory raised {type(exc).__name__} ({first_line(exc)}) when given "
            f"the parameters; {opt('optimizer')} takes a name, a class, or {works}."
        ) from None
    name = OPTIMIZER_CLASSES.get(type(built))
    if name is None:
        raise BatchfitError(
            f"The optimizer factory returned {type(built).__name__}, which batchfit cannot scale "
            f"the lr of; {opt('optimizer')} takes 'sgd', 'adam', 'adamw', their torch.optim "
            f"classes, or {works}."
        )
    group = built.param_groups[0]
    keep = {k: group[k] for k in ("lr", "momentum", "weight_decay") if k in group}
    plain = type(built)(probe, **keep).param_groups[0]
    other = sorted(k for k in group if k not in _IMPLEMENTATION and group[k] != plain.get(k))
    if other:
        raise BatchfitError(
            f"The optimizer factory sets {', '.join(f'{k}={group[k]!r}' for k in other)}, which "
            f"batchfit would not keep (it builds {type(built).__name__} from the lr, momentum and "
            "weight decay only); leave those at their defaults."
        )
    return name, group


def check_model(model: object) -> None:
    """Fail in one line unless ``model`` is an ``nn.Module`` whose parameters hold data (not on
    the meta device), at least one of them trainable, and whose ``forward`` takes one input."""
    if not isinstance(model, nn.Module):
        raise BatchfitError(
            f"The model is a {type(model).__name__}, not a torch.nn.Module; pass the model itself "
            "(an nn.Module)."
        )
    parameters = list(model.parameters())
    if any(p.is_meta for p in itertools.chain(parameters, model.buffers())):
        raise BatchfitError(
            "The model's parameters are on the meta device (shapes without data), so it cannot "
            "run; create it on a real device, or materialise it first "
            "(model.to_empty(device='cpu'), then initialise its weights)."
        )
    if not parameters:
        raise BatchfitError(
            f"The model ({type(model).__name__}) has no parameters, so there is nothing to train; "
            "give a model with trainable layers."
        )
    if not any(p.requires_grad for p in parameters):
        raise BatchfitError(
            f"All {len(parameters)} parameter tensors of the model are frozen "
            "(requires_grad=False), so there is nothing to train; unfreeze the layers to train "
            "(p.requires_grad_(True))."
        )
    if type(model).forward is nn.Module.forward:
        raise _no_forward(model, "does not define one")
    extra = required_parameters(model.forward)[1:]
    if extra:
        raise BatchfitError(
            f"The model's forward() needs {', '.join(repr(e) for e in extra)} besides the "
            "features, but each "
            "batch gives it the features only (model(x)); give those parameters a default, or "
            "wrap the model in a module whose forward(x) supplies them."
        )


def _no_forward(model: nn.Module, why: str) -> BatchfitError:
    """The error for a model without a usable ``forward`` (a LightningModule often has none)."""
    return BatchfitError(
        f"The model ({type(model).__name__}) has no usable forward(): it {why}, and batchfit "
        "trains by calling model(x) and applying the loss; define forward(x) to return the "
        "prediction (a LightningModule's training_step is not used), or wrap the network in a "
        "module whose forward(x) does."
    )


def loss_for(source: BatchSource, loss: str | LossFn | Loss | None) -> Loss:
    """``loss`` as a :class:`Loss`: given as one, or resolved by name, callable or, for None, the
    default for the source's target (which reads one batch to learn its kind)."""
    if isinstance(loss, Loss):
        return loss
    return resolve_loss(loss, target_kind_of(source))


def target_kind_of(source: BatchSource) -> str:
    if isinstance(source, StreamSource):
        return source.target_kind
    _, y = next(iter(source.batches(0, 1)))
    if y.dtype == torch.bool:
        return "binary"
    return "real" if y.is_floating_point() else "class"


def _check_finite(values: torch.Tensor, name: str, what: str) -> None:
    """NaN or infinite values in a tensor of the data: named with their count before training,
    not met as a NaN loss that looks like a learning rate too high."""
    if not values.is_floating_point():
        return
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    bad = int((~finite).sum())
    rows = int((~finite.reshape(len(values), -1).all(dim=1)).sum())
    raise BatchfitError(
        f"The {what}'s {name} hold {bad} NaN or infinite values (in {rows} of {len(values)} "
        "samples); fill or drop them before training."
    )


def _check_scalar_loss(value: object, name: str) -> None:
    """A loss must be one number to backpropagate: a vector (a loss without its reduction) is
    named with the fix before training, not met as torch's "grad can be implicitly created only
    for scalar outputs" at the first step."""
    if not isinstance(value, torch.Tensor):
        raise BatchfitError(
            f"The loss '{name}' returned {type(value).__name__}, not a tensor; return a tensor "
            "with one number (e.g. the mean over the batch)."
        )
    if value.numel() != 1:
        raise BatchfitError(
            f"The loss '{name}' returned a tensor of shape {tuple(value.shape)}, not one number; "
            "reduce it over the batch (e.g. .mean()) so that it can be backpropagated."
        )


def check_model_accepts_data(
    model: nn.Module, source: BatchSource, loss: Loss, what: str = "data"
) -> None:
    """Run the model on two samples (eval mode, no gradients) and fail early with both shapes.

    Catches the classic mismatches before any training: a model that cannot train at all
    (:func:`check_model`), features of the wrong width or type, outputs that do not match the
    target, labels beyond the number of classes. For class labels it also makes
    the source check them (:meth:`~batchfit.data.source.BatchSource.expect_classes`): all at once
    for tensors in memory, else each batch on the CPU before it reaches a device.
    """
    check_model(model)
    x, y = next(iter(source.batches(0, min(2, source.num_samples or 2))))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                output = model(x.to(device))
            except NotImplementedError as exc:  # a RuntimeError, but no mismatch of shapes
                why = f"raised NotImplementedError ({first_line(exc)})"
                raise _no_forward(model, why) from None
            except (RuntimeError, ValueError, IndexError) as exc:
                _raise_if_dtype_mismatch(model, x, exc)
                raise BatchfitError(
                    f"The model does not accept the {what}: each sample has shape "
                    f"{tuple(x.shape[1:])}{_expected_input(model)}. torch said: "
                    f"{first_line(exc)}. Fix {opt('features')} or the model's input layer."
                ) from None
            if not isinstance(output, torch.Tensor):
                raise BatchfitError(
                    f"The model returned {type(output).__name__}, not a tensor; return the "
                    "prediction tensor from forward()."
                )
            if loss.kind == "class":
                _check_class_scores(output, loss)
                # F.cross_entropy takes classes on dim 1: (N, C) or (N, C, d1, ...)
                source.expect_classes(output.shape[1])
            try:
                value = loss.fn(output, y.to(device))
            except BatchfitError:
                raise
            except (RuntimeError, ValueError, IndexError) as exc:
                raise BatchfitError(
                    f"The loss '{loss.name}' cannot compare the model's output of shape "
                    f"{tuple(output.shape)} with the target of shape {tuple(y.shape)}: "
                    f"{first_line(exc)}."
                ) from None
            except Exception as exc:  # the user's own loss raised something else: say where
                raise BatchfitError(
                    f"The loss '{loss.name}' raised {type(exc).__name__}: {first_line(exc)}, "
                    f"tried on the first samples before training (output of shape "
                    f"{tuple(output.shape)}, target of shape {tuple(y.shape)}); fix the loss "
                    "function."
                ) from None
            _check_scalar_loss(value, loss.name)
    finally:
        model.train(was_training)


def _check_class_scores(output: torch.Tensor, loss: Loss) -> None:
    """A class loss needs one score per class and sample: (N, C), not one number per sample."""
    if output.ndim < 2:
        raise BatchfitError(
            f"The model's output has shape {tuple(output.shape)}, one number per sample, but the "
            f"loss '{loss.name}' needs one score per class, shape (N, C); make the last layer "
            f"output C values per sample (no squeeze or flatten to 1-D), or, for a numeric "
            f"target, use {opt_value('loss', 'mse')}."
        )


def _raise_if_dtype_mismatch(model: nn.Module, x: torch.Tensor, exc: Exception) -> None:
    parameter = next(model.parameters(), None)
    if parameter is None or x.dtype == parameter.dtype or not parameter.is_floating_point():
        return
    if x.is_floating_point():
        raise BatchfitError(
            f"The data is {x.dtype} but the model's parameters are {parameter.dtype}; convert one "
            f"to the other (e.g. x.float() or model.double()). torch said: "
            f"{first_line(exc)}"
        ) from None
    raise BatchfitError(
        f"The features are {x.dtype} (integers) but the model's parameters are "
        f"{parameter.dtype}; convert the features to floats (x.float()), or, if they are "
        "category or token ids, start the model with an nn.Embedding. torch said: "
        f"{first_line(exc)}"
    ) from None


def _expected_input(model: nn.Module) -> str:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return f", but the model's first layer expects {module.in_features} features"
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            channels = module.in_channels
            return (
                f", but the model's first layer expects {channels} input "
                f"channel{'' if channels == 1 else 's'}"
            )
    return ""


def split_off(source: BatchSource, fraction: float, seed: int) -> tuple[BatchSource, BatchSource]:
    """``(the rest, a seeded share of the samples)``: the same held-out rows whether the data
    are tensors in memory, a streamed file or a torch Dataset; a stream of unknown length cannot
    be split."""
    if isinstance(source, (TensorSource, StreamSource)):
        return source.split(fraction, seed)
    if isinstance(source, DatasetSource):
        n = source.num_samples
        # The same rows as TensorSource.split and StreamSource.split hold out.
        held_out = Holdout(n, validation_count(n, fraction), seed).all_rows()
        train_rows, val_rows = np.flatnonzero(~held_out).tolist(), np.flatnonzero(held_out).tolist()
        workers, collate = source.num_workers, source.collate_fn
        train = DatasetSource(
            torch.utils.data.Subset(source.dataset, train_rows),
            seed=source.seed,
            num_workers=workers,
            collate_fn=collate,
        )
        val = DatasetSource(
            torch.utils.data.Subset(source.dataset, val_rows),
            shuffle=False,
            num_workers=workers,
            collate_fn=collate,
        )
        return train, val
    raise BatchfitError(
        f"A stream cannot be split for validation; give {opt('val_data')}, or "
        f"{opt_value('val_fraction', 0)}."
    )

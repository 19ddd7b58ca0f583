"""The Hugging Face ``Trainer``: measured batch size, accumulation and learning rate in its
``TrainingArguments``, a one-line change for its users.

A Hugging Face model takes a dict of token tensors (``input_ids``, ``attention_mask``, ...) and
returns an output object with ``.logits``; batchfit's probes give a model one tensor and compare
its output tensor with a target. So the data set's samples are packed into one integer tensor
(one row per model input, stacked) with the label as the target, and the model is wrapped in a
module whose ``forward`` unpacks that tensor and returns the logits. The loss is then the one the
labels call for (cross-entropy for class ids, mse for floats), or the user's. Labels per token (a
language model) are measured with the model's own loss instead, ``model(**inputs,
labels=labels).loss``, the one the Trainer trains on. ``transformers`` is imported only here, so
``import batchfit`` never loads it.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from batchfit.errors import BatchfitError

try:
    import transformers
except ImportError:
    raise BatchfitError(
        "batchfit.integrations.hf needs the transformers package, which is not installed; "
        "install it with pip install 'batchfit[hf]'."
    ) from None

from batchfit.integrations.tune_log import log_tune_result, tune_precision
from batchfit.losses import Loss, LossFn
from batchfit.orchestrate.tune import TuneResult, tune

logger = logging.getLogger(__name__)

#: Keys of a Hugging Face sample that hold its target.
LABEL_KEYS = ("labels", "label")
#: Pads per-token labels with the value Hugging Face losses ignore (-100).
IGNORED_LABEL_KEY = "labels (ignored)"
#: ``TrainingArguments.optim`` values measured as batchfit's ``sgd``; the rest as ``adamw``.
SGD_OPTIMIZERS = ("sgd",)
#: The input that holds token ids, checked against the model's embedding.
TOKEN_IDS = "input_ids"


def _forward_inputs(model: nn.Module, sample: dict[str, Any]) -> tuple[str, ...]:
    """The sample's keys the model's ``forward`` takes, labels aside, in the sample's order."""
    accepted = set(inspect.signature(model.forward).parameters)
    keys = tuple(k for k in sample if k in accepted and k not in LABEL_KEYS)
    if not keys:
        raise BatchfitError(
            f"The training data's samples have keys {sorted(sample)}, none of which the model's "
            "forward() takes; give samples with the model's inputs (e.g. input_ids) and labels."
        )
    return keys


class PackedDataset(Dataset):
    """A data set of dict samples as ``(packed inputs, label)`` pairs: the inputs named by
    ``keys`` stacked into one ``(len(keys), L)`` tensor, the label from ``labels``/``label``.

    Samples of different lengths (tokenized without padding, for a collator that pads each batch)
    are padded on the right to the longest sample's length ``L``, with ``pad_values`` (the pad
    token for ``input_ids``, 0 for the attention mask and the rest): every batch tune measures is
    as long as the longest a Trainer can meet, so the memory ceiling holds for every batch.
    """

    def __init__(
        self, dataset: Any, keys: Sequence[str], pad_values: dict[str, int] | None = None
    ) -> None:
        self.dataset, self.keys = dataset, tuple(keys)
        self.pad_values = pad_values or {}
        lengths: set[int] = set()
        #: The largest token id in ``input_ids`` (None without them): checked against the
        #: model's embedding before anything is measured.
        self.largest_id: int | None = None
        for i in range(len(dataset)):  # one pass: a large data set is read once
            sample = dataset[i]
            lengths.update(len(sample[k]) for k in self.keys)
            if TOKEN_IDS in self.keys and len(sample[TOKEN_IDS]):
                top = int(torch.as_tensor(sample[TOKEN_IDS]).max())
                self.largest_id = top if self.largest_id is None else max(self.largest_id, top)
        self.length = max(lengths, default=0)
        #: Whether samples differ in length (and are padded to ``length``).
        self.padded = len(lengths) > 1

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.dataset[index]
        label_key = next((k for k in LABEL_KEYS if k in sample), None)
        if label_key is None:
            raise BatchfitError(
                f"Sample {index} of the training data has no 'labels' or 'label' key "
                f"(keys: {sorted(sample)}); add the target the model learns under 'labels'."
            )
        packed = torch.stack([self._padded(sample[k], k) for k in self.keys])
        label = torch.as_tensor(sample[label_key])
        if label.dim() > 0:  # one label per token (a language model): padding is ignored
            label = self._padded(label, IGNORED_LABEL_KEY)
        return packed, label

    def _padded(self, value: Any, key: str) -> torch.Tensor:
        tensor = torch.as_tensor(value)
        missing = self.length - len(tensor)
        return F.pad(tensor, (0, missing), value=self.pad_values.get(key, 0)) if missing else tensor


def _pad_values(model: nn.Module) -> dict[str, int]:
    """What pads each input: the model's pad token for ``input_ids`` (0 without one), else 0."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return {"input_ids": int(pad) if pad is not None else 0, IGNORED_LABEL_KEY: -100}


class PackedInputModel(nn.Module):
    """``model`` taking one packed tensor (see :class:`PackedDataset`) and returning its logits."""

    def __init__(self, model: nn.Module, keys: Sequence[str]) -> None:
        super().__init__()
        self.model, self.keys = model, tuple(keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = {k: x[:, i] for i, k in enumerate(self.keys)}
        output = self.model(**inputs)
        logits = output.logits if hasattr(output, "logits") else output[0]
        return logits


class OwnLossModel(nn.Module):
    """``model`` as tune sees it when its labels are per token (a causal or masked language model,
    token classification): forward passes the packed inputs through, and :meth:`loss` is the
    model's own loss, ``model(**inputs, labels=labels).loss``, as the Trainer computes it."""

    def __init__(self, model: nn.Module, keys: Sequence[str]) -> None:
        super().__init__()
        self.model, self.keys = model, tuple(keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        inputs = {k: x[:, i] for i, k in enumerate(self.keys)}
        return self.model(**inputs, labels=labels).loss


def _optimizer_of(args: transformers.TrainingArguments) -> str:
    optim = str(getattr(args.optim, "value", args.optim))
    return "sgd" if optim in SGD_OPTIMIZERS else "adamw"


def _with_the_users_lr_as_prior(
    options: dict[str, Any], args: transformers.TrainingArguments
) -> None:
    """The user's ``learning_rate`` as tune's prior (``warmup_lr``), at the batch it was set for
    (per-device batch x accumulation x devices): the noise probe warms up at it, and when the
    range test cannot pick an lr, it is the one scaled to the chosen batch and raced around. The
    range test still measures, so the lr is not frozen; ``lr=`` in the options freezes it
    instead (scaled by the rule from ``lr_batch_size``), and a ``warmup_lr`` given wins."""
    if "lr" in options or "warmup_lr" in options:
        return
    options["warmup_lr"] = float(args.learning_rate)
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
    options.setdefault("lr_batch_size", batch * max(1, args.world_size))


def _nonempty(dataset: Any, name: str) -> None:
    """An empty data set is refused in one line (a Hugging Face one gets ``IndexError`` at [0])."""
    try:
        empty = len(dataset) == 0
    except TypeError:  # no length (a stream): its first sample says the rest
        return
    if empty:
        raise BatchfitError(
            f"The {name} is empty (0 samples), so there is nothing to measure on; give "
            f"tuned_arguments the {name} the Trainer uses, with its samples (check the split "
            "and any filter that built it)."
        )


def _check_token_ids(data: PackedDataset, model: nn.Module, name: str) -> None:
    """Token ids past the model's embedding, refused in one line before anything is measured
    (measured, they fail deep in the embedding with an index error)."""
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    size = getattr(embedding, "num_embeddings", None)
    if size is None or data.largest_id is None or data.largest_id < size:
        return
    raise BatchfitError(
        f"The {name}'s {TOKEN_IDS} go up to {data.largest_id}, but the model's embedding holds "
        f"{size} tokens (ids 0-{size - 1}); tokenize with the model's own tokenizer, or grow the "
        f"embedding with model.resize_token_embeddings({data.largest_id + 1})."
    )


def _packed(
    model: nn.Module, keys: Sequence[str], train_dataset: Any, eval_dataset: Any | None
) -> tuple[PackedDataset, PackedDataset | None]:
    """The training and evaluation data packed for tune, their token ids checked."""
    pads = _pad_values(model)
    train = PackedDataset(train_dataset, keys, pads)
    _check_token_ids(train, model, "train_dataset")
    held_out = None if eval_dataset is None else PackedDataset(eval_dataset, keys, pads)
    if held_out is not None:
        _check_token_ids(held_out, model, "eval_dataset")
    return train, held_out


def tuned_arguments(
    model: nn.Module,
    train_dataset: Any,
    args: transformers.TrainingArguments,
    *,
    eval_dataset: Any | None = None,
    loss: str | LossFn | Loss | None = None,
    time_budget: float | None = None,
    log: Callable[[str], None] | None = None,
    **tune_options: Any,
) -> tuple[transformers.TrainingArguments, TuneResult]:
    """Measure ``model`` on ``train_dataset`` and return ``(a copy of args, the tune result)``
    with ``per_device_train_batch_size`` (the micro-batch that fits),
    ``gradient_accumulation_steps`` and ``learning_rate`` set from the measurement; the reasons
    are logged.

    The change in a Trainer script is one line::

        args, result = tuned_arguments(model, train_dataset, args)

    ``train_dataset`` (and ``eval_dataset``, which then judges tune's race) holds dict samples
    with the model's inputs and ``labels`` (one per sample, or one per token for a language
    model, whose own loss is then measured); inputs of different lengths are measured padded to
    the longest (see :class:`PackedDataset`); ``loss`` defaults to the one
    the labels call for, applied to the model's ``logits``. The optimizer measured follows
    ``args.optim`` (SGD or the AdamW family). ``time_budget`` and ``tune_options`` go to
    :func:`batchfit.tune` (e.g. ``lr=`` to scale your own learning rate instead of measuring it,
    ``max_batch_size``, ``out_dir`` for the report). Across several devices the accumulation is
    divided among them (the batch size counts every device's samples).

    ``args.learning_rate`` is tune's prior, at the batch it was set for (per-device batch x
    accumulation x devices): the noise probe warms up at it, and it is the lr scaled to the
    chosen batch when the range test cannot pick one; the range test and the race still
    measure. The log (``log``, default the logger ``batchfit.integrations.hf``: PROVISIONAL,
    a race not run and skipped phases as warnings) says whether the race ran and every phase
    cut short or skipped.
    """
    _nonempty(train_dataset, "train_dataset")
    if eval_dataset is not None:
        _nonempty(eval_dataset, "eval_dataset")
    first = train_dataset[0]
    if not isinstance(first, dict):
        raise BatchfitError(
            f"The training data's samples are {type(first).__name__}, not dicts of model inputs; "
            "give a Hugging Face style data set (samples like {'input_ids': ..., 'labels': ...})."
        )
    keys = _forward_inputs(model, first)
    say = log or logger.info
    _arguments_as_tune_options(tune_options, model, args, time_budget)
    train, held_out = _packed(model, keys, train_dataset, eval_dataset)
    if train.padded:
        say(
            f"batchfit: samples vary in length; measured at the longest, {train.length} tokens, "
            "so the memory ceiling holds for every batch a padding collator makes."
        )
    wrapped: nn.Module = PackedInputModel(model, keys)
    if train[0][1].dim() > 0 and loss is None:  # labels per token: the model's own loss
        wrapped = OwnLossModel(model, keys)
        loss = wrapped.loss
    result = tune(
        wrapped,
        train,
        val_data=held_out,
        loss=loss,
        log=say,
        **tune_options,
    )
    r = result.recommended
    world = max(1, args.world_size)
    tuned = copy.deepcopy(args)
    tuned.per_device_train_batch_size = r.micro_batch_size
    tuned.gradient_accumulation_steps = max(1, round(r.accumulation / world))
    tuned.learning_rate = r.lr
    log_tune_result(result, say, log or logger.warning)
    return tuned, result


def _precision_of(args: Any) -> str | None:
    """The mixed precision ``TrainingArguments`` train in, in Lightning's names (None: float32).

    >>> from types import SimpleNamespace as A
    >>> _precision_of(A(bf16=True, fp16=False)), _precision_of(A(bf16=False, fp16=False))
    ('bf16-mixed', None)
    """
    if getattr(args, "bf16", False):
        return "bf16-mixed"
    return "16-mixed" if getattr(args, "fp16", False) else None


def _arguments_as_tune_options(
    tune_options: dict[str, Any], model: nn.Module, args: Any, time_budget: float | None
) -> None:
    """What ``TrainingArguments`` tell tune (where ``tune_options`` do not say otherwise): the
    optimizer family, the seed, the run's length, the user's lr as the prior."""
    if time_budget is not None:
        tune_options["time_budget"] = time_budget
    tune_options.setdefault("optimizer", _optimizer_of(args))
    tune_options.setdefault("seed", args.seed)
    tune_options.setdefault("task_name", type(model).__name__)
    # measured in the Trainer's precision (bf16/fp16 are bf16-mixed/16-mixed autocast there too)
    tune_options.setdefault("precision", tune_precision(_precision_of(args))[0])
    if getattr(args, "torch_compile", False):  # the Trainer compiles: measure compiled
        tune_options.setdefault("compile", True)
    for name, value in _run_length(args).items():  # the answer is for the Trainer's run
        tune_options.setdefault(name, value)
    _with_the_users_lr_as_prior(tune_options, args)


def _run_length(args: Any) -> dict[str, int]:
    """``TrainingArguments``' run as tune's horizon: ``max_steps`` when set (it overrides the
    epochs, as the Trainer counts), else ``num_train_epochs`` rounded up (a fraction of an epoch
    is still part of the run)."""
    steps = getattr(args, "max_steps", -1)
    if isinstance(steps, int) and steps > 0:
        return {"max_steps": steps}
    epochs = getattr(args, "num_train_epochs", None)
    if isinstance(epochs, (int, float)) and epochs > 0:
        return {"epochs": math.ceil(epochs)}
    return {}

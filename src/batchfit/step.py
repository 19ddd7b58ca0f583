"""What the training loop and the probes share: the optimizer, one training step, evaluation,
and the device and batch-norm facts every run needs.

Both :mod:`batchfit.loop` and :mod:`batchfit.probe` build on this module, so a probe trains exactly
as the loop does, and neither imports the other.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import nn

from batchfit.core import options
from batchfit.core.options import opt_value
from batchfit.data.source import BatchSource
from batchfit.errors import BatchfitError
from batchfit.losses import Loss, LossFn, correct_count
from batchfit.precision import NO_SCALING, LossScaler

DEFAULT_LR = {name: options.default_of("lr", optimizer=name) for name in options.OPTIMIZERS}


def make_optimizer(
    name: str, model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float | None = None
) -> torch.optim.Optimizer:
    """``sgd`` (with momentum), ``adam`` or ``adamw``; weight decay defaults to torch's default."""
    options.check("optimizer", name)
    params = model.parameters()
    extra: dict[str, Any] = {} if weight_decay is None else {"weight_decay": weight_decay}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, **extra)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **extra)
    return torch.optim.AdamW(params, lr=lr, **extra)


def params_sha256(model: nn.Module) -> str:
    """SHA-256 over the parameters sorted by name (name, dtype, shape and bytes of each)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        # reshape: a 0-dim tensor cannot be viewed as bytes (its shape is in the header above)
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def evaluate(
    model: nn.Module,
    source: BatchSource,
    loss: Loss,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Mean loss (and accuracy for classification) over ``source``, in eval mode, no gradients."""
    was_training = model.training
    model.eval()
    total_loss, total_correct, count = 0.0, 0, 0
    try:
        with torch.no_grad():
            for x, y in source.batches(0, batch_size):
                x, y = x.to(device), y.to(device)
                output = model(x)
                total_loss += loss.fn(output, y).item() * len(y)
                if loss.has_accuracy:
                    total_correct += int(correct_count(output, y, loss.kind))
                count += len(y)
    finally:
        model.train(was_training)
    result = {"loss": total_loss / count if count else math.nan}
    if loss.has_accuracy:
        result["accuracy"] = total_correct / count if count else math.nan
    return result


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    micro_batch_size: int,
    device: torch.device,
    scaler: LossScaler | None = None,
) -> tuple[torch.Tensor, int]:
    """One optimizer update on one batch; returns (mean loss as a detached tensor, iterations).

    Micro-batch losses are weighted by their share of the batch, so the accumulated gradient is the
    mean gradient of the whole batch whatever the split (docs/design.md: no flooring). With a
    ``scaler`` (float16), each part's backward is scaled and the one update unscales first.
    """
    optimizer.zero_grad(set_to_none=True)
    n = len(y)
    if n <= micro_batch_size and scaler is None:
        if device.type != "cpu":  # on CPU, .to() is a no-op that still costs a call per tensor
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach(), 1
    scaling = scaler or NO_SCALING
    total = torch.zeros((), device=device)
    parts = 0
    for xs, ys in zip(x.split(micro_batch_size), y.split(micro_batch_size), strict=True):
        weight = len(ys) / n
        loss = loss_fn(model(xs.to(device, non_blocking=True)), ys.to(device, non_blocking=True))
        scaling.backward(loss * weight)
        total += loss.detach() * weight
        parts += 1
    scaling.step(optimizer)
    return total, parts


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise BatchfitError(f"Unknown device '{device}'; use cpu, cuda, cuda:N or auto.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BatchfitError(
            f"{opt_value('device', str(device))} was asked for, but no CUDA device is "
            "available; use cpu."
        )
    return resolved


def smallest_trainable_size(model: nn.Module) -> int:
    """The smallest batch (or micro-batch) ``model`` can train on: 2 with batch norm, which cannot
    normalise over one sample in training mode, else 1. Every probe starts its sizes here.

    >>> smallest_trainable_size(torch.nn.Linear(2, 1))
    1
    >>> smallest_trainable_size(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4)))
    2
    """
    return 2 if has_batch_norm(model) else 1


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` has a batch-norm layer (which cannot train on a batch of one sample)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a timing or a memory reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))

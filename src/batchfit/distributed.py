"""Training on several processes with PyTorch's own engine: torchrun and DistributedDataParallel.

Why this shape: the loop keeps counting in *global* batches. Every rank walks the same global
batches in the same order (so positions, step counts, resume and ``batchfit plan --world-size W``
are those of one process), takes its share of each (:func:`~batchfit.core.accounting.rank_share`)
and runs it as micro-batches under ``no_sync`` but the last. Each micro-batch loss is weighted by
``len(ys) * W / B``; DDP averages over the ``W`` ranks, so the update is the mean gradient of the
whole global batch, exactly as on one device, even when ``W`` does not divide ``B``.

A source that reads only its rank's rows (a stream: ``BatchSource.reads_rank_share``) is
wrapped by :func:`shard`: each rank then decodes about ``1/W`` of the data and its share of a step
arrives as a :class:`RankShare`, which knows the global batch's size; the update is the same mean
gradient over the global batch, whose rows are grouped otherwise than on one process.

Only rank 0 writes (metrics, checkpoints, weights, reports) and prints; every rank takes every
step. No collective is issued outside the step, so a rank that fails leaves the others blocked in
at most one all-reduce, which fails as soon as the failed rank's connection closes (and torchrun
ends the remaining ranks).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from batchfit.core.accounting import rank_share
from batchfit.data.source import Batch, BatchSource, rank_rows
from batchfit.errors import BatchfitError, ReportedByRank0
from batchfit.losses import LossFn
from batchfit.precision import NO_SCALING, LossScaler

T = TypeVar("T")

#: Seconds a collective may wait for a silent rank before it fails (``BATCHFIT_DIST_TIMEOUT``).
DEFAULT_TIMEOUT_S = 300


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by ``torchrun`` (its environment says so)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def join_from_env() -> bool:
    """Join the process group that torchrun's environment describes; True if this call did.

    The backend serves both devices: gloo for CPU tensors, NCCL for CUDA ones (when there is a
    GPU), so ``--device cpu`` on a GPU node works too.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        return False
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    timeout = timedelta(seconds=float(os.environ.get("BATCHFIT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    dist.init_process_group(backend=backend, timeout=timeout)
    return True


def leave() -> None:
    """Leave the process group (at the end of a command that joined it)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Processes training together: the initialised group's size, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


_rank, _world = rank, world_size


def is_main() -> bool:
    """Whether this process writes and prints: rank 0, or the only process."""
    return rank() == 0


def place(device: torch.device) -> torch.device:
    """This rank's device: ``cuda`` without an index becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if device.type == "cuda" and device.index is None and world_size() > 1:
        return torch.device("cuda", local_rank())
    return device


def wrap(model: nn.Module, device: torch.device) -> DistributedDataParallel | None:
    """``model`` in DistributedDataParallel when several processes train, else None.

    DDP broadcasts rank 0's parameters and buffers here, so every rank starts from the same
    weights whatever each built."""
    if world_size() == 1:
        return None
    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


class RankShare:
    """This rank's labels of one global step, and the step's size over all ranks (``len``)."""

    __slots__ = ("labels", "global_size")

    def __init__(self, labels: torch.Tensor, global_size: int) -> None:
        self.labels, self.global_size = labels, global_size

    def __len__(self) -> int:
        return self.global_size


class _Sharded(BatchSource):
    """A source whose ranks read disjoint rows, seen by the loop as global batches: each step
    yields ``(x share, RankShare)``, the step's global size worked out from positions alone."""

    def __init__(self, source: BatchSource) -> None:
        self.source = source

    @property
    def num_samples(self) -> int | None:
        return self.source.num_samples

    @property
    def columns(self) -> dict[str, int | None] | None:  # type: ignore[override]  # the wrapped source's
        return self.source.columns

    def batches(
        self,
        epoch: int,
        batch_size: int,
        *,
        start: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        n = self.source.num_samples
        assert n is not None  # in-memory data: its length is known
        end = n - n % batch_size if drop_last else n
        sizes = rank_rows(start, end, batch_size, 0, 1).shares
        shares = self.source.batches(
            epoch, batch_size, start=start, drop_last=drop_last, rank=_rank(), world_size=_world()
        )
        try:
            for size, (x, y) in zip(sizes, shares, strict=True):
                yield x, RankShare(y, size)  # type: ignore[misc]  # a y with its rank's share
        finally:
            if hasattr(shares, "close"):
                shares.close()

    def describe(self) -> str:
        return self.source.describe()

    def fingerprint(self) -> dict[str, Any]:
        return self.source.fingerprint()

    def expect_classes(self, classes: int) -> None:
        self.classes = classes
        self.source.expect_classes(classes)


def shard(source: BatchSource) -> BatchSource:
    """``source`` as the training loop reads it on this rank: a source that reads only its
    rank's rows is wrapped (:class:`_Sharded`) when several processes train; others walk the
    global batches and each rank slices its share (:func:`ddp_train_step`)."""
    if world_size() == 1 or not source.reads_rank_share or source.num_samples is None:
        return source
    return _Sharded(source)


def check_world_size_matches(saved: int | None, path: object) -> None:
    """Refuse to resume a checkpoint made by another number of processes."""
    now = world_size()
    if saved is not None and saved != now:
        raise BatchfitError(
            f"The checkpoint '{path}' was made by {saved} training processes, not {now}; resume "
            f"under torchrun with {saved} processes in all (nodes x processes per node), or "
            "start over with a new checkpoint folder."
        )


def ddp_train_step(
    model: DistributedDataParallel,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor | RankShare,
    micro_batch_size: int,
    device: torch.device,
    scaler: LossScaler | None = None,
) -> tuple[torch.Tensor, int]:
    """One update on a global batch ``(x, y)``: this rank's share, in micro-batches; returns the
    mean loss over the whole global batch (all-reduced) and this rank's iterations. With ``y`` a
    :class:`RankShare`, ``x`` and its labels are this rank's share already. With a ``scaler``
    (float16) the backward passes are scaled; every rank then sees the same all-reduced
    gradients, so all skip an overflowed step together."""
    optimizer.zero_grad(set_to_none=True)
    n, world = len(y), dist.get_world_size()
    if isinstance(y, RankShare):  # this rank's rows already (a sharded stream)
        xs_all, ys_all = x, y.labels
    else:
        share = rank_share(n, dist.get_rank(), world)
        xs_all, ys_all = x[share], y[share]
    scale = world / n
    if len(ys_all) == 0:  # a last batch smaller than W: still take part in the all-reduce
        return _empty_share_step(model, optimizer, xs_all, x, y, device, scaler), 1
    pieces = list(zip(xs_all.split(micro_batch_size), ys_all.split(micro_batch_size), strict=True))
    scaling = scaler or NO_SCALING
    total = torch.zeros((), device=device)
    for i, (xs, ys) in enumerate(pieces):
        with model.no_sync() if i < len(pieces) - 1 else nullcontext():
            loss = loss_fn(model(xs.to(device)), ys.to(device))
            scaling.backward(loss * (len(ys) * scale))
        total += loss.detach() * (len(ys) * scale / world)
    dist.all_reduce(total)  # the global batch's mean loss, as one process would log it
    scaling.step(optimizer)
    return total, len(pieces)


def _empty_share_step(
    model: DistributedDataParallel,
    optimizer: torch.optim.Optimizer,
    xs: torch.Tensor,
    x: torch.Tensor,
    y: object,
    device: torch.device,
    scaler: LossScaler | None = None,
) -> torch.Tensor:
    """A step where this rank holds no row (a last batch smaller than W): a zero-weighted
    forward and backward keep it in the gradient all-reduce; then the loss all-reduce."""
    rows = x[:1] if not isinstance(y, RankShare) else xs
    out = model(rows.to(device))
    scaling = scaler or NO_SCALING
    scaling.backward(out.sum() * 0.0)
    total = torch.zeros((), device=device)
    dist.all_reduce(total)
    scaling.step(optimizer)
    return total


def on_rank_0(measure: Callable[[], T], wait_s: float) -> T:
    """``measure()`` run by rank 0 alone, its result returned on every rank.

    The other ranks wait for it (up to ``wait_s`` seconds, on a gloo group of its own, so a
    long measurement outlasts the training timeout, whatever the device). A
    :class:`~batchfit.errors.BatchfitError` on rank 0 is raised on every rank with its message
    (a :class:`~batchfit.errors.ReportedByRank0` on the others); a rank 0 that dies ends the job
    through torchrun."""
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_s))
    box: list[tuple[str, Any] | None] = [None]
    try:
        if rank() == 0:
            try:
                box[0] = ("result", measure())
            except BatchfitError as exc:
                box[0] = ("error", str(exc))
                dist.broadcast_object_list(box, src=0, group=group, device=torch.device("cpu"))
                raise
        dist.broadcast_object_list(box, src=0, group=group, device=torch.device("cpu"))
    finally:
        dist.destroy_process_group(group)
    sent = box[0]
    assert sent is not None  # rank 0 always sends one
    kind, value = sent
    if kind == "error":
        raise ReportedByRank0(str(value))  # rank 0's command line says it, once
    return cast(T, value)


def on_every_rank(measure: Callable[[], T], wait_s: float) -> list[T]:
    """``measure()`` run by every rank at the same time; every rank's result, in rank order, on
    every rank (gathered on a gloo group of its own that waits up to ``wait_s`` seconds).

    A :class:`~batchfit.errors.BatchfitError` on any rank is raised on every rank: the lowest
    failing rank's message, naming that rank unless it is rank 0 or every rank failed alike
    (a :class:`~batchfit.errors.ReportedByRank0` on all ranks but 0, whose command line says it
    once). A rank that dies ends the job through torchrun."""
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_s))
    try:
        try:
            mine: tuple[str, object] = ("result", measure())
        except BatchfitError as exc:
            mine = ("error", str(exc))
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine, group=group)
    finally:
        dist.destroy_process_group(group)
    errors = [(r, value) for r, (kind, value) in enumerate(every) if kind == "error"]
    if errors:
        raise _error_of_ranks(errors, len(every))
    return [value for _, value in every]


def _error_of_ranks(errors: list[tuple[int, str]], world: int) -> BatchfitError:
    """The one error every rank raises for the ranks that failed (``(rank, message)`` pairs)."""
    first, message = errors[0]
    alike = len(errors) == world and len({m for _, m in errors}) == 1
    if first != 0 and not alike:
        message = f"On rank {first} of {world}: {message}"
    if rank() != 0:
        return ReportedByRank0(message)  # rank 0's command line says it, once
    return BatchfitError(message)

"""The gradient noise scale under torchrun, from the ranks' own gradients and their all-reduce.

Why: data-parallel training computes two batch sizes' gradients anyway: each rank's local
gradient over its micro-batch ``b`` (the small batch) and their all-reduced mean over ``b W``
samples (the large batch). Their squared norms feed the same unbiased two-batch estimator as the
single-process probe (:mod:`batchfit.core.noise_estimator`), so every rank's device works on the
measurement instead of waiting for rank 0.

Rank 0 leads: it runs the probe of :func:`batchfit.probe.noise.warmup_and_measure` (readings at
the initial weights, the warm-up, the measured steps, its deadline and seed) and, before each
step, tells the other ranks to take one and broadcasts its weights, so every rank starts each
step from rank 0's parameters whatever it built. Each rank takes its slice ``[r b, (r + 1) b)`` of
the same seeded stream of ``b W`` batches. Rank 0 ends the run (also when it fails) by telling
the others to stop; every model is put back as it was (:func:`~batchfit.probe.harness.preserved`).
All collectives run on a gloo group of their own (CPU tensors), so no DDP wrapper is needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from batchfit.data.source import Batch, BatchSource
from batchfit.errors import BatchfitError
from batchfit.losses import LossFn
from batchfit.probe.gradients import gradients_of, squared_norm, trainable_parameters
from batchfit.probe.harness import Deadline, cycle_batches, preserved
from batchfit.probe.noise import (
    NoiseMeasurement,
    NoiseSettings,
    WarmUp,
    measure_gradient_error,
    read_at_initial_weights,
    summarise_noise,
    train_and_read,
)
from batchfit.step import make_optimizer

#: What rank 0 broadcasts before each step (the micro-batch), or to end the run.
STOP = 0
#: The measurement's note that says where it came from (a fact, not something cut short).
FROM_RANKS = "Measured from {world} ranks' gradients and their all-reduce"


class JointProbe:
    """The joint probe's gloo group, whose collectives wait up to ``wait_s`` seconds (rank 0 may
    spend a while alone, on its gradient-error curve), and whether rank 0 has told the others to
    stop. Every rank creates it at the same point; rank 0 calls :meth:`stop` once it is done,
    whether or not it ran the probe, and every rank :meth:`close` at the end."""

    def __init__(self, wait_s: float) -> None:
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_s))
        self.stopped = False

    def stop(self) -> None:
        """On rank 0: tell the others the probe is over (once)."""
        if not self.stopped:
            self.stopped = True
            _command(STOP, self.group)

    def close(self) -> None:
        """On every rank: leave the group once every rank is done with it (rank 0 destroying
        it while its last broadcast is still in flight aborts the process)."""
        dist.barrier(group=self.group)
        dist.destroy_process_group(self.group)


def _command(value: int, group: dist.ProcessGroup) -> int:
    """Rank 0's ``value`` on every rank."""
    box = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(box, src=0, group=group)
    return int(box.item())


def rank_step(
    model: nn.Module, loss_fn: LossFn, batch: Batch, micro_batch_size: int, group: dist.ProcessGroup
) -> tuple[float, float, float]:
    """One joint step on every rank: rank 0's weights, this rank's slice of ``batch``; returns
    ``(mean over ranks of |g_b|^2, |g_bW|^2, mean loss)`` and leaves the all-reduced gradient
    in ``p.grad``."""
    params = trainable_parameters(model)
    flat = torch.cat([p.detach().reshape(-1).cpu() for p in params])
    dist.broadcast(flat, src=0, group=group)
    with torch.no_grad():
        for p, part in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.copy_(part.view_as(p))
    world, r = dist.get_world_size(group), dist.get_rank(group)
    x, y = batch
    rows = slice(r * micro_batch_size, (r + 1) * micro_batch_size)
    for p in params:
        p.grad = None
    loss = loss_fn(model(x[rows].to(params[0].device)), y[rows].to(params[0].device))
    loss.backward()
    grads = gradients_of(params)
    local = torch.stack([squared_norm(grads).cpu(), loss.detach().double().cpu()])
    summed = torch.cat([g.detach().reshape(-1).cpu() for g in grads])
    dist.all_reduce(summed, group=group)
    dist.all_reduce(local, group=group)
    parts = summed.div_(world).split([p.numel() for p in params])
    reduced = [part.view_as(p).to(p.device, p.dtype) for p, part in zip(params, parts, strict=True)]
    for p, g in zip(params, reduced, strict=True):
        p.grad = g
    big_sq = float(squared_norm(reduced))
    small_sq, mean_loss = (local / world).tolist()
    return small_sq, big_sq, mean_loss


def lead_noise_probe(
    model: nn.Module,
    data: BatchSource,
    loss_fn: LossFn,
    probe: JointProbe,
    settings: NoiseSettings,
    *,
    deadline: Deadline,
    log: Callable[[str], None] | None = None,
) -> NoiseMeasurement:
    """Rank 0's side of the joint probe: :func:`~batchfit.probe.noise.warmup_and_measure` with
    ``B_small = settings.micro_batch_size`` (one rank's gradient) and ``B_big = B_small x W`` (the
    all-reduced one: ``settings.accumulation`` must be ``W``, the number of ranks); the other
    ranks run :func:`follow_noise_probe` meanwhile. Its notes say where it came from
    (:data:`FROM_RANKS`), a fact apart from what it cut short."""
    group = probe.group
    started, world = time.perf_counter(), dist.get_world_size(group)
    try:
        if settings.accumulation != world:
            raise BatchfitError(
                f"The joint noise probe reads one micro-batch per rank: give accumulation "
                f"{world} (the number of ranks), not {settings.accumulation}."
            )
        with preserved(model):
            model.train()
            optim = make_optimizer(settings.optimizer, model, settings.lr)
            stream = cycle_batches(data, settings.batch_size)

            def step() -> tuple[float, float, float]:
                batch = next(stream)
                _command(settings.micro_batch_size, group)
                return rank_step(model, loss_fn, batch, settings.micro_batch_size, group)

            state = read_at_initial_weights(WarmUp(), step, deadline)
            state = train_and_read(state, step, optim, settings, deadline, log or (lambda _: None))
            probe.stop()  # the others are done; the gradient-error curve is rank 0's alone
            state = measure_gradient_error(state, model, data, loss_fn, settings, deadline)
    finally:
        probe.stop()  # also when rank 0 failed (out of time, diverged)
    state = replace(state, facts=(*state.facts, FROM_RANKS.format(world=world) + "."))
    return summarise_noise(state, settings, data.num_samples, started)


def follow_noise_probe(
    model: nn.Module, data: BatchSource, loss_fn: LossFn, probe: JointProbe
) -> int:
    """Another rank's side of the joint probe: take a joint step whenever rank 0 says so, until
    it says stop; returns the steps taken. The model is put back as it was."""
    steps, stream, group = 0, None, probe.group
    with preserved(model):
        model.train()
        while (b := _command(STOP, group)) != STOP:
            if stream is None:
                stream = cycle_batches(data, b * dist.get_world_size(group))
            rank_step(model, loss_fn, next(stream), b, group)
            steps += 1
    return steps

"""``torch.compile`` for training and for tune's probes: compiled once, with dynamic shapes, and
warmed up before anything is timed.

Why dynamic shapes: a compiled forward specialises on its input's shape, so a probe that tries
twelve batch sizes would pay twelve compilations and time the compiler, not the model. With
``dynamic=True`` one graph serves every batch size of two or more; PyTorch specialises a size of
one on its own, and evaluation (no gradients, eval mode) is another graph. :func:`warm_up`
compiles each of those the run will meet, before its clock starts, so step times and
samples/s never count compilation; its seconds are reported apart (:class:`Compiled`).

Why the forward and not the module: ``torch.compile(module)`` returns a wrapper whose
``state_dict`` keys gain an ``_orig_mod.`` prefix. Compiling the module's ``forward`` (an
attribute on the instance for the duration, as :func:`batchfit.precision.measured_in` sets
autocast) keeps the user's module, its ``state_dict``, hooks and checkpoints as they are: weights
saved from a compiled run load into the model uncompiled. A model that is already an
``OptimizedModule`` is unwrapped to its original module (:func:`unwrapped`) and compiled this way.

Examples:
    >>> model = torch.nn.Linear(2, 1)
    >>> unwrapped(model) is model
    True
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from batchfit.losses import LossFn


@dataclass(frozen=True)
class Compiled:
    """What compiling cost: the graphs compiled (``torch._dynamo``'s count of unique graphs, so
    a recompilation anywhere counts) and the seconds the warm-up took, apart from step time."""

    graphs: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"graphs": self.graphs, "seconds": round(self.seconds, 3)}


def is_compiled(model: object) -> bool:
    """True for a module ``torch.compile`` returned (an ``OptimizedModule``)."""
    return isinstance(model, torch._dynamo.eval_frame.OptimizedModule)


def unwrapped(model: nn.Module) -> nn.Module:
    """The user's own module under a ``torch.compile`` wrapper (the module itself otherwise)."""
    return model._orig_mod if is_compiled(model) else model  # type: ignore[return-value]


def graphs_compiled() -> int:
    """The number of graphs ``torch._dynamo`` has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@contextmanager
def compiled_forward(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """For the duration, ``model``'s forward is ``torch.compile(forward, dynamic=True)``; the
    module's own forward comes back afterwards, and its compiled code is dropped with it."""
    if not enabled:
        yield
        return
    own = vars(model).get("forward")
    compiled = torch.compile(model.forward, dynamic=True)

    def forward(*args: Any, **kwargs: Any) -> Any:
        # a view (a micro-batch split from its batch) would need a graph of its own
        return compiled(*(_not_a_view(a) for a in args), **kwargs)

    model.forward = forward
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def _not_a_view(value: Any) -> Any:
    """A tensor that is a view as a tensor of its own (a copy of the input alone, small beside
    the forward's activations); anything else as it is."""
    if isinstance(value, torch.Tensor) and value._base is not None:
        return value.clone()
    return value


def warm_up(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    train_model: Any = None,
    smallest: int = 1,
) -> Compiled:
    """Compile every graph a run meets before it is timed: a training forward and backward at
    two samples or more and, unless the model trains only on two or more (``smallest``), at one;
    and the evaluation forward at both. ``model`` keeps its weights, buffers, gradients, mode and
    torch's random state (nothing is stepped). ``train_model`` is what training calls (DDP's
    wrapper, under autocast; default ``model``); ``x``, ``y`` hold at least two samples."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    rng, training = torch.get_rng_state(), model.training
    train_model = model if train_model is None else train_model
    sizes = [n for n in (2, 1) if n >= smallest and n <= len(y)]
    before, started = graphs_compiled(), time.perf_counter()
    try:
        for n in sizes:
            xs, ys = x[:n].clone(), y[:n].clone()
            model.train()
            loss_fn(train_model(xs), ys).backward()
            model.eval()
            with torch.no_grad():
                train_model(xs)
    finally:
        with torch.no_grad():
            model.load_state_dict(state)
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g
        model.train(training)
        torch.set_rng_state(rng)
    return Compiled(graphs_compiled() - before, time.perf_counter() - started)

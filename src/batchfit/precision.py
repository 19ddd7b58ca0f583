"""Mixed precision: the forward pass and the loss under ``torch.autocast``, as GPU users train.

Why wrappers and not a second step function: every path that trains (the loop's steps, exact
accumulation, DDP, the adaptive batch, the out-of-memory back-off) calls ``model(x)`` and
``loss_fn(output, y)``. Handing them a forward and a loss that enter autocast themselves makes
each of those paths run in the chosen precision without a copy of its code, and the user's module
is untouched: checkpoints hold its own ``state_dict``, loadable in float32.

``bf16-mixed`` and ``16-mixed`` (Lightning's names) keep the weights, gradients and optimizer
state in float32 and run autocast's list of ops in bfloat16 or float16, on CUDA and on the CPU.
bfloat16 has float32's exponent range, so it needs no loss scaling; float16's small gradients
underflow without it, so ``16-mixed`` scales the loss before each backward and unscales before
the update (:class:`LossScaler`, PyTorch's GradScaler, once per optimizer step however many
micro-batches it has), and a step whose scaled gradients overflowed is skipped and counted. The
backward pass runs outside autocast, as PyTorch recommends: autograd replays each op in the
dtype its forward used.

Examples:
    >>> amp = Precision.of("bf16-mixed", torch.device("cpu"))
    >>> forward = amp.forward(torch.nn.Linear(4, 2))
    >>> forward(torch.ones(3, 4)).dtype
    torch.bfloat16
    >>> Precision.of("32", torch.device("cpu")).mixed
    False
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from batchfit.core.options import PRECISIONS, opt_value
from batchfit.errors import BatchfitError
from batchfit.losses import Loss

_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@dataclass(frozen=True)
class Precision:
    """A precision on a device: what autocast runs in (None: float32 throughout)."""

    name: str
    device_type: str
    dtype: torch.dtype | None

    @classmethod
    def of(cls, name: str | None, device: torch.device) -> Precision:
        """The precision ``name`` on ``device``; one that device cannot run is refused in one
        line that names the fix."""
        name = "32" if name is None else str(name)
        if name not in PRECISIONS:
            raise BatchfitError(
                f"Unknown {opt_value('precision', name)}; use one of {', '.join(PRECISIONS)}."
            )
        dtype = _DTYPES.get(name)
        if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise BatchfitError(
                f"{opt_value('precision', name)} was asked for, but this GPU has no bfloat16 "
                f"support; use {opt_value('precision', '32')}."
            )
        return cls(name, device.type, dtype)

    @property
    def mixed(self) -> bool:
        return self.dtype is not None

    def slow_here(self) -> str | None:
        """A warning when this precision runs on a CPU without its instructions (oneDNN has no
        bfloat16/float16 kernels there, and PyTorch emulates them): its steps are then slower
        than float32's, measured 50x on a 2,048-wide MLP. None where nothing is emulated."""
        if self.dtype is None or self.device_type != "cpu":
            return None
        mkldnn = torch.ops.mkldnn
        native = (
            mkldnn._is_mkldnn_bf16_supported()
            if self.dtype is torch.bfloat16
            else mkldnn._is_mkldnn_fp16_supported()
        )
        if native:
            return None
        capability = torch.backends.cpu.get_cpu_capability()
        return (
            f"this CPU ({capability}) has no {self.dtype} instructions, so {self.name} runs "
            "emulated and slower than float32 here; its memory is still the precision's own"
        )

    def scaler(self) -> LossScaler | None:
        """A fresh loss scaler for ``16-mixed``; None for the precisions that need none."""
        return LossScaler(self.device_type) if self.dtype is torch.float16 else None

    def autocast(self) -> AbstractContextManager[Any]:
        """The context the forward pass and the loss run in."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def forward(self, model: Any) -> Any:
        """``model`` as the step functions call it: itself in float32, else its forward under
        autocast (attributes such as DDP's ``no_sync`` pass through)."""
        return model if self.dtype is None else _Autocast(model, self)

    def loss(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``loss_fn`` under autocast (which runs losses such as cross-entropy in float32)."""
        if self.dtype is None:
            return loss_fn

        def mixed_loss(output: Any, target: Any) -> torch.Tensor:
            with self.autocast():
                return loss_fn(output, target)

        return mixed_loss


class _Autocast:
    """A model's forward under autocast; everything else is the model's own."""

    def __init__(self, model: Any, precision: Precision) -> None:
        self.model, self.precision = model, precision

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision.autocast():
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


class NoScaling:
    """The backward and the update of the precisions that scale nothing, so a step function
    has one code path (``scaling = scaler or NO_SCALING``) whatever the precision."""

    @staticmethod
    def backward(loss: torch.Tensor) -> None:
        loss.backward()

    @staticmethod
    def step(optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()


NO_SCALING = NoScaling()


class LossScaler:
    """float16's loss scaling for one run: the backward of a scaled loss, and an optimizer step
    that unscales first and is skipped (and counted) when the gradients overflowed.

    >>> scaler = LossScaler("cpu")
    >>> model = torch.nn.Linear(2, 1)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> scaler.backward(model(torch.ones(1, 2)).sum())
    >>> scaler.step(optimizer), scaler.skipped
    (None, 0)
    """

    def __init__(self, device_type: str) -> None:
        self.scaler = torch.amp.GradScaler(device_type)
        self.skipped = 0

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The update from the accumulated (scaled) gradients, unless they hold inf or NaN; the
        scale then halves, and the step counts as skipped."""
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        if self.scaler.get_scale() < before:
            self.skipped += 1

    def state_dict(self) -> dict[str, Any]:
        """Plain data, for the checkpoint (a resumed run continues at the same scale)."""
        return {"scaler": self.scaler.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state["scaler"])
        self.skipped = int(state["skipped"])


#: float16's loss scale in tune's probes, fixed (GradScaler's own starts at 2**16 and halves on
#: every overflow, which a probe of a few steps cannot afford to learn): large enough to lift
#: the activations' gradients of a mean loss out of float16's subnormals, small enough not to
#: overflow them.
PROBE_LOSS_SCALE = 2.0**10


@contextmanager
def measured_in(precision: Precision, model: nn.Module, loss: Loss) -> Iterator[Loss]:
    """tune's probes in ``precision``: for the duration, ``model``'s forward runs under autocast
    (an attribute on the module, removed afterwards, so that the probes still hold the user's
    module, its parameters, ``state_dict`` and hooks) and the loss it yields does too.

    Why not :class:`LossScaler`: a probe's step functions are also the noise probe's gradient
    reads, which want each micro-batch's gradient as it is. In ``16-mixed`` the loss's backward
    is scaled by :data:`PROBE_LOSS_SCALE` and every parameter's gradient unscaled as it
    arrives, so each probe reads true gradients in float32 while the activations' gradients
    were float16, scaled, as in training.

    >>> model = torch.nn.Linear(3, 1)
    >>> from batchfit.losses import resolve_loss
    >>> with measured_in(Precision.of("bf16-mixed", torch.device("cpu")), model,
    ...                  resolve_loss("mse", "real")) as loss:
    ...     model(torch.ones(2, 3)).dtype
    torch.bfloat16
    >>> model(torch.ones(2, 3)).dtype, "forward" in vars(model)
    (torch.float32, False)
    """
    if not precision.mixed:
        yield loss
        return
    own = vars(model).get("forward")  # a forward the user set on the instance stays theirs
    inner = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        with precision.autocast():
            return inner(*args, **kwargs)

    model.forward = forward
    fn = precision.loss(loss.fn)
    hooks = []
    if precision.dtype is torch.float16:
        fn = _backward_scaled(fn, PROBE_LOSS_SCALE)
        unscale = 1.0 / PROBE_LOSS_SCALE
        hooks = [
            p.register_hook(lambda g: g * unscale) for p in model.parameters() if p.requires_grad
        ]
    try:
        yield replace(loss, fn=fn)
    finally:
        for hook in hooks:
            hook.remove()
        if own is None:
            del model.forward
        else:
            model.forward = own


class _ScaleBackward(torch.autograd.Function):
    """The identity forward; the backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def _backward_scaled(
    loss_fn: Callable[..., torch.Tensor], scale: float
) -> Callable[..., torch.Tensor]:
    """``loss_fn`` whose value is its own and whose backward starts at ``scale``."""

    def scaled(output: Any, target: Any) -> torch.Tensor:
        return _ScaleBackward.apply(loss_fn(output, target), scale)

    return scaled

"""``adaptive``: the batch size follows the gradient noise scale while the run trains.

Why here and not in the step loop: the loop's hot path stays as it is when ``adaptive`` is off;
with it on, :meth:`AdaptiveRun.step` replaces the plain step and :meth:`AdaptiveRun.batches`
replaces the epoch's batches.

The measurement costs no extra samples: a step of several micro-batches already computes each
micro-batch's gradient (the difference of the accumulated gradient before and after its backward
pass); a step of one micro-batch runs it as two halves, two backward passes whose sum is the same
mean gradient. The parts' squared norms and the whole batch's give unbiased ``|G|^2`` and
``tr(Sigma)`` (:func:`batchfit.core.adaptive.step_terms`). One step in ``adapt_every // 5`` is
measured (its extra pass is what the measurement costs), and the readings are averaged over about
the last 10, two ``adapt_every`` periods.

Every ``adapt_every`` steps the batch size is chosen again
(:func:`batchfit.core.adaptive.next_batch_size`), the learning rate rescaled from the starting
``(batch_size, lr)`` by the optimizer's rule (linear for sgd, sqrt for adam/adamw), and the
epoch's batches restart from the sample the run is at, so steps, epochs and samples seen stay
exact. The state (batch size, lr, the averages, when it last chose) goes into every checkpoint,
and a decision depends on nothing else, so a resumed run repeats the uninterrupted one bitwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import torch

from batchfit.core.adaptive import NoiseAverage, next_batch_size, step_terms
from batchfit.core.configs import TrainConfig
from batchfit.core.lr_scaling import default_rule, scale_lr
from batchfit.core.options import opt, opt_value
from batchfit.data.source import Batch
from batchfit.errors import BatchfitError
from batchfit.loop.events import flush_metrics
from batchfit.step import smallest_trainable_size, train_step

#: The most a stream of unknown length lets the batch size grow without a ``max_batch_size``.
STREAM_GROWTH = 64
#: Noise readings per ``adapt_every`` steps: one step in ``adapt_every // READINGS`` is measured,
#: the others are plain steps. A measured step of one micro-batch costs ~30-50% more on a small
#: CPU model (two passes on halves), so measuring one step in 10 keeps the cost near 3%
#: (benchmarks/adaptive.py).
READINGS = 5
#: The moving averages' window, in readings: the last two ``adapt_every`` periods.
WINDOW = 2 * READINGS


def batch_size_range(config: TrainConfig, num_samples: int | None) -> tuple[int, int]:
    """``(min, max)`` batch size of an adaptive run, checked: ``min_batch_size`` (default the
    starting batch size), ``max_batch_size`` (default the data set size).

    Why the start is the default floor: the noise scale grows as training goes on, and with it the
    batch that minimises the predicted time to a result; a start that ``tune`` chose was the
    fastest for the noise scale at the start, so going below it would only lose throughput."""
    start = config.batch_size
    assert isinstance(start, int)  # auto is resolved before the loop
    if not config.adaptive:
        for name in ("min_batch_size", "max_batch_size"):
            if getattr(config, name) is not None:
                raise BatchfitError(
                    f"{opt(name)} bounds the adaptive batch size; add {opt_value('adaptive', True)}"
                    f" or leave {opt(name)} out."
                )
        return start, start
    low = config.min_batch_size or start
    high = config.max_batch_size or num_samples or start * STREAM_GROWTH
    if low < 2:
        raise BatchfitError(
            f"{opt_value('adaptive', True)} measures the noise from two halves of a batch, so "
            f"batches need 2 samples or more; give {opt('min_batch_size')} >= 2 and "
            f"{opt('batch_size')} >= 2."
        )
    if low > high:
        if config.min_batch_size is None:  # the floor is the start: name what the user gave
            raise BatchfitError(
                f"The starting {opt_value('batch_size', start)} is above "
                f"{opt_value('max_batch_size', high)}, and the adaptive batch never goes below "
                f"its start unless {opt('min_batch_size')} says so; start at most "
                f"{opt('max_batch_size')}, or raise {opt('max_batch_size')}."
            )
        raise BatchfitError(
            f"{opt_value('min_batch_size', low)} is above {opt_value('max_batch_size', high)}; "
            f"give a {opt('min_batch_size')} at most {opt('max_batch_size')}."
        )
    if not low <= start <= high:
        raise BatchfitError(
            f"The starting {opt_value('batch_size', start)} is outside the adaptive "
            f"range [{low}, {high}]; start within {opt('min_batch_size')} and "
            f"{opt('max_batch_size')}."
        )
    if config.steps_per_epoch is not None:
        raise BatchfitError(
            f"{opt_value('adaptive', True)} ends epochs by samples, not by {opt('steps_per_epoch')}"
            f"; leave out one of the two."
        )
    return low, high


def _squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(tensors)).double().square().sum()


class AdaptiveRun:
    """The adaptive state of one run and the step that measures the noise as it trains."""

    def __init__(self, setup: Any, saved: dict[str, Any] | None = None) -> None:
        config = setup.config
        self.setup = setup
        self.low, self.high = batch_size_range(config, setup.source.num_samples)
        self.every, self.rule = config.adapt_every, default_rule(config.optimizer)
        self.measure_every = max(1, config.adapt_every // READINGS)
        self.position: Any = None  # the run's Position, bound by batches()
        self.params = [p for p in setup.model.parameters() if p.requires_grad]
        self.smallest = smallest_trainable_size(setup.model)
        self.num_samples = setup.source.num_samples
        saved = saved or {}
        self.batch_size: int = saved.get("batch_size", config.batch_size)
        self.lr: float = saved.get("lr", setup.lr)
        self.noise: NoiseAverage = (
            NoiseAverage(**saved["noise"]) if "noise" in saved else NoiseAverage.start(WINDOW)
        )
        self.decided_at: int = saved.get("decided_at", 0)
        self.changes: list[dict[str, Any]] = list(saved.get("changes", []))

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "lr": self.lr,
            "noise": asdict(self.noise),
            "decided_at": self.decided_at,
            "changes": list(self.changes),
        }

    def summary(self) -> dict[str, Any]:
        """What the result reports: the final batch size and lr, the noise scale, each change."""
        return {
            "batch_size": self.batch_size,
            "lr": self.lr,
            "b_noise": self.noise.b_noise,
            "g2": self.noise.g2 / self.noise.weight if self.noise.weight else math.nan,
            "tr_sigma": self.noise.tr_sigma / self.noise.weight if self.noise.weight else math.nan,
            "range": [self.low, self.high],
            "changes": list(self.changes),
        }

    def step(self, x: torch.Tensor, y: torch.Tensor, micro: int) -> tuple[float, int]:
        """One optimizer update on ``(x, y)`` in micro-batches of at most ``micro`` (the one in use:
        an out-of-memory back-off lowers it); on every ``measure_every``-th step, from its parts'
        gradients, adding the step's noise terms to the averages. Returns (mean loss, parts)."""
        setup = self.setup
        (model, loss_fn), optimizer = setup.step_parts(), setup.optimizer
        n, device = len(y), setup.device
        if self.position.step % self.measure_every or n < 2 * self.smallest:
            loss, parts = train_step(model, optimizer, loss_fn, x, y, micro, device)
            return loss.item(), parts
        optimizer.zero_grad(set_to_none=True)
        size = micro if n > micro else (n + 1) // 2
        total = torch.zeros((), device=device)
        norms: list[torch.Tensor] = []
        sizes: list[int] = []
        before: list[torch.Tensor] | None = None
        last = math.ceil(n / size) - 1
        for i, (xs, ys) in enumerate(zip(x.split(size), y.split(size), strict=True)):
            weight = len(ys) / n
            loss = loss_fn(model(xs.to(device)), ys.to(device))
            (loss * weight).backward()
            total += loss.detach() * weight
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            part = grads if before is None else list(torch._foreach_sub(grads, before))
            norms.append(_squared_norm(part) / weight**2)
            sizes.append(len(ys))
            if i < last:  # the last part's gradient is not needed again
                before = [g.clone() for g in grads]
        norms.append(_squared_norm(grads))
        optimizer.step()
        values = torch.stack([*norms, total.double()]).tolist()
        g2, tr_sigma = step_terms(values[:-2], sizes, values[-2], self.num_samples)
        self.noise = self.noise.add(g2, tr_sigma)
        return values[-1], len(sizes)

    def batches(self, run: Any, bar: Any) -> Iterator[Batch]:
        """The batches left in the epoch in progress, at the current batch size; when a decision
        changes it, the rest of the epoch restarts from the sample the run is at."""
        setup, pos = self.setup, run.position
        self.position = pos
        self._decide_when_due(run, bar)  # a run resumed at a decision point decides first
        while True:
            batches = setup.source.batches(
                pos.epoch,
                self.batch_size,
                start=pos.sample_in_epoch,
                drop_last=setup.config.drop_last,
            )
            try:
                for batch in batches:
                    yield batch  # the loop trains on it, counts it, checkpoints
                    if self._decide_when_due(run, bar):
                        break
                else:
                    return
            finally:
                if hasattr(batches, "close"):
                    batches.close()

    def _decide_when_due(self, run: Any, bar: Any) -> bool:
        """At every ``adapt_every``-th step (once): choose the batch size and lr; True if the
        batch size changed."""
        step = run.position.step
        if step == 0 or step % self.every or step == self.decided_at:
            return False
        self.decided_at = step
        chosen, why = next_batch_size(
            self.noise.b_noise, current=self.batch_size, low=self.low, high=self.high
        )
        if chosen == self.batch_size:
            return False
        flush_metrics(run)  # the rows so far were trained at the old lr
        lr = scale_lr(self.setup.lr, self.setup.batch_size, chosen, self.rule)
        for group in self.setup.optimizer.param_groups:
            group["lr"] = lr
        run.metrics.lr = lr
        self.changes.append(
            {"step": step, "from": self.batch_size, "to": chosen, "lr": lr, "reason": why}
        )
        bar.log(f"step {step}: batch size {self.batch_size} -> {chosen}, lr {lr:g} ({why})")
        self.batch_size, self.lr = chosen, lr
        return True

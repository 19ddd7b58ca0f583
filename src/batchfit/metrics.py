"""Per-step training metrics: buffered in memory, checked for NaN, written to ``metrics.csv``.

Losses stay tensors until a flush (a few times a second, and before every checkpoint), so the
loop never waits for a device sync per step. A flush is also where a NaN or infinite loss is
caught: it raises before any checkpoint can be written after the bad step.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from batchfit.errors import NonFiniteLossError

COLUMNS = ("step", "epoch", "batch_size", "micro_batch_size", "loss", "lr", "samples_per_s")


class MetricsLog:
    """Collects one row per step; keeps the running mean loss of the current epoch."""

    def __init__(self, path: Path | None, *, resume_step: int | None = None) -> None:
        self.path = path
        self._pending: list[tuple[int, int, int, int, torch.Tensor, float, float]] = []
        self.epoch_loss_sum = 0.0
        self.epoch_samples = 0
        self.last_loss = math.nan
        self.last_samples_per_s = 0.0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and path.exists():
                self._truncate_after(resume_step)
            else:
                with path.open("w", newline="") as f:
                    csv.writer(f, lineterminator="\n").writerow(COLUMNS)

    def _truncate_after(self, step: int) -> None:
        # Rows written after the checkpoint belong to steps that the resumed run does again.
        with self.path.open(newline="") as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        with self.path.open("w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(kept)

    def add(
        self,
        step: int,
        epoch: int,
        batch_size: int,
        micro_batch_size: int,
        loss: torch.Tensor,
        lr: float,
        samples_per_s: float,
    ) -> None:
        self._pending.append((step, epoch, batch_size, micro_batch_size, loss, lr, samples_per_s))

    def flush(self) -> None:
        """Turn pending losses into numbers, write them, and raise on the first non-finite one."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        values = torch.stack([row[4] for row in pending]).double().cpu().tolist()
        rows = []
        bad = None
        samples, seconds = 0, 0.0
        for row, value in zip(pending, values, strict=True):
            step, epoch, batch_size, micro, _, lr, speed = row
            rows.append(
                (step, epoch, batch_size, micro, f"{value:.6g}", f"{lr:.6g}", f"{speed:.1f}")
            )
            if not math.isfinite(value):
                bad = (step, epoch, value)
                break
            self.epoch_loss_sum += value * batch_size
            self.epoch_samples += batch_size
            self.last_loss = value
            samples, seconds = samples + batch_size, seconds + batch_size / speed
        if seconds > 0:  # the display shows the rate over the rows just flushed, not one step
            self.last_samples_per_s = samples / seconds
        if self.path is not None:
            with self.path.open("a", newline="") as f:
                csv.writer(f, lineterminator="\n").writerows(rows)
        if bad is not None:
            step, epoch, value = bad
            raise NonFiniteLossError(
                f"The training loss became {value} at step {step} (epoch {epoch}); training "
                "stopped and the last good checkpoint was kept. Lower --lr or check the data "
                "for extreme values.",
                step=step,
            )

    def epoch_mean_loss(self) -> float:
        return self.epoch_loss_sum / self.epoch_samples if self.epoch_samples else math.nan

    def start_epoch(self) -> None:
        self.epoch_loss_sum, self.epoch_samples = 0.0, 0

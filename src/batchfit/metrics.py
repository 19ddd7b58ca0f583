"""Per-step training metrics: buffered in memory, checked for NaN, written to ``metrics.csv``.

On an accelerator, losses stay tensors until a flush (a few times a second, and before every
checkpoint), so the loop never waits for a device sync per step; on the CPU there is nothing to
wait for, and a plain float is the cheaper thing to keep. A flush is also where a NaN or infinite
loss is caught: it raises before any checkpoint can be written after the bad step.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from batchfit.core.options import opt
from batchfit.errors import BatchfitError, NonFiniteLossError, space_checked

COLUMNS = ("step", "epoch", "batch_size", "micro_batch_size", "loss", "lr", "samples_per_s")


class MetricsLog:
    """Collects one row per step; keeps the running mean loss of the current epoch.

    A step is recorded as ``(step, batch_size, loss, seconds)``, the least the loop can hand over;
    the epoch, micro-batch size and learning rate are the same for every step between two flushes
    and are filled in when the rows are written.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        micro_batch_size: int,
        lr: float,
        resume_step: int | None = None,
    ) -> None:
        self.path = path
        self.micro_batch_size, self.lr = micro_batch_size, lr
        self.epoch = 1
        self.pending: list[tuple[int, int, torch.Tensor | float, float]] = []
        self.epoch_loss_sum = 0.0
        self.epoch_samples = 0
        self.last_loss = math.nan
        self.last_samples_per_s = 0.0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with space_checked(path.parent):
                if resume_step is not None and path.exists():
                    self._truncate_after(resume_step)
                else:
                    with path.open("w", newline="") as f:
                        csv.writer(f, lineterminator="\n").writerow(COLUMNS)

    def _truncate_after(self, step: int) -> None:
        """Keep the rows up to ``step``: rows written after the checkpoint belong to steps that
        the resumed run does again. An empty file starts over with the header; a file that is
        not a batchfit metrics log (other columns, rows that are not steps) is refused."""
        assert self.path is not None  # only a log written to a file is resumed
        with self.path.open(newline="") as f:
            rows = list(csv.reader(f))
        try:
            if rows and tuple(rows[0]) != COLUMNS:
                raise ValueError("other columns")
            kept = [list(COLUMNS)] + [r for r in rows[1:] if r and int(r[0]) <= step]
        except ValueError:
            raise BatchfitError(
                f"'{self.path}' is not the metrics log of the run being resumed (its first line "
                f"is not {','.join(COLUMNS)} followed by rows of steps); move it away, or give "
                f"the {opt('out_dir')} of that run."
            ) from None
        with self.path.open("w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(kept)

    def flush(self) -> float:
        """Write the pending rows; return the training seconds they cover.

        Raises NonFiniteLossError at the first NaN or infinite loss (its row is written first).
        """
        if not self.pending:
            return 0.0
        pending = self.pending[:]
        self.pending.clear()  # in place: the loop holds this list's append method
        losses = [row[2] for row in pending]
        if isinstance(losses[0], torch.Tensor):  # device tensors: one transfer for all of them
            values = torch.stack([torch.as_tensor(x) for x in losses]).double().cpu().tolist()
        else:
            values = losses
        rows = []
        bad = None
        samples, seconds = 0, 0.0
        epoch, micro, lr = self.epoch, self.micro_batch_size, f"{self.lr:.6g}"
        for (step, batch_size, _, step_seconds), value in zip(pending, values, strict=True):
            speed = batch_size / max(step_seconds, 1e-9)
            rows.append((step, epoch, batch_size, micro, f"{value:.6g}", lr, f"{speed:.1f}"))
            samples, seconds = samples + batch_size, seconds + step_seconds
            if not math.isfinite(value):
                bad = (step, epoch, value)
                break
            self.epoch_loss_sum += value * batch_size
            self.epoch_samples += batch_size
            self.last_loss = value
        if seconds > 0:  # the display shows the rate over the rows just flushed, not one step
            self.last_samples_per_s = samples / seconds
        if self.path is not None:
            with space_checked(self.path.parent), self.path.open("a", newline="") as f:
                csv.writer(f, lineterminator="\n").writerows(rows)
        if bad is not None:
            step, epoch, value = bad
            if step == 1:  # the loss of the first step is the initial weights': no update yet
                raise NonFiniteLossError(
                    f"The training loss was {value} at step 1, before any update, so the "
                    "learning rate is not the cause",
                    step=step,
                    advice="The model's output or the data holds NaN or infinite values: check "
                    "the forward pass (a log or division of zero) and the features.",
                )
            raise NonFiniteLossError(
                f"The training loss became {value} at step {step} (epoch {epoch})",
                step=step,
                advice=f"Lower {opt('lr')} or check the data for extreme values.",
            )
        return seconds

    def epoch_mean_loss(self) -> float:
        return self.epoch_loss_sum / self.epoch_samples if self.epoch_samples else math.nan

    def start_epoch(self, epoch: int) -> None:
        """Rows from now on belong to ``epoch`` (1-based); its mean loss starts from zero."""
        self.epoch = epoch
        self.epoch_loss_sum, self.epoch_samples = 0.0, 0

"""``tune``'s noise phase: the gradient noise scale, read at the initial weights and after a short
warm-up from them (:mod:`batchfit.probe.noise`), at the sizes the memory ceiling and the data
allow; under torchrun, by every rank together (:mod:`batchfit.probe.noise_ranks`), each rank's
gradient the small batch and their all-reduce the large one.
"""

from __future__ import annotations

import math

from batchfit.core.options import opt
from batchfit.distributed import world_size
from batchfit.orchestrate.tune_state import Phase, TuneRun, timed
from batchfit.probe.harness import Deadline
from batchfit.probe.noise import NoiseMeasurement, NoiseSettings, warmup_and_measure
from batchfit.probe.noise_ranks import JointProbe, lead_noise_probe
from batchfit.probe.throughput import powers_of_two_up_to

#: The noise probe's micro-batch and accumulation: b = 32, B = 256 unless memory or data are less.
NOISE_MICRO_BATCH = 32
NOISE_ACCUMULATION = 8
#: A noise scale read over fewer steps than this is marked provisional.
MIN_NOISE_STEPS = 16


def noise_sizes(
    ceiling: int, n: int | None, smallest: int = 1, ranks: int = 1
) -> tuple[int, int] | None:
    """``(micro-batch b, accumulation k)`` for the noise probe: ``smallest <= b <= 32`` and
    ``k <= 8``, ``b k <= N / 2`` so that a measurement run sees several distinct batches (with
    several ``ranks``, each one micro-batch: ``k`` is the number of ranks).

    >>> noise_sizes(4000, 4000), noise_sizes(4000, 40), noise_sizes(4000, 40, smallest=2)
    ((32, 8), (8, 2), (8, 2))
    >>> noise_sizes(4000, 6), noise_sizes(4000, 6, smallest=2)
    ((1, 2), None)
    """
    b = smallest
    while b * 2 <= min(NOISE_MICRO_BATCH, ceiling):
        b *= 2
    k = NOISE_ACCUMULATION if ranks == 1 else ranks
    limit = n // 2 if n is not None else math.inf
    while b * k > limit and k > 2 and ranks == 1:
        k //= 2
    while b * k > limit and b // 2 >= smallest:
        b //= 2
    return (b, k) if b * k <= limit else None


@timed
def noise_phase(
    run: TuneRun, ceiling: int, joint: JointProbe | None = None
) -> Phase[NoiseMeasurement | None]:
    """The gradient noise scale within micro-batches of ``ceiling``; None when the data are too
    few or the probe failed (the notes say why). With ``joint`` (under torchrun, on rank 0)
    every rank measures together."""
    n = run.source.num_samples
    sizes = noise_sizes(ceiling, n, run.smallest, 1 if joint is None else world_size())
    deadline = run.budget.phase("noise")
    if sizes is None:
        too_few = f"Noise scale not measured: {n} samples are too few for two batch sizes."
        return Phase(None, (too_few,))
    tried = run.unless_it_fails(
        "Noise scale", lambda: _noise_probe(run, sizes, ceiling, deadline, joint)
    )
    noise = tried.result
    if noise is None:
        return tried
    notes = noise.cut_short
    if noise.estimate.pairs < MIN_NOISE_STEPS:
        notes += (
            f"The noise scale comes from {noise.estimate.pairs} steps only, so it is "
            f"provisional (its interval is wide); a larger {opt('time_budget')} reads it "
            "over more steps.",
        )
    est = noise.estimate
    run.log(
        f"noise: B_simple ~{est.b_simple:.0f} ({est.confidence:.0%} interval "
        f"{est.low:.0f}-{est.high:.0f}) after {noise.steps} steps"
    )
    return Phase(noise, notes)


def _noise_probe(
    run: TuneRun,
    sizes: tuple[int, int],
    ceiling: int,
    deadline: Deadline,
    joint: JointProbe | None,
) -> NoiseMeasurement:
    """The noise probe at micro-batch ``b`` and accumulation ``k`` (``sizes``), or with ``joint``
    at micro-batch ``b`` on each of the ``k`` ranks."""
    b, k = sizes
    parts = f"{k} x {b}" if joint is None else f"{k} ranks x {b}"
    lr = run.lr.warmup_at(b * k)
    run.log(
        f"noise: warm-up from the initial weights, batch {b * k} = {parts}, "
        f"{run.config.optimizer} lr {lr:.3g}"
    )
    n = run.source.num_samples
    error_sizes = powers_of_two_up_to(max(run.smallest, (n or 8192) // 4), run.smallest)
    settings = NoiseSettings(
        micro_batch_size=b,
        accumulation=k,
        optimizer=run.config.optimizer,
        lr=lr,
        gradient_error_sizes=tuple(s for s in error_sizes if s & (s - 1) == 0),
        max_micro_batch_size=ceiling,
        seed=run.config.seed,
    )
    if joint is not None:
        return lead_noise_probe(
            run.model, run.source, run.loss_fn, joint, settings, deadline=deadline, log=run.log
        )
    return warmup_and_measure(
        run.model, run.source, run.loss_fn, settings, deadline=deadline, log=run.log
    )

"""The training loop. :func:`batchfit.loop.train.train` (``batchfit.train``) reads top to bottom:
prepare, restore or seed, epochs, finish; the modules beside it hold the phases.

- ``train.py``: :func:`~batchfit.loop.train.train`, its phases and :class:`TrainResult`;
- ``state.py``: what a run knows (:class:`Position`, :class:`RunState`), what prepare fixed
  (:class:`Setup`), and how both go into a checkpoint and come back out;
- ``epoch.py``: one epoch, its batches and its step loop (the hot path);
- ``events.py``: what happens between steps: flush the metrics, checkpoint, validate;
- ``checks.py``: refusals before the first step, and weights that overflowed;
- ``signals.py``: SIGINT/SIGTERM turned into a stop after the current step.
"""

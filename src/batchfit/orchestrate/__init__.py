"""Orchestration: ``tune`` and ``sweep`` run probes and the training loop in phases, then hand
plain results to the reports. Import the functions from :mod:`batchfit` (``batchfit.tune``,
``batchfit.sweep``); their modules are :mod:`batchfit.orchestrate.tune` and
:mod:`batchfit.orchestrate.sweep`.
"""

"""Adapters that bring batchfit's measured batch size and learning rate into the trainers people
already use (``batchfit.integrations.lightning``,
``batchfit.integrations.hf``).

Each adapter lives in its own module and imports its framework only there, so importing
``batchfit`` or this package never loads an optional dependency; a missing one fails in one line
that names the extra to install (``pip install 'batchfit[lightning]'``, ``'batchfit[hf]'``).
"""

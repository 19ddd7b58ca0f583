"""Import the user's code by name: ``package.module:attribute`` or ``path/to/file.py:attribute``.

The current directory is importable, as it is for ``python -m``, so a ``models.py`` next to the
user's shell works without installing anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchfit.errors import BatchfitError


def _load_module(module_name: str, what: str, spec_text: str) -> Any:
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise BatchfitError(f"The {what} file '{path}' does not exist; check '{spec_text}'.")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]  # spec checked above
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]  # a file spec has a loader
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise BatchfitError(
            f"Cannot import the {what} '{spec_text}': no module named '{exc.name}'. Use "
            "package.module:name with the module importable from the current directory, or "
            "path/to/file.py:name."
        ) from None


def import_object(spec_text: str, *, what: str) -> Any:
    """Return the object named by ``spec_text`` (``module:attribute``), or a clear error.

    Examples:
        >>> import_object("math:sqrt", what="function")(16.0)
        4.0
    """
    module_name, sep, attribute = spec_text.rpartition(":")
    if not sep or not module_name or not attribute:
        raise BatchfitError(f"The {what} must be given as package.module:name; got '{spec_text}'.")
    try:
        module = _load_module(module_name, what, spec_text)
    except BatchfitError:
        raise
    except Exception as exc:  # the user's module failed while importing
        raise BatchfitError(
            f"Importing the {what} '{spec_text}' failed: {type(exc).__name__}: {exc}"
        ) from exc
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise BatchfitError(
                f"Module '{module_name}' has no attribute '{attribute}'; check the {what} "
                f"'{spec_text}'."
            )
        obj = getattr(obj, part)
    return obj


def required_parameters(function: Callable) -> list[str]:
    """The names of the parameters a call of the user's ``function`` must fill (no default, not
    ``*args``/``**kwargs``), to say what a factory or a ``forward`` expects before calling it;
    empty where there is no signature to read (a builtin): the call then decides."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in signature.parameters.values()
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]

"""Read the recommendation from tune's ``report.json`` (only its stable, documented keys).

docs/design.md fixes ``recommended.batch_size`` and ``recommended.lr`` (and ``version``); nothing
else of tune's report is read, so either side can change the rest freely.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from batchfit.core.options import opt
from batchfit.errors import BatchfitError, first_line


def read_recommendation(path: str | Path) -> dict[str, Any]:
    """``{"batch_size": int, "lr": float | None, "version": ...}`` from tune's report.json.

    Examples:
        >>> import json, tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> path = os.path.join(folder, "report.json")
        >>> _ = open(path, "w").write(json.dumps({"recommended": {"batch_size": 128, "lr": 0.002}}))
        >>> read_recommendation(path)
        {'batch_size': 128, 'lr': 0.002, 'version': None}
    """
    path = Path(path)
    fix = f"point {opt('report')} at the report.json that 'batchfit tune' wrote"
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise BatchfitError(f"No tune report at '{path}'; {fix}.") from None
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise BatchfitError(f"Cannot read '{path}' as JSON ({first}); {fix}.") from None
    recommended = report.get("recommended") if isinstance(report, dict) else None
    if not isinstance(recommended, dict) or "batch_size" not in recommended:
        raise BatchfitError(
            f"'{path}' has no recommended.batch_size, so it is not a tune report; {fix}."
        )
    batch_size = recommended["batch_size"]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BatchfitError(
            f"recommended.batch_size in '{path}' must be an int >= 1, got {batch_size!r}; {fix}."
        )
    lr = recommended.get("lr")
    if lr is not None and (
        isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0
    ):
        raise BatchfitError(
            f"recommended.lr in '{path}' must be a positive number, got {lr!r}; {fix}."
        )
    return {
        "batch_size": batch_size,
        "lr": float(lr) if lr is not None else None,
        "version": report.get("version"),
    }

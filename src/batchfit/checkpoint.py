"""Checkpoints that survive a crash mid-write and resume a run exactly.

A checkpoint is one ``torch.save`` file holding plain data (tensors, numbers, strings, lists and
dicts), so it loads with ``weights_only=True``: loading never runs code from the file. It is
written to a temporary file in the same folder, flushed to disk, then renamed over the old one;
a rename is atomic, so a crash leaves either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from batchfit.errors import BatchfitError
from batchfit.files import atomic_open, temporary_name_pattern

CHECKPOINT_NAME = "last.pt"
FORMAT_VERSION = 1


def checkpoint_path(directory: str | Path) -> Path:
    return Path(directory) / CHECKPOINT_NAME


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically and durably as ``directory/last.pt`` and return its path."""
    target = checkpoint_path(directory)
    for stale in target.parent.glob(temporary_name_pattern(target)):
        stale.unlink(missing_ok=True)  # left by a writer that was killed mid-write
    with atomic_open(target, "wb", durable=True) as f:
        torch.save({"format": FORMAT_VERSION, **state}, f)
    return target


def load_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """The checkpoint in ``directory``, or ``None`` if there is none yet."""
    path = checkpoint_path(directory)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BatchfitError(
            f"Cannot load '{path}' as a batchfit checkpoint ({type(exc).__name__}): it is damaged "
            "or was not written by batchfit. Delete it to start over, or point --checkpoint-dir "
            "elsewhere."
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise BatchfitError(
            f"'{path}' is not a batchfit checkpoint of format {FORMAT_VERSION}; point "
            "--checkpoint-dir at a folder written by this version."
        )
    return state


def check_same_model(
    state: dict[str, Any], model_state: dict[str, torch.Tensor], path: Path
) -> None:
    """Refuse to resume a checkpoint that was saved from a different model."""
    saved = state["model"]
    missing = sorted(set(model_state) - set(saved))
    extra = sorted(set(saved) - set(model_state))
    if missing or extra:
        name = (missing or extra)[0]
        where = "is missing from the checkpoint" if missing else "is in the checkpoint only"
        raise BatchfitError(
            f"The checkpoint '{path}' was saved from a different model: parameter '{name}' "
            f"{where}. Resume with the same --model, or use a new --checkpoint-dir."
        )
    for name, tensor in model_state.items():
        if tuple(saved[name].shape) != tuple(tensor.shape):
            raise BatchfitError(
                f"The checkpoint '{path}' was saved from a different model: '{name}' has shape "
                f"{tuple(saved[name].shape)} there and {tuple(tensor.shape)} here. Resume with the "
                "same --model, or use a new --checkpoint-dir."
            )


def _how_to_match(key: str, value: Any) -> str:
    """The command-line words that reproduce a saved setting."""
    if key == "source":  # the "data" fingerprint of BatchSource.fingerprint
        words = {"stream": "--stream", "memory": "--no-stream"}
        return words.get(value, f"the same kind of --data ({value} then)")
    if key == "files":
        return f"the same --data files ({value} then)"
    if key == "shuffle":
        return f"shuffle={value}"
    if key == "val_fraction" and value is None:
        return "--val-data or --val-fraction 0 (no split of --data)"
    if key == "val_seed":
        return f"--seed {value} (the seed of the validation split)"
    if key == "shuffle_buffer" and value is None:
        return "the same --data format (the buffer did not decide the order then)"
    if key == "samples":
        return (
            f"the same training data ({value} samples then): the same --data, --val-data and "
            "--val-fraction"
        )
    if key == "drop_last":
        return "--drop-last" if value else "no --drop-last"
    flag = "--" + key.replace("_", "-")
    return f"no {flag}" if value is None else f"{flag} {value}"


def check_same_settings(state: dict[str, Any], settings: dict[str, Any], path: Path) -> None:
    """Refuse to resume with settings that would change the batches or the updates.

    A setting that is a dict (the data fingerprint) is compared key by key, so the message names
    the one that changed. Settings the checkpoint does not have (older versions) are not checked.
    """
    saved = state.get("settings", {})
    for key, value in settings.items():
        if key not in saved:
            continue
        if isinstance(value, dict) and isinstance(saved[key], dict):
            names = list(dict.fromkeys([*value, *saved[key]]))
            pairs = [(name, saved[key].get(name), value.get(name)) for name in names]
        else:
            pairs = [(key, saved[key], value)]
        for name, then, now in pairs:
            if then != now:
                raise BatchfitError(
                    f"The checkpoint '{path}' was made with {name}={then!r}, not {now!r}; "
                    f"resume with {_how_to_match(name, then)}, or use a new --checkpoint-dir "
                    "to start over."
                )


def saved_settings(directory: str | Path) -> dict[str, Any]:
    """The settings recorded in the checkpoint in ``directory`` ({} if there is none, or it
    cannot be read: resuming will then say why). Memory-mapped: the weights are not read."""
    path = checkpoint_path(directory)
    if not path.is_file():
        return {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return {}
    settings = state.get("settings") if isinstance(state, dict) else None
    return settings if isinstance(settings, dict) else {}

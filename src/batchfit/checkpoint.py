"""Checkpoints that survive a crash mid-write and resume a run exactly.

A checkpoint is one ``torch.save`` file holding plain data (tensors, numbers, strings, lists and
dicts), so it loads with ``weights_only=True``: loading never runs code from the file. It is
written to a temporary file in the same folder, flushed to disk, then renamed over the old one;
a rename is atomic, so a crash leaves either the old checkpoint or the new one, never half of one.

A checkpoint also carries the state of every global random generator (:func:`rng_state`), so a
resumed run draws the same dropout masks and shuffles as an uninterrupted one.

A checkpoint holds a SHA-256 of its contents (every tensor's bytes, every other value's repr),
checked on load: a file damaged on disk or in a copy is refused, never trained from. Checkpoints
written before the checksum existed (no ``checksum`` key) are accepted unchecked, as before.
A save that fails for want of space says so in one line and leaves the previous checkpoint.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from batchfit.core.options import OPTIONS, opt, opt_value
from batchfit.errors import BatchfitError, no_space_error, space_checked
from batchfit.files import atomic_open, temporary_name_pattern

CHECKPOINT_NAME = "last.pt"
FORMAT_VERSION = 1


def checkpoint_path(directory: str | Path) -> Path:
    """Where the checkpoint of ``directory`` lives.

    >>> checkpoint_path("runs/a").as_posix()
    'runs/a/last.pt'
    """
    return Path(directory) / CHECKPOINT_NAME


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically and durably as ``directory/last.pt`` and return its path.

    The caller holds the folder (:func:`batchfit.files.folder_lock`), so any temporary file left
    in it is a killed writer's. A disk that fills up is a one-line error; the previous checkpoint
    stays."""
    target = checkpoint_path(directory)
    for stale in target.parent.glob(temporary_name_pattern(target)):
        stale.unlink(missing_ok=True)  # left by a writer that was killed mid-write
    payload = {"format": FORMAT_VERSION, **state}
    payload["checksum"] = state_checksum(payload)
    kept = (
        "; the previous checkpoint there was kept"
        if target.exists()
        else "; no checkpoint was saved"
    )
    with space_checked(target.parent, kept), atomic_open(target, "wb", durable=True) as f:
        writer = _ErrorKeepingWriter(f)
        try:
            torch.save(payload, writer)  # type: ignore[arg-type]  # a file-like: write, flush
        except Exception:
            # torch reports a failed write as its own "unexpected pos" error: say the real one.
            error = writer.error and no_space_error(writer.error, target.parent, kept)
            if error is not None:
                raise error from None
            raise
    return target


class _ErrorKeepingWriter:
    """A file for ``torch.save`` that remembers the ``OSError`` a write raised (torch hides it)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def state_checksum(state: Any) -> str:
    """SHA-256 of a checkpoint's contents: every tensor's dtype, shape and bytes, every other
    value's type and repr, dict keys in sorted order (the ``checksum`` entry itself left out).

    >>> a = {"w": torch.ones(2), "step": 3}
    >>> state_checksum(a) == state_checksum({"step": 3, "w": torch.ones(2)})
    True
    >>> state_checksum(a) == state_checksum({"w": torch.tensor([1.0, 1.5]), "step": 3})
    False
    """
    digest = hashlib.sha256()
    _hash_into(digest, state)
    return digest.hexdigest()


def _hash_into(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        keys = sorted((key for key in value if key != "checksum"), key=str)
        digest.update(f"D{len(keys)}".encode())
        for key in keys:
            digest.update(f"K{key!r}".encode())
            _hash_into(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _hash_into(digest, item)
    else:
        digest.update(f"V{type(value).__name__}:{value!r}".encode())


def load_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """The checkpoint in ``directory``, or ``None`` if there is none yet. One whose checksum does
    not match its contents is refused; one without a checksum (older) is accepted unchecked."""
    path = checkpoint_path(directory)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BatchfitError(
            f"Cannot load '{path}' as a batchfit checkpoint ({type(exc).__name__}): it is damaged "
            f"or was not written by batchfit. Delete it to start over, or point "
            f"{opt('checkpoint_dir')} elsewhere."
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise BatchfitError(
            f"'{path}' is not a batchfit checkpoint of format {FORMAT_VERSION}; point "
            f"{opt('checkpoint_dir')} at a folder written by this version."
        )
    if "checksum" in state and state_checksum(state) != state["checksum"]:
        raise BatchfitError(
            f"The checkpoint '{path}' is damaged: its contents do not match the checksum saved "
            f"with it, so it cannot be trained from. Restore it from a copy, or delete it to "
            f"start over (or point {opt('checkpoint_dir')} elsewhere)."
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
            f"{where}. {_same_model_or_new_folder()}"
        )
    for name, tensor in model_state.items():
        if tuple(saved[name].shape) != tuple(tensor.shape):
            raise BatchfitError(
                f"The checkpoint '{path}' was saved from a different model: '{name}' has shape "
                f"{tuple(saved[name].shape)} there and {tuple(tensor.shape)} here. "
                f"{_same_model_or_new_folder()}"
            )


def _same_model_or_new_folder() -> str:
    return f"Resume with the same {opt('model')}, or use a new {opt('checkpoint_dir')}."


def _as_set(name: str, value: Any) -> str:
    """Setting ``name`` to ``value`` as the caller writes it (see :func:`opt_value`); a saved
    setting that is not an option (an older checkpoint's) as ``name=value``."""
    return opt_value(name, value) if name in OPTIONS else f"{name}={value!r}"


def _how_to_match(key: str, value: Any) -> str:
    """What reproduces a saved setting: the option set to its value then, or the data to give."""
    if key == "source":  # the "data" fingerprint of BatchSource.fingerprint
        if value in ("stream", "memory"):
            return _as_set("stream", value == "stream")
        return f"the same kind of {opt('data')} ({value} then)"
    if key == "files":
        return f"the same {opt('data')} files ({value} then)"
    if key == "shuffle":
        return f"shuffle={value}"
    if key == "val_fraction" and value is None:
        return f"{opt('val_data')} or {opt_value('val_fraction', 0)} (no split of {opt('data')})"
    if key == "val_seed":
        return f"{opt_value('seed', value)} (the seed of the validation split)"
    if key == "shuffle_buffer" and value is None:
        return f"the same {opt('data')} format (the buffer did not decide the order then)"
    if key == "samples":
        return (
            f"the same training data ({value} samples then): the same {opt('data')}, "
            f"{opt('val_data')} and {opt('val_fraction')}"
        )
    return _as_set(key, value)


#: What a checkpoint (or a finished sweep run) written before a setting existed was made with:
#: it is checked as that.
SETTINGS_BEFORE_THE_KEY = {"precision": "32"}


def check_same_settings(state: dict[str, Any], settings: dict[str, Any], path: Path) -> None:
    """Refuse to resume with settings that would change the batches or the updates.

    A setting that is a dict (the data fingerprint) is compared key by key, so the message names
    the one that changed. Settings the checkpoint does not have (older versions) are not checked.
    """
    saved = {**SETTINGS_BEFORE_THE_KEY, **state.get("settings", {})}
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
                    f"resume with {_how_to_match(name, then)}, or use a new "
                    f"{opt('checkpoint_dir')} to start over."
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


def rng_state() -> dict[str, Any]:
    """Every global generator a model or dataset may draw from: torch (CPU and CUDA), Python's
    ``random`` and NumPy's legacy global one, as plain data (loadable with ``weights_only``)."""
    version, mt_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, np.int64)), position, has_gauss, cached],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put every generator back where :func:`rng_state` found it, so a resumed run draws the
    same dropout masks and shuffles as an uninterrupted one."""
    torch.set_rng_state(state["torch"])
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed every generator that :func:`rng_state` saves, for a reproducible fresh run.

    >>> seed_everything(3); a = torch.rand(1)
    >>> seed_everything(3); bool(torch.rand(1) == a)
    True
    """
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)

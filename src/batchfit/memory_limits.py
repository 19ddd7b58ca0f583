"""Real memory limits and real out-of-memory errors, shared by the probes and the training loop.

``tune`` measures the memory ceiling under these limits, and ``train`` runs under them with
``memory_limit``, so both meet the allocator's own error at the same size: on the CPU an
address-space limit (``RLIMIT_AS``) makes an allocation past the limit fail with PyTorch's
``can't allocate memory`` instead of waking the kernel's out-of-memory killer; on CUDA the
allocator's per-process memory fraction makes it raise ``OutOfMemoryError``. Which exceptions
mean "out of memory" is decided here once (:func:`is_out_of_memory`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import sys
from collections.abc import Iterator

import psutil
import torch

from batchfit.core.units import MAX_SIZE

#: Messages of out-of-memory errors that arrive as a plain RuntimeError (CPU allocator, cuBLAS).
OOM_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "not enough memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` means the allocator ran out of memory; the caller re-raises the rest.

    >>> is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried..."))
    True
    >>> is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    False
    >>> is_out_of_memory(RuntimeError("could not create a primitive"))  # no limit: not memory
    False
    """
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if isinstance(exc, MemoryError) or (oom_type is not None and isinstance(exc, oom_type)):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    if any(m in text for m in OOM_MESSAGES):
        return True
    # oneDNN (bf16 matmuls on the CPU) reports a scratchpad it could not map as this; within an
    # address-space limit that is the limit at work (elsewhere it may be a real unsupported op)
    return ONEDNN_FAILED in text and _address_space_limited()


#: oneDNN's error when it cannot set up a kernel, which includes failing to allocate for it.
ONEDNN_FAILED = "could not create a primitive"


def _address_space_limited() -> bool:
    """Whether this process runs under an address-space limit (:func:`address_space_limit`)."""
    if not hasattr(resource, "RLIMIT_AS"):
        return False
    return resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY


def status_bytes(key: str) -> int | None:
    """A ``/proc/self/status`` field (``VmSize``, ``VmHWM``...) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Resident memory of this process now."""
    return psutil.Process().memory_info().rss


def release_memory(device: torch.device | None = None, *, collect: bool = False) -> None:
    """Free what the last trial left: cached device blocks, glibc's free heap pages
    (``malloc_trim``), which otherwise stay resident and look like growth, and with ``collect``
    Python's cyclic garbage (an exception's traceback holds the failed trial's tensors)."""
    if collect:
        gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def address_space_limit(allowed_new_bytes: int) -> Iterator[bool]:
    """Let this process map at most ``allowed_new_bytes`` more memory (``RLIMIT_AS``, Linux),
    so that going over fails with the allocator's error; the previous limit is put back after.
    Yields False where the limit cannot be set."""
    vm = status_bytes("VmSize")
    if vm is None or not hasattr(resource, "RLIMIT_AS"):
        yield False
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    new = min(vm + max(allowed_new_bytes, 0), MAX_SIZE)  # more would overflow setrlimit
    if hard != resource.RLIM_INFINITY:
        new = min(new, hard)
    if soft != resource.RLIM_INFINITY and soft <= new:
        yield True  # an existing limit is already tighter
        return
    resource.setrlimit(resource.RLIMIT_AS, (new, hard))
    try:
        yield True
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def device_memory_cap(limit_bytes: int, device: torch.device) -> Iterator[None]:
    """Let PyTorch's CUDA allocator hold at most ``limit_bytes`` on ``device`` (its per-process
    memory fraction), so that a trial going over ``memory_limit`` fails with the allocator's
    real ``OutOfMemoryError``, as it would on a card of that size; the previous fraction is put
    back after. A limit at or above the card's memory changes nothing."""
    total = torch.cuda.get_device_properties(device).total_memory
    if limit_bytes >= total:
        yield
        return
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    previous = float(getter(device)) if getter is not None else 1.0
    torch.cuda.set_per_process_memory_fraction(limit_bytes / total, device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(previous, device)

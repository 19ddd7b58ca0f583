"""Run an iterator ahead of its consumer in a background thread, with a bounded queue.

PyArrow decodes and NumPy copies with the GIL released, so reading the next batches in a thread
overlaps I/O and decoding with the training step. The queue holds at most ``depth`` items, so
memory stays bounded however slow the consumer is. When the consumer stops early (``max_steps``,
an error, ``close()``), the thread is told to stop and joined; an error in the thread is raised in
the consumer, at the position where it happened.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()
_POLL_SECONDS = 0.05


class Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """Yield ``items`` in order while a thread produces up to ``depth`` of them ahead.

    ``depth=0`` iterates in the caller's thread (no thread at all).

    Examples:
        >>> list(prefetch(range(5), depth=2))
        [0, 1, 2, 3, 4]
        >>> it = prefetch(iter(range(10**9)), depth=2)
        >>> next(it), next(it)
        (0, 1)
        >>> it.close()  # the producer thread stops and is joined
    """
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(Failure(exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="batchfit-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _END:
                return
            if isinstance(item, Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()

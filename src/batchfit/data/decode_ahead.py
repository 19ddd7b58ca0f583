"""Decode the next windows of a stream in threads while the current one is cut into batches.

PyArrow decodes and NumPy copies with the GIL released, so a few threads reading windows ahead
overlap I/O and decoding with the training step. At most ``workers`` windows are decoded ahead of
the consumer, so memory stays bounded however slow the consumer is, and windows are delivered in
order, each decoded by one thread only: rows are never duplicated or lost.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Sequence
from typing import Generic, TypeVar

from batchfit.data.prefetch import Failure

T = TypeVar("T")


class DecodeAhead(Generic[T]):
    """``decode(w)`` for the windows of ``chains`` in order, while ``workers`` threads decode
    the windows ahead; ``on_decoded`` is called with each item that is not ``None``, under the
    lock, as soon as it is decoded. Iterate once: the threads start at the first item and are
    stopped and joined when the iteration ends, however it ends.

    A *chain* of consecutive windows that continue one block is decoded by one thread, which
    keeps its read position in the block; a window may be decoded only once the consumer is
    within ``workers`` windows of it. Chains are taken in order, so the window the consumer
    waits for is always in a chain that a thread holds or takes next: no deadlock. An error in a
    thread is raised in the consumer, at the window where it happened.

    Examples:
        >>> list(DecodeAhead(lambda w: w * 10, [[0], [1, 2], [3]], workers=2))
        [0, 10, 20, 30]
        >>> list(DecodeAhead(lambda w: w, [[5, 6]], workers=3))
        [5, 6]
    """

    def __init__(
        self,
        decode: Callable[[int], T | None],
        chains: Sequence[Sequence[int]],
        workers: int,
        on_decoded: Callable[[T], None] | None = None,
    ) -> None:
        self._decode, self._on_decoded = decode, on_decoded
        self._order = [w for chain in chains for w in chain]
        self._workers = max(1, workers)
        self._lock = threading.Condition()
        # Shared by the threads and the consumer, always under the lock:
        self._untaken = iter(chains)  # the chains no thread has taken yet
        self._ready: dict[int, T | Failure | None] = {}  # decoded windows not yet consumed
        self._wanted = self._order[0] if self._order else 0  # the window the consumer awaits
        self._stopped = False  # set when the consumer is done: the threads return

    def __iter__(self) -> Generator[T | None, None, None]:  # a generator: closed to stop
        threads = [
            threading.Thread(target=self._decode_chains, name="batchfit-decode", daemon=True)
            for _ in range(self._workers)
        ]
        for thread in threads:
            thread.start()
        try:
            for w in self._order:
                with self._lock:
                    while w not in self._ready:
                        self._lock.wait()
                    item = self._ready.pop(w)
                    self._wanted = w + 1
                    self._lock.notify_all()
                if isinstance(item, Failure):
                    raise item.exc
                yield item
                del item  # not held while the next window is awaited
        finally:
            with self._lock:
                self._stopped = True
                self._lock.notify_all()
            for thread in threads:
                thread.join()

    def _decode_chains(self) -> None:
        """One thread: take the next chain and decode its windows, until none is left, the
        consumer is done, or a window fails."""
        while True:
            with self._lock:
                chain = None if self._stopped else next(self._untaken, None)
            if chain is None:
                return
            for w in chain:
                if not self._wait_for_room(w):
                    return
                try:
                    item: T | Failure | None = self._decode(w)
                except BaseException as exc:  # raised in the consumer, at window w
                    item = Failure(exc)
                with self._lock:
                    self._ready[w] = item
                    if item is not None and not isinstance(item, Failure) and self._on_decoded:
                        self._on_decoded(item)
                    self._lock.notify_all()
                if isinstance(item, Failure):
                    return

    def _wait_for_room(self, w: int) -> bool:
        """Wait until window ``w`` is within ``workers`` of the consumer; False once stopped."""
        with self._lock:
            while not self._stopped and w >= self._wanted + self._workers:
                self._lock.wait()
            return not self._stopped

"""Background prefetch: run an iterator in a thread, a bounded number of items ahead.

Used by training (batches from shards) and prediction (chunks from a shard or table), so that
reading, decompression and feature transforms overlap with the model's compute.

This module is a leaf: it imports nothing from the package.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_END = object()


class _Failure:
    """An exception raised by the producer, carried to the consumer to be re-raised there."""

    def __init__(self, error: BaseException):
        self.error = error


def prefetch(items: Iterable[T], depth: int = 2, name: str = "msa-prefetch") -> Iterator[T]:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead.

    An exception in the producer re-raises in the consumer; if the consumer stops early (break,
    exception, garbage collection) the producer stops at its next item instead of blocking.
    ``depth <= 0`` iterates in the calling thread.
    """
    if depth <= 0:
        yield from items
        return
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():  # never block forever once the consumer has gone
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as error:  # handed to the consumer, which re-raises it
            put(_Failure(error))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = handoff.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)

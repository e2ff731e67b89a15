"""A one-item handoff between two pipeline threads, in order, bounded, closeable.

The node's stages (prepare -> infer -> publish) each run in one thread and pass their batches on through one of
these: ``put`` waits while the previous item has not been taken, so at most one batch waits between two stages
(memory and latency stay bounded: the keep-latest slots in front absorb a faster camera) and the order is the
order of ``put``. ``close`` lets the receiver take what is left and then get ``None``; a ``put`` after it returns
False, so a stage stops without losing or repeating a batch.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    """One slot between a producer thread and a consumer thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._full = False
        self._closed = False

    def put(self, item: T) -> bool:
        """Hand ``item`` over once the slot is free; False (item not taken) when the handoff is closed."""
        with self._cond:
            self._cond.wait_for(lambda: not self._full or self._closed)
            if self._closed:
                return False
            self._item, self._full = item, True
            self._cond.notify_all()
            return True

    def wait_free(self) -> bool:
        """Wait until the slot is free (True), or the handoff closed (False). A producer that waits here before it
        takes its input hands over the freshest input, rather than one that aged while ``put`` waited."""
        with self._cond:
            self._cond.wait_for(lambda: not self._full or self._closed)
            return not self._closed

    def get(self) -> T | None:
        """The next item; None once the handoff is closed and empty."""
        with self._cond:
            self._cond.wait_for(lambda: self._full or self._closed)
            if not self._full:
                return None
            item, self._item, self._full = self._item, None, False
            self._cond.notify_all()
            return item

    def close(self) -> None:
        """No more puts; the consumer drains what is there, then gets None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

"""The hand-over between a node's callbacks and its worker threads, ROS-free.

:class:`WorkQueue` never blocks the producer (a subscription callback): when it is full, ``put``
drops the oldest waiting item and counts it. Capacity 1 keeps only the newest item (the segment
node: a stale scan is never labeled); a larger capacity is a bounded FIFO (the collect node's
synchronized sets).
"""
from __future__ import annotations

import collections
import threading
from typing import Any, Iterator


class WorkQueue:
    """Bounded thread-safe queue whose ``put`` drops the oldest waiting item when full."""

    def __init__(self, capacity: int = 1):
        if capacity < 1:
            raise ValueError(f'capacity must be >= 1, got {capacity}')
        self.capacity = int(capacity)
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0

    def put(self, item: Any) -> bool:
        """Queue ``item``; True when the oldest waiting item was dropped to make room."""
        with self._cond:
            dropped = len(self._items) >= self.capacity
            if dropped:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify()
            return dropped

    def take(self, timeout: float | None = None) -> Any:
        """The oldest waiting item; None when none came within ``timeout`` or once closed."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def items(self, poll_s: float = 0.2, drain: bool = True) -> Iterator[Any]:
        """Yield items as they come until :meth:`close` (then, with ``drain``, the ones still
        waiting); waits at most ``poll_s`` at a time."""
        while True:
            if self._closed and not drain:
                return
            item = self.take(poll_s)
            if item is not None:
                yield item
            elif self._closed:
                return

    def close(self) -> None:
        """Wake every waiting taker; :meth:`items` loops end."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

"""The hand-over between a node's callbacks and its worker threads, ROS-free.

:class:`WorkQueue` never blocks the producer (a subscription callback): when it is full, ``put``
drops the oldest waiting item and counts it. Capacity 1 keeps only the newest item (the segment
node: a stale scan is never labeled); a larger capacity is a bounded FIFO (the collect node's
synchronized sets). :class:`IdleGate` lets background work (the collect node's calibration
health check) run only while the foreground worker has nothing to do.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Any, Callable, Iterator


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


class IdleGate:
    """Background work yields to a foreground worker: the worker runs each item inside
    :meth:`busy`; the background thread calls :meth:`wait_idle` between small steps of its own
    work and goes on only while the worker is idle and ``pending()`` (e.g. the worker's queue
    length) is 0. Python threads share one interpreter lock and a nice value does not stop a
    thread that holds it, so a low-priority thread alone still slowed the worker."""

    def __init__(self, pending: Callable[[], int] | None = None, poll_s: float = 0.01):
        self._pending = pending or (lambda: 0)
        self._poll_s = float(poll_s)
        self._busy = 0
        self._closed = False
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def busy(self):
        """Context of one foreground item: background steps wait until it ends."""
        with self._cond:
            self._busy += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    def idle(self) -> bool:
        """Whether background work may run now."""
        with self._cond:
            return self._idle()

    def _idle(self) -> bool:
        return self._closed or (self._busy == 0 and not self._pending())

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until :meth:`idle` (or :meth:`close`); False when ``timeout`` passed first.
        The pending count is polled every ``poll_s``."""
        end = None if timeout is None else time.monotonic() + float(timeout)
        with self._cond:
            while not self._idle():
                left = self._poll_s if end is None else min(self._poll_s,
                                                            end - time.monotonic())
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> None:
        """Release every waiter for good (shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


"""Approximate-time synchronization of one LiDAR and N cameras, ROS-free and stamp-based.

:class:`ApproximateTimeSync` follows the semantics of message_filters'
``ApproximateTimeSynchronizer`` (Python): every input keeps a queue of at most ``queue_size``
messages keyed by stamp (the oldest is dropped); when a message arrives, the other queues are
searched for messages within ``slop`` of it, candidates closest to it first, and the first
combination whose stamps span less than ``slop`` is emitted and removed from the queues.

Additions for a real rig:

* per-input time offsets: matching uses ``header stamp + time_offset_ns`` (the camera's
  ``time_offset_ns`` of the calibration), emitted sets keep the header stamps;
* a dead camera must not stall the pipeline: with ``partial_timeout_ns`` a LiDAR message that no
  complete set has taken once the newest stamp seen is that much later is emitted with the
  cameras that have a message within slop (at least ``partial_min_cameras``), and so is a LiDAR
  message pushed out of its full queue; :meth:`poll` does the same against an external clock,
  and :meth:`poll_idle` once every stream has stopped (the collect node calls it from a timer);
* a stamp far behind the newest one (a bag that loops, a simulator restart) resets the queues.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from cmkd_ros.config import setting


class SyncError(ValueError):
    """Unknown input key or inconsistent synchronizer settings."""


@dataclass(frozen=True)
class SyncConfig:
    """Settings of the LiDAR + cameras synchronizer."""

    queue_size: int = setting(10, 'messages kept per input', ge=1, le=1000)
    slop_ms: float = setting(
        100.0, 'largest stamp spread (ms) inside one set; cameras triggered as a 10 Hz LiDAR '
        'sweeps past them (nuScenes-style rigs) span up to one sweep, 100 ms', gt=0.0)
    partial_timeout_ms: float = setting(
        0.0, 'emit a LiDAR message with the cameras present once the newest stamp is this much '
        '(ms) later and no complete set took it; 0 disables partial sets', ge=0.0)
    partial_min_cameras: int = setting(1, 'fewest cameras in a partial set', ge=0)
    reset_jump_ms: float = setting(
        1000.0, 'a stamp this much (ms) older than the newest one seen resets the queues '
        '(bag loop)', gt=0.0)


@dataclass
class SyncedSet:
    """One synchronized set: ``messages`` and header ``stamps_ns`` per input key.

    ``missing`` lists the camera keys absent from a partial set (empty for a complete set).
    """

    messages: dict
    stamps_ns: dict
    missing: tuple = ()

    @property
    def complete(self) -> bool:
        return not self.missing


@dataclass
class _Queue:
    entries: dict = field(default_factory=dict)     # matched time -> (header stamp, msg)


class ApproximateTimeSync:
    """Synchronize ``lidar_key`` with ``camera_keys`` by header stamps (integer ns).

    ``add(key, stamp_ns, msg)`` returns the sets completed by this message (and passes each to
    ``callback`` when given). ``time_offsets_ns`` maps a key to the offset added to its stamps
    before matching.
    """

    def __init__(self, lidar_key: Hashable, camera_keys: Sequence[Hashable], *,
                 queue_size: int = 10, slop_ns: int = 50_000_000,
                 time_offsets_ns: dict | None = None, partial_timeout_ns: int | None = None,
                 partial_min_cameras: int = 1, reset_jump_ns: int = 1_000_000_000,
                 callback: Callable[[SyncedSet], Any] | None = None) -> None:
        self.keys = (lidar_key, *camera_keys)
        if len(set(self.keys)) != len(self.keys):
            raise SyncError(f'input keys must be unique, got {list(self.keys)}')
        if queue_size < 1 or slop_ns <= 0:
            raise SyncError(f'queue_size must be >= 1 and slop_ns > 0, got {queue_size}, '
                            f'{slop_ns}')
        if partial_min_cameras > len(camera_keys):
            raise SyncError(f'partial_min_cameras={partial_min_cameras} exceeds the '
                            f'{len(camera_keys)} cameras')
        self.lidar_key = lidar_key
        self.camera_keys = tuple(camera_keys)
        self.queue_size = int(queue_size)
        self.slop_ns = int(slop_ns)
        offsets = dict(time_offsets_ns or {})
        unknown = set(offsets) - set(self.keys)
        if unknown:
            raise SyncError(f'time offsets for unknown inputs {sorted(map(str, unknown))}')
        self.offsets = {k: int(offsets.get(k, 0)) for k in self.keys}
        self.partial_timeout_ns = None if not partial_timeout_ns else int(partial_timeout_ns)
        self.partial_min_cameras = int(partial_min_cameras)
        self.reset_jump_ns = int(reset_jump_ns)
        self.callback = callback
        self.resets = 0
        self.dropped = 0                         # messages evicted from full queues
        self._queues = {k: _Queue() for k in self.keys}
        self._latest: int | None = None

    @classmethod
    def from_config(cls, config: SyncConfig, lidar_key: Hashable,
                    camera_keys: Sequence[Hashable], **kwargs: Any) -> 'ApproximateTimeSync':
        return cls(lidar_key, camera_keys, queue_size=config.queue_size,
                   slop_ns=int(round(config.slop_ms * 1e6)),
                   partial_timeout_ns=int(round(config.partial_timeout_ms * 1e6)) or None,
                   partial_min_cameras=config.partial_min_cameras,
                   reset_jump_ns=int(round(config.reset_jump_ms * 1e6)), **kwargs)

    def reset(self) -> None:
        """Forget every queued message and the newest stamp."""
        for q in self._queues.values():
            q.entries.clear()
        self._latest = None

    def queued(self, key: Hashable) -> int:
        return len(self._queues[self._check_key(key)].entries)

    def _check_key(self, key: Hashable) -> Hashable:
        if key not in self._queues:
            raise SyncError(f'unknown input {key!r}; inputs are {list(self.keys)}')
        return key

    def add(self, key: Hashable, stamp_ns: int, msg: Any) -> list[SyncedSet]:
        """Queue ``msg`` of input ``key`` stamped ``stamp_ns``; return the sets now complete."""
        self._check_key(key)
        t = int(stamp_ns) + self.offsets[key]
        if self._latest is not None and t < self._latest - self.reset_jump_ns:
            self.reset()
            self.resets += 1
        self._latest = t if self._latest is None else max(self._latest, t)
        queue = self._queues[key].entries
        queue[t] = (int(stamp_ns), msg)
        out = []
        while len(queue) > self.queue_size:
            oldest = min(queue)
            if key == self.lidar_key and self.partial_timeout_ns is not None:
                # a sweep leaving a full queue still goes out with the cameras present
                partial = self._partial(oldest)
                if partial is not None:
                    out.append(partial)
                    continue
            del queue[oldest]
            self.dropped += 1
        if t in queue:                          # not evicted straight away
            found = self._match(key, t)
            if found is not None:
                out.append(found)
        out.extend(self._expire(self._latest))
        for s in out:
            if self.callback is not None:
                self.callback(s)
        return out

    def poll(self, now_ns: int) -> list[SyncedSet]:
        """Emit partial sets whose timeout has passed at ``now_ns`` (same clock as the stamps)."""
        out = self._expire(int(now_ns))
        for s in out:
            if self.callback is not None:
                self.callback(s)
        return out

    def poll_idle(self, idle_ns: int) -> list[SyncedSet]:
        """:meth:`poll` for inputs that have all been quiet for ``idle_ns`` (measured by the
        caller on the stamps' clock): now is taken as the newest stamp seen plus ``idle_ns``.
        Nothing happens before ``idle_ns`` reaches the partial timeout, so a stream that is
        only between two messages never counts as stopped."""
        if self.partial_timeout_ns is None or self._latest is None or \
                idle_ns < self.partial_timeout_ns:
            return []
        return self.poll(self._latest + int(idle_ns))

    # -- internals
    def _match(self, key: Hashable, t: int) -> SyncedSet | None:
        """message_filters search: closest candidates first, first set spanning < slop."""
        others = [k for k in self.keys if k != key]
        candidates = []
        for k in others:
            near = sorted((abs(s - t), s) for s in self._queues[k].entries
                          if abs(s - t) <= self.slop_ns)
            if not near:
                return None
            candidates.append([s for _, s in near])
        for combo in itertools.product(*candidates):
            times = (t, *combo)
            if max(times) - min(times) < self.slop_ns:
                chosen = dict(zip((key, *others), times))
                return self._take(chosen, missing=())
        return None

    def _take(self, chosen: dict, missing: tuple) -> SyncedSet:
        messages, stamps = {}, {}
        for k in self.keys:
            if k in chosen:
                stamp, msg = self._queues[k].entries.pop(chosen[k])
                messages[k], stamps[k] = msg, stamp
        return SyncedSet(messages, stamps, missing)

    def _partial(self, t: int) -> SyncedSet | None:
        """Take the LiDAR message at ``t`` with the cameras within slop, if there are enough."""
        chosen = {self.lidar_key: t}
        for k in self.camera_keys:
            near = [(abs(s - t), s) for s in self._queues[k].entries if abs(s - t) <= self.slop_ns]
            if near:
                chosen[k] = min(near)[1]
        # keep the spread below slop: drop the camera farthest from the LiDAR stamp
        while max(chosen.values()) - min(chosen.values()) >= self.slop_ns:
            far = max((k for k in chosen if k != self.lidar_key),
                      key=lambda k: abs(chosen[k] - t))
            del chosen[far]
        if len(chosen) - 1 < self.partial_min_cameras:
            return None
        return self._take(chosen, tuple(k for k in self.camera_keys if k not in chosen))

    def _expire(self, now: int) -> list[SyncedSet]:
        """Partial sets for LiDAR messages older than ``now - partial_timeout``."""
        if self.partial_timeout_ns is None:
            return []
        out = []
        lidar_queue = self._queues[self.lidar_key].entries
        for t in sorted(lidar_queue):
            if now - t < self.partial_timeout_ns:
                break
            partial = self._partial(t)
            if partial is not None:
                out.append(partial)
            else:
                del lidar_queue[t]
                self.dropped += 1
        return out

"""Network threads chosen by measurement while a node runs.

How many torch threads make the segment node's scans fastest depends on what else runs: on 2
idle cores two network threads beside the preparing thread are faster (float32 p95 87 vs
135 ms, docs/results.md), with one core busy elsewhere one thread is (bfloat16: 0 against 11
drops). :class:`ThreadTuner` tries each count on the live scans and keeps the fastest, and
tries again when the chosen count's time moves by more than ``slack`` or every ``recheck``
scans (5 minutes at 10 Hz: each try may cost a few slow scans).
"""
from __future__ import annotations

import statistics
from collections import deque


class ThreadTuner:
    """Choose 1..``most`` threads by the median scan time over ``window`` scans each.

    Use: ``tuner.threads`` before a scan, ``tuner.record(seconds)`` after it. The first
    ``warmup`` scans are not measured (caches, oneDNN primitives). More threads are kept only
    when ``gain`` faster. A trial clearly worse than the chosen count or an earlier trial (its
    median over ``window // 3`` scans above ``1 + abort`` times theirs) stops early, so trying
    costs few slow scans. ``changes`` lists ``(threads, {count: median s})`` per decision.
    """

    def __init__(self, most: int, window: int = 15, warmup: int = 15, recheck: int = 3000,
                 slack: float = 0.3, gain: float = 0.05, abort: float = 0.5):
        if most < 1:
            raise ValueError(f'most must be >= 1, got {most}')
        self.most, self.window, self.recheck = most, window, recheck
        self.slack, self.gain, self.abort = slack, gain, abort
        self._warmup = warmup
        self.threads = most if most == 1 else 1        # while warming up
        self.level: float | None = None                 # median seconds of the chosen count
        self.changes: list[tuple[int, dict[int, float]]] = []
        self._trials: list[int] = []
        self._samples: dict[int, list[float]] = {}
        self._recent: deque = deque(maxlen=window)
        self._since = 0
        if most > 1:
            self._explore()

    @property
    def exploring(self) -> bool:
        return bool(self._trials)

    def _explore(self) -> None:
        self._trials = list(range(1, self.most + 1))
        self._samples = {}
        self.threads = self._trials[0]

    def record(self, seconds: float) -> bool:
        """Add one scan's time; True when ``threads`` changed for the next scan."""
        if self.most == 1:
            return False
        if self._warmup > 0:
            self._warmup -= 1
            return False
        before = self.threads
        if self._trials:
            self._trial(seconds)
        else:
            self._recent.append(seconds)
            self._since += 1
            recent = statistics.median(self._recent) if len(self._recent) == self.window else None
            changed = recent is not None and abs(recent - self.level) > self.level * self.slack
            if changed:                            # e.g. a core got busy elsewhere, or free
                self.level = recent
            if changed or self._since >= self.recheck:
                self._explore()
        return self.threads != before

    def _trial(self, seconds: float) -> None:
        samples = self._samples.setdefault(self.threads, [])
        samples.append(seconds)
        done = [statistics.median(s) for n, s in self._samples.items() if n != self.threads]
        best = min(done + ([self.level] if self.level is not None else []), default=None)
        early = (best is not None and len(samples) >= max(3, self.window // 3) and
                 statistics.median(samples) > best * (1 + self.abort))
        if len(samples) < self.window and not early:
            return
        self._trials.pop(0)
        if self._trials:
            self.threads = self._trials[0]
            return
        medians = {n: statistics.median(s) for n, s in sorted(self._samples.items())}
        best = min(medians, key=medians.get)
        for fewer in sorted(medians):                  # fewer threads unless clearly slower
            if fewer < best and medians[fewer] <= medians[best] * (1 + self.gain):
                best = fewer
                break
        self.threads, self.level = best, medians[best]
        self.changes.append((best, medians))
        self._recent.clear()
        self._since = 0

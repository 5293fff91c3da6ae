"""Progress reporting that suits where the output goes.

On a terminal: a live tqdm bar. In a log file, a pipe or under CI (``CI`` set): a few plain
lines (``label: 40/100 steps (40 %), 12.3 s, 3.2 steps/s, loss 0.512``) at every ``every``
fraction of the work and at the end, instead of a bar redrawn into the file hundreds of times.
``CMKD_PROGRESS=bar|lines|off`` overrides the choice.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

MODES = ('bar', 'lines', 'off')


def progress_mode(stream: TextIO | None = None) -> str:
    """``bar`` on an interactive terminal outside CI, else ``lines`` (``CMKD_PROGRESS`` wins)."""
    forced = os.environ.get('CMKD_PROGRESS', '').strip().lower()
    if forced in MODES:
        return forced
    stream = stream or sys.stderr
    interactive = hasattr(stream, 'isatty') and stream.isatty()
    return 'bar' if interactive and not os.environ.get('CI') else 'lines'


class LineProgress:
    """The tqdm calls the project uses (update, set_postfix, close), printed as plain lines."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0,
                 every: float = 0.1, stream: TextIO | None = None):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = self.start_n = int(initial)
        self.step = max(1, int(round(self.total * every)))
        self.next_report = (self.n // self.step + 1) * self.step
        self.stream = stream or sys.stderr
        self.postfix: dict[str, Any] = {}
        self.start = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self.next_report and self.n < self.total:
            self._report()
            self.next_report = (self.n // self.step + 1) * self.step

    def set_postfix(self, values: dict[str, Any] | None = None, **named: Any) -> None:
        self.postfix = {**(values or {}), **named}

    def _report(self) -> None:
        elapsed = time.monotonic() - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        share = f' ({100 * self.n / self.total:.0f} %)' if self.total else ''
        extra = ''.join(f', {k} {v}' for k, v in self.postfix.items())
        print(f'{self.desc}: {self.n}/{self.total} {self.unit}s{share}, {elapsed:.1f} s, '
              f'{rate:.2f} {self.unit}s/s{extra}', file=self.stream, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n > self.start_n:
                self._report()


class _Off(LineProgress):
    def _report(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str = 'step', initial: int = 0,
                 enabled: bool = True, stream: TextIO | None = None):
    """A tqdm bar or a :class:`LineProgress` (see the module docstring); ``enabled=False`` or
    ``CMKD_PROGRESS=off`` gives one that prints nothing."""
    stream = stream or sys.stderr
    mode = progress_mode(stream) if enabled else 'off'
    if mode == 'bar':
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream,
                    dynamic_ncols=True)
    cls = LineProgress if mode == 'lines' else _Off
    return cls(total, desc, unit, initial=initial, stream=stream)

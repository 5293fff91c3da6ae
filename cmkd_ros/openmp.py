"""OpenMP settings of the processes that run the student on the CPU (no torch import here).

They take effect only in the environment of a process before it loads torch (and with it the
OpenMP runtime): :func:`openmp_defaults` is called first thing by the nodes, and on the
environment of the processes the tools start.

- ``OMP_WAIT_POLICY=PASSIVE``: idle workers sleep instead of spinning for milliseconds (GNU
  OpenMP spins about 3 ms by default); on cores shared with other processes the spinning made
  2-thread inference 10x slower.
- ``GOMP_SPINCOUNT=10000`` (GNU OpenMP, which torch's CPU wheels ship): but a sleeping worker
  takes tens of microseconds to wake, and a forward pass of the small student opens about 60
  parallel regions, a few microseconds of Python apart. Spinning about 0.1 ms before sleeping
  bridges those gaps (on a quiet 2-core host the forward pass about 20 % faster, no more CPU
  time) and still sleeps between scans (docs/sparse_backends.md#cpu-threads-on-a-shared-machine).
  ``scripts/env.sh`` sets the same for a shell.
"""
from __future__ import annotations

import os
from typing import MutableMapping

OPENMP_DEFAULTS = {'OMP_WAIT_POLICY': 'PASSIVE', 'GOMP_SPINCOUNT': '10000'}


def openmp_defaults(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Put :data:`OPENMP_DEFAULTS` into ``env`` (default ``os.environ``) unless its owner chose a
    wait policy (``OMP_WAIT_POLICY`` set: then nothing changes); returns ``env``."""
    env = os.environ if env is None else env
    if 'OMP_WAIT_POLICY' not in env:
        for name, value in OPENMP_DEFAULTS.items():
            env.setdefault(name, value)
    return env

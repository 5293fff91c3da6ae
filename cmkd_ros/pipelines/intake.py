"""LiDAR cloud intake shared by the nodes, ROS-free: size bound, decoding, finite points.

Problems are reported, never raised, through a :class:`Report`: the nodes pass their
``Diagnostics`` (throttled warnings and counters on ``/diagnostics``); tests and tools a
:class:`CountingReport`. Messages are duck-typed PointCloud2 (rclpy or rosbags classes).
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from cmkd_ros.conversions import (ConversionError, MissingFieldsError, check_xyz_fields,
                                  cloud_to_array, xyz_from_cloud)


class Report(Protocol):
    """Where a pipeline reports: ``warn`` counts ``key`` and tells ``text`` (throttled by the
    implementation), ``count`` counts silently, ``set`` shows a value, ``info`` tells once."""

    def warn(self, key: str, text: str) -> None: ...

    def count(self, key: str, n: int = 1) -> None: ...

    def set(self, key: str, value: Any) -> None: ...

    def info(self, text: str) -> None: ...


class CountingReport:
    """A :class:`Report` that keeps everything: ``counters``, ``values``, ``warnings`` (key,
    text) and ``infos`` in order. For tests and command-line tools."""

    def __init__(self):
        self.counters: dict[str, int] = {}
        self.values: dict[str, Any] = {}
        self.warnings: list[tuple[str, str]] = []
        self.infos: list[str] = []

    def warn(self, key: str, text: str) -> None:
        self.count(key)
        self.warnings.append((key, text))

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def set(self, key: str, value: Any) -> None:
        self.values[key] = value

    def info(self, text: str) -> None:
        self.infos.append(text)


def oversized_cloud(msg: Any, max_points: int) -> str | None:
    """Why a PointCloud2 with more than ``max_points`` points (0: no limit) is skipped, or
    None. Reads only width and height: the check costs the same for any cloud size."""
    count = int(msg.width) * int(msg.height)
    if not max_points or count <= max_points:
        return None
    return (f'cloud of {count} points ({int(msg.width)} x {int(msg.height)}) skipped unread: '
            f'more than max_points ({max_points})')


def decode_cloud(msg: Any, report: Report, skipped: str) -> np.ndarray | None:
    """The decoded (N,) structured points of a LiDAR cloud, or None after a warning
    ``bad_layout`` or ``missing_xyz`` (``skipped`` starts its text); warns ``integer_xyz`` when
    x, y, z are not floating point (the cloud is still used)."""
    try:
        points = cloud_to_array(msg)
        note = check_xyz_fields(points.dtype)
    except MissingFieldsError as exc:
        report.warn('missing_xyz', f'{skipped}: {exc}')
        return None
    except ConversionError as exc:
        report.warn('bad_layout', f'{skipped}: {exc}')
        return None
    if note is not None:
        report.warn('integer_xyz', note)
    return points


def finite_xyz(points: np.ndarray, report: Report, fate: str) -> tuple[np.ndarray, np.ndarray]:
    """``(xyz (M, 3) float32 LiDAR frame, rows (M,) int64 into points)`` of the points whose
    coordinates are all finite; warns ``nan_points`` (``fate``: what becomes of the others)
    when some are not."""
    xyz, rows = xyz_from_cloud(points, drop_invalid=True)
    if rows.size < points.shape[0]:
        report.warn('nan_points', f'{points.shape[0] - rows.size} of {points.shape[0]} points '
                    f'have non-finite coordinates ({fate})')
    return xyz, rows

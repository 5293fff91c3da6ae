"""The record every 3D reader returns: one LiDAR sweep, its cameras and their calibration."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from cmkd_ros.calibration import RigCalibration


class ReaderError(ValueError):
    """A data set folder or file does not match the documented layout."""


def read_json_table(path: str, what: str, required: bool = True) -> list[dict]:
    """The records of a JSON table file (a list; nuScenes and nuImages tables); a missing
    optional table is empty. ``what`` names the data set in errors."""
    if not os.path.exists(path):
        if required:
            raise ReaderError(f'{what} table missing: {path}')
        return []
    with open(path, encoding='utf-8') as fh:
        try:
            records = json.load(fh)
        except ValueError as exc:
            raise ReaderError(f'{path}: invalid JSON ({exc})') from None
    if not isinstance(records, list):
        raise ReaderError(f'{path}: expected a list of records')
    return records


@dataclass
class Frame:
    """One LiDAR sweep with N points and C camera images, as read from disk.

    ``xyz`` (N, 3) float32, LiDAR frame; ``intensity`` (N,) float32 or None; ``labels`` (N,)
    int64 class ids with 255 = ignore, or None when unlabeled; ``images`` C (H, W, 3) uint8 RGB in
    the order of ``rig.cameras``; ``label_images`` C (H, W) uint8 or None; ``lidar_stamp_ns`` and
    ``camera_stamp_ns`` (C,) int64 header stamps; ``point_time_ns`` (N,) int64 absolute capture
    times or None; ``ego_stamps_ns`` (P,) and ``ego_poses`` (P, 4, 4) ``T_world_lidar`` for motion
    compensation, or None; ``extras`` further per-point arrays of the source, e.g. ``ring`` (N,)
    (the beam index, which the occlusion test uses).
    """

    name: str
    xyz: np.ndarray
    rig: RigCalibration
    images: list[np.ndarray]
    lidar_stamp_ns: int
    camera_stamp_ns: np.ndarray
    intensity: np.ndarray | None = None
    labels: np.ndarray | None = None
    label_images: list[np.ndarray] | None = None
    point_time_ns: np.ndarray | None = None
    ego_stamps_ns: np.ndarray | None = None
    ego_poses: np.ndarray | None = None
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.xyz)
        if self.xyz.ndim != 2 or self.xyz.shape[1] != 3:
            raise ReaderError(f'{self.name}: xyz must be (N, 3), got {self.xyz.shape}')
        if len(self.images) != len(self.rig.cameras):
            raise ReaderError(f'{self.name}: {len(self.images)} images for '
                              f'{len(self.rig.cameras)} cameras')
        for key in ('intensity', 'labels', 'point_time_ns'):
            value = getattr(self, key)
            if value is not None and len(value) != n:
                raise ReaderError(f'{self.name}: {key} has {len(value)} entries for {n} points')
        for cam, image in zip(self.rig.cameras, self.images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ReaderError(f'{self.name}: image of {cam.name} must be (H, W, 3) uint8, '
                                  f'got {image.shape} {image.dtype}')
            if image.shape[:2] != (cam.height, cam.width):
                raise ReaderError(f'{self.name}: image of {cam.name} is {image.shape[1]}x'
                                  f'{image.shape[0]}, calibration says {cam.width}x{cam.height}')

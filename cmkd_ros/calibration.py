"""Camera-LiDAR rig calibration: one schema, YAML I/O and validation.

Conventions (REP 103, OpenCV camera model): ``T_cam_lidar`` (4, 4) maps a point in the LiDAR
frame to the camera's optical frame (x right, y down, z forward); ``K`` (3, 3) are the intrinsics
of the image as published; ``D`` the distortion coefficients of ``distortion_model``
(``none``; ``plumb_bob`` k1 k2 p1 p2 k3; ``rational_polynomial`` k1 k2 p1 p2 k3 k4 k5 k6;
``equidistant`` k1 k2 k3 k4). ``time_offset_ns`` is added to a camera's header stamp to get the
true capture time.

YAML schema::

    lidar_frame: lidar
    cameras:
      - name: front               # unique; also the key used in datasets
        frame_id: front_optical
        width: 640
        height: 360
        K: [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]
        distortion_model: plumb_bob
        D: [k1, k2, p1, p2, k3]
        T_cam_lidar: [[...4 rows of 4...]]
        time_offset_ns: 0
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import yaml

DISTORTION_SIZES = {'none': (0,), 'plumb_bob': (5, 4), 'rational_polynomial': (8, 5, 4),
                    'equidistant': (4,)}


class CalibrationError(ValueError):
    """A calibration is malformed; the message names the camera and the field."""


@dataclass(frozen=True, eq=False)
class CameraCalibration:
    """Intrinsics, distortion and extrinsics of one camera relative to the LiDAR."""

    name: str
    width: int
    height: int
    K: np.ndarray                      # (3, 3) float64
    T_cam_lidar: np.ndarray            # (4, 4) float64, LiDAR frame -> camera optical frame
    distortion_model: str = 'none'
    D: np.ndarray = field(default_factory=lambda: np.zeros(0))
    frame_id: str = ''
    time_offset_ns: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, 'K', np.asarray(self.K, dtype=np.float64))
        object.__setattr__(self, 'T_cam_lidar', np.asarray(self.T_cam_lidar, dtype=np.float64))
        object.__setattr__(self, 'D', np.asarray(self.D, dtype=np.float64).reshape(-1))
        if not self.frame_id:
            object.__setattr__(self, 'frame_id', self.name)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`CalibrationError` naming the field that is wrong."""
        where = f'camera {self.name!r}'
        if not self.name:
            raise CalibrationError('camera name must not be empty')
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise CalibrationError(f'{where}: width/height must be positive, got '
                                   f'{self.width}x{self.height}')
        if self.K.shape != (3, 3) or not np.all(np.isfinite(self.K)):
            raise CalibrationError(f'{where}: K must be a finite 3x3 matrix')
        if self.K[0, 0] <= 0 or self.K[1, 1] <= 0:
            raise CalibrationError(f'{where}: K focal lengths must be positive, got '
                                   f'fx={self.K[0, 0]}, fy={self.K[1, 1]}')
        if not np.allclose(self.K[2], [0, 0, 1]) or abs(self.K[1, 0]) > 0:
            raise CalibrationError(f'{where}: K must be upper triangular with last row 0 0 1')
        if self.distortion_model not in DISTORTION_SIZES:
            raise CalibrationError(f'{where}: distortion_model {self.distortion_model!r} is not '
                                   f'one of {sorted(DISTORTION_SIZES)}')
        if self.D.size not in DISTORTION_SIZES[self.distortion_model]:
            raise CalibrationError(
                f'{where}: D has {self.D.size} coefficients, {self.distortion_model} takes '
                f'{" or ".join(map(str, DISTORTION_SIZES[self.distortion_model]))}')
        if not np.all(np.isfinite(self.D)):
            raise CalibrationError(f'{where}: D must be finite')
        T = self.T_cam_lidar
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise CalibrationError(f'{where}: T_cam_lidar must be a finite 4x4 matrix')
        if not np.allclose(T[3], [0, 0, 0, 1], atol=1e-9):
            raise CalibrationError(f'{where}: T_cam_lidar last row must be 0 0 0 1')
        R = T[:3, :3]
        if not np.allclose(R @ R.T, np.eye(3), atol=1e-5) or np.linalg.det(R) < 0:
            raise CalibrationError(f'{where}: T_cam_lidar rotation is not orthonormal '
                                   f'(max |R R^T - I| = {np.abs(R @ R.T - np.eye(3)).max():.2e}, '
                                   f'det = {np.linalg.det(R):.4f})')

    def check_image_size(self, width: int, height: int) -> None:
        """Raise if an image of ``width`` x ``height`` does not match this calibration."""
        if (int(width), int(height)) != (int(self.width), int(self.height)):
            raise CalibrationError(f'camera {self.name!r}: image is {width}x{height} but the '
                                   f'calibration says {self.width}x{self.height}')

    def to_dict(self) -> dict:
        return {'name': self.name, 'frame_id': self.frame_id, 'width': int(self.width),
                'height': int(self.height), 'K': self.K.tolist(),
                'distortion_model': self.distortion_model, 'D': self.D.tolist(),
                'T_cam_lidar': self.T_cam_lidar.tolist(),
                'time_offset_ns': int(self.time_offset_ns)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'CameraCalibration':
        known = {'name', 'frame_id', 'width', 'height', 'K', 'distortion_model', 'D',
                 'T_cam_lidar', 'time_offset_ns'}
        name = data.get('name', '?') if isinstance(data, Mapping) else '?'
        if not isinstance(data, Mapping):
            raise CalibrationError(f'camera entry must be a mapping, got {type(data).__name__}')
        unknown = sorted(set(data) - known)
        if unknown:
            raise CalibrationError(f'camera {name!r}: unknown field(s) {unknown}')
        for key in ('name', 'width', 'height', 'K', 'T_cam_lidar'):
            if key not in data:
                raise CalibrationError(f'camera {name!r}: missing field {key!r}')
        try:
            return cls(name=str(data['name']), width=int(data['width']),
                       height=int(data['height']), K=np.array(data['K'], dtype=np.float64),
                       T_cam_lidar=np.array(data['T_cam_lidar'], dtype=np.float64),
                       distortion_model=str(data.get('distortion_model', 'none')),
                       D=np.array(data.get('D', []), dtype=np.float64),
                       frame_id=str(data.get('frame_id', '')),
                       time_offset_ns=int(data.get('time_offset_ns', 0)))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, CalibrationError):
                raise
            raise CalibrationError(f'camera {name!r}: {exc}') from None


@dataclass(frozen=True, eq=False)
class RigCalibration:
    """All cameras of a rig, relative to one LiDAR."""

    cameras: tuple[CameraCalibration, ...]
    lidar_frame: str = 'lidar'

    def __post_init__(self) -> None:
        object.__setattr__(self, 'cameras', tuple(self.cameras))
        names = [c.name for c in self.cameras]
        if len(set(names)) != len(names):
            raise CalibrationError(f'camera names must be unique, got {names}')

    def __len__(self) -> int:
        return len(self.cameras)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.cameras]

    def camera(self, name: str) -> CameraCalibration:
        for cam in self.cameras:
            if cam.name == name:
                return cam
        raise CalibrationError(f'no camera named {name!r}; have {self.names}')

    def subset(self, names: Iterable[str]) -> 'RigCalibration':
        return RigCalibration(tuple(self.camera(n) for n in names), self.lidar_frame)

    def to_dict(self) -> dict:
        return {'lidar_frame': self.lidar_frame, 'cameras': [c.to_dict() for c in self.cameras]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'RigCalibration':
        if not isinstance(data, Mapping) or 'cameras' not in data:
            raise CalibrationError('calibration must be a mapping with a "cameras" list')
        unknown = sorted(set(data) - {'lidar_frame', 'cameras'})
        if unknown:
            raise CalibrationError(f'unknown top-level calibration field(s) {unknown}')
        cams = data['cameras']
        if not isinstance(cams, list) or not cams:
            raise CalibrationError('"cameras" must be a non-empty list')
        return cls(tuple(CameraCalibration.from_dict(c) for c in cams),
                   str(data.get('lidar_frame', 'lidar')))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> 'RigCalibration':
        try:
            return cls.from_dict(yaml.safe_load(text))
        except yaml.YAMLError as exc:
            raise CalibrationError(f'invalid calibration YAML: {exc}') from None

    def save(self, path: str) -> None:
        with open(path, 'w', encoding='utf-8') as fh:
            fh.write(self.to_yaml())

    @classmethod
    def load(cls, path: str) -> 'RigCalibration':
        try:
            with open(path, encoding='utf-8') as fh:
                return cls.from_yaml(fh.read())
        except FileNotFoundError:
            raise CalibrationError(f'calibration file not found: {path}') from None

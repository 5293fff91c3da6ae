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
        frame_id: front_camera_optical_frame
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

# libyaml's parser where PyYAML has it: every pair file carries its rig as YAML, and training
# reads a pair each step (pure-Python parsing took 10 ms of a 50 ms sample, libyaml 1.3 ms).
_SAFE_LOADER = getattr(yaml, 'CSafeLoader', yaml.SafeLoader)

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
            return cls.from_dict(yaml.load(text, Loader=_SAFE_LOADER))
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


# ----------------------------------------------------------------------------- loaders

_CAMERA_INFO_MODELS = {'plumb_bob': 'plumb_bob', 'rational_polynomial': 'rational_polynomial',
                       'equidistant': 'equidistant', 'fisheye': 'equidistant'}


def calibration_from_camera_info(msg: Any, T_cam_lidar: np.ndarray, name: str, *,
                                 frame_id: str | None = None, time_offset_ns: int = 0,
                                 rectified: bool = False) -> CameraCalibration:
    """:class:`CameraCalibration` from a ``sensor_msgs/CameraInfo`` (rclpy or rosbags) message.

    ``T_cam_lidar`` (4, 4) maps LiDAR points to the camera optical frame (from TF or a file).
    With ``rectified`` the camera is the rectified one (``image_rect``): K = P[:, :3], no
    distortion. An all-zero D becomes the model ``none``.
    """
    where = f'camera {name!r} CameraInfo'
    if int(getattr(msg, 'binning_x', 0)) > 1 or int(getattr(msg, 'binning_y', 0)) > 1:
        raise CalibrationError(f'{where}: binning is not supported')
    roi = getattr(msg, 'roi', None)
    if roi is not None and int(roi.width) and int(roi.height) and (
            int(roi.width) != int(msg.width) or int(roi.height) != int(msg.height)):
        raise CalibrationError(f'{where}: a region of interest is not supported')
    K = np.asarray(msg.k, dtype=np.float64).reshape(-1)
    if K.size != 9:
        raise CalibrationError(f'{where}: k must have 9 values, got {K.size}')
    D = np.asarray(msg.d, dtype=np.float64).reshape(-1)
    model_text = str(msg.distortion_model)
    if rectified:
        P = np.asarray(msg.p, dtype=np.float64).reshape(-1)
        if P.size != 12:
            raise CalibrationError(f'{where}: p must have 12 values, got {P.size}')
        P = P.reshape(3, 4)
        if np.any(P[:, 3] != 0):
            raise CalibrationError(f'{where}: P has a translation column (stereo right camera); '
                                   'fold it into T_cam_lidar and pass a P without it')
        K, model, D = P[:, :3].reshape(-1), 'none', np.zeros(0)
    elif D.size == 0 or not np.any(D):
        model, D = 'none', np.zeros(0)
    elif model_text in _CAMERA_INFO_MODELS:
        model = _CAMERA_INFO_MODELS[model_text]
        if model == 'plumb_bob' and D.size == 8:
            model = 'rational_polynomial'
    else:
        raise CalibrationError(f'{where}: distortion_model {model_text!r} is not one of '
                               f'{sorted(_CAMERA_INFO_MODELS)}')
    header = getattr(msg, 'header', None)
    frame = frame_id if frame_id is not None else (getattr(header, 'frame_id', '') or name)
    return CameraCalibration(name=name, width=int(msg.width), height=int(msg.height),
                             K=K.reshape(3, 3), T_cam_lidar=np.asarray(T_cam_lidar, np.float64),
                             distortion_model=model, D=D, frame_id=frame,
                             time_offset_ns=int(time_offset_ns))


def read_image_size(path: Any) -> tuple[int, int]:
    """``(width, height)`` of a PNG or JPEG from its header (no decoding).

    ``path`` is a file name or a binary file object (e.g. ``io.BytesIO`` of received bytes).
    """
    if hasattr(path, 'read'):
        return _image_size_from(path, '<bytes>')
    with open(path, 'rb') as fh:
        return _image_size_from(fh, str(path))


def _image_size_from(fh: Any, where: str) -> tuple[int, int]:
    head = fh.read(24)
    if head[:8] == b'\x89PNG\r\n\x1a\n' and len(head) >= 24:
        return int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24], 'big')
    if head[:2] != b'\xff\xd8':
        raise CalibrationError(f'{where}: not a PNG or JPEG file')
    fh.seek(2)
    while True:
        marker = fh.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            raise CalibrationError(f'{where}: JPEG without a frame header')
        length = int.from_bytes(fh.read(2), 'big')
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
        if 0xC0 <= marker[1] <= 0xCF and marker[1] not in (0xC4, 0xC8, 0xCC):
            sof = fh.read(5)
            if len(sof) < 5:
                raise CalibrationError(f'{where}: truncated JPEG frame header')
            return int.from_bytes(sof[3:5], 'big'), int.from_bytes(sof[1:3], 'big')
        if length < 2:
            raise CalibrationError(f'{where}: corrupt JPEG segment')
        fh.seek(length - 2, 1)


def _read_json(path: str) -> dict:
    import json
    try:
        with open(path, encoding='utf-8') as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise CalibrationError(f'calibration file not found: {path}') from None
    except json.JSONDecodeError as exc:
        raise CalibrationError(f'{path}: invalid JSON: {exc}') from None


def load_nuscenes_calibration(path: str, *, check_images: bool = True,
                              static: bool = False) -> RigCalibration:
    """The six-camera rig of the shared nuScenes sample ``calibration.json`` (no distortion).

    Camera order is the file's order; with ``check_images`` each camera's image file (beside the
    JSON) must exist and match the calibrated size. The file's ``T_cam_lidar`` goes through the
    global frame at both stamps, so it already contains the ego motion between the LiDAR and
    each camera stamp (up to about 0.3 m here); ``static=True`` builds the fixed mounting
    ``inv(T_ego_cam) @ T_ego_lidar`` instead, for use with ego poses and motion compensation.
    """
    import os
    data = _read_json(path)
    cams = data.get('cameras')
    if not isinstance(cams, Mapping) or not cams:
        raise CalibrationError(f'{path}: no "cameras" mapping')
    out = []
    for name, c in cams.items():
        try:
            if static:
                T = np.linalg.inv(np.array(c['T_ego_cam'], dtype=np.float64)) @ np.array(
                    data['lidar']['T_ego_lidar'], dtype=np.float64)
            else:
                T = np.array(c['T_cam_lidar'], dtype=np.float64)
            cam = CameraCalibration(name=name, width=int(c['width']), height=int(c['height']),
                                    K=np.array(c['K'], dtype=np.float64), T_cam_lidar=T,
                                    frame_id=name)
        except KeyError as exc:
            raise CalibrationError(f'{path}: camera {name!r} has no {exc.args[0]!r}') from None
        if check_images and c.get('file'):
            cam.check_image_size(*read_image_size(os.path.join(os.path.dirname(path),
                                                               c['file'])))
        out.append(cam)
    return RigCalibration(tuple(out), lidar_frame='LIDAR_TOP')


def nuscenes_stamps_ns(path: str) -> tuple[int, dict[str, int]]:
    """``(lidar_stamp_ns, {camera: stamp_ns})`` of the nuScenes sample ``calibration.json``."""
    data = _read_json(path)

    def ns(seconds: float) -> int:
        return int(round(float(seconds) * 1e6)) * 1000       # nuScenes stamps are microseconds

    return ns(data['lidar']['timestamp']), {n: ns(c['timestamp'])
                                            for n, c in data['cameras'].items()}


def load_kitti_calibration(path: str, image_path: str | None = None,
                           name: str = 'CAM2') -> RigCalibration:
    """The left color camera of a KITTI object frame (``P2``, ``R0_rect``, ``Tr_velo_to_cam``).

    ``P2 = K [I | t]`` with the baseline ``t = K^-1 P2[:, 3]``, so the camera is
    ``K = P2[:, :3]`` and ``T_cam_lidar = [I | t] @ R0_rect @ Tr_velo_to_cam``. The image size
    comes from the image file (default: ``image_2.png`` beside the JSON).
    """
    import os
    data = _read_json(path)
    c = data.get('camera', data)
    try:
        P2 = np.array(c['P2'], dtype=np.float64)[:3, :4]
        R0 = np.array(c['R0_rect'], dtype=np.float64)
        Tr = np.array(c['Tr_velo_to_cam'], dtype=np.float64)
    except KeyError as exc:
        raise CalibrationError(f'{path}: missing {exc.args[0]!r}') from None
    R0_4 = np.eye(4)
    R0_4[:3, :3] = R0[:3, :3]
    Tr_4 = np.eye(4)
    Tr_4[:Tr.shape[0], :] = Tr[:4, :4] if Tr.shape[0] == 4 else Tr[:3, :4]
    K = P2[:, :3]
    # 1. LiDAR -> camera 0 -> rectified camera 0; 2. rectified camera 0 -> camera 2 (baseline).
    T_cam2_rect0 = np.eye(4)
    T_cam2_rect0[:3, 3] = np.linalg.solve(K, P2[:, 3])
    T = T_cam2_rect0 @ R0_4 @ Tr_4
    if image_path is None:
        image_path = os.path.join(os.path.dirname(path), c.get('file', 'image_2.png'))
    width, height = read_image_size(image_path)
    cam = CameraCalibration(name=name, width=width, height=height, K=K, T_cam_lidar=T,
                            frame_id=name)
    if 'width' in c and 'height' in c:
        cam.check_image_size(int(c['width']), int(c['height']))
    return RigCalibration((cam,), lidar_frame='velodyne')

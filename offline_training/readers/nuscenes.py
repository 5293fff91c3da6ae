"""nuScenes lidarseg reader: LIDAR_TOP keyframes, the six cameras, 16-class point labels.

Reads the data set as published (``DATAROOT/<version>/*.json`` tables, ``samples/<CHANNEL>/``
files, ``lidarseg/<version>/<token>_lidarseg.bin``) through :class:`NuScenesTables`, a small
reader of the documented JSON schema. The official ``nuscenes-devkit`` cannot be installed next
to this project's numpy 2 (it pins numpy < 2), but a devkit ``NuScenes`` object works too: pass it
as ``tables`` (both expose ``.sample``, ``.scene``, ``.get(table, token)`` and ``sample['data']``).

Frames (nuScenes conventions): ``calibrated_sensor`` gives ``T_ego_sensor`` (translation, rotation
quaternion w x y z), ``ego_pose`` gives ``T_global_ego`` at each sample_data's timestamp
(microseconds). The rig's static extrinsic is ``T_cam_lidar = inv(T_ego_cam) @ T_ego_lidar``; the
ego motion between the LiDAR and camera timestamps is handed to the correspondence function as
the trajectory ``T_world_lidar(t) = T_global_ego(t) @ T_ego_lidar``.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from cmkd_ros.calibration import CameraCalibration, RigCalibration
from cmkd_ros.classes import NUSCENES_LIDARSEG16
from offline_training.readers.base import Frame, ReaderError

CAMERAS = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_BACK_RIGHT', 'CAM_BACK', 'CAM_BACK_LEFT',
           'CAM_FRONT_LEFT')
LIDAR = 'LIDAR_TOP'
IGNORE = 255

# nuScenes lidarseg general classes -> lidarseg challenge classes (NUSCENES_LIDARSEG16 names);
# every general class not listed (noise, animal, debris, ego, ...) is ignored.
GENERAL_TO_CHALLENGE = {
    'movable_object.barrier': 'barrier',
    'vehicle.bicycle': 'bicycle',
    'vehicle.bus.bendy': 'bus',
    'vehicle.bus.rigid': 'bus',
    'vehicle.car': 'car',
    'vehicle.construction': 'construction_vehicle',
    'vehicle.motorcycle': 'motorcycle',
    'human.pedestrian.adult': 'pedestrian',
    'human.pedestrian.child': 'pedestrian',
    'human.pedestrian.construction_worker': 'pedestrian',
    'human.pedestrian.police_officer': 'pedestrian',
    'movable_object.trafficcone': 'traffic_cone',
    'vehicle.trailer': 'trailer',
    'vehicle.truck': 'truck',
    'flat.driveable_surface': 'driveable_surface',
    'flat.other': 'other_flat',
    'flat.sidewalk': 'sidewalk',
    'flat.terrain': 'terrain',
    'static.manmade': 'manmade',
    'static.vegetation': 'vegetation',
}


def quaternion_to_matrix(q: Sequence[float]) -> np.ndarray:
    """(3, 3) rotation of a unit quaternion given as w, x, y, z (nuScenes order)."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def matrix_to_quaternion(rotation: np.ndarray) -> list[float]:
    """Unit quaternion w, x, y, z of a (3, 3) rotation (w >= 0)."""
    m = np.asarray(rotation, dtype=np.float64)
    w = np.sqrt(max(0.0, 1 + m[0, 0] + m[1, 1] + m[2, 2])) / 2
    x = np.sqrt(max(0.0, 1 + m[0, 0] - m[1, 1] - m[2, 2])) / 2
    y = np.sqrt(max(0.0, 1 - m[0, 0] + m[1, 1] - m[2, 2])) / 2
    z = np.sqrt(max(0.0, 1 - m[0, 0] - m[1, 1] + m[2, 2])) / 2
    x = np.copysign(x, m[2, 1] - m[1, 2])
    y = np.copysign(y, m[0, 2] - m[2, 0])
    z = np.copysign(z, m[1, 0] - m[0, 1])
    q = np.array([w, x, y, z])
    return (q / np.linalg.norm(q)).tolist()


def pose_matrix(translation: Sequence[float], rotation: Sequence[float]) -> np.ndarray:
    """(4, 4) transform from a nuScenes translation (x, y, z) and rotation (w, x, y, z)."""
    T = np.eye(4)
    T[:3, :3] = quaternion_to_matrix(rotation)
    T[:3, 3] = translation
    return T


class NuScenesTables:
    """The nuScenes JSON tables of one version, indexed by token (devkit-compatible subset).

    ``tables.<name>`` is the list of records of ``<name>.json``; ``get(name, token)`` one record;
    each ``sample`` gains ``data``: channel -> keyframe sample_data token, as in the devkit.
    """

    REQUIRED = ('scene', 'sample', 'sample_data', 'calibrated_sensor', 'sensor', 'ego_pose')
    OPTIONAL = ('lidarseg', 'category')

    def __init__(self, dataroot: str, version: str = 'v1.0-trainval'):
        self.dataroot = dataroot
        self.version = version
        folder = os.path.join(dataroot, version)
        if not os.path.isdir(folder):
            raise ReaderError(f'nuScenes table folder not found: {folder}')
        self._index: dict[str, dict[str, dict]] = {}
        for name in self.REQUIRED + self.OPTIONAL:
            path = os.path.join(folder, f'{name}.json')
            if not os.path.exists(path):
                if name in self.REQUIRED:
                    raise ReaderError(f'nuScenes table missing: {path}')
                records = []
            else:
                with open(path, encoding='utf-8') as fh:
                    try:
                        records = json.load(fh)
                    except ValueError as exc:
                        raise ReaderError(f'{path}: invalid JSON ({exc})') from None
            if not isinstance(records, list):
                raise ReaderError(f'{path}: expected a list of records')
            setattr(self, name, records)
            self._index[name] = {r['token']: r for r in records}
        # sample['data'][channel] = keyframe sample_data token (what the devkit adds)
        sensors = {cs['token']: self.get('sensor', cs['sensor_token'])['channel']
                   for cs in self.calibrated_sensor}
        for record in self.sample:
            record['data'] = {}
        for sd in self.sample_data:
            if sd.get('is_key_frame', False):
                sample = self.get('sample', sd['sample_token'])
                sample['data'][sensors[sd['calibrated_sensor_token']]] = sd['token']

    def get(self, table: str, token: str) -> dict:
        try:
            return self._index[table][token]
        except KeyError:
            raise ReaderError(f'nuScenes {table} record {token!r} not found') from None


def challenge_label_lut(categories: Sequence[dict]) -> np.ndarray:
    """(256,) uint8 lookup: lidarseg general index (category ``index``) -> 16-class id or 255."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for category in categories:
        if 'index' not in category:
            raise ReaderError(f'category {category.get("name")!r} has no lidarseg "index"; '
                              'is this a lidarseg-enabled category.json?')
        challenge = GENERAL_TO_CHALLENGE.get(category['name'])
        if challenge is not None:
            lut[int(category['index'])] = NUSCENES_LIDARSEG16.index(challenge)
    return lut


class NuScenesLidarSegReader:
    """Keyframes of nuScenes (optionally only ``scenes`` by name) as :class:`Frame` records.

    ``cameras`` defaults to all six; labels come from lidarseg when its table has the sweep
    (mapped to :data:`~cmkd_ros.classes.NUSCENES_LIDARSEG16`), else the frame is unlabeled.
    """

    def __init__(self, dataroot: str, version: str = 'v1.0-trainval',
                 scenes: Sequence[str] | None = None, cameras: Sequence[str] = CAMERAS,
                 tables=None, require_labels: bool = False):
        self.dataroot = dataroot
        self.tables = tables if tables is not None else NuScenesTables(dataroot, version)
        self.version = version
        self.cameras = tuple(cameras)
        unknown = sorted(set(self.cameras) - set(CAMERAS))
        if unknown:
            raise ReaderError(f'unknown nuScenes camera(s) {unknown}; have {list(CAMERAS)}')
        scene_tokens = None
        if scenes is not None:
            by_name = {s['name']: s['token'] for s in self.tables.scene}
            missing = sorted(set(scenes) - set(by_name))
            if missing:
                raise ReaderError(f'scene(s) {missing[:5]} not in {version}')
            scene_tokens = {by_name[n] for n in scenes}
        self.samples = [s for s in self.tables.sample
                        if scene_tokens is None or s['scene_token'] in scene_tokens]
        self.samples.sort(key=lambda s: (s['scene_token'], s['timestamp']))
        self.lidarseg = {r['sample_data_token']: r for r in getattr(self.tables, 'lidarseg', [])}
        self.label_lut = challenge_label_lut(self.tables.category) if self.lidarseg else None
        if require_labels:
            self.samples = [s for s in self.samples if s['data'][LIDAR] in self.lidarseg]
            if not self.samples:
                raise ReaderError(f'no lidarseg labels found under {dataroot}/{version}')

    def __len__(self) -> int:
        return len(self.samples)

    def _sensor_pose(self, sd: dict) -> tuple[np.ndarray, np.ndarray]:
        cs = self.tables.get('calibrated_sensor', sd['calibrated_sensor_token'])
        ego = self.tables.get('ego_pose', sd['ego_pose_token'])
        return (pose_matrix(cs['translation'], cs['rotation']),
                pose_matrix(ego['translation'], ego['rotation']))

    def _path(self, filename: str) -> str:
        path = os.path.join(self.dataroot, filename)
        if not os.path.exists(path):
            raise ReaderError(f'nuScenes file missing: {path}')
        return path

    def __getitem__(self, i: int) -> Frame:
        import cv2
        sample = self.samples[i]
        lidar_sd = self.tables.get('sample_data', sample['data'][LIDAR])
        # 1. Points: float32 x, y, z, intensity, ring index in the LIDAR_TOP frame.
        raw = np.fromfile(self._path(lidar_sd['filename']), dtype=np.float32)
        if raw.size % 5:
            raise ReaderError(f'{lidar_sd["filename"]}: size is not a multiple of 5 floats')
        raw = raw.reshape(-1, 5)
        T_ego_lidar, T_global_ego_lidar = self._sensor_pose(lidar_sd)
        lidar_ns = int(lidar_sd['timestamp']) * 1000
        labels = None
        if lidar_sd['token'] in self.lidarseg:
            record = self.lidarseg[lidar_sd['token']]
            general = np.fromfile(self._path(record['filename']), dtype=np.uint8)
            if len(general) != len(raw):
                raise ReaderError(f'{record["filename"]}: {len(general)} labels for '
                                  f'{len(raw)} points')
            labels = self.label_lut[general].astype(np.int64)
        # 2. Cameras: static extrinsics through the ego frame, ego poses at each stamp.
        cams, images, stamps = [], [], []
        ego_stamps = [lidar_ns]
        ego_poses = [T_global_ego_lidar @ T_ego_lidar]
        for channel in self.cameras:
            if channel not in sample['data']:
                raise ReaderError(f'sample {sample["token"]} has no {channel} keyframe')
            sd = self.tables.get('sample_data', sample['data'][channel])
            T_ego_cam, T_global_ego_cam = self._sensor_pose(sd)
            cs = self.tables.get('calibrated_sensor', sd['calibrated_sensor_token'])
            image = cv2.imread(self._path(sd['filename']), cv2.IMREAD_COLOR)
            if image is None:
                raise ReaderError(f'{sd["filename"]}: not a readable image')
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            cams.append(CameraCalibration(
                name=channel, width=image.shape[1], height=image.shape[0],
                K=np.asarray(cs['camera_intrinsic'], dtype=np.float64),
                T_cam_lidar=np.linalg.inv(T_ego_cam) @ T_ego_lidar))
            images.append(image)
            stamp = int(sd['timestamp']) * 1000
            stamps.append(stamp)
            ego_stamps.append(stamp)
            ego_poses.append(T_global_ego_cam @ T_ego_lidar)
        order = np.argsort(ego_stamps, kind='stable')
        stamps_sorted = np.asarray(ego_stamps, dtype=np.int64)[order]
        keep = np.concatenate([[True], np.diff(stamps_sorted) > 0])
        return Frame(
            name=f'nuscenes/{sample["token"]}', xyz=np.ascontiguousarray(raw[:, :3]),
            intensity=np.ascontiguousarray(raw[:, 3]), labels=labels,
            rig=RigCalibration(tuple(cams), lidar_frame=LIDAR), images=images,
            lidar_stamp_ns=lidar_ns, camera_stamp_ns=np.asarray(stamps, dtype=np.int64),
            ego_stamps_ns=stamps_sorted[keep],
            ego_poses=np.asarray(ego_poses, dtype=np.float64)[order][keep],
            extras={'ring': raw[:, 4].astype(np.uint16)})

"""nuScenes lidarseg reader: LIDAR_TOP keyframes, the six cameras, 16-class point labels.

Reads the data set as published (``DATAROOT/<version>/*.json`` tables, ``samples/<CHANNEL>/``
files, ``lidarseg/<version>/<token>_lidarseg.bin``; ``sweeps/`` are not used: only keyframes are
labeled) through :class:`NuScenesTables`, a small reader of the documented JSON schema. The
version folder (``v1.0-trainval``, ``v1.0-mini``, ``v1.0-test``) is found in the data root when
none is named (:func:`find_version`); scenes are picked by the official splits
(:mod:`.nuscenes_splits`). The official ``nuscenes-devkit`` cannot be installed next
to this project's numpy 2 (it pins numpy < 2), but a devkit ``NuScenes`` object works too: pass it
as ``tables`` (both expose ``.sample``, ``.scene``, ``.get(table, token)`` and ``sample['data']``).

Frames (nuScenes conventions): ``calibrated_sensor`` gives ``T_ego_sensor`` (translation, rotation
quaternion w x y z), ``ego_pose`` gives ``T_global_ego`` at each sample_data's timestamp
(microseconds). The rig's static extrinsic is ``T_cam_lidar = inv(T_ego_cam) @ T_ego_lidar``; the
ego motion between the LiDAR and camera timestamps is handed to the correspondence function as
the trajectory ``T_world_lidar(t) = T_global_ego(t) @ T_ego_lidar``.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from cmkd_ros.calibration import CameraCalibration, RigCalibration
from cmkd_ros.classes import NUSCENES_LIDARSEG16
from offline_training.readers.base import Frame, ReaderError, read_json_table

CAMERAS = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_BACK_RIGHT', 'CAM_BACK', 'CAM_BACK_LEFT',
           'CAM_FRONT_LEFT')
LIDAR = 'LIDAR_TOP'
IGNORE = 255
LOG = logging.getLogger('cmkd_ros.readers')

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


def find_version(dataroot: str, version: str = '') -> str:
    """The version folder of ``dataroot`` to read: ``version`` when given and present, else the
    one folder holding ``scene.json``; a :class:`ReaderError` lists what was found otherwise."""
    if not os.path.isdir(dataroot):
        raise ReaderError(f'nuScenes data root not found: {dataroot}')
    found = sorted(n for n in os.listdir(dataroot)
                   if os.path.isfile(os.path.join(dataroot, n, 'scene.json')))
    if version:
        if not os.path.isdir(os.path.join(dataroot, version)):
            raise ReaderError(f'nuScenes table folder not found: '
                              f'{os.path.join(dataroot, version)} (version folders in '
                              f'{dataroot}: {found or "none"})')
        return version
    if len(found) == 1:
        return found[0]
    if not found:
        raise ReaderError(f'no nuScenes version folder (one holding scene.json, e.g. v1.0-mini) '
                          f'in {dataroot}; it holds {sorted(os.listdir(dataroot))[:10]}')
    raise ReaderError(f'{dataroot} holds several nuScenes versions {found}: name one '
                      '(data.version, or --version)')


class NuScenesTables:
    """The nuScenes JSON tables of one version, indexed by token (devkit-compatible subset).

    ``tables.<name>`` is the list of records of ``<name>.json``; ``get(name, token)`` one record;
    each ``sample`` gains ``data``: channel -> keyframe sample_data token, as in the devkit.
    """

    REQUIRED = ('scene', 'sample', 'sample_data', 'calibrated_sensor', 'sensor', 'ego_pose')
    OPTIONAL = ('lidarseg', 'category')

    def __init__(self, dataroot: str, version: str = ''):
        self.dataroot = dataroot
        self.version = version = find_version(dataroot, version)
        folder = os.path.join(dataroot, version)
        self._index: dict[str, dict[str, dict]] = {}
        for name in self.REQUIRED + self.OPTIONAL:
            records = read_json_table(os.path.join(folder, f'{name}.json'), 'nuScenes',
                                      name in self.REQUIRED)
            if name == 'sample_data':
                # only keyframes are labeled and read: sweeps are most of the table's memory
                records = [r for r in records if r.get('is_key_frame', False)]
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
    """Keyframes of nuScenes (optionally a ``split`` or only ``scenes`` by name) as
    :class:`Frame` records.

    ``version``: the table folder, found in ``dataroot`` when empty (:func:`find_version`).
    ``split``: a split spec of :func:`~.nuscenes_splits.resolve_scenes` (empty: the version's
    official ``part`` split, 'train' or 'val'); scenes of an official split that the tables lack
    are left out, named scenes must exist. ``cameras`` defaults to all six; labels come from
    lidarseg when its table has the sweep (mapped to
    :data:`~cmkd_ros.classes.NUSCENES_LIDARSEG16`), else the frame is unlabeled. Keyframes whose
    LiDAR file is missing (a partial download) are left out with a warning.
    ``split_name`` and ``scenes`` say what was read.
    """

    def __init__(self, dataroot: str, version: str = '',
                 scenes: Sequence[str] | None = None, cameras: Sequence[str] = CAMERAS,
                 tables=None, require_labels: bool = False,
                 split: Sequence[str] | str | None = None, part: str = 'train'):
        from offline_training.readers.nuscenes_splits import resolve_scenes
        self.dataroot = dataroot
        self.tables = tables if tables is not None else NuScenesTables(dataroot, version)
        self.version = version = getattr(self.tables, 'version', version)
        self.cameras = tuple(cameras)
        unknown = sorted(set(self.cameras) - set(CAMERAS))
        if unknown:
            raise ReaderError(f'unknown nuScenes camera(s) {unknown}; have {list(CAMERAS)}')
        by_name = {s['name']: s['token'] for s in self.tables.scene}
        self.split_name = 'all'
        if split is not None:
            if scenes is not None:
                raise ReaderError('give a split or scene names, not both')
            self.split_name, scenes = resolve_scenes(version, split, part)
            if self.split_name != 'custom':
                scenes = [n for n in scenes if n in by_name]
                if not scenes:
                    raise ReaderError(f'none of the {self.split_name} scenes is in '
                                      f'{dataroot}/{version}')
        if scenes is not None:
            missing = sorted(set(scenes) - set(by_name))
            if missing:
                raise ReaderError(f'scene(s) {missing[:5]} not in {version}')
        wanted = set(by_name if scenes is None else scenes)
        scene_tokens = {by_name[n] for n in wanted}
        self.samples = [s for s in self.tables.sample if s['scene_token'] in scene_tokens]
        self.samples.sort(key=lambda s: (s['scene_token'], s['timestamp']))
        self.lidarseg = {r['sample_data_token']: r for r in getattr(self.tables, 'lidarseg', [])}
        self.label_lut = challenge_label_lut(self.tables.category) if self.lidarseg else None
        if require_labels:
            self.samples = [s for s in self.samples if s['data'][LIDAR] in self.lidarseg]
            if not self.samples:
                raise ReaderError(f'no lidarseg labels found under {dataroot}/{version}')
        present = [s for s in self.samples if os.path.exists(os.path.join(
            dataroot, self.tables.get('sample_data', s['data'][LIDAR])['filename']))]
        if len(present) < len(self.samples):
            if not present:
                raise ReaderError(f'none of the {len(self.samples)} LIDAR_TOP keyframe files of '
                                  f'{version} is under {dataroot} (samples/LIDAR_TOP missing?)')
            LOG.warning(f'nuScenes {version}: {len(self.samples) - len(present)} of '
                        f'{len(self.samples)} keyframes left out, their LIDAR_TOP file is '
                        f'missing under {dataroot} (a partial download?)')
            self.samples = present
        token_to_name = {t: n for n, t in by_name.items()}
        self.scenes = sorted({token_to_name[s['scene_token']] for s in self.samples})

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

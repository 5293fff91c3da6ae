"""PyTorch datasets of LiDAR sweeps with camera images and point-pixel correspondences.

Sources: the project's pair format (:class:`PairDataset`: synthetic export and the collect node's
output, readable while being written), nuScenes lidarseg with its six cameras
(:class:`NuScenesDataset`) and SemanticKITTI with the KITTI color cameras
(:class:`SemanticKITTIDataset`); :func:`build_dataset` picks one as the training config's
``data.format`` says. All share :class:`ScanDataset`, which splits the work as

1. ``get_frame(i)``: file IO only (a reader's :class:`~offline_training.readers.base.Frame`),
2. ``get_data(i)``: correspondences from :func:`cmkd_ros.projection.compute_correspondences`
   (occlusion test and motion compensation on by default, as configured), or those stored with
   a pair when its ``corr_settings`` hash equals the hash of these settings (the same arrays,
   without their cost: :mod:`cmkd_ros.pairs`), optional image resizing (pixel coordinates
   scaled with the images), fixed keys as numpy arrays,
3. ``transform(data, rng)``: 3D augmentation of ``xyz`` only (after the correspondences, so they
   stay valid), then the student's point features from the augmented points.

A sample (``dataset[i]``) has fixed keys, all torch tensors except ``name``:

=============== ====================== ====================================================
key             shape, dtype           meaning
=============== ====================== ====================================================
xyz             (N, 3) float32         points, LiDAR frame (augmented when enabled)
feats           (N, F) float32         ``cmkd_ros.models.voxelize.point_features``
labels          (N,) int64             class ids, 255 = ignore (all 255 when unlabeled)
images          (C, 3, H, W) uint8     RGB camera images (resized by ``image_scale``)
label_images    (C, H, W) int64        per-pixel labels; only when every camera has one
corr_point      (M,) int64             point index of each correspondence
corr_camera     (M,) int64             camera index of each correspondence
corr_uv         (M, 2) float32         pixel (x right, y down) in the returned image
visible_any     (N,) bool              the point has at least one correspondence
intensity       (N,) float32           raw intensity (zeros when the source has none)
name            str                    where the sample came from
=============== ====================== ====================================================

:class:`SparseCollate` batches samples for the student (voxelization, offsets into the
concatenated points and images).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from cmkd_ros.calibration import RigCalibration
from cmkd_ros.config import build, to_dict
from cmkd_ros.pairs import PairReader
from cmkd_ros.projection import (CorrespondenceConfig, Correspondences, compute_correspondences,
                                 correspondence_settings_hash)
from offline_training.config import POINT_DATA_FORMATS
from offline_training.readers.base import Frame

IGNORE = 255


class DatasetError(ValueError):
    """A sample cannot be built (inconsistent arrays, unknown cameras, bad settings)."""


# ---------------------------------------------------------------------------------------------
# 3D augmentation


class PointAugment:
    """Apply ``xyz`` transforms (``transform(xyz, rng) -> xyz``) to a sample's ``'xyz'``.

    The transforms of :mod:`cmkd_ros.models.augment` fit. Correspondences, labels and images are
    untouched, so they remain valid: augmentation runs after correspondences are computed.
    """

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        xyz = data['xyz']
        for transform in self.transforms:
            xyz = transform(xyz, rng)
        if xyz.shape != data['xyz'].shape:
            raise DatasetError(f'a point transform changed xyz from {data["xyz"].shape} to '
                               f'{xyz.shape}; point transforms must keep every point')
        return {**data, 'xyz': np.ascontiguousarray(xyz, dtype=np.float32)}


def default_point_augment(scale_xy: tuple = (1.0, 1.0)) -> PointAugment:
    """Rotation about z (any angle), random x/y flips and scaling by 0.95..1.05; with
    ``scale_xy != (1, 1)`` also a horizontal scaling by a factor in that range."""
    from cmkd_ros.models.augment import RandomFlip, RandomRotationZ, RandomScale
    transforms = [RandomRotationZ(math.pi), RandomFlip(), RandomScale(0.95, 1.05)]
    if tuple(scale_xy) != (1.0, 1.0):
        transforms.append(RandomScale(*scale_xy, axes=(0, 1)))
    return PointAugment(transforms)


# ---------------------------------------------------------------------------------------------
# Base dataset


def _resize_image(image: np.ndarray, scale: float, nearest: bool) -> np.ndarray:
    import cv2
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    if nearest:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp)


class ScanDataset(torch.utils.data.Dataset):
    """Common sample building; subclasses implement ``__len__`` and ``get_frame(i)``.

    ``correspondence``: :class:`~cmkd_ros.projection.CorrespondenceConfig` (or mapping);
    ``occlusion`` / ``motion_compensation`` override its flags when not None. ``augment``: True
    for :func:`default_point_augment`, a callable ``(data, rng) -> data``, or False.
    ``image_scale`` resizes images (and scales ``corr_uv``); ``feature_kind`` selects
    ``point_features``; ``seed`` makes augmentation reproducible (else torch's seed is used).
    ``stored_correspondences``: use a frame's stored correspondences when their settings hash
    matches (``extras['correspondences']``, ``extras['correspondence_settings']``).
    """

    def __init__(self, *, correspondence: CorrespondenceConfig | dict | None = None,
                 occlusion: bool | None = None, motion_compensation: bool | None = None,
                 augment: bool | Callable = False, image_scale: float = 1.0,
                 feature_kind: str = 'height', seed: int | None = None,
                 stored_correspondences: bool = True):
        cfg = correspondence
        if cfg is None:
            cfg = CorrespondenceConfig()
        elif not isinstance(cfg, CorrespondenceConfig):
            cfg = build(CorrespondenceConfig, cfg)
        overrides = {k: v for k, v in (('occlusion', occlusion),
                                       ('motion_compensation', motion_compensation))
                     if v is not None}
        if overrides:
            cfg = build(CorrespondenceConfig, {**to_dict(cfg), **overrides})
        self.correspondence = cfg
        self.correspondence_settings = correspondence_settings_hash(cfg)
        self.stored_correspondences = bool(stored_correspondences)
        if augment is True:
            augment = default_point_augment()
        self.augment = augment or None
        if not (0 < image_scale <= 4):
            raise DatasetError(f'image_scale must be in (0, 4], got {image_scale}')
        self.image_scale = float(image_scale)
        from cmkd_ros.models.voxelize import feature_channels
        feature_channels(feature_kind)          # validates the name
        self.feature_kind = feature_kind
        self.seed = seed

    # -- to implement
    def __len__(self) -> int:
        raise NotImplementedError

    def get_frame(self, i: int) -> Frame:
        raise NotImplementedError

    # -- shared
    def trajectory(self, frame: Frame):
        if frame.ego_poses is None or len(frame.ego_poses) == 0:
            return None
        from cmkd_ros.motion import PoseTrajectory
        return PoseTrajectory(np.asarray(frame.ego_stamps_ns, dtype=np.int64), frame.ego_poses)

    def get_data(self, i: int) -> dict:
        """The un-augmented sample of index ``i`` as numpy arrays (see the module table)."""
        frame = self.get_frame(i)
        xyz = np.asarray(frame.xyz, dtype=np.float32)
        n = len(xyz)
        labels = (np.full(n, IGNORE, dtype=np.int64) if frame.labels is None
                  else np.asarray(frame.labels, dtype=np.int64))
        intensity = (np.zeros(n, dtype=np.float32) if frame.intensity is None
                     else np.asarray(frame.intensity, dtype=np.float32))
        point_time = frame.point_time_ns
        ring = frame.extras.get('ring')
        # 1. Points with non-finite coordinates cannot be projected or voxelized: drop them.
        finite = np.isfinite(xyz).all(axis=1)
        if not finite.all():
            xyz, labels, intensity = xyz[finite], labels[finite], intensity[finite]
            if point_time is not None:
                point_time = np.asarray(point_time)[finite]
            if ring is not None:
                ring = np.asarray(ring)[finite]
        # 2. Correspondences: those stored with the frame when computed with these settings on
        #    these points, else computed (motion compensation when the frame has ego poses).
        corr = frame.extras.get('correspondences')
        if not (self.stored_correspondences and corr is not None and finite.all() and
                frame.extras.get('correspondence_settings') == self.correspondence_settings):
            trajectory = (self.trajectory(frame) if self.correspondence.motion_compensation
                          else None)
            if point_time is None:
                point_time = int(frame.lidar_stamp_ns)
            corr = compute_correspondences(
                xyz, frame.rig, point_time_ns=point_time,
                camera_stamp_ns=np.asarray(frame.camera_stamp_ns, dtype=np.int64),
                trajectory=trajectory, ring=ring, config=self.correspondence)
        uv = corr.uv.astype(np.float32)
        images = list(frame.images)
        label_images = frame.label_images
        # 3. Resize images; pixel centres at integers: u' = (u + 0.5) * s - 0.5.
        if self.image_scale != 1.0:
            sx = [_resize_image(im, self.image_scale, False) for im in images]
            scale_x = np.array([r.shape[1] / im.shape[1] for r, im in zip(sx, images)])
            scale_y = np.array([r.shape[0] / im.shape[0] for r, im in zip(sx, images)])
            images = sx
            if label_images is not None:
                label_images = [_resize_image(lab, self.image_scale, True)
                                for lab in label_images]
            cam = corr.camera
            uv = np.stack([(uv[:, 0] + 0.5) * scale_x[cam] - 0.5,
                           (uv[:, 1] + 0.5) * scale_y[cam] - 0.5], axis=1).astype(np.float32)
        visible = np.zeros(len(xyz), dtype=bool)
        visible[corr.point] = True
        data = {
            'name': frame.name, 'xyz': xyz, 'intensity': intensity, 'labels': labels,
            'images': images, 'corr_point': corr.point.astype(np.int64),
            'corr_camera': corr.camera.astype(np.int64), 'corr_uv': uv,
            'visible_any': visible,
        }
        if label_images is not None:
            data['label_images'] = label_images
        return data

    def transform(self, data: dict, rng: np.random.Generator | None = None) -> dict:
        """Augment ``xyz`` (when enabled), then compute ``feats`` from the final points."""
        from cmkd_ros.models.voxelize import point_features
        if self.augment is not None:
            data = self.augment(data, rng if rng is not None else np.random.default_rng())
        data['feats'] = np.asarray(point_features(data['xyz'], data['intensity'],
                                                  kind=self.feature_kind), dtype=np.float32)
        return data

    def _rng(self, i: int) -> np.random.Generator:
        if self.seed is not None:
            return np.random.default_rng((self.seed, i))
        return np.random.default_rng(int(torch.randint(0, 2 ** 31 - 1, (1,)).item()))

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f'index {i} out of range for {len(self)} samples')
        data = self.transform(self.get_data(i % len(self)), self._rng(i % len(self)))
        return to_tensors(data)


def to_tensors(data: dict) -> dict:
    """numpy sample -> torch sample (images (C, 3, H, W) uint8, label images int64)."""
    out = {'name': data['name']}
    for key in ('xyz', 'feats', 'intensity'):
        out[key] = torch.from_numpy(np.ascontiguousarray(data[key], dtype=np.float32))
    for key in ('labels', 'corr_point', 'corr_camera'):
        out[key] = torch.from_numpy(np.ascontiguousarray(data[key], dtype=np.int64))
    out['corr_uv'] = torch.from_numpy(np.ascontiguousarray(data['corr_uv'], dtype=np.float32))
    out['visible_any'] = torch.from_numpy(np.ascontiguousarray(data['visible_any'], dtype=bool))
    images = data['images']
    sizes = {im.shape[:2] for im in images}
    if len(sizes) > 1:
        out['images'] = _pad_stack([torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)
                                    for im in images], 0)
    else:
        out['images'] = torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(
            0, 3, 1, 2).contiguous()
    if 'label_images' in data:
        out['label_images'] = _pad_stack([torch.from_numpy(np.asarray(lab, dtype=np.int64))
                                          for lab in data['label_images']], IGNORE)
    return out


def _pad_stack(tensors: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    """Stack (..., H_i, W_i) tensors into (n, ..., max H, max W), padding bottom/right."""
    h = max(t.shape[-2] for t in tensors)
    w = max(t.shape[-1] for t in tensors)
    out = tensors[0].new_full((len(tensors),) + tuple(tensors[0].shape[:-2]) + (h, w), value)
    for i, t in enumerate(tensors):
        out[i, ..., :t.shape[-2], :t.shape[-1]] = t
    return out


# ---------------------------------------------------------------------------------------------
# Sources


def frame_from_pair(pair, cameras: Sequence[str] | None = None, name: str = '',
                    label_images: bool = True) -> Frame:
    """A :class:`Frame` of a :class:`cmkd_ros.pairs.Pair` (images decoded, rig in image order)."""
    names = list(pair.camera_names)
    if cameras:
        missing = [c for c in cameras if c not in names]
        if missing:
            raise DatasetError(f'{name}: camera(s) {missing} not in the pair ({names})')
        names = [c for c in names if c in cameras]
    stamps = np.asarray(pair.camera_stamp_ns, dtype=np.int64)
    stamps = np.array([stamps[pair.camera_names.index(c)] for c in names], dtype=np.int64)
    rig: RigCalibration = pair.calibration.subset(names)
    labels = None
    if pair.labels is not None:
        labels = np.asarray(pair.labels).astype(np.int64)
    images = [pair.image(c) for c in names]
    lab_imgs = None
    if label_images and any(c in pair.label_images for c in names):
        # a camera whose image nobody labeled counts as unlabeled (255) everywhere
        lab_imgs = [pair.label_image(c) if c in pair.label_images else
                    np.full(image.shape[:2], IGNORE, np.uint8)
                    for c, image in zip(names, images)]
    extras = {} if pair.ring is None else {'ring': pair.ring}
    # Stored correspondences hold every camera of the pair: with a subset they are computed
    # (projecting another set of cameras rounds the last float32 bit differently).
    stored = stored_correspondences(pair, name) if names == list(pair.camera_names) else None
    if stored is not None:
        extras.update(correspondences=stored,
                      correspondence_settings=pair.correspondence_settings)
    return Frame(name=name, xyz=np.asarray(pair.xyz, dtype=np.float32), rig=rig,
                 images=images, lidar_stamp_ns=int(pair.lidar_stamp_ns),
                 camera_stamp_ns=stamps, intensity=pair.intensity, labels=labels,
                 label_images=lab_imgs, point_time_ns=pair.point_time_ns,
                 ego_stamps_ns=pair.ego_stamps_ns, ego_poses=pair.ego_poses, extras=extras)


def store_correspondences(pair, config: CorrespondenceConfig | None = None):
    """``pair`` with its correspondences and their settings hash stored (what the collect node
    writes), computed as :class:`ScanDataset` computes them; its points must be finite."""
    config = config or CorrespondenceConfig()
    xyz = np.asarray(pair.xyz, dtype=np.float32)
    if not np.isfinite(xyz).all():
        raise DatasetError('store_correspondences: the pair has non-finite points')
    trajectory = None
    if config.motion_compensation and pair.ego_poses is not None and len(pair.ego_poses):
        from cmkd_ros.motion import PoseTrajectory
        trajectory = PoseTrajectory(np.asarray(pair.ego_stamps_ns, dtype=np.int64),
                                    pair.ego_poses)
    corr = compute_correspondences(
        xyz, pair.calibration, point_time_ns=(int(pair.lidar_stamp_ns) if pair.point_time_ns
                                              is None else pair.point_time_ns),
        camera_stamp_ns=np.asarray(pair.camera_stamp_ns, dtype=np.int64), trajectory=trajectory,
        ring=pair.ring, config=config)
    pair.correspondences = {'point': corr.point, 'camera': corr.camera, 'uv': corr.uv,
                            'depth': corr.depth}
    pair.correspondence_settings = correspondence_settings_hash(config)
    return pair


def stored_correspondences(pair, name: str = '') -> Correspondences | None:
    """The correspondences stored with ``pair`` (every camera), or None when it has none, no
    settings hash, or arrays that do not fit the pair (warned; they are then computed)."""
    corr = pair.correspondences
    if corr is None or not pair.correspondence_settings:
        return None
    point, camera = np.asarray(corr['point']), np.asarray(corr['camera'])
    uv, depth = np.asarray(corr['uv'], dtype=np.float32), np.asarray(corr['depth'])
    m, n, c = len(point), len(pair.xyz), len(pair.camera_names)
    if camera.shape != (m,) or uv.shape != (m, 2) or depth.shape != (m,) or m and (
            point.min() < 0 or point.max() >= n or camera.min() < 0 or camera.max() >= c):
        warnings.warn(f'{name}: stored correspondences do not fit the pair ({n} points, {c} '
                      'cameras); computing them', stacklevel=2)
        return None
    return Correspondences(point=point.astype(np.int64), camera=camera.astype(np.int64), uv=uv,
                           depth=depth, num_points=n, camera_names=tuple(pair.camera_names))


class PairDataset(ScanDataset):
    """Samples of a pair dataset folder (``cmkd_ros.pairs``); ``refresh()`` picks up new pairs.

    ``cameras``: names to use (default: every camera of each pair). ``label_images``: decode
    the per-pixel ground truth when present. Other keywords: :class:`ScanDataset`.
    """

    def __init__(self, root: str, cameras: Sequence[str] | None = None,
                 label_images: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.root = root
        self.reader = PairReader(root)
        self.cameras = tuple(cameras) if cameras else None
        self.label_images = label_images

    def refresh(self) -> int:
        """Read pairs indexed since the last call (a writer may still be adding); returns how
        many were added."""
        return self.reader.refresh()

    def __len__(self) -> int:
        return len(self.reader)

    def split_info(self) -> dict:
        """What this dataset reads: the pair folder."""
        return {'format': 'pairs', 'root': self.root, 'scans': len(self)}

    def labeled_fraction(self, max_pairs: int = 200) -> float:
        """Fraction of the pairs carrying a label image for at least one used camera,
        estimated from up to ``max_pairs`` evenly spaced pairs (only their key lists are read)."""
        if not len(self):
            return 0.0
        picks = np.unique(np.linspace(0, len(self) - 1, min(max_pairs, len(self))).astype(int))
        labeled = 0
        for i in picks:
            cameras, with_labels = self.reader.label_image_cameras(int(i))
            labeled += any(c in with_labels for c in (self.cameras or cameras))
        return labeled / len(picks)

    def get_frame(self, i: int) -> Frame:
        entry = self.reader.entries[i]
        return frame_from_pair(self.reader[i], self.cameras, f'{self.root}/{entry["file"]}',
                               self.label_images)


class NuScenesDataset(ScanDataset):
    """nuScenes lidarseg keyframes with the six cameras (:mod:`offline_training.readers.nuscenes`).

    ``dataroot``, ``version`` (empty: the one version folder found in ``dataroot``), ``scenes``
    (names, default all) or ``split`` (a split spec, empty = the official ``part`` split, see
    :func:`~offline_training.readers.nuscenes_splits.resolve_scenes`), ``cameras`` (default all
    six), ``tables`` (parsed tables to share, or a devkit ``NuScenes``), ``require_labels``
    (only sweeps with lidarseg labels); other keywords: :class:`ScanDataset`.
    """

    def __init__(self, dataroot: str, version: str = '',
                 scenes: Sequence[str] | None = None, cameras: Sequence[str] | None = None,
                 tables=None, require_labels: bool = False,
                 split: Sequence[str] | str | None = None, part: str = 'train', **kwargs):
        from offline_training.readers.nuscenes import CAMERAS, NuScenesLidarSegReader
        super().__init__(**kwargs)
        self.reader = NuScenesLidarSegReader(dataroot, version, scenes, cameras or CAMERAS,
                                             tables=tables, require_labels=require_labels,
                                             split=split, part=part)

    def __len__(self) -> int:
        return len(self.reader)

    def get_frame(self, i: int) -> Frame:
        return self.reader[i]

    def split_info(self) -> dict:
        """What this dataset reads: format, version, split name and scene names."""
        return {'format': 'nuscenes', 'version': self.reader.version,
                'split': self.reader.split_name, 'scenes': list(self.reader.scenes),
                'scans': len(self)}


class SemanticKITTIDataset(ScanDataset):
    """SemanticKITTI scans with the KITTI odometry color cameras image_2 and image_3 where
    present (:mod:`.readers.semantickitti`).

    ``sequences``: a split name (train/val/test), sequence names like ``['08']``, or empty for
    the official ``part`` split; ``cameras``: default both; other keywords: :class:`ScanDataset`.
    """

    def __init__(self, root: str, sequences: Sequence[str] | str | None = 'train',
                 cameras: Sequence[str] | None = None, part: str = 'train', **kwargs):
        from offline_training.readers.semantickitti import CAMERAS, SemanticKITTIReader
        super().__init__(**kwargs)
        self.reader = SemanticKITTIReader(root, sequences, cameras=cameras or CAMERAS,
                                          part=part)

    def __len__(self) -> int:
        return len(self.reader)

    def get_frame(self, i: int) -> Frame:
        return self.reader[i]

    def split_info(self) -> dict:
        """What this dataset reads: format, split name and sequences."""
        return {'format': 'semantickitti', 'split': self.reader.split_name,
                'sequences': list(self.reader.sequences), 'scans': len(self)}


FORMATS = POINT_DATA_FORMATS


@functools.lru_cache(maxsize=1)
def _tables(root: str, version: str, stamp: float):
    from offline_training.readers.nuscenes import NuScenesTables
    return NuScenesTables(root, version)


def shared_nuscenes_tables(root: str, version: str):
    """The parsed tables of ``root/version``, parsed once per process for the training and the
    validation part (v1.0-trainval's tables take a while to parse); re-read when they change."""
    import os
    path = os.path.join(root, version, 'sample.json')
    stamp = os.path.getmtime(path) if os.path.exists(path) else 0.0
    return _tables(os.path.abspath(root), version, stamp)


def build_dataset(data, part: str, *, feature_kind: str = 'height', require_labels: bool = False,
                  tables=None, label_images: bool = False) -> ScanDataset:
    """The ``part`` ('train' or 'val') data set that ``data`` (``TrainConfig.data``) names.

    ``data.train`` / ``data.val`` is the folder (pair dataset, nuScenes data root or
    SemanticKITTI root, as ``data.format`` says); for the real data sets ``data.train_split`` /
    ``data.val_split`` pick the scenes or sequences (empty: the official split of that part).
    The training part gets the configured correspondence, image and augmentation settings; the
    validation part the defaults (occlusion test and motion compensation on, no augmentation),
    so every trained variant is scored on the same points. ``feature_kind`` must be the
    student's ``point_features``; ``require_labels``: only scans with 3D labels (nuScenes);
    ``tables``: parsed nuScenes tables to share between parts; ``label_images``: decode the
    pairs' label images too (batches then carry ``label_images``).
    """
    if part not in ('train', 'val'):
        raise DatasetError(f"part must be 'train' or 'val', got {part!r}")
    root = data.train if part == 'train' else data.val
    if not root:
        raise DatasetError(f'data.{part}: a {data.format} folder is required'
                           if part == 'train' else 'data.val: empty (nothing to evaluate)')
    if part == 'train':
        common = {'occlusion': data.occlusion, 'motion_compensation': data.motion_compensation,
                  'augment': (default_point_augment(data.augment_scale_xy)
                              if data.augment else False),
                  'image_scale': data.image_scale}
    else:
        common = {}
    common['feature_kind'] = feature_kind
    spec = data.train_split if part == 'train' else data.val_split
    if data.format == 'pairs':
        if spec or data.version:
            raise DatasetError(f'data.{part}_split / data.version: only for the nuscenes and '
                               'semantickitti formats (a pair folder is one split)')
        return PairDataset(root, cameras=data.cameras or None, label_images=label_images,
                           **common)
    if data.format == 'nuscenes':
        if tables is None:
            from offline_training.readers.nuscenes import find_version
            tables = shared_nuscenes_tables(root, find_version(root, data.version))
        return NuScenesDataset(root, data.version, cameras=data.cameras or None, tables=tables,
                               require_labels=require_labels, split=spec, part=part, **common)
    if data.format == 'semantickitti':
        if data.version:
            raise DatasetError('data.version: only for the nuscenes format')
        return SemanticKITTIDataset(root, spec, cameras=data.cameras or None, part=part,
                                    **common)
    raise DatasetError(f'data.format: unknown {data.format!r}; known: {list(FORMATS)}')


# ---------------------------------------------------------------------------------------------
# Batching


class SparseCollate:
    """Batch samples for the student: voxelize each sweep, concatenate with offsets.

    Output (B samples, V voxels, sum N points, sum C images):

    - ``coords`` (V, 4) int32 ``[batch, x, y, z]`` voxel indices, ``vfeats`` (V, F) mean features
    - ``inverse`` (sum N,) int64 voxel row of every point, ``point_batch`` (sum N,) int64
    - ``xyz`` (sum N, 3), ``labels`` (sum N,), ``visible_any`` (sum N,)
    - ``images`` (sum C, 3, H, W) uint8 (padded bottom/right to the largest image),
      ``label_images`` (sum C, H, W) int64 (padded with 255) when any sample has them (255
      for the others)
    - ``corr_point`` (M,) into the concatenated points, ``corr_image`` (M,) into the
      concatenated images, ``corr_uv`` (M, 2) float32
    - ``num_points``, ``num_cameras`` (B,) int64 and ``names`` (list of str)
    """

    def __init__(self, voxel_size: float):
        if not voxel_size > 0:
            raise DatasetError(f'voxel_size must be positive, got {voxel_size}')
        self.voxel_size = float(voxel_size)

    def __call__(self, samples: Sequence[dict]) -> dict:
        from cmkd_ros.models.voxelize import voxelize
        if not samples:
            raise DatasetError('cannot collate an empty batch')
        coords, vfeats, inverse, point_batch = [], [], [], []
        corr_point, corr_image, corr_uv = [], [], []
        voxel_offset = point_offset = image_offset = 0
        for b, sample in enumerate(samples):
            c, f, inv = voxelize(sample['xyz'], sample['feats'], self.voxel_size)
            n = sample['xyz'].shape[0]
            coords.append(torch.cat([torch.full((c.shape[0], 1), b, dtype=torch.int32), c], 1))
            vfeats.append(f)
            inverse.append(inv + voxel_offset)
            point_batch.append(torch.full((n,), b, dtype=torch.int64))
            corr_point.append(sample['corr_point'] + point_offset)
            corr_image.append(sample['corr_camera'] + image_offset)
            corr_uv.append(sample['corr_uv'])
            voxel_offset += c.shape[0]
            point_offset += n
            image_offset += sample['images'].shape[0]
        images = [s['images'] for s in samples]
        batch = {
            'coords': torch.cat(coords), 'vfeats': torch.cat(vfeats),
            'inverse': torch.cat(inverse), 'point_batch': torch.cat(point_batch),
            'xyz': torch.cat([s['xyz'] for s in samples]),
            'labels': torch.cat([s['labels'] for s in samples]),
            'visible_any': torch.cat([s['visible_any'] for s in samples]),
            'images': (torch.cat(images) if len({im.shape[-2:] for im in images}) == 1
                       else _pad_stack([im for group in images for im in group], 0)),
            'corr_point': torch.cat(corr_point), 'corr_image': torch.cat(corr_image),
            'corr_uv': torch.cat(corr_uv),
            'num_points': torch.tensor([s['xyz'].shape[0] for s in samples]),
            'num_cameras': torch.tensor([s['images'].shape[0] for s in samples]),
            'names': [s.get('name', '') for s in samples],
        }
        if any('label_images' in s for s in samples):  # a scan without them: all unlabeled
            labs = [s['label_images'] if 'label_images' in s else
                    torch.full((s['images'].shape[0], *s['images'].shape[-2:]), IGNORE,
                               dtype=torch.int64) for s in samples]
            batch['label_images'] = (torch.cat(labs) if len({lab.shape[-2:] for lab in labs}) == 1
                                     else _pad_stack([x for g in labs for x in g], IGNORE))
        return batch


def correspondence_pixel_labels(batch: Mapping[str, Any], num_classes: int) -> torch.Tensor:
    """``(M,) int64``: the label image's class at each correspondence's pixel (nearest pixel;
    255 where unlabeled or outside ``num_classes``), for a collated batch that carries
    ``label_images``."""
    label_images = batch['label_images']
    height, width = label_images.shape[-2:]
    uv = batch['corr_uv'].round().long()
    u, v = uv[:, 0].clamp(0, width - 1), uv[:, 1].clamp(0, height - 1)
    labels = label_images[batch['corr_image'], v, u]
    return torch.where(labels < num_classes, labels, torch.full_like(labels, IGNORE))

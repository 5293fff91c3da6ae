"""SemanticKITTI reader with the KITTI odometry color cameras (image_2 left, image_3 right).

Layout (as published; the color images come from the KITTI odometry "color" download)::

    ROOT/sequences/XX/velodyne/NNNNNN.bin   float32 x, y, z, reflectance (velodyne frame)
    ROOT/sequences/XX/labels/NNNNNN.label   uint32: semantic id (low 16 bits), instance (high)
    ROOT/sequences/XX/image_2/NNNNNN.png    left color image (rectified)
    ROOT/sequences/XX/image_3/NNNNNN.png    right color image (rectified)
    ROOT/sequences/XX/calib.txt             lines "P0: ..." .. "P3: ..." (3x4), "Tr: ..." (3x4)
    ROOT/sequences/XX/poses.txt             (not needed: camera and LiDAR are triggered together)

``Tr`` maps velodyne points into the rectified camera 0 frame and ``Pk = Kk [I | Kk^-1 pk]``
projects from that frame into image k, so the rig calibration of camera ``image_k`` is
``K = Pk[:, :3]`` and ``T_cam_lidar = [I | K^-1 Pk[:, 3]] @ Tr`` (k = 2, 3). Raw semantic ids
are mapped to the 19 benchmark classes (:data:`~cmkd_ros.classes.SEMANTICKITTI19`) by the
benchmark's learning map; unlabeled/outlier/other-structure/other-object become 255. The cameras
and the LiDAR are triggered together in KITTI, so no ego motion is passed.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from cmkd_ros.calibration import CameraCalibration, RigCalibration
from offline_training.readers.base import Frame, ReaderError

IGNORE = 255
# SemanticKITTI learning map (raw id -> 1..19, 0 = unlabeled) as published with the benchmark.
LEARNING_MAP = {
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8, 40: 9,
    44: 10, 48: 11, 49: 12, 50: 13, 51: 14, 52: 0, 60: 9, 70: 15, 71: 16, 72: 17, 80: 18,
    81: 19, 99: 0, 252: 1, 253: 7, 254: 6, 255: 8, 256: 5, 257: 5, 258: 4, 259: 5,
}
# The benchmark's split of the 22 sequences (11..21 have no labels).
SPLITS = {'train': ('00', '01', '02', '03', '04', '05', '06', '07', '09', '10'), 'val': ('08',),
          'test': tuple(f'{i:02d}' for i in range(11, 22))}


def label_lut() -> np.ndarray:
    """(65536,) uint8: raw semantic id -> SEMANTICKITTI19 id (0..18) or 255."""
    lut = np.full(1 << 16, IGNORE, dtype=np.uint8)
    for raw, learned in LEARNING_MAP.items():
        lut[raw] = IGNORE if learned == 0 else learned - 1
    return lut


def read_calib(path: str) -> dict[str, np.ndarray]:
    """``calib.txt`` as name -> (3, 4) float64 matrix (P0..P3, Tr)."""
    if not os.path.exists(path):
        raise ReaderError(f'calibration file missing: {path}')
    out = {}
    with open(path, encoding='utf-8') as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            key, _, values = line.partition(':')
            try:
                numbers = np.array([float(v) for v in values.split()], dtype=np.float64)
            except ValueError:
                raise ReaderError(f'{path}:{lineno}: non-numeric value') from None
            if numbers.size != 12:
                raise ReaderError(f'{path}:{lineno}: {key.strip()} has {numbers.size} values, '
                                  'expected 12 (3x4)')
            out[key.strip()] = numbers.reshape(3, 4)
    for key in ('P2', 'Tr'):
        if key not in out:
            raise ReaderError(f'{path}: no {key} line')
    return out


def camera_from_calib(calib: dict[str, np.ndarray], width: int, height: int,
                      projection: str = 'P2', name: str = 'image_2') -> CameraCalibration:
    """The camera of ``projection`` (P2 for image_2) with ``T_cam_lidar`` from ``Tr``."""
    P = calib[projection]
    K = P[:, :3].copy()
    # 1. velodyne -> rectified camera 0: Tr; 2. camera 0 -> camera 2: translation K^-1 p.
    T_cam0_velo = np.vstack([calib['Tr'], [0, 0, 0, 1]])
    T_cam_cam0 = np.eye(4)
    T_cam_cam0[:3, 3] = np.linalg.solve(K, P[:, 3])
    return CameraCalibration(name=name, width=width, height=height, K=K,
                             T_cam_lidar=T_cam_cam0 @ T_cam0_velo)


CAMERAS = ('image_2', 'image_3')


def resolve_sequences(spec: Sequence[str] | str | None, part: str = 'train'
                      ) -> tuple[str, tuple[str, ...]]:
    """(split name, sequence names) of ``spec``: empty = the official ``part`` split ('train':
    00-07 and 09-10, 'val': 08), a split name (or a one-item list of one), or sequence names
    ('8' and '08' both name sequence 08; the split name is then 'custom')."""
    if isinstance(spec, str):
        spec = (spec,) if spec else ()
    spec = tuple(str(s) for s in spec or ())
    if not spec:
        return part, SPLITS[part]
    if len(spec) == 1 and spec[0] in SPLITS:
        return spec[0], SPLITS[spec[0]]
    bad = [s for s in spec if not s.isdigit()]
    if bad:
        raise ReaderError(f'unknown split or sequence {bad}; use one of {sorted(SPLITS)} or '
                          'sequence numbers like 08')
    return 'custom', tuple(f'{int(s):02d}' for s in spec)


class SemanticKITTIReader:
    """Scans of the given sequences (names like ``'08'`` or a split name) as :class:`Frame`.

    ``cameras``: the color cameras to use where their image exists (default both, image_2 and
    image_3); a scan with none of them is skipped (``require_image``, default) or fails.
    ``split_name`` and ``sequences`` say what was read.
    """

    def __init__(self, root: str, sequences: Sequence[str] | str | None = 'train',
                 require_image: bool = True, cameras: Sequence[str] = CAMERAS,
                 part: str = 'train'):
        self.split_name, sequences = resolve_sequences(sequences, part)
        self.cameras = tuple(cameras)
        unknown = sorted(set(self.cameras) - set(CAMERAS))
        if unknown or not self.cameras:
            raise ReaderError(f'unknown SemanticKITTI camera(s) {unknown or list(cameras)}; '
                              f'have {list(CAMERAS)}')
        seq_root = os.path.join(root, 'sequences')
        if not os.path.isdir(seq_root):
            raise ReaderError(f'SemanticKITTI sequences folder not found: {seq_root}')
        self.root = root
        self.items: list[tuple[str, str, tuple[str, ...]]] = []
        self.calibs: dict[str, dict] = {}
        present = [s for s in sequences if os.path.isdir(os.path.join(seq_root, s))]
        if not present:
            raise ReaderError(f'none of the sequences {list(sequences)} under {seq_root}')
        for seq in present:
            folder = os.path.join(seq_root, seq)
            self.calibs[seq] = read_calib(os.path.join(folder, 'calib.txt'))
            velodyne = os.path.join(folder, 'velodyne')
            if not os.path.isdir(velodyne):
                raise ReaderError(f'SemanticKITTI scans folder not found: {velodyne}')
            scans = sorted(f[:-4] for f in os.listdir(velodyne) if f.endswith('.bin'))
            # the cameras of this sequence: those with a folder and a projection matrix
            usable = tuple(c for c in self.cameras if os.path.isdir(os.path.join(folder, c))
                           and f'P{c[-1]}' in self.calibs[seq])
            for scan in scans:
                cams = tuple(c for c in usable
                             if os.path.exists(os.path.join(folder, c, scan + '.png')))
                if not cams and require_image:
                    continue
                self.items.append((seq, scan, cams))
        self.sequences = tuple(sorted({seq for seq, _, _ in self.items}))
        self.lut = label_lut()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Frame:
        import cv2
        seq, scan, cams = self.items[i]
        folder = os.path.join(self.root, 'sequences', seq)
        raw = np.fromfile(os.path.join(folder, 'velodyne', scan + '.bin'), dtype=np.float32)
        if raw.size % 4:
            raise ReaderError(f'{seq}/velodyne/{scan}.bin: size is not a multiple of 4 floats')
        raw = raw.reshape(-1, 4)
        labels = None
        label_path = os.path.join(folder, 'labels', scan + '.label')
        if os.path.exists(label_path):
            packed = np.fromfile(label_path, dtype=np.uint32)
            if len(packed) != len(raw):
                raise ReaderError(f'{label_path}: {len(packed)} labels for {len(raw)} points')
            labels = self.lut[packed & 0xFFFF].astype(np.int64)
        cameras, images = [], []
        for cam in cams:
            image = cv2.imread(os.path.join(folder, cam, scan + '.png'), cv2.IMREAD_COLOR)
            if image is None:
                raise ReaderError(f'{seq}/{cam}/{scan}.png: unreadable')
            images.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
            cameras.append(camera_from_calib(self.calibs[seq], image.shape[1], image.shape[0],
                                             f'P{cam[-1]}', cam))
        return Frame(name=f'semantickitti/{seq}/{scan}', xyz=np.ascontiguousarray(raw[:, :3]),
                     intensity=np.ascontiguousarray(raw[:, 3]), labels=labels,
                     rig=RigCalibration(tuple(cameras), lidar_frame='velodyne'), images=images,
                     lidar_stamp_ns=0, camera_stamp_ns=np.zeros(len(cams), dtype=np.int64))

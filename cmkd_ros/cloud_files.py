"""Point cloud files: PCD (ascii, binary, binary_compressed), KITTI and nuScenes ``.bin``.

:func:`read_cloud_file` returns a flat structured array with at least float32 ``x``, ``y``,
``z`` (LiDAR frame), plus the file's other fields (``intensity``, ``ring``, ``time``, ...) like
:func:`cmkd_ros.conversions.cloud_to_array` does for a PointCloud2:

* ``.pcd`` through the ``pypcd4`` package (all three encodings; binary_compressed is LZF);
* KITTI ``velodyne/*.bin``: float32 x, y, z, reflectance per point (-> ``intensity``);
* nuScenes ``LIDAR_TOP*.bin``: float32 x, y, z, intensity, ring index per point (-> ``ring``
  uint16).

``fmt='auto'`` picks PCD by the extension; for ``.bin`` a length that splits into 5 columns
whose last one holds small whole numbers is nuScenes, else 4 columns is KITTI.
"""
from __future__ import annotations

import os

import numpy as np

CLOUD_FORMATS = ('auto', 'pcd', 'kitti', 'nuscenes')
KITTI_DTYPE = np.dtype([('x', np.float32), ('y', np.float32), ('z', np.float32),
                        ('intensity', np.float32)])
NUSCENES_DTYPE = np.dtype([('x', np.float32), ('y', np.float32), ('z', np.float32),
                           ('intensity', np.float32), ('ring', np.uint16)])


class CloudFileError(ValueError):
    """A point cloud file cannot be read (missing, malformed, unknown layout)."""


def _looks_like_nuscenes(raw: np.ndarray) -> bool:
    if raw.size == 0 or raw.size % 5:
        return False
    ring = raw.reshape(-1, 5)[:, 4]
    return bool(np.all(np.isfinite(ring)) and np.all(ring == np.round(ring))
                and ring.min() >= 0 and ring.max() < 1024)


def _read_bin(path: str, fmt: str) -> np.ndarray:
    raw = np.fromfile(path, dtype=np.float32)
    if fmt == 'auto':
        fmt = 'nuscenes' if _looks_like_nuscenes(raw) else 'kitti'
    cols = 5 if fmt == 'nuscenes' else 4
    if raw.size % cols:
        raise CloudFileError(f'{path}: {raw.size * 4} bytes is not a whole number of {fmt} '
                             f'points ({cols} float32 each)')
    raw = raw.reshape(-1, cols)
    out = np.empty(raw.shape[0], NUSCENES_DTYPE if cols == 5 else KITTI_DTYPE)
    for i, name in enumerate(('x', 'y', 'z', 'intensity')):
        out[name] = raw[:, i]
    if cols == 5:
        out['ring'] = raw[:, 4].astype(np.uint16)
    return out


def _read_pcd(path: str) -> np.ndarray:
    try:
        from pypcd4 import PointCloud
    except ImportError:
        raise CloudFileError('reading PCD files needs the pypcd4 package (pip install '
                             'pypcd4)') from None
    try:
        data = PointCloud.from_path(path).pc_data
    except Exception as exc:          # pypcd4 raises many kinds on a malformed file
        raise CloudFileError(f'{path}: not a readable PCD file ({type(exc).__name__}: '
                             f'{exc})') from None
    names = [n for n in (data.dtype.names or ()) if n != '_']
    missing = [c for c in 'xyz' if c not in names]
    if missing:
        raise CloudFileError(f'{path}: PCD has no field(s) {missing}; fields are {names}')
    out = np.empty(data.shape[0], np.dtype([(n, data.dtype[n]) for n in names]))
    for n in names:
        out[n] = data[n]
    return out


def read_cloud_file(path: str | os.PathLike, fmt: str = 'auto') -> np.ndarray:
    """(N,) structured array of a point cloud file (see the module docstring)."""
    path = os.fspath(path)
    if fmt not in CLOUD_FORMATS:
        raise CloudFileError(f'cloud format {fmt!r} is not one of {list(CLOUD_FORMATS)}')
    if not os.path.isfile(path):
        raise CloudFileError(f'{path}: no such file')
    ext = os.path.splitext(path)[1].lower()
    if fmt == 'pcd' or (fmt == 'auto' and ext == '.pcd'):
        return _read_pcd(path)
    if fmt == 'auto' and ext != '.bin':
        raise CloudFileError(f'{path}: unknown point cloud extension {ext!r} (.pcd or .bin); '
                             'name the format')
    return _read_bin(path, fmt)

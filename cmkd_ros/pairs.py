"""Crash-safe on-disk dataset of distillation pairs (one LiDAR sweep + N camera images).

The same format is written by the synthetic exporter (``cmkd sim --format frames``) and by the
collect node, and read by offline training while a writer may still be adding to it.

Layout::

    DATASET/
      dataset.yaml          format version and free-form metadata (written once)
      index.jsonl           one JSON line per completed pair, appended after the pair is on disk
      pairs/<id>.npz        one pair, written to a temporary name, fsynced, then renamed

A pair is complete once its ``.npz`` is renamed into place; ``index.jsonl`` is appended afterwards.
A kill -9 therefore loses at most the pair being written: a torn last index line is ignored
(and cut off by the next writer) and complete pair files missing from the index are found by
:meth:`PairReader.refresh` (``scan=True``; the next writer indexes them). A failed write (full
disk) leaves nothing behind.

Keys of a pair file (all plain arrays, loaded with ``allow_pickle=False``):

    format_version        int
    lidar_stamp_ns        int64 scalar, header stamp of the sweep
    xyz                   (N, 3) float32, LiDAR frame
    intensity             (N,) float32                          [optional]
    ring                  (N,) uint16                           [optional]
    point_time_ns         (N,) int64 absolute capture time      [optional]
    labels                (N,) uint8 ground truth, 255 = ignore [optional]
    camera_names          (C,) str
    camera_stamp_ns       (C,) int64 header stamps
    image_<c>             (B,) uint8 encoded image bytes (JPEG kept as received, else PNG)
    image_format_<c>      str, 'jpeg' or 'png'
    label_image_<c>       (B,) uint8 PNG of per-pixel labels     [optional, ground truth]
    depth_image_<c>       (B,) uint8 16-bit PNG of depth in mm   [optional, ground truth]
    calibration_yaml      str, :class:`RigCalibration` YAML
    ego_stamps_ns         (P,) int64 and ego_poses (P, 4, 4) float64 T_world_lidar [optional]
    corr_point (M,) int32, corr_camera (M,) uint8, corr_uv (M, 2) float32, corr_depth (M,)
                          float32: correspondences as computed when written (read as int64)
                          [optional]
    corr_settings         str, :func:`cmkd_ros.projection.correspondence_settings_hash` of
                          the settings they were computed with [optional]

Stored correspondences save the training loaders their computation, about 40% of a sample's
CPU time (default synthetic rig, 6 cameras of 640x360 and 32 beams: 170 -> 100 ms, measured
with ``benchmarks/bench_datasets.py``), for 17 bytes each on disk (about 0.4 MB a pair there):
:class:`offline_training.datasets.ScanDataset` uses them when ``corr_settings`` equals the hash
of its own settings and every point is finite (the same arrays as computing them), and computes
them otherwise (other settings, a camera subset, no hash).
Teacher outputs are not stored: both distillation losses need the teacher's D-dimensional
features, which training computes once per image and memoises (files of an older version that
hold ``teacher_<c>`` logits are read, the logits ignored).
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import threading
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import yaml

from cmkd_ros.calibration import RigCalibration

FORMAT_VERSION = 1
IGNORE_LABEL = 255


class PairFormatError(ValueError):
    """A pair file or dataset folder is malformed."""


@dataclass
class Pair:
    """One distillation pair in memory. Images are kept encoded; decode with ``image(c)``."""

    lidar_stamp_ns: int
    xyz: np.ndarray
    camera_names: list[str]
    camera_stamp_ns: np.ndarray
    images: dict[str, bytes]
    image_formats: dict[str, str]
    calibration: RigCalibration
    intensity: np.ndarray | None = None
    ring: np.ndarray | None = None
    point_time_ns: np.ndarray | None = None
    labels: np.ndarray | None = None
    label_images: dict[str, bytes] = field(default_factory=dict)
    depth_images: dict[str, bytes] = field(default_factory=dict)
    ego_stamps_ns: np.ndarray | None = None
    ego_poses: np.ndarray | None = None
    correspondences: dict[str, np.ndarray] | None = None
    correspondence_settings: str | None = None

    def image(self, name: str) -> np.ndarray:
        """Decoded (H, W, 3) uint8 RGB image of camera ``name``."""
        return decode_png_or_jpeg(self.images[name], color=True)

    def label_image(self, name: str) -> np.ndarray:
        """(H, W) uint8 per-pixel labels of camera ``name`` (ground truth)."""
        return decode_png_or_jpeg(self.label_images[name], color=False)

    def depth_image(self, name: str) -> np.ndarray:
        """(H, W) float32 depth in metres of camera ``name``; 0 where nothing was hit."""
        return decode_png_or_jpeg(self.depth_images[name], color=False).astype(np.float32) / 1000

    def to_arrays(self) -> dict[str, np.ndarray]:
        n = len(self.xyz)
        arrays: dict[str, np.ndarray] = {
            'format_version': np.array(FORMAT_VERSION),
            'lidar_stamp_ns': np.array(int(self.lidar_stamp_ns), dtype=np.int64),
            'xyz': np.ascontiguousarray(self.xyz, dtype=np.float32).reshape(n, 3),
            'camera_names': np.array(self.camera_names, dtype=str),
            'camera_stamp_ns': np.asarray(self.camera_stamp_ns, dtype=np.int64),
            'calibration_yaml': np.array(self.calibration.to_yaml()),
        }
        for key, dtype in (('intensity', np.float32), ('ring', np.uint16),
                           ('point_time_ns', np.int64), ('labels', np.uint8)):
            value = getattr(self, key)
            if value is not None:
                value = np.asarray(value, dtype=dtype).reshape(-1)
                if len(value) != n:
                    raise PairFormatError(f'{key} has {len(value)} entries for {n} points')
                arrays[key] = value
        for name in self.camera_names:
            if name not in self.images:
                raise PairFormatError(f'no image for camera {name!r}')
            arrays[f'image_{name}'] = np.frombuffer(self.images[name], dtype=np.uint8)
            arrays[f'image_format_{name}'] = np.array(self.image_formats.get(name, 'png'))
            if name in self.label_images:
                arrays[f'label_image_{name}'] = np.frombuffer(self.label_images[name], np.uint8)
            if name in self.depth_images:
                arrays[f'depth_image_{name}'] = np.frombuffer(self.depth_images[name], np.uint8)
        if self.ego_poses is not None:
            arrays['ego_stamps_ns'] = np.asarray(self.ego_stamps_ns, dtype=np.int64)
            arrays['ego_poses'] = np.asarray(self.ego_poses, dtype=np.float64).reshape(-1, 4, 4)
        if self.correspondences is not None:
            arrays.update(_correspondence_arrays(self.correspondences, n,
                                                 len(self.camera_names)))
            if self.correspondence_settings:
                arrays['corr_settings'] = np.array(str(self.correspondence_settings))
        return arrays

    @classmethod
    def from_arrays(cls, arrays, source: str = '<memory>') -> 'Pair':
        try:
            version = int(arrays['format_version'])
            if version > FORMAT_VERSION:
                raise PairFormatError(f'{source}: format version {version} is newer than '
                                      f'this reader ({FORMAT_VERSION})')
            names = [str(n) for n in arrays['camera_names']]
            keys = set(arrays.keys())

            def opt(key):
                return arrays[key] if key in keys else None

            corr = None
            if 'corr_point' in keys:
                corr = {k: arrays[f'corr_{k}'] for k in ('point', 'camera', 'uv', 'depth')}
                corr['point'] = corr['point'].astype(np.int64)
                corr['camera'] = corr['camera'].astype(np.int64)
            return cls(
                lidar_stamp_ns=int(arrays['lidar_stamp_ns']),
                xyz=arrays['xyz'], camera_names=names,
                camera_stamp_ns=arrays['camera_stamp_ns'],
                images={n: arrays[f'image_{n}'].tobytes() for n in names},
                image_formats={n: str(arrays[f'image_format_{n}']) for n in names},
                calibration=RigCalibration.from_yaml(str(arrays['calibration_yaml'])),
                intensity=opt('intensity'), ring=opt('ring'),
                point_time_ns=opt('point_time_ns'), labels=opt('labels'),
                label_images={n: arrays[f'label_image_{n}'].tobytes() for n in names
                              if f'label_image_{n}' in keys},
                depth_images={n: arrays[f'depth_image_{n}'].tobytes() for n in names
                              if f'depth_image_{n}' in keys},
                ego_stamps_ns=opt('ego_stamps_ns'), ego_poses=opt('ego_poses'),
                correspondences=corr,
                correspondence_settings=str(arrays['corr_settings'])
                if 'corr_settings' in keys else None)
        except KeyError as exc:
            raise PairFormatError(f'{source}: missing key {exc}') from None


def _correspondence_arrays(corr: dict, num_points: int, num_cameras: int) -> dict:
    """The ``corr_*`` arrays of correspondences, checked against the pair and made compact."""
    point = np.asarray(corr['point']).reshape(-1)
    camera = np.asarray(corr['camera']).reshape(-1)
    uv = np.asarray(corr['uv'], dtype=np.float32)
    depth = np.asarray(corr['depth'], dtype=np.float32).reshape(-1)
    m = len(point)
    if camera.shape != (m,) or uv.shape != (m, 2) or depth.shape != (m,):
        raise PairFormatError(f'correspondences: point {point.shape}, camera {camera.shape}, '
                              f'uv {uv.shape} and depth {depth.shape} do not fit (M,) / (M, 2)')
    if num_cameras > 256:
        raise PairFormatError(f'{num_cameras} cameras: stored correspondences allow 256')
    if m and (point.min() < 0 or point.max() >= num_points or camera.min() < 0 or
              camera.max() >= num_cameras):
        raise PairFormatError(f'correspondences: indices outside {num_points} points and '
                              f'{num_cameras} cameras')
    return {'corr_point': point.astype(np.int32), 'corr_camera': camera.astype(np.uint8),
            'corr_uv': uv, 'corr_depth': depth}


def decode_png_or_jpeg(data: bytes, color: bool) -> np.ndarray:
    """Decode PNG/JPEG bytes: RGB uint8 when ``color``, else the stored depth (8 or 16 bit)."""
    import cv2
    flag = cv2.IMREAD_COLOR if color else cv2.IMREAD_UNCHANGED
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    if img is None:
        raise PairFormatError('image bytes could not be decoded')
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if color else img


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of an (H, W) uint8/uint16 or (H, W, 3) RGB uint8 image."""
    import cv2
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode('.png', image)
    if not ok:
        raise PairFormatError('PNG encoding failed')
    return buf.tobytes()


def encode_depth_png(depth_m: np.ndarray) -> bytes:
    """16-bit PNG of depth in millimetres (clipped to 65.535 m; 0 = no return)."""
    depth_mm = np.clip(np.nan_to_num(depth_m, nan=0.0) * 1000.0 + 0.5, 0, 65535)
    return encode_png(depth_mm.astype(np.uint16))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class PairWriteError(OSError):
    """A pair could not be written (disk full, file too large, I/O error); nothing was left
    behind: no temporary file, no pair file, no index line. ``errno`` is the cause's."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


class PairIndexWarning(UserWarning):
    """``index.jsonl`` has a damaged line (a writer killed mid-line, then appended to)."""


class PairWriter:
    """Appends pairs to a dataset folder; safe against kill -9 at any instant.

    ``max_bytes`` is a disk quota for the pair files (``write`` returns None once it would be
    exceeded); ``min_free_bytes`` is the free space a write leaves on the disk (below it,
    :class:`PairWriteError` before anything is written). Opening repairs a torn last index line
    (a writer killed mid-line; its pair is then found by scanning) and indexes complete pair
    files missing from the index. Thread-safe: one writer per folder.
    """

    def __init__(self, root: str, metadata: dict | None = None, max_bytes: int | None = None,
                 fsync: bool = True, min_free_bytes: int = 0):
        self.root = root
        self.max_bytes = max_bytes
        self.min_free_bytes = int(min_free_bytes)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._index = os.path.join(root, 'index.jsonl')
        os.makedirs(os.path.join(root, 'pairs'), exist_ok=True)
        meta_path = os.path.join(root, 'dataset.yaml')
        if not os.path.exists(meta_path):
            tmp = meta_path + '.tmp'
            with open(tmp, 'w', encoding='utf-8') as fh:
                yaml.safe_dump({'format_version': FORMAT_VERSION, **(metadata or {})}, fh)
            os.replace(tmp, meta_path)
        self.repaired_bytes = self._cut_torn_tail()
        reader = PairReader(root, scan=True)
        self.bytes_used = sum(e.get('bytes', 0) for e in reader.entries)
        self._next_id = 1 + max((int(e['id']) for e in reader.entries), default=-1)
        # Complete pairs that a killed writer left out of the index are indexed now.
        if reader.recovered:
            with open(self._index, 'a', encoding='utf-8') as fh:
                for entry in reader.recovered:
                    fh.write(json.dumps(entry) + '\n')
        self.count = len(reader.entries)

    def _cut_torn_tail(self) -> int:
        """Truncate ``index.jsonl`` after its last newline; returns the bytes cut off."""
        try:
            with open(self._index, 'rb+') as fh:
                data = fh.read()
                keep = data.rfind(b'\n') + 1
                if keep < len(data):
                    fh.truncate(keep)
                return len(data) - keep
        except FileNotFoundError:
            return 0

    def _check_free_space(self, size: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free < size + self.min_free_bytes:
            raise PairWriteError(f'no space left on the disk of {self.root}: {free / 1e6:.1f} '
                                 f'MB free, a pair needs {size / 1e6:.1f} MB and '
                                 f'{self.min_free_bytes / 1e6:.1f} MB are kept free',
                                 errno.ENOSPC)

    def write(self, pair: Pair) -> str | None:
        """Write ``pair`` atomically; returns its path, or None if the quota is reached.

        Raises :class:`PairWriteError` when the disk is (nearly) full or a write fails; the
        dataset is then as before the call, and a later write may succeed.
        """
        buf = io.BytesIO()
        np.savez(buf, **pair.to_arrays())
        data = buf.getvalue()
        with self._lock:
            if self.max_bytes is not None and self.bytes_used + len(data) > self.max_bytes:
                return None
            self._check_free_space(len(data))
            pair_id = self._next_id
            rel = os.path.join('pairs', f'{pair_id:09d}.npz')
            final = os.path.join(self.root, rel)
            entry = {'id': pair_id, 'file': rel, 'lidar_stamp_ns': int(pair.lidar_stamp_ns),
                     'cameras': list(pair.camera_names), 'points': int(len(pair.xyz)),
                     'bytes': len(data)}
            try:
                self._write_file(final, data)
                self._append_index(json.dumps(entry) + '\n')
            except OSError as exc:
                if os.path.exists(final):
                    os.remove(final)
                raise PairWriteError(f'cannot write {final}: {exc.strerror or exc}',
                                     exc.errno) from exc
            self._next_id += 1
            self.bytes_used += len(data)
            self.count += 1
            return final

    def _write_file(self, final: str, data: bytes) -> None:
        """``data`` to ``final`` through a temporary file (removed when writing fails)."""
        tmp = os.path.join(os.path.dirname(final), f'.{os.path.basename(final)}.tmp')
        try:
            with open(tmp, 'wb') as fh:
                fh.write(data)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if self.fsync:
            _fsync_dir(os.path.dirname(final))

    def _append_index(self, line: str) -> None:
        """Append one index line; a failed append is cut off again (no torn line stays)."""
        with open(self._index, 'ab') as fh:
            start = fh.tell()
            try:
                fh.write(line.encode('utf-8'))
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            except OSError:
                fh.truncate(start)
                raise


class PairReader:
    """Reads a pair dataset, including one that a writer is still appending to.

    ``refresh()`` picks up pairs indexed since the last call; a torn last line (a writer
    killed mid-line, or still writing) waits. With ``scan=True`` complete pair files missing
    from the index are added too (listed in ``recovered``). A damaged line inside the index
    (a torn line that a writer then appended to) is tolerated: it is reported (line numbers in
    ``damaged_lines``, a :class:`PairIndexWarning`) and the pair files are scanned, so no
    complete pair is hidden.
    """

    def __init__(self, root: str, scan: bool = False):
        if not os.path.isdir(root):
            raise PairFormatError(f'dataset folder not found: {root}')
        self.root = root
        self.entries: list[dict] = []
        self.recovered: list[dict] = []
        self.damaged_lines: list[int] = []
        self._offset = 0
        self._lines = 0
        self.refresh(scan=scan)

    def refresh(self, scan: bool = False) -> int:
        """Read newly indexed pairs; returns how many were added."""
        added = 0
        index = os.path.join(self.root, 'index.jsonl')
        known = {e['file'] for e in self.entries}
        damaged = []
        if os.path.exists(index):
            with open(index, 'rb') as fh:
                fh.seek(self._offset)
                chunk = fh.read()
            end = chunk.rfind(b'\n') + 1          # only whole lines; a torn tail waits
            for line in chunk[:end].splitlines():
                self._lines += 1
                try:
                    entry = json.loads(line)
                except ValueError:
                    entry = None
                if not isinstance(entry, dict) or 'file' not in entry:
                    if line.strip():
                        damaged.append(self._lines)
                    continue
                if entry['file'] in known:
                    continue
                if os.path.exists(os.path.join(self.root, entry['file'])):
                    self.entries.append(entry)
                    known.add(entry['file'])
                    added += 1
            self._offset += end
        if damaged:
            self.damaged_lines += damaged
            warnings.warn(f'{index}: damaged line(s) {damaged} (a writer killed mid-line); '
                          f'the pair files were scanned instead', PairIndexWarning,
                          stacklevel=2)
        if scan or damaged:
            added += self._scan(known)
        return added

    def _scan(self, known: set) -> int:
        """Add complete pair files that are not in ``known`` (the index); returns how many."""
        added = 0
        pair_dir = os.path.join(self.root, 'pairs')
        for name in sorted(os.listdir(pair_dir)) if os.path.isdir(pair_dir) else []:
            rel = os.path.join('pairs', name)
            if not name.endswith('.npz') or name.startswith('.') or rel in known:
                continue
            try:
                pair = self._load(rel)
            except PairFormatError:
                continue
            entry = {'id': int(name.split('.')[0]), 'file': rel,
                     'lidar_stamp_ns': pair.lidar_stamp_ns, 'cameras': pair.camera_names,
                     'points': int(len(pair.xyz)),
                     'bytes': os.path.getsize(os.path.join(self.root, rel))}
            self.entries.append(entry)
            self.recovered.append(entry)
            known.add(rel)
            added += 1
        self.entries.sort(key=lambda e: int(e['id']))
        return added

    def __len__(self) -> int:
        return len(self.entries)

    def _read(self, rel: str, read: Callable[[Any, str], Any]) -> Any:
        """``read(arrays, path)`` on the opened pair file ``rel``; PairFormatError when the
        file cannot be read."""
        path = os.path.join(self.root, rel)
        try:
            with np.load(path, allow_pickle=False) as arrays:
                return read(arrays, path)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            if isinstance(exc, PairFormatError):
                raise
            raise PairFormatError(f'{path}: unreadable pair file ({exc})') from None

    def _load(self, rel: str) -> Pair:
        return self._read(rel, lambda arrays, path: Pair.from_arrays(
            {k: arrays[k] for k in arrays.files}, source=path))

    def __getitem__(self, i: int) -> Pair:
        return self._load(self.entries[i]['file'])

    def label_image_cameras(self, i: int) -> tuple[list[str], list[str]]:
        """``(cameras, cameras with a label image)`` of pair ``i`` (names sorted), from its key list
        alone (no array is decoded)."""
        keys = set(self._read(self.entries[i]['file'], lambda arrays, path: arrays.files))
        cameras = [k[len('image_format_'):] for k in sorted(keys) if k.startswith('image_format_')]
        return cameras, [c for c in cameras if f'label_image_{c}' in keys]

    def __iter__(self) -> Iterator[Pair]:
        for i in range(len(self)):
            yield self[i]

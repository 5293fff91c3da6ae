"""``cmkd overlay``: projected LiDAR points drawn over each camera image (PNG).

The first sanity check of a camera-LiDAR rig: points colored by depth (or by label, or
intensity) must sit on the surfaces they hit. Inputs:

* a pair dataset folder (:mod:`cmkd_ros.pairs`; ego poses and point times give motion
  compensation, ground-truth labels allow ``--color label``),
* the shared nuScenes sample folder (``calibration.json`` with six cameras, ``LIDAR_TOP.bin``),
* the shared KITTI sample folder (``calibration.json`` with ``P2``, ``velodyne.bin``).

Points go through :func:`cmkd_ros.projection.compute_correspondences`, the same function the
collect node and the training datasets use.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from cmkd_ros.calibration import (RigCalibration, load_kitti_calibration,
                                  load_nuscenes_calibration, nuscenes_stamps_ns)
from cmkd_ros.config import ConfigError, build, parse_overrides, to_dict
from cmkd_ros.projection import CorrespondenceConfig, compute_correspondences

COLOR_MODES = ('depth', 'label', 'intensity')


class OverlayError(ValueError):
    """The input folder or the options cannot produce an overlay."""


@dataclass
class OverlayFrame:
    """One sweep and its images, ready to project.

    ``xyz`` (N, 3) float32 LiDAR frame; ``images`` one RGB (H, W, 3) uint8 per rig camera;
    ``camera_stamp_ns`` (C,), ``point_time_ns`` (N,) and ``trajectory`` enable motion
    compensation when all three are present.
    """

    name: str
    xyz: np.ndarray
    images: list
    rig: RigCalibration
    labels: np.ndarray | None = None
    intensity: np.ndarray | None = None
    camera_stamp_ns: np.ndarray | None = None
    point_time_ns: np.ndarray | None = None
    trajectory: Any = None


def _read_rgb(path: str) -> np.ndarray:
    import cv2
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise OverlayError(f'cannot read image {path}')
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def load_sample_folder(folder: str) -> OverlayFrame:
    """The shared nuScenes or KITTI sample folder as one frame (kind found from its files)."""
    calib_path = os.path.join(folder, 'calibration.json')
    try:
        with open(calib_path, encoding='utf-8') as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        raise OverlayError(f'{folder}: no calibration.json') from None
    if 'cameras' in raw:                                   # nuScenes sample
        rig = load_nuscenes_calibration(calib_path)
        lidar = raw['lidar']
        points = np.fromfile(os.path.join(folder, lidar.get('file', 'LIDAR_TOP.bin')),
                             np.float32).reshape(-1, 5)
        images = [_read_rgb(os.path.join(folder, raw['cameras'][n]['file']))
                  for n in rig.names]
        _, cam_stamps = nuscenes_stamps_ns(calib_path)
        return OverlayFrame('nuscenes', points[:, :3].copy(), images, rig,
                            intensity=points[:, 3].copy(),
                            camera_stamp_ns=np.array([cam_stamps[n] for n in rig.names]))
    if 'camera' in raw and 'P2' in raw['camera']:          # KITTI object frame
        rig = load_kitti_calibration(calib_path)
        points = np.fromfile(os.path.join(folder, raw['lidar'].get('file', 'velodyne.bin')),
                             np.float32).reshape(-1, 4)
        image = _read_rgb(os.path.join(folder, raw['camera'].get('file', 'image_2.png')))
        rig.cameras[0].check_image_size(image.shape[1], image.shape[0])
        return OverlayFrame('kitti', points[:, :3].copy(), [image], rig,
                            intensity=points[:, 3].copy())
    raise OverlayError(f'{calib_path}: neither the nuScenes nor the KITTI sample layout')


def load_pair_frames(folder: str, indices: list[int] | None = None,
                     max_frames: int = 1) -> list[OverlayFrame]:
    """Frames of a pair dataset (first ``max_frames``, or the given ``indices``)."""
    from cmkd_ros.motion import PoseTrajectory
    from cmkd_ros.pairs import PairReader
    reader = PairReader(folder, scan=True)
    if len(reader) == 0:
        raise OverlayError(f'{folder}: the pair dataset has no pairs')
    chosen = indices if indices else list(range(min(max_frames, len(reader))))
    frames = []
    for i in chosen:
        if not 0 <= i < len(reader):
            raise OverlayError(f'pair index {i} out of range (dataset has {len(reader)})')
        pair = reader[i]
        rig = pair.calibration.subset(pair.camera_names)
        traj = None
        if pair.ego_poses is not None and pair.ego_stamps_ns is not None and \
                len(pair.ego_stamps_ns) > 0:
            traj = PoseTrajectory(np.asarray(pair.ego_stamps_ns, np.int64), pair.ego_poses)
        frames.append(OverlayFrame(
            f'pair{i:06d}', np.asarray(pair.xyz, np.float32),
            [pair.image(n) for n in pair.camera_names], rig, labels=pair.labels,
            intensity=pair.intensity, camera_stamp_ns=np.asarray(pair.camera_stamp_ns),
            point_time_ns=pair.point_time_ns, trajectory=traj))
    return frames


def point_colors(values: np.ndarray, mode: str, *, max_depth: float = 60.0,
                 class_map: Any = None) -> np.ndarray:
    """(M, 3) uint8 RGB colors: depth and intensity through the turbo colormap, labels through
    the class map (near = red, far = blue for depth)."""
    import cv2
    if mode == 'label':
        return class_map.colorize(values.astype(np.int64))
    if mode == 'depth':
        scaled = 1.0 - np.clip(values / max_depth, 0.0, 1.0)
    else:
        hi = float(np.percentile(values, 99)) if values.size else 1.0
        scaled = np.clip(values / max(hi, 1e-6), 0.0, 1.0)
    lut = (scaled * 255).astype(np.uint8).reshape(-1, 1)
    return cv2.applyColorMap(lut, cv2.COLORMAP_TURBO).reshape(-1, 3)[:, ::-1].copy()


def draw_points(image: np.ndarray, uv: np.ndarray, colors: np.ndarray, depth: np.ndarray,
                radius: int = 2) -> np.ndarray:
    """Copy of RGB ``image`` with discs at ``uv`` (M, 2); near points drawn over far ones."""
    out = image.copy()
    H, W = out.shape[:2]
    order = np.argsort(-depth, kind='stable')                # far first, near last
    px = np.rint(uv[order]).astype(np.int64)
    col = colors[order]
    offsets = [(dx, dy) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
               if dx * dx + dy * dy <= radius * radius + radius]
    # one vectorized assignment per disc offset; for repeated pixels the last (nearest) wins
    for dx, dy in offsets:
        u, v = px[:, 0] + dx, px[:, 1] + dy
        ok = (u >= 0) & (u < W) & (v >= 0) & (v < H)
        out[v[ok], u[ok]] = col[ok]
    return out


def render_overlays(frame: OverlayFrame, config: CorrespondenceConfig, *, color: str = 'depth',
                    radius: int = 2, max_depth: float = 60.0, class_map: Any = None,
                    show_hidden: bool = False) -> list[tuple[str, np.ndarray, int]]:
    """``(camera name, RGB overlay, points drawn)`` per camera of ``frame``."""
    import dataclasses
    if color == 'label' and frame.labels is None:
        raise OverlayError(f'{frame.name}: --color label needs per-point labels')
    if color == 'intensity' and frame.intensity is None:
        raise OverlayError(f'{frame.name}: --color intensity needs point intensities')
    kwargs = {}
    if frame.trajectory is not None and frame.point_time_ns is not None and \
            frame.camera_stamp_ns is not None:
        kwargs = {'point_time_ns': frame.point_time_ns,
                  'camera_stamp_ns': frame.camera_stamp_ns, 'trajectory': frame.trajectory}
    corr = compute_correspondences(frame.xyz, frame.rig, config=config, **kwargs)
    hidden = None
    if show_hidden and config.occlusion:
        hidden = compute_correspondences(frame.xyz, frame.rig,
                                         config=dataclasses.replace(config, occlusion=False),
                                         **kwargs)
    out = []
    for c, name in enumerate(frame.rig.names):
        image = frame.images[c]
        frame.rig.cameras[c].check_image_size(image.shape[1], image.shape[0])
        sel = corr.for_camera(c)
        if hidden is not None:
            everything = hidden.for_camera(c)
            gone = ~np.isin(everything.point, sel.point)
            image = draw_points(image, everything.uv[gone],
                                np.full((int(gone.sum()), 3), 255, np.uint8),
                                everything.depth[gone], radius=max(radius - 1, 0))
        if color == 'depth':
            values = sel.depth
        elif color == 'label':
            values = frame.labels[sel.point]
        else:
            values = frame.intensity[sel.point]
        colors = point_colors(values, color, max_depth=max_depth, class_map=class_map)
        out.append((name, draw_points(image, sel.uv, colors, sel.depth, radius), len(sel)))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('source', help='pair dataset folder, or the nuScenes / KITTI sample '
                                       'folder (with calibration.json)')
    parser.add_argument('--out', required=True, help='folder for the PNG files')
    parser.add_argument('--color', choices=COLOR_MODES, default='depth',
                        help='point color: depth (near red, far blue), label or intensity')
    parser.add_argument('--classes', default='synthetic',
                        help='built-in class map for --color label')
    parser.add_argument('--max-frames', type=int, default=1,
                        help='pairs to draw from a pair dataset (from the first)')
    parser.add_argument('--index', type=int, action='append', default=None,
                        help='pair index to draw (repeatable; overrides --max-frames)')
    parser.add_argument('--radius', type=int, default=2, help='point radius in pixels')
    parser.add_argument('--tf-bag', default=None, metavar='BAG',
                        help="the rig from this bag's /tf_static and CameraInfo (as cmkd rig) "
                             "instead of the source's calibration")
    parser.add_argument('--max-depth', type=float, default=60.0,
                        help='depth (m) at the far end of the color scale')
    parser.add_argument('--show-hidden', action='store_true',
                        help='draw points removed by the occlusion test in white')
    parser.add_argument('--set', dest='overrides', action='append', default=[],
                        metavar='KEY=VALUE',
                        help='CorrespondenceConfig override, e.g. --set occlusion=false')


def run(args: argparse.Namespace) -> int:
    import cv2
    from cmkd_ros.classes import get_class_map
    try:
        config = build(CorrespondenceConfig, parse_overrides(args.overrides))
        if args.radius < 0 or args.max_depth <= 0:
            raise OverlayError('--radius must be >= 0 and --max-depth > 0')
        class_map = get_class_map(args.classes) if args.color == 'label' else None
        source = args.source
        if os.path.exists(os.path.join(source, 'calibration.json')):
            frames = [load_sample_folder(source)]
        elif os.path.exists(os.path.join(source, 'dataset.yaml')):
            frames = load_pair_frames(source, args.index, args.max_frames)
        else:
            raise OverlayError(f'{source}: not a pair dataset (dataset.yaml) nor a sample '
                               'folder (calibration.json)')
        if args.tf_bag:                          # extrinsics from TF, intrinsics CameraInfo
            from cmkd_ros.rig import resolve_rig
            for frame in frames:
                frame.rig = resolve_rig(tf_bag=args.tf_bag, cameras=frame.rig.names)
        os.makedirs(args.out, exist_ok=True)
        for frame in frames:
            for name, image, count in render_overlays(
                    frame, config, color=args.color, radius=args.radius,
                    max_depth=args.max_depth, class_map=class_map,
                    show_hidden=args.show_hidden):
                path = os.path.join(args.out, f'{frame.name}_{name}.png')
                if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
                    raise OverlayError(f'cannot write {path}')
                print(f'{path}: {count} points')
    except (OverlayError, ConfigError, ValueError) as exc:
        print(f'cmkd overlay: {exc}', file=sys.stderr)
        return 2
    print(f'config: {to_dict(config)}')
    return 0

"""``cmkd overlay``: projected LiDAR points drawn over each camera image (PNG).

The first sanity check of a camera-LiDAR rig: points colored by depth (or by label, or
intensity) must sit on the surfaces they hit. Inputs:

* a rosbag2 folder (MCAP or sqlite3): one PointCloud2 topic, one image topic per camera
  (Image or CompressedImage), the rig from a calibration YAML (the bag's own
  ``calibration.yaml`` by default), intrinsics optionally from the bag's CameraInfo, ego
  motion from an Odometry topic when there is one;
* point cloud files (``--cloud``: PCD ascii / binary / binary_compressed, KITTI or nuScenes
  ``.bin``, see :mod:`cmkd_ros.cloud_files`) with ``--image NAME=FILE`` and ``--calibration``;
* a pair dataset folder (:mod:`cmkd_ros.pairs`; ego poses and point times give motion
  compensation, ground-truth labels allow ``--color label``),
* the shared nuScenes sample folder (``calibration.json`` with six cameras, ``LIDAR_TOP.bin``),
* the shared KITTI sample folder (``calibration.json`` with ``P2``, ``velodyne.bin``).

Points go through :func:`cmkd_ros.projection.compute_correspondences`, the same function the
collect node and the training datasets use (with the cloud's ``ring`` field when it has one).
``--show-hidden`` marks the points the occlusion test removed (magenta); ``--json FILE`` writes
per camera the points in the image, visible and hidden, and the settings and scan pattern used.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from cmkd_ros.calibration import (CalibrationError, RigCalibration, load_kitti_calibration,
                                  load_nuscenes_calibration, nuscenes_stamps_ns)
from cmkd_ros.config import ConfigError, build, parse_overrides, to_dict
from cmkd_ros.occlusion import camera_baselines
from cmkd_ros.projection import CorrespondenceConfig, compute_correspondences
from cmkd_ros.viz import draw_points

COLOR_MODES = ('depth', 'label', 'intensity')
HIDDEN_COLOR = (255, 0, 255)


class OverlayError(ValueError):
    """The input folder or the options cannot produce an overlay."""


@dataclass
class OverlayFrame:
    """One sweep and its images, ready to project.

    ``xyz`` (N, 3) float32 LiDAR frame; ``images`` one RGB (H, W, 3) uint8 per rig camera;
    ``camera_stamp_ns`` (C,), ``point_time_ns`` (N,) and ``trajectory`` enable motion
    compensation when all three are present; ``ring`` (N,) the beam index, when known.
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
    ring: np.ndarray | None = None


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
                            camera_stamp_ns=np.array([cam_stamps[n] for n in rig.names]),
                            ring=points[:, 4].astype(np.int64))
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
            point_time_ns=pair.point_time_ns, trajectory=traj, ring=pair.ring))
    return frames


def _struct_fields(points: np.ndarray, name: str) -> dict:
    """xyz (finite rows only), intensity and ring of a structured cloud array."""
    from cmkd_ros.conversions import ConversionError, xyz_from_cloud
    try:
        xyz, rows = xyz_from_cloud(points, drop_invalid=True)
    except ConversionError as exc:
        raise OverlayError(f'{name}: {exc}') from None
    fields = points.dtype.names
    return {'xyz': xyz, 'rows': rows,
            'intensity': points['intensity'][rows].astype(np.float32)
            if 'intensity' in fields else None,
            'ring': points['ring'][rows].astype(np.int64) if 'ring' in fields else None}


def _parse_images(items: list[str]) -> dict[str, str]:
    images = {}
    for item in items:
        name, sep, path = item.partition('=')
        if not sep or not name or not path:
            raise OverlayError(f'--image {item!r} must look like NAME=FILE')
        images[name] = path
    return images


def _load_rig(path: str | None, fallback: str | None = None) -> RigCalibration:
    path = path or fallback
    if not path:
        raise OverlayError('--calibration FILE (a rig calibration YAML) is required')
    if not os.path.isfile(path):
        raise OverlayError(f'calibration file not found: {path}')
    try:
        return RigCalibration.load(path)
    except (CalibrationError, ValueError, OSError) as exc:
        raise OverlayError(f'{path}: {exc}') from None


def load_cloud_frame(cloud: str, images: list[str], calibration: str | None,
                     cloud_format: str = 'auto') -> OverlayFrame:
    """A point cloud file with one image per named camera (``NAME=FILE``) and a rig YAML."""
    from cmkd_ros.cloud_files import CloudFileError, read_cloud_file
    try:
        points = read_cloud_file(cloud, cloud_format)
    except CloudFileError as exc:
        raise OverlayError(str(exc)) from None
    named = _parse_images(images)
    if not named:
        raise OverlayError('--cloud needs at least one --image NAME=FILE')
    rig = _load_rig(calibration)
    unknown = [n for n in named if n not in rig.names]
    if unknown:
        raise OverlayError(f'camera(s) {unknown} are not in the calibration (it has '
                           f'{rig.names})')
    rig = rig.subset(list(named))
    fields = _struct_fields(points, cloud)
    return OverlayFrame(os.path.splitext(os.path.basename(cloud))[0], fields['xyz'],
                        [_read_rgb(named[n]) for n in rig.names], rig,
                        intensity=fields['intensity'], ring=fields['ring'])


@dataclass(frozen=True)
class BagOptions:
    """Where ``cmkd overlay BAG`` finds its inputs (``{camera}`` is replaced by each name)."""

    calibration: str | None = None
    cloud_topic: str | None = None
    image_topic: str | None = None
    camera_info_topic: str | None = None
    odom_topic: str | None = None
    lidar_offset_ms: float = 50.0
    slop_ms: float = 100.0
    time_field: str = 'time'


def _bag_cloud_topic(topics: dict, wanted: str | None, bag: str) -> str:
    from cmkd_ros import bag as bagmod
    clouds = sorted(t for t, (kind, _) in topics.items() if kind == bagmod.POINTCLOUD2)
    if wanted:
        if wanted not in clouds:
            raise OverlayError(f'{bag}: no PointCloud2 topic {wanted}; it has {clouds}')
        return wanted
    if bagmod.POINTS_TOPIC in clouds:
        return bagmod.POINTS_TOPIC
    if len(clouds) != 1:
        raise OverlayError(f'{bag}: name the LiDAR topic with --cloud-topic (PointCloud2 '
                           f'topics: {clouds})')
    return clouds[0]


def _bag_image_topic(topics: dict, template: str | None, camera: str, bag: str) -> str:
    from cmkd_ros import bag as bagmod
    images = (bagmod.IMAGE, bagmod.COMPRESSED_IMAGE)
    if template:
        candidates = [template.format(camera=camera)]
    else:
        t = bagmod.camera_topics(camera)
        candidates = [t['compressed'], t['image']]
    for topic in candidates:
        if topic in topics and topics[topic][0] in images:
            return topic
    raise OverlayError(f'{bag}: no image topic for camera {camera!r} (tried {candidates}; '
                       'set --image-topic, e.g. /{camera}/image_raw)')


def load_bag_frames(bag: str, options: BagOptions, indices: list[int] | None = None,
                    max_frames: int = 1) -> list[OverlayFrame]:
    """Sweeps of a rosbag2 with, per camera, the image nearest to the sweep's middle
    (``lidar_offset_ms`` after its stamp, within ``slop_ms``)."""
    from cmkd_ros import bag as bagmod
    from cmkd_ros.calibration import calibration_from_camera_info
    from cmkd_ros.conversions import ConversionError, cloud_to_array, image_to_array, stamp_ns
    from cmkd_ros.tools.evaluate_bag import cdr_header_stamp_ns
    from cmkd_ros.pipelines.collect import point_times_ns          # ROS-free node core
    try:
        topics = bagmod.bag_topics(bag)
    except Exception as exc:                  # rosbags raises its own errors on bad folders
        raise OverlayError(f'{bag}: cannot open the bag ({exc})') from None
    rig = _load_rig(options.calibration, os.path.join(bag, bagmod.CALIBRATION_FILE)
                    if os.path.isfile(os.path.join(bag, bagmod.CALIBRATION_FILE)) else None)
    cloud_topic = _bag_cloud_topic(topics, options.cloud_topic, bag)
    image_topics = {n: _bag_image_topic(topics, options.image_topic, n, bag) for n in rig.names}
    info_topics = {}
    if options.camera_info_topic:
        info_topics = {options.camera_info_topic.format(camera=n): n for n in rig.names}
        missing = [t for t in info_topics if t not in topics]
        if missing:
            raise OverlayError(f'{bag}: no CameraInfo topic(s) {missing}')
    odom = options.odom_topic
    if odom is None and topics.get(bagmod.ODOM_TOPIC, ('',))[0] == bagmod.ODOMETRY:
        odom = bagmod.ODOM_TOPIC
    if odom and odom not in topics:
        raise OverlayError(f'{bag}: no Odometry topic {odom}')
    # 1. first pass: the chosen sweeps, every image's header stamp, CameraInfo, odometry.
    cloud_count, clouds, odometry, infos = 0, {}, [], {}
    stamps = {n: [] for n in rig.names}
    by_topic = {t: n for n, t in image_topics.items()}
    wanted = [cloud_topic, *image_topics.values(), *info_topics, *([odom] if odom else [])]
    chosen = list(indices) if indices else list(range(max(max_frames, 0)))
    try:
        for topic, msgtype, _, raw in bagmod.read_messages(bag, wanted):
            if topic == cloud_topic:
                if cloud_count in chosen:
                    clouds[cloud_count] = bagmod.deserialize(raw, msgtype)
                cloud_count += 1
            elif topic in by_topic:
                stamps[by_topic[topic]].append(cdr_header_stamp_ns(raw))
            elif topic in info_topics and info_topics[topic] not in infos:
                infos[info_topics[topic]] = bagmod.deserialize(raw, msgtype)
            elif topic == odom:
                odometry.append(bagmod.deserialize(raw, msgtype))
    except bagmod.BagError as exc:
        raise OverlayError(str(exc)) from None
    if cloud_count == 0:
        raise OverlayError(f'{bag}: no message on {cloud_topic}')
    chosen = chosen if indices else chosen[:cloud_count]
    for i in chosen:
        if not 0 <= i < cloud_count:
            raise OverlayError(f'sweep index {i} out of range (the bag has {cloud_count})')
    if info_topics:
        lacking = [n for n in rig.names if n not in infos]
        if lacking:
            raise OverlayError(f'{bag}: no CameraInfo for camera(s) {lacking}')
        rig = RigCalibration(tuple(calibration_from_camera_info(
            infos[c.name], c.T_cam_lidar, c.name, time_offset_ns=c.time_offset_ns)
            for c in rig.cameras), rig.lidar_frame)
    trajectory = None
    if odometry:
        from cmkd_ros.motion import PoseTrajectory
        trajectory = PoseTrajectory.from_odometry(odometry)
    # 2. per sweep and camera, the image nearest to the sweep's middle.
    picks = {}
    for i in chosen:
        target = stamp_ns(clouds[i]) + int(options.lidar_offset_ms * 1e6)
        for n in rig.names:
            have = np.asarray(stamps[n], np.int64)
            if have.size == 0:
                raise OverlayError(f'{bag}: no image of camera {n!r}')
            best = int(have[np.argmin(np.abs(have - target))])
            if abs(best - target) > options.slop_ms * 1e6:
                raise OverlayError(f'{bag} sweep {i}: camera {n!r} has no image within '
                                   f'{options.slop_ms} ms')
            picks[(i, n)] = best
    # 3. second pass: decode only the images picked.
    wanted_images = {(n, st) for (_, n), st in picks.items()}
    decoded = {}
    for topic, msgtype, _, raw in bagmod.read_messages(bag, list(image_topics.values())):
        key = (by_topic[topic], cdr_header_stamp_ns(raw))
        if key in wanted_images and key not in decoded:
            try:
                image = image_to_array(bagmod.deserialize(raw, msgtype))
            except ConversionError as exc:
                raise OverlayError(f'{bag}: camera {key[0]!r}: {exc}') from None
            decoded[key] = image if image.ndim == 3 else np.repeat(image[..., None], 3, 2)
    frames = []
    for i in chosen:
        try:
            points = cloud_to_array(clouds[i])
        except ConversionError as exc:
            raise OverlayError(f'{bag} sweep {i}: {exc}') from None
        stamp = stamp_ns(clouds[i])
        fields = _struct_fields(points, f'{bag} sweep {i}')
        times = point_times_ns(points[fields['rows']], stamp, options.time_field)
        frames.append(OverlayFrame(
            f'sweep{i:06d}', fields['xyz'], [decoded[(n, picks[(i, n)])] for n in rig.names],
            rig, intensity=fields['intensity'], ring=fields['ring'],
            camera_stamp_ns=np.array([picks[(i, n)] for n in rig.names], np.int64),
            point_time_ns=times if times is not None else np.full(len(fields['xyz']), stamp),
            trajectory=trajectory))
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


class CameraOverlay(NamedTuple):
    """One camera's overlay: the picture and its counts of points."""

    name: str
    image: np.ndarray             # (H, W, 3) uint8 RGB
    drawn: int                    # visible points drawn
    in_image: int                 # points that project into the image
    hidden: int                   # of those, removed by the occlusion test


def frame_correspondences(frame: OverlayFrame, config: CorrespondenceConfig):
    """(visible, every in-image) Correspondences of ``frame`` (one scan pattern for both)."""
    kwargs = {'ring': frame.ring}
    if frame.trajectory is not None and frame.point_time_ns is not None and \
            frame.camera_stamp_ns is not None:
        kwargs.update(point_time_ns=frame.point_time_ns,
                      camera_stamp_ns=frame.camera_stamp_ns, trajectory=frame.trajectory)
    every = compute_correspondences(frame.xyz, frame.rig, **kwargs,
                                    config=dataclasses.replace(config, occlusion=False))
    if not config.occlusion:
        return every, every
    return compute_correspondences(frame.xyz, frame.rig, config=config, **kwargs), every


def render_overlays(frame: OverlayFrame, config: CorrespondenceConfig, *, color: str = 'depth',
                    radius: int = 2, max_depth: float = 60.0, class_map: Any = None,
                    show_hidden: bool = False, correspondences=None) -> list[CameraOverlay]:
    """One :class:`CameraOverlay` per camera of ``frame``; with ``show_hidden`` the points the
    occlusion test removed are drawn over the picture in magenta. ``correspondences``: the
    :func:`frame_correspondences` pair when already computed."""
    if color == 'label' and frame.labels is None:
        raise OverlayError(f'{frame.name}: --color label needs per-point labels')
    if color == 'intensity' and frame.intensity is None:
        raise OverlayError(f'{frame.name}: --color intensity needs point intensities')
    corr, every = correspondences or frame_correspondences(frame, config)
    out = []
    for c, name in enumerate(frame.rig.names):
        image = frame.images[c]
        frame.rig.cameras[c].check_image_size(image.shape[1], image.shape[0])
        sel, everything = corr.for_camera(c), every.for_camera(c)
        if color == 'depth':
            values = sel.depth
        elif color == 'label':
            values = frame.labels[sel.point]
        else:
            values = frame.intensity[sel.point]
        colors = point_colors(values, color, max_depth=max_depth, class_map=class_map)
        image = draw_points(image, sel.uv, colors, sel.depth, radius)
        gone = ~np.isin(everything.point, sel.point)
        if show_hidden:
            image = draw_points(image, everything.uv[gone],
                                np.tile(np.array(HIDDEN_COLOR, np.uint8), (int(gone.sum()), 1)),
                                everything.depth[gone], radius=max(radius, 1))
        out.append(CameraOverlay(name, image, len(sel), len(everything), int(gone.sum())))
    return out


def frame_report(frame: OverlayFrame, overlays: list[CameraOverlay], corr) -> dict:
    """JSON-safe counts per camera, the camera baselines and the scan pattern used."""
    baselines = camera_baselines(frame.rig)
    return {'name': frame.name, 'points': int(len(frame.xyz)),
            'scan_pattern': None if corr.scan_pattern is None else corr.scan_pattern.to_dict(),
            'cameras': {o.name: {'in_image': o.in_image, 'visible': o.drawn,
                                 'hidden': o.hidden,
                                 'hidden_fraction': round(o.hidden / max(o.in_image, 1), 5),
                                 'baseline_m': round(baselines[o.name], 4)}
                        for o in overlays}}


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The inputs every tool that reads raw frames takes (``cmkd overlay``, ``cmkd calibrate``):
    a bag, pair dataset or sample folder, or ``--cloud`` with ``--image`` and ``--calibration``;
    bag topics. Read by :func:`load_frames`."""
    from cmkd_ros.cloud_files import CLOUD_FORMATS
    parser.add_argument('source', nargs='?', default=None,
                        help='rosbag2 folder, pair dataset folder, or the nuScenes / KITTI '
                             'sample folder (with calibration.json); or use --cloud')
    parser.add_argument('--cloud', default=None,
                        help='point cloud file: .pcd (ascii, binary, binary_compressed), KITTI '
                             'or nuScenes .bin')
    parser.add_argument('--cloud-format', choices=CLOUD_FORMATS, default='auto',
                        help='layout of --cloud (auto: by extension and content)')
    parser.add_argument('--image', action='append', default=[], metavar='NAME=FILE',
                        help='camera image for --cloud (repeatable; NAME as in --calibration)')
    parser.add_argument('--calibration', default=None,
                        help='rig calibration YAML (RigCalibration schema; a bag folder\'s own '
                             'calibration.yaml by default)')
    parser.add_argument('--cloud-topic', default=None,
                        help='bag PointCloud2 topic (default /lidar/points or the only one)')
    parser.add_argument('--image-topic', default=None,
                        help='bag image topic template with {camera} (default '
                             '/cameras/{camera}/image_raw[/compressed])')
    parser.add_argument('--camera-info-topic', default=None,
                        help='bag CameraInfo topic template with {camera}: intrinsics from the '
                             'bag, extrinsics from --calibration')
    parser.add_argument('--odom-topic', default=None,
                        help='bag nav_msgs/Odometry topic for motion compensation (default '
                             '/odom when present)')
    parser.add_argument('--lidar-offset-ms', type=float, default=50.0,
                        help='bag: images are matched to the sweep stamp plus this (ms)')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    parser.add_argument('--out', required=True, help='folder for the PNG files')
    parser.add_argument('--color', choices=COLOR_MODES, default='depth',
                        help='point color: depth (near red, far blue), label or intensity')
    parser.add_argument('--classes', default='synthetic',
                        help='built-in class map for --color label')
    parser.add_argument('--max-frames', type=int, default=1,
                        help='pairs or bag sweeps to draw (from the first)')
    parser.add_argument('--index', type=int, action='append', default=None,
                        help='pair or bag sweep index to draw (repeatable; overrides '
                             '--max-frames)')
    parser.add_argument('--radius', type=int, default=2, help='point radius in pixels')
    parser.add_argument('--tf-bag', default=None, metavar='BAG',
                        help="the rig from this bag's /tf_static and CameraInfo (as cmkd rig) "
                             "instead of the source's calibration")
    parser.add_argument('--max-depth', type=float, default=60.0,
                        help='depth (m) at the far end of the color scale')
    parser.add_argument('--show-hidden', action='store_true',
                        help='mark points removed by the occlusion test (magenta)')
    parser.add_argument('--json', default=None, metavar='FILE',
                        help='write per camera the points in the image, visible and hidden, '
                             'and the settings used')
    parser.add_argument('--set', dest='overrides', action='append', default=[],
                        metavar='KEY=VALUE',
                        help='CorrespondenceConfig override, e.g. --set occlusion=false')


def load_frames(args: argparse.Namespace) -> list[OverlayFrame]:
    """The frames the command line names (see :func:`add_arguments`)."""
    source = args.source
    if args.cloud:
        if source:
            raise OverlayError('give either a source folder or --cloud, not both')
        return [load_cloud_frame(args.cloud, args.image, args.calibration, args.cloud_format)]
    if not source:
        raise OverlayError('name a source folder or a --cloud file')
    if os.path.exists(os.path.join(source, 'metadata.yaml')):
        return load_bag_frames(source, BagOptions(
            calibration=args.calibration, cloud_topic=args.cloud_topic,
            image_topic=args.image_topic, camera_info_topic=args.camera_info_topic,
            odom_topic=args.odom_topic, lidar_offset_ms=args.lidar_offset_ms),
            args.index, args.max_frames)
    if os.path.exists(os.path.join(source, 'calibration.json')):
        return [load_sample_folder(source)]
    if os.path.exists(os.path.join(source, 'dataset.yaml')):
        return load_pair_frames(source, args.index, args.max_frames)
    raise OverlayError(f'{source}: not a rosbag2 (metadata.yaml), a pair dataset '
                       '(dataset.yaml) nor a sample folder (calibration.json)')


def run(args: argparse.Namespace) -> int:
    import cv2
    from cmkd_ros.classes import get_class_map
    from cmkd_ros.projection import ProjectionError
    try:
        config = build(CorrespondenceConfig, parse_overrides(args.overrides))
        if args.radius < 0 or args.max_depth <= 0:
            raise OverlayError('--radius must be >= 0 and --max-depth > 0')
        class_map = get_class_map(args.classes) if args.color == 'label' else None
        frames = load_frames(args)
        if args.tf_bag:                          # extrinsics from TF, intrinsics CameraInfo
            from cmkd_ros.rig import resolve_rig
            for frame in frames:
                frame.rig = resolve_rig(tf_bag=args.tf_bag, cameras=frame.rig.names)
        os.makedirs(args.out, exist_ok=True)
        reports = []
        for frame in frames:
            corr = frame_correspondences(frame, config)
            overlays = render_overlays(frame, config, color=args.color, radius=args.radius,
                                       max_depth=args.max_depth, class_map=class_map,
                                       show_hidden=args.show_hidden, correspondences=corr)
            for o in overlays:
                path = os.path.join(args.out, f'{frame.name}_{o.name}.png')
                if not cv2.imwrite(path, cv2.cvtColor(o.image, cv2.COLOR_RGB2BGR)):
                    raise OverlayError(f'cannot write {path}')
                print(f'{path}: {o.drawn} points ({o.hidden} of {o.in_image} in the image '
                      'hidden)')
            reports.append(frame_report(frame, overlays, corr[0]))
            if corr[0].scan_pattern is not None:
                print(f'{frame.name}: occlusion test {corr[0].scan_pattern.describe()}')
        if args.json:
            with open(args.json, 'w', encoding='utf-8') as fh:
                json.dump({'settings': to_dict(config), 'frames': reports}, fh, indent=1)
    except (OverlayError, ConfigError, ProjectionError, CalibrationError, ValueError,
            OSError) as exc:
        print(f'cmkd overlay: {exc}', file=sys.stderr)
        return 2
    print(f'config: {to_dict(config)}')
    return 0

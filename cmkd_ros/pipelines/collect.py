"""ROS-free core of the collect node: configuration, per-sweep work, pair assembly, overlay.

:class:`CollectPipeline` takes one synchronized set, decoded (:class:`SyncedInputs`), and does
what the node's worker does with it: finite points, per-point times, ego trajectory, the LiDAR
scan pattern (read once), correspondences (:func:`cmkd_ros.projection.compute_correspondences`,
the function training uses), the record decision, the pair (:func:`assemble_pair`, with the
correspondences and the hash of their settings, so training reads them instead of computing
them again, leaving out cameras the calibration health check refuses), the overlay image and
the calibration health of each camera (:class:`cmkd_ros.calibration_check.HealthMonitor`). The
node (``collect_node.py``) only turns messages into these inputs, synchronizes, writes and
publishes, so a test or a tool runs the same code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from cmkd_ros.calibration import RigCalibration
from cmkd_ros.calibration_check import CameraHealth, HealthMonitor, HealthSettings
from cmkd_ros.config import ConfigError, setting
from cmkd_ros.conversions import scalar_field
from cmkd_ros.pipelines.intake import Report, finite_xyz
from cmkd_ros.pipelines.segment import MAX_POINTS
from cmkd_ros.projection import (Correspondences, CorrespondenceConfig, PreviousSweep,
                                 ProjectionError, compute_correspondences,
                                 correspondence_settings_hash, resolve_scan_pattern)
from cmkd_ros.sync import SyncConfig

if TYPE_CHECKING:
    from cmkd_ros.pairs import Pair

IMAGE_TRANSPORTS = ('compressed', 'raw')
# The last sweep serves the occlusion test of the next one when it is at most this much older
# (several sweeps at 5-20 Hz; beyond, sweeps were dropped or a bag paused).
_PREVIOUS_MAX_AGE_NS = 500_000_000


@dataclass(frozen=True)
class RecordSettings:
    """Pair dataset writing."""

    enabled: bool = setting(False, 'write pairs to output_dir (can be switched at runtime)')
    output_dir: str = setting('', 'pair dataset folder (created; appended to if it exists)')
    max_megabytes: float = setting(0.0, 'disk quota of the pair files in MB (0: none); '
                                   'recording stops when reached', ge=0.0)
    min_free_megabytes: float = setting(100.0, 'free disk space (MB) recording leaves: below '
                                        'it, or when a write fails, recording pauses (ERROR '
                                        'diagnostic write_failed) and resumes once a pair can be '
                                        'written again', ge=0.0)
    min_interval_s: float = setting(0.0, 'rate limit: at most one pair per this many seconds '
                                    'of LiDAR stamp time (0: every synchronized set)', ge=0.0)
    min_correspondences: int = setting(1, 'skip sets with fewer (point, camera) pairs', ge=0)
    store_correspondences: bool = setting(True, 'store the computed correspondences in each '
                                          'pair (corr_* keys, with the hash of the '
                                          'correspondence settings): training reads them '
                                          'instead of computing them again when its settings '
                                          'match')
    fsync: bool = setting(True, 'fsync each pair (crash safety; off only for benchmarks on '
                          'slow disks)')


@dataclass(frozen=True)
class OverlaySettings:
    """The debug image of projected points."""

    enabled: bool = setting(True, 'publish ~/output/overlay (only while someone subscribes)')
    camera: str = setting('', 'camera drawn (empty: the first of cameras)')
    max_rate_hz: float = setting(2.0, 'overlay publish rate limit (Hz)', gt=0.0, le=30.0)
    max_width: int = setting(960, 'overlay images wider than this are downscaled', ge=64)


@dataclass(frozen=True)
class TfSettings:
    """Extrinsics from TF (REP 105 /tf_static) instead of, or checked against, the file."""

    bag: str = setting('', 'rosbag2 folder whose /tf_static (and static-looking /tf) and '
                       'CameraInfo give the rig when calibration_file is empty (as cmkd rig); '
                       'with calibration_file, compared with it at start')
    lidar_frame: str = setting('', 'LiDAR frame of the TF lookups (empty: the lidar_frame of '
                               'calibration_file, else the frame_id of the PointCloud2 '
                               'messages)')
    live: bool = setting(True, 'read the live /tf_static and /tf with tf2_ros where installed: '
                         'the extrinsics when calibration_file and tf.bag are empty, else '
                         'compared with calibration_file once per camera')
    max_angle_deg: float = setting(0.1, 'calibration_file and TF differing by more rotation '
                                   'than this (deg) are reported (one warning per camera)',
                                   gt=0.0)
    max_offset_cm: float = setting(1.0, 'calibration_file and TF placing a camera farther '
                                   'apart than this (cm) are reported', gt=0.0)


@dataclass(frozen=True)
class CollectNodeConfig:
    """Parameters of the collect node (ROS parameters of the same dotted names)."""

    calibration_file: str = setting('', 'rig calibration YAML (RigCalibration schema): '
                                    'extrinsics T_cam_lidar, and intrinsics unless '
                                    'use_camera_info (required unless the extrinsics come from '
                                    'TF: tf.bag, tf.live)')
    cameras: tuple[str, ...] = setting(default_factory=tuple, help='camera names to collect, as '
                                       'named in the calibration file or tf.bag (empty: all of '
                                       'them)')
    image_transport: str = setting('compressed', 'compressed: sensor_msgs/CompressedImage '
                                   '(jpeg/png, stored as received); raw: sensor_msgs/Image',
                                   choices=IMAGE_TRANSPORTS)
    image_topic: str = setting('/cameras/{camera}/image_raw/compressed', 'image topic '
                               'template; {camera} is replaced by each camera name')
    camera_info_topic: str = setting('/cameras/{camera}/camera_info', 'CameraInfo topic '
                                     'template ({camera} replaced)')
    use_camera_info: bool = setting(True, 'take intrinsics and image size from CameraInfo '
                                    '(extrinsics stay from the calibration file); a camera is '
                                    'used once its first valid CameraInfo arrived')
    use_odometry: bool = setting(False, 'subscribe ~/input/odom (nav_msgs/Odometry, '
                                 'T_world_lidar) for motion compensation')
    odometry_history_s: float = setting(2.0, 'odometry kept for interpolation (s)', gt=0.0)
    lidar_sync_offset_ms: float = setting(
        50.0, 'added to the LiDAR stamp before matching cameras: the time from the header stamp '
        'to the middle of the sweep, when a spinning LiDAR sees what the cameras see (50 for a '
        '10 Hz sweep stamped at its start, -50 stamped at its end, 0 for the middle)',
        ge=-1000.0, le=1000.0)
    point_time_field: str = setting('time', 'per-point time field: float seconds since the '
                                    'header stamp; empty: all points at the header stamp')
    max_points: int = setting(MAX_POINTS, 'clouds with more points are skipped unread '
                              '(warning too_many_points): bounds the time and memory one '
                              'message can cost; the default admits a 128-beam LiDAR '
                              '(about 262,000 points) (0: no limit)', ge=0)
    processing_queue: int = setting(4, 'synchronized sets waiting for the worker; more are '
                                    'dropped (counted)', ge=1, le=100)
    diagnostics_period_s: float = setting(1.0, 'period of the /diagnostics status (s)', gt=0.0)
    sync: SyncConfig = setting(default_factory=SyncConfig, help='LiDAR-camera synchronization')
    correspondence: CorrespondenceConfig = setting(default_factory=CorrespondenceConfig,
                                                   help='point-pixel correspondences')
    record: RecordSettings = setting(default_factory=RecordSettings, help='pair writing')
    overlay: OverlaySettings = setting(default_factory=OverlaySettings, help='debug overlay')
    tf: TfSettings = setting(default_factory=TfSettings, help='extrinsics from TF')
    health: HealthSettings = setting(default_factory=HealthSettings,
                                     help='calibration health of each camera (/diagnostics; '
                                     'docs/calibration.md)')

    def validate(self) -> None:
        if not self.calibration_file and not self.tf.bag and not (
                self.tf.live and self.cameras and self.use_camera_info):
            raise ConfigError('calibration_file: a rig calibration YAML is required, unless '
                              'tf.bag names a bag with TF and CameraInfo, or the extrinsics '
                              'come from the live TF (tf.live, cameras named, use_camera_info)')
        if len(set(self.cameras)) != len(self.cameras):
            raise ConfigError(f'cameras: names must be unique, got {list(self.cameras)}')
        if '{camera}' not in self.image_topic and len(self.cameras) > 1:
            raise ConfigError('image_topic: must contain {camera} when several cameras are used')
        if self.use_camera_info and '{camera}' not in self.camera_info_topic and \
                len(self.cameras) > 1:
            raise ConfigError('camera_info_topic: must contain {camera} for several cameras')
        if self.record.enabled and not self.record.output_dir:
            raise ConfigError('record.output_dir: required when record.enabled')
        if self.overlay.camera and self.cameras and self.overlay.camera not in self.cameras:
            raise ConfigError(f'overlay.camera: {self.overlay.camera!r} is not one of '
                              f'{list(self.cameras)}')


# ----------------------------------------------------------------------------- helpers

def extrinsics_disagreement(name: str, T_file: np.ndarray, T_tf: np.ndarray, tf: TfSettings,
                            source: str) -> str | None:
    """The warning line when calibration_file and TF place camera ``name`` differently by
    more than ``tf.max_angle_deg`` or ``tf.max_offset_cm``; None when they agree."""
    from cmkd_ros.rig import extrinsics_difference
    degrees, centimetres = extrinsics_difference(T_file, T_tf)
    if degrees <= tf.max_angle_deg and centimetres <= tf.max_offset_cm:
        return None
    return (f'camera {name!r}: calibration_file and {source} disagree by {degrees:.2f} deg and '
            f'{centimetres:.1f} cm (T_cam_lidar); using calibration_file')


def startup_rig(config: CollectNodeConfig) -> tuple[Any, list[str]]:
    """``(rig, warnings)``: the rig of calibration_file, else of tf.bag's TF and CameraInfo
    (None when both are empty: the extrinsics come from the live TF), and a line per camera on
    which calibration_file and tf.bag disagree."""
    from cmkd_ros.rig import resolve_rig, rig_from_bag
    if not config.calibration_file and not config.tf.bag:
        return None, []
    template = config.camera_info_topic
    cameras = list(config.cameras) if '{camera}' in template else [
        f'{name}={template}' for name in config.cameras]
    template = template if '{camera}' in template else None
    rig = resolve_rig(config.calibration_file, config.tf.bag, cameras=cameras,
                      lidar_frame=config.tf.lidar_frame or None, camera_info_topic=template)
    if not (config.calibration_file and config.tf.bag):
        return rig, []
    source = f'the TF of {config.tf.bag}'
    try:
        tf_rig = rig_from_bag(config.tf.bag, config.tf.lidar_frame or rig.lidar_frame,
                              cameras or rig.names, template).rig
    except ValueError as exc:
        return rig, [f'calibration_file not compared with {source}: {exc}']
    lines = [extrinsics_disagreement(cam.name, rig.camera(cam.name).T_cam_lidar,
                                     cam.T_cam_lidar, config.tf, source)
             for cam in tf_rig.cameras if cam.name in rig.names]
    return rig, [line for line in lines if line]


@dataclass
class RateLimiter:
    """At most one accepted stamp per ``interval_ns``; a stamp going backwards resets it."""

    interval_ns: int
    last_ns: int | None = None

    def accept(self, stamp_ns: int) -> bool:
        if self.last_ns is not None and stamp_ns < self.last_ns:
            self.last_ns = None
        if self.last_ns is None or stamp_ns - self.last_ns >= self.interval_ns:
            self.last_ns = stamp_ns
            return True
        return False


def point_times_ns(points: np.ndarray, stamp_ns: int, time_field: str) -> np.ndarray | None:
    """(N,) int64 absolute capture time of each point, or None without a time field (or one
    with a count other than 1).

    ``time_field`` holds seconds relative to the header stamp (float; non-finite values count
    as 0, values are clipped to +-1e9 s) or nanoseconds (integer).
    """
    rel = scalar_field(points, time_field) if time_field else None
    if rel is None:
        return None
    if rel.dtype.kind == 'f':
        rel_s = np.nan_to_num(scalar_field(points, time_field, np.float64), nan=0.0,
                              posinf=0.0, neginf=0.0)
        return stamp_ns + np.round(np.clip(rel_s, -1e9, 1e9) * 1e9).astype(np.int64)
    return stamp_ns + rel.astype(np.int64)


@dataclass
class CameraSample:
    """One camera's image of a synchronized set, kept encoded when it came compressed."""

    name: str
    stamp_ns: int
    encoded: bytes | None = None          # JPEG/PNG as received (CompressedImage)
    encoded_format: str = ''              # 'jpeg' or 'png'
    rgb: np.ndarray | None = None         # (H, W, 3) uint8 when it came raw (or was decoded)
    extra: dict[str, Any] = field(default_factory=dict)


def encoded_image(sample: CameraSample) -> tuple[bytes, str]:
    """(bytes, format) to store: compressed input unchanged, raw input as lossless PNG."""
    if sample.encoded is not None:
        return sample.encoded, sample.encoded_format
    from cmkd_ros.pairs import encode_png
    return encode_png(sample.rgb), 'png'


def decoded_rgb(sample: CameraSample) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a sample (decoding and caching compressed input)."""
    if sample.rgb is None:
        from cmkd_ros.pairs import decode_png_or_jpeg
        sample.rgb = decode_png_or_jpeg(sample.encoded, color=True)
    return sample.rgb


def draw_overlay(rgb: np.ndarray, uv: np.ndarray, depth: np.ndarray, max_width: int,
                 max_depth: float = 50.0) -> np.ndarray:
    """Points drawn over an image, colored by depth (near red, far blue); (H', W', 3) uint8.

    ``uv`` (M, 2) pixels of the full-size image, ``depth`` (M,) metres.
    """
    import cv2
    img = np.ascontiguousarray(rgb)
    scale = 1.0
    if img.shape[1] > max_width:
        scale = max_width / img.shape[1]
        img = cv2.resize(img, (max_width, int(round(img.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA)
    else:
        img = img.copy()
    if len(uv):
        # 1. depth -> hue (0 red near .. 120 blue far); 2. pixel centres scaled to the image.
        hue = (np.clip(depth / max_depth, 0, 1) * 120).astype(np.uint8)
        hsv = np.stack([hue, np.full_like(hue, 255), np.full_like(hue, 255)], axis=1)
        colors = cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]
        px = np.round(uv * scale).astype(np.int64)
        h, w = img.shape[:2]
        ok = (px[:, 0] >= 0) & (px[:, 0] < w) & (px[:, 1] >= 0) & (px[:, 1] < h)
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            x = np.clip(px[ok, 0] + dx, 0, w - 1)
            y = np.clip(px[ok, 1] + dy, 0, h - 1)
            img[y, x] = colors[ok]
    return img


# ----------------------------------------------------------------------------- the pipeline

@dataclass
class SyncedInputs:
    """One synchronized set, decoded: what :meth:`CollectPipeline.sweep` works on."""

    stamp_ns: int                           # LiDAR header stamp
    points: np.ndarray                      # (N,) decoded cloud (x, y, z; any other fields)
    rig: RigCalibration                     # calibration of the cameras in the set, in order
    samples: dict[str, CameraSample]        # the images, by camera name (rig.names)
    odometry: Sequence[Any] = ()            # nav_msgs/Odometry-like T_world_lidar messages


@dataclass
class Sweep:
    """A synchronized set after the per-sweep work: what a pair and an overlay are made of."""

    stamp_ns: int
    points: np.ndarray                      # (M,) the finite points of the cloud
    xyz: np.ndarray                         # (M, 3) float32 LiDAR frame
    point_time_ns: np.ndarray | None        # (M,) int64 capture times (None: the stamp)
    ring: np.ndarray | None                 # (M,) uint16 beam index (None: no ring field)
    rig: RigCalibration
    samples: dict[str, CameraSample]
    camera_stamp_ns: np.ndarray             # (C,) int64, rig order
    trajectory: Any                         # PoseTrajectory or None
    correspondences: Correspondences

    @property
    def camera_names(self) -> list[str]:
        return list(self.rig.names)


def without_cameras(sweep: Sweep, dropped: Sequence[str]) -> Sweep:
    """The sweep without the cameras ``dropped``: their images, stamps, calibration and
    correspondences left out (the others' camera indices renumbered)."""
    names = sweep.camera_names
    keep = [i for i, n in enumerate(names) if n not in set(dropped)]
    if len(keep) == len(names):
        return sweep
    corr = sweep.correspondences
    renumber = np.full(len(names), -1, np.int64)
    renumber[keep] = np.arange(len(keep))
    rows = renumber[corr.camera] >= 0
    kept = [names[i] for i in keep]
    return dataclasses.replace(
        sweep, rig=sweep.rig.subset(kept), samples={n: sweep.samples[n] for n in kept},
        camera_stamp_ns=sweep.camera_stamp_ns[keep],
        correspondences=dataclasses.replace(
            corr, point=corr.point[rows], camera=renumber[corr.camera[rows]],
            uv=corr.uv[rows], depth=corr.depth[rows], camera_names=tuple(kept)))


def assemble_pair(sweep: Sweep, *, correspondence_settings: str | None = None,
                  drop_cameras: Sequence[str] = ()) -> Pair:
    """The pair of a sweep: images as received (raw ones as PNG), per-point fields, ego poses
    and, when ``correspondence_settings`` (the hash of the settings that made them,
    :func:`cmkd_ros.projection.correspondence_settings_hash`) is given, the correspondences;
    the cameras ``drop_cameras`` left out (:func:`without_cameras`)."""
    from cmkd_ros.pairs import Pair
    sweep = without_cameras(sweep, drop_cameras)
    images, formats = {}, {}
    for name in sweep.camera_names:
        images[name], formats[name] = encoded_image(sweep.samples[name])
    corr, trajectory = sweep.correspondences, sweep.trajectory
    return Pair(
        lidar_stamp_ns=sweep.stamp_ns, xyz=sweep.xyz, camera_names=sweep.camera_names,
        camera_stamp_ns=sweep.camera_stamp_ns, images=images, image_formats=formats,
        calibration=sweep.rig, intensity=scalar_field(sweep.points, 'intensity', np.float32),
        ring=sweep.ring, point_time_ns=sweep.point_time_ns,
        ego_stamps_ns=None if trajectory is None else trajectory.stamps_ns,
        ego_poses=None if trajectory is None else trajectory.T_world_lidar,
        correspondences={'point': corr.point, 'camera': corr.camera, 'uv': corr.uv,
                         'depth': corr.depth} if correspondence_settings else None,
        correspondence_settings=correspondence_settings)


class CollectPipeline:
    """The collect node's work on one synchronized set, ROS-free.

    ``sweep(inputs)`` -> :class:`Sweep` (or None for a set to skip, warned), ``accept(sweep)``
    (enough correspondences, rate limit), ``pair(sweep)`` -> :class:`cmkd_ros.pairs.Pair`,
    ``overlay(sweep, camera)`` -> debug image. Calibration health: ``health_due(sweep)`` (one
    sweep in ``health.sweep_stride``, cheap) and ``check_health(sweep)`` (seconds now and then:
    the node runs it on a thread of its own); ``refused(sweep)``: the cameras whose pairs are
    not recorded. Warnings and values go to ``report``; the scan pattern, read from the first
    usable sweep when the occlusion test is on, is told once (``report.info``).
    """

    def __init__(self, config: CollectNodeConfig, report: Report):
        self.report = report
        self.config = config
        self.rate_limiter = RateLimiter(int(config.record.min_interval_s * 1e9))
        self.scan_pattern = None
        self._before: tuple | None = None     # (stamp, PreviousSweep, trajectory) of the last sweep
        self.health_monitor: HealthMonitor | None = None    # made from the first checked set
        self.health: dict[str, CameraHealth] = {}           # the last verdicts (a snapshot)
        self._health_seen = 0
        # called between the steps of check_health (the node: wait while pairs are made)
        self.health_pause: Callable[[], Any] | None = None

    def configure(self, config: CollectNodeConfig) -> None:
        """Take runtime settings (record.*, overlay.*, health.enabled, .refuse_misaligned,
        .warn_better_neighbours: the threshold applies from the next check)."""
        self.config = config
        self.rate_limiter.interval_ns = int(config.record.min_interval_s * 1e9)
        if self.health_monitor is not None:
            self.health_monitor.settings = self._monitor_settings()

    def _monitor_settings(self) -> HealthSettings:
        # the stride is taken here (health_due), before the images are decoded
        return dataclasses.replace(self.config.health, sweep_stride=1)

    def restart(self) -> None:
        """The LiDAR stamps jumped back (bag loop, clock reset): the rate limit starts over,
        the last sweep no longer comes before the next."""
        self.rate_limiter.last_ns = None
        self._before = None

    def sweep(self, inputs: SyncedInputs, hurry: bool = False) -> Sweep | None:
        """Finite points, per-point times, ego trajectory, scan pattern and correspondences of
        a set; None (after a warning) for an empty cloud, one without a finite point, or while
        the scan pattern cannot be read. Raises ConversionError, CalibrationError, ValueError
        for input the correspondence function rejects.

        ``hurry`` (the node: sets are waiting for the worker): the occlusion test leaves out
        the sweep before for this set, which nearly halves its cost (counted
        ``previous_sweep_skipped_busy``), as on a first sweep; the set still serves as the
        next one's sweep before. Falling behind would otherwise drop whole sets."""
        config = self.config
        points = inputs.points
        # 1. finite points (LiDAR frame); the others are dropped.
        if points.shape[0] == 0:
            self.report.warn('empty_cloud', 'empty LiDAR cloud: set skipped')
            return None
        xyz, rows = finite_xyz(points, self.report, 'dropped')
        if rows.size == 0:
            return None
        points = points[rows]
        # 2. capture times: per point, of each camera; ego poses for motion compensation.
        names = list(inputs.rig.names)
        cam_stamps = np.array([inputs.samples[n].stamp_ns for n in names], dtype=np.int64)
        times = point_times_ns(points, inputs.stamp_ns, config.point_time_field)
        trajectory = self._trajectory(inputs.odometry)
        # 3. the LiDAR's scan pattern (occlusion test), read once; 4. correspondences.
        ring = scalar_field(points, 'ring', np.uint16)       # as the pair stores it
        if self.scan_pattern is None and config.correspondence.occlusion:
            self._read_scan_pattern(xyz, ring, inputs.rig)
            if self.scan_pattern is None:
                return None                 # warned; the occlusion test needs it
        # the sweep before (with its ego poses) adds occluders to the occlusion test; kept
        # and merged only while that is on
        point_time = times if times is not None else inputs.stamp_ns
        previous, poses = None, trajectory
        before = self._before
        if before is not None and trajectory is not None and \
                0 < inputs.stamp_ns - before[0] <= _PREVIOUS_MAX_AGE_NS:
            if hurry:
                self.report.count('previous_sweep_skipped_busy')
            else:
                previous = before[1]
                poses = trajectory if before[2] is None else trajectory.merged(before[2])
        uses_previous = config.correspondence.occlusion and \
            config.correspondence.occlusion_previous_sweep
        self._before = (inputs.stamp_ns, PreviousSweep(xyz, point_time, ring), trajectory) \
            if uses_previous else None
        corr = compute_correspondences(
            xyz, inputs.rig, point_time_ns=point_time, camera_stamp_ns=cam_stamps,
            trajectory=poses, ring=ring, scan_pattern=self.scan_pattern, previous=previous,
            config=config.correspondence)
        self.report.set('last_correspondences', len(corr))
        self.report.set('last_previous_occluders', corr.previous_occluders)
        return Sweep(inputs.stamp_ns, points, xyz, times, ring, inputs.rig,
                     dict(inputs.samples), cam_stamps, trajectory, corr)

    def accept(self, sweep: Sweep) -> bool:
        """Whether the sweep becomes a pair: a camera the health check does not refuse
        (else counted ``refused_misaligned_<camera>`` per camera and
        ``skipped_all_cameras_refused``), ``record.min_correspondences`` of those cameras
        (counted ``skipped_few_correspondences`` when too few), then the rate limit."""
        refused = self.refused(sweep)
        if refused and len(refused) == len(sweep.camera_names):
            self._count_refused(refused)
            self.report.count('skipped_all_cameras_refused')
            return False
        corr = sweep.correspondences
        kept = len(corr) - int(np.isin(corr.camera, [sweep.camera_names.index(n)
                                                     for n in refused]).sum())
        if kept < self.config.record.min_correspondences:
            self.report.count('skipped_few_correspondences')
            return False
        return self.rate_limiter.accept(sweep.stamp_ns)

    def pair(self, sweep: Sweep) -> Pair | None:
        """The pair of an accepted sweep without the cameras :meth:`refused` names (each
        counted ``refused_misaligned_<camera>``); None when that is every camera (a verdict
        that changed since :meth:`accept`)."""
        config = self.config
        refused = self.refused(sweep)
        self._count_refused(refused)
        if refused and len(refused) == len(sweep.camera_names):
            self.report.count('skipped_all_cameras_refused')
            return None
        return assemble_pair(sweep, correspondence_settings=correspondence_settings_hash(
            config.correspondence) if config.record.store_correspondences else None,
            drop_cameras=refused)

    def _count_refused(self, refused: list[str]) -> None:
        for name in refused:
            self.report.count(f'refused_misaligned_{name}')

    # ---------------------------------------------------------------- calibration health
    def refused(self, sweep: Sweep) -> list[str]:
        """Cameras of the sweep whose pairs are not recorded: ``health.refuse_misaligned``
        (with ``health.enabled``) and their last check says misaligned."""
        monitor, health = self.health_monitor, self.config.health
        if monitor is None or not (health.enabled and health.refuse_misaligned):
            return []
        return [n for n in sweep.camera_names if monitor.refuses(n)]

    def health_due(self, sweep: Sweep) -> bool:
        """Whether the health check takes this sweep: one in ``health.sweep_stride`` while
        ``health.enabled`` (cheap: the sweep's images are decoded by :meth:`check_health`)."""
        if not self.config.health.enabled:
            return False
        self._health_seen += 1
        return (self._health_seen - 1) % self.config.health.sweep_stride == 0

    def check_health(self, sweep: Sweep) -> dict[str, CameraHealth] | None:
        """Give one sweep to the calibration health monitor (decoding its images); the new
        verdicts {camera: :class:`CameraHealth`} when a check ran (every
        ``health.check_every`` sets), else None. A camera whose calibration changed (a new
        CameraInfo) starts over. Costs 0.3 s per set and 0.5-2 s per camera per check."""
        if not self.config.health.enabled:
            return None
        if self.health_monitor is None:
            self.health_monitor = HealthMonitor(sweep.rig, self._monitor_settings(),
                                                pause=self.health_pause)
        monitor = self.health_monitor
        restarted = monitor.use(sweep.rig)
        images = {}
        for n in sweep.camera_names:
            if self.health_pause is not None:
                self.health_pause()
            images[n] = decoded_rgb(sweep.samples[n])
        capture = {n: int(s) + int(sweep.rig.camera(n).time_offset_ns)
                   for n, s in zip(sweep.camera_names, sweep.camera_stamp_ns)}
        result = monitor.add(sweep.xyz, images, ring=sweep.ring,
                             intensity=scalar_field(sweep.points, 'intensity', np.float32),
                             point_time_ns=sweep.point_time_ns, capture_ns=capture,
                             trajectory=sweep.trajectory)
        if result is not None or restarted:
            self.health = {n: monitor.health(n) for n in monitor.rig.names}
        return result

    def overlay(self, sweep: Sweep, camera: str) -> np.ndarray | None:
        """(H', W', 3) uint8 points over camera ``camera``'s image (None: not in the set)."""
        if camera not in sweep.samples:
            return None
        sel = sweep.correspondences.for_camera(sweep.camera_names.index(camera))
        return draw_overlay(decoded_rgb(sweep.samples[camera]), sel.uv, sel.depth,
                            self.config.overlay.max_width)

    def _read_scan_pattern(self, xyz: np.ndarray, ring: Any, rig: RigCalibration) -> None:
        from cmkd_ros.occlusion import camera_baselines
        try:
            self.scan_pattern = resolve_scan_pattern(xyz, ring, None, self.config.correspondence)
        except ProjectionError as exc:
            self.report.warn('scan_pattern', f'{exc} (tried again on the next sweep)')
            return
        baselines = ', '.join(f'{n} {d:.2f} m' for n, d in camera_baselines(rig).items())
        self.report.info(f'occlusion test: {self.scan_pattern.describe()}; camera-LiDAR '
                         f'baselines {baselines}')

    def _trajectory(self, odometry: Sequence[Any]) -> Any:
        if not odometry:
            return None
        from cmkd_ros.motion import MotionError, PoseTrajectory
        try:
            return PoseTrajectory.from_odometry(odometry)
        except MotionError as exc:
            self.report.warn('bad_odometry', f'odometry unusable: {exc}')
            return None

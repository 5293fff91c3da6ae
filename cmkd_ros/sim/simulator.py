"""``SimWorld`` renders frames (one LiDAR sweep + N camera images + ground truth): ``SimFrame``."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import numpy as np

from cmkd_ros.calibration import RigCalibration
from cmkd_ros.classes import SYNTHETIC, ClassMap
from cmkd_ros.config import ConfigError, build
from cmkd_ros.sim.camera import (MAX_GROUND_DEPTH_M, NEAR_M, CameraModel, camera_pose,
                                 nuscenes_like_rig)
from cmkd_ros.sim.config import SimConfig
from cmkd_ros.sim.lidar import LidarModel
from cmkd_ros.sim.world import StreetScene, rows_times

# Random streams of a frame (seed, frame index, stream).
_STREAM_LIDAR, _STREAM_STAMPS, _STREAM_CAMERA = 1, 2, 3
# Visibility: nothing on the camera ray is nearer than the surface point minus this tolerance
# (float32 ray casting error, far below any gap between objects).
VISIBLE_ABS_M = 0.01
VISIBLE_REL = 0.001


@dataclass
class SimFrame:
    """One synthetic frame with its ground truth.

    LiDAR (N points, firing order): ``xyz`` (N, 3) float32 LiDAR frame at each point's own capture
    time, ``intensity`` (N,) float32, ``ring`` (N,) uint16, ``point_time_ns`` (N,) int64,
    ``labels`` (N,) uint8; ``points_world`` (N, 3) float64 the same points in the world frame;
    ``surface_world`` (N, 3) float64 the noise-free surface points.
    Cameras (C): ``camera_stamp_ns`` (C,) int64 true capture times, ``images`` (C, H, W, 3) uint8
    RGB, ``label_images`` (C, H, W) uint8 (255 = sky), ``depth_images`` (C, H, W) float32 z depth
    in metres (0 = nothing). Ground truth per (camera, point): ``gt_uv`` (C, N, 2) float32 pixel
    (distorted, OpenCV convention) where the measured point appears in camera c at c's stamp,
    ``gt_in_view`` (C, N) in front and inside the image, ``gt_visible`` (C, N) in view and not
    occluded: a ray cast from the camera towards the surface point that the beam hit meets
    nothing nearer (exact occlusion), and the pixel at round(gt_uv) shows that same surface
    (so a point on a silhouette whose pixel shows the background is not visible);
    ``gt_occluded`` (C, N) in view but hidden behind a nearer surface (the parallax cases).
    ``ego_stamps_ns`` (P,) and ``ego_poses`` (P, 4, 4) T_world_lidar every ``ego.pose_step_ms``
    covering the sweep and every camera stamp.
    """

    index: int
    lidar_stamp_ns: int
    xyz: np.ndarray
    intensity: np.ndarray
    ring: np.ndarray
    point_time_ns: np.ndarray
    labels: np.ndarray
    points_world: np.ndarray
    surface_world: np.ndarray
    camera_names: list[str]
    camera_stamp_ns: np.ndarray
    images: list[np.ndarray]
    label_images: list[np.ndarray]
    depth_images: list[np.ndarray]
    gt_uv: np.ndarray
    gt_in_view: np.ndarray
    gt_visible: np.ndarray
    gt_occluded: np.ndarray
    ego_stamps_ns: np.ndarray
    ego_poses: np.ndarray
    calibration: RigCalibration
    class_map: ClassMap = field(default=SYNTHETIC)
    sweep_period_ns: int = 100_000_000

    def camera_index(self, name: str) -> int:
        try:
            return self.camera_names.index(name)
        except ValueError:
            raise KeyError(f'no camera {name!r}; have {self.camera_names}') from None

    def trajectory(self):
        """The frame's ego poses as a :class:`cmkd_ros.motion.PoseTrajectory`."""
        from cmkd_ros.motion import PoseTrajectory
        return PoseTrajectory(self.ego_stamps_ns, self.ego_poses)

    def occlusion_stats(self) -> dict:
        """Point counts: in view of some camera, out of every view, visible in some camera,
        occluded in some camera that it projects into, and that fraction of the in-view ones."""
        n = len(self.xyz)
        if not len(self.camera_names):
            return {'points': n, 'in_view_any': 0, 'out_of_view': n, 'visible_any': 0,
                    'occluded_in_some_camera': 0, 'occluded_fraction_of_in_view': 0.0}
        in_view = int(self.gt_in_view.any(0).sum())
        occluded = int(self.gt_occluded.any(0).sum())
        return {'points': n, 'in_view_any': in_view, 'out_of_view': n - in_view,
                'visible_any': int(self.gt_visible.any(0).sum()),
                'occluded_in_some_camera': occluded,
                'occluded_fraction_of_in_view': occluded / max(1, in_view)}

    def to_pair(self, image_format: str = 'png', jpeg_quality: int = 90):
        """A :class:`cmkd_ros.pairs.Pair` with labels, encoded images, label/depth images, ego
        poses and calibration (camera stamps are true capture times, time_offset_ns = 0)."""
        import cv2

        from cmkd_ros.pairs import Pair, encode_depth_png, encode_png
        if image_format not in ('png', 'jpeg'):
            raise ValueError(f'image_format must be png or jpeg, got {image_format!r}')
        images = {}
        for name, img in zip(self.camera_names, self.images):
            if image_format == 'png':
                images[name] = encode_png(img)
            else:
                ok, buf = cv2.imencode('.jpg', cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
                if not ok:
                    raise RuntimeError('JPEG encoding failed')
                images[name] = buf.tobytes()
        return Pair(
            lidar_stamp_ns=int(self.lidar_stamp_ns), xyz=self.xyz,
            camera_names=list(self.camera_names),
            camera_stamp_ns=np.asarray(self.camera_stamp_ns, np.int64), images=images,
            image_formats={n: image_format for n in self.camera_names},
            calibration=self.calibration, intensity=self.intensity, ring=self.ring,
            point_time_ns=self.point_time_ns, labels=self.labels,
            label_images={n: encode_png(li)
                          for n, li in zip(self.camera_names, self.label_images)},
            depth_images={n: encode_depth_png(d)
                          for n, d in zip(self.camera_names, self.depth_images)},
            ego_stamps_ns=self.ego_stamps_ns, ego_poses=self.ego_poses)


_POOLS: dict = {}
_POOLS_LOCK = threading.Lock()


def _shared_pool(workers: int):
    """One process-wide thread pool per size, shared by every SimWorld."""
    with _POOLS_LOCK:
        if workers not in _POOLS:
            from concurrent.futures import ThreadPoolExecutor
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix='cmkd-sim')
        return _POOLS[workers]


class SimWorld:
    """A deterministic synthetic drive: ``SimWorld(config).frame(i)`` is the i-th sweep.

    ``config`` is a :class:`SimConfig` or a mapping validated with ``build(SimConfig, ...)``;
    ``workers`` threads render the cameras (default min(2, CPUs); results do not depend on it).
    Frame ``i`` starts at ``start_time_ns + i * sweep period``; same seed and config give
    identical frames, in any order.
    """

    def __init__(self, config: SimConfig | Mapping | None = None, workers: int | None = None):
        if workers is not None and int(workers) < 1:
            raise ValueError(f'workers must be >= 1, got {workers}')
        # Threads rendering cameras in parallel (numpy releases the GIL); output is identical.
        self.workers = int(workers) if workers is not None else min(2, os.cpu_count() or 1)
        if not isinstance(config, SimConfig):
            config = build(SimConfig, config or {})
        self.config = config
        self.class_map = SYNTHETIC
        self.scene = StreetScene(config)
        self.trajectory = self.scene.trajectory
        self.lidar = LidarModel(config.lidar)
        cams = config.cameras
        rig = nuscenes_like_rig(
            cams.count, cams.width, cams.height, cams.horizontal_fov_deg, cams.yaw_deg,
            cams.distortion, cams.distortion_jitter, cams.mount_forward_m, cams.mount_side_m,
            cams.mount_below_lidar_m, cams.pitch_deg, rng=np.random.default_rng([config.seed, 5]),
            mount_right=cams.mount_right_m)
        self.calibration = RigCalibration(tuple(rig), lidar_frame='lidar')
        try:
            self.cameras = [CameraModel(c) for c in rig]
        except ValueError as exc:
            raise ConfigError(f'cameras.distortion: {exc}') from None
        # Each camera fires when the sweep passes its heading (as in nuScenes).
        self._camera_offset_ns = []
        for cam in rig:
            forward = np.linalg.inv(cam.T_cam_lidar)[:3, 2]
            self._camera_offset_ns.append(
                self.lidar.time_at_azimuth_ns(float(np.arctan2(forward[1], forward[0]))))

    def _pool(self):
        return _shared_pool(self.workers)

    def static_transforms(self) -> list[tuple[str, str, np.ndarray]]:
        """The rig as a robot's ``/tf_static`` (``cmkd_ros.tf_tree.rig_edges``): ``base_link``
        on the road under the LiDAR (``lidar.height_m`` below it), the camera links and their
        optical frames."""
        from cmkd_ros.tf_tree import rig_edges
        T_base_lidar = np.eye(4)
        T_base_lidar[2, 3] = self.config.lidar.height_m
        return rig_edges(self.calibration, T_base_lidar)

    def close(self) -> None:
        """Release resources (the camera threads are a process-wide pool; nothing to stop)."""

    @property
    def sweep_period_ns(self) -> int:
        return self.lidar.period_ns

    def camera_primitives(self, x: float):
        """Solids the cameras can see from world x (as far as the ground is drawn)."""
        return self.scene.primitives(x - MAX_GROUND_DEPTH_M, x + MAX_GROUND_DEPTH_M)

    def frame_stamp_ns(self, index: int) -> int:
        """Header stamp (sweep start) of frame ``index``."""
        return int(self.config.start_time_ns) + int(index) * self.lidar.period_ns

    def poses(self, stamps_ns) -> np.ndarray:
        """(P, 4, 4) float64 T_world_lidar at ``stamps_ns`` (P,) int64."""
        return self.trajectory.poses(stamps_ns)

    def camera_stamps_ns(self, index: int) -> np.ndarray:
        """(C,) int64 capture times of the cameras in frame ``index``."""
        rng = np.random.default_rng([self.config.seed, int(index), _STREAM_STAMPS])
        jitter = self.config.cameras.stamp_jitter_ms * 1e6
        base = self.frame_stamp_ns(index)
        return np.array([base + off + int(round(rng.uniform(-jitter, jitter)))
                         for off in self._camera_offset_ns], np.int64)

    def frames(self, count: int, start: int = 0) -> Iterator[SimFrame]:
        for i in range(start, start + count):
            yield self.frame(i)

    def frame(self, index: int, timings: dict | None = None) -> SimFrame:
        """Render frame ``index``; ``timings`` (optional) receives seconds per stage."""
        import time
        if int(index) < 0:
            raise ValueError(f'frame index must be >= 0, got {index}')
        clock = time.perf_counter()
        stamp = self.frame_stamp_ns(index)
        seed = self.config.seed
        # 1. the LiDAR sweep (moving sensor).
        sweep = self.lidar.sweep(self.scene, stamp,
                                 np.random.default_rng([seed, int(index), _STREAM_LIDAR]))
        if timings is not None:
            timings['lidar'] = time.perf_counter() - clock
            clock = time.perf_counter()
        # 2. cameras at their own stamps.
        cam_stamps = self.camera_stamps_ns(index)
        cam_poses = self.poses(cam_stamps) if len(cam_stamps) else np.zeros((0, 4, 4))
        images, label_images, depth_images = [], [], []
        n = len(sweep.xyz)
        C = len(self.cameras)
        gt_uv = np.zeros((C, n, 2), np.float32)
        in_view = np.zeros((C, n), bool)
        visible = np.zeros((C, n), bool)
        if C:
            x_mid = float(cam_poses[:, 0, 3].mean())
            prims = self.camera_primitives(x_mid)

        def render(c: int):
            cam = self.cameras[c]
            T_world_cam = camera_pose(cam_poses[c], cam.calib)
            T_cam_world = np.linalg.inv(T_world_cam)
            # 3. ground truth: where each measured point appears in this camera ...
            p_cam = rows_times(sweep.points_world, T_cam_world[:3, :3].T) + T_cam_world[:3, 3]
            uv, _, ok = cam.project(p_cam)
            # ... and whether the surface point the beam hit is seen (nothing nearer on the
            # ray from the camera towards it).
            surface = (rows_times(sweep.surface_world[ok], T_cam_world[:3, :3].T)
                       + T_cam_world[:3, 3])
            front = surface[:, 2] > NEAR_M
            rng = np.random.default_rng([seed, int(index), _STREAM_CAMERA, c])
            out = cam.render(self.scene, prims, T_world_cam, rng,
                             self.config.cameras.pixel_noise_std, surface[front])
            seen = np.zeros(len(surface), bool)
            z = surface[front, 2]
            seen[front] = out.probe_depth >= z - (VISIBLE_ABS_M + VISIBLE_REL * z)
            occluded = np.zeros(n, bool)
            occluded[np.nonzero(ok)[0]] = ~seen
            # The point's pixel must show the same surface (not a neighbour at a silhouette).
            idx = np.nonzero(ok)[0]
            u = np.clip(np.rint(uv[idx, 0]).astype(np.int64), 0, cam.width - 1)
            v = np.clip(np.rint(uv[idx, 1]).astype(np.int64), 0, cam.height - 1)
            seen &= out.surface_uid[v, u] == sweep.surface_uid[idx]
            vis = np.zeros(n, bool)
            vis[idx] = seen
            return out, uv, ok, vis, occluded
        if self.workers > 1 and C > 1:
            results = list(self._pool().map(render, range(C)))
        else:
            results = [render(c) for c in range(C)]
        occluded = np.zeros((C, n), bool)
        for c, (out, uv, ok, vis, occ) in enumerate(results):
            images.append(out.image)
            label_images.append(out.labels)
            depth_images.append(out.depth)
            gt_uv[c], in_view[c], visible[c], occluded[c] = uv, ok, vis, occ
        if timings is not None:
            timings['cameras'] = time.perf_counter() - clock
        # 4. ego poses densely over the sweep and the camera stamps.
        step = int(round(self.config.ego.pose_step_ms * 1e6))
        t_lo = min([stamp] + list(cam_stamps)) - 2 * step
        t_hi = max([stamp + self.lidar.period_ns] + list(cam_stamps)) + 2 * step
        ego_stamps = np.arange(t_lo, t_hi + step, step, dtype=np.int64)
        return SimFrame(
            index=int(index), lidar_stamp_ns=stamp, xyz=sweep.xyz, intensity=sweep.intensity,
            ring=sweep.ring, point_time_ns=sweep.point_time_ns, labels=sweep.labels,
            points_world=sweep.points_world, surface_world=sweep.surface_world,
            camera_names=self.calibration.names,
            camera_stamp_ns=cam_stamps, images=images, label_images=label_images,
            depth_images=depth_images, gt_uv=gt_uv, gt_in_view=in_view, gt_visible=visible,
            gt_occluded=occluded,
            ego_stamps_ns=ego_stamps, ego_poses=self.poses(ego_stamps),
            calibration=self.calibration, class_map=self.class_map,
            sweep_period_ns=self.lidar.period_ns)

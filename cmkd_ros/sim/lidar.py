"""Spinning multi-beam LiDAR ray-caster with per-point capture time.

The sensor fires one column of beams per azimuth step while the ego moves; each point is returned
in the LiDAR frame *at its own capture time*, as a raw driver outputs it (no motion compensation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cmkd_ros.sim.config import LidarConfig
from cmkd_ros.sim.world import (GROUND_UID, ROAD, SIDEWALK, TERRAIN, Hits, StreetScene,
                                cast_into, ground_t)

# Ground reflectivity by ground class; road paint is bright.
_GROUND_REFLECTIVITY = {ROAD: 0.12, SIDEWALK: 0.25, TERRAIN: 0.3}
_PAINT_REFLECTIVITY = 0.75


@dataclass
class LidarSweep:
    """One sweep, N points in firing order (column by column, rings ascending).

    xyz (N, 3) float32 LiDAR frame at each point's capture time; intensity (N,) float32 0..1;
    ring (N,) uint16; point_time_ns (N,) int64 absolute; labels (N,) uint8 ground truth;
    points_world (N, 3) float64 world frame (the same measured points); surface_world (N, 3)
    float64 the noise-free surface points that the beams hit; surface_uid (N,) int64 identity of
    the solid hit (``GROUND_UID`` for the ground).
    """

    stamp_ns: int
    xyz: np.ndarray
    intensity: np.ndarray
    ring: np.ndarray
    point_time_ns: np.ndarray
    labels: np.ndarray
    points_world: np.ndarray
    surface_world: np.ndarray
    surface_uid: np.ndarray


class LidarModel:
    """Beam geometry and firing schedule of a spinning LiDAR (from :class:`LidarConfig`)."""

    def __init__(self, config: LidarConfig):
        self.config = config
        if config.elevation_angles_deg:
            elev = np.radians(np.asarray(config.elevation_angles_deg, np.float64))
        else:
            elev = np.radians(np.linspace(config.elevation_min_deg, config.elevation_max_deg,
                                          config.beams))
        self.elevation = elev                                             # (B,) ring order
        self.columns = max(1, int(round(360.0 / config.horizontal_resolution_deg)))
        self.period_ns = int(round(1e9 / config.rate_hz))
        step = 2 * np.pi / self.columns
        self.step = step
        sign = -1.0 if config.clockwise else 1.0
        self.sign = sign
        self.start_azimuth = math.radians(config.start_azimuth_deg)
        self.azimuth = self.start_azimuth + sign * step * np.arange(self.columns)   # (K,)
        self.column_offset_ns = (np.arange(self.columns, dtype=np.int64) * self.period_ns
                                 // self.columns)                                  # (K,)
        ca, sa = np.cos(self.azimuth)[:, None], np.sin(self.azimuth)[:, None]
        ce, se = np.cos(elev)[None, :], np.sin(elev)[None, :]
        self.directions = np.stack(np.broadcast_arrays(ca * ce, sa * ce, se + 0 * ca), -1).astype(
            np.float32)                                                           # (K, B, 3)

    def time_at_azimuth_ns(self, azimuth: float) -> int:
        """Offset from the sweep start at which the sweep passes ``azimuth`` (radians)."""
        frac = ((azimuth - self.start_azimuth) * self.sign) % (2 * np.pi) / (2 * np.pi)
        return int(round(frac * self.period_ns))

    def _column_range(self, azimuth: float, half_width: float) -> np.ndarray:
        """Column indices whose azimuth lies within ``azimuth +- half_width``."""
        if half_width >= np.pi:
            return np.arange(self.columns)
        center = ((azimuth - self.start_azimuth) * self.sign) % (2 * np.pi) / self.step
        n = int(math.ceil(half_width / self.step)) + 1
        return np.arange(int(center) - n, int(center) + n + 2) % self.columns

    def sweep(self, scene: StreetScene, stamp_ns: int, rng: np.random.Generator,
              brute_force: bool = False) -> LidarSweep:
        """Cast one sweep starting at ``stamp_ns`` through ``scene``.

        ``brute_force`` tests every ray against every solid (a slow reference for the culling).
        """
        cfg = self.config
        K, B = self.columns, len(self.elevation)
        # 1. ego pose of every column (the sensor moves during the sweep).
        times = int(stamp_ns) + self.column_offset_ns
        poses = scene.trajectory.poses(times)                                     # (K, 4, 4)
        origins = poses[:, :3, 3].astype(np.float32)
        rot = poses[:, :3, :3].astype(np.float32)
        dirs = (rot[:, None, :, 0] * self.directions[..., 0:1]
                + rot[:, None, :, 1] * self.directions[..., 1:2]
                + rot[:, None, :, 2] * self.directions[..., 2:3]).reshape(-1, 3)     # (K*B, 3)
        ray_origin = np.repeat(origins, B, axis=0)                                 # (K*B, 3)
        # 2. the ground plane for every ray, then every solid near the sensor.
        hits = Hits.empty(K * B)
        hits.t[:] = ground_t(ray_origin[:, 2], dirs[:, 2])
        mid = poses[K // 2]
        reach = cfg.max_range_m + 2.0
        prims = scene.primitives(mid[0, 3] - reach - 30, mid[0, 3] + reach + 30)
        if len(prims):
            # 3. cull per object by azimuth / elevation seen from the mid-sweep pose.
            motion = 0.5 * float(np.linalg.norm(origins[-1] - origins[0])) + 0.05
            yaw_change = abs(math.atan2(rot[-1, 1, 0], rot[-1, 0, 0])
                             - math.atan2(rot[0, 1, 0], rot[0, 0, 0]))
            centers = (prims.center - mid[:3, 3]) @ mid[:3, :3]                     # LiDAR frame
            dist = np.linalg.norm(centers, axis=1)
            az = np.arctan2(centers[:, 1], centers[:, 0])
            el = np.arctan2(centers[:, 2], np.hypot(centers[:, 0], centers[:, 1]))
            reach_r = prims.radius + motion
            for j in np.nonzero(dist - reach_r < reach)[0]:
                if reach_r[j] >= dist[j] or brute_force:
                    cols, beams = np.arange(K), np.arange(B)
                else:
                    ang = math.asin(reach_r[j] / dist[j]) + yaw_change + 1e-3
                    lo, hi = el[j] - ang, el[j] + ang
                    beams = np.nonzero((self.elevation >= lo) & (self.elevation <= hi))[0]
                    if not len(beams):
                        continue
                    tilt = max(abs(lo), abs(hi))
                    half = np.pi if tilt >= np.pi / 2 - 1e-3 else math.asin(
                        min(1.0, math.sin(ang) / math.cos(tilt)))
                    cols = self._column_range(az[j], half + yaw_change)
                idx = (cols[:, None] * B + beams[None, :]).ravel()
                cast_into(hits, idx, prims, int(j), ray_origin, dirs)
        # 4. returns within range, random dropouts, range noise.
        keep = (hits.t >= cfg.min_range_m) & (hits.t <= cfg.max_range_m)
        keep &= rng.random(K * B) >= cfg.dropout_probability
        idx = np.nonzero(keep)[0]
        rng_m = hits.t[idx] + rng.normal(0, cfg.range_noise_std_m, len(idx)).astype(np.float32)
        d = dirs[idx]
        origin64, d64 = ray_origin[idx].astype(np.float64), d.astype(np.float64)
        points_world = origin64 + d64 * rng_m[:, None]
        surface_world = origin64 + d64 * hits.t[idx, None]
        obj = hits.obj[idx]
        # 5. labels and intensity (material reflectivity x incidence).
        on_ground = obj < 0
        labels = np.empty(len(idx), np.uint8)
        uid = np.full(len(idx), GROUND_UID, np.int64)
        refl = np.empty(len(idx), np.float32)
        if len(prims):
            labels[~on_ground] = prims.label[obj[~on_ground]]
            refl[~on_ground] = prims.reflectivity[obj[~on_ground]]
            uid[~on_ground] = prims.uid[obj[~on_ground]]
        gx, gy = points_world[on_ground, 0], points_world[on_ground, 1]
        ground = scene.ground_labels(gx, gy)
        labels[on_ground] = ground
        grefl = np.select([ground == ROAD, ground == SIDEWALK], [_GROUND_REFLECTIVITY[ROAD],
                          _GROUND_REFLECTIVITY[SIDEWALK]], _GROUND_REFLECTIVITY[TERRAIN])
        grefl = np.where((ground == ROAD) & scene.road_marking(gx, gy), _PAINT_REFLECTIVITY,
                         grefl)
        refl[on_ground] = grefl
        normal = hits.normal[idx]
        normal[on_ground] = (0.0, 0.0, 1.0)
        cos_inc = np.abs((normal * d).sum(1))
        intensity = refl * (0.25 + 0.75 * cos_inc)
        intensity += rng.normal(0, cfg.intensity_noise_std, len(idx)).astype(np.float32)
        col, ring = np.divmod(idx, B)
        xyz = self.directions.reshape(-1, 3)[idx] * rng_m[:, None]
        return LidarSweep(stamp_ns=int(stamp_ns), xyz=xyz.astype(np.float32),
                          intensity=np.clip(intensity, 0, 1).astype(np.float32),
                          ring=ring.astype(np.uint16), point_time_ns=times[col],
                          labels=labels, points_world=points_world,
                          surface_world=surface_world, surface_uid=uid)

"""Procedural street world: static scene primitives, ground labels, ego trajectory, ray casting.

World frame: x along the street, y to the left, z up, the road surface at z = 0. The scene is
generated lazily in 60 m blocks, each from its own random stream ``(seed, block)``, so any stretch
of street is the same whatever was asked before. Objects are simple solids (yaw-rotated boxes,
vertical cylinders, ellipsoids); the ground is the plane z = 0 labeled by region (road, sidewalk,
terrain). The ego (LiDAR) frame follows :class:`Trajectory`, poses are ``T_world_lidar``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from cmkd_ros.classes import SYNTHETIC
from cmkd_ros.sim.config import SimConfig

BLOCK_M = 60.0
# Parked vehicles stay within this distance of the curb; a car (with its yaw jitter) reaches this
# far sideways from its centre.
PARKED_REACH_M = 2.5
CAR_HALF_REACH_M = 1.2
# Class ids of the synthetic class map.
(ROAD, SIDEWALK, TERRAIN, BUILDING, VEGETATION, CAR, TRUCK, PEDESTRIAN, POLE, BARRIER, SIGN,
 FENCE) = (SYNTHETIC.index(n) for n in (
        'road', 'sidewalk', 'terrain', 'building', 'vegetation', 'car', 'truck', 'pedestrian',
        'pole', 'barrier', 'traffic_sign', 'fence'))
# Primitive kinds.
BOX, CYLINDER, ELLIPSOID = 0, 1, 2
# Texture kinds used by the camera shader.
TEX_NOISE, TEX_FACADE, TEX_CELLS, TEX_FOLIAGE, TEX_CLOTHES, TEX_GLASS = range(6)
# LiDAR reflectivity per class (0..1).
REFLECTIVITY = np.array([0.12, 0.25, 0.3, 0.35, 0.45, 0.55, 0.5, 0.3, 0.4, 0.6, 0.95, 0.35],
                        dtype=np.float32)
EPS_T = 1e-3
# Surface identities: block * UID_STRIDE + index for solids, these for the ground and the sky.
UID_STRIDE = 1 << 20
GROUND_UID, SKY_UID = -1, -2


@dataclass
class Primitives:
    """Scene solids (O of them), world frame.

    kind (O,) int8 BOX/CYLINDER/ELLIPSOID; center (O, 3); size (O, 3): box half extents,
    cylinder (radius, radius, half height), ellipsoid radii; yaw (O,) radians (boxes);
    label (O,) uint8; color, color2 (O, 3) float32 RGB 0..1; texture (O,) int8; reflectivity (O,)
    float32; uid (O,) int64 world-wide identity (block * UID_STRIDE + index in the block);
    radius (O,) bounding-sphere radius; corners (O, 8, 3) bounding-box corners.
    """

    kind: np.ndarray
    center: np.ndarray
    size: np.ndarray
    yaw: np.ndarray
    label: np.ndarray
    color: np.ndarray
    color2: np.ndarray
    texture: np.ndarray
    reflectivity: np.ndarray
    uid: np.ndarray

    def __post_init__(self) -> None:
        sx, sy, sz = self.size[:, 0], self.size[:, 1], self.size[:, 2]
        self.radius = np.sqrt(sx * sx + sy * sy + sz * sz).astype(np.float32)
        signs = np.array([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], np.float32) * 2 - 1
        local = signs[None] * self.size[:, None, :]                              # (O, 8, 3)
        c, s = np.cos(self.yaw)[:, None], np.sin(self.yaw)[:, None]
        rot = self.kind[:, None] == BOX
        x = np.where(rot, c * local[..., 0] - s * local[..., 1], local[..., 0])
        y = np.where(rot, s * local[..., 0] + c * local[..., 1], local[..., 1])
        self.corners = (np.stack([x, y, local[..., 2]], -1) + self.center[:, None]).astype(
            np.float32)

    def __len__(self) -> int:
        return len(self.kind)

    @staticmethod
    def concatenate(parts: list['Primitives']) -> 'Primitives':
        keys = ('kind', 'center', 'size', 'yaw', 'label', 'color', 'color2', 'texture',
                'reflectivity', 'uid')
        return Primitives(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in keys})

    def select(self, mask: np.ndarray) -> 'Primitives':
        keys = ('kind', 'center', 'size', 'yaw', 'label', 'color', 'color2', 'texture',
                'reflectivity', 'uid')
        return Primitives(**{k: getattr(self, k)[mask] for k in keys})


class _Builder:
    """Collects primitives of one block."""

    def __init__(self, rng: np.random.Generator, palette: dict, block: int):
        self.rng = rng
        self.block = block
        self.palette = palette
        self.rows: list[tuple] = []

    def add(self, kind, center, size, label, color, texture, yaw=0.0, color2=None,
            reflectivity=None):
        color = np.clip(np.asarray(color, np.float32), 0, 1)
        color2 = color if color2 is None else np.clip(np.asarray(color2, np.float32), 0, 1)
        refl = REFLECTIVITY[label] if reflectivity is None else reflectivity
        self.rows.append((kind, center, size, yaw, label, color, color2, texture, refl))

    def jitter(self, color, amount=0.08):
        return np.asarray(color) * (1 + self.rng.uniform(-amount, amount, 3))

    def build(self) -> Primitives:
        if not self.rows:
            return _empty()
        cols = list(zip(*self.rows))
        return Primitives(
            kind=np.array(cols[0], np.int8), center=np.array(cols[1], np.float32),
            size=np.array(cols[2], np.float32), yaw=np.array(cols[3], np.float32),
            label=np.array(cols[4], np.uint8), color=np.array(cols[5], np.float32),
            color2=np.array(cols[6], np.float32), texture=np.array(cols[7], np.int8),
            reflectivity=np.array(cols[8], np.float32),
            uid=self.block * UID_STRIDE + np.arange(len(self.rows), dtype=np.int64))


def _empty() -> Primitives:
    z3 = np.zeros((0, 3), np.float32)
    return Primitives(np.zeros(0, np.int8), z3, z3.copy(), np.zeros(0, np.float32),
                      np.zeros(0, np.uint8), z3.copy(), z3.copy(), np.zeros(0, np.int8),
                      np.zeros(0, np.float32), np.zeros(0, np.int64))


class Trajectory:
    """Analytic ego motion: speed varies sinusoidally, the path weaves sideways (curved).

    ``poses(t_ns)`` -> (P, 4, 4) float64 ``T_world_lidar``; time zero is ``config.start_time_ns``.
    """

    def __init__(self, config: SimConfig, y_low: float, y_high: float):
        rng = np.random.default_rng([config.seed, 7])
        ego = config.ego
        self.start_ns = int(config.start_time_ns)
        self.v_mean = 0.5 * (ego.speed_min_mps + ego.speed_max_mps)
        self.v_amp = 0.5 * (ego.speed_max_mps - ego.speed_min_mps)
        self.period = ego.speed_period_s
        self.phase = rng.uniform(0, 2 * np.pi)
        self.y_center = 0.5 * (y_low + y_high)
        self.y_amp = min(ego.lateral_amplitude_m, max(0.0, 0.5 * (y_high - y_low)))
        self.wavelength = ego.lateral_wavelength_m
        self.y_phase = rng.uniform(0, 2 * np.pi)
        self.height = config.lidar.height_m

    def _seconds(self, t_ns) -> np.ndarray:
        return (np.asarray(t_ns, dtype=np.int64) - self.start_ns).astype(np.float64) * 1e-9

    def x_at(self, t_ns) -> np.ndarray:
        t = self._seconds(t_ns)
        w = 2 * np.pi / self.period
        return self.v_mean * t - self.v_amp / w * (np.cos(w * t + self.phase) - np.cos(self.phase))

    def speed(self, t_ns) -> np.ndarray:
        """Forward speed (m/s along the street) at ``t_ns``."""
        t = self._seconds(t_ns)
        return self.v_mean + self.v_amp * np.sin(2 * np.pi / self.period * t + self.phase)

    def poses(self, t_ns) -> np.ndarray:
        """(P, 4, 4) float64 T_world_lidar at the stamps ``t_ns`` (P,) int64."""
        x = np.atleast_1d(self.x_at(t_ns))
        k = 2 * np.pi / self.wavelength
        y = self.y_center + self.y_amp * np.sin(k * x + self.y_phase)
        yaw = np.arctan(self.y_amp * k * np.cos(k * x + self.y_phase))
        out = np.zeros((len(x), 4, 4))
        c, s = np.cos(yaw), np.sin(yaw)
        out[:, 0, 0], out[:, 0, 1], out[:, 1, 0], out[:, 1, 1] = c, -s, s, c
        out[:, 2, 2] = out[:, 3, 3] = 1.0
        out[:, 0, 3], out[:, 1, 3], out[:, 2, 3] = x, y, self.height
        return out


class StreetScene:
    """The static world of one seed: street layout, primitives by block, ground labels."""

    def __init__(self, config: SimConfig):
        self.config = config
        scene = config.scene
        rng = np.random.default_rng([config.seed, 1])
        self.road_half = 0.5 * rng.uniform(scene.road_width_min_m, scene.road_width_max_m)
        self.sidewalk = scene.sidewalk_width_m * rng.uniform(0.75, 1.25, 2)   # right, left
        sun_el = np.radians(rng.uniform(scene.sun_elevation_min_deg, scene.sun_elevation_max_deg))
        sun_az = rng.uniform(0, 2 * np.pi)
        self.sun = np.array([np.cos(sun_el) * np.cos(sun_az), np.cos(sun_el) * np.sin(sun_az),
                             np.sin(sun_el)], np.float32)
        self.ambient = float(rng.uniform(0.35, 0.55))
        # Seeded appearance: palettes and texture frequencies change with the seed.
        self.palette = {
            'asphalt': rng.uniform(0.22, 0.38) * rng.uniform(0.95, 1.05, 3),
            'sidewalk': rng.uniform(0.5, 0.7) * rng.uniform(0.9, 1.1, 3),
            'grass': np.array([rng.uniform(0.2, 0.4), rng.uniform(0.35, 0.55),
                               rng.uniform(0.12, 0.25)]),
            'dirt': np.array([0.45, 0.36, 0.25]) * rng.uniform(0.8, 1.2, 3),
            'facades': rng.uniform(0.3, 0.85, (6, 3)),
            'sky': np.array([rng.uniform(0.45, 0.6), rng.uniform(0.6, 0.75),
                             rng.uniform(0.8, 0.95)]),
        }
        self.waves = rng.normal(0, 1, (8, 3)).astype(np.float32) * rng.uniform(0.5, 3.0)
        self.wave_phase = rng.uniform(0, 2 * np.pi, 8).astype(np.float32)
        self.tile_size = float(rng.uniform(0.4, 0.9))
        self.hash_seed = int(rng.integers(1, 2 ** 20))
        # Parked cars and trucks keep within PARKED_REACH_M of the curb; cars stand in the
        # opposite lane only on roads wide enough for them and the ego to pass.
        self.opposite_lane = self.road_half >= 4.5
        self.opposite_lane_y = 0.5 * (self.road_half - PARKED_REACH_M)
        # Ego lane: the cameras (mounted up to mount_side_m sideways) keep 0.5 m from every car.
        clearance = config.cameras.mount_side_m + 0.5
        self.ego_y_low = -self.road_half + PARKED_REACH_M + clearance
        left = (self.opposite_lane_y - CAR_HALF_REACH_M if self.opposite_lane
                else self.road_half - PARKED_REACH_M)
        self.ego_y_high = left - clearance
        self.trajectory = Trajectory(config, self.ego_y_low, self.ego_y_high)

    # ------------------------------------------------------------------ layout

    @functools.lru_cache(maxsize=64)
    def cross_street(self, block: int) -> tuple[float, float] | None:
        """(x_center, half_width) of the cross street at the end of ``block``, if any."""
        rng = np.random.default_rng([self.config.seed, 2, block + 1_000_000])
        if rng.uniform() >= self.config.scene.cross_street_probability:
            return None
        return (block + 1) * BLOCK_M - 6.0, float(rng.uniform(4.0, 6.0))

    def ground_labels(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Ground class (road / sidewalk / terrain) at world (x, y) on the plane z = 0."""
        ay = np.abs(y)
        side_width = np.where(y < 0, self.sidewalk[0], self.sidewalk[1]).astype(np.float32)
        labels = np.full(x.shape, TERRAIN, np.uint8)
        labels[ay <= self.road_half + side_width] = SIDEWALK
        if x.size == 0:
            return labels
        first, last = int(np.floor(x.min() / BLOCK_M)) - 1, int(np.floor(x.max() / BLOCK_M))
        for b in range(first, last + 1):
            cs = self.cross_street(b)
            if cs is None:
                continue
            dx = np.abs(x - cs[0])
            far = ay > self.road_half
            labels[far & (dx <= cs[1] + 2.5) & (labels == TERRAIN)] = SIDEWALK
            labels[far & (dx <= cs[1])] = ROAD
        labels[ay <= self.road_half] = ROAD
        return labels

    def road_marking(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """True where the road carries white paint (dashed centre line, edge lines)."""
        center = (np.abs(y) < 0.08) & (np.mod(x, 9.0) < 4.5)
        edge = np.abs(np.abs(y) - (self.road_half - 0.35)) < 0.08
        return center | edge

    def primitives(self, x_min: float, x_max: float) -> Primitives:
        """All solids of the blocks overlapping [x_min, x_max] (world x)."""
        blocks = range(int(math.floor(x_min / BLOCK_M)), int(math.floor(x_max / BLOCK_M)) + 1)
        return Primitives.concatenate([self._block(b) for b in blocks])

    @functools.lru_cache(maxsize=32)
    def _block(self, block: int) -> Primitives:
        rng = np.random.default_rng([self.config.seed, 3, block + 1_000_000])
        scene = self.config.scene
        out = _Builder(rng, self.palette, block)
        x0, x1 = block * BLOCK_M, (block + 1) * BLOCK_M
        gaps = [cs for cs in (self.cross_street(block), self.cross_street(block - 1)) if cs]

        def free(x, margin=0.0):
            return all(abs(x - c) > h + 2.5 + margin for c, h in gaps)

        def count(density, length=BLOCK_M):
            return int(rng.poisson(density * length / 100.0))

        for side in (-1, 1):
            curb = self.road_half
            walk = self.sidewalk[0 if side < 0 else 1]
            self._buildings(out, side, curb + walk, x0, x1, free)
            # Parked cars and trucks along the curb.
            spots = np.sort(rng.uniform(x0, x1, count(scene.parked_cars)))
            last = -1e9
            for x in spots:
                if x - last < 5.6 or not free(x, 3.0):
                    continue
                last = x
                self._car(out, x, side * (curb - 1.05), rng.normal(0, 0.03))
            for x in rng.uniform(x0, x1, count(scene.trucks)):
                if free(x, 6.0):
                    self._truck(out, x, side * (curb - 1.3), side)
            for x in rng.uniform(x0, x1, count(scene.pedestrians)):
                if free(x, -2.0):
                    self._pedestrian(out, x, side * (curb + rng.uniform(0.4, walk - 0.3)))
            for x in rng.uniform(x0, x1, count(scene.poles)):
                if free(x):
                    self._pole(out, x, side * (curb + 0.35), side)
            for x in rng.uniform(x0, x1, count(scene.trees)):
                if free(x, 1.0):
                    self._tree(out, x, side * (curb + walk * rng.uniform(0.55, 0.8)))
        for x in rng.uniform(x0, x1, count(scene.moving_lane_cars)):
            if free(x, 3.0) and self.opposite_lane:
                self._car(out, x, self.opposite_lane_y, np.pi + rng.normal(0, 0.03))
        for x in rng.uniform(x0, x1, count(scene.barriers)):
            side = rng.choice([-1, 1])
            n = int(rng.integers(2, 7))
            y = side * (self.road_half + rng.uniform(0.2, 0.8))
            for i in range(n):
                self._barrier(out, x + i * 2.05, y)
        return out.build()

    # ------------------------------------------------------------------ object recipes

    def _buildings(self, out, side, front, x0, x1, free):
        rng = self.config.scene
        r = out.rng
        x = x0 + r.uniform(0, 3)
        while x < x1:
            width = r.uniform(8, 24)
            xc = x + width / 2
            if free(x, 0.0) and free(x + width, 0.0) and free(xc):
                setback = r.uniform(0.0, 4.0) if r.uniform() < 0.5 else 0.0
                if r.uniform() < rng.building_gap_probability:
                    self._open_lot(out, side, front, x, width)
                else:
                    depth = r.uniform(10, 20)
                    height = r.uniform(5, 26)
                    color = out.jitter(self.palette['facades'][r.integers(0, 6)], 0.12)
                    out.add(BOX, (xc, side * (front + setback + depth / 2), height / 2),
                            (width / 2 - 0.2, depth / 2, height / 2), BUILDING, color,
                            TEX_FACADE, color2=r.uniform(0.05, 0.3, 3))
                    if setback > 1.5 and r.uniform() < 0.6:
                        self._hedge(out, side, front + 0.4, x, width)
            x += width + (r.uniform(2, 8) if r.uniform() < 0.3 else 0.0)

    def _open_lot(self, out, side, front, x, width):
        r = out.rng
        if r.uniform() < 0.7:
            # Fence along the lot front, in panels.
            n = max(1, int(width / 2.5))
            height = r.uniform(0.9, 1.8)
            color = out.jitter(r.choice([0.25, 0.45, 0.6]) * np.ones(3), 0.1)
            for i in range(n):
                xc = x + (i + 0.5) * width / n
                out.add(BOX, (xc, side * (front + 0.3), height / 2),
                        (width / n / 2 - 0.05, 0.03, height / 2), FENCE, color, TEX_CELLS)
        for _ in range(int(r.integers(1, 5))):
            rad = r.uniform(0.6, 1.6, 3) * np.array([1, 1, 0.7])
            out.add(ELLIPSOID, (x + r.uniform(0, width), side * (front + r.uniform(1.5, 8)),
                                rad[2] * 0.8), rad, VEGETATION,
                    out.jitter(self.palette['grass'] * 0.8, 0.2), TEX_FOLIAGE)

    def _hedge(self, out, side, y, x, width):
        r = out.rng
        rad = (width / 2 - 0.5, r.uniform(0.3, 0.6), r.uniform(0.5, 0.9))
        out.add(ELLIPSOID, (x + width / 2, side * (y + rad[1]), rad[2] * 0.8), rad, VEGETATION,
                out.jitter(self.palette['grass'] * 0.7, 0.2), TEX_FOLIAGE)

    def _car(self, out, x, y, yaw):
        r = out.rng
        length, width = r.uniform(3.9, 4.9), r.uniform(1.65, 1.9)
        palette = [(0.85, 0.85, 0.85), (0.1, 0.1, 0.1), (0.5, 0.5, 0.52), (0.6, 0.1, 0.1),
                   (0.15, 0.2, 0.5), (0.75, 0.75, 0.7), (0.3, 0.35, 0.3), (0.8, 0.6, 0.2)]
        color = out.jitter(palette[r.integers(0, len(palette))], 0.1)
        body_top = r.uniform(0.9, 1.05)
        out.add(BOX, (x, y, (0.25 + body_top) / 2), (length / 2, width / 2, (body_top - 0.25) / 2),
                CAR, color, TEX_NOISE, yaw=yaw)
        cabin_len = length * r.uniform(0.45, 0.6)
        cabin_top = body_top + r.uniform(0.4, 0.55)
        shift = -0.1 * length
        out.add(BOX, (x + shift * np.cos(yaw), y + shift * np.sin(yaw),
                      (body_top + cabin_top) / 2),
                (cabin_len / 2, width / 2 - 0.08, (cabin_top - body_top) / 2), CAR, color,
                TEX_GLASS, yaw=yaw, color2=(0.08, 0.1, 0.12), reflectivity=0.15)

    def _truck(self, out, x, y, side):
        r = out.rng
        color = out.jitter(r.uniform(0.3, 0.95, 3), 0.05)
        cargo_len, height = r.uniform(5.5, 8.0), r.uniform(3.0, 3.8)
        out.add(BOX, (x, y, (0.6 + height) / 2), (cargo_len / 2, 1.2, (height - 0.6) / 2),
                TRUCK, color, TEX_CELLS)
        cab_x = x - side * (cargo_len / 2 + 1.2)
        out.add(BOX, (cab_x, y, 1.5), (1.1, 1.15, 1.2), TRUCK,
                out.jitter(r.uniform(0.2, 0.9, 3), 0.05), TEX_GLASS, color2=(0.1, 0.1, 0.12))

    def _pedestrian(self, out, x, y):
        r = out.rng
        height = r.uniform(1.5, 1.9)
        rad = r.uniform(0.18, 0.28)
        top, pants = r.uniform(0.05, 0.95, 3), r.uniform(0.05, 0.6, 3)
        body = height - 0.24
        out.add(CYLINDER, (x, y, body / 2), (rad, rad, body / 2), PEDESTRIAN, top, TEX_CLOTHES,
                color2=pants)
        skin = out.jitter(r.choice([0.85, 0.6, 0.35]) * np.array([1.0, 0.78, 0.62]), 0.05)
        out.add(ELLIPSOID, (x, y, height - 0.12), (0.1, 0.1, 0.12), PEDESTRIAN, skin, TEX_NOISE)

    def _pole(self, out, x, y, side):
        r = out.rng
        height, rad = r.uniform(4.0, 9.0), r.uniform(0.06, 0.15)
        color = out.jitter(r.choice([0.35, 0.5, 0.65]) * np.ones(3), 0.05)
        out.add(CYLINDER, (x, y, height / 2), (rad, rad, height / 2), POLE, color, TEX_NOISE)
        if r.uniform() < 0.45:
            size = r.uniform(0.3, 0.45)
            z = r.uniform(2.2, 3.0)
            colors = [(0.8, 0.1, 0.1), (0.1, 0.3, 0.75), (0.9, 0.8, 0.1), (0.95, 0.95, 0.95)]
            out.add(BOX, (x + 0.0, y, z), (0.025, size, size), SIGN,
                    colors[r.integers(0, 4)], TEX_CELLS, yaw=r.normal(0, 0.1),
                    color2=(0.95, 0.95, 0.95))

    def _tree(self, out, x, y):
        r = out.rng
        trunk_h, trunk_r = r.uniform(1.8, 3.5), r.uniform(0.12, 0.3)
        bark = out.jitter((0.3, 0.22, 0.15), 0.15)
        out.add(CYLINDER, (x, y, trunk_h / 2), (trunk_r, trunk_r, trunk_h / 2), VEGETATION,
                bark, TEX_NOISE)
        crown = r.uniform(1.3, 3.0)
        rad = (crown, crown * r.uniform(0.85, 1.15), crown * r.uniform(0.8, 1.3))
        out.add(ELLIPSOID, (x, y, trunk_h + rad[2] * 0.8), rad, VEGETATION,
                out.jitter(self.palette['grass'] * 0.75, 0.25), TEX_FOLIAGE)

    def _barrier(self, out, x, y):
        r = out.rng
        striped = r.uniform() < 0.5
        color = (0.95, 0.45, 0.1) if striped else out.jitter((0.7, 0.7, 0.68), 0.1)
        out.add(BOX, (x, y, 0.45), (1.0, 0.25, 0.45), BARRIER, color,
                TEX_CELLS if striped else TEX_NOISE, yaw=r.normal(0, 0.05),
                color2=(0.95, 0.95, 0.95))


# ---------------------------------------------------------------------- ray casting


@dataclass
class Hits:
    """Nearest hits of R rays: t (R,) ray parameter (inf: none), obj (R,) int32 primitive index
    (-1: none / ground), normal (R, 3) unit world normal, local (R, 3) hit point in the
    primitive's frame (for textures)."""

    t: np.ndarray
    obj: np.ndarray
    normal: np.ndarray
    local: np.ndarray

    @staticmethod
    def empty(n: int) -> 'Hits':
        return Hits(np.full(n, np.inf, np.float32), np.full(n, -1, np.int32),
                    np.zeros((n, 3), np.float32), np.zeros((n, 3), np.float32))


def contains(prims: Primitives, points: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """(N,) bool: world ``points`` (N, 3) lie inside a solid grown by ``margin`` metres."""
    inside = np.zeros(len(points), bool)
    for j in range(len(prims)):
        d = points - prims.center[j]
        size = prims.size[j] + margin
        if prims.kind[j] == BOX:
            c, s = math.cos(prims.yaw[j]), math.sin(prims.yaw[j])
            lx, ly = c * d[:, 0] + s * d[:, 1], c * d[:, 1] - s * d[:, 0]
            inside |= ((np.abs(lx) <= size[0]) & (np.abs(ly) <= size[1])
                       & (np.abs(d[:, 2]) <= size[2]))
        elif prims.kind[j] == CYLINDER:
            inside |= (d[:, 0] ** 2 + d[:, 1] ** 2 <= size[0] ** 2) & (np.abs(d[:, 2]) <= size[2])
        else:
            inside |= ((d / size) ** 2).sum(1) <= 1.0
    return inside


def rows_times(v: np.ndarray, M: np.ndarray) -> np.ndarray:
    """``v @ M`` for (N, 3) rows and a (3, K) matrix, by broadcasting (BLAS is slow for these
    thin shapes, especially on a busy machine)."""
    M = np.asarray(M, dtype=v.dtype)
    return v[:, 0:1] * M[0] + v[:, 1:2] * M[1] + v[:, 2:3] * M[2]


def _to_local(prims: Primitives, j: int, origin, dx, dy, dz):
    """Ray origin(s) and direction components in primitive ``j``'s frame (yaw removed)."""
    ox = origin[0] - prims.center[j, 0]
    oy = origin[1] - prims.center[j, 1]
    oz = origin[2] - prims.center[j, 2]
    yaw = float(prims.yaw[j])
    if prims.kind[j] != BOX or yaw == 0.0:
        return ox, oy, oz, dx, dy, dz
    c, s = np.float32(math.cos(yaw)), np.float32(math.sin(yaw))
    return c * ox + s * oy, c * oy - s * ox, oz, c * dx + s * dy, c * dy - s * dx, dz


def intersect_t(prims: Primitives, j: int, origin, dx, dy, dz) -> np.ndarray:
    """Ray parameter of the first hit of rays ``origin + t * (dx, dy, dz)`` with primitive ``j``.

    origin: 3 scalars or 3 (R,) arrays; dx, dy, dz (R,) float32 world frame (not necessarily
    unit). Returns t (R,) float32, inf where the ray misses (or starts inside).
    """
    ox, oy, oz, dx, dy, dz = _to_local(prims, j, origin, dx, dy, dz)
    sx, sy, sz = (float(v) for v in prims.size[j])
    kind = prims.kind[j]
    with np.errstate(divide='ignore', invalid='ignore', over='ignore'):
        if kind == BOX:
            # Slab test: the last entry and the first exit over the three axes.
            t_in = t_out = None
            for o, d, h in ((ox, dx, sx), (oy, dy, sy), (oz, dz, sz)):
                inv = 1.0 / d
                t1 = (-h - o) * inv
                t2 = (h - o) * inv
                near, far = np.minimum(t1, t2), np.maximum(t1, t2)
                t_in = near if t_in is None else np.maximum(t_in, near)
                t_out = far if t_out is None else np.minimum(t_out, far)
            ok = (t_in <= t_out) & (t_in > EPS_T)
            return np.where(ok, t_in, np.inf).astype(np.float32, copy=False)
        if kind == CYLINDER:
            a = dx * dx + dy * dy
            b = 2 * (ox * dx + oy * dy)
            c = ox * ox + oy * oy - sx * sx
            disc = b * b - 4 * a * c
            t_side = (-b - np.sqrt(disc)) / (2 * a)
            ok = (disc >= 0) & (t_side > EPS_T) & (np.abs(oz + t_side * dz) <= sz)
            t = np.where(ok, t_side, np.inf)
            # Top and bottom caps.
            t_cap = np.where(dz < 0, (sz - oz) / dz, (-sz - oz) / dz)
            cx, cy = ox + t_cap * dx, oy + t_cap * dy
            ok = (t_cap > EPS_T) & (cx * cx + cy * cy <= sx * sx)
            return np.minimum(t, np.where(ok, t_cap, np.inf)).astype(np.float32, copy=False)
        # Ellipsoid: scale to the unit sphere.
        ox, oy, oz, dx, dy, dz = ox / sx, oy / sy, oz / sz, dx / sx, dy / sy, dz / sz
        a = dx * dx + dy * dy + dz * dz
        b = 2 * (ox * dx + oy * dy + oz * dz)
        c = ox * ox + oy * oy + oz * oz - 1
        disc = b * b - 4 * a * c
        t = (-b - np.sqrt(disc)) / (2 * a)
        return np.where((disc >= 0) & (t > EPS_T), t, np.inf).astype(np.float32, copy=False)


def surface_at(prims: Primitives, j: int, origin, dirs: np.ndarray, t: np.ndarray):
    """Unit world normal (R, 3) and hit point in the primitive's frame (R, 3) of hits ``t``."""
    ox, oy, oz, dx, dy, dz = _to_local(prims, j, origin, dirs[:, 0], dirs[:, 1], dirs[:, 2])
    local = np.stack([ox + t * dx, oy + t * dy, oz + t * dz], 1).astype(np.float32)
    size = prims.size[j]
    kind = prims.kind[j]
    if kind == BOX:
        # The face hit is the axis where the point is closest to the box surface.
        rel = np.abs(local) / size
        axis = np.argmax(rel, axis=1)
        normal = np.zeros_like(local)
        rows = np.arange(len(local))
        normal[rows, axis] = np.sign(local[rows, axis])
        c, s = math.cos(prims.yaw[j]), math.sin(prims.yaw[j])
        nx, ny = normal[:, 0].copy(), normal[:, 1].copy()
        normal[:, 0], normal[:, 1] = c * nx - s * ny, s * nx + c * ny
        return normal, local
    if kind == CYLINDER:
        cap = np.abs(local[:, 2]) >= size[2] * (1 - 1e-4)
        side = np.abs(np.hypot(local[:, 0], local[:, 1]) - size[0]) < np.abs(
            np.abs(local[:, 2]) - size[2])
        cap &= ~side
        normal = np.stack([local[:, 0] / size[0], local[:, 1] / size[0],
                           np.zeros(len(local), np.float32)], 1)
        normal[cap] = 0.0
        normal[cap, 2] = np.sign(local[cap, 2])
        return normal.astype(np.float32), local
    normal = local / (size * size)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-12
    return normal.astype(np.float32), local


def cast_into(hits: Hits, idx: np.ndarray, prims: Primitives, j: int, origin: np.ndarray,
              dirs: np.ndarray, components: tuple | None = None) -> None:
    """Intersect rays ``idx`` with primitive ``j``; keep the hits nearer than those in ``hits``.

    origin (3,) shared or (R, 3) per ray, dirs (R, 3) world frame; ``components`` optionally the
    three contiguous (R,) columns of ``dirs`` (faster gathers).
    """
    comp = components if components is not None else (dirs[:, 0], dirs[:, 1], dirs[:, 2])
    per_ray = origin.ndim == 2
    oc = tuple(origin[idx, k] for k in range(3)) if per_ray else tuple(float(v) for v in origin)
    t = intersect_t(prims, j, oc, comp[0][idx], comp[1][idx], comp[2][idx])
    closer = t < hits.t[idx]
    if not closer.any():
        return
    sel = idx[closer]
    if per_ray:
        oc = tuple(origin[sel, k] for k in range(3))
    normal, local = surface_at(prims, j, oc, dirs[sel], t[closer])
    hits.t[sel] = t[closer]
    hits.obj[sel] = j
    hits.normal[sel] = normal
    hits.local[sel] = local


def ground_t(origin_z, dirs_z) -> np.ndarray:
    """Ray parameter where rays meet the ground plane z = 0 (inf if never)."""
    with np.errstate(divide='ignore', invalid='ignore'):
        t = -origin_z / dirs_z
    return np.where((dirs_z < 0) & (t > EPS_T), t, np.inf).astype(np.float32)

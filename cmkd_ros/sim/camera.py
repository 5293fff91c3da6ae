"""Pinhole cameras with plumb_bob distortion: color, label and depth rendering, projection.

Each output pixel (u, v) (OpenCV convention: pixel centres at integers) is undistorted once per
camera into a ray ``(xn, yn, 1)`` in the optical frame, so the ray parameter of a hit is its
depth z. Rays are cast only against objects whose projected bounding box covers their image tile
(16 x 16 pixel tiles, each with the bounding rectangle of its undistorted rays); the ground plane
is intersected analytically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cmkd_ros.calibration import CameraCalibration
from cmkd_ros.sim.world import (GROUND_UID, ROAD, SIDEWALK, SKY_UID, TERRAIN, TEX_CELLS,
                                TEX_CLOTHES, TEX_FACADE, TEX_FOLIAGE, TEX_GLASS, Hits,
                                Primitives, StreetScene, cast_into, ground_t,
                                intersect_t, rows_times)

NEAR_M = 0.05
# Shadows are traced for surfaces nearer than this (beyond, haze hides them).
SHADOW_DEPTH_M = 120.0
MAX_GROUND_DEPTH_M = 300.0
TILE = 16
# Box edges as corner index pairs (corners are indexed by 3 sign bits).
_EDGES = np.array([(i, i ^ b) for i in range(8) for b in (1, 2, 4) if i < i ^ b])


def distort_plumb_bob(xn: np.ndarray, yn: np.ndarray, D: np.ndarray):
    """OpenCV plumb_bob (k1 k2 p1 p2 [k3]) on normalized coordinates -> distorted (xd, yd)."""
    k1, k2, p1, p2 = D[:4]
    k3 = D[4] if len(D) > 4 else 0.0
    r2 = xn * xn + yn * yn
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    xd = xn * radial + 2 * p1 * xn * yn + p2 * (r2 + 2 * xn * xn)
    yd = yn * radial + p1 * (r2 + 2 * yn * yn) + 2 * p2 * xn * yn
    return xd, yd


def plumb_bob_jacobian(xn: np.ndarray, yn: np.ndarray, D: np.ndarray):
    """Partial derivatives (dxd/dx, dxd/dy, dyd/dx, dyd/dy) of :func:`distort_plumb_bob`."""
    k1, k2, p1, p2 = D[:4]
    k3 = D[4] if len(D) > 4 else 0.0
    r2 = xn * xn + yn * yn
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    d_radial = k1 + r2 * (2 * k2 + 3 * k3 * r2)             # d radial / d r2
    cross = 2 * xn * yn * d_radial + 2 * p1 * xn + 2 * p2 * yn
    return (radial + 2 * xn * xn * d_radial + 2 * p1 * yn + 6 * p2 * xn, cross, cross,
            radial + 2 * yn * yn * d_radial + 6 * p1 * yn + 2 * p2 * xn)


def undistort_plumb_bob(xd: np.ndarray, yd: np.ndarray, D: np.ndarray, iterations: int = 60):
    """Inverse of :func:`distort_plumb_bob` by Newton iteration (float64).

    Raises ValueError if it does not converge to 1e-9, or converges beyond the fold of a strong
    distortion (where it is not one-to-one).
    """
    D = np.asarray(D, np.float64)
    xn, yn = xd.astype(np.float64).copy(), yd.astype(np.float64).copy()
    for _ in range(iterations):
        fx, fy = distort_plumb_bob(xn, yn, D)
        ex, ey = fx - xd, fy - yd
        if max(np.abs(ex).max(initial=0), np.abs(ey).max(initial=0)) < 1e-12:
            break
        j11, j12, j21, j22 = plumb_bob_jacobian(xn, yn, D)
        det = j11 * j22 - j12 * j21
        xn -= (j22 * ex - j12 * ey) / det
        yn -= (-j21 * ex + j11 * ey) / det
    fx, fy = distort_plumb_bob(xn, yn, D)
    err = max(np.abs(fx - xd).max(initial=0), np.abs(fy - yd).max(initial=0))
    # The solution must lie where the distortion is locally one-to-one and keeps orientation
    # (a root beyond the fold of a strong barrel distortion is not the camera's ray).
    j11, j12, j21, j22 = plumb_bob_jacobian(xn, yn, D)
    det = j11 * j22 - j12 * j21
    r2 = xn * xn + yn * yn
    radial = 1 + r2 * (D[0] + r2 * (D[1] + r2 * (D[4] if len(D) > 4 else 0.0)))
    if not err < 1e-9 or not (det.min(initial=1) > 0 and radial.min(initial=1) > 0):
        raise ValueError(f'plumb_bob distortion {list(D)} cannot be inverted over the image '
                         f'(residual {err:.2e}, min Jacobian {det.min(initial=1):.3f}); reduce '
                         'the coefficients')
    return xn, yn


@dataclass
class CameraRender:
    """image (H, W, 3) uint8 RGB; labels (H, W) uint8 (255: sky); depth (H, W) float32 z in
    metres (0: nothing hit); probe_depth (M,) float32 first-hit depth along probe rays;
    surface_uid (H, W) int64 identity of the surface each pixel shows (ground -1, sky -2)."""

    image: np.ndarray
    labels: np.ndarray
    depth: np.ndarray
    probe_depth: np.ndarray | None = None
    surface_uid: np.ndarray | None = None


class CameraModel:
    """One calibrated camera: precomputed pixel rays and tiles; render and project."""

    def __init__(self, calib: CameraCalibration):
        if calib.distortion_model not in ('none', 'plumb_bob'):
            raise ValueError(f'camera {calib.name!r}: the simulator renders none/plumb_bob, '
                             f'not {calib.distortion_model}')
        self.calib = calib
        self.width, self.height = int(calib.width), int(calib.height)
        self.K = calib.K
        self.D = calib.D if calib.D.size else np.zeros(5)
        W, H = self.width, self.height
        # 1. pixel centres -> distorted normalized -> undistorted normalized rays (xn, yn, 1).
        u, v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
        fx, fy, cx, cy, skew = self.K[0, 0], self.K[1, 1], self.K[0, 2], self.K[1, 2], self.K[0, 1]
        yd = (v - cy) / fy
        xd = (u - cx - skew * yd) / fx
        xn, yn = undistort_plumb_bob(xd.ravel(), yd.ravel(), self.D)
        self.rays = np.stack([xn, yn, np.ones_like(xn)], 1).astype(np.float32)     # (H*W, 3)
        pad_x = 0.02 * (xn.max() - xn.min())
        pad_y = 0.02 * (yn.max() - yn.min())
        self.valid_rect = (xn.min() - pad_x, xn.max() + pad_x, yn.min() - pad_y,
                           yn.max() + pad_y)
        # 2. tiles: pixel lists and the bounding rectangle of their rays.
        ty, tx = np.arange(H) // TILE, np.arange(W) // TILE
        tiles_x = (W + TILE - 1) // TILE
        tile_id = (ty[:, None] * tiles_x + tx[None, :]).ravel()
        order = np.argsort(tile_id, kind='stable')
        bounds = np.searchsorted(tile_id[order], np.arange(tile_id.max() + 2))
        rect = np.array([[xn[p].min(), xn[p].max(), yn[p].min(), yn[p].max()] for p in
                         (order[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1))])
        # Padded by a pixel so that rays anywhere in a tile's pixels (not only at their centres,
        # e.g. probe rays towards points) fall inside its rectangle.
        pad = np.array([-1 / fx, 1 / fx, -1 / fy, 1 / fy])
        self.tile_rect = (rect + pad).astype(np.float32)                           # (T, 4)
        self.tiles_x = tiles_x
        self.pixel_order = order                          # pixels sorted by tile
        self.tile_bounds = bounds                         # tile i: pixel_order[b[i]:b[i+1]]
        r2 = (xn * xn + yn * yn) / max(1e-9, float((xn * xn + yn * yn).max()))
        self.vignette = (1.0 - 0.3 * r2).astype(np.float32)[:, None]                 # (H*W, 1)

    # ------------------------------------------------------------------ projection

    def project(self, points_cam: np.ndarray):
        """Points (N, 3) in the optical frame -> uv (N, 2) float32 distorted pixels, depth (N,),
        in_image (N,) bool (in front, within the calibrated field of view, inside the image)."""
        p = np.asarray(points_cam, np.float64)
        z = p[:, 2]
        with np.errstate(divide='ignore', invalid='ignore'):
            xn, yn = p[:, 0] / z, p[:, 1] / z
        x0, x1, y0, y1 = self.valid_rect
        ok = (z > NEAR_M) & (xn >= x0) & (xn <= x1) & (yn >= y0) & (yn <= y1)
        xn, yn = np.where(ok, xn, 0), np.where(ok, yn, 0)
        xd, yd = distort_plumb_bob(xn, yn, self.D)
        u = self.K[0, 0] * xd + self.K[0, 1] * yd + self.K[0, 2]
        v = self.K[1, 1] * yd + self.K[1, 2]
        ok &= (u >= -0.5) & (u < self.width - 0.5) & (v >= -0.5) & (v < self.height - 0.5)
        return np.stack([u, v], 1).astype(np.float32), z.astype(np.float32), ok

    # ------------------------------------------------------------------ rendering

    @staticmethod
    def _gather(tiles: np.ndarray, order: np.ndarray, bounds: np.ndarray) -> np.ndarray:
        """Items of the sorted tile ids ``tiles``: ``order[bounds[t]:bounds[t + 1]]`` for each
        tile, with runs of adjacent tiles merged into one slice."""
        breaks = np.nonzero(np.diff(tiles) != 1)[0]
        starts = np.concatenate([[tiles[0]], tiles[breaks + 1]])
        ends = np.concatenate([tiles[breaks], [tiles[-1]]]) + 1
        if len(starts) == 1:
            return order[bounds[starts[0]]:bounds[ends[0]]]
        return np.concatenate([order[bounds[i]:bounds[j]] for i, j in zip(starts, ends)])

    def tile_of(self, uv: np.ndarray) -> np.ndarray:
        """(M,) tile ids of pixel positions ``uv`` (M, 2) (clipped into the image)."""
        u = np.clip(np.rint(uv[:, 0]).astype(np.int64), 0, self.width - 1)
        v = np.clip(np.rint(uv[:, 1]).astype(np.int64), 0, self.height - 1)
        return (v // TILE) * self.tiles_x + u // TILE

    def cast(self, prims: Primitives, T_world_cam: np.ndarray, probes: np.ndarray | None = None,
             probe_tiles: np.ndarray | None = None, brute_force: bool = False):
        """Nearest hits of every pixel ray, then of the ``probes`` rays.

        probes (M, 3) float32 rays (x/z, y/z, 1) in the optical frame with their tile ids
        ``probe_tiles`` (M,). Returns (Hits over H*W + M rays, world rays, origin (3,)).
        ``brute_force`` tests every ray against every solid (a slow reference for the culling).
        """
        R = T_world_cam[:3, :3].astype(np.float32)
        origin = T_world_cam[:3, 3].astype(np.float32)
        n_pix = len(self.rays)
        rays = self.rays if probes is None else np.concatenate([self.rays, probes], 0)
        dirs = rows_times(rays, R.T)                                                 # world
        hits = Hits.empty(len(dirs))
        t_ground = ground_t(np.float32(origin[2]), dirs[:, 2])
        # Ground beyond MAX_GROUND_DEPTH_M is left to the sky (a few rows at the horizon).
        hits.t[:] = np.where(t_ground <= MAX_GROUND_DEPTH_M, t_ground, np.inf)
        if not len(prims):
            return hits, dirs, origin
        # 1. bounding-box corners and edges in the camera frame; clip at the near plane.
        corners = rows_times((prims.corners - origin).reshape(-1, 3), R).reshape(-1, 8, 3)
        z = corners[..., 2]
        front = z >= NEAR_M
        with np.errstate(divide='ignore', invalid='ignore'):
            xn = np.where(front, corners[..., 0] / z, np.nan)
            yn = np.where(front, corners[..., 1] / z, np.nan)
            a, b = corners[:, _EDGES[:, 0]], corners[:, _EDGES[:, 1]]               # (O, 12, 3)
            za, zb = a[..., 2], b[..., 2]
            cross = (za >= NEAR_M) != (zb >= NEAR_M)
            s = (NEAR_M - za) / (zb - za)
            clip = a + s[..., None] * (b - a)
            cxn = np.where(cross, clip[..., 0] / NEAR_M, np.nan)
            cyn = np.where(cross, clip[..., 1] / NEAR_M, np.nan)
        all_x = np.concatenate([xn, cxn], 1)
        all_y = np.concatenate([yn, cyn], 1)
        idx_obj = np.nonzero(np.isfinite(all_x).any(1))[0]
        if not len(idx_obj):
            return hits, dirs, origin
        # 2. object rectangle vs tile rectangles.
        rx0, rx1 = np.nanmin(all_x[idx_obj], 1), np.nanmax(all_x[idx_obj], 1)
        ry0, ry1 = np.nanmin(all_y[idx_obj], 1), np.nanmax(all_y[idx_obj], 1)
        tr = self.tile_rect
        overlap = ((rx0[:, None] <= tr[None, :, 1]) & (rx1[:, None] >= tr[None, :, 0])
                   & (ry0[:, None] <= tr[None, :, 3]) & (ry1[:, None] >= tr[None, :, 2]))
        if probes is not None and len(probes):
            probe_order = np.argsort(probe_tiles, kind='stable') + n_pix
            probe_bounds = np.searchsorted(probe_tiles[probe_order - n_pix],
                                           np.arange(len(tr) + 1))
        else:
            probe_order = None
        # 3. exact intersections of each object with the rays of its tiles.
        components = tuple(np.ascontiguousarray(dirs[:, k]) for k in range(3))
        if brute_force:
            every = np.arange(len(dirs))
            for j in range(len(prims)):
                cast_into(hits, every, prims, j, origin, dirs, components)
            return hits, dirs, origin
        for k, j in enumerate(idx_obj):
            tiles = np.nonzero(overlap[k])[0]
            if not len(tiles):
                continue
            idx = self._gather(tiles, self.pixel_order, self.tile_bounds)
            if probe_order is not None:
                idx = np.concatenate([idx, self._gather(tiles, probe_order, probe_bounds)])
            cast_into(hits, idx, prims, int(j), origin, dirs, components)
        return hits, dirs, origin

    def render(self, scene: StreetScene, prims: Primitives, T_world_cam: np.ndarray,
               rng: np.random.Generator, pixel_noise_std: float = 0.0,
               probe_points: np.ndarray | None = None) -> CameraRender:
        """Color, label and depth images of ``scene`` seen from pose ``T_world_cam``.

        ``probe_points`` (M, 3) optical frame, in front of the camera: ``probe_depth`` (M,)
        receives the depth of the first surface along the ray towards each (inf: none).
        """
        H, W = self.height, self.width
        probes = tiles = None
        if probe_points is not None:
            p = np.asarray(probe_points, np.float64)
            probes = np.stack([p[:, 0] / p[:, 2], p[:, 1] / p[:, 2], np.ones(len(p))],
                              1).astype(np.float32)
            uv, _, _ = self.project(p)
            tiles = self.tile_of(uv)
        hits, dirs, origin = self.cast(prims, T_world_cam, probes, tiles)
        probe_depth = hits.t[H * W:].copy()
        hits = Hits(hits.t[:H * W], hits.obj[:H * W], hits.normal[:H * W], hits.local[:H * W])
        dirs = dirs[:H * W]
        t = hits.t
        hit = np.isfinite(t)
        labels = np.full(H * W, 255, np.uint8)
        depth = np.where(hit, t, 0).astype(np.float32)
        color = shade(scene, prims, hits, dirs, origin, labels)
        # Sensor: exposure and vignetting, gamma 2 (sqrt), noise.
        color *= self.vignette * np.float32(rng.uniform(0.85, 1.15))
        img = np.sqrt(np.clip(color, 0, 1, out=color), out=color)
        img *= 255.0
        img += 0.5
        if pixel_noise_std > 0:
            img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(pixel_noise_std)
        image = np.clip(img, 0, 255, out=img).astype(np.uint8).reshape(H, W, 3)
        uid = np.where(hit, GROUND_UID, SKY_UID)
        on_obj = hits.obj >= 0
        uid[on_obj] = prims.uid[hits.obj[on_obj]]
        return CameraRender(image, labels.reshape(H, W), depth.reshape(H, W), probe_depth,
                            uid.reshape(H, W))


def _hash(ix, iy, iz, seed: int) -> np.ndarray:
    """Integer lattice hash -> float32 in [0, 1)."""
    with np.errstate(over='ignore'):
        h = (ix.astype(np.int32).view(np.uint32) * np.uint32(73856093)) \
            ^ (iy.astype(np.int32).view(np.uint32) * np.uint32(19349663)) \
            ^ (iz.astype(np.int32).view(np.uint32) * np.uint32(83492791)) ^ np.uint32(seed)
        h = (h ^ (h >> np.uint32(13))) * np.uint32(1274126177)
        h ^= h >> np.uint32(16)
    return (h & np.uint32(0xFFFF)).astype(np.float32) * np.float32(1 / 65536.0)


def shade(scene: StreetScene, prims: Primitives, hits: Hits, dirs: np.ndarray,
          origin: np.ndarray, labels_out: np.ndarray) -> np.ndarray:
    """Linear RGB (R, 3) float32 of every ray; writes the ray's class into ``labels_out``."""
    t = hits.t
    hit = np.isfinite(t)
    color = np.empty((len(t), 3), np.float32)
    # 1. sky: a gradient with ray elevation and soft clouds.
    sky = ~hit
    if sky.any():
        d = dirs[sky]
        el = d[:, 2] / np.linalg.norm(d, axis=1)
        base = np.asarray(scene.palette['sky'], np.float32)
        cloud = 0.5 + 0.5 * np.sin(d[:, 0] / (np.abs(d[:, 2]) + 0.2) * 2.3
                                   + 1.7 * d[:, 1] / (np.abs(d[:, 2]) + 0.2))
        mix = np.clip(cloud * (1 - el) * 0.5, 0, 1)[:, None]
        color[sky] = (base * (0.8 + 0.4 * el[:, None])) * (1 - mix) + 0.9 * mix
    idx = np.nonzero(hit)[0]
    if not len(idx):
        return color
    p = origin + dirs[idx] * t[idx, None]                                        # world
    obj = hits.obj[idx]
    normal = hits.normal[idx]
    base = np.empty((len(idx), 3), np.float32)
    # 2. ground: road (asphalt, paint), sidewalk (tiles), terrain (grass and dirt).
    g = obj < 0
    gi = np.nonzero(g)[0]
    if len(gi):
        gx, gy = p[gi, 0], p[gi, 1]
        gl = scene.ground_labels(gx, gy)
        labels_out[idx[gi]] = gl
        pal = scene.palette
        fine = _hash(np.floor(gx * 7), np.floor(gy * 7), np.ones_like(gx), scene.hash_seed)
        gcol = np.empty((len(gi), 3), np.float32)
        m = gl == ROAD
        if m.any():
            road = np.asarray(pal['asphalt'], np.float32) * (0.85 + 0.3 * fine[m])[:, None]
            road[scene.road_marking(gx[m], gy[m])] = 0.85
            gcol[m] = road
        m = gl == SIDEWALK
        if m.any():
            tile = scene.tile_size
            x, y = gx[m], gy[m]
            cells = _hash(np.floor(x / tile), np.floor(y / tile), np.zeros_like(x),
                          scene.hash_seed)
            joints = np.minimum(np.mod(x, tile), np.mod(y, tile)) < 0.03
            gcol[m] = np.asarray(pal['sidewalk'], np.float32) * (
                0.85 + 0.25 * cells - 0.3 * joints)[:, None]
        m = gl == TERRAIN
        if m.any():
            x, y = gx[m], gy[m]
            patch = (0.5 + 0.5 * np.sin(x * 0.31 + 1.3 * np.sin(y * 0.23)) * np.sin(y * 0.41))
            patch = (patch * 0.6)[:, None]
            grass = (np.asarray(pal['grass'], np.float32) * (1 - patch)
                     + np.asarray(pal['dirt'], np.float32) * patch)
            gcol[m] = grass * (0.7 + 0.5 * fine[m])[:, None]
        base[gi] = gcol
        normal[gi] = (0.0, 0.0, 1.0)
    # 3. objects: per-object colors and procedural textures in the object's frame.
    oi = np.nonzero(~g)[0]
    if len(oi):
        o = obj[oi]
        labels_out[idx[oi]] = prims.label[o]
        c1, c2, tex = prims.color[o], prims.color2[o], prims.texture[o]
        loc = hits.local[idx[oi]]
        size = prims.size[o]
        col = c1.copy()
        cells = _hash(np.floor(loc[:, 0] * 2), np.floor(loc[:, 1] * 2),
                      np.floor(loc[:, 2] * 2) + o, scene.hash_seed)
        # Facades: windows on a floor grid, per-window brightness.
        m = tex == TEX_FACADE
        if m.any():
            lz = loc[m, 2] + size[m, 2]                          # height above the base
            on_x_face = np.abs(np.abs(loc[m, 0]) - size[m, 0]) < 1e-3
            along = np.where(on_x_face, loc[m, 1], loc[m, 0]) + size[m, 0]
            fz, fa = np.mod(lz, 3.1), np.mod(along, 2.7)
            window = (fz > 0.9) & (fz < 2.3) & (fa > 0.6) & (fa < 2.1) & (lz > 1.0)
            win_id = _hash(np.floor(lz / 3.1), np.floor(along / 2.7), o[m], scene.hash_seed)
            facade = c1[m] * (0.9 + 0.2 * cells[m])[:, None]
            glass = c2[m] * (0.6 + 1.2 * win_id)[:, None]
            col[m] = np.where(window[:, None], glass, facade)
        m = tex == TEX_CELLS
        if m.any():
            stripe = np.mod(loc[m, 0] + loc[m, 1] + loc[m, 2], 0.8) < 0.4
            col[m] = np.where(stripe[:, None], c2[m], c1[m]) * (0.85 + 0.3 * cells[m])[:, None]
        m = tex == TEX_FOLIAGE
        if m.any():
            leaf = _hash(np.floor(p[oi[m], 0] * 5), np.floor(p[oi[m], 1] * 5),
                         np.floor(p[oi[m], 2] * 5), scene.hash_seed + 1)
            col[m] = c1[m] * (0.5 + 0.9 * leaf)[:, None]
        m = tex == TEX_CLOTHES
        if m.any():
            col[m] = np.where((loc[m, 2] < -0.1 * size[m, 2])[:, None], c2[m], c1[m])
        m = tex == TEX_GLASS
        if m.any():
            win = loc[m, 2] > -0.3 * size[m, 2]
            refl = 0.5 + 0.5 * np.abs(np.sin(loc[m, 0] * 1.3 + loc[m, 1] * 0.7))
            col[m] = np.where(win[:, None], c2[m] * (1 + refl)[:, None], c1[m])
        base[oi] = col
    # 4. soft large-scale variation, Lambert shading with sun shadows and sky fill, haze.
    w = scene.waves[:4]
    ph = scene.wave_phase[:4]
    vary = 1 + 0.07 * np.sin(rows_times(p, w.T * 0.3) + ph).sum(1)
    sun = np.maximum(0, rows_times(normal, scene.sun[:, None])[:, 0])
    lit = np.nonzero((sun > 0) & (t[idx] < SHADOW_DEPTH_M))[0]
    if len(lit) and len(prims):
        sun[lit[in_shadow(prims, p[lit] + 0.02 * normal[lit], scene.sun)]] = 0.0
    light = scene.ambient * (0.75 + 0.25 * normal[:, 2]) + (1 - scene.ambient) * sun
    shaded = base * (vary * light)[:, None]
    haze = (1 - np.exp(-t[idx] / 400.0))[:, None]
    color[idx] = shaded * (1 - haze) + np.asarray(scene.palette['sky'], np.float32) * haze
    return color


def in_shadow(prims: Primitives, points: np.ndarray, sun: np.ndarray) -> np.ndarray:
    """(N,) bool: a solid lies between world ``points`` (N, 3) and the sun (unit ``sun``).

    Shadow rays are parallel, so solids are culled in the plane orthogonal to the sun: points
    sorted along one axis of that plane, each solid's projected box selects a slab of them.
    """
    sun = np.asarray(sun, np.float32)
    e1 = np.cross(sun, [0.0, 0.0, 1.0] if abs(sun[2]) < 0.9 else [1.0, 0.0, 0.0])
    e1 = (e1 / np.linalg.norm(e1)).astype(np.float32)
    e2 = np.cross(sun, e1).astype(np.float32)
    basis = np.stack([e1, e2, sun], 1)                                          # (3, 3)
    q = rows_times(points, basis)                                               # (N, 3)
    order = np.argsort(q[:, 0], kind='stable')
    a_sorted = q[order, 0]
    c = rows_times(prims.corners.reshape(-1, 3), basis).reshape(-1, 8, 3)
    lo_a, hi_a = c[..., 0].min(1), c[..., 0].max(1)
    lo_b, hi_b = c[..., 1].min(1), c[..., 1].max(1)
    top = c[..., 2].max(1)
    first = np.searchsorted(a_sorted, lo_a)
    last = np.searchsorted(a_sorted, hi_a, side='right')
    shadow = np.zeros(len(points), bool)
    ox, oy, oz = (np.ascontiguousarray(points[:, k]) for k in range(3))
    sx, sy, sz = (np.float32(v) for v in sun)
    for j in np.nonzero(last > first)[0]:
        cand = order[first[j]:last[j]]
        qb = q[cand, 1]
        cand = cand[(qb >= lo_b[j]) & (qb <= hi_b[j]) & (q[cand, 2] < top[j]) & ~shadow[cand]]
        if not len(cand):
            continue
        t = intersect_t(prims, int(j), (ox[cand], oy[cand], oz[cand]), sx, sy, sz)
        shadow[cand[np.isfinite(t)]] = True
    return shadow


def camera_pose(T_world_lidar: np.ndarray, calib: CameraCalibration) -> np.ndarray:
    """(4, 4) T_world_cam = T_world_lidar @ inv(T_cam_lidar)."""
    return T_world_lidar @ np.linalg.inv(calib.T_cam_lidar)


def nuscenes_like_rig(count: int, width: int, height: int, hfov_deg: float,
                      yaw_deg: tuple = (), distortion=(0, 0, 0, 0, 0), k1_jitter: float = 0.0,
                      mount_forward: float = 1.2, mount_side: float = 0.6,
                      mount_below: float = 0.35, pitch_deg: float = 2.0,
                      rng: np.random.Generator | None = None,
                      mount_right: float = 0.0) -> list[CameraCalibration]:
    """Cameras around the car on an ellipse, looking outwards (nuScenes layout for six), each
    moved ``mount_right`` metres to its own right; each camera's ``frame_id`` is its REP 103
    optical frame ``<name>_camera_optical_frame``."""
    rng = rng or np.random.default_rng(0)
    layout = [('front', 0.0), ('front_left', 55.0), ('front_right', -55.0),
              ('back_left', 110.0), ('back_right', -110.0), ('back', 180.0)]
    if yaw_deg:
        named = [(f'cam{i}', y) for i, y in enumerate(yaw_deg)]
    elif count <= len(layout):
        named = layout[:count]
    else:
        named = [(f'cam{i}', 360.0 * i / count) for i in range(count)]
    f = 0.5 * width / math.tan(math.radians(hfov_deg) / 2)
    pitch = math.radians(pitch_deg)
    cams = []
    for name, yaw in named:
        psi = math.radians(yaw)
        # 1. camera axes in the LiDAR frame: z forward (pitched down), x right, y down.
        z_axis = np.array([math.cos(psi) * math.cos(pitch), math.sin(psi) * math.cos(pitch),
                           -math.sin(pitch)])
        x_axis = np.array([math.sin(psi), -math.cos(psi), 0.0])
        y_axis = np.cross(z_axis, x_axis)
        T_lidar_cam = np.eye(4)
        T_lidar_cam[:3, :3] = np.stack([x_axis, y_axis, z_axis], 1)
        T_lidar_cam[:3, 3] = np.array([mount_forward * math.cos(psi),
                                       mount_side * math.sin(psi), -mount_below]) \
            + mount_right * x_axis
        K = np.array([[f * rng.uniform(0.99, 1.01), 0, (width - 1) / 2 + rng.uniform(-3, 3)],
                      [0, 0, (height - 1) / 2 + rng.uniform(-3, 3)], [0, 0, 1]])
        K[1, 1] = K[0, 0] * rng.uniform(0.995, 1.005)
        D = np.array(distortion, np.float64)
        D[0] += rng.uniform(-k1_jitter, k1_jitter)
        cams.append(CameraCalibration(name=name, width=width, height=height, K=K,
                                      T_cam_lidar=np.linalg.inv(T_lidar_cam),
                                      distortion_model='plumb_bob', D=D,
                                      frame_id=f'{name}_camera_optical_frame'))
    return cams

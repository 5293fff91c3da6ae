"""LiDAR point -> camera pixel correspondences for a whole rig at once.

:func:`compute_correspondences` is THE correspondence function: the collect node and the training
datasets both call it. It chains

1. optional motion compensation (:mod:`cmkd_ros.motion`): each point is moved from the LiDAR frame
   at its own capture time to the LiDAR frame at the camera's capture time,
2. :func:`project_points`: extrinsic, pinhole, distortion (OpenCV's ``plumb_bob``,
   ``rational_polynomial`` and fisheye ``equidistant`` models) for all cameras in one vectorized
   pass; a point is valid when its depth exceeds ``min_depth``, it lies inside the region where
   the camera's distortion function is monotonic (so far-off-axis points never fold back into the
   image) and it lands inside the image,
3. the occlusion test (:mod:`cmkd_ros.occlusion`): points hidden from a camera behind nearer
   points of the same sweep are removed; it reads the LiDAR's azimuth step and beam spacing
   from the sweep (ring field or elevation statistics) and the baseline from the calibration,
   so no setting depends on the sensor.

Measured on the synthetic world (``benchmarks/measure_occlusion.py``, every LiDAR preset,
baselines 0.3 to 1.5 m): docs/occlusion.md; motion compensation lowers the mean pixel error
from about 5 px to 0.02 px (``benchmarks/measure_correspondence.py``).

Pixel convention (OpenCV): x right, y down, pixel centres at integers, so the image covers
``[-0.5, W - 0.5) x [-0.5, H - 0.5)`` and ``round(uv)`` indexes the pixel.

Correspondences stored with a pair (the collect node's) carry
:func:`correspondence_settings_hash` of the settings they were computed with; training uses
them instead of computing them again only when its own settings give the same hash.
"""
from __future__ import annotations

import collections
import hashlib
import json
import math
import threading
from dataclasses import dataclass

import numpy as np

from cmkd_ros.calibration import CameraCalibration, RigCalibration
from cmkd_ros.config import ConfigError, build, setting, to_dict
from cmkd_ros.occlusion import (OcclusionSettings, ScanPattern, ScanPatternError, hidden_pairs,
                                infer_scan_pattern, not_ghosts, sweep_footprints,
                                with_overrides)


# Points per projection chunk and per matrix product (see _project_chunks).
_CHUNK = 4096
_GEMM_CHUNK = 4096


MAX_OCCLUSION_RANGE_M = 1e5   # no LiDAR return is this far; beyond it a point is corrupt

class ProjectionError(ValueError):
    """Bad input to the projection functions (shapes, stamps, missing trajectory data)."""


@dataclass(frozen=True)
class CorrespondenceConfig:
    """How LiDAR points are matched to camera pixels."""

    min_depth: float = setting(0.1, 'minimum depth along the optical axis (m) of a valid point',
                               gt=0.0)
    max_ray_angle_deg: float = setting(
        89.0, 'largest angle (deg) between a ray and the optical axis that may be valid; the '
        'monotonic region of the distortion model limits it further', gt=0.0, lt=90.0)
    occlusion: bool = setting(True, 'drop points hidden behind nearer points of the sweep '
                              '(a z-buffer test that reads the LiDAR scan pattern from the sweep)')
    occlusion_footprint: float = setting(
        OcclusionSettings.footprint, 'fraction of the sampling step (azimuth step, beam spacing '
        'there) that each point covers on every side in the occlusion z-buffer; larger hides '
        'more', gt=0.0, le=2.0)
    occlusion_reach: float = setting(
        OcclusionSettings.reach, 'a point with nearer footprints on both sides within this '
        'fraction of its sampling step is hidden too (holes left by lost returns)', ge=0.0,
        le=4.0)
    occlusion_azimuth_step_deg: float = setting(
        0.0, 'expert override: the LiDAR azimuth step (deg); 0 = measured on each sweep',
        ge=0.0, le=10.0)
    occlusion_beam_spacing_deg: float = setting(
        0.0, 'expert override: one beam spacing (deg) for every beam; 0 = from the ring field, '
        'else from the sweep\'s elevation statistics', ge=0.0, le=10.0)
    occlusion_abs_tolerance: float = setting(
        OcclusionSettings.abs_tolerance, 'a point is hidden when it is this much (m) plus the '
        'relative part farther from the camera than the nearer points', ge=0.0)
    occlusion_rel_tolerance: float = setting(
        OcclusionSettings.rel_tolerance, 'distance-proportional part of the occlusion tolerance '
        '(fraction of the camera distance)', ge=0.0, le=1.0)
    occlusion_plane_abs_tolerance: float = setting(
        OcclusionSettings.plane_abs_tolerance, 'a point nearly as near as the nearest footprint '
        'over it is hidden when it lies this much (m) plus the relative part behind that '
        'footprint\'s surface plane (and as much farther from the camera)', ge=0.0)
    occlusion_plane_rel_tolerance: float = setting(
        OcclusionSettings.plane_rel_tolerance, 'distance-proportional part of the plane '
        'tolerance (fraction of the camera distance)', ge=0.0, le=1.0)
    occlusion_previous_sweep: bool = setting(
        True, 'the previous sweep, where given with ego poses that reach it, adds occluders '
        'to the occlusion test (the LiDAR moved: it sampled the edges elsewhere); points of it '
        'the current sweep sees past (moving objects) are left out')
    motion_compensation: bool = setting(
        True, 'move points to the LiDAR pose at each camera capture time when ego poses and '
        'stamps are given')
    time_resolution_ns: int = setting(
        100_000, 'point times are rounded to this step (ns) when ego poses are interpolated',
        ge=1)

    def validate(self) -> None:
        if self.occlusion_abs_tolerance == 0 and self.occlusion_rel_tolerance == 0 and \
                self.occlusion:
            raise ConfigError('occlusion tolerances are both 0: every point behind another '
                              'one within a footprint would be hidden')


@dataclass(frozen=True)
class PreviousSweep:
    """The sweep before the one matched, as the LiDAR measured it: ``xyz`` (N, 3) LiDAR frame,
    ``point_time_ns`` (N,) int64 or one int, ``ring`` (N,) if known. With ego poses that reach
    back to it, its points add occluders to the occlusion test."""

    xyz: np.ndarray
    point_time_ns: np.ndarray | int
    ring: np.ndarray | None = None


# Bump when compute_correspondences gives other results for the same settings: correspondences
# stored by an older version then no longer match, and training computes them again.
CORRESPONDENCE_VERSION = 1


def correspondence_settings_hash(config: CorrespondenceConfig) -> str:
    """16 hex digits naming ``config`` and :data:`CORRESPONDENCE_VERSION`: stored with
    correspondences in a pair, compared by the training datasets before they reuse them."""
    values = to_dict(build(CorrespondenceConfig, to_dict(config)))   # 1 and 1.0 alike
    text = json.dumps({'version': CORRESPONDENCE_VERSION, **values}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Correspondences:
    """Flat arrays over valid (point, camera) pairs, ordered by camera then point.

    ``point`` (M,) int64 index into the input cloud, ``camera`` (M,) int64 index into the rig,
    ``uv`` (M, 2) float32 pixels (OpenCV convention), ``depth`` (M,) float32 metres along the
    camera's optical axis; ``scan_pattern`` the LiDAR scan pattern the occlusion test used;
    ``previous_occluders`` how many points of a previous sweep served it as occluders.
    """

    point: np.ndarray
    camera: np.ndarray
    uv: np.ndarray
    depth: np.ndarray
    num_points: int
    camera_names: tuple[str, ...]
    scan_pattern: ScanPattern | None = None
    previous_occluders: int = 0

    def __len__(self) -> int:
        return int(self.point.shape[0])

    def for_camera(self, camera: int | str) -> 'Correspondences':
        """The pairs of one camera (by index or name)."""
        c = self.camera_names.index(camera) if isinstance(camera, str) else int(camera)
        sel = self.camera == c
        return Correspondences(self.point[sel], self.camera[sel], self.uv[sel], self.depth[sel],
                               self.num_points, self.camera_names, self.scan_pattern,
                               self.previous_occluders)

    def point_mask(self) -> np.ndarray:
        """(N,) bool: the point has at least one camera."""
        mask = np.zeros(self.num_points, dtype=bool)
        mask[self.point] = True
        return mask

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The pair-file keys ``corr_point``, ``corr_camera``, ``corr_uv``, ``corr_depth``."""
        return {'corr_point': self.point, 'corr_camera': self.camera, 'corr_uv': self.uv,
                'corr_depth': self.depth}


# ----------------------------------------------------------------------------- distortion


def _radial_plumb(r2: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Radial factor of plumb_bob / rational_polynomial; ``k`` = (k1, k2, k3, k4, k5, k6)."""
    num = 1 + r2 * (k[0] + r2 * (k[1] + r2 * k[2]))
    den = 1 + r2 * (k[3] + r2 * (k[4] + r2 * k[5]))
    return num / den


def monotonic_limit(cam: CameraCalibration, max_ray_angle_deg: float = 89.0) -> float:
    """Largest undistorted radius ``r = |(x/z, y/z)|`` where the model is still valid.

    The distorted radius must grow with ``r`` (beyond the first turning point the polynomial
    folds back and far-off-axis points would land inside the image); the rational denominator
    must stay positive; and the ray angle must stay below ``max_ray_angle_deg``.
    """
    r_cap = math.tan(math.radians(max_ray_angle_deg))
    model = cam.distortion_model
    if model == 'none' or not np.any(cam.D):
        return r_cap
    if model == 'equidistant':
        k = np.asarray(cam.D, dtype=np.float64)
        theta = np.linspace(0.0, math.atan(r_cap), 200_001)
        t2 = theta * theta
        theta_d = theta * (1 + t2 * (k[0] + t2 * (k[1] + t2 * (k[2] + t2 * k[3]))))
        bad = np.flatnonzero(np.diff(theta_d) <= 0)
        return r_cap if bad.size == 0 else math.tan(theta[bad[0]])
    D = np.zeros(8)
    D[:cam.D.size] = cam.D
    k = np.array([D[0], D[1], D[4], D[5], D[6], D[7]])
    # r sampled densely up to the cap (log-spaced tail keeps huge caps affordable)
    r = np.unique(np.concatenate([np.linspace(0.0, min(r_cap, 4.0), 200_001),
                                  np.geomspace(4.0, max(r_cap, 4.0), 20_001)]))
    r = r[r <= r_cap]
    r2 = r * r
    den = 1 + r2 * (k[3] + r2 * (k[4] + r2 * k[5]))
    rd = r * _radial_plumb(r2, k)
    bad = np.flatnonzero((np.diff(rd) <= 0) | (den[1:] <= 0))
    return r_cap if bad.size == 0 else float(r[bad[0]])


@dataclass(frozen=True, eq=False)
class PreparedRig:
    """Stacked float32 camera arrays of a rig for vectorized projection (C cameras)."""

    names: tuple[str, ...]
    R: np.ndarray            # (C, 3, 3) float64 rotation of T_cam_lidar
    t: np.ndarray            # (C, 3) float64 translation of T_cam_lidar
    K: np.ndarray            # (C, 5) float32 fx, fy, cx, cy, skew
    size: np.ndarray         # (C, 2) float32 width, height
    r2_max: np.ndarray       # (C,) float32 squared monotonic-limit radius
    groups: tuple            # ((model, camera indices (Cg,), coefficients (Cg, 8) f32), ...)
    time_offset_ns: np.ndarray   # (C,) int64


_PREPARED: 'collections.OrderedDict[tuple, PreparedRig]' = collections.OrderedDict()
_PREPARED_MAX = 64
_PREPARED_LOCK = threading.Lock()


def _rig_key(rig: RigCalibration, max_ray_angle_deg: float) -> tuple:
    return (float(max_ray_angle_deg),) + tuple(
        (c.name, int(c.width), int(c.height), c.distortion_model, c.K.tobytes(), c.D.tobytes(),
         c.T_cam_lidar.tobytes(), int(c.time_offset_ns)) for c in rig.cameras)


def prepare_rig(rig: RigCalibration, max_ray_angle_deg: float = 89.0) -> PreparedRig:
    """Stack a rig's cameras into arrays.

    Cached by calibration content (a node rebuilding an equal rig per message pays nothing).
    """
    if not isinstance(rig, RigCalibration):
        raise ProjectionError(f'expected a RigCalibration, got {type(rig).__name__}')
    if len(rig) == 0:
        raise ProjectionError('the rig has no cameras')
    key = _rig_key(rig, max_ray_angle_deg)
    with _PREPARED_LOCK:
        if key in _PREPARED:
            _PREPARED.move_to_end(key)
            return _PREPARED[key]
    cams = rig.cameras
    T = np.stack([c.T_cam_lidar for c in cams])
    K = np.array([[c.K[0, 0], c.K[1, 1], c.K[0, 2], c.K[1, 2], c.K[0, 1]] for c in cams],
                 dtype=np.float32)
    size = np.array([[c.width, c.height] for c in cams], dtype=np.float32)
    r_max = np.array([monotonic_limit(c, max_ray_angle_deg) for c in cams])
    by_model: dict[str, list[int]] = {}
    for i, c in enumerate(cams):
        model = 'none' if not np.any(c.D) else c.distortion_model
        model = 'plumb_bob' if model == 'rational_polynomial' else model
        by_model.setdefault(model, []).append(i)
    groups = []
    for model, idx in by_model.items():
        coeffs = np.zeros((len(idx), 8), dtype=np.float32)
        for row, i in enumerate(idx):
            coeffs[row, :cams[i].D.size] = cams[i].D
        groups.append((model, np.array(idx, dtype=np.int64), coeffs))
    prepared = PreparedRig(tuple(rig.names), T[:, :3, :3].copy(), T[:, :3, 3].copy(), K, size,
                           (r_max * r_max).astype(np.float32), tuple(groups),
                           np.array([c.time_offset_ns for c in cams], dtype=np.int64))
    with _PREPARED_LOCK:
        _PREPARED[key] = prepared
        while len(_PREPARED) > _PREPARED_MAX:
            _PREPARED.popitem(last=False)
    return prepared


def _distort(x: np.ndarray, y: np.ndarray, model: str, coeffs: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """Distorted normalized coordinates; ``x``, ``y`` (Cg, N), ``coeffs`` (Cg, 8) float32."""
    if model == 'none':
        return x, y
    k = [coeffs[:, i:i + 1] for i in range(8)]
    r2 = x * x + y * y
    if model == 'equidistant':
        # theta_d = theta (1 + k1 theta^2 + k2 theta^4 + k3 theta^6 + k4 theta^8), scale = td / r
        r = np.sqrt(r2)
        theta = np.arctan(r)
        t2 = theta * theta
        theta_d = theta * (1 + t2 * (k[0] + t2 * (k[1] + t2 * (k[2] + t2 * k[3]))))
        scale = np.where(r > 1e-8, theta_d / np.maximum(r, 1e-8), np.float32(1.0))
        return x * scale, y * scale
    # plumb_bob / rational_polynomial: D = k1 k2 p1 p2 k3 [k4 k5 k6]
    k1, k2, p1, p2, k3, k4, k5, k6 = k
    radial = (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))
    xy2 = 2 * x * y
    xd = x * radial + p1 * xy2 + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + p2 * xy2
    return xd, yd


# ----------------------------------------------------------------------------- projection


def _as_points(xyz: np.ndarray, num_cameras: int) -> np.ndarray:
    xyz = np.asarray(xyz)
    if not ((xyz.ndim == 2 and xyz.shape[1] == 3) or
            (xyz.ndim == 3 and xyz.shape[0] == num_cameras and xyz.shape[2] == 3)):
        raise ProjectionError(f'points must be (N, 3) or (C={num_cameras}, N, 3), got '
                              f'{xyz.shape}')
    return xyz.astype(np.float32, copy=False)


def project_points(xyz: np.ndarray, rig: RigCalibration | PreparedRig, *,
                   min_depth: float = 0.1, max_ray_angle_deg: float = 89.0,
                   T_extra: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project points into every camera of the rig at once.

    ``xyz``: (N, 3) LiDAR frame, or (C, N, 3) one cloud per camera. ``T_extra`` (C, 4, 4) maps
    the given points into the frame ``T_cam_lidar`` expects (motion compensation), optional.
    Returns ``uv`` (C, N, 2) float32 pixels (NaN where the depth or the distortion region
    rules the point out; outside-image pixels are kept), ``depth`` (C, N) float32 metres along
    the optical axis and ``valid`` (C, N) bool: depth > ``min_depth``, inside the monotonic
    distortion region and inside the image. No occlusion test here.
    """
    prep = rig if isinstance(rig, PreparedRig) else prepare_rig(rig, max_ray_angle_deg)
    u, v, depth, valid = _project(xyz, prep, min_depth, T_extra)
    uv = np.empty(u.shape + (2,), dtype=np.float32)
    uv[..., 0] = u
    uv[..., 1] = v
    return uv, depth, valid


def _project_chunks(xyz: np.ndarray, prep: PreparedRig, min_depth: float,
                    T_extra: np.ndarray | None):
    """Yield ``(start, u, v, depth, valid)``, each (C, n), for consecutive chunks of points.

    Chunks of points keep the temporaries in the CPU cache and reuse the same heap memory
    (fresh pages from the OS cost more than the arithmetic here); matrix products of at most
    ``_GEMM_CHUNK`` points keep OpenBLAS single-threaded (its worker threads stall for whole
    scheduler slices on a busy CPU: measured 30 ms instead of 0.15 ms).
    """
    C = len(prep.names)
    pts = _as_points(xyz, C)
    R, t = prep.R, prep.t
    if T_extra is not None:
        T_extra = np.asarray(T_extra, dtype=np.float64)
        if T_extra.shape != (C, 4, 4):
            raise ProjectionError(f'T_extra must be (C={C}, 4, 4), got {T_extra.shape}')
        t = np.einsum('cij,cj->ci', R, T_extra[:, :3, 3]) + t
        R = R @ T_extra[:, :3, :3]
    # rows of M: X of every camera, then Y, then Z
    M = np.ascontiguousarray(R.transpose(1, 0, 2).reshape(3 * C, 3), dtype=np.float32)
    t_rows = t.T.reshape(3 * C, 1).astype(np.float32)
    R32 = R.astype(np.float32)
    K, size, r2_max = prep.K, prep.size, prep.r2_max[:, None]
    skew = bool(np.any(K[:, 4]))
    N = pts.shape[-2]
    for start in range(0, N, _CHUNK):
        stop = min(start + _CHUNK, N)
        # 1. LiDAR frame -> camera optical frames, (3C, 3) @ (3, n) products.
        if pts.ndim == 2:
            p_cam = np.empty((3 * C, stop - start), dtype=np.float32)
            for g in range(start, stop, _GEMM_CHUNK):
                h = min(g + _GEMM_CHUNK, stop)
                np.matmul(M, pts[g:h].T, out=p_cam[:, g - start:h - start])
        else:
            p_cam = np.matmul(R32, pts[:, start:stop].transpose(0, 2, 1))
            p_cam = np.ascontiguousarray(p_cam.transpose(1, 0, 2)).reshape(3 * C, stop - start)
        p_cam += t_rows
        X, Y, depth = p_cam[:C], p_cam[C:2 * C], p_cam[2 * C:]
        with np.errstate(invalid='ignore', divide='ignore', over='ignore'):
            # 2. pinhole normalization; depth <= min_depth (or NaN) gives NaN from here on
            #    (coordinates so large that x * x overflows give inf, then NaN in step 3).
            inv_z = np.where(depth > np.float32(min_depth), depth, np.float32(np.nan))
            np.divide(np.float32(1.0), inv_z, out=inv_z)
            x = X * inv_z
            y = Y * inv_z
            # 3. outside the monotonic region of the distortion function: NaN as well.
            r2 = x * x
            r2 += y * y
            beyond = r2 >= r2_max
            if beyond.any():
                x[beyond] = np.nan
                y[beyond] = np.nan
            # 4. distortion, one vectorized pass per model group.
            if len(prep.groups) == 1:
                model, _, coeffs = prep.groups[0]
                xd, yd = _distort(x, y, model, coeffs)
            else:
                xd, yd = np.empty_like(x), np.empty_like(y)
                for model, idx, coeffs in prep.groups:
                    xd[idx], yd[idx] = _distort(x[idx], y[idx], model, coeffs)
            # 5. intrinsics: u = fx xd + s yd + cx, v = fy yd + cy.
            u = K[:, 0:1] * xd
            if skew:
                u += K[:, 4:5] * yd
            u += K[:, 2:3]
            v = K[:, 1:2] * yd
            v += K[:, 3:4]
            # 6. inside the image (pixel centres at integers); NaN compares False.
            valid = u >= -0.5
            valid &= u < size[:, 0:1] - 0.5
            valid &= v >= -0.5
            valid &= v < size[:, 1:2] - 0.5
        yield start, u, v, depth, valid


def _project(xyz: np.ndarray, prep: PreparedRig, min_depth: float,
             T_extra: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Dense ``u``, ``v``, ``depth`` (C, N) float32 and ``valid`` (C, N) bool."""
    C, N = len(prep.names), np.asarray(xyz).shape[-2]
    u = np.empty((C, N), dtype=np.float32)
    v, depth = np.empty_like(u), np.empty_like(u)
    valid = np.empty((C, N), dtype=bool)
    for start, uc, vc, dc, ok in _project_chunks(xyz, prep, min_depth, T_extra):
        stop = start + uc.shape[1]
        u[:, start:stop], v[:, start:stop] = uc, vc
        depth[:, start:stop], valid[:, start:stop] = dc, ok
    return u, v, depth, valid


def _project_valid(xyz: np.ndarray, prep: PreparedRig, min_depth: float,
                   T_extra: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Only the valid pairs, camera-major: ``camera``, ``point`` (M,) int64, ``u``, ``v``,
    ``depth`` (M,) float32 (no dense (C, N) array is ever built)."""
    parts = []
    for start, uc, vc, dc, ok in _project_chunks(xyz, prep, min_depth, T_extra):
        flat = np.flatnonzero(ok)
        n = ok.shape[1]
        parts.append((flat // n, flat % n + start, uc.reshape(-1)[flat], vc.reshape(-1)[flat],
                      dc.reshape(-1)[flat]))
    if not parts:
        empty_i, empty_f = np.zeros(0, np.int64), np.zeros(0, np.float32)
        return empty_i, empty_i, empty_f, empty_f, empty_f
    cam, point, u, v, d = (np.concatenate(col) for col in zip(*parts))
    order = np.argsort(cam, kind='stable')         # chunks are in point order already
    return cam[order], point[order], u[order], v[order], d[order]


# ----------------------------------------------------------------------------- the contract


def camera_capture_ns(rig: RigCalibration, camera_stamp_ns: np.ndarray) -> np.ndarray:
    """(C,) int64 true capture times: header stamps plus each camera's ``time_offset_ns``."""
    stamps = np.asarray(camera_stamp_ns, dtype=np.int64).reshape(-1)
    if stamps.shape[0] != len(rig):
        raise ProjectionError(f'camera_stamp_ns has {stamps.shape[0]} stamps for '
                              f'{len(rig)} cameras')
    return stamps + np.array([c.time_offset_ns for c in rig.cameras], dtype=np.int64)


def compute_correspondences(xyz: np.ndarray, rig: RigCalibration, *,
                            point_time_ns: np.ndarray | int | None = None,
                            camera_stamp_ns: np.ndarray | None = None,
                            trajectory=None, ring: np.ndarray | None = None,
                            scan_pattern: ScanPattern | None = None,
                            previous: PreviousSweep | None = None,
                            config: CorrespondenceConfig = CorrespondenceConfig()
                            ) -> Correspondences:
    """Valid, visible (point, camera) pairs of a LiDAR sweep and a camera rig.

    ``xyz`` (N, 3) LiDAR frame as measured (non-finite rows are never valid). With
    ``trajectory`` (a :class:`cmkd_ros.motion.PoseTrajectory` of ``T_world_lidar``),
    ``point_time_ns`` ((N,) int64 absolute capture times, or one int for the whole sweep) and
    ``camera_stamp_ns`` ((C,) header stamps; each camera's ``time_offset_ns`` is added) and
    ``config.motion_compensation``, every point is first moved to the LiDAR frame at its
    camera's capture time. The occlusion test reads the LiDAR's scan pattern from the sweep
    (``ring`` (N,), the driver's beam index, makes it exact) unless ``scan_pattern`` is given
    (see :func:`resolve_scan_pattern`); the result carries the pattern it used. ``previous``
    (the sweep before, :class:`PreviousSweep`) adds occluders when the trajectory reaches back
    to it and ``config.occlusion_previous_sweep`` (else it is not used).
    """
    prep = prepare_rig(rig, config.max_ray_angle_deg)
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ProjectionError(f'xyz must be (N, 3), got {xyz.shape}')
    if ring is not None and np.asarray(ring).shape != (xyz.shape[0],):
        raise ProjectionError(f'ring must be ({xyz.shape[0]},), got {np.asarray(ring).shape}')
    pts = xyz.astype(np.float32, copy=False)
    T_extra = capture = None
    if trajectory is not None and config.motion_compensation:
        if point_time_ns is None or camera_stamp_ns is None:
            raise ProjectionError('motion compensation needs point_time_ns and camera_stamp_ns '
                                  'together with the trajectory')
        from cmkd_ros.motion import compensation_transforms
        capture = camera_capture_ns(rig, camera_stamp_ns)
        pts, T_extra = compensation_transforms(pts, point_time_ns, capture, trajectory,
                                               time_resolution_ns=config.time_resolution_ns)
    cam_idx, point, u_sel, v_sel, d_sel = _project_valid(pts, prep, config.min_depth, T_extra)
    N = xyz.shape[0]
    pattern = None
    extra = None
    if config.occlusion and point.size:
        pattern = resolve_scan_pattern(xyz, ring, scan_pattern, config)
        if previous is not None and config.occlusion_previous_sweep and T_extra is not None:
            extra = _previous_occluders(previous, pts, capture, trajectory, T_extra, prep,
                                        pattern, config)
        keep = ~_occluded(xyz, pts, T_extra, cam_idx, point, prep, ring, pattern, config,
                          extra)
        cam_idx, point, u_sel, v_sel, d_sel = (cam_idx[keep], point[keep], u_sel[keep],
                                               v_sel[keep], d_sel[keep])
    uv = np.empty((point.size, 2), dtype=np.float32)
    uv[:, 0] = u_sel
    uv[:, 1] = v_sel
    return Correspondences(point=point.astype(np.int64), camera=cam_idx.astype(np.int64),
                           uv=uv, depth=d_sel, num_points=int(N), camera_names=prep.names,
                           scan_pattern=pattern,
                           previous_occluders=0 if extra is None else int(extra[4]))


def resolve_scan_pattern(xyz: np.ndarray, ring: np.ndarray | None = None,
                         scan_pattern: ScanPattern | None = None,
                         config: CorrespondenceConfig = CorrespondenceConfig()) -> ScanPattern:
    """The scan pattern the occlusion test uses: ``scan_pattern`` when given (e.g. inferred
    once by a node), else read from the sweep ``xyz`` (N, 3) and ``ring`` (N,) (see
    :func:`cmkd_ros.occlusion.infer_scan_pattern`); the config's expert overrides replace the
    azimuth step and the beam spacing when set."""
    step, spacing = config.occlusion_azimuth_step_deg, config.occlusion_beam_spacing_deg
    try:
        if scan_pattern is None and not (step > 0 and spacing > 0):
            scan_pattern = infer_scan_pattern(xyz, ring)
        return with_overrides(scan_pattern, step, spacing)
    except ScanPatternError as exc:
        raise ProjectionError(f'occlusion test: {exc}; set occlusion_azimuth_step_deg and '
                              'occlusion_beam_spacing_deg, or occlusion=false') from None


def _camera_directions(p: np.ndarray, cam_idx: np.ndarray, T_extra: np.ndarray | None,
                       prep: PreparedRig) -> np.ndarray:
    """(M, 3) camera centre -> point in the LiDAR's axes of points ``p`` (M, 3) of the
    reference frame: moved to the LiDAR frame at each camera's capture time (motion
    compensation), minus the camera centres."""
    if T_extra is not None:
        Tx = np.asarray(T_extra, np.float32)
        p = np.einsum('mij,mj->mi', Tx[cam_idx, :3, :3], p) + Tx[cam_idx, :3, 3]
    centre = -np.einsum('cji,cj->ci', prep.R, prep.t).astype(np.float32)    # LiDAR frame
    return p - centre[cam_idx]


def _previous_occluders(previous: PreviousSweep, pts: np.ndarray, capture: np.ndarray,
                        trajectory, T_extra: np.ndarray, prep: PreparedRig,
                        pattern: ScanPattern, config: CorrespondenceConfig) -> tuple | None:
    """The previous sweep's points as occluders of the cameras that see them: (camera (K,),
    camera centre -> point (K, 3), footprint offsets (4, K, 3), which edges reach towards a
    neighbour on the point's surface (4, K), how many points); None when
    the trajectory does not reach back to it. ``pts`` the current sweep in the reference
    frame."""
    from cmkd_ros.motion import MotionError, compensation_transforms
    xyz = np.asarray(previous.xyz, dtype=np.float32)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ProjectionError(f'previous xyz must be (N, 3), got {xyz.shape}')
    times = np.asarray(previous.point_time_ns)
    ring = None if previous.ring is None else np.asarray(previous.ring).reshape(-1)
    if (times.ndim and times.shape != (len(xyz),)) or (ring is not None and
                                                        ring.shape != (len(xyz),)):
        raise ProjectionError('the previous sweep\'s point_time_ns and ring must have one '
                              'entry per point')
    finite = np.flatnonzero(np.isfinite(xyz).all(axis=1) &
                            (np.abs(xyz) < MAX_OCCLUSION_RANGE_M).all(axis=1))
    if finite.size == 0:
        return None
    xyz = xyz[finite]
    ring = None if ring is None else ring[finite]
    try:
        ref, _ = compensation_transforms(xyz, times[finite] if times.ndim else int(times),
                                         capture, trajectory,
                                         time_resolution_ns=config.time_resolution_ns)
    except MotionError:
        return None
    # the points the current sweep does not see past, near its edges; those in some view
    used = np.flatnonzero(not_ghosts(pts[np.isfinite(pts).all(axis=1)], ref, pattern,
                                     edges_only=True))
    cam, pick, *_ = _project_valid(ref[used], prep, config.min_depth, T_extra)
    seen, pick = np.unique(pick, return_inverse=True)        # footprints of those only
    offsets, towards = sweep_footprints(xyz, used[seen], pattern, ring)
    direction = _camera_directions(ref[used[seen]][pick], cam, T_extra, prep)
    return cam, direction, offsets[:, pick], towards[:, pick], int(seen.size)


def _occluded(xyz: np.ndarray, pts: np.ndarray, T_extra: np.ndarray | None,
              cam_idx: np.ndarray, point: np.ndarray, prep: PreparedRig,
              ring: np.ndarray | None, pattern: ScanPattern,
              config: CorrespondenceConfig, extra: tuple | None = None) -> np.ndarray:
    """(M,) bool occlusion test of the valid pairs (see :mod:`cmkd_ros.occlusion`), with the
    previous sweep's occluders ``extra`` (:func:`_previous_occluders`) if any."""
    # 1. the points where the cameras see them
    direction = _camera_directions(pts[point], cam_idx, T_extra, prep)
    # 2. optical axes in the LiDAR frame: third row of R (camera from LiDAR rotation).
    forward = np.arctan2(prep.R[:, 2, 1], prep.R[:, 2, 0])
    settings = OcclusionSettings(config.occlusion_footprint, config.occlusion_reach,
                                 config.occlusion_abs_tolerance, config.occlusion_rel_tolerance,
                                 config.occlusion_plane_abs_tolerance,
                                 config.occlusion_plane_rel_tolerance)
    # 3. pairs farther than any LiDAR reaches (a corrupt cloud: coordinates near the float32
    #    limit) neither hide nor are hidden: their angles would overflow.
    sane = (np.abs(direction) < MAX_OCCLUSION_RANGE_M).all(axis=1)
    hidden = np.zeros(len(point), dtype=bool)
    previous = None if extra is None or not len(extra[0]) else extra[:4]
    if sane.any():
        with np.errstate(over='ignore', invalid='ignore'):
            hidden[sane] = hidden_pairs(cam_idx[sane], point[sane], xyz, direction[sane],
                                        forward, pattern, ring, settings, previous)
    return hidden

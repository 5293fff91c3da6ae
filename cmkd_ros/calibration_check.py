"""How well a LiDAR-camera calibration fits the data, and targetless refinement of it.

The measure is edge alignment: points where the LiDAR range jumps (object silhouettes, seen as
a foreground return next to a far one or to no return along the same beam) must land on image
edges. Image edges are the gradient magnitude of the gray image, spread by a decaying maximum
filter (an inverse distance transform) so that a point a few pixels off still scores and the
score rises smoothly towards alignment. The score of a calibration is the weighted mean edge
strength under its projected silhouette points, over every frame given.

* :func:`edge_points` and :func:`edge_map` prepare one sweep and one image;
  :class:`CameraFrames` holds a camera's prepared frames (motion compensated when the frame has
  point times, camera stamps and ego poses).
* :func:`refine` searches the extrinsic (rotation, optionally translation) that maximizes the
  score, coarse to fine, and reports whether the optimum is constrained by the data.
* :func:`check_alignment` is the health metric: a rotation-only search around the current
  calibration; the rotation it finds is the misalignment the data points to (degrees), and the
  score gain tells how much better the aligned projection fits.

ROS-free; ``cmkd calibrate`` (:mod:`cmkd_ros.tools.calibrate`) and the collect node call it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from cmkd_ros.calibration import CameraCalibration, RigCalibration
from cmkd_ros.motion import invert, matrix_to_rotvec, rotvec_to_matrix
from cmkd_ros.projection import prepare_rig, project_points

MIN_RANGE_M = 1.0            # returns nearer than this (the car itself) are ignored
MIN_EDGE_POINTS = 150
# Jump credited to a return with no neighbour beside it (sky, or a dropout: real LiDARs miss
# dark and shiny surfaces, so a missing return is weaker evidence than a measured jump).
MISSING_JUMP_M = 10.0
CONTRAST = 1.0
# Pixel scales of the search, coarse to fine (edge spread of the inverse distance transform).
SCALES_PX = (16.0, 8.0, 4.0, 2.0, 1.0)


class AlignmentError(ValueError):
    """The inputs cannot be scored (no points in view, an empty cloud, no image structure)."""


def _beam_index(xyz: np.ndarray, ring: np.ndarray | None) -> np.ndarray:
    """(N,) beam of each point: the ring field, else the beam row read from the elevations."""
    if ring is not None:
        return np.asarray(ring).reshape(-1).astype(np.int64)
    from cmkd_ros.occlusion import ScanPatternError, infer_scan_pattern
    elevation = np.arctan2(xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1]))
    try:
        pattern = infer_scan_pattern(xyz)
        return pattern.beams_at(elevation)[2]
    except ScanPatternError:
        return np.floor(np.degrees(elevation) / 0.4).astype(np.int64)


def edge_points(xyz: np.ndarray, ring: np.ndarray | None = None, *,
                min_jump_m: float = 0.5, relative_jump: float = 0.08,
                missing_jump_m: float = MISSING_JUMP_M) -> tuple[np.ndarray, np.ndarray]:
    """Silhouette points of a sweep: (M, 3) float32 positions and (M,) float32 weights.

    A return is on a silhouette when the next return along its beam (within three azimuth
    steps), or the nearest return of the beam above or below, is farther by more than
    ``max(min_jump_m, relative_jump * range)``, or missing (sky, beyond range). Across beams the
    step must also be three times the step to the other side: on the road itself the range
    grows from beam to beam. The object's true outline lies between the two beams, so each
    point is moved half the angle towards its far neighbour (without this, tops of objects
    sit half a beam spacing low: a bias of about half a degree on a 32-beam LiDAR). Weight:
    the square root of the range jump (capped at 10 m, reached by a missing neighbour).
    """
    xyz = np.asarray(xyz, dtype=np.float32)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise AlignmentError(f'xyz must be (N, 3), got {xyz.shape}')
    rng = np.linalg.norm(xyz, axis=1)
    keep = np.flatnonzero(np.isfinite(rng) & (rng > MIN_RANGE_M))
    if keep.size < 100:
        raise AlignmentError(f'{keep.size} usable points in the sweep: too few to find edges')
    beam = _beam_index(xyz[keep], None if ring is None else np.asarray(ring).reshape(-1)[keep])
    p = xyz[keep].astype(np.float64)
    azimuth = np.arctan2(p[:, 1], p[:, 0])
    order = np.lexsort((azimuth, beam))
    b, a, r = beam[order], azimuth[order], rng[keep][order].astype(np.float64)
    el = np.arcsin(np.clip(p[order, 2] / r, -1.0, 1.0))
    same = b[1:] == b[:-1]
    gap = np.where(same, a[1:] - a[:-1], np.inf)
    step = float(np.median(gap[same & (gap > 0)])) if np.any(same & (gap > 0)) else 0.01
    big = 10.0
    miss = float(missing_jump_m)
    jump = np.full(r.size, -big)
    d_az = np.zeros(r.size)                 # angle to move each point towards its far side
    d_el = np.zeros(r.size)

    def take(rows, value, daz, delv):
        better = value > jump[rows]
        rows = rows[better] if isinstance(rows, np.ndarray) else np.flatnonzero(better)
        jump[rows] = value[better]
        d_az[rows] = np.broadcast_to(daz, better.shape)[better]
        d_el[rows] = np.broadcast_to(delv, better.shape)[better]

    # 1. along the beam: the next and previous return (none within 3.5 steps: a big jump)
    near = gap < 3.5 * step
    idx = np.arange(r.size - 1)
    take(idx, np.where(near, r[1:] - r[:-1], miss), np.where(near, a[1:] - a[:-1], step) / 2,
         0.0)
    take(idx + 1, np.where(near, r[:-1] - r[1:], miss),
         np.where(near, a[:-1] - a[1:], -step) / 2, 0.0)
    # 2. across beams (ordered by elevation): the nearest-azimuth return above and below
    ids, start = np.unique(b, return_index=True)
    stop = np.r_[start[1:], b.size]
    beam_el = np.array([np.median(el[s0:s1]) for s0, s1 in zip(start, stop)])
    by_el = np.argsort(beam_el)

    def neighbour(this, other):
        s0, s1, o0, o1 = start[this], stop[this], start[other], stop[other]
        pos = np.clip(np.searchsorted(a[o0:o1], a[s0:s1]), 1, o1 - o0) - 1
        nxt = np.minimum(pos + 1, o1 - o0 - 1)
        pick = np.where(np.abs(a[o0:o1][nxt] - a[s0:s1]) < np.abs(a[o0:o1][pos] - a[s0:s1]),
                        nxt, pos)
        close = np.abs(a[o0:o1][pick] - a[s0:s1]) < 2.5 * step
        return (np.where(close, r[o0:o1][pick], np.inf),
                np.where(close, el[o0:o1][pick], beam_el[other]))

    for k in range(1, by_el.size - 1):
        this = by_el[k]
        s0, s1 = start[this], stop[this]
        r_up, el_up = neighbour(this, by_el[k + 1])
        r_down, el_down = neighbour(this, by_el[k - 1])
        up, down = r_up - r[s0:s1], r_down - r[s0:s1]
        for out, inner, el_far in ((up, down, el_up), (down, up, el_down)):
            steep = out > 3.0 * np.abs(np.where(np.isfinite(inner), inner, big))
            take(np.arange(s0, s1), np.where(steep, np.minimum(out, miss), -big), 0.0,
                 (el_far - el[s0:s1]) / 2)
    jump = np.minimum(jump, big)
    edge = jump > np.maximum(min_jump_m, relative_jump * r)
    az_e, el_e, r_e = a[edge] + d_az[edge], el[edge] + d_el[edge], r[edge]
    points = np.stack([r_e * np.cos(el_e) * np.cos(az_e), r_e * np.cos(el_e) * np.sin(az_e),
                       r_e * np.sin(el_e)], axis=1)
    return points.astype(np.float32), np.sqrt(jump[edge]).astype(np.float32)


def azimuth_step(xyz: np.ndarray, ring: np.ndarray | None = None) -> float:
    """The LiDAR's azimuth step (rad), read from the sweep."""
    from cmkd_ros.occlusion import ScanPatternError, infer_scan_pattern
    try:
        return math.radians(infer_scan_pattern(xyz, ring).azimuth_step_deg)
    except ScanPatternError:
        return 0.0


def edge_map(rgb: np.ndarray, blur_px: float = 1.0) -> np.ndarray:
    """(H, W) float32 edge strength in [0, 1] of an RGB (or gray) image, after a Gaussian blur
    of ``blur_px`` (set it near the LiDAR's angular step in pixels: texture finer than the
    LiDAR can resolve only adds noise)."""
    img = np.asarray(rgb)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    if img.ndim != 2 or img.size == 0:
        raise AlignmentError(f'expected an image, got shape {np.asarray(rgb).shape}')
    gray = cv2.GaussianBlur(img.astype(np.float32), (0, 0), max(0.5, float(blur_px)))
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    mag = cv2.magnitude(gx, gy)
    scale = float(np.percentile(mag, 99.0))
    if not scale > 0:
        raise AlignmentError('the image has no edges (a uniform image)')
    return np.minimum(mag / scale, 1.0)


def spread(edges: np.ndarray, scale_px: float) -> np.ndarray:
    """Inverse distance transform: ``max over q of E(q) * exp(-|p - q| / scale)`` (chessboard
    distance), by repeated 3x3 dilations with decay."""
    out = edges.copy()
    decay = math.exp(-1.0 / scale_px)
    kernel = np.ones((3, 3), np.uint8)
    for _ in range(int(math.ceil(3 * scale_px))):
        np.maximum(out, decay * cv2.dilate(out, kernel), out=out)
    return out


@dataclass
class _View:
    """One frame of one camera: silhouette points (LiDAR frame at the camera's capture time),
    weights and the image's edge maps per search scale."""

    points: np.ndarray
    weights: np.ndarray
    maps: dict
    inner: np.ndarray                # a sample of non-silhouette points (the contrast)


@dataclass
class CameraFrames:
    """The prepared frames of one camera; :meth:`add` one sweep and image at a time."""

    camera: CameraCalibration
    scales: tuple = SCALES_PX
    blur_px: float = 0.0          # image blur before edges; 0: half the LiDAR's azimuth step
    views: list = field(default_factory=list)

    def add(self, xyz: np.ndarray, rgb: np.ndarray, *, ring: np.ndarray | None = None,
            T_capture_sweep: np.ndarray | None = None) -> int:
        """Prepare one frame; returns its silhouette points in front of the camera.

        ``T_capture_sweep`` (4, 4) moves the sweep's points into the LiDAR frame at the
        camera's capture time (motion compensation), optional.
        """
        cam = self.camera
        if np.asarray(rgb).shape[:2] != (cam.height, cam.width):
            raise AlignmentError(f'camera {cam.name!r}: image is {np.asarray(rgb).shape[1]}x'
                                 f'{np.asarray(rgb).shape[0]}, the calibration says '
                                 f'{cam.width}x{cam.height}')
        pts, weight = edge_points(xyz, ring)
        inner = _inner_sample(xyz, 3000)
        blur = self.blur_px if self.blur_px > 0 else max(1.0, 0.5 * float(cam.K[0, 0])
                                                          * azimuth_step(xyz, ring))
        if T_capture_sweep is not None:
            T = np.asarray(T_capture_sweep, dtype=np.float64)
            pts = (pts @ T[:3, :3].T + T[:3, 3]).astype(np.float32)
        # keep points that some calibration near this one could put in the image
        cam_pts = pts @ cam.T_cam_lidar[:3, :3].T + cam.T_cam_lidar[:3, 3]
        front = cam_pts[:, 2] > 0.5
        pts, weight = pts[front], weight[front]
        if T_capture_sweep is not None:
            inner = (inner @ T[:3, :3].T + T[:3, 3]).astype(np.float32)
        inner_cam = inner @ cam.T_cam_lidar[:3, :3].T + cam.T_cam_lidar[:3, 3]
        inner = inner[inner_cam[:, 2] > 0.5]
        edges = edge_map(rgb, blur)
        self.views.append(_View(pts, weight, {s: spread(edges, s) for s in self.scales}, inner))
        return int(front.sum())

    def score(self, T_cam_lidar: np.ndarray, scale_px: float | None = None) -> float:
        """Weighted mean edge strength under the silhouette points that land in the images,
        minus the mean under the other points (so that moving every point onto a textured
        region does not pay)."""
        scale_px = self.scales[-1] if scale_px is None else scale_px
        total = weight_sum = inner_total = inner_count = 0.0
        for view, (uv, valid), (uv_in, valid_in) in zip(
                self.views, self._project(T_cam_lidar),
                self._project(T_cam_lidar, inner=True)):
            w = view.weights[valid]
            if w.size:
                total += float(np.dot(w, _bilinear(view.maps[scale_px], uv[valid])))
                weight_sum += float(w.sum())
            if valid_in.any():
                inner_total += float(_bilinear(view.maps[scale_px], uv_in[valid_in]).sum())
                inner_count += float(valid_in.sum())
        if weight_sum <= 0:
            return 0.0
        return total / weight_sum - CONTRAST * inner_total / max(inner_count, 1.0)

    def points_in_view(self, T_cam_lidar: np.ndarray) -> int:
        return int(sum(valid.sum() for _, valid in self._project(T_cam_lidar)))

    def _project(self, T_cam_lidar: np.ndarray, inner: bool = False):
        rig = RigCalibration((_with_extrinsic(self.camera, self.camera.T_cam_lidar),))
        prep = prepare_rig(rig)
        T_extra = (invert(self.camera.T_cam_lidar) @ T_cam_lidar)[None]
        for view in self.views:
            uv, _, valid = project_points(view.inner if inner else view.points, prep,
                                          T_extra=T_extra)
            yield uv[0], valid[0]


def _inner_sample(xyz: np.ndarray, count: int) -> np.ndarray:
    """An even sample of ``count`` points of the sweep (deterministic)."""
    xyz = np.asarray(xyz, dtype=np.float32)
    ok = np.flatnonzero(np.isfinite(xyz).all(1) & (np.linalg.norm(xyz, axis=1) > MIN_RANGE_M))
    return xyz[ok[::max(1, ok.size // count)]]


def _bilinear(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """(M,) values of ``image`` at sub-pixel ``uv`` (M, 2) (pixel centres at integers)."""
    h, w = image.shape
    u = np.clip(uv[:, 0], 0, w - 1.001)
    v = np.clip(uv[:, 1], 0, h - 1.001)
    u0, v0 = u.astype(np.int64), v.astype(np.int64)
    fu, fv = u - u0, v - v0
    top = image[v0, u0] * (1 - fu) + image[v0, u0 + 1] * fu
    bottom = image[v0 + 1, u0] * (1 - fu) + image[v0 + 1, u0 + 1] * fu
    return top * (1 - fv) + bottom * fv


def _with_extrinsic(cam: CameraCalibration, T: np.ndarray) -> CameraCalibration:
    data = cam.to_dict()
    data['T_cam_lidar'] = np.asarray(T).tolist()
    return CameraCalibration.from_dict(data)


def perturb(T_cam_lidar: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``T_cam_lidar`` moved by ``x`` = (rotation vector (3,) rad, translation (3,) m), both in
    the camera frame: ``[R(x[:3]) | x[3:]] @ T_cam_lidar``."""
    D = np.eye(4)
    D[:3, :3] = rotvec_to_matrix(np.asarray(x[:3], dtype=np.float64))
    D[:3, 3] = x[3:6]
    return D @ np.asarray(T_cam_lidar, dtype=np.float64)


def extrinsic_error(T_a: np.ndarray, T_b: np.ndarray) -> tuple[float, float]:
    """(rotation degrees, translation metres) between two ``T_cam_lidar``, in the camera frame."""
    D = np.asarray(T_a) @ invert(np.asarray(T_b))
    angle = float(np.linalg.norm(matrix_to_rotvec(D[:3, :3])))
    # translation of the LiDAR origin as seen from the camera
    return math.degrees(angle), float(np.linalg.norm(T_a[:3, 3] - T_b[:3, 3]))


@dataclass
class RefineResult:
    """Outcome of :func:`refine` for one camera."""

    camera: str
    T_cam_lidar: np.ndarray          # refined (the initial one when not converged)
    initial_score: float
    score: float
    rotation_change_deg: float
    translation_change_m: float
    converged: bool
    reason: str                      # why not converged ('' when converged)
    frames: int
    edge_points: int
    sharpness: dict                  # score drop per parameter at the optimum (constraint)

    def to_dict(self) -> dict:
        return {'camera': self.camera, 'converged': self.converged, 'reason': self.reason,
                'frames': self.frames, 'edge_points': self.edge_points,
                'initial_score': round(self.initial_score, 4), 'score': round(self.score, 4),
                'rotation_change_deg': round(self.rotation_change_deg, 3),
                'translation_change_cm': round(100 * self.translation_change_m, 2),
                'sharpness': {k: round(v, 4) for k, v in self.sharpness.items()}}


PARAMETERS = ('roll', 'pitch', 'yaw', 'x', 'y', 'z')   # camera-frame axes (x right, y down, z fwd)


def _pattern_search(objective, x0: np.ndarray, steps: np.ndarray, min_steps: np.ndarray,
                    active: np.ndarray, limits: np.ndarray, max_evals: int = 600):
    """Maximize ``objective`` by compass search: try +-step on each active axis, move on
    improvement, halve the steps when nothing improves."""
    x, best = x0.copy(), objective(x0)
    steps = steps.copy()
    evals = 1
    while evals < max_evals and np.any(steps[active] >= min_steps[active]):
        improved = False
        for i in np.flatnonzero(active & (steps >= min_steps)):
            for sign in (1.0, -1.0):
                cand = x.copy()
                cand[i] += sign * steps[i]
                if abs(cand[i]) > limits[i]:
                    continue
                value = objective(cand)
                evals += 1
                if value > best + 1e-6:
                    x, best, improved = cand, value, True
                    break
        if not improved:
            steps = steps * 0.5
    return x, best


def refine(frames: CameraFrames, *, translation: bool = True, max_rotation_deg: float = 3.0,
           max_translation_m: float = 0.3, min_sharpness: float = 0.004) -> RefineResult:
    """Search the extrinsic of ``frames.camera`` that best aligns silhouettes with image edges.

    Coarse to fine over :data:`SCALES_PX`; rotation within ``max_rotation_deg`` of the start,
    translation (when ``translation``) within ``max_translation_m``. Converged means: enough
    silhouette points in view, and every searched parameter constrained (moving it by 0.5
    degree or 5 cm from the optimum lowers the fine score by at least ``min_sharpness``);
    otherwise the result keeps the initial extrinsic and ``reason`` says what was missing.
    """
    cam = frames.camera
    T0 = cam.T_cam_lidar
    n_in_view = frames.points_in_view(T0)
    initial = frames.score(T0)
    result = RefineResult(cam.name, T0.copy(), initial, initial, 0.0, 0.0, False, '',
                          len(frames.views), n_in_view, {})
    if not frames.views:
        result.reason = 'no frames'
        return result
    if n_in_view < MIN_EDGE_POINTS:
        result.reason = (f'too little structure: {n_in_view} silhouette points in view '
                         f'(need {MIN_EDGE_POINTS}); add frames with nearby objects')
        return result
    active = np.array([True] * 3 + [translation] * 3)
    rot_lim, tr_lim = math.radians(max_rotation_deg), max_translation_m
    limits = np.array([rot_lim] * 3 + [tr_lim] * 3)
    x = np.zeros(6)
    for scale in frames.scales:
        # step sizes follow the scale: about a scale's worth of pixels at 20 m
        f = float(cam.K[0, 0])
        rot_step = min(rot_lim, scale / f)
        tr_step = min(tr_lim, max(0.01, 20.0 * scale / f))
        steps = np.array([rot_step] * 3 + [tr_step] * 3)
        min_steps = np.array([math.radians(0.02)] * 3 + [0.003] * 3)
        x, _ = _pattern_search(lambda p, s=scale: frames.score(perturb(T0, p), s), x, steps,
                               np.maximum(min_steps, steps / 16), active, limits)
    T = perturb(T0, x)
    best = frames.score(T)
    # how constrained each parameter is: the score drop half a degree / 5 cm away
    sharp = {}
    for i, name in enumerate(PARAMETERS):
        if not active[i]:
            continue
        delta = np.zeros(6)
        delta[i] = math.radians(0.5) if i < 3 else 0.05
        drop = best - 0.5 * (frames.score(perturb(T0, x + delta))
                             + frames.score(perturb(T0, x - delta)))
        sharp[name] = drop
    result.sharpness = sharp
    # a translation of 5 cm moves far points less than half a degree does: a lower bar
    weak = [k for k, v in sharp.items()
            if v < (min_sharpness if k in PARAMETERS[:3] else min_sharpness / 4)]
    rot_deg, tr_m = extrinsic_error(T, T0)
    result.score = best
    if weak:
        result.reason = (f'the data does not constrain {", ".join(weak)} (score changes by '
                         f'less than {min_sharpness} there); add frames with more structure')
        return result
    if best <= initial:
        result.converged, result.T_cam_lidar = True, T0.copy()
        return result
    result.converged = True
    result.T_cam_lidar = T
    result.rotation_change_deg, result.translation_change_m = rot_deg, tr_m
    return result


@dataclass
class AlignmentReport:
    """Health of one camera's calibration (:func:`check_alignment`)."""

    camera: str
    score: float                     # edge alignment of the given calibration (0..1)
    aligned_score: float             # after the small rotation search
    misalignment_deg: float          # rotation the data points to (0: none found)
    edge_points: int
    enough_structure: bool

    @property
    def gain(self) -> float:
        """Relative score gain of the aligned rotation: 0 when the calibration fits best."""
        return (self.aligned_score - self.score) / max(self.aligned_score, 1e-9)

    def to_dict(self) -> dict:
        return {'camera': self.camera, 'score': round(self.score, 4),
                'aligned_score': round(self.aligned_score, 4),
                'misalignment_deg': round(self.misalignment_deg, 3),
                'gain': round(self.gain, 4), 'edge_points': self.edge_points,
                'enough_structure': self.enough_structure}


def check_alignment(frames: CameraFrames, max_rotation_deg: float = 2.0) -> AlignmentReport:
    """The calibration health metric of one camera: a rotation-only search within
    ``max_rotation_deg``; the rotation it finds is the misalignment the data points to."""
    T0 = frames.camera.T_cam_lidar
    n = frames.points_in_view(T0) if frames.views else 0
    score = frames.score(T0) if n else 0.0
    if n < MIN_EDGE_POINTS:
        return AlignmentReport(frames.camera.name, score, score, 0.0, n, False)
    result = refine(frames, translation=False, max_rotation_deg=max_rotation_deg,
                    min_sharpness=0.0)
    return AlignmentReport(frames.camera.name, score, max(result.score, score),
                           result.rotation_change_deg, n, True)

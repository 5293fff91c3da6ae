"""How well a LiDAR-camera calibration fits the data, and targetless refinement of it.

The measure is edge alignment: points where the LiDAR range jumps (object silhouettes, seen as
a foreground return next to a far one or to no return) and where its intensity steps on one
surface (paint on the road) must land on image edges. Each
silhouette point is compared with the image gradient across its own edge (a vertical outline
with the horizontal gradient), spread by a decaying maximum filter (an inverse distance
transform) so that a point a few pixels off still scores and the score rises smoothly towards
alignment. The score of a calibration is the weighted mean edge strength under its projected
silhouette points, over every frame given, minus the mean under other points of the sweeps.

* :func:`silhouettes` finds the silhouette points of one sweep, :func:`edge_maps` the
  gradients of one image; :class:`CameraFrames` holds a camera's prepared frames (motion
  compensated when the frame has point times, camera stamps and ego poses).
* :func:`refine` searches the extrinsic (rotation, optionally translation and the camera's
  time offset) that maximizes the score, coarse to fine, and reports whether the optimum is
  constrained by the data; :func:`estimate_time_offset` searches the time offset alone.
* :func:`check_alignment` is the health metric of one camera; :class:`HealthMonitor` keeps
  the last sweeps of every camera and reports their health (the collect node's core).

Measured figures and limits: docs/calibration.md. ROS-free; ``cmkd calibrate``
(:mod:`cmkd_ros.tools.calibrate`) and the collect node call it.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import cv2
import numpy as np

from cmkd_ros.calibration import CameraCalibration, RigCalibration
from cmkd_ros.config import setting
from cmkd_ros.motion import MotionError, invert, matrix_to_rotvec, rotvec_to_matrix
from cmkd_ros.projection import prepare_rig, project_points

MIN_RANGE_M = 1.0            # returns nearer than this (the car itself) are ignored
MIN_EDGE_POINTS = 150        # fewer silhouette points in view: too little structure
# Jump credited to a return with no neighbour beside it (sky, or a dropout: real LiDARs miss
# dark and shiny surfaces, so a missing return is weaker evidence than a measured jump).
MISSING_JUMP_M = 10.0
CONTRAST = 1.0
# Weight of a reflectance edge (paint on the road) against a silhouette point's (the square
# root of its range jump: 1 for a 1 m jump); chosen among 1 to 6 on synthetic drives (docs).
INTENSITY_WEIGHT = 3.0
# Pixel scales of the search, coarse to fine (edge spread of the inverse distance transform).
SCALES_PX = (16.0, 8.0, 4.0, 2.0, 1.0)
# A calibration is called misaligned when more than this share of the rotations 0.5 degree
# away fit the data better (see check_alignment and docs/calibration.md for the figures).
WARN_BETTER_NEIGHBOURS = 0.2


class AlignmentError(ValueError):
    """The inputs cannot be scored (no points in view, an empty cloud, no image structure)."""


def ring_from_order(xyz: np.ndarray) -> np.ndarray | None:
    """(N,) beam index of a ring-major cloud, None when the cloud is not stored that way.

    Some clouds hold each beam's returns together, in spin order, one beam after the other
    (KITTI's ``.bin`` files, organized clouds of some drivers). There the azimuth, taken in
    the spin direction, only grows within a beam and falls back once per beam; the beams'
    median elevations then change monotonically from one run to the next.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    if xyz.shape[0] < 200:
        return None
    az = np.mod(np.arctan2(xyz[:, 1], xyz[:, 0]), 2 * np.pi)
    el = np.arctan2(xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1]))
    for a in (az, 2 * np.pi - az):                   # either spin direction
        d = np.diff(a)
        cut = np.flatnonzero(d < -np.pi)
        if not 3 <= cut.size <= 255:
            continue
        inside = np.ones(d.size, bool)
        inside[cut] = False
        if np.mean(d[inside] < -0.01) > 0.02:         # azimuth must grow within a run
            continue
        ring = np.zeros(xyz.shape[0], np.int64)
        ring[cut + 1] = 1
        ring = np.cumsum(ring)
        sizes = np.bincount(ring)
        if np.median(sizes) < 20:
            continue
        med = np.array([np.median(e) for e in np.split(el, cut + 1)])
        step = np.sign(np.diff(med[sizes >= 20]))
        if step.size and max(np.mean(step > 0), np.mean(step < 0)) >= 0.9:
            return ring
    return None


def _beam_index(xyz: np.ndarray, ring: np.ndarray | None) -> tuple[np.ndarray, str]:
    """(N,) beam of each point and where it came from: the ring field, the point order of a
    ring-major cloud, else the beam row read from the elevations."""
    if ring is not None:
        return np.asarray(ring).reshape(-1).astype(np.int64), 'ring field'
    ordered = ring_from_order(xyz)
    if ordered is not None:
        return ordered, 'point order'
    from cmkd_ros.occlusion import ScanPatternError, infer_scan_pattern
    elevation = np.arctan2(xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1]))
    try:
        return infer_scan_pattern(xyz).beams_at(elevation)[2], 'elevation'
    except ScanPatternError:
        return np.floor(np.degrees(elevation) / 0.4).astype(np.int64), 'elevation'


@dataclass
class Silhouettes:
    """Edge points of one sweep (:func:`silhouettes`), LiDAR frame: silhouette points and,
    when the sweep's intensities were given, reflectance edges (zero ``tangent``)."""

    points: np.ndarray          # (M, 3) float32, on the outline
    weights: np.ndarray         # (M,) float32
    tangent: np.ndarray         # (M, 3) float32 unit vectors from the point towards the far side
    #                             (zero for a reflectance edge: its direction is not known)
    blur: np.ndarray            # (M,) float32 rad: how far from the true outline it may lie
    index: np.ndarray           # (M,) int64 row of each point in the sweep it came from
    azimuth_step: float = 0.0   # the LiDAR's azimuth step (rad), read from the sweep
    beams_from: str = ''        # how beams were found: ring field, point order, elevation

    def __len__(self) -> int:
        return int(self.points.shape[0])


def silhouettes(xyz: np.ndarray, ring: np.ndarray | None = None, *,
                min_jump_m: float = 0.5, relative_jump: float = 0.08,
                missing_jump_m: float = MISSING_JUMP_M, smooth: float = 0.05,
                lower_edges: bool = False, run_power: float = 0.5,
                intensity: np.ndarray | None = None,
                intensity_weight: float = INTENSITY_WEIGHT) -> Silhouettes:
    """Silhouette points of a sweep ``xyz`` (N, 3), LiDAR frame: where the range jumps.

    A return is on a silhouette when the next return along its beam (within 3.5 azimuth
    steps), or the nearest return of the beam above, is farther by more than
    ``max(min_jump_m, relative_jump * range)``; a missing return there counts as a jump of
    ``missing_jump_m`` (sky). A return missing below is a dropout (dark or shiny surfaces), and
    jumps downwards (undersides of cars, overhangs: outlines that depend on the viewpoint) count
    only with ``lower_edges``. Across beams the step must also be three times the step to the
    other side (on the road the range grows from beam to beam). The near side of an edge must be
    one surface (a step under ``smooth`` times the range, at least 0.2 m; 0 turns the test off)
    or a thin object (a jump on that side too): foliage mostly fails this. The object's true
    outline lies between the two returns, so each point is moved half the angle towards its far
    neighbour (without this, tops of objects sit half a beam spacing low: about half a degree
    on a 32-beam LiDAR). Weight: the square root of the range jump (at most 10 m), divided by
    the length of its run to the power ``run_power`` for across-beam points (a run along one
    beam, the top of a wall, lies at one unknown height between two beams: one observation).

    A cloud cropped to a camera's view (azimuth coverage under 270 degrees, as KITTI's
    camera-cropped scans) has false gaps at the crop: there the ends of each beam and returns
    missing above beyond the upper beam's azimuth span do not count.

    With ``intensity`` (N,) the sweep's reflectance edges are added (:func:`_intensity_steps`:
    paint on the road, signs), each with weight ``intensity_weight`` and no direction
    (``tangent`` zero: it is compared with the stronger of the two image gradients).
    """
    xyz = np.asarray(xyz, dtype=np.float32)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise AlignmentError(f'xyz must be (N, 3), got {xyz.shape}')
    rng = np.linalg.norm(xyz, axis=1)
    keep = np.flatnonzero(np.isfinite(rng) & (rng > MIN_RANGE_M))
    if keep.size < 100:
        raise AlignmentError(f'{keep.size} usable points in the sweep: too few to find edges')
    beam, beams_from = _beam_index(
        xyz[keep], None if ring is None else np.asarray(ring).reshape(-1)[keep])
    p = xyz[keep].astype(np.float64)
    azimuth = np.arctan2(p[:, 1], p[:, 0])
    degrees = np.unique(np.floor(np.degrees(azimuth)).astype(np.int64))
    cropped = degrees.size < 270
    shift = 0.0
    if cropped:             # put the widest empty sector at +-180 degrees: no beam wraps
        gaps = np.diff(np.r_[degrees, degrees[0] + 360])
        shift = math.radians(degrees[np.argmax(gaps)] + 0.5 * gaps.max() + 180.0)
        azimuth = np.mod(azimuth - shift + np.pi, 2 * np.pi) - np.pi
    order = np.lexsort((azimuth, beam))
    b, a, r = beam[order], azimuth[order], rng[keep][order].astype(np.float64)
    el = np.arcsin(np.clip(p[order, 2] / r, -1.0, 1.0))
    _, start = np.unique(b, return_index=True)
    stop = np.r_[start[1:], b.size]
    # 1. along the beam: the next return in azimuth (the first one after the last, across
    #    +-180 degrees, in a full sweep)
    nxt = np.arange(1, b.size + 1)
    nxt[stop - 1] = start
    gap = np.mod(a[nxt] - a, 2 * np.pi)
    same = gap > 0
    step = float(np.median(gap[same & (gap < 0.05)])) if np.any(same & (gap < 0.05)) else 0.01
    big = 10.0
    miss = float(missing_jump_m)
    jump = np.full(r.size, -big)
    d_az = np.zeros(r.size)                 # angle to move each point towards its far side
    d_el = np.zeros(r.size)

    def take(rows, value, daz, delv):
        better = value > jump[rows]
        rows = rows[better]
        jump[rows] = value[better]
        d_az[rows] = np.broadcast_to(daz, better.shape)[better]
        d_el[rows] = np.broadcast_to(delv, better.shape)[better]

    near = gap < 3.5 * step
    end = np.zeros(r.size, bool)
    end[stop - 1] = True                    # the pair (last, first) of each beam
    missing = ~near & ~(cropped & end)      # a gap inside the beam's coverage
    rows = np.arange(r.size)
    prv = np.empty_like(nxt)
    prv[nxt] = rows
    threshold = np.maximum(min_jump_m, relative_jump * r)
    tol = np.maximum(0.2, smooth * r) if smooth else np.full(r.size, np.inf)

    def solid(delta, seen):
        """The near side of an edge: one surface (a small step) or a thin object (a jump)."""
        return seen & ((np.abs(delta) < tol) | (delta > threshold))

    value = np.where(near, r[nxt] - r, np.where(missing, miss, -big))
    value = np.where(solid(r[prv] - r, near[prv]), value, -big)
    take(rows, value, np.where(near, gap, step) / 2, 0.0)
    value = np.where(near, r - r[nxt], np.where(missing, miss, -big))
    value = np.where(solid(r[nxt[nxt]] - r[nxt], near[nxt]), value, -big)
    take(nxt, value, -np.where(near, gap, step) / 2, 0.0)
    # 2. across beams (ordered by elevation): the nearest-azimuth return above and below
    beam_el = np.array([np.median(el[s0:s1]) for s0, s1 in zip(start, stop)])
    by_el = np.argsort(beam_el)

    def neighbour(this, other):
        s0, s1, o0, o1 = start[this], stop[this], start[other], stop[other]
        ao = a[o0:o1]
        pos = np.clip(np.searchsorted(ao, a[s0:s1]), 1, o1 - o0) - 1
        nx = np.minimum(pos + 1, o1 - o0 - 1)
        pick = np.where(np.abs(ao[nx] - a[s0:s1]) < np.abs(ao[pos] - a[s0:s1]), nx, pos)
        close = np.abs(ao[pick] - a[s0:s1]) < 2.5 * step
        inside = (a[s0:s1] > ao[0]) & (a[s0:s1] < ao[-1]) if cropped else \
            np.ones(s1 - s0, bool)
        return (np.where(close, r[o0:o1][pick], np.inf),
                np.where(close, el[o0:o1][pick], beam_el[other]), close, inside)

    for k in range(1, by_el.size - 1):
        this = by_el[k]
        s0, s1 = start[this], stop[this]
        r_up, el_up, seen_up, inside_up = neighbour(this, by_el[k + 1])
        r_down, el_down, seen_down, _ = neighbour(this, by_el[k - 1])
        up, down = r_up - r[s0:s1], r_down - r[s0:s1]
        rows = np.arange(s0, s1)
        steep = up > 3.0 * np.abs(np.where(seen_down, down, big))
        steep &= seen_down & (np.abs(down) < tol[rows])
        value = np.where(seen_up, up, np.where(inside_up, miss, -big))
        take(rows, np.where(steep, np.minimum(value, miss), -big), 0.0,
             (el_up - el[s0:s1]) / 2)
        if lower_edges:
            steep = seen_down & (down > 3.0 * np.abs(np.where(seen_up, up, big)))
            steep &= seen_up & (np.abs(up) < tol[rows])
            take(rows, np.where(steep, down, -big), 0.0, (el_down - el[s0:s1]) / 2)
    jump = np.minimum(jump, big)
    edge = jump > np.maximum(min_jump_m, relative_jump * r)
    # 3. a run of across-beam edge points along one beam (the top of a wall) lies at one
    #    unknown height between the two beams: one observation, not one per point
    weight = np.sqrt(np.maximum(jump, 0.0))
    if run_power > 0:
        up_edge = edge & (d_el != 0)
        idx = np.flatnonzero(up_edge)
        brk = np.ones(idx.size, bool)
        brk[1:] = ~((b[idx[1:]] == b[idx[:-1]]) & (a[idx[1:]] - a[idx[:-1]] < 2.5 * step)
                    & (np.sign(d_el[idx[1:]]) == np.sign(d_el[idx[:-1]])))
        run = np.cumsum(brk) - 1
        weight[idx] /= np.bincount(run)[run] ** run_power
    az_e, el_e, r_e = a[edge] + d_az[edge] + shift, el[edge] + d_el[edge], r[edge]
    ce, se, ca, sa = np.cos(el_e), np.sin(el_e), np.cos(az_e), np.sin(az_e)
    points = np.stack([r_e * ce * ca, r_e * ce * sa, r_e * se], axis=1)
    # unit tangent towards the far side: along the azimuth or along the elevation
    along = d_el[edge] == 0
    sign = np.where(along, np.sign(d_az[edge]), np.sign(d_el[edge]))
    tangent = np.where(along[:, None], np.stack([-sa, ca, np.zeros_like(sa)], 1),
                       np.stack([-se * ca, -se * sa, ce], 1)) * sign[:, None]
    # half the angle to the far neighbour: how far off the true outline the point may be
    blur = np.where(along, np.abs(d_az[edge]) * ce, np.abs(d_el[edge]))
    rows = keep[order][edge]
    if intensity is not None and intensity_weight > 0:
        inten = np.asarray(intensity, dtype=np.float64).reshape(-1)
        if inten.shape[0] != xyz.shape[0]:
            raise AlignmentError(f'intensity has {inten.shape[0]} values for '
                                 f'{xyz.shape[0]} points')
        pick = _intensity_steps(inten[keep][order], r, nxt, prv, gap < 1.5 * step)
        pick = pick[~edge[pick]]
        az_i = a[pick] + gap[pick] / 2 + shift      # half way to the next return
        el_i = (el[pick] + el[nxt[pick]]) / 2
        r_i = (r[pick] + r[nxt[pick]]) / 2
        ci = np.cos(el_i)
        points = np.r_[points, np.stack([r_i * ci * np.cos(az_i), r_i * ci * np.sin(az_i),
                                         r_i * np.sin(el_i)], axis=1)]
        weight = np.r_[weight[edge], np.full(pick.size, float(intensity_weight))]
        tangent = np.r_[tangent, np.zeros((pick.size, 3))]
        blur = np.r_[blur, gap[pick] / 2 * ci]
        rows = np.r_[rows, keep[order][pick]]
    else:
        weight = weight[edge]
    return Silhouettes(points.astype(np.float32), weight.astype(np.float32),
                       tangent.astype(np.float32), blur.astype(np.float32),
                       rows, step, beams_from)


def _intensity_steps(inten: np.ndarray, r: np.ndarray, nxt: np.ndarray, prv: np.ndarray,
                     adjacent: np.ndarray, ratio: float = 2.0, least: float = 0.2,
                     noise: float = 5.0) -> np.ndarray:
    """Rows ``i`` of a beam-ordered sweep whose reflectance steps between ``i`` and the next
    return ``nxt[i]``: a painted line, a sign on a post. Both returns adjacent on one surface
    (range step under 3 % of the range, at least 0.15 m), the brighter at least ``ratio``
    times the darker and brighter by ``least`` times the sweep's 99th percentile (intensity
    scales differ between LiDARs) and by ``noise`` times the median difference of adjacent
    returns on one surface (the sweep's noise), and each side flat (the return before ``i``
    and the one after ``nxt[i]`` within a third of the step of their side): a step, not
    noise. The position along the beam is measured to half an azimuth step, unlike a height
    between two beams."""
    finite = inten[np.isfinite(inten)]
    scale = float(np.percentile(finite, 99.0)) if finite.size else 0.0
    if not scale > 0:          # (non-finite values fail every comparison below)
        return np.zeros(0, np.int64)
    same = adjacent & (np.abs(r[nxt] - r) < np.maximum(0.15, 0.03 * r))
    lo, hi = np.minimum(inten, inten[nxt]), np.maximum(inten, inten[nxt])
    size = hi - lo
    steps = size[same & np.isfinite(size)]
    typical = float(np.median(steps)) if steps.size else 0.0
    ok = same & (hi >= ratio * lo) & (size >= max(least * scale, noise * typical))
    ok &= adjacent[prv] & (np.abs(inten[prv] - inten) < size / 3)
    ok &= adjacent[nxt] & (np.abs(inten[nxt[nxt]] - inten[nxt]) < size / 3)
    return np.flatnonzero(ok)


def edge_maps(rgb: np.ndarray, blur_px: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) float32 horizontal and vertical gradient strengths of an RGB (or gray) image, in
    [0, 1], after a Gaussian blur of ``blur_px`` (set it near the LiDAR's angular step in
    pixels: texture finer than the LiDAR can resolve only adds noise)."""
    img = np.asarray(rgb)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    if img.ndim != 2 or img.size == 0:
        raise AlignmentError(f'expected an image, got shape {np.asarray(rgb).shape}')
    gray = cv2.GaussianBlur(img.astype(np.float32), (0, 0), max(0.5, float(blur_px)))
    gx = np.abs(cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3))
    gy = np.abs(cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3))
    scale = float(np.percentile(np.maximum(gx, gy), 99.0))
    if not scale > 8.0:             # a Sobel response of 8: two gray levels (no structure)
        raise AlignmentError('the image has no edges (a uniform image)')
    return np.minimum(gx / scale, 1.0), np.minimum(gy / scale, 1.0)


def spread(edges: np.ndarray, scale_px: float) -> np.ndarray:
    """Inverse distance transform: ``max over q of E(q) * exp(-|p - q| / scale)`` (chessboard
    distance), by repeated 3x3 dilations with decay."""
    out = edges.astype(np.float32, copy=True)
    decay = math.exp(-1.0 / scale_px)
    kernel = np.ones((3, 3), np.uint8)
    for _ in range(int(math.ceil(3 * scale_px))):
        np.maximum(out, decay * cv2.dilate(out, kernel), out=out)
    return out


def _max_pool(image: np.ndarray, factor: int) -> np.ndarray:
    """``image`` reduced ``factor`` times by taking the maximum of each block."""
    if factor == 1:
        return image
    h, w = image.shape
    H, W = -(-h // factor) * factor, -(-w // factor) * factor
    padded = np.zeros((H, W), image.dtype)
    padded[:h, :w] = image
    return padded.reshape(H // factor, factor, W // factor, factor).max(axis=(1, 3))


def _scaled_camera(cam: CameraCalibration, factor: float) -> CameraCalibration:
    """``cam`` with its image shrunk ``factor`` times (same rays, fewer pixels)."""
    if factor == 1.0:
        return cam
    data = cam.to_dict()
    width, height = max(1, round(cam.width / factor)), max(1, round(cam.height / factor))
    sx, sy = width / cam.width, height / cam.height
    K = np.array(cam.K, dtype=np.float64)
    K[0, :] *= sx
    K[1, :] *= sy
    K[0, 2] = (cam.K[0, 2] + 0.5) * sx - 0.5
    K[1, 2] = (cam.K[1, 2] + 0.5) * sy - 0.5
    data.update(K=K.tolist(), width=width, height=height)
    return CameraCalibration.from_dict(data)


def with_extrinsic(cam: CameraCalibration, T: np.ndarray) -> CameraCalibration:
    """``cam`` with ``T_cam_lidar`` replaced by ``T`` (4, 4)."""
    data = cam.to_dict()
    data['T_cam_lidar'] = np.asarray(T).tolist()
    return CameraCalibration.from_dict(data)


@dataclass
class _View:
    """One frame of one camera: silhouette points (LiDAR frame at the camera's capture time),
    their weights, how much of each point's edge runs vertically in the image (``across``:
    the share of the horizontal gradient in its score), the finest scale each point is
    compared at, a sample of other points, and the image's gradients (uint8; the spread maps
    per scale are made when first needed and dropped by :meth:`CameraFrames.release`)."""

    points: np.ndarray
    weights: np.ndarray
    across: np.ndarray
    least_scale: np.ndarray
    inner: np.ndarray
    gradients: tuple
    maps: dict = field(default_factory=dict)
    capture_ns: int | None = None    # the camera's capture time the points are moved to
    trajectory: object = None        # ego poses (T_world_lidar) around it, for time shifts
    paint: np.ndarray | None = None  # (M,) bool: reflectance edges (the rest: silhouettes)


@dataclass
class CameraFrames:
    """The prepared frames of one camera; :meth:`add` one sweep and image at a time.

    ``max_width``: images wider than this are scored at a reduced size (halved until they
    fit; 0 keeps the full size); the extrinsic found is the same, its precision coarser.
    """

    camera: CameraCalibration
    max_width: int = 0
    scales: tuple = SCALES_PX
    blur_px: float = 0.0          # image blur before edges; 0: half the LiDAR's azimuth step
    oriented: bool = True         # compare each point with the gradient across its edge
    matched: bool = True          # compare each point at a scale no finer than its own blur
    viewpoint: bool = False       # drop top edges between the LiDAR's and camera's heights
    views: list = field(default_factory=list)
    # called before each frame is prepared and each score: a background check waits there
    # while foreground work runs (the collect node's pairs; pipelines.work_queue.IdleGate)
    pause: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        factor = 1
        while self.max_width and self.camera.width / factor > self.max_width:
            factor *= 2
        self._factor = factor
        self._cam = _scaled_camera(self.camera, float(factor))

    @property
    def focal_px(self) -> float:
        """Focal length of the images as scored (pixels)."""
        return float(self._cam.K[0, 0])

    def add(self, xyz: np.ndarray, rgb: np.ndarray, *, ring: np.ndarray | None = None,
            intensity: np.ndarray | None = None, T_capture_sweep: np.ndarray | None = None,
            found: Silhouettes | None = None, capture_ns: int | None = None,
            trajectory=None) -> int:
        """Prepare one frame; returns its silhouette points in front of the camera.

        ``xyz`` (N, 3) LiDAR frame, ``rgb`` (H, W, 3) uint8. ``T_capture_sweep`` (4, 4) moves
        the sweep's points into the LiDAR frame at the camera's capture time (motion
        compensation), optional; ``found``: the sweep's :func:`silhouettes` when already
        computed (several cameras share one sweep; else found here, with reflectance edges
        when ``intensity`` (N,) is given). ``capture_ns`` (that capture time) and
        ``trajectory`` (the ego poses around it) let :meth:`shifted` and
        :func:`estimate_time_offset` move the points to other capture times.
        """
        if self.pause is not None:
            self.pause()
        cam = self.camera
        image = np.asarray(rgb)
        if image.ndim < 2 or image.shape[:2] != (cam.height, cam.width):
            raise AlignmentError(f'camera {cam.name!r}: image is {image.shape[1::-1]} '
                                 f'(width, height), the calibration says '
                                 f'{cam.width}x{cam.height}')
        found = silhouettes(xyz, ring, intensity=intensity) if found is None else found
        pts, weight, tangent, blur = found.points, found.weights, found.tangent, found.blur
        inner = _inner_sample(xyz, 3000)
        if T_capture_sweep is not None:
            T = np.asarray(T_capture_sweep, dtype=np.float64)
            pts = (pts @ T[:3, :3].T + T[:3, 3]).astype(np.float32)
            tangent = (tangent @ T[:3, :3].T).astype(np.float32)
            inner = (inner @ T[:3, :3].T + T[:3, 3]).astype(np.float32)
        # keep points that some calibration near this one could put in the image
        R, t = cam.T_cam_lidar[:3, :3], cam.T_cam_lidar[:3, 3]
        front = (pts @ R.T + t)[:, 2] > 0.5
        if self.viewpoint:
            # a top edge between the LiDAR's and the camera's heights: one sees the top
            # surface from above, the other from below, and their outlines are different
            # 3D edges (a car roof's far edge, its near edge): not a silhouette this camera sees
            centre = float(-(R.T @ t)[2])
            top = tangent[:, 2] > 0.5
            front &= ~(top & (pts[:, 2] > min(0.0, centre)) & (pts[:, 2] < max(0.0, centre)))
        pts, weight, tangent, blur = pts[front], weight[front], tangent[front], blur[front]
        inner = inner[(inner @ R.T + t)[:, 2] > 0.5]
        # the direction of each edge's normal in the image: the step towards the far side
        rig = RigCalibration((self._cam,))
        uv0 = project_points(pts, rig)[0][0]
        step = 0.01 * np.linalg.norm(pts, axis=1, keepdims=True)
        d = np.nan_to_num(project_points(pts + step * tangent, rig)[0][0] - uv0)
        length2 = (d ** 2).sum(1)
        across = np.where(length2 > 0, d[:, 0] ** 2 / np.maximum(length2, 1e-12), 0.5)
        paint = ~tangent.any(axis=1)               # reflectance edges: no direction known
        across[paint] = np.nan                     # (either image gradient)
        if not self.oriented:
            across = np.full(across.shape, np.nan)
        least = blur * self.focal_px if self.matched else np.zeros(len(pts))
        if self._factor > 1:
            image = cv2.resize(image, (self._cam.width, self._cam.height),
                               interpolation=cv2.INTER_AREA)
        px_blur = self.blur_px if self.blur_px > 0 else max(1.0, 0.5 * self.focal_px
                                                             * found.azimuth_step)
        gx, gy = edge_maps(image, px_blur)
        self.views.append(_View(pts, weight, across.astype(np.float32),
                                least.astype(np.float32), inner,
                                (np.rint(gx * 255).astype(np.uint8),
                                 np.rint(gy * 255).astype(np.uint8)),
                                capture_ns=None if capture_ns is None else int(capture_ns),
                                trajectory=trajectory, paint=paint))
        return int(front.sum())

    def with_extrinsic(self, T_cam_lidar: np.ndarray) -> 'CameraFrames':
        """The same frames (shared) for the camera with another ``T_cam_lidar``."""
        return dataclasses.replace(self, camera=with_extrinsic(self.camera, T_cam_lidar),
                                   views=self.views)

    def shifted(self, offset_ns: int) -> 'CameraFrames':
        """The same frames as if each image had been captured ``offset_ns`` later: the
        points move with the ego between the two times (the image maps are shared)."""
        out = CameraFrames(self.camera, self.max_width, self.scales, self.blur_px,
                           self.oriented, self.matched, self.viewpoint, pause=self.pause)
        for v in self.views:
            if v.capture_ns is None or v.trajectory is None:
                raise AlignmentError('a time offset needs each frame\'s capture time and '
                                     'ego poses (a bag with odometry, pairs with ego poses)')
            if offset_ns:
                # LiDAR frame at t -> world -> LiDAR frame at t + offset
                T_world = v.trajectory.pose_at(np.array([v.capture_ns, v.capture_ns
                                                         + int(offset_ns)], np.int64))
                D = invert(T_world[1]) @ T_world[0]
                R, t = D[:3, :3].astype(np.float32), D[:3, 3].astype(np.float32)
                points, inner = v.points @ R.T + t, v.inner @ R.T + t
            else:
                points, inner = v.points, v.inner
            out.views.append(_View(points, v.weights, v.across, v.least_scale, inner,
                                   v.gradients, v.maps, v.capture_ns + int(offset_ns),
                                   v.trajectory, v.paint))
        return out

    def release(self) -> None:
        """Drop the spread edge maps (they are made again when next needed)."""
        for view in self.views:
            view.maps.clear()

    def _maps(self, view: _View, scale: float) -> tuple:
        """(horizontal, vertical) spread maps of ``view`` at ``scale`` and their reduction:
        coarse scales are spread on images reduced by max-pooling (scale / 4 times)."""
        if scale not in view.maps:
            factor = max(1, int(scale // 4))
            pair = tuple(spread(_max_pool(g, factor).astype(np.float32) / 255.0,
                                scale / factor) for g in view.gradients)
            view.maps[scale] = (pair, factor)
        return view.maps[scale]

    def score(self, T_cam_lidar: np.ndarray, scale_px: float | None = None) -> float:
        """Weighted mean edge strength under the silhouette points that land in the images
        (each point reads the gradient across its own edge), minus the mean under the other
        points (so that moving every point onto a textured region does not pay)."""
        if self.pause is not None:
            self.pause()
        scale_px = self.scales[-1] if scale_px is None else scale_px
        total = weight_sum = inner_total = inner_count = 0.0
        for view, (uv, valid), (uv_in, valid_in) in zip(
                self.views, self._project(T_cam_lidar),
                self._project(T_cam_lidar, inner=True)):
            w = view.weights[valid]
            if w.size:
                strength = np.zeros(w.size)
                pick = self._scale_of(np.maximum(view.least_scale[valid], scale_px))
                uv_v, across_v = uv[valid], view.across[valid]
                for s in np.unique(pick):
                    rows = np.flatnonzero(pick == s)
                    (mx, my), k = self._maps(view, float(s))
                    at = (uv_v[rows] + 0.5) / k - 0.5
                    ex, ey = _bilinear(mx, at), _bilinear(my, at)
                    across = across_v[rows]
                    strength[rows] = np.where(np.isnan(across), np.maximum(ex, ey),
                                              across * ex + (1 - across) * ey)
                total += float(np.dot(w, strength))
                weight_sum += float(w.sum())
            if valid_in.any():
                (mx, my), k = self._maps(view, float(scale_px))
                at = (uv_in[valid_in] + 0.5) / k - 0.5
                inner_total += float(0.5 * (_bilinear(mx, at) + _bilinear(my, at)).sum())
                inner_count += float(valid_in.sum())
        if weight_sum <= 0:
            return 0.0
        return total / weight_sum - CONTRAST * inner_total / max(inner_count, 1.0)

    def _scale_of(self, wanted: np.ndarray) -> np.ndarray:
        """The smallest search scale at or above each ``wanted`` scale (the largest when none
        is)."""
        scales = np.sort(np.asarray(self.scales, dtype=np.float64))
        idx = np.minimum(np.searchsorted(scales, wanted - 1e-6), scales.size - 1)
        return scales[idx]

    def halves(self, sector_deg: float = 10.0) -> tuple['CameraFrames', 'CameraFrames']:
        """The frames split in two: silhouette and contrast points of alternate
        ``sector_deg`` sectors of azimuth (the image maps are shared)."""
        out = []
        for parity in (0, 1):
            half = CameraFrames(self.camera, self.max_width, self.scales, self.blur_px,
                                self.oriented, self.matched, self.viewpoint, pause=self.pause)
            for v in self.views:
                pick = _sector(v.points, sector_deg) == parity
                inner = v.inner[_sector(v.inner, sector_deg) == parity]
                half.views.append(_View(v.points[pick], v.weights[pick], v.across[pick],
                                        v.least_scale[pick], inner, v.gradients, v.maps,
                                        v.capture_ns, v.trajectory,
                                        None if v.paint is None else v.paint[pick]))
            out.append(half)
        return out[0], out[1]

    def median_depth(self, T_cam_lidar: np.ndarray | None = None) -> float:
        """Median depth (m) of the silhouette points in view (10 m when none is)."""
        T = self.camera.T_cam_lidar if T_cam_lidar is None else T_cam_lidar
        depths = [((v.points @ T[:3, :3].T + T[:3, 3])[valid, 2])
                  for v, (_, valid) in zip(self.views, self._project(T))]
        depths = np.concatenate(depths) if depths else np.zeros(0)
        return float(np.median(depths)) if depths.size else 10.0

    def points_in_view(self, T_cam_lidar: np.ndarray | None = None,
                       paint: bool = False) -> int:
        """Edge points that ``T_cam_lidar`` (default: the camera's) puts in the images; with
        ``paint`` only the reflectance edges among them."""
        T = self.camera.T_cam_lidar if T_cam_lidar is None else T_cam_lidar
        total = 0
        for view, (_, valid) in zip(self.views, self._project(T)):
            if paint:
                valid = valid & view.paint if view.paint is not None else \
                    np.zeros_like(valid)
            total += int(valid.sum())
        return total

    def _project(self, T_cam_lidar: np.ndarray, inner: bool = False):
        """Per view, (uv, valid) of its silhouette (or contrast) points: one projection of
        every view's points at once."""
        key = tuple(id(v) for v in self.views)
        stacks = self.__dict__.setdefault('_stacks', {})
        if stacks.get(inner, (None,))[0] != key:
            parts = [v.inner if inner else v.points for v in self.views]
            stacks[inner] = (key, np.concatenate(parts) if parts else np.zeros((0, 3)),
                             np.cumsum([0] + [len(p) for p in parts]))
        _, points, bounds = stacks[inner]
        prep = prepare_rig(RigCalibration((self._cam,)))
        T_extra = (invert(self.camera.T_cam_lidar) @ T_cam_lidar)[None]
        uv, _, valid = project_points(points, prep, T_extra=T_extra)
        for a, b in zip(bounds[:-1], bounds[1:]):
            yield uv[0, a:b], valid[0, a:b]


def _sector(xyz: np.ndarray, sector_deg: float) -> np.ndarray:
    """(N,) parity (0 or 1) of the azimuth sector of each point."""
    az = np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0])) + 360.0
    return (np.floor(az / sector_deg).astype(np.int64) % 2) if len(xyz) else \
        np.zeros(0, np.int64)


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


def prepare_sweep(xyz: np.ndarray, *, ring: np.ndarray | None = None,
                  intensity: np.ndarray | None = None, point_time_ns: np.ndarray | None = None,
                  capture_ns: np.ndarray | None = None, trajectory=None,
                  measured: bool = True
                  ) -> tuple[np.ndarray, np.ndarray | None, Silhouettes]:
    """One sweep made ready for every camera: ``(xyz_ref, T_capture_ref, silhouettes)``.

    With ``point_time_ns`` (N,), the cameras' true capture times ``capture_ns`` (C,) and a
    ``trajectory`` (T_world_lidar poses), the points are motion compensated into one reference
    frame and ``T_capture_ref`` (C, 4, 4) moves them on to each camera's capture time (pass
    ``T_capture_ref[c]`` to :meth:`CameraFrames.add`); otherwise ``xyz`` as it is and None.
    The silhouettes are found in the sweep as measured (ranges and angles seen from where the
    LiDAR was at each return), then moved into the reference frame with their returns
    (``measured=False``: found in the compensated cloud, whose origin is not where the LiDAR
    was; measured worse in docs/calibration.md). ``intensity`` (N,): reflectance edges are
    used too (:func:`silhouettes`).
    """
    xyz = np.asarray(xyz, dtype=np.float32)
    if trajectory is None or point_time_ns is None or capture_ns is None:
        return xyz, None, silhouettes(xyz, ring, intensity=intensity)
    from cmkd_ros.motion import compensation_transforms
    times = np.asarray(point_time_ns, np.int64)
    capture = np.asarray(capture_ns, np.int64)
    ref, T = compensation_transforms(xyz, times, capture, trajectory)
    if not measured:
        return ref, T, silhouettes(ref, ring, intensity=intensity)
    found = silhouettes(xyz, ring, intensity=intensity)
    # each silhouette point moves as its return: LiDAR frame at its time -> reference frame
    ref_ns = int(np.round(capture.astype(np.float64).mean()))
    t = np.broadcast_to(times, (xyz.shape[0],))[found.index]
    M = invert(trajectory.pose_at(ref_ns)[0]) @ trajectory.pose_at(t)
    R, tr = M[:, :3, :3], M[:, :3, 3]

    def rotate(v):
        return np.einsum('mij,mj->mi', R, v).astype(np.float32)

    moved = dataclasses.replace(found, points=(rotate(found.points) + tr).astype(np.float32),
                                tangent=rotate(found.tangent))
    return ref, T, moved


def perturb(T_cam_lidar: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``T_cam_lidar`` moved by ``x`` = (rotation vector (3,) rad, translation (3,) m), both in
    the camera frame: ``[R(x[:3]) | x[3:]] @ T_cam_lidar``."""
    D = np.eye(4)
    D[:3, :3] = rotvec_to_matrix(np.asarray(x[:3], dtype=np.float64))
    D[:3, 3] = np.asarray(x, dtype=np.float64)[3:6] if len(x) >= 6 else 0.0
    return D @ np.asarray(T_cam_lidar, dtype=np.float64)


def extrinsic_error(T_a: np.ndarray, T_b: np.ndarray) -> tuple[float, float]:
    """(rotation degrees, camera position metres) between two ``T_cam_lidar``."""
    T_a, T_b = np.asarray(T_a, np.float64), np.asarray(T_b, np.float64)
    D = T_a @ invert(T_b)
    angle = float(np.linalg.norm(matrix_to_rotvec(D[:3, :3])))
    # camera centres in the LiDAR frame
    c_a, c_b = -T_a[:3, :3].T @ T_a[:3, 3], -T_b[:3, :3].T @ T_b[:3, 3]
    return math.degrees(angle), float(np.linalg.norm(c_a - c_b))


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
    paint_points: int = 0            # of the edge points: reflectance edges (paint)
    found_T_cam_lidar: np.ndarray | None = None   # the optimum, even when not accepted
    spread: dict = field(default_factory=dict)       # disagreement of the two data halves
    time_offset_ns: int | None = None    # with time_offset: add to time_offset_ns (converged)
    found_time_offset_ns: int | None = None          # the optimum, even when not accepted

    def to_dict(self) -> dict:
        out = {'camera': self.camera, 'converged': self.converged, 'reason': self.reason,
               'frames': self.frames, 'edge_points': self.edge_points,
               'paint_points': self.paint_points,
               'initial_score': round(self.initial_score, 4), 'score': round(self.score, 4),
               'rotation_change_deg': round(self.rotation_change_deg, 3),
               'translation_change_cm': round(100 * self.translation_change_m, 2),
               'halves_disagree': {
                   'rotation_deg': round(self.spread.get('rotation_deg', math.nan), 3),
                   'translation_cm': round(100 * self.spread.get('translation_m', math.nan),
                                           2)} if self.spread else None,
               'sharpness': {k: round(v, 4) for k, v in self.sharpness.items()}}
        if self.found_time_offset_ns is not None:
            out['time_offset_ms'] = round(self.time_offset_ns * 1e-6, 2) \
                if self.time_offset_ns is not None else None
            out['found_time_offset_ms'] = round(self.found_time_offset_ns * 1e-6, 2)
            if self.spread:
                out['halves_disagree']['time_ms'] = round(self.spread.get('time_ms', math.nan), 2)
        return out


# rotations about the camera's x (right: pitch), y (down: yaw), z (optical axis: roll) axes,
# then translations along them, then the shift of the capture times (ms)
PARAMETERS = ('pitch', 'yaw', 'roll', 'x', 'y', 'z', 'time')
TIME_PROBE_MS = 20.0         # the time offset's sharpness is measured this far away


def _pattern_search(objective, x0: np.ndarray, steps: np.ndarray, min_steps: np.ndarray,
                    active: np.ndarray, limits: np.ndarray, max_evals: int = 600,
                    valley: np.ndarray | None = None):
    """Maximize ``objective`` by compass search: try +-step on each active axis, move on
    improvement, halve the steps when nothing improves. ``valley`` (len(x),): one more
    direction, searched with the last axis's step (see :func:`_search`)."""
    x, best = x0.copy(), objective(x0)
    steps = steps.copy()
    evals = 1
    axes = np.eye(x.size)
    if valley is not None:
        axes = np.r_[axes, np.asarray(valley, np.float64)[None] / valley[-1]]
        steps, min_steps = np.r_[steps, steps[-1]], np.r_[min_steps, min_steps[-1]]
        active = np.r_[active, active[-1]]
    while evals < max_evals and np.any(steps[active] >= min_steps[active]):
        improved = False
        for i in np.flatnonzero(active & (steps >= min_steps)):
            for sign in (1.0, -1.0):
                cand = x + sign * steps[i] * axes[i]
                if np.any(np.abs(cand) > limits):
                    continue
                value = objective(cand)
                evals += 1
                if value > best + 1e-6:
                    x, best, improved = cand, value, True
                    break
        if not improved:
            steps = steps * 0.5
    return x, best


def _move(T0: np.ndarray, x: np.ndarray, depth: float) -> np.ndarray:
    """``T0`` moved by ``x`` (rotation vector, translation; camera frame) where the
    translation comes with the rotation that keeps points ``depth`` metres ahead in place
    (sideways moves then change only the parallax between near and far points, and the search
    axes stay nearly independent)."""
    comp = np.array([x[4] / depth, -x[3] / depth, 0.0])
    return perturb(T0, np.r_[x[:3] + comp, x[3:6]])


def _travel_per_ms(frames: CameraFrames, T0: np.ndarray) -> np.ndarray:
    """(3,) metres: the ego's mean travel in 1 ms at the frames' capture times, in the axes of
    the camera ``T0``; moving the camera by it keeps the points where a capture time 1 ms
    later puts them."""
    moves = []
    for view in frames.views:
        poses = view.trajectory.pose_at(np.array([view.capture_ns,
                                                  view.capture_ns + 10_000_000], np.int64))
        moves.append((invert(poses[0]) @ poses[1])[:3, 3] / 10.0)
    return np.asarray(T0, np.float64)[:3, :3] @ np.mean(moves, axis=0)


def _evaluate(frames: CameraFrames, x: np.ndarray, depth: float,
              scale: float | None = None) -> float:
    """Score of the move ``x`` (6 extrinsic parameters, see :func:`_move`, and the shift of
    the capture times in ms)."""
    T = _move(frames.camera.T_cam_lidar, x, depth)
    return _score_at(frames, T, x[6] * 1e6, scale) if x[6] else frames.score(T, scale)


def _search(frames: CameraFrames, active: np.ndarray, limits: np.ndarray,
            depth: float, travel: np.ndarray | None = None) -> np.ndarray:
    """The coarse-to-fine compass search of :func:`refine` from the camera's extrinsic and
    stamps: the move ``x`` (see :func:`_evaluate`) of the best score. With ``travel``
    (:func:`_travel_per_ms`) and both translation and time searched, a later capture time
    together with the camera moved by the ego's travel in that time is one more direction:
    along it the points hardly move (only the change of speed between frames shows), so a
    search that has the translation wrong by the travel of the offset it has wrong is not
    stuck there (from 2 degrees, 20 cm and 50 ms off it was, and both halves with it)."""
    x = np.zeros(7)
    valley = None
    if travel is not None and active[3:7].all():
        # a pure translation: without the rotation that _move adds to sideways moves
        valley = np.r_[-travel[1] / depth, travel[0] / depth, 0.0, travel, 1.0]
    f = frames.focal_px
    for scale in frames.scales:
        # step sizes follow the scale: about a scale's worth of pixels at 20 m (10 ms of
        # time at the coarsest scale: 10 cm of travel at 10 m/s)
        rot_step = min(limits[0], scale / f)
        tr_step = min(limits[3], max(0.01, 20.0 * scale / f))
        steps = np.array([rot_step] * 3 + [tr_step] * 3 + [10.0 * scale / SCALES_PX[0]])
        min_steps = np.array([math.radians(0.02)] * 3 + [0.003] * 3 + [0.5])
        x, _ = _pattern_search(lambda p, s=scale: _evaluate(frames, p, depth, s), x,
                               steps, np.maximum(min_steps, steps / 16), active, limits,
                               max_evals=900 if active[6] else 600, valley=valley)
    return x


def refine(frames: CameraFrames, *, translation: bool = True, max_rotation_deg: float = 3.0,
           max_translation_m: float = 0.3, max_spread_deg: float = 0.5,
           max_spread_m: float = 0.1, min_sharpness: float = 0.004,
           verify: bool = True, time_offset: bool = False, max_offset_ms: float = 100.0,
           max_spread_ms: float = 10.0) -> RefineResult:
    """Search the extrinsic of ``frames.camera`` that best aligns silhouettes with image edges.

    Coarse to fine over the scales of ``frames``; rotation within ``max_rotation_deg`` of the
    start, translation (when ``translation``) within ``max_translation_m``. With ``verify``
    the search runs again on each half of the silhouettes (alternate 10-degree sectors of
    azimuth), and the two answers must agree within ``max_spread_deg`` and ``max_spread_m``
    (a noise peak of one frame is sharp too, but the other half of the data does not share
    it). Converged means: enough silhouette points in view, the optimum inside the search
    limits, every searched parameter changing the score (0.5 degree or 5 cm away from the
    optimum the fine score drops by ``min_sharpness``, a quarter of it for translations) and
    the halves agreeing; otherwise the result keeps the initial extrinsic and ``reason`` says
    what was missing. With ``time_offset`` the shift of every image's capture time (within
    ``max_offset_ms``) is searched together with the extrinsic (the frames need capture times
    and ego poses, see :meth:`CameraFrames.add`): a translation along the direction of travel
    and a time offset move the points alike, and only the search over both finds where they
    agree (the speed changes between frames). Its score must drop by ``min_sharpness`` / 4
    ``TIME_PROBE_MS`` away and its halves agree within ``max_spread_ms``.
    """
    cam = frames.camera
    T0 = cam.T_cam_lidar
    n_in_view = frames.points_in_view(T0) if frames.views else 0
    initial = frames.score(T0) if frames.views else 0.0
    result = RefineResult(cam.name, T0.copy(), initial, initial, 0.0, 0.0, False, '',
                          len(frames.views), n_in_view, {},
                          paint_points=frames.points_in_view(T0, paint=True)
                          if frames.views else 0)
    if not frames.views:
        result.reason = 'no frames'
        return result
    if n_in_view < MIN_EDGE_POINTS:
        result.reason = (f'too little structure: {n_in_view} silhouette points in view '
                         f'(need {MIN_EDGE_POINTS}); add frames with nearby objects')
        return result
    if time_offset:
        frames.shifted(0)                   # raises when capture times or ego poses lack
    active = np.array([True] * 3 + [translation] * 3 + [time_offset])
    depth = frames.median_depth(T0)
    # the explicit rotation also makes up for the rotation that comes with a translation
    room = max_translation_m / depth if translation else 0.0
    limits = np.array([math.radians(max_rotation_deg) + room] * 3 + [max_translation_m] * 3
                      + [max_offset_ms])
    travel = _travel_per_ms(frames, T0) if time_offset else None
    x = _search(frames, active, limits, depth, travel)
    T = _move(T0, x, depth)
    best = _evaluate(frames, x, depth)
    result.found_T_cam_lidar = T
    result.score = best
    if time_offset:
        result.found_time_offset_ns = int(round(x[6] * 1e6))
    # how constrained each parameter is: the score drop half a degree / 5 cm / 20 ms away
    for i, name in enumerate(PARAMETERS):
        if active[i]:
            delta = np.zeros(7)
            delta[i] = math.radians(0.5) if i < 3 else 0.05 if i < 6 else TIME_PROBE_MS
            result.sharpness[name] = best - 0.5 * (_evaluate(frames, x + delta, depth)
                                                   + _evaluate(frames, x - delta, depth))
    weak = [k for k, v in result.sharpness.items()
            if v < (min_sharpness if k in PARAMETERS[:3] else min_sharpness / 4)]
    rotation = x[:3] + np.array([x[4] / depth, -x[3] / depth, 0.0])
    at_limit = [PARAMETERS[i] for i in range(3)
                if abs(rotation[i]) > 0.98 * math.radians(max_rotation_deg)]
    at_limit += [PARAMETERS[i] for i in range(3, 6)
                 if active[i] and abs(x[i]) > 0.98 * max_translation_m]
    at_limit += ['time'] if time_offset and abs(x[6]) > 0.98 * max_offset_ms else []
    if weak:
        result.reason = (f'the data does not constrain {", ".join(weak)} (the score changes '
                         f'by less than {min_sharpness} there); add frames with more '
                         'structure at several distances')
        return result
    if at_limit:
        result.reason = (f'the optimum of {", ".join(at_limit)} lies at the search limit '
                         f'({max_rotation_deg} deg, {100 * max_translation_m:.0f} cm'
                         f'{f", {max_offset_ms:g} ms" if time_offset else ""}): the '
                         'input calibration is too far off, or the data misleads')
        return result
    if verify:
        xs = [_search(h, active, limits, depth, travel) for h in frames.halves()]
        rot, pos = extrinsic_error(*(_move(T0, h, depth) for h in xs))
        ms = abs(xs[0][6] - xs[1][6])
        result.spread = {'rotation_deg': rot, 'translation_m': pos if translation else 0.0}
        if time_offset:
            result.spread['time_ms'] = ms
        if rot > max_spread_deg or (translation and pos > max_spread_m) or ms > max_spread_ms:
            result.reason = (f'the two halves of the data disagree by {rot:.2f} deg and '
                             f'{100 * pos:.1f} cm{f" and {ms:.1f} ms" if time_offset else ""} '
                             f'(allowed {max_spread_deg} deg, {100 * max_spread_m:.0f} cm'
                             f'{f", {max_spread_ms:g} ms" if time_offset else ""}): the '
                             'optimum is not reproducible; add frames with more structure')
            return result
    result.converged = True
    if time_offset:
        result.time_offset_ns = result.found_time_offset_ns if best > initial else 0
    if best > initial:
        result.T_cam_lidar = T
        result.rotation_change_deg, result.translation_change_m = extrinsic_error(T, T0)
    return result


@dataclass
class TimeOffsetResult:
    """Outcome of :func:`estimate_time_offset` for one camera."""

    camera: str
    offset_ns: int                   # add to the camera's time_offset_ns (0: not converged)
    initial_score: float
    score: float
    converged: bool
    reason: str                      # why not converged ('' when converged)
    frames: int
    edge_points: int
    ego_motion_m: float = 0.0        # median ego travel over probe_ms around the captures
    sharpness: float = 0.0           # score drop probe_ms away from the optimum
    found_offset_ns: int | None = None   # the optimum, even when not accepted
    spread_ms: float | None = None   # disagreement of the two data halves

    def to_dict(self) -> dict:
        return {'camera': self.camera, 'converged': self.converged, 'reason': self.reason,
                'frames': self.frames, 'edge_points': self.edge_points,
                'offset_ms': round(self.offset_ns * 1e-6, 2),
                'found_offset_ms': None if self.found_offset_ns is None else
                round(self.found_offset_ns * 1e-6, 2),
                'initial_score': round(self.initial_score, 4), 'score': round(self.score, 4),
                'ego_motion_cm': round(100 * self.ego_motion_m, 2),
                'sharpness': round(self.sharpness, 4),
                'halves_disagree_ms': None if self.spread_ms is None else
                round(self.spread_ms, 2)}


def _score_at(frames: CameraFrames, T: np.ndarray, offset_ns: float,
              scale: float | None = None) -> float:
    """Score of ``T`` with every capture time shifted by ``offset_ns``; -inf where the ego
    poses do not reach."""
    try:
        return frames.shifted(int(round(offset_ns))).score(T, scale)
    except MotionError:
        return -math.inf


def _offset_search(frames: CameraFrames, T: np.ndarray, limit_ns: float) -> int:
    """Coarse to fine grid search of the capture time shift (ns) of the best score."""
    x, step, half = 0.0, limit_ns / 10, limit_ns
    for scale in frames.scales:
        grid = np.arange(x - half, x + half + step / 2, step)
        grid = grid[np.abs(grid) <= limit_ns + 1.0]
        values = [_score_at(frames, T, g, scale) for g in grid]
        x = float(grid[int(np.argmax(values))])
        half, step = 2 * step, step / 2
    return int(round(x))


def estimate_time_offset(frames: CameraFrames, *, max_offset_ms: float = 100.0,
                         probe_ms: float = 20.0, min_motion_m: float = 0.02,
                         min_sharpness: float = 0.002, max_spread_ms: float = 10.0,
                         verify: bool = True) -> TimeOffsetResult:
    """The camera-LiDAR time offset that best aligns silhouettes with image edges.

    A 1-D search (coarse to fine over the scales of ``frames``) of the shift of every image's
    capture time within ``max_offset_ms``, the extrinsic held at ``frames.camera``'s: the
    points move with the ego between the LiDAR's and the shifted capture time, so the frames
    need capture times and ego poses (:meth:`CameraFrames.add`). Converged means: enough
    silhouette points in view, an ego that moves (at least ``min_motion_m`` in ``probe_ms``,
    median over the frames: a standing car shows no offset), a score that drops by
    ``min_sharpness`` ``probe_ms`` away from the optimum, the optimum inside the limit, and
    (with ``verify``) the two halves of the data (alternate 10-degree sectors) agreeing
    within ``max_spread_ms``; otherwise ``offset_ns`` is 0 and ``reason`` says why.
    """
    cam = frames.camera
    T = cam.T_cam_lidar
    n = frames.points_in_view(T) if frames.views else 0
    initial = frames.score(T) if frames.views else 0.0
    result = TimeOffsetResult(cam.name, 0, initial, initial, False, '', len(frames.views), n)
    if not frames.views:
        result.reason = 'no frames'
        return result
    probe = int(round(probe_ms * 1e6))
    travel = []
    for v in frames.views:
        if v.capture_ns is None or v.trajectory is None:
            raise AlignmentError('a time offset needs each frame\'s capture time and ego '
                                 'poses (a bag with odometry, pairs with ego poses)')
        try:
            ends = v.trajectory.pose_at(np.array([v.capture_ns - probe // 2,
                                                  v.capture_ns + probe // 2], np.int64))
        except MotionError as exc:
            result.reason = f'the ego poses do not cover a capture time: {exc}'
            return result
        travel.append(float(np.linalg.norm(ends[1, :3, 3] - ends[0, :3, 3])))
    result.ego_motion_m = float(np.median(travel))
    if n < MIN_EDGE_POINTS:
        result.reason = (f'too little structure: {n} silhouette points in view '
                         f'(need {MIN_EDGE_POINTS}); add frames with nearby objects')
        return result
    if result.ego_motion_m < min_motion_m:
        result.reason = (f'the ego moves {100 * result.ego_motion_m:.1f} cm in {probe_ms:g} ms '
                         f'(need {100 * min_motion_m:g} cm): a time offset does not show when '
                         'the drive does not move; use frames where the car drives')
        return result
    limit = max_offset_ms * 1e6
    best = _offset_search(frames, T, limit)
    result.found_offset_ns = best
    result.score = _score_at(frames, T, best)
    result.sharpness = result.score - 0.5 * (_score_at(frames, T, best - probe)
                                             + _score_at(frames, T, best + probe))
    if not math.isfinite(result.score):
        result.reason = 'the ego poses do not cover the capture times (odometry missing)'
        return result
    if not result.sharpness >= min_sharpness:
        result.reason = (f'the score changes by {result.sharpness:.4f} {probe_ms:g} ms away '
                         f'from the optimum (need {min_sharpness}): the data does not '
                         'constrain the time offset; add frames with nearby objects at speed')
        return result
    if abs(best) > 0.98 * limit:
        result.reason = (f'the optimum ({best * 1e-6:+.1f} ms) lies at the search limit '
                         f'({max_offset_ms:g} ms): the offset is larger, or the data misleads')
        return result
    if verify:
        a, b = (_offset_search(h, T, limit) for h in frames.halves())
        result.spread_ms = abs(a - b) * 1e-6
        if result.spread_ms > max_spread_ms:
            result.reason = (f'the two halves of the data disagree by {result.spread_ms:.1f} '
                             f'ms (allowed {max_spread_ms:g}): the optimum is not '
                             'reproducible; add frames')
            return result
    result.converged = True
    result.offset_ns = best
    return result


@dataclass
class AlignmentReport:
    """Health of one camera's calibration (:func:`check_alignment`)."""

    camera: str
    score: float                     # edge alignment of the given calibration
    aligned_score: float             # after the small rotation search
    misalignment_deg: float          # angle of the rotation the data points to
    image_shift_deg: float           # how far that rotation moves the camera's rays (RMS)
    rotation: np.ndarray             # (3,) that rotation, rad, camera frame (x, y, z)
    better_neighbours: float         # share of rotations 0.5 deg away that fit better
    edge_points: int
    frames: int
    enough_structure: bool
    searched: bool = True            # False: the rotation search was skipped (no estimate)

    @property
    def misaligned(self) -> bool:
        """The data says the calibration is off (see :data:`WARN_BETTER_NEIGHBOURS`)."""
        return self.enough_structure and self.better_neighbours > WARN_BETTER_NEIGHBOURS

    def to_dict(self) -> dict:
        return {'camera': self.camera, 'frames': self.frames,
                'edge_points': self.edge_points, 'enough_structure': self.enough_structure,
                'misaligned': self.misaligned,
                'better_neighbours': round(self.better_neighbours, 3),
                'score': round(self.score, 4), 'aligned_score': round(self.aligned_score, 4),
                'misalignment_deg': round(self.misalignment_deg, 3) if self.searched else None,
                'image_shift_deg': round(self.image_shift_deg, 3) if self.searched else None,
                'rotation_deg': [round(math.degrees(v), 3) for v in self.rotation]
                if self.searched else None}


def image_shift_deg(camera: CameraCalibration, rotvec: np.ndarray) -> float:
    """RMS angle (degrees) by which a rotation ``rotvec`` (camera frame, rad) moves the rays
    of a grid over the image: a rotation about the optical axis moves the centre not at all,
    so it counts less than a tilt of the same angle."""
    u, v = np.meshgrid(np.linspace(0, camera.width - 1, 9), np.linspace(0, camera.height - 1, 9))
    K = camera.K
    rays = np.stack([(u.ravel() - K[0, 2]) / K[0, 0], (v.ravel() - K[1, 2]) / K[1, 1],
                     np.ones(u.size)], 1)
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    moved = rays @ rotvec_to_matrix(np.asarray(rotvec, dtype=np.float64)).T
    cos = np.clip((rays * moved).sum(1), -1.0, 1.0)
    return float(np.degrees(np.sqrt(np.mean(np.arccos(cos) ** 2))))


def _neighbours() -> np.ndarray:
    """The 26 unit directions of a 3x3x3 grid around the origin."""
    grid = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)
                     if (i, j, k) != (0, 0, 0)], dtype=np.float64)
    return grid / np.linalg.norm(grid, axis=1, keepdims=True)


def check_alignment(frames: CameraFrames, max_rotation_deg: float = 2.0,
                    probe_deg: float = 0.5, search: bool = True) -> AlignmentReport:
    """The calibration health metric of one camera.

    ``better_neighbours``: the share of the 26 rotations ``probe_deg`` away (a 3x3x3 grid)
    that fit the data better than the current calibration (after Levinson and Thrun, RSS
    2013): near 0 when the calibration sits at the optimum, near half when it is off by about
    ``probe_deg``; above :data:`WARN_BETTER_NEIGHBOURS` the report says misaligned. Also a
    rotation-only search within ``max_rotation_deg``: the rotation it finds is the
    misalignment the data points to (``misalignment_deg``; its effect on the image,
    ``image_shift_deg``), informative once several frames agree; ``search=False`` skips it
    (the verdict does not need it, and it costs most of the time).
    """
    cam = frames.camera
    T0 = cam.T_cam_lidar
    n = frames.points_in_view(T0) if frames.views else 0
    score = frames.score(T0) if n else 0.0
    if n < MIN_EDGE_POINTS:
        return AlignmentReport(cam.name, score, score, 0.0, 0.0, np.zeros(3), 0.0, n,
                               len(frames.views), False)
    probe = math.radians(probe_deg)
    scale = float(frames._scale_of(np.array([probe * frames.focal_px / 2]))[0])
    base = frames.score(T0, scale)
    better = np.mean([frames.score(perturb(T0, probe * d), scale) > base
                      for d in _neighbours()])
    aligned, rotvec = score, np.zeros(3)
    if search:
        result = refine(frames, translation=False, max_rotation_deg=max_rotation_deg,
                        min_sharpness=0.0, verify=False)
        T = result.found_T_cam_lidar if result.found_T_cam_lidar is not None else T0
        rotvec = matrix_to_rotvec((T @ invert(T0))[:3, :3])
        aligned = max(result.score, score)
    return AlignmentReport(cam.name, score, aligned,
                           math.degrees(float(np.linalg.norm(rotvec))),
                           image_shift_deg(cam, rotvec), rotvec, float(better), n,
                           len(frames.views), True, search)


@dataclass(frozen=True)
class HealthSettings:
    """Calibration health of every camera, from the sweeps and images themselves."""

    enabled: bool = setting(True, 'check each camera\'s calibration against the data '
                            '(silhouettes and paint of the sweeps on image edges)')
    sweep_stride: int = setting(10, 'use one synchronized set in this many (nearby sweeps '
                                'repeat the same view)', ge=1)
    window: int = setting(10, 'sets kept per camera; the check uses all of them', ge=1,
                          le=100)
    check_every: int = setting(10, 'run the check after this many new sets (about 2 s of '
                               'a busy CPU core per camera for 10 sets of 800-pixel-wide '
                               'images)', ge=1)
    min_frames: int = setting(3, 'sets needed before a camera gets a verdict (one set '
                              'decides badly on real scenes)', ge=1)
    max_width: int = setting(800, 'images are scored at most this wide (halved until they '
                             'fit)', ge=64)
    warn_better_neighbours: float = setting(
        WARN_BETTER_NEIGHBOURS, 'misaligned above this share of rotations 0.5 deg away that '
        'fit the data better than the calibration', gt=0.0, lt=1.0)
    refuse_misaligned: bool = setting(False, 'leave a camera whose last check says misaligned '
                                      'out of the pairs (its image and correspondences); a set '
                                      'with every camera left out is not recorded')


@dataclass
class CameraHealth:
    """The last verdict on one camera (:class:`HealthMonitor`)."""

    camera: str
    status: str                       # 'ok', 'misaligned' or 'unknown'
    message: str
    report: AlignmentReport | None = None

    def to_dict(self) -> dict:
        return {'camera': self.camera, 'status': self.status, 'message': self.message,
                **({'report': self.report.to_dict()} if self.report else {})}


class HealthMonitor:
    """Calibration health of every camera of a rig over its last sweeps (no ROS).

    Call :meth:`add` with each synchronized set (sweep + images); it keeps one set in
    ``sweep_stride`` and the last ``window`` of them per camera, and every ``check_every`` kept
    sets runs :func:`check_alignment` per camera (returning the new verdicts; None otherwise).
    :meth:`health` gives the last verdict, :meth:`refuses` whether pairs from a camera should
    not be recorded. A set a camera cannot use (its image uniform or the wrong size) is counted
    in its message, not raised.
    """

    def __init__(self, rig: RigCalibration, settings: HealthSettings = HealthSettings(),
                 pause: Callable[[], Any] | None = None):
        self.rig = rig
        self.settings = settings
        self.pause = pause  # see CameraFrames.pause: called between the steps of the work
        self._frames = {c.name: self._new_frames(c) for c in rig.cameras}
        self._health = {c.name: CameraHealth(c.name, 'unknown', 'no sweep checked yet')
                        for c in rig.cameras}
        self._skipped = collections.Counter()
        self._seen = 0
        self._kept = 0

    def _new_frames(self, camera: CameraCalibration) -> CameraFrames:
        return CameraFrames(camera, max_width=self.settings.max_width, pause=self.pause)

    def add(self, xyz: np.ndarray, images: dict, *, ring: np.ndarray | None = None,
            intensity: np.ndarray | None = None, point_time_ns: np.ndarray | None = None,
            capture_ns: dict | None = None, trajectory=None) -> dict | None:
        """One synchronized set: ``xyz`` (N, 3) LiDAR frame, ``images`` {camera name: RGB
        (H, W, 3) uint8}; optional ``ring`` (N,), ``intensity`` (N,) (reflectance edges),
        ``point_time_ns`` (N,) with ``capture_ns``
        {camera name: true capture time ns} and a ``trajectory`` for motion compensation.
        Returns {camera name: :class:`CameraHealth`} when a check ran, else None."""
        if not self.settings.enabled:
            return None
        self._seen += 1
        if (self._seen - 1) % self.settings.sweep_stride:
            return None
        names = [n for n in images if n in self._frames]
        if not names:
            return None
        if self.pause is not None:
            self.pause()
        stamps = None
        if capture_ns is not None and all(n in capture_ns for n in names):
            stamps = np.array([capture_ns[n] for n in names], np.int64)
        try:
            ref, T, found = prepare_sweep(xyz, ring=ring, intensity=intensity,
                                          point_time_ns=point_time_ns, capture_ns=stamps,
                                          trajectory=trajectory)
        except AlignmentError as exc:
            for n in names:
                self._skipped[(n, str(exc))] += 1
            return None
        for i, n in enumerate(names):
            frames = self._frames[n]
            try:
                frames.add(ref, images[n], ring=ring, found=found,
                           T_capture_sweep=None if T is None else T[i])
            except AlignmentError as exc:
                self._skipped[(n, str(exc))] += 1
                continue
            del frames.views[:-self.settings.window]
        self._kept += 1
        if self._kept % self.settings.check_every:
            return None
        return self.check()

    def check(self) -> dict:
        """Run the check on every camera now; {camera name: :class:`CameraHealth`}."""
        for name, frames in self._frames.items():
            self._health[name] = self._verdict(name, frames)
            frames.release()
        return dict(self._health)

    def _verdict(self, name: str, frames: CameraFrames) -> CameraHealth:
        skipped = sum(v for (n, _), v in self._skipped.items() if n == name)
        why = [m for (n, m) in self._skipped if n == name]
        note = f'; {skipped} set(s) unusable: {why[-1]}' if skipped else ''
        if len(frames.views) < self.settings.min_frames:
            return CameraHealth(name, 'unknown', f'{len(frames.views)} of '
                                f'{self.settings.min_frames} sets needed so far{note}')
        report = check_alignment(frames, search=False)
        if report.better_neighbours > self.settings.warn_better_neighbours:
            report = check_alignment(frames)           # how far off: worth the search now
        if not report.enough_structure:
            return CameraHealth(name, 'unknown', f'too little structure: '
                                f'{report.edge_points} silhouette points in view '
                                f'(need {MIN_EDGE_POINTS}){note}', report)
        if report.better_neighbours > self.settings.warn_better_neighbours:
            return CameraHealth(name, 'misaligned', f'{100 * report.better_neighbours:.0f}% of '
                                'the rotations 0.5 deg away fit better; the data points to '
                                f'{report.misalignment_deg:.2f} deg off ({report.frames} '
                                f'sets){note}', report)
        return CameraHealth(name, 'ok', f'aligned: {100 * report.better_neighbours:.0f}% of '
                            f'the rotations 0.5 deg away fit better ({report.frames} sets)'
                            f'{note}', report)

    def use(self, rig: RigCalibration) -> list[str]:
        """Take the calibration of ``rig``'s cameras (a set's rig, e.g. with intrinsics from
        CameraInfo): a camera new to the monitor, or whose calibration changed, starts over
        (its sets dropped, its verdict unknown); the others keep theirs. The names that
        started over."""
        fresh = [c for c in rig.cameras if c.name not in self._frames
                 or not _same_camera(self._frames[c.name].camera, c)]
        for cam in fresh:
            self._frames[cam.name] = self._new_frames(cam)
            self._health[cam.name] = CameraHealth(cam.name, 'unknown', 'no sweep checked yet')
            for key in [k for k in self._skipped if k[0] == cam.name]:
                del self._skipped[key]
        if fresh:
            self.rig = RigCalibration(tuple(f.camera for f in self._frames.values()),
                                      self.rig.lidar_frame)
        return [c.name for c in fresh]

    def health(self, camera: str) -> CameraHealth:
        """The last verdict on ``camera``."""
        return self._health[camera]

    def refuses(self, camera: str) -> bool:
        """Whether pairs from ``camera`` should not be recorded now (``refuse_misaligned``
        and the last verdict says misaligned)."""
        return (self.settings.refuse_misaligned and camera in self._health
                and self._health[camera].status == 'misaligned')


def _same_camera(a: CameraCalibration, b: CameraCalibration) -> bool:
    """Whether two calibrations project alike (size, intrinsics, distortion, extrinsic)."""
    return ((a.width, a.height, a.distortion_model) == (b.width, b.height, b.distortion_model)
            and np.array_equal(a.K, b.K) and np.array_equal(a.D, b.D)
            and np.array_equal(a.T_cam_lidar, b.T_cam_lidar))

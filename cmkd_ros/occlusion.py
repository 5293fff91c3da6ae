"""Occlusion test that adapts to the LiDAR's own scan pattern: nothing to tune per sensor.

A camera mounted away from the LiDAR sees some LiDAR points behind nearer surfaces (parallax).
Those surfaces are known only through their own LiDAR samples, so how far each sample's surface
reaches depends on how densely the sensor samples around it: the azimuth step and the spacing
of the beams there (0.17 deg to 6 deg on one Pandar64). Both are read from the sweep itself:

1. :func:`infer_scan_pattern`: the azimuth step (median step between neighbours on one beam)
   and the beam spacing above and below every elevation, from the ``ring`` field when the cloud
   has one (the beam table: each ring's median elevation), else from the sweep's own elevation
   statistics (per azimuth column, the gaps between successive returns; their median per
   elevation band);
2. each point gets a footprint: ``footprint`` times the sampling step to each side (left,
   right, below, above). Its edges lie at the point's range, or, where the neighbouring sample
   of the range image lies on the same surface (inverse range continuing linearly), part of the
   way towards it, so that a receding surface (the road) keeps its shape from another viewpoint;
3. per camera, the footprints are seen from the camera centre (the baseline comes from the
   calibration): azimuth about the LiDAR's z axis and elevation, so scan lines stay horizontal
   whatever the camera's mounting, intrinsics or distortion;
4. a point is hidden when a nearer footprint contains its direction (tested at the point's own
   direction, not at a cell of a grid: where cell edges fall would decide otherwise), or
   nearer footprints lie on both sides of it (left and right, or below and above) within
   ``reach`` times its own sampling step (a lost return leaves a hole between footprints; a
   z-buffer of angular cells keeps the nearest camera distance ``rho`` over them), nearer
   meaning by more than ``abs_tolerance + rel_tolerance * rho``;
5. nearer by less than that, it is hidden when the nearest footprint over its direction is
   that of a sample inside its surface (range-image neighbours on that surface all around) and
   the point lies behind that surface's plane, seen from the camera, by more than
   ``plane_abs_tolerance + plane_rel_tolerance * rho`` (a kerb's top hiding the road just
   behind it); a surface seen at a grazing angle, whose nearer samples overlap its farther
   ones, never hides itself;
6. given the sweep before (the LiDAR moved since: it sampled the same edges elsewhere), its
   points hide too, with footprints of ``PREVIOUS_FOOTPRINT`` of their step, except those the
   current sweep sees past (:func:`not_ghosts`: things that moved).

Measured on the synthetic presets against ground-truth depth: ``benchmarks/measure_occlusion.py``
(table in docs/occlusion.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

# Points nearer than this (m) to the LiDAR carry no scan pattern (ego body, noise).
MIN_RANGE_M = 0.5
# Beam spacing statistics use points at least this far (m): nearby, the offsets of the lasers
# from the sensor origin bend the elevations (HDL-64E).
_STATS_RANGE_M = 3.0
# Elevation band (rad) that holds one beam when the azimuth step is measured without rings.
_SAME_BEAM_RAD = math.radians(0.02)
# Gaps (rad) between returns of one azimuth column: smaller ones are the same beam twice,
# larger ones an edge against the sky.
_MIN_GAP_RAD = math.radians(0.05)
_MAX_GAP_RAD = math.radians(12.0)
# Elevation bands (rad) of the spacing profile, and the fewest gaps that make a band.
_BAND_RAD = math.radians(0.25)
_MIN_BAND_GAPS = 12
# Largest azimuth step between neighbours on one beam (rad).
_MAX_STEP_RAD = math.radians(5.0)
# Two range-image neighbours lie on one surface when their inverse ranges differ by less than
# this (1/m) times the angle between them (planes nearer than 1 m at grazing incidence are not
# expected) and the inverse-range slope does not bend by more than half (plus noise, 1/m/rad).
_CONTINUITY = 1.0
_SLOPE_CHANGE = 0.5
_SLOPE_NOISE = 0.01
# Cells per camera z-buffer at most; beyond, the cells grow (coarser but bounded memory).
_MAX_CELLS = 4_000_000
# A footprint or a reach spans at most this many cells along each axis.
_MAX_SPAN_CELLS = 64


class ScanPatternError(ValueError):
    """The sweep holds too few points to read its scan pattern."""


@dataclass(frozen=True, eq=False)
class ScanPattern:
    """How a spinning LiDAR samples directions (its spin axis is the LiDAR frame's z).

    ``elevation_deg`` (K,) ascending: the beam table (``source`` 'ring field') or the centres of
    the elevation bands of the profile ('elevation statistics'); ``spacing_up_deg`` and
    ``spacing_down_deg`` (K,): the angle to the next beam above and below there;
    ``ring_ids`` (K,) the ring of each table row ('ring field' only, else empty).
    """

    azimuth_step_deg: float
    elevation_deg: np.ndarray
    spacing_up_deg: np.ndarray
    spacing_down_deg: np.ndarray
    source: str
    ring_ids: np.ndarray

    @property
    def beams(self) -> int:
        """Number of beams: the rings, or the elevation span over the spacing profile."""
        if self.ring_ids.size:
            return int(self.ring_ids.size)
        return int(round(float(self._beam_coordinate()[-1]))) + 1

    def _beam_coordinate(self) -> np.ndarray:
        """(K,) continuous beam index at each knot (0 at the lowest)."""
        if self.elevation_deg.size < 2:
            return np.zeros(1)
        mid = 0.5 * (self.spacing_up_deg[:-1] + self.spacing_down_deg[1:])
        return np.r_[0.0, np.cumsum(np.diff(self.elevation_deg) / np.maximum(mid, 1e-3))]

    def describe(self) -> str:
        """One line for logs: source, beams, elevation span, spacing and azimuth step."""
        s = self.to_dict()
        if self.source == 'configuration':
            return (f'fixed scan pattern from the configuration: beam spacing '
                    f'{s["beam_spacing_deg"][0]:.2f} deg, azimuth step '
                    f'{s["azimuth_step_deg"]:.3f} deg')
        return (f'scan pattern from the {s["source"]}: {s["beams"]} beams over '
                f'{s["elevation_deg"][0]:+.1f}..{s["elevation_deg"][1]:+.1f} deg, beam spacing '
                f'{s["beam_spacing_deg"][0]:.2f}..{s["beam_spacing_deg"][1]:.2f} deg, azimuth '
                f'step {s["azimuth_step_deg"]:.3f} deg')

    def to_dict(self) -> dict:
        """JSON-safe summary (no per-beam arrays)."""
        return {'source': self.source, 'beams': self.beams,
                'elevation_deg': [round(float(self.elevation_deg.min()), 3),
                                  round(float(self.elevation_deg.max()), 3)],
                'beam_spacing_deg': [round(float(self.spacing_up_deg.min()), 3),
                                     round(float(self.spacing_up_deg.max()), 3)],
                'azimuth_step_deg': round(self.azimuth_step_deg, 4)}

    def _rows(self, ring: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Table row of each ring and whether the table knows it (rings only)."""
        ring = np.asarray(ring).reshape(-1).astype(np.int64)
        order = np.argsort(self.ring_ids)
        pos = np.clip(np.searchsorted(self.ring_ids[order], ring), 0, order.size - 1)
        known = self.ring_ids[order][pos] == ring
        return order[pos], known

    def beams_at(self, elevation: np.ndarray, ring: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per point of ``elevation`` (N,) rad and ``ring`` (N,): the beam spacing above and
        below (float32 rad) and the beam row counted from the lowest (int64).

        A ring known to the table picks its row; otherwise the elevation interpolates the
        profile (the row: beam spacings above the lowest elevation, rounded).
        """
        el = np.degrees(np.asarray(elevation, dtype=np.float64))
        knots, w = self.elevation_deg, self._beam_coordinate()
        up = np.interp(el, knots, self.spacing_up_deg)
        down = np.interp(el, knots, self.spacing_down_deg)
        coord = np.interp(el, knots, w)
        coord = np.where(el < knots[0], (el - knots[0]) / max(self.spacing_down_deg[0], 1e-3),
                         coord)
        coord = np.where(el > knots[-1],
                         w[-1] + (el - knots[-1]) / max(self.spacing_up_deg[-1], 1e-3), coord)
        rows = np.rint(coord).astype(np.int64)
        if ring is not None and self.ring_ids.size:
            row, known = self._rows(ring)
            up[known] = self.spacing_up_deg[row[known]]
            down[known] = self.spacing_down_deg[row[known]]
            rows[known] = np.rint(w[row[known]]).astype(np.int64)
        return np.radians(up).astype(np.float32), np.radians(down).astype(np.float32), rows

    def point_spacing(self, xyz: np.ndarray, ring: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(N,) float32 beam spacing above and below each point of ``xyz`` (N, 3) (rad)."""
        up, down, _ = self.beams_at(_elevation(xyz), ring)
        return up, down


def _elevation(xyz: np.ndarray) -> np.ndarray:
    xyz = np.asarray(xyz, dtype=np.float32)
    return np.arctan2(xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1]))


def _group_medians(keys: np.ndarray, values: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct ``keys``, the median of ``values`` per key, and the count per key."""
    if keys.size == 0:
        return keys, values.astype(np.float64), np.zeros(0, np.int64)
    order = np.lexsort((values, keys))
    k, v = keys[order], values[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    counts = np.diff(np.r_[starts, k.size])
    lo = starts + (counts - 1) // 2
    hi = starts + counts // 2
    return k[starts], 0.5 * (v[lo] + v[hi]), counts


def _azimuth_step(beam: np.ndarray, azimuth: np.ndarray) -> float:
    """Median step between successive azimuths of one beam (rad)."""
    order = np.lexsort((azimuth, beam))
    b, a = beam[order], azimuth[order]
    steps = (a[1:] - a[:-1])[b[1:] == b[:-1]]
    steps = steps[(steps > 1e-6) & (steps < _MAX_STEP_RAD)]
    if steps.size < 10:
        raise ScanPatternError(f'too few neighbours along the beams ({steps.size}) to measure '
                               'the azimuth step')
    return float(np.median(steps))


def _spacing_table(elevation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spacing above and below each row of an ascending elevation table (ends repeated)."""
    gaps = np.diff(elevation)
    if gaps.size == 0:
        return np.ones(1), np.ones(1)
    return np.r_[gaps, gaps[-1]], np.r_[gaps[0], gaps]


def infer_scan_pattern(xyz: np.ndarray, ring: np.ndarray | None = None) -> ScanPattern:
    """The :class:`ScanPattern` of one sweep ``xyz`` (N, 3), LiDAR frame (z = spin axis).

    With ``ring`` (N,) (a driver's beam index, any numbering) the beam table is each ring's
    median elevation; without, the spacing comes from elevation statistics. Raises
    :class:`ScanPatternError` when the sweep is too small to tell.
    """
    xyz = np.asarray(xyz, dtype=np.float32)
    r2 = np.einsum('ij,ij->i', xyz, xyz)
    keep = np.isfinite(r2) & (r2 > MIN_RANGE_M ** 2)
    if keep.sum() < 100:
        raise ScanPatternError(f'{int(keep.sum())} points farther than {MIN_RANGE_M} m: too few '
                               'to read the scan pattern')
    el = _elevation(xyz[keep]).astype(np.float64)
    az = np.mod(np.arctan2(xyz[keep, 1], xyz[keep, 0]).astype(np.float64), 2 * np.pi)
    if ring is not None:
        ring = np.asarray(ring).reshape(-1)[keep].astype(np.int64)
        ids, table, _ = _group_medians(ring, el)
        if ids.size >= 2:
            order = np.argsort(table)
            up, down = _spacing_table(table[order])
            return ScanPattern(math.degrees(_azimuth_step(ring, az)),
                               np.degrees(table[order]), np.degrees(up), np.degrees(down),
                               'ring field', ids[order])
    # 1. azimuth step: successive returns inside thin elevation bands (one beam each).
    step = _azimuth_step(np.floor(el / _SAME_BEAM_RAD).astype(np.int64), az)
    # 2. per azimuth column, the elevation gaps between successive returns (away from the
    #    sensor, where the lasers' own offsets do not bend the elevations).
    far = r2[keep] > _STATS_RANGE_M ** 2
    if far.sum() >= 100:
        el, az = el[far], az[far]
    column = np.rint(az / step).astype(np.int64)
    order = np.lexsort((el, column))
    c, e = column[order], el[order]
    gap = e[1:] - e[:-1]
    ok = (c[1:] == c[:-1]) & (gap > _MIN_GAP_RAD) & (gap < _MAX_GAP_RAD)
    # 3. per elevation band, the median gap above (from the lower return) and below.
    lower, upper, gap = e[:-1][ok], e[1:][ok], gap[ok]
    bands_up, med_up, n_up = _group_medians(np.floor(lower / _BAND_RAD).astype(np.int64), gap)
    bands_dn, med_dn, n_dn = _group_medians(np.floor(upper / _BAND_RAD).astype(np.int64), gap)
    bands_up, med_up = bands_up[n_up >= _MIN_BAND_GAPS], med_up[n_up >= _MIN_BAND_GAPS]
    bands_dn, med_dn = bands_dn[n_dn >= _MIN_BAND_GAPS], med_dn[n_dn >= _MIN_BAND_GAPS]
    if bands_up.size == 0 or bands_dn.size == 0:
        raise ScanPatternError('no elevation band holds enough returns to measure the beam '
                               'spacing')
    bands = np.union1d(bands_up, bands_dn)
    centre = (bands + 0.5) * _BAND_RAD
    up = np.interp(centre, (bands_up + 0.5) * _BAND_RAD, med_up)
    down = np.interp(centre, (bands_dn + 0.5) * _BAND_RAD, med_dn)
    return ScanPattern(math.degrees(step), np.degrees(centre), np.degrees(up),
                       np.degrees(down), 'elevation statistics', np.zeros(0, np.int64))


def with_overrides(pattern: ScanPattern | None, azimuth_step_deg: float = 0.0,
                   beam_spacing_deg: float = 0.0) -> ScanPattern:
    """``pattern`` with a fixed azimuth step and/or one beam spacing for every beam (values
    > 0 replace; ``pattern`` may be None when both are given)."""
    if pattern is None:
        if not (azimuth_step_deg > 0 and beam_spacing_deg > 0):
            raise ScanPatternError('a fixed scan pattern needs both the azimuth step and the '
                                   'beam spacing')
        one = np.ones(1)
        return ScanPattern(float(azimuth_step_deg), np.zeros(1), one * beam_spacing_deg,
                           one * beam_spacing_deg, 'configuration', np.zeros(0, np.int64))
    if azimuth_step_deg > 0:
        pattern = replace(pattern, azimuth_step_deg=float(azimuth_step_deg),
                          source=f'{pattern.source} and configuration')
    if beam_spacing_deg > 0:
        same = np.full(pattern.elevation_deg.shape, float(beam_spacing_deg))
        pattern = replace(pattern, spacing_up_deg=same, spacing_down_deg=same,
                          source=f'{pattern.source} and configuration')
    return pattern


def camera_baselines(rig) -> dict[str, float]:
    """Distance (m) of each camera centre from the LiDAR origin (from ``T_cam_lidar``)."""
    return {c.name: float(np.linalg.norm(c.T_cam_lidar[:3, :3].T @ c.T_cam_lidar[:3, 3]))
            for c in rig.cameras}


# ----------------------------------------------------------------------------- the test


@dataclass(frozen=True)
class OcclusionSettings:
    """Numbers of the test (see the module docstring); defaults chosen in docs/occlusion.md and
    used by :class:`cmkd_ros.projection.CorrespondenceConfig` as its own."""

    footprint: float = 0.65
    reach: float = 0.75
    abs_tolerance: float = 0.4
    rel_tolerance: float = 0.075
    plane_abs_tolerance: float = 0.1
    plane_rel_tolerance: float = 0.01


_MAX_ROWS = 1024        # beam rows of a range image (the densest LiDAR has 128)

@dataclass(frozen=True, eq=False)
class _RangeImage:
    """A sweep as a range image: ``image`` (rows, columns) holds the index of the return in
    each cell (-1: none; a margin row below and above the beams); ``row``, ``col`` (N,) each
    return's cell."""

    image: np.ndarray
    row: np.ndarray
    col: np.ndarray


def _range_image(azimuth: np.ndarray, row: np.ndarray, inv: np.ndarray, step: float
                 ) -> _RangeImage:
    """Range image of a sweep given per point (N,): ``azimuth`` (rad), beam ``row`` and
    inverse range ``inv`` (NaN: no return) with columns of the azimuth ``step`` (rad)."""
    cols = max(1, int(round(2 * np.pi / step)))
    col = np.rint(np.mod(azimuth, 2 * np.pi) * (cols / (2 * np.pi))).astype(np.int64) % cols
    ok = np.isfinite(inv)
    if ok.any() and int(row[ok].max()) - int(row[ok].min()) > _MAX_ROWS:
        # beam rows no LiDAR has (a corrupt ring field): rank them instead
        row = np.unique(row, return_inverse=True)[1].reshape(-1)
    row = np.where(ok, row - (row[ok].min() if ok.any() else 0) + 1, 0)
    image = np.full((int(row.max()) + 2, cols), -1, dtype=np.int64)
    image[row[ok], col[ok]] = np.flatnonzero(ok)
    return _RangeImage(image, row, col)


def _edge_inverse_ranges(sweep: _RangeImage, inv: np.ndarray, points: np.ndarray,
                         up: np.ndarray, down: np.ndarray, step: float, fraction: float
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(4, K) float32 inverse ranges (1/m) of the footprint edges (left, right, below, above)
    of ``points`` (K,) of a ``sweep`` with inverse ranges ``inv`` (N,) (NaN: no return);
    ``up``, ``down`` (K,) the wanted points' beam spacing (rad); ``step`` the azimuth step
    (rad); and (4, K) bool: the edge reaches towards a neighbour on the point's surface.

    Along each direction an edge lies ``fraction`` of the way to the neighbouring sample of the
    range image when both lie on one surface, else it continues the surface from the opposite
    neighbour, else it stays at the point's own range; it never moves beyond half or twice that
    range.
    """
    image, row, col = sweep.image, sweep.row, sweep.col
    cols = image.shape[1]
    # the four neighbours of every wanted point; slopes of inverse range per radian.
    p_row, p_col, p_inv = row[points], col[points], inv[points]
    shifts = ((0, -1, step), (0, 1, step), (-1, 0, down), (1, 0, up))
    nb_inv, near, slope = [], [], []
    with np.errstate(invalid='ignore', divide='ignore'):     # a zero spacing: slope inf
        for dr, dc, angle in shifts:
            nb = image[p_row + dr, (p_col + dc) % cols]
            v = np.where(nb >= 0, inv[nb], np.nan)
            nb_inv.append(v)
            near.append(np.abs(v - p_inv) < _CONTINUITY * angle)
            slope.append((v - p_inv) / angle)
        out = np.empty((4, points.size), np.float32)
        towards = np.empty((4, points.size), bool)
        for k in range(4):
            o = k ^ 1                                  # the opposite direction
            # 3. one surface: near in inverse range and the slope goes on across the point.
            bend = np.abs(slope[k] + slope[o]) > _SLOPE_CHANGE * np.maximum(
                np.abs(slope[k]), np.abs(slope[o])) + _SLOPE_NOISE
            same_k = near[k] & ~(near[o] & bend)
            same_o = near[o] & ~(near[k] & bend)
            edge = np.where(same_k, p_inv + fraction * (nb_inv[k] - p_inv),
                            np.where(same_o, p_inv - fraction * (nb_inv[o] - p_inv), p_inv))
            out[k] = np.clip(edge, 0.5 * p_inv, 2.0 * p_inv)
            towards[k] = same_k
    return out, towards


def _surface_normals(sweep: _RangeImage, xyz: np.ndarray, inv: np.ndarray,
                     points: np.ndarray, up: np.ndarray, down: np.ndarray, step: float
                     ) -> np.ndarray:
    """(K, 3) float32 unit normals (LiDAR frame) of the surface at ``points`` (K,): the cross
    product of the tangents along the beam and across the beams, each between the two
    range-image neighbours; NaN unless all four neighbours lie on the point's surface (a sample
    at an edge: where its surface ends is not known). Arguments as for
    :func:`_edge_inverse_ranges`."""
    image, row, col = sweep.image, sweep.row, sweep.col
    cols = image.shape[1]
    p_row, p_col, p_inv = row[points], col[points], inv[points]
    tangents = []
    with np.errstate(invalid='ignore'):
        for dr, dc, ahead, behind in ((0, 1, step, step), (1, 0, up, down)):
            ends = []
            for sign, angle in ((1, ahead), (-1, behind)):
                nb = image[p_row + sign * dr, (p_col + sign * dc) % cols]
                on = (nb >= 0) & (np.abs(inv[nb] - p_inv) < _CONTINUITY * angle)
                ends.append(np.where(on, nb, -1))
            t = xyz[ends[0]] - xyz[ends[1]]
            t[(ends[0] < 0) | (ends[1] < 0)] = np.nan
            tangents.append(t)
        normal = np.cross(tangents[0], tangents[1])
        return (normal / np.linalg.norm(normal, axis=1, keepdims=True)).astype(np.float32)


def _footprint_offsets(p: np.ndarray, horiz: np.ndarray, inv_r: np.ndarray,
                       azimuth_step: float, up: np.ndarray, down: np.ndarray, fraction: float,
                       edge_inv: np.ndarray) -> np.ndarray:
    """(4, K, 3) float32 offsets (LiDAR frame) from points ``p`` (K, 3) to their footprint
    edges: left, right, below, above, ``fraction`` of the sampling step away at the edges'
    inverse ranges ``edge_inv`` (4, K); ``horiz`` and ``inv_r`` the points' horizontal
    distance and inverse range."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    horiz = np.maximum(horiz, np.float32(1e-6))
    out = np.empty((4,) + p.shape, np.float32)
    # 1. left and right: the point turned about z by one fraction of the azimuth step.
    turn = fraction * azimuth_step
    c, s = np.float32(math.cos(turn)), np.float32(math.sin(turn))
    for i, sign in ((0, -1), (1, 1)):
        k = inv_r / edge_inv[i]
        out[i, :, 0] = (c * x - sign * s * y) * k - x
        out[i, :, 1] = (sign * s * x + c * y) * k - y
        out[i, :, 2] = z * k - z
    # 2. below and above: turned in its vertical plane by a fraction of the beam spacing.
    for i, angle in ((2, -fraction * down), (3, fraction * up)):
        c, s = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
        k = inv_r / edge_inv[i]
        h = (horiz * c - z * s) / horiz
        out[i, :, 0] = x * h * k - x
        out[i, :, 1] = y * h * k - y
        out[i, :, 2] = (z * c + horiz * s) * k - z
    return out


def _camera_angles(direction: np.ndarray, forward: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Azimuth from the camera axis, elevation and distance of (M, 3) directions."""
    horiz = np.hypot(direction[:, 0], direction[:, 1])
    alpha = np.arctan2(direction[:, 1], direction[:, 0]) - forward
    alpha = np.remainder(alpha + np.float32(np.pi), np.float32(2 * np.pi)) - np.float32(np.pi)
    return alpha, np.arctan2(direction[:, 2], horiz), np.hypot(horiz, direction[:, 2])


# The previous sweep's points cover this fraction of their sampling step: they add samples
# between the current sweep's, not another overhang past every edge (docs/occlusion.md).
PREVIOUS_FOOTPRINT = 0.3
# A previous point is a ghost when the current sweep saw past it in its direction: every return
# of the current sweep around that direction farther by more than this (m, and fraction).
_GHOST_ABS_M, _GHOST_REL = 0.3, 0.03


def _inverse_range(rng: np.ndarray) -> np.ndarray:
    """1 / ``rng`` (float32), NaN for returns nearer than ``MIN_RANGE_M`` (no scan pattern)."""
    with np.errstate(divide='ignore', invalid='ignore'):
        return np.where(rng > MIN_RANGE_M, np.float32(1.0) / rng, np.float32(np.nan))


def sweep_footprints(xyz: np.ndarray, points: np.ndarray, pattern: ScanPattern,
                     ring: np.ndarray | None = None, fraction: float = PREVIOUS_FOOTPRINT,
                     normals: bool = False):
    """(4, K, 3) float32 offsets from ``points`` (K,) of a sweep ``xyz`` (N, 3) (as measured,
    LiDAR frame) to their footprint edges (left, right, below, above), ``fraction`` of the
    sampling step of ``pattern`` away (``ring`` (N,) if known), and (4, K) bool: which edges
    reach towards a neighbour on the point's surface (the others overhang where it ends);
    with ``normals`` also their (K, 3) surface normals (:func:`_surface_normals`)."""
    xyz = np.asarray(xyz, dtype=np.float32)
    step = math.radians(pattern.azimuth_step_deg)
    horiz = np.hypot(xyz[:, 0], xyz[:, 1])
    rng = np.hypot(horiz, xyz[:, 2])
    inv = _inverse_range(rng)
    up, down, row = pattern.beams_at(np.arctan2(xyz[:, 2], horiz), ring)
    up, down = up[points], down[points]
    sweep = _range_image(np.arctan2(xyz[:, 1], xyz[:, 0]), row, inv, step)
    edges, towards = _edge_inverse_ranges(sweep, inv, points, up, down, step, fraction)
    inv_r = np.float32(1.0) / np.maximum(rng[points], np.float32(MIN_RANGE_M))
    offsets = _footprint_offsets(xyz[points], horiz[points], inv_r, step, up, down, fraction,
                                 edges)
    if not normals:
        return offsets, towards
    return offsets, towards, _surface_normals(sweep, xyz, inv, points, up, down, step)


def not_ghosts(current: np.ndarray, previous: np.ndarray, pattern: ScanPattern,
               edges_only: bool = False) -> np.ndarray:
    """(K,) bool: which ``previous`` (K, 3) points the ``current`` sweep (N, 3) does not see
    past, both in one LiDAR frame (after motion compensation). In the range image of the
    current sweep (rows from the elevations, as ``pattern``'s beams) a previous point is a
    ghost, something that moved or a spurious return, when every current return in its cell
    and the eight around lies farther than it by more than 0.3 m + 3 % (or there is none):
    the LiDAR now sees through where it was. ``edges_only``: also only points whose cell and
    the eight around hold an edge of the current sweep (returns further apart than that, or a
    missing one): inside a surface the current footprints cover everything already."""
    def cells(p):
        horiz = np.hypot(p[:, 0], p[:, 1])
        rows = pattern.beams_at(np.arctan2(p[:, 2], horiz))[2]
        return rows, np.arctan2(p[:, 1], p[:, 0]), np.hypot(horiz, p[:, 2])

    current = np.asarray(current, dtype=np.float32)
    previous = np.asarray(previous, dtype=np.float32)
    keep = np.zeros(len(previous), bool)
    if len(current) == 0 or len(previous) == 0:
        return keep
    step = math.radians(pattern.azimuth_step_deg)
    row, az, rng = cells(current)
    inv = _inverse_range(rng)
    image = _range_image(az, row, inv, step)
    p_row, p_az, p_rng = cells(previous)
    first = np.flatnonzero(np.isfinite(inv))
    if first.size == 0:
        return keep
    p_row = p_row + (image.row[first[0]] - row[first[0]])      # the image's row numbering
    cols = image.image.shape[1]
    p_col = np.rint(np.mod(p_az, 2 * np.pi) * (cols / (2 * np.pi))).astype(np.int64) % cols
    margin = np.float32(_GHOST_ABS_M) + np.float32(_GHOST_REL) * p_rng
    near = np.full(len(previous), np.inf, np.float32)
    far = np.zeros(len(previous), np.float32)
    H = image.image.shape[0]
    for dr in (-1, 0, 1):
        r = p_row + dr
        ok = (r >= 0) & (r < H)
        for dc in (-1, 0, 1):
            nb = np.full(len(previous), -1, np.int64)
            nb[ok] = image.image[r[ok], (p_col[ok] + dc) % cols]
            seen = np.where(nb >= 0, rng[np.maximum(nb, 0)], np.nan)
            near = np.fmin(near, seen)
            far = np.where(nb >= 0, np.fmax(far, seen), np.inf)     # a hole: an edge too
    keep = near < p_rng + margin
    if edges_only:
        with np.errstate(invalid='ignore'):                       # no return around: inf - inf
            keep &= far - near > margin
    return keep


class _Boxes(NamedTuple):
    """Footprints seen from a camera, all (M,) float32: the point's azimuth from the camera
    axis, elevation and distance, the box about it (azimuth low, high, elevation low, high;
    rad) and the same box of the edges that reach towards a neighbour on the point's surface
    alone (``s_``; zero where none does)."""

    alpha: np.ndarray
    beta: np.ndarray
    rho: np.ndarray
    a_lo: np.ndarray
    a_hi: np.ndarray
    b_lo: np.ndarray
    b_hi: np.ndarray
    s_a_lo: np.ndarray
    s_a_hi: np.ndarray
    s_b_lo: np.ndarray
    s_b_hi: np.ndarray


def _rows(arrays, sel):
    """The same NamedTuple of arrays ``arrays`` with only the rows ``sel`` (slice, mask)."""
    return type(arrays)(*(v[sel] for v in arrays))


def _camera_boxes(d: np.ndarray, offsets: np.ndarray, forward: np.ndarray,
                  towards: np.ndarray | None = None) -> _Boxes:
    """Footprints seen from the camera: ``d`` (M, 3) camera centre -> point, ``offsets`` (4, M,
    3) to the footprint edges, ``forward`` (M,) the camera axis azimuth, ``towards`` (4, M)
    which edges reach towards a neighbour on the point's surface (None: none)."""
    alpha, beta, rho = _camera_angles(d, forward)
    bounds = np.zeros((8, len(d)), np.float32)     # a_lo, a_hi, b_lo, b_hi, then s_...
    dx, dy = d[:, 0], d[:, 1]
    for k in range(4):
        v = d + offsets[k]
        vx, vy = v[:, 0], v[:, 1]
        # azimuth turn from the point to the edge, and the edge's elevation over the point's
        da = np.arctan2(dx * vy - dy * vx, dx * vx + dy * vy)
        db = np.arctan2(v[:, 2], np.hypot(vx, vy)) - beta
        # a non-finite edge (a return too near for a scan pattern) adds nothing to the box
        np.nan_to_num(da, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        np.nan_to_num(db, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        parts = [(bounds[:4], da, db)]
        if towards is not None:
            parts.append((bounds[4:], da * towards[k], db * towards[k]))
        for part, ta, tb in parts:
            np.minimum(part[0], ta, out=part[0])
            np.maximum(part[1], ta, out=part[1])
            np.minimum(part[2], tb, out=part[2])
            np.maximum(part[3], tb, out=part[3])
    return _Boxes(alpha, beta, rho, *bounds)


def _covered_cells(fx: np.ndarray, fy: np.ndarray, lo_x: np.ndarray, hi_x: np.ndarray,
                   lo_y: np.ndarray, hi_y: np.ndarray, W: int, H: int
                   ) -> tuple[np.ndarray, ...]:
    """Cell bounds (x0, x1, y0, y1) of boxes about points at grid coordinates ``fx``, ``fy``
    reaching ``lo``/``hi`` cells from them: the cells whose centres they contain, at least the
    point's own, at most ``_MAX_SPAN_CELLS`` across, within the W x H grid."""
    ix, iy = fx.astype(np.int64), fy.astype(np.int64)
    span = _MAX_SPAN_CELLS // 2
    x0 = np.clip(np.ceil(fx + lo_x - 0.5), ix - span, ix).astype(np.int64)
    x1 = np.clip(np.floor(fx + hi_x - 0.5), ix, ix + span).astype(np.int64)
    y0 = np.clip(np.ceil(fy + lo_y - 0.5), iy - span, iy).astype(np.int64)
    y1 = np.clip(np.floor(fy + hi_y - 0.5), iy, iy + span).astype(np.int64)
    return np.maximum(x0, 0), np.minimum(x1, W - 1), np.maximum(y0, 0), np.minimum(y1, H - 1)


_CHUNK_CELLS = 1 << 20      # (box, cell) pairs handled at once: bounded memory


def _box_cells(x0: np.ndarray, x1: np.ndarray, y0: np.ndarray, y1: np.ndarray, width: int):
    """Yield (boxes, cells): the cells (flat index, rows of ``width``) of boxes [x0, x1] x
    [y0, y1] (int cell bounds), one entry per box and cell, in chunks of bounded size."""
    nx, ny = x1 - x0 + 1, y1 - y0 + 1
    size = nx * ny
    ends = np.cumsum(size)
    start = 0
    while start < size.size:
        stop = max(int(np.searchsorted(ends, ends[start] - size[start] + _CHUNK_CELLS,
                                       side='right')), start + 1)
        n = size[start:stop]
        boxes = np.repeat(np.arange(start, stop), n)
        k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        bx = nx[boxes]
        yield boxes, (y0[boxes] + k // bx) * width + x0[boxes] + k % bx
        start = stop


def _rasterize_min(zbuf: np.ndarray, width: int, x0: np.ndarray, x1: np.ndarray,
                   y0: np.ndarray, y1: np.ndarray, value: np.ndarray) -> None:
    """``zbuf`` (flat, rows of ``width``) = min(zbuf, value) over each box [x0, x1] x [y0, y1]."""
    for boxes, cells in _box_cells(x0, x1, y0, y1, width):
        np.minimum.at(zbuf, cells, value[boxes])


class _GridBoxes(NamedTuple):
    """Footprints on a camera's z-buffer grid, all (B,): the point (coordinates in cells), the
    box about it (x low, high, y low, high) and the point's distance from the camera."""

    x: np.ndarray
    y: np.ndarray
    x_lo: np.ndarray
    x_hi: np.ndarray
    y_lo: np.ndarray
    y_hi: np.ndarray
    rho: np.ndarray

    @staticmethod
    def of(boxes: _Boxes, a0: float, b0: float, cell_x: float, cell_y: float) -> '_GridBoxes':
        """``boxes`` on the grid with cells ``cell_x`` x ``cell_y`` (rad) from ``a0``, ``b0``;
        an edge that overhangs where its surface ends reaches at most ``_MAX_SPAN_CELLS // 2``
        cells from its point, one towards a neighbour on the surface all the way."""
        span = _MAX_SPAN_CELLS // 2
        x, y = (boxes.alpha - a0) / cell_x, (boxes.beta - b0) / cell_y
        return _GridBoxes(
            x, y, x + np.minimum(np.maximum(boxes.a_lo / cell_x, -span), boxes.s_a_lo / cell_x),
            x + np.maximum(np.minimum(boxes.a_hi / cell_x, span), boxes.s_a_hi / cell_x),
            y + np.minimum(np.maximum(boxes.b_lo / cell_y, -span), boxes.s_b_lo / cell_y),
            y + np.maximum(np.minimum(boxes.b_hi / cell_y, span), boxes.s_b_hi / cell_y),
            boxes.rho)

    @staticmethod
    def joined(parts: list['_GridBoxes']) -> '_GridBoxes':
        return _GridBoxes(*(np.concatenate(v) for v in zip(*parts)))


def _nearest_containing(qx: np.ndarray, qy: np.ndarray, boxes: _GridBoxes, W: int, H: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """For query directions ``qx``, ``qy`` (Q,) inside the W x H grid: the nearest distance
    ``rho`` of the ``boxes`` that contain each, and the index of that box (inf and -1: none).

    Boxes are bucketed by size: those more than ``_MAX_SPAN_CELLS`` cells across (footprints
    of samples near the camera, tens of degrees tall) are matched on a grid of cells 2, 4, ...
    times larger, so that each box touches a bounded number of cells whatever its size."""
    nearest = np.full(qx.size, np.inf, np.float32)
    owner = np.full(qx.size, -1, np.int64)
    span = np.maximum(boxes.x_hi - boxes.x_lo, boxes.y_hi - boxes.y_lo)
    level = np.ceil(np.log2(np.maximum(span, _MAX_SPAN_CELLS) / _MAX_SPAN_CELLS))
    level = np.minimum(level, 30).astype(np.int64)
    for lv in np.unique(level):
        picked = np.flatnonzero(level == lv)
        found = _containing_pairs(qx, qy, _rows(boxes, picked), float(1 << int(lv)), W, H)
        if found is None:
            continue
        q, b = found
        v = boxes.rho[picked[b]]
        best = np.full(qx.size, np.inf, np.float32)
        np.minimum.at(best, q, v)
        mine = (v == best[q]) & (v < nearest[q])
        nearest[q[mine]] = v[mine]
        owner[q[mine]] = picked[b[mine]]
    return nearest, owner


def _containing_pairs(qx: np.ndarray, qy: np.ndarray, boxes: _GridBoxes, scale: float, W: int,
                      H: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(query, box) index pairs where a box contains a query (coordinates on the W x H grid),
    found through cells ``scale`` times larger than the grid's; None: none."""
    qx, qy = qx / scale, qy / scale
    W, H = int(math.ceil(W / scale)), int(math.ceil(H / scale))
    lo_x, hi_x, lo_y, hi_y = (boxes.x_lo / scale, boxes.x_hi / scale, boxes.y_lo / scale,
                              boxes.y_hi / scale)
    bounds = [np.clip(np.floor(v), 0, n - 1).astype(np.int64)
              for v, n in ((lo_x, W), (hi_x, W), (lo_y, H), (hi_y, H))]
    qcell = np.minimum(qy.astype(np.int64), H - 1) * W + np.minimum(qx.astype(np.int64), W - 1)
    counts = np.bincount(qcell, minlength=W * H)
    order = np.argsort(qcell, kind='stable')
    first = np.cumsum(counts) - counts
    found_q, found_b = [], []
    for sel, cells in _box_cells(*bounds, W):
        n = counts[cells]
        has = n > 0
        sel, cells, n = sel[has], cells[has], n[has]
        if sel.size == 0:
            continue
        b = np.repeat(sel, n)
        q = order[np.repeat(first[cells] - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))]
        qxs, qys = qx[q], qy[q]
        inside = (qxs >= lo_x[b]) & (qxs <= hi_x[b]) & (qys >= lo_y[b]) & (qys <= hi_y[b])
        found_q.append(q[inside])
        found_b.append(b[inside])
    if not found_q:
        return None
    return np.concatenate(found_q), np.concatenate(found_b)


def _nearer_both_sides(image: np.ndarray, axis: int, iy: np.ndarray, ix: np.ndarray,
                       reach: np.ndarray, rho: np.ndarray, tol: np.ndarray) -> np.ndarray:
    """Per query cell: a value nearer than ``rho - tol`` on both sides along ``axis`` within
    its own ``reach`` cells."""
    before = np.full(rho.shape, np.inf, np.float32)
    after = np.full(rho.shape, np.inf, np.float32)
    n = image.shape[axis]
    at = iy if axis == 0 else ix
    for k in range(1, int(reach.max(initial=0)) + 1):
        live = np.flatnonzero(reach >= k)
        for sign, acc in ((-1, before), (1, after)):
            pos = at[live] + sign * k
            inside = (pos >= 0) & (pos < n)
            q, pos = live[inside], pos[inside]
            seen = image[pos, ix[q]] if axis == 0 else image[iy[q], pos]
            acc[q] = np.minimum(acc[q], seen)
    return (rho - before > tol) & (rho - after > tol)


def hidden_pairs(cam_idx: np.ndarray, point: np.ndarray, xyz: np.ndarray,
                 direction: np.ndarray, forward_azimuth: np.ndarray, pattern: ScanPattern,
                 ring: np.ndarray | None = None,
                 settings: OcclusionSettings = OcclusionSettings(),
                 previous: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
                 ) -> np.ndarray:
    """(M,) bool: which (camera, point) pairs are hidden behind nearer points of the sweep.

    ``cam_idx``, ``point`` (M,) int64 pairs sorted by camera; ``xyz`` (N, 3) the sweep as the
    LiDAR measured it (LiDAR frame, z = spin axis) and ``ring`` (N,) its beam index if known;
    ``direction`` (M, 3) camera centre -> point in the LiDAR's axes (after any motion
    compensation); ``forward_azimuth`` (C,) each camera's optical axis azimuth (rad).
    ``previous``: extra occluders (``cam_idx`` (K,) sorted, ``direction`` (K, 3), footprint
    ``offsets`` (4, K, 3) and ``towards`` (4, K); see :func:`sweep_footprints`): they hide,
    they are not tested.
    """
    M = cam_idx.size
    hidden = np.zeros(M, dtype=bool)
    if M == 0:
        return hidden
    # 1. the sweep's range image; for the points seen by some camera their footprints (edges
    #    from their range-image neighbours) and surface normals.
    xyz = np.asarray(xyz, dtype=np.float32)
    points, pair_point = np.unique(point, return_inverse=True)
    offsets, towards, normal = sweep_footprints(xyz, points, pattern, ring,
                                                settings.footprint, normals=True)
    # 2. per pair, seen from the camera: angles of the point and of its footprint edges.
    d = np.asarray(direction, dtype=np.float32)
    fwd = np.asarray(forward_azimuth, dtype=np.float32)
    boxes = _camera_boxes(d, offsets[:, pair_point], fwd[cam_idx], towards[:, pair_point])
    alpha, beta, rho, a_lo, a_hi, b_lo, b_hi = boxes[:7]
    if previous is not None:
        x_cam, x_dir, x_off, x_towards = previous
        x_boxes = _camera_boxes(np.asarray(x_dir, np.float32), x_off, fwd[x_cam], x_towards)
        x_bounds = np.searchsorted(x_cam, np.arange(int(cam_idx.max()) + 2))
    tol = np.float32(settings.abs_tolerance) + np.float32(settings.rel_tolerance) * rho
    plane_tol = (np.float32(settings.plane_abs_tolerance) +
                 np.float32(settings.plane_rel_tolerance) * rho)
    scale = settings.reach / settings.footprint
    bounds = np.searchsorted(cam_idx, np.arange(int(cam_idx.max()) + 2))
    for c in range(bounds.size - 1):
        sl = slice(bounds[c], bounds[c + 1])
        if bounds[c + 1] - bounds[c] < 2:
            continue
        a, b = alpha[sl], beta[sl]
        # 3. z-buffer cells: half the typical footprint width, half the finest height.
        cell_x = max(0.5 * float(np.median(a_hi[sl] - a_lo[sl])), 1e-5)
        cell_y = max(0.5 * float(np.percentile(b_hi[sl] - b_lo[sl], 5)), 0.1 * cell_x)
        grow = max(1.0, math.sqrt(float(a.max() - a.min() + 4 * cell_x) / cell_x *
                                  float(b.max() - b.min() + 4 * cell_y) / cell_y / _MAX_CELLS))
        cell_x, cell_y = cell_x * grow, cell_y * grow
        a0, b0 = float(a.min()) - cell_x, float(b.min()) - cell_y
        grid = _GridBoxes.of(_rows(boxes, sl), a0, b0, cell_x, cell_y)
        fx, fy = grid.x, grid.y
        ix, iy = fx.astype(np.int64), fy.astype(np.int64)
        W, H = int(ix.max()) + 2, int(iy.max()) + 2
        # 4. for each point, the nearest footprint that contains its direction (its own at
        #    least), the previous sweep's too (no plane test against those); and for the holes
        #    (6) a z-buffer: the points' distances over the cells whose centres their
        #    footprints contain.
        zbuf = np.full(W * H, np.inf, dtype=np.float32)
        _rasterize_min(zbuf, W, *_covered_cells(fx, fy, a_lo[sl] / cell_x, a_hi[sl] / cell_x,
                                                b_lo[sl] / cell_y, b_hi[sl] / cell_y, W, H),
                       rho[sl])
        parts = [grid]
        if previous is not None and x_bounds[c + 1] > x_bounds[c]:
            x_grid = _GridBoxes.of(_rows(x_boxes, slice(x_bounds[c], x_bounds[c + 1])), a0, b0,
                                   cell_x, cell_y)
            x_grid = _rows(x_grid, (x_grid.x >= 0) & (x_grid.x < W) & (x_grid.y >= 0) &
                           (x_grid.y < H))
            _rasterize_min(zbuf, W, *_covered_cells(
                x_grid.x, x_grid.y, x_grid.x_lo - x_grid.x, x_grid.x_hi - x_grid.x,
                x_grid.y_lo - x_grid.y, x_grid.y_hi - x_grid.y, W, H), x_grid.rho)
            parts.append(x_grid)
        nearest, owner = _nearest_containing(fx, fy, _GridBoxes.joined(parts), W, H)
        owner[owner >= fx.size] = -1               # a previous sweep's footprint: no plane
        image = zbuf.reshape(H, W)
        r, t = rho[sl], tol[sl]
        gap = r - nearest
        out = gap > t
        # 5. nearer by less than the tolerance: hidden when the point lies behind the plane of
        #    the nearest footprint's surface as the camera sees it (a kerb's top, a car's side),
        #    not on it (one surface seen at a grazing angle); NaN normals (edges) hide nothing.
        near = np.flatnonzero(~out & (gap > plane_tol[sl]))
        near = near[owner[near] >= 0]
        q = owner[near]
        n_q, d_q, d_p = normal[pair_point[sl][q]], d[sl][q], d[sl][near]
        beyond = np.einsum('ij,ij->i', n_q, d_p - d_q)      # point off the plane
        camera = -np.einsum('ij,ij->i', n_q, d_q)          # camera off the plane
        out[near] = (beyond * camera < 0) & (np.abs(beyond) > plane_tol[sl][near])
        # 6. nearer footprints on both sides within reach (a hole left by a lost return).
        rest = np.flatnonzero(~out)
        reach = np.minimum(np.rint(scale * 0.5 * (a_hi[sl] - a_lo[sl])[rest] / cell_x),
                           _MAX_SPAN_CELLS).astype(np.int64)
        out[rest] = _nearer_both_sides(image, 1, iy[rest], ix[rest], reach, r[rest], t[rest])
        rest = np.flatnonzero(~out)
        reach = np.minimum(np.rint(scale * 0.5 * (b_hi[sl] - b_lo[sl])[rest] / cell_y),
                           _MAX_SPAN_CELLS).astype(np.int64)
        out[rest] = _nearer_both_sides(image, 0, iy[rest], ix[rest], reach, r[rest], t[rest])
        hidden[sl] = out
    return hidden

"""The calibration health metric and ``cmkd calibrate``'s refinement, measured.

* ``health``: per camera, :func:`cmkd_ros.calibration_check.check_alignment` on the true
  calibration and on ``--perturbations`` calibrations off by 0.5 degree about random axes
  (seeded), on the synthetic world (seed 5, two cameras, frames 7 sweeps apart, sets of 1, 3
  and 10 frames) and on the real samples in ../shared/data (one frame each). Prints
  ``better_neighbours`` (the verdict: misaligned above 0.2) for the truth and the range over
  the perturbations with how many of them are called misaligned, and the rotation the search
  finds (truth: should be 0; perturbed: should be 0.5).
* ``refine``: :func:`cmkd_ros.calibration_check.refine` from perturbations of 2 degrees and
  20 cm (random axes, seeded) on 1, 3 and 10 synthetic frames; prints the residual rotation
  and camera position error of the optimum found, whether it was accepted (converged) and the
  disagreement of the two halves of the data.
* ``time``: the time offset search on the synthetic drive with its images stamped 0, 10, 25 or
  50 ms before their capture: alone (the true extrinsic; 1, 3 and 10 frames) and, on 10
  frames at 25 and 50 ms, together with an extrinsic 2 degrees and 20 cm off (``refine`` with
  ``time_offset``); prints the offset found, its residual and the halves' disagreement.
* ``outline``: where the silhouette points (true calibration, 10 frames) lie against the
  outlines of the synthetic depth images, by kind, height and range.
* ``mi`` (the alternative considered): mutual information between LiDAR intensity and image
  gray level (Pandey et al.) along each rotation axis on the real samples; prints where its
  maximum lies (degrees from the calibration) and its peak-to-edge ratio.

Usage: ``python benchmarks/measure_calibration.py [--part health|refine|time|outline|mi ...]
[--width 640 --height 360] [--perturbations 8] [--trials 2] [--no-measured] [--viewpoint]
[--no-intensity] [--json out.json]`` (``--no-measured``, ``--viewpoint``, ``--no-intensity``:
the variants compared in the docs).
Figures and their reading: docs/calibration.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # run from a checkout
from cmkd_ros import calibration_check as cc  # noqa: E402

DATA = pathlib.Path(os.environ.get('CMKD_DATA_DIR',
                                   pathlib.Path(__file__).resolve().parents[2] / 'shared'
                                   / 'data'))
SETS = ([0], [4], [8], [0, 1, 2], [5, 6, 7], list(range(10)))
USE_INTENSITY = True        # reflectance edges with the silhouettes (--no-intensity: without)


def intensity(frame):
    """The frame's intensity when reflectance edges are used, else None."""
    return frame.intensity if USE_INTENSITY else None


def sim_drive(width: int, height: int, count: int = 10):
    """The synthetic drive (seed 5, two cameras) and ``count`` frames 7 sweeps apart."""
    from cmkd_ros.sim import SimWorld
    world = SimWorld({'seed': 5, 'cameras': {'count': 2, 'width': width, 'height': height}},
                     workers=1)
    return world, [world.frame(7 * i) for i in range(count)]


def sim_views(world, frames, offset_ms: float = 0.0, viewpoint: bool = False,
              measured: bool = True):
    """{(frame, camera): prepared view} of the synthetic drive, and its rig. ``offset_ms``:
    the images are stamped that much before their capture (a driver's time offset), and the
    views are prepared from those stamps, with the ego poses for a time offset search."""
    from cmkd_ros.motion import PoseTrajectory
    views = {}
    for i, fr in enumerate(frames):
        stamps = np.arange(fr.lidar_stamp_ns - 300_000_000, fr.lidar_stamp_ns + 400_000_000,
                           2_000_000)
        trajectory = PoseTrajectory(stamps, world.poses(stamps))
        capture = fr.camera_stamp_ns - int(round(offset_ms * 1e6))
        ref, T, found = cc.prepare_sweep(fr.xyz, ring=fr.ring, intensity=intensity(fr),
                                         point_time_ns=fr.point_time_ns,
                                         capture_ns=capture, trajectory=trajectory,
                                         measured=measured)
        for c, cam in enumerate(world.calibration.cameras):
            prepared = cc.CameraFrames(cam, viewpoint=viewpoint)
            prepared.add(ref, fr.images[c], ring=fr.ring, T_capture_sweep=T[c], found=found,
                         capture_ns=int(capture[c]), trajectory=trajectory)
            views[(i, c)] = prepared.views[0]
    return views, world.calibration


def real_views():
    """[(sample name, camera, [view])] of the real samples."""
    from cmkd_ros.tools.overlay import load_sample_folder
    out = []
    for folder in ('nuscenes_sample', 'kitti_000008'):
        fr = load_sample_folder(str(DATA / folder))
        found = cc.silhouettes(fr.xyz, fr.ring, intensity=intensity(fr))
        for c, cam in enumerate(fr.rig.cameras):
            frames = cc.CameraFrames(cam)
            frames.add(fr.xyz, fr.images[c], ring=fr.ring, found=found)
            out.append((fr.name, cam, frames.views))
    return out


def with_views(cam, views, move=None):
    T = cam.T_cam_lidar if move is None else cc.perturb(cam.T_cam_lidar, move)
    frames = cc.CameraFrames(cc.with_extrinsic(cam, T))
    frames.views = views
    return frames


def health_row(label: str, cam, views, axes) -> dict:
    start = time.perf_counter()
    true = cc.check_alignment(with_views(cam, views))
    off = [cc.check_alignment(with_views(cam, views, math.radians(0.5) * a)) for a in axes]
    better = np.array([r.better_neighbours for r in off])
    found = np.array([r.misalignment_deg for r in off])
    row = {'set': label, 'camera': cam.name, 'edge_points': true.edge_points,
           'true_better': true.better_neighbours, 'true_found_deg': true.misalignment_deg,
           'off_better': better.tolist(), 'off_found_deg': found.tolist(),
           'detected': int((better > cc.WARN_BETTER_NEIGHBOURS).sum()),
           'true_passes': bool(true.better_neighbours <= cc.WARN_BETTER_NEIGHBOURS),
           'seconds': time.perf_counter() - start}
    print(f'{label:12s} {cam.name:16s} {true.edge_points:5d} | true: better '
          f'{true.better_neighbours:.2f} found {true.misalignment_deg:.2f} deg | 0.5 off: better '
          f'{better.min():.2f}-{better.max():.2f}, {row["detected"]}/{len(axes)} called '
          f'misaligned, found {found.min():.2f}-{found.max():.2f} deg | '
          f'{row["seconds"]:.0f} s', flush=True)
    return row


def refine_row(label: str, cam, views, rng, translation: bool = True) -> dict:
    a = rng.normal(size=3)
    d = rng.normal(size=3)
    move = np.r_[math.radians(2.0) * a / np.linalg.norm(a),
                 (0.2 if translation else 0.0) * d / np.linalg.norm(d)]
    start = time.perf_counter()
    result = cc.refine(with_views(cam, views, move), translation=translation)
    found = result.found_T_cam_lidar
    rot, pos = (math.nan, math.nan) if found is None else \
        cc.extrinsic_error(found, cam.T_cam_lidar)
    shift = math.nan if found is None else cc.image_shift_deg(cam, cc.matrix_to_rotvec(
        (found @ np.linalg.inv(cam.T_cam_lidar))[:3, :3]))
    row = {'set': label, 'camera': cam.name, 'translation': translation,
           'residual_deg': rot, 'residual_shift_deg': shift, 'residual_cm': 100 * pos,
           'converged': result.converged,
           'reason': result.reason, 'halves': result.spread,
           'seconds': time.perf_counter() - start}
    halves = result.spread
    print(f'{label:12s} {cam.name:10s} {"6-dof" if translation else "rot  "} | residual '
          f'{rot:.2f} deg (rays {shift:.2f}) {100 * pos:5.1f} cm | halves disagree '
          f'{halves.get("rotation_deg", math.nan):.2f} deg '
          f'{100 * halves.get("translation_m", math.nan):.1f} cm | '
          f'{"accepted" if result.converged else "refused: " + result.reason[:60]} | '
          f'{row["seconds"]:.0f} s', flush=True)
    return row


def time_row(label: str, cam, views, offset_ms: float, move=None) -> dict:
    """The time offset search on views stamped ``offset_ms`` early: alone (the 1-D search,
    true extrinsic) or, with ``move``, together with an extrinsic that far off (refine)."""
    start = time.perf_counter()
    frames = with_views(cam, views, move)
    rot = pos = math.nan
    if move is None:
        result = cc.estimate_time_offset(frames)
        found_ns, spread = result.found_offset_ns, result.spread_ms
    else:
        result = cc.refine(frames, time_offset=True)
        found_ns, spread = result.found_time_offset_ns, result.spread.get('time_ms')
        if result.found_T_cam_lidar is not None:
            rot, pos = cc.extrinsic_error(result.found_T_cam_lidar, cam.T_cam_lidar)
    found = math.nan if found_ns is None else found_ns * 1e-6
    row = {'set': label, 'camera': cam.name, 'offset_ms': offset_ms, 'found_ms': found,
           'residual_ms': found - offset_ms, 'converged': result.converged,
           'reason': result.reason, 'halves_ms': spread, 'extrinsic': move is not None,
           'residual_deg': rot, 'residual_cm': 100 * pos,
           'seconds': time.perf_counter() - start}
    extra = '' if move is None else f' | extrinsic residual {rot:.2f} deg {100 * pos:.1f} cm'
    print(f'{label:12s} {cam.name:10s} offset {offset_ms:4.0f} ms | found {found:+6.1f} ms '
          f'(residual {found - offset_ms:+5.1f}){extra} | halves {spread} ms | '
          f'{"accepted" if result.converged else "refused: " + result.reason[:60]} | '
          f'{row["seconds"]:.0f} s', flush=True)
    return row


def _outline_offset(depth: np.ndarray, uv: np.ndarray, normal: np.ndarray,
                    z: np.ndarray) -> np.ndarray:
    """(M,) where the outline lies (px along ``normal``, the image direction towards the far
    side) from each point ``uv`` (M, 2) of depth ``z`` (M,) in a depth image: the nearest
    step from this depth to a farther one (or none), NaN when none within 10 px."""
    H, W = depth.shape
    s = np.arange(-10, 10.01, 0.25)
    u = np.rint(uv[:, None, 0] + s * normal[:, None, 0]).astype(int)
    v = np.rint(uv[:, None, 1] + s * normal[:, None, 1]).astype(int)
    inside = (u >= 0) & (u < W) & (v >= 0) & (v < H)
    d = depth[np.clip(v, 0, H - 1), np.clip(u, 0, W - 1)]
    far = (d <= 0) | (d > z[:, None] + np.maximum(0.5, 0.08 * z[:, None]))
    step = ~far[:, :-1] & far[:, 1:] & inside[:, :-1] & inside[:, 1:]
    mid = 0.5 * (s[:-1] + s[1:])
    cost = np.where(step, np.abs(mid), np.inf)
    k = np.argmin(cost, axis=1)
    return np.where(np.isfinite(cost[np.arange(k.size), k]), mid[k], np.nan)


def outline_rows(world, frames, measured: bool = True) -> list:
    """Where the silhouette points (true calibration, no viewpoint filter) lie against the
    outlines of the camera's depth image, by kind (along a beam: side outlines; across beams:
    tops), height (a top between the LiDAR's and the camera's heights, below the camera,
    above the LiDAR) and range. Negative: beyond the outline, on the background side."""
    from cmkd_ros.calibration import RigCalibration
    from cmkd_ros.projection import project_points
    rows = []
    for c, cam in enumerate(world.calibration.cameras):
        centre = float(-(cam.T_cam_lidar[:3, :3].T @ cam.T_cam_lidar[:3, 3])[2])
        acc = []
        for fr in frames:
            ref, T, found = cc.prepare_sweep(fr.xyz, ring=fr.ring,
                                             point_time_ns=fr.point_time_ns,
                                             capture_ns=fr.camera_stamp_ns,
                                             trajectory=fr.trajectory(), measured=measured)
            pts = found.points @ T[c, :3, :3].T + T[c, :3, 3]
            tangent = found.tangent @ T[c, :3, :3].T
            rig = RigCalibration((cam,))
            uv, z, valid = (a[0] for a in project_points(pts, rig))
            step = 0.01 * np.linalg.norm(pts, axis=1, keepdims=True)
            normal = project_points(pts + step * tangent, rig)[0][0] - uv
            normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
            off = _outline_offset(fr.depth_images[c], uv[valid], normal[valid], z[valid])
            acc.append(np.stack([off, tangent[valid, 2] > 0.5, pts[valid, 2],
                                 np.linalg.norm(pts[valid], axis=1), found.weights[valid]], 1))
        off, top, height, rng, w = np.concatenate(acc).T
        top = top.astype(bool)
        groups = {'sides': ~top, 'tops between LiDAR and camera heights':
                  top & (height > min(0.0, centre)) & (height < max(0.0, centre)),
                  'tops below both': top & (height <= min(0.0, centre)),
                  'tops above both': top & (height >= max(0.0, centre))}
        for name, member in groups.items():
            for near, band in (('< 12 m', rng < 12), ('>= 12 m', rng >= 12)):
                m = member & band & np.isfinite(off)
                if not m.any():
                    continue
                row = {'camera': cam.name, 'group': name, 'range': near,
                       'points': int(m.sum()), 'mean_px': float(np.average(off[m], weights=w[m])),
                       'median_px': float(np.median(off[m])),
                       'over_2px': float(np.mean(np.abs(off[m]) > 2))}
                rows.append(row)
                print(f'outline {cam.name:10s} {name:38s} {near:7s} {row["points"]:5d} points: '
                      f'mean {row["mean_px"]:+.2f} px, median {row["median_px"]:+.2f}, '
                      f'|offset| > 2 px {row["over_2px"]:.2f}', flush=True)
    return rows


def mutual_information(frame, c: int, T: np.ndarray, bins: int = 32) -> float:
    """MI between the intensity rank of the points in view and the gray level under them."""
    import cv2

    from cmkd_ros.calibration import RigCalibration
    from cmkd_ros.projection import project_points
    cam = frame.rig.cameras[c]
    gray = cv2.GaussianBlur(cv2.cvtColor(frame.images[c], cv2.COLOR_RGB2GRAY).astype(
        np.float32), (0, 0), 1.5)
    uv, _, valid = project_points(frame.xyz, RigCalibration((cc.with_extrinsic(cam, T),)))
    uv, valid = uv[0], valid[0]
    rank = np.argsort(np.argsort(frame.intensity)) * bins // len(frame.intensity)
    g = np.clip((cc._bilinear(gray, uv[valid]) / 256 * bins).astype(int), 0, bins - 1)
    hist = np.bincount(rank[valid] * bins + g, minlength=bins * bins).reshape(bins, bins)
    p = cv2.GaussianBlur(hist.astype(np.float64), (0, 0), 1.0) + 1e-9
    p /= p.sum()
    return float((p * np.log(p / p.sum(1, keepdims=True) / p.sum(0, keepdims=True))).sum())


def mi_rows() -> list:
    from cmkd_ros.tools.overlay import load_sample_folder
    angles = np.arange(-2.0, 2.01, 0.25)
    rows = []
    for folder in ('nuscenes_sample', 'kitti_000008'):
        fr = load_sample_folder(str(DATA / folder))
        for c, cam in enumerate(fr.rig.cameras):
            peaks = []
            for axis, name in enumerate(cc.PARAMETERS[:3]):
                mi = np.array([mutual_information(fr, c, cc.perturb(
                    cam.T_cam_lidar, math.radians(a) * np.eye(3)[axis])) for a in angles])
                peaks.append((name, float(angles[mi.argmax()]), float(mi.max() / mi[[0, -1]]
                                                                     .mean())))
            rows.append({'camera': cam.name, 'peaks': peaks})
            print(f'MI {fr.name:9s} {cam.name:16s} ' + ' | '.join(
                f'{n}: max at {a:+.2f} deg, peak/edge {r:.2f}' for n, a, r in peaks),
                flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--part', action='append',
                        choices=('health', 'refine', 'time', 'outline', 'mi'))
    parser.add_argument('--viewpoint', action=argparse.BooleanOptionalAction, default=False,
                        help='drop top edges between the LiDAR\'s and the camera\'s heights '
                             '(tried, not kept: docs/calibration.md)')
    parser.add_argument('--measured', action=argparse.BooleanOptionalAction, default=True,
                        help='find silhouettes in the sweep as measured (--no-measured: in the '
                             'motion compensated cloud, as before)')
    parser.add_argument('--intensity', action=argparse.BooleanOptionalAction, default=True,
                        help='add the sweeps\' reflectance edges (--no-intensity: silhouettes '
                             'only, as before 2026-12-07)')
    parser.add_argument('--width', type=int, default=640)
    parser.add_argument('--height', type=int, default=360)
    parser.add_argument('--perturbations', type=int, default=8)
    parser.add_argument('--trials', type=int, default=2)
    parser.add_argument('--json', default=None)
    args = parser.parse_args()
    global USE_INTENSITY
    USE_INTENSITY = args.intensity
    parts = args.part or ['health', 'refine']
    out = {}
    world, frames = (sim_drive(args.width, args.height)
                     if {'health', 'refine', 'time', 'outline'} & set(parts) else (None, None))
    views, rig = (sim_views(world, frames, viewpoint=args.viewpoint, measured=args.measured)
                  if {'health', 'refine'} & set(parts) else (None, None))
    if 'health' in parts:
        axes = np.random.default_rng(7).normal(size=(args.perturbations, 3))
        axes /= np.linalg.norm(axes, axis=1, keepdims=True)
        rows = []
        for c, cam in enumerate(rig.cameras):
            for sel in SETS:
                rows.append(health_row(f'sim {len(sel)}fr@{sel[0]}', cam,
                                       [views[(i, c)] for i in sel], axes))
        if DATA.is_dir():
            for name, cam, real in real_views():
                rows.append(health_row(name, cam, real, axes))
        out['health'] = rows
    if 'refine' in parts:
        rng = np.random.default_rng(3)
        rows = []
        for c, cam in enumerate(rig.cameras):
            for sel in ([0], [4], [0, 1, 2], [5, 6, 7], list(range(10))):
                for _ in range(args.trials):
                    for translation in (True, False):
                        rows.append(refine_row(f'sim {len(sel)}fr@{sel[0]}', cam,
                                               [views[(i, c)] for i in sel], rng, translation))
        out['refine'] = rows
    if 'time' in parts:
        rng = np.random.default_rng(11)
        rows = []
        for offset_ms in (0.0, 10.0, 25.0, 50.0):
            late, rig = sim_views(world, frames, offset_ms, args.viewpoint, args.measured)
            for c, cam in enumerate(rig.cameras):
                for sel in ([0], [4], [0, 1, 2], [5, 6, 7], list(range(10))):
                    label = f'sim {len(sel)}fr@{sel[0]}'
                    chosen = [late[(i, c)] for i in sel]
                    rows.append(time_row(label, cam, chosen, offset_ms))
                    if len(sel) < 10 or offset_ms not in (25.0, 50.0):
                        continue
                    for _ in range(args.trials):       # the extrinsic off too: both refined
                        a, d = rng.normal(size=3), rng.normal(size=3)
                        move = np.r_[math.radians(2.0) * a / np.linalg.norm(a),
                                     0.2 * d / np.linalg.norm(d)]
                        rows.append(time_row(label, cam, chosen, offset_ms, move))
        out['time'] = rows
    if 'outline' in parts:
        out['outline'] = outline_rows(world, frames, args.measured)
    if 'mi' in parts:
        out['mi'] = mi_rows()
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as fh:
            json.dump({'width': args.width, 'height': args.height, **out}, fh, indent=1,
                      default=float)
    return 0


if __name__ == '__main__':
    sys.exit(main())

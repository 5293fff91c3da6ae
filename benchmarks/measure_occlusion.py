"""The occlusion test against the synthetic world's ground truth, for every LiDAR preset.

For each preset (``cmkd_ros.sim.config.LIDAR_PRESETS``) and each camera-LiDAR distance, renders
frames of four cameras (front, left, back, right; 480x270) mounted that far from the LiDAR
(0.6 of it forward/sideways on the car, 0.5 below, 0.62 to the camera's right) and scores
``compute_correspondences`` (default settings, motion compensation, ring field) against the
renders' exact visibility (``SimFrame.gt_visible`` / ``gt_occluded``, from ray casting):

* kept: truly visible in-image points that the test keeps (goal >= 98 %),
* removed: truly occluded in-image points that it removes (goal >= 90 %), over all of them
  and over those whose occluder the LiDAR itself sees (``seen``: the first surface on the
  camera's ray lies within the LiDAR's beams and in its line of sight; an occluder below the
  lowest beam, e.g. the lower half of a car parked next to the ego, leaves no sample to test),
* hidden: in-image points removed.

Usage: ``python benchmarks/measure_occlusion.py [--seeds 10,11,12] [--presets ...]
[--baselines 0.3,0.5,1.0,1.5] [--previous] [--no-ring] [--set key=value] [--json out.json]``
(``--previous``: the sweep before each frame is given too, with ego poses over both). Settings
are chosen on seeds 0-6; the table in docs/occlusion.md uses seeds 10-19.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # run from a checkout
from cmkd_ros.projection import CorrespondenceConfig, compute_correspondences  # noqa: E402

BASELINES = (0.3, 0.5, 1.0, 1.5)
GOAL_KEPT, GOAL_REMOVED = 0.98, 0.90


def rig_settings(baseline: float, count: int = 4, width: int = 480, height: int = 270) -> dict:
    """``cameras`` settings: ``count`` cameras around the car, ``baseline`` m from the LiDAR."""
    yaw = [360.0 * i / count for i in range(count)]
    return {'count': count, 'yaw_deg': [y if y <= 180 else y - 360 for y in yaw],
            'width': width, 'height': height, 'mount_forward_m': 0.6 * baseline,
            'mount_side_m': 0.6 * baseline, 'mount_below_lidar_m': 0.5 * baseline,
            'mount_right_m': 0.62 * baseline}


def _first_hit(prims, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Ray parameter (m) of the first surface (ground or solid) on unit rays from ``origin``."""
    from cmkd_ros.sim.world import Hits, cast_into, ground_t
    hits = Hits.empty(len(dirs))
    hits.t[:] = ground_t(np.full(len(dirs), origin[2], np.float32), dirs[:, 2])
    idx = np.arange(len(dirs))
    comp = tuple(np.ascontiguousarray(dirs[:, k]) for k in range(3))
    for j in range(len(prims)):
        cast_into(hits, idx, prims, j, origin.astype(np.float32), dirs, comp)
    return hits.t


def occluder_seen(world, frame) -> np.ndarray:
    """(C, N) bool: occluded pairs whose occluder the LiDAR sees (within its beams, in line of
    sight from its origin at the camera's stamp)."""
    from cmkd_ros.sim.camera import camera_pose
    out = np.zeros(frame.gt_occluded.shape, bool)
    elev = np.sort(world.lidar.elevation)
    lowest = elev[0] - 0.5 * (elev[1] - elev[0])
    highest = elev[-1] + 0.5 * (elev[-1] - elev[-2])
    for c in range(len(frame.camera_names)):
        idx = np.flatnonzero(frame.gt_occluded[c])
        if idx.size == 0:
            continue
        pose = world.poses([frame.camera_stamp_ns[c]])[0]
        origin = camera_pose(pose, world.cameras[c].calib)[:3, 3]
        prims = world.camera_primitives(float(origin[0]))
        # 1. the occluder: first surface on the camera ray towards the hidden surface point.
        ray = frame.surface_world[idx] - origin
        ray /= np.linalg.norm(ray, axis=1, keepdims=True)
        occluder = origin + ray * _first_hit(prims, origin, ray.astype(np.float32))[:, None]
        # 2. seen by the LiDAR: nothing nearer on its own ray, and inside its beams.
        to_occ = occluder - pose[:3, 3]
        dist = np.linalg.norm(to_occ, axis=1)
        hit = _first_hit(prims, pose[:3, 3], (to_occ / dist[:, None]).astype(np.float32))
        local = to_occ @ pose[:3, :3]                        # world -> LiDAR axes
        el = np.arctan2(local[:, 2], np.hypot(local[:, 0], local[:, 1]))
        seen = (hit >= dist - (0.02 + 0.002 * dist)) & (el >= lowest) & (el <= highest)
        seen &= dist <= world.config.lidar.max_range_m
        out[c, idx[seen]] = True
    return out


def render(preset: str, baseline: float, seed: int, count: int = 4, width: int = 480,
           height: int = 270, previous: bool = False):
    """(SimFrame, occluder-seen mask, the frame before or None) of one frame of ``preset``
    at ``baseline`` m."""
    from cmkd_ros.sim import SimWorld
    world = SimWorld({'seed': seed, 'lidar': {'preset': preset},
                      'cameras': rig_settings(baseline, count, width, height)})
    frame = world.frame(2 + 3 * seed)
    before = world.frame(1 + 3 * seed) if previous else None
    return frame, occluder_seen(world, frame), before


def _inputs(frame, before, use_ring: bool) -> dict:
    """compute_correspondences arguments of ``frame`` (with the sweep ``before`` it, if
    any, and ego poses over both)."""
    from cmkd_ros.projection import PreviousSweep
    args = dict(point_time_ns=frame.point_time_ns, camera_stamp_ns=frame.camera_stamp_ns,
                trajectory=frame.trajectory(), ring=frame.ring if use_ring else None)
    if before is not None:
        args['trajectory'] = args['trajectory'].merged(before.trajectory())
        args['previous'] = PreviousSweep(before.xyz, before.point_time_ns,
                                         before.ring if use_ring else None)
    return args


def score(rendered, config: CorrespondenceConfig = CorrespondenceConfig(),
          use_ring: bool = True) -> dict:
    """Pooled kept / removed / removed-seen / hidden fractions over ``(frame, seen,
    frame before or None)`` (``use_ring`` False: the scan pattern from elevation statistics)."""
    n = dict(n_visible=0, n_kept=0, n_occluded=0, n_removed=0, n_seen=0, n_removed_seen=0,
             n_valid=0, n_hidden=0)
    for frame, seen, *before in rendered:
        args = _inputs(frame, before[0] if before else None, use_ring)
        every = compute_correspondences(frame.xyz, frame.calibration, **args,
                                        config=dataclasses.replace(config, occlusion=False))
        kept = compute_correspondences(frame.xyz, frame.calibration, **args, config=config)
        valid = np.zeros(frame.gt_visible.shape, bool)
        valid[every.camera, every.point] = True
        keep = np.zeros_like(valid)
        keep[kept.camera, kept.point] = True
        visible, occluded = valid & frame.gt_visible, valid & frame.gt_occluded
        n['n_visible'] += int(visible.sum())
        n['n_kept'] += int((visible & keep).sum())
        n['n_occluded'] += int(occluded.sum())
        n['n_removed'] += int((occluded & ~keep).sum())
        n['n_seen'] += int((occluded & seen).sum())
        n['n_removed_seen'] += int((occluded & seen & ~keep).sum())
        n['n_valid'] += int(valid.sum())
        n['n_hidden'] += int((valid & ~keep).sum())
    return {'kept': n['n_kept'] / max(n['n_visible'], 1),
            'removed': n['n_removed'] / max(n['n_occluded'], 1),
            'removed_seen': n['n_removed_seen'] / max(n['n_seen'], 1),
            'hidden': n['n_hidden'] / max(n['n_valid'], 1),
            'occluded_fraction': n['n_occluded'] / max(n['n_valid'], 1),
            'seen_fraction': n['n_seen'] / max(n['n_occluded'], 1), **n}


def main(argv: list[str] | None = None) -> int:
    from cmkd_ros.sim.config import LIDAR_PRESETS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', default='10,11,12', help='world seeds (one frame each)')
    parser.add_argument('--presets', default=','.join(LIDAR_PRESETS), help='LiDAR presets')
    parser.add_argument('--baselines', default=','.join(map(str, BASELINES)),
                        help='camera-LiDAR distances (m)')
    parser.add_argument('--set', dest='overrides', action='append', default=[],
                        metavar='KEY=VALUE', help='CorrespondenceConfig override')
    parser.add_argument('--previous', action='store_true',
                        help='give the test the sweep before each frame (ego poses over both)')
    parser.add_argument('--no-ring', action='store_true',
                        help='ignore the ring field (scan pattern from elevation statistics)')
    parser.add_argument('--json', default=None, help='write the table as JSON')
    args = parser.parse_args(argv)
    from cmkd_ros.config import build, parse_overrides, to_dict
    config = build(CorrespondenceConfig, parse_overrides(args.overrides))
    seeds = [int(s) for s in args.seeds.split(',')]
    rows = []
    start = time.perf_counter()
    print(f'seeds {seeds}, {"no ring field, " if args.no_ring else ""}'
          f'{"the sweep before given, " if args.previous else ""}settings '
          f'{to_dict(config)}')
    print(f'{"preset":<10}{"baseline":>9}{"kept %":>9}{"removed %":>11}{"seen %":>9}'
          f'{"rem. seen %":>13}{"hidden %":>10}{"occluded %":>12}  goals')
    for preset in args.presets.split(','):
        for baseline in (float(b) for b in args.baselines.split(',')):
            s = score([render(preset, baseline, seed, previous=args.previous)
                       for seed in seeds], config,
                      not args.no_ring)
            met = s['kept'] >= GOAL_KEPT and s['removed_seen'] >= GOAL_REMOVED
            rows.append({'preset': preset, 'baseline_m': baseline, **s})
            print(f'{preset:<10}{baseline:>9.1f}{100 * s["kept"]:>9.2f}'
                  f'{100 * s["removed"]:>11.2f}{100 * s["seen_fraction"]:>9.1f}'
                  f'{100 * s["removed_seen"]:>13.2f}{100 * s["hidden"]:>10.2f}'
                  f'{100 * s["occluded_fraction"]:>12.2f}  {"met" if met else "NOT met"}',
                  flush=True)
    print(f'{len(rows)} cases in {time.perf_counter() - start:.0f} s; goals: kept >= '
          f'{100 * GOAL_KEPT:.0f} %, removed (occluder seen) >= {100 * GOAL_REMOVED:.0f} %')
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

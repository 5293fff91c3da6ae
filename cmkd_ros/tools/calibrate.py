"""``cmkd calibrate``: targetless refinement of each camera's extrinsic from the data itself.

Silhouettes of the LiDAR sweeps (range jumps) and their reflectance edges (paint on the road,
when the cloud has intensities) are matched with the images' edges and each
camera's ``T_cam_lidar`` is moved to where they agree best (:mod:`cmkd_ros.calibration_check`).
Inputs are those of ``cmkd overlay``: a rosbag2 folder, a pair dataset folder, the shared
nuScenes / KITTI sample folders, or ``--cloud FILE --image NAME=FILE --calibration rig.yaml``;
sweeps with point times, camera stamps and ego poses (pairs, bags with odometry) are motion
compensated. Writes into ``--out``:

* ``calibration.yaml``: the rig (RigCalibration schema) with the refined extrinsics; a camera
  whose refinement did not converge keeps its input extrinsic;
* ``<camera>_before_after.png``: the projected points over the first frame's image with the
  input calibration (top) and the refined one (bottom);
* ``report.json``: per camera the scores before and after, the change, how well the data
  constrains each parameter, and why a camera was not refined.

``--time-offset`` also estimates each camera's time offset to the LiDAR (the images are
captured later than their stamps say) from sweeps with point times, camera stamps and ego
poses, and writes it into ``time_offset_ns`` (added to the input one);
``--no-extrinsic`` leaves the extrinsic as it is.

Exit status: 0 every camera converged, 3 some camera kept its input extrinsic or time offset
(too little structure, unconstrained parameters, an unusable image, a drive that does not
move), 2 bad input. ``--check`` only reports each camera's calibration health
(:func:`cmkd_ros.calibration_check.check_alignment`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import numpy as np

from cmkd_ros.calibration import CalibrationError, RigCalibration
from cmkd_ros.calibration_check import (AlignmentError, CameraFrames, check_alignment,
                                        estimate_time_offset, prepare_sweep, refine,
                                        with_extrinsic)
from cmkd_ros.tools.overlay import OverlayError, OverlayFrame

NOT_CONVERGED = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cmkd_ros.tools.overlay import add_input_arguments
    add_input_arguments(parser)
    parser.add_argument('--out', required=True,
                        help='folder for calibration.yaml, the pictures and report.json')
    parser.add_argument('--frames', type=int, default=10,
                        help='sweeps (bag) or pairs used; more frames, better constraint')
    parser.add_argument('--stride', type=int, default=1,
                        help='use every STRIDE-th sweep or pair (spread the frames over the '
                             'drive: nearby sweeps show the same scene)')
    parser.add_argument('--index', type=int, action='append', default=None,
                        help='pair or bag sweep index to use (repeatable; overrides --frames)')
    parser.add_argument('--cameras', action='append', default=None, metavar='NAME[,NAME]',
                        help='cameras to refine (repeatable or comma separated; default all); '
                             'the others are written unchanged')
    parser.add_argument('--translation', action=argparse.BooleanOptionalAction, default=True,
                        help='refine the translation too (--no-translation: rotation only, '
                             'for few frames or distant scenes)')
    parser.add_argument('--max-rotation-deg', type=float, default=3.0,
                        help='search at most this far from the input rotation (degrees)')
    parser.add_argument('--max-translation-cm', type=float, default=30.0,
                        help='search at most this far from the input translation (cm)')
    parser.add_argument('--max-width', type=int, default=0,
                        help='score images at most this wide (halved until they fit; 0: full '
                             'size, the most precise)')
    parser.add_argument('--check', action='store_true',
                        help='only report each camera\'s calibration health (no refinement)')
    parser.add_argument('--time-offset', action='store_true',
                        help='also estimate each camera\'s time offset to the LiDAR (needs '
                             'point times and ego poses: a bag with odometry, pairs) and '
                             'write it as time_offset_ns')
    parser.add_argument('--max-time-offset-ms', type=float, default=100.0,
                        help='search the time offset at most this far from the input one (ms)')
    parser.add_argument('--intensity', action=argparse.BooleanOptionalAction, default=True,
                        help='also match the sweeps\' reflectance edges (paint on the road) '
                             'when the cloud has intensities (--no-intensity: silhouettes only)')
    parser.add_argument('--extrinsic', action=argparse.BooleanOptionalAction, default=True,
                        help='refine the extrinsic (--no-extrinsic with --time-offset: only '
                             'the time offset)')


def _frame_args(args: argparse.Namespace) -> argparse.Namespace:
    """The ``cmkd overlay`` arguments its frame loaders read."""
    index = args.index
    if index is None and args.stride > 1:
        index = list(range(0, args.frames * args.stride, args.stride))
    return argparse.Namespace(
        source=args.source, cloud=args.cloud, image=args.image, calibration=args.calibration,
        cloud_format=args.cloud_format, cloud_topic=args.cloud_topic,
        image_topic=args.image_topic, camera_info_topic=args.camera_info_topic,
        odom_topic=args.odom_topic, lidar_offset_ms=args.lidar_offset_ms, index=index,
        max_frames=args.frames)


def _chosen_cameras(args: argparse.Namespace, rig: RigCalibration) -> list[str]:
    if not args.cameras:
        return list(rig.names)
    names = [n.strip() for item in args.cameras for n in item.split(',') if n.strip()]
    unknown = [n for n in names if n not in rig.names]
    if unknown:
        raise OverlayError(f'--cameras {unknown} not in the calibration (it has {rig.names})')
    return names


def _in_image(frame: OverlayFrame, c: int) -> int:
    """Points of ``frame``'s sweep that its calibration puts in camera ``c``'s image."""
    from cmkd_ros.projection import project_points
    ok = np.isfinite(frame.xyz).all(1)
    if not ok.any():
        return 0
    _, _, valid = project_points(frame.xyz[ok], frame.rig.subset([frame.rig.names[c]]))
    return int(valid.sum())


def prepare_cameras(frames: list[OverlayFrame], names: list[str], max_width: int = 0,
                    intensity: bool = True) -> tuple[dict, dict]:
    """Per camera name, its :class:`CameraFrames` over every frame, and the problems met
    ({name: message}; such a camera is not refined). ``intensity``: use the reflectance edges
    of clouds that have intensities."""
    from cmkd_ros.projection import camera_capture_ns
    cams = {n: CameraFrames(frames[0].rig.camera(n), max_width=max_width) for n in names}
    problems: dict[str, str] = {}
    overlap = dict.fromkeys(names, 0)
    for frame in frames:
        capture = None
        if frame.trajectory is not None and frame.point_time_ns is not None and \
                frame.camera_stamp_ns is not None:
            capture = camera_capture_ns(frame.rig, frame.camera_stamp_ns)
        try:
            ref, T, found = prepare_sweep(frame.xyz, ring=frame.ring,
                                          intensity=frame.intensity if intensity else None,
                                          point_time_ns=frame.point_time_ns,
                                          capture_ns=capture, trajectory=frame.trajectory)
        except AlignmentError as exc:
            for n in names:
                problems.setdefault(n, f'{frame.name}: {exc}')
            continue
        for c, n in enumerate(frame.rig.names):
            if n not in cams:
                continue
            overlap[n] += _in_image(frame, c)
            try:
                cams[n].add(ref, frame.images[c], ring=frame.ring, found=found,
                            T_capture_sweep=None if T is None else T[c],
                            capture_ns=None if capture is None else int(capture[c]),
                            trajectory=None if capture is None else frame.trajectory)
            except AlignmentError as exc:
                problems.setdefault(n, f'{frame.name}: {exc}')
    for n in names:
        if not overlap[n] and n not in problems:
            problems[n] = ('no LiDAR point lands in the image with the input calibration: '
                           'the cloud and the image do not overlap (wrong camera, wrong '
                           'calibration, or a cloud from elsewhere)')
        elif not cams[n].views and n not in problems:
            problems[n] = 'no usable frame'
    return cams, problems


def _before_after(frame: OverlayFrame, before: RigCalibration, after: RigCalibration,
                  labels: dict) -> dict:
    """{camera name: RGB picture}: the points over the image with ``before`` (top) and
    ``after`` (bottom)."""
    import dataclasses

    import cv2

    from cmkd_ros.projection import CorrespondenceConfig
    from cmkd_ros.tools.overlay import render_overlays
    pictures = {}
    names = [n for n in frame.rig.names if n in labels]
    if not names:
        return pictures
    config = CorrespondenceConfig()
    halves = []
    for rig in (before, after):
        shown = dataclasses.replace(frame, rig=rig.subset(names),
                                    images=[frame.images[frame.rig.names.index(n)]
                                            for n in names],
                                    camera_stamp_ns=None if frame.camera_stamp_ns is None else
                                    np.asarray(frame.camera_stamp_ns)[
                                        [frame.rig.names.index(n) for n in names]])
        halves.append({o.name: o.image for o in render_overlays(shown, config, radius=1)})
    for n in names:
        rows = []
        for half, text in zip(halves, labels[n]):
            img = half[n].copy()
            size = max(0.5, img.shape[1] / 1600)
            cv2.putText(img, text, (10, int(30 * size)), cv2.FONT_HERSHEY_SIMPLEX, size,
                        (255, 255, 255), max(1, int(2 * size)), cv2.LINE_AA)
            rows.append(img)
        pictures[n] = np.concatenate(rows, axis=0)
    return pictures


def run(args: argparse.Namespace) -> int:
    import cv2

    from cmkd_ros.tools.overlay import load_frames
    try:
        if args.frames < 1 or args.stride < 1:
            raise OverlayError('--frames and --stride must be >= 1')
        if args.max_rotation_deg <= 0 or args.max_translation_cm <= 0:
            raise OverlayError('--max-rotation-deg and --max-translation-cm must be > 0')
        if not args.extrinsic and not args.time_offset:
            raise OverlayError('--no-extrinsic leaves nothing to do without --time-offset')
        if args.time_offset and args.check:
            raise OverlayError('--check reports the extrinsic only; drop --time-offset')
        if not 0 < args.max_time_offset_ms <= 1000:
            raise OverlayError('--max-time-offset-ms must be in (0, 1000]')
        frames = load_frames(_frame_args(args))
        if args.time_offset:
            lacking = [f.name for f in frames if f.trajectory is None or
                       f.point_time_ns is None or f.camera_stamp_ns is None]
            if lacking:
                raise OverlayError(f'--time-offset needs camera stamps, point times and ego '
                                   f'poses (a bag with odometry, or pairs); {lacking[0]} has '
                                   'not all of them')
        rig_in = frames[0].rig
        if args.calibration and os.path.isfile(args.calibration):
            rig_in = RigCalibration.load(args.calibration)     # every camera, for the output
        names = _chosen_cameras(args, frames[0].rig)
        cams, problems = prepare_cameras(frames, names, args.max_width, args.intensity)
        if len(problems) == len(names):
            raise AlignmentError('; '.join(f'{n}: {m}' for n, m in problems.items()))
    except (OverlayError, AlignmentError, CalibrationError, ValueError, OSError) as exc:
        print(f'cmkd calibrate: {exc}', file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    report = {'frames': [f.name for f in frames], 'translation': args.translation,
              'cameras': {}}
    if args.check:
        for n in names:
            if n in problems:
                report['cameras'][n] = {'error': problems[n]}
                print(f'{n}: cannot check: {problems[n]}')
                continue
            health = check_alignment(cams[n]).to_dict()
            report['cameras'][n] = health
            verdict = ('too little structure' if not health['enough_structure'] else
                       'MISALIGNED' if health['misaligned'] else 'ok')
            print(f'{n}: {verdict}: {100 * health["better_neighbours"]:.0f}% of the rotations '
                  f'0.5 deg away fit better; the data points to '
                  f'{health["misalignment_deg"]:.2f} deg ({health["edge_points"]} silhouette '
                  f'points, {health["frames"]} frames)')
        _write_json(os.path.join(args.out, 'report.json'), report)
        return 0 if not problems else NOT_CONVERGED
    refined, offsets, labels, failed = {}, {}, {}, 0
    for n in names:
        if n in problems:
            report['cameras'][n] = {'converged': False, 'reason': problems[n]}
            print(f'{n}: NOT refined, input extrinsic kept: {problems[n]}')
            failed += 1
            continue
        entry, T, offset, words = _calibrate_camera(cams[n], args)
        report['cameras'][n] = entry
        failed += not entry['converged']
        if T is not None:
            refined[n] = T
        if offset is not None:
            offsets[n] = offset
        labels[n] = (f'input calibration: score {cams[n].score(cams[n].camera.T_cam_lidar):.3f}',
                     words)

    def updated(cameras):
        return tuple(dataclasses.replace(
            with_extrinsic(c, refined.get(c.name, c.T_cam_lidar)),
            time_offset_ns=int(c.time_offset_ns) + offsets.get(c.name, 0)) for c in cameras)

    rig_out = RigCalibration(updated(rig_in.cameras), rig_in.lidar_frame)
    try:
        rig_out.save(os.path.join(args.out, 'calibration.yaml'))
        after = RigCalibration(updated(frames[0].rig.cameras), frames[0].rig.lidar_frame)
        for n, picture in _before_after(frames[0], frames[0].rig, after, labels).items():
            path = os.path.join(args.out, f'{n}_before_after.png')
            if not cv2.imwrite(path, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
                raise OSError(f'cannot write {path}')
        _write_json(os.path.join(args.out, 'report.json'), report)
    except (OverlayError, CalibrationError, ValueError) as exc:
        print(f'cmkd calibrate: {exc}', file=sys.stderr)
        return 2
    print(f'{os.path.join(args.out, "calibration.yaml")}: {len(names) - failed} of '
          f'{len(names)} camera(s) calibrated')
    return 0 if not failed else NOT_CONVERGED


def _calibrate_camera(frames: CameraFrames, args: argparse.Namespace
                      ) -> tuple[dict, np.ndarray | None, int | None, str]:
    """Refine one camera as ``args`` ask: ``(its report, refined T_cam_lidar or None, time
    offset change (ns) or None, picture caption)``."""
    name = frames.camera.name
    if not args.extrinsic:                         # the time offset alone (1-D)
        timing = estimate_time_offset(frames, max_offset_ms=args.max_time_offset_ms)
        if timing.converged:
            print(f'{name}: time offset {timing.offset_ns * 1e-6:+.1f} ms (the images are '
                  'captured that much later than their stamps and the input time_offset_ns '
                  f'say), score {timing.initial_score:.3f} -> {timing.score:.3f}')
            return (timing.to_dict(), None, timing.offset_ns,
                    f'time offset {timing.offset_ns * 1e-6:+.1f} ms')
        print(f'{name}: time offset NOT estimated, input time_offset_ns kept: {timing.reason}')
        return timing.to_dict(), None, None, 'time offset not estimated: ' + timing.reason[:60]
    result = refine(frames, translation=args.translation,
                    max_rotation_deg=args.max_rotation_deg,
                    max_translation_m=args.max_translation_cm / 100,
                    time_offset=args.time_offset, max_offset_ms=args.max_time_offset_ms)
    if not result.converged:
        kept = 'input extrinsic and time offset' if args.time_offset else 'input extrinsic'
        print(f'{name}: NOT refined, {kept} kept: {result.reason}')
        return result.to_dict(), None, None, 'not refined: ' + result.reason[:80]
    offset = result.time_offset_ns if args.time_offset else None
    timing = '' if offset is None else f', time offset {offset * 1e-6:+.1f} ms'
    print(f'{name}: refined from {result.frames} frame(s), {result.edge_points} edge points '
          f'({result.paint_points} on paint): rotation {result.rotation_change_deg:.3f} deg, '
          f'translation {100 * result.translation_change_m:.1f} cm{timing}, score '
          f'{result.initial_score:.3f} -> {result.score:.3f}')
    return (result.to_dict(), result.T_cam_lidar, offset,
            f'refined: score {result.score:.3f}, moved {result.rotation_change_deg:.2f} deg '
            f'{100 * result.translation_change_m:.1f} cm{timing}')


def _write_json(path: str, data: dict) -> None:
    with open(path, 'w', encoding='utf-8') as fh:
        json.dump(data, fh, indent=1, default=lambda v: None if isinstance(v, float) and
                  not math.isfinite(v) else v)

"""Correspondence quality on the synthetic world against its ground truth.

Prints, over a few rendered frames:

* precision and recall of the predicted visible mask (C, N) against ``SimFrame.gt_visible``
  (camera depth-buffer visibility), with and without the occlusion test;
* mean / median / 95th-percentile pixel error of predicted pixels against ``SimFrame.gt_uv``
  (where the point truly appears at the camera's stamp), with and without motion compensation.

Usage: ``python benchmarks/measure_correspondence.py [--frames 3] [--seed 0]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # run from a checkout
from cmkd_ros.motion import PoseTrajectory  # noqa: E402
from cmkd_ros.projection import CorrespondenceConfig, compute_correspondences  # noqa: E402


def predicted_mask(frame, config: CorrespondenceConfig) -> tuple[np.ndarray, object]:
    """(C, N) bool predicted-visible mask of a SimFrame and the Correspondences behind it."""
    traj = PoseTrajectory(frame.ego_stamps_ns, frame.ego_poses)
    corr = compute_correspondences(frame.xyz, frame.calibration,
                                   point_time_ns=frame.point_time_ns,
                                   camera_stamp_ns=frame.camera_stamp_ns, trajectory=traj,
                                   config=config)
    mask = np.zeros(frame.gt_visible.shape, dtype=bool)
    mask[corr.camera, corr.point] = True
    return mask, corr


def visibility_scores(frames, config: CorrespondenceConfig) -> dict:
    """Pooled precision / recall of the predicted visible mask against ``gt_visible``."""
    tp = fp = fn = 0
    for f in frames:
        pred, _ = predicted_mask(f, config)
        tp += int((pred & f.gt_visible).sum())
        fp += int((pred & ~f.gt_visible).sum())
        fn += int((~pred & f.gt_visible).sum())
    return {'precision': tp / max(tp + fp, 1), 'recall': tp / max(tp + fn, 1),
            'predicted': tp + fp, 'visible': tp + fn}


def pixel_errors(frames, config: CorrespondenceConfig) -> np.ndarray:
    """Pixel distances to ``gt_uv`` of every predicted pair that is truly in view."""
    errs = []
    for f in frames:
        _, corr = predicted_mask(f, config)
        in_view = f.gt_in_view[corr.camera, corr.point]
        errs.append(np.linalg.norm(corr.uv[in_view] - f.gt_uv[corr.camera[in_view],
                                                              corr.point[in_view]], axis=1))
    return np.concatenate(errs) if errs else np.zeros(0)


def main(argv: list[str] | None = None) -> int:
    from cmkd_ros.sim import SimWorld
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--frames', type=int, default=3, help='frames to render')
    parser.add_argument('--seed', type=int, default=0, help='first world seed')
    args = parser.parse_args(argv)
    frames = [SimWorld({'seed': args.seed + i}).frame(5 + 7 * i) for i in range(args.frames)]
    n_points = sum(len(f.xyz) for f in frames)
    print(f'{len(frames)} synthetic frames, {n_points} points, '
          f'{len(frames[0].camera_names)} cameras each')
    base = CorrespondenceConfig()
    print('\nvisible mask vs gt_visible (motion compensation on)')
    print(f'{"occlusion test":<16}{"precision":>10}{"recall":>10}{"predicted":>11}'
          f'{"visible":>10}')
    for occ in (False, True):
        s = visibility_scores(frames, dataclasses.replace(base, occlusion=occ))
        print(f'{"on" if occ else "off":<16}{s["precision"]:>10.4f}{s["recall"]:>10.4f}'
              f'{s["predicted"]:>11}{s["visible"]:>10}')
    print('\npixel error vs gt_uv (occlusion off, pairs truly in view)')
    print(f'{"compensation":<16}{"mean px":>10}{"median":>10}{"p95":>10}{"pairs":>10}')
    for comp in (False, True):
        e = pixel_errors(frames, dataclasses.replace(base, occlusion=False,
                                                     motion_compensation=comp))
        print(f'{"on" if comp else "off":<16}{e.mean():>10.3f}{np.median(e):>10.3f}'
              f'{np.percentile(e, 95):>10.3f}{e.size:>10}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

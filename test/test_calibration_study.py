"""The helpers of benchmarks/calibration_study.py: rig perturbation, label agreement, pixel
error."""
import math
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'benchmarks'))

import calibration_study as cs  # noqa: E402
from cmkd_ros.calibration_check import extrinsic_error, matrix_to_rotvec  # noqa: E402
from cmkd_ros.projection import Correspondences, compute_correspondences  # noqa: E402
from cmkd_ros.sim.simulator import SimWorld  # noqa: E402


@pytest.fixture(scope='module')
def frame():
    world = SimWorld({'seed': 3, 'lidar': {'beams': 8, 'horizontal_resolution_deg': 2.0},
                      'cameras': {'count': 2, 'width': 96, 'height': 64}}, workers=1)
    return world.frame(0)


def test_perturb_rig_moves_each_camera_by_the_asked_amount(frame):
    rig = frame.calibration
    moved = cs.perturb_rig(rig, 1.5, 0.2, np.random.default_rng(0))
    axes = []
    for old, new in zip(rig.cameras, moved.cameras):
        D = new.T_cam_lidar @ np.linalg.inv(old.T_cam_lidar)
        rotvec = matrix_to_rotvec(D[:3, :3])
        assert math.degrees(np.linalg.norm(rotvec)) == pytest.approx(1.5, abs=1e-6)
        assert np.linalg.norm(D[:3, 3]) == pytest.approx(0.2, abs=1e-6)
        axes.append(rotvec / np.linalg.norm(rotvec))
        assert new.name == old.name and np.allclose(new.K, old.K)
    assert abs(float(axes[0] @ axes[1])) < 0.999   # each camera its own axis
    same = cs.perturb_rig(rig, 0.0, 0.0, np.random.default_rng(1))
    for old, new in zip(rig.cameras, same.cameras):
        assert extrinsic_error(new.T_cam_lidar, old.T_cam_lidar) == pytest.approx((0, 0),
                                                                                  abs=1e-9)


def test_label_agreement_counts_pixels_whose_label_matches():
    images = [np.array([[1, 2, 3], [4, 5, 6]], np.uint8), np.full((2, 3), 7, np.uint8)]
    labels = np.array([1, 6, 7, 9], np.uint8)
    corr = Correspondences(
        point=np.array([0, 1, 1, 2, 3]), camera=np.array([0, 0, 0, 1, 1]),
        # (0.4, 0.4) -> pixel (0, 0) = 1 ok; (2.4, 1.4) -> (2, 1) = 6 ok; (0.6, 0.2) -> 2 != 6;
        # (9, 9) clipped to (2, 1) = 7 ok; point 3 has label 9 != 7
        uv=np.array([[0.4, 0.4], [2.4, 1.4], [0.6, 0.2], [9, 9], [1, 1]], np.float32),
        depth=np.ones(5, np.float32), num_points=4, camera_names=('a', 'b'))
    assert cs.label_agreement(corr, images, labels) == (3, 5)


def test_errors_of_the_calibration_show_in_agreement_and_pixel_error(frame):
    def score(rig):
        corr = compute_correspondences(frame.xyz, rig, point_time_ns=frame.point_time_ns,
                                       camera_stamp_ns=frame.camera_stamp_ns,
                                       trajectory=frame.trajectory(), ring=frame.ring)
        agree, total = cs.label_agreement(corr, frame.label_images, frame.labels)
        return agree / total, cs.pixel_errors(corr, frame.gt_uv, frame.gt_visible).mean()

    true_agree, true_err = score(frame.calibration)
    off_agree, off_err = score(cs.perturb_rig(frame.calibration, 3.0, 0.0,
                                              np.random.default_rng(0)))
    assert true_agree > 0.9 and true_err < 0.1
    assert off_agree < true_agree and off_err > 1.0

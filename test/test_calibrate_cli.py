"""``cmkd calibrate``: recovers known perturbations on synthetic pairs and bags, refuses to
write a wrong answer, and reports bad input clearly."""
import dataclasses
import json
import math

import cv2
import numpy as np
import pytest

from cmkd_ros import calibration_check as cc
from cmkd_ros.calibration import RigCalibration, load_kitti_calibration
from cmkd_ros.tools.cli import main as cli_main

AXIS = np.array([-0.5, 0.7, 0.4]) / np.linalg.norm([-0.5, 0.7, 0.4])


def perturbed(rig: RigCalibration, degrees: float, metres: float = 0.0) -> RigCalibration:
    move = np.r_[math.radians(degrees) * AXIS, metres * AXIS[::-1]]
    return RigCalibration(tuple(cc.with_extrinsic(c, cc.perturb(c.T_cam_lidar, move))
                                for c in rig.cameras), rig.lidar_frame)


# End-to-end runs of cmkd calibrate (a few seconds each): the full suite, not the unit tier.
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def world():
    from cmkd_ros.sim import SimWorld
    return SimWorld({'seed': 5, 'cameras': {'count': 1, 'width': 480, 'height': 270}},
                    workers=1)


def test_recovers_a_rotation_from_a_pair_dataset(world, tmp_path):
    from cmkd_ros.pairs import PairWriter
    wrong = perturbed(world.calibration, 1.5)
    root = tmp_path / 'pairs'
    writer = PairWriter(str(root), fsync=False)
    for i in range(3):                      # 7 sweeps apart: three different scenes
        writer.write(dataclasses.replace(world.frame(7 * i).to_pair('png'), calibration=wrong))
    out = tmp_path / 'out'
    assert cli_main(['calibrate', str(root), '--out', str(out), '--frames', '3',
                     '--no-translation']) == 0
    name = world.calibration.names[0]
    refined = RigCalibration.load(str(out / 'calibration.yaml')).camera(name)
    truth = world.calibration.camera(name)
    before = cc.extrinsic_error(wrong.camera(name).T_cam_lidar, truth.T_cam_lidar)[0]
    after, moved = cc.extrinsic_error(refined.T_cam_lidar, truth.T_cam_lidar)
    assert abs(before - 1.5) < 1e-6 and after < 0.3 and moved < 1e-9, (after, moved)
    np.testing.assert_array_equal(refined.K, truth.K)            # intrinsics untouched
    report = json.loads((out / 'report.json').read_text())['cameras'][name]
    assert report['converged'] and report['frames'] == 3
    assert report['score'] > report['initial_score'] + 0.05
    # the pairs' intensities gave reflectance edges (paint on the road) besides silhouettes
    assert 30 < report['paint_points'] < 0.5 * report['edge_points'], report
    assert report['halves_disagree']['rotation_deg'] < 0.5
    picture = cv2.imread(str(out / f'{name}_before_after.png'))
    assert picture.shape == (2 * 270, 480, 3)


@pytest.fixture(scope='module')
def bag(world, tmp_path_factory):
    from cmkd_ros.sim.export import export_bag
    path = tmp_path_factory.mktemp('bag') / 'drive'
    export_bag(world, str(path), 2, 'mcap', 'raw')
    return path


def test_check_a_bag_calibration(bag, world, tmp_path, capsys):
    """--check on a bag: its own calibration passes, one off by 1.5 degrees does not."""
    name = world.calibration.names[0]
    assert cli_main(['calibrate', str(bag), '--check', '--frames', '2',
                     '--out', str(tmp_path / 'good')]) == 0
    good = json.loads((tmp_path / 'good' / 'report.json').read_text())['cameras'][name]
    assert f'{name}: ok' in capsys.readouterr().out
    wrong = tmp_path / 'wrong.yaml'
    perturbed(world.calibration, 1.5).save(str(wrong))
    assert cli_main(['calibrate', str(bag), '--check', '--frames', '2', '--calibration',
                     str(wrong), '--out', str(tmp_path / 'bad')]) == 0
    bad = json.loads((tmp_path / 'bad' / 'report.json').read_text())['cameras'][name]
    assert f'{name}: MISALIGNED' in capsys.readouterr().out
    assert good['frames'] == bad['frames'] == 2
    assert not good['misaligned'] and bad['misaligned']
    assert good['misalignment_deg'] < 0.4 < 1.0 < bad['misalignment_deg']


def test_time_offset_from_a_bag(world, tmp_path, capsys):
    """A driver that stamps its images 30 ms before they are captured: --time-offset finds
    it from a bag with odometry (three sweeps 7 apart: different scenes and speeds) and writes
    it as the camera's time_offset_ns."""
    from cmkd_ros.bag import SimBagWriter
    delay = 30_000_000
    path = tmp_path / 'late'
    with SimBagWriter(str(path), world.calibration, 'mcap', 'raw',
                      static_transforms=world.static_transforms()) as writer:
        for frame in (world.frame(7 * i) for i in range(3)):
            writer.write_frame(dataclasses.replace(
                frame, camera_stamp_ns=frame.camera_stamp_ns - delay))
    out = tmp_path / 'out'
    assert cli_main(['calibrate', str(path), '--time-offset', '--no-extrinsic', '--frames',
                     '3', '--out', str(out)]) == 0
    name = world.calibration.names[0]
    assert f'{name}: time offset +' in capsys.readouterr().out
    written = RigCalibration.load(str(out / 'calibration.yaml')).camera(name)
    assert abs(written.time_offset_ns - delay) < 2_500_000, written.time_offset_ns
    np.testing.assert_array_equal(written.T_cam_lidar, world.calibration.camera(name)
                                  .T_cam_lidar)
    report = json.loads((out / 'report.json').read_text())['cameras'][name]
    assert report['converged'] and report['frames'] == 3
    assert report['halves_disagree_ms'] < 5.0


@pytest.fixture()
def kitti_files(data_dir, tmp_path):
    folder = data_dir / 'kitti_000008'
    rig = load_kitti_calibration(str(folder / 'calibration.json'))
    yaml_path = tmp_path / 'rig.yaml'
    rig.save(str(yaml_path))
    points = np.fromfile(folder / 'velodyne.bin', np.float32).reshape(-1, 4)
    return {'rig': rig, 'yaml': str(yaml_path), 'points': points,
            'image': str(folder / 'image_2.png'), 'dir': tmp_path}


def run_cloud(files, cloud, image=None, extra=()):
    return cli_main(['calibrate', '--cloud', str(cloud), '--cloud-format', 'kitti',
                     '--image', f'CAM2={image or files["image"]}', '--calibration', files['yaml'],
                     '--out', str(files['dir'] / 'out'), *extra])


def test_one_real_frame_does_not_converge_and_keeps_the_input(kitti_files, capsys):
    """One KITTI frame: the two halves of the silhouettes point to different extrinsics, so
    the camera keeps its input extrinsic and the exit status says so."""
    cloud = kitti_files['dir'] / 'scan.bin'
    kitti_files['points'].tofile(cloud)
    assert run_cloud(kitti_files, cloud) == 3
    printed = capsys.readouterr().out
    assert 'CAM2: NOT refined, input extrinsic kept: the two halves of the data disagree' in \
        printed
    written = RigCalibration.load(str(kitti_files['dir'] / 'out' / 'calibration.yaml'))
    np.testing.assert_allclose(written.camera('CAM2').T_cam_lidar,
                               kitti_files['rig'].camera('CAM2').T_cam_lidar, atol=1e-12)
    report = json.loads((kitti_files['dir'] / 'out' / 'report.json').read_text())
    assert report['cameras']['CAM2']['converged'] is False


def test_bad_inputs_give_clear_errors(kitti_files, capsys):
    d = kitti_files['dir']
    # the cloud turned around: nothing in front of the camera
    behind = kitti_files['points'].copy()
    behind[:, :2] *= -1
    behind.tofile(d / 'behind.bin')
    assert run_cloud(kitti_files, d / 'behind.bin') == 2
    assert 'do not overlap' in capsys.readouterr().err
    # an empty cloud
    (d / 'empty.bin').write_bytes(b'')
    assert run_cloud(kitti_files, d / 'empty.bin') == 2
    assert 'too few to find edges' in capsys.readouterr().err
    # a uniform image
    kitti_files['points'].tofile(d / 'scan.bin')
    cv2.imwrite(str(d / 'gray.png'), np.full((375, 1242, 3), 90, np.uint8))
    assert run_cloud(kitti_files, d / 'scan.bin', d / 'gray.png') == 2
    assert 'the image has no edges (a uniform image)' in capsys.readouterr().err
    # an unknown camera
    assert run_cloud(kitti_files, d / 'scan.bin', extra=['--cameras', 'CAM3']) == 2
    assert "--cameras ['CAM3'] not in the calibration" in capsys.readouterr().err
    # a time offset from a single cloud without point times or ego poses
    assert run_cloud(kitti_files, d / 'scan.bin', extra=['--time-offset']) == 2
    assert '--time-offset needs camera stamps, point times and ego poses' in \
        capsys.readouterr().err

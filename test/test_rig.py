"""``cmkd rig``: the rig from a bag's /tf_static and CameraInfo equals the simulator's rig."""
import dataclasses

import numpy as np
import pytest

from cmkd_ros import bag
from cmkd_ros.tools import cli
from cmkd_ros.calibration import RigCalibration
from cmkd_ros.conversions import camera_info_from_calibration
from cmkd_ros.rig import (RigError, camera_info_topics, extrinsics_difference, resolve_rig,
                          rig_from_bag)
from cmkd_ros.sim import SimWorld
from cmkd_ros.sim.export import export_bag, export_pairs

CONFIG = {'seed': 5, 'lidar': {'beams': 8, 'horizontal_resolution_deg': 2.0},
          'cameras': {'count': 3, 'width': 96, 'height': 54}}


@pytest.fixture(scope='module')
def world():
    return SimWorld(CONFIG)


@pytest.fixture(scope='module')
def sim_bags(world, tmp_path_factory):
    root = tmp_path_factory.mktemp('rig')
    return {storage: export_bag(world, str(root / storage), 1, storage)['path']
            for storage in ('mcap', 'sqlite3')}


def _info_bag(path, rig, edges, clouds=()):
    """A bag with only CameraInfo, /tf_static ``edges`` and empty clouds ``(topic, frame)``."""
    from cmkd_ros.conversions import array_to_cloud
    with bag.BagWriter(path) as writer:
        writer.write(bag.TF_STATIC_TOPIC, bag.tf_message(writer.typestore, 1, edges), 1)
        for cam in rig.cameras:
            writer.write(bag.camera_topics(cam.name)['info'],
                         camera_info_from_calibration(cam, 2, writer.msg_types()), 2)
        for topic, frame in clouds:
            writer.write(topic, array_to_cloud(np.zeros(0, bag.LABEL_DTYPE), 3, frame,
                                               writer.msg_types()), 3)
    return path


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_cmkd_rig_rebuilds_the_simulator_calibration_from_tf(tmp_path, world, sim_bags, storage,
                                                             capsys):
    out = tmp_path / 'rig.yaml'
    assert cli.main(['rig', sim_bags[storage], '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert ('front: /cameras/front/camera_info 96x54 plumb_bob; lidar -> base_link -> '
            'front_camera_link -> front_camera_optical_frame') in printed
    rig, sim = RigCalibration.load(str(out)), world.calibration
    assert rig.names == sim.names and rig.lidar_frame == sim.lidar_frame == 'lidar'
    for cam, ref in zip(rig.cameras, sim.cameras):
        assert np.abs(cam.T_cam_lidar - ref.T_cam_lidar).max() < 1e-9
        np.testing.assert_array_equal(cam.K, ref.K)
        np.testing.assert_array_equal(cam.D, ref.D)
        assert (cam.width, cam.height, cam.distortion_model, cam.frame_id) == (
            ref.width, ref.height, ref.distortion_model, ref.frame_id)
        assert cam.frame_id == f'{cam.name}_camera_optical_frame'
    # the bag's TF is URDF-like: base_link on the road under the LiDAR, camera body frames
    tree = rig_from_bag(sim_bags[storage]).tree
    np.testing.assert_allclose(tree.lookup('base_link', 'lidar')[:3, 3],
                               [0, 0, world.config.lidar.height_m])
    T_lidar_link = tree.lookup('lidar', 'front_camera_link')
    np.testing.assert_allclose(T_lidar_link[:3, 0], [np.cos(np.radians(2)), 0,
                                                     -np.sin(np.radians(2))], atol=1e-12)
    assert T_lidar_link[2, 2] > 0.99                     # body z up (2 deg pitch)


def test_camera_selection_and_lidar_frame(tmp_path, world, sim_bags):
    two = rig_from_bag(sim_bags['mcap'], cameras=['front_left', 'front=/cameras/front/'
                                                  'camera_info'])
    assert two.rig.names == ['front_left', 'front']
    other = rig_from_bag(sim_bags['mcap'], lidar_frame='base_link', cameras=['front'])
    T = world.calibration.camera('front').T_cam_lidar
    np.testing.assert_allclose(other.rig.cameras[0].T_cam_lidar[:3, 3],
                               (T @ np.linalg.inv(other.tree.lookup('base_link', 'lidar')))
                               [:3, 3], atol=1e-12)
    topics = ['/sensing/camera/camera0/camera_info', '/sensing/camera/camera1/camera_info',
              '/other/camera0/camera_info']
    assert camera_info_topics(topics, template='/sensing/camera/{camera}/camera_info') == {
        'camera0': topics[0], 'camera1': topics[1]}
    assert camera_info_topics(topics, ['camera1']) == {'camera1': topics[1]}
    with pytest.raises(RigError, match=r"same camera name: \{'camera0'"):
        camera_info_topics(topics)
    with pytest.raises(RigError, match="camera 'camera0': several CameraInfo topics"):
        camera_info_topics(topics, ['camera0'])
    with pytest.raises(RigError, match="camera 'rear': no CameraInfo topic; the bag's cameras "
                                       r"are \['camera0', 'camera1'\]"):
        camera_info_topics(topics, ['rear'])


def test_resolve_rig_and_extrinsics_difference(tmp_path, world, sim_bags):
    yaml_path = tmp_path / 'rig.yaml'
    world.calibration.save(str(yaml_path))
    assert resolve_rig(str(yaml_path), sim_bags['mcap']).to_dict() == \
        world.calibration.to_dict()                       # the YAML wins when given
    from_tf = resolve_rig(None, sim_bags['mcap'])
    assert from_tf.names == world.calibration.names
    with pytest.raises(RigError, match='give a calibration YAML or a bag'):
        resolve_rig()
    T = world.calibration.camera('front').T_cam_lidar
    moved = np.eye(4)
    moved[:3, :3] = [[np.cos(0.02), -np.sin(0.02), 0], [np.sin(0.02), np.cos(0.02), 0],
                     [0, 0, 1]]
    moved[:3, 3] = [0.03, 0, -0.04]                       # in the camera frame: 5 cm
    degrees, centimetres = extrinsics_difference(moved @ T, T)
    assert degrees == pytest.approx(np.degrees(0.02)) and centimetres == pytest.approx(5.0)


def _fails(capsys, *args) -> str:
    assert cli.main(['rig', *args]) == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err and err.startswith('cmkd rig: ')
    return err


@pytest.mark.slow
def test_cmkd_rig_wrong_use(tmp_path, world, capsys, sim_bags):
    out = str(tmp_path / 'rig.yaml')
    assert 'is not a rosbag2 folder' in _fails(capsys, str(tmp_path), '--out', out)
    assert "camera 'rear': no CameraInfo topic; the bag's cameras are ['front', 'front_left', " \
        "'front_right']" in _fails(capsys, sim_bags['mcap'], '--cameras', 'rear', '--out', out)
    assert "frame 'velodyne' is not in the TF tree" in _fails(
        capsys, sim_bags['mcap'], '--lidar-frame', 'velodyne', '--out', out)
    assert 'No such file or directory' in _fails(capsys, sim_bags['mcap'], '--out',
                                                 str(tmp_path / 'no' / 'rig.yaml'))
    with pytest.raises(SystemExit) as exit_:
        cli.main(['rig', sim_bags['mcap']])                # --out is required
    assert exit_.value.code == 2 and '--out' in capsys.readouterr().err
    # a bag whose /tf_static lacks base_link -> front_camera_link: the missing link is named
    edges = [e for e in world.static_transforms() if e[1] != 'front_camera_link']
    broken = _info_bag(tmp_path / 'broken', world.calibration, edges, [('/lidar/points',
                                                                        'lidar')])
    err = _fails(capsys, str(broken), '--out', out)
    assert "camera 'front' (/cameras/front/camera_info): no TF chain from 'lidar' to " \
           "'front_camera_optical_frame'" in err
    assert "(top 'front_camera_link', which has no parent)" in err
    # clouds in two frames: the LiDAR frame must be named
    two = _info_bag(tmp_path / 'two', world.calibration, world.static_transforms(),
                    [('/lidar/points', 'lidar'), ('/radar/points', 'radar')])
    assert "the PointCloud2 topics have several frames" in _fails(capsys, str(two), '--out',
                                                                  out)
    assert cli.main(['rig', str(two), '--lidar-frame', 'lidar', '--out', out]) == 0
    # CameraInfo naming the camera's body frame instead of its optical frame: a warning
    body = RigCalibration(tuple(dataclasses.replace(c, frame_id=f'{c.name}_camera_link')
                                for c in world.calibration.cameras), 'lidar')
    _info_bag(tmp_path / 'body', body, world.static_transforms(), [('/lidar/points', 'lidar')])
    capsys.readouterr()
    assert cli.main(['rig', str(tmp_path / 'body'), '--out', out]) == 0
    assert ("cmkd rig: warning: camera 'front': CameraInfo names the frame 'front_camera_link', "
            "whose child 'front_camera_optical_frame' looks like the optical frame") in \
        capsys.readouterr().err


def test_overlay_takes_the_rig_from_a_bag_tf(tmp_path, world, capsys):
    pairs = str(tmp_path / 'pairs')
    export_pairs(world, pairs, 1)
    base = ['overlay', pairs, '--set', 'occlusion=false']
    assert cli.main([*base, '--out', str(tmp_path / 'a')]) == 0
    own = capsys.readouterr().out
    same = _info_bag(tmp_path / 'same', world.calibration, world.static_transforms(),
                     [('/lidar/points', 'lidar')])
    assert cli.main([*base, '--out', str(tmp_path / 'b'), '--tf-bag', str(same)]) == 0
    assert capsys.readouterr().out.replace('/b/', '/a/') == own
    # the LiDAR mounted 5 deg yawed on base_link: other extrinsics, other points in the images
    (_, _, T_base_lidar), *cameras = world.static_transforms()
    yaw = np.eye(4)
    yaw[:2, :2] = [[np.cos(0.087), -np.sin(0.087)], [np.sin(0.087), np.cos(0.087)]]
    turned = _info_bag(tmp_path / 'turned', world.calibration,
                       [('base_link', 'lidar', T_base_lidar @ yaw), *cameras],
                       [('/lidar/points', 'lidar')])
    assert cli.main([*base, '--out', str(tmp_path / 'c'), '--tf-bag', str(turned)]) == 0
    assert capsys.readouterr().out.replace('/c/', '/a/') != own
    assert cli.main([*base, '--out', str(tmp_path / 'd'), '--tf-bag', str(tmp_path)]) == 2
    assert 'is not a rosbag2 folder' in capsys.readouterr().err

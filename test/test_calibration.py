"""Rig calibration: YAML schema, validation and the CameraInfo / nuScenes / KITTI loaders."""
import io
import json
import shutil

import cv2
import numpy as np
import pytest

from cmkd_ros import conversions
from cmkd_ros.calibration import (CalibrationError, CameraCalibration, RigCalibration,
                                  calibration_from_camera_info, load_kitti_calibration,
                                  load_nuscenes_calibration, nuscenes_stamps_ns,
                                  read_image_size)


def camera(**overrides):
    args = dict(name='front', width=640, height=480,
                K=[[500.0, 0, 320], [0, 500, 240], [0, 0, 1]], T_cam_lidar=np.eye(4),
                distortion_model='plumb_bob', D=[0.1, -0.05, 0.001, 0.002, 0.01])
    args.update(overrides)
    return CameraCalibration(**args)


def test_yaml_roundtrip(tmp_path):
    T = np.eye(4)
    T[:3, :3] = cv2.Rodrigues(np.array([0.1, -0.2, 0.3]))[0]
    T[:3, 3] = [0.5, -0.1, 1.2]
    rig = RigCalibration((camera(T_cam_lidar=T, time_offset_ns=-2_000_000),
                          camera(name='fish', distortion_model='equidistant',
                                 D=[0.1, 0.01, 0.0, 0.0])), lidar_frame='lidar_top')
    path = tmp_path / 'rig.yaml'
    rig.save(str(path))
    back = RigCalibration.load(str(path))
    assert back.names == ['front', 'fish'] and back.lidar_frame == 'lidar_top'
    np.testing.assert_allclose(back.cameras[0].T_cam_lidar, T)
    assert back.cameras[0].time_offset_ns == -2_000_000
    assert back.camera('fish').distortion_model == 'equidistant'


@pytest.mark.parametrize('overrides,message', [
    ({'K': [[-500.0, 0, 320], [0, 500, 240], [0, 0, 1]]}, 'focal lengths must be positive'),
    ({'K': [[500.0, 0, 320], [0, 0.0, 240], [0, 0, 1]]}, 'focal lengths must be positive'),
    ({'T_cam_lidar': np.diag([1.0, 1.0, 1.1, 1.0])}, 'rotation is not orthonormal'),
    ({'T_cam_lidar': np.diag([1.0, 1.0, -1.0, 1.0])}, 'rotation is not orthonormal'),
    ({'D': [0.1, 0.2, 0.3]}, 'D has 3 coefficients'),
    ({'distortion_model': 'fisheye62'}, 'distortion_model'),
    ({'width': 0}, 'width/height must be positive'),
])
def test_validation_errors_name_the_field(overrides, message):
    with pytest.raises(CalibrationError, match=message):
        camera(**overrides)


def test_image_size_mismatch_and_unknown_fields():
    with pytest.raises(CalibrationError, match='image is 641x480 but the calibration says'):
        camera().check_image_size(641, 480)
    data = camera().to_dict()
    data['focal'] = 3
    with pytest.raises(CalibrationError, match="unknown field"):
        CameraCalibration.from_dict(data)
    with pytest.raises(CalibrationError, match='unique'):
        RigCalibration((camera(), camera()))


def test_read_image_size_png_and_jpeg(data_dir):
    for path in [data_dir / 'kitti_000008' / 'image_2.png',
                 data_dir / 'nuscenes_sample' / 'CAM_BACK.jpg']:
        h, w = cv2.imread(str(path)).shape[:2]
        assert read_image_size(str(path)) == (w, h)
        assert read_image_size(io.BytesIO(path.read_bytes())) == (w, h)
    with pytest.raises(CalibrationError, match='not a PNG or JPEG'):
        read_image_size(io.BytesIO(b'GIF89a' + bytes(30)))
    with pytest.raises(CalibrationError, match='without a frame header'):
        read_image_size(io.BytesIO(b'\xff\xd8\xff\xe0\x00\x04ab'))


def test_nuscenes_loader(data_dir, tmp_path):
    path = data_dir / 'nuscenes_sample' / 'calibration.json'
    raw = json.loads(path.read_text())
    rig = load_nuscenes_calibration(str(path))
    static = load_nuscenes_calibration(str(path), static=True)
    assert rig.names == static.names == list(raw['cameras'])
    assert len(rig) == 6
    speeds = []
    for cam, mount in zip(rig.cameras, static.cameras):
        src = raw['cameras'][cam.name]
        np.testing.assert_allclose(cam.K, src['K'])
        np.testing.assert_allclose(cam.T_cam_lidar, src['T_cam_lidar'])
        assert (cam.width, cam.height) == (1600, 900) and cam.distortion_model == 'none'
        # the fixed mounting goes through the ego frame only
        T_chain = np.linalg.inv(np.array(src['T_ego_cam'])) @ np.array(raw['lidar']['T_ego_lidar'])
        np.testing.assert_allclose(mount.T_cam_lidar, T_chain, atol=1e-12)
        # the file's transform adds the ego motion between the stamps: a small rotation and a
        # shift proportional to the time between the LiDAR and the camera stamp
        motion = cam.T_cam_lidar @ np.linalg.inv(mount.T_cam_lidar)
        dt = raw['lidar']['timestamp'] - src['timestamp']
        assert np.degrees(np.arccos(min(1.0, (np.trace(motion[:3, :3]) - 1) / 2))) < 0.5
        if dt > 0.005:
            speeds.append(np.linalg.norm(motion[:3, 3]) / dt)
    # one ego speed explains every camera's shift (urban driving speed)
    assert len(speeds) == 5 and max(speeds) / min(speeds) < 1.01 and 5 < speeds[0] < 15
    lidar_ns, cams_ns = nuscenes_stamps_ns(str(path))
    assert lidar_ns == 1532402927647951000
    assert all(0 < lidar_ns - t < 50_000_000 for t in cams_ns.values())
    # an image of another size than the calibration is rejected
    copy = tmp_path / 'nus'
    shutil.copytree(data_dir / 'nuscenes_sample', copy)
    small = cv2.imread(str(copy / 'CAM_FRONT.jpg'))[:450, :800]
    cv2.imwrite(str(copy / 'CAM_FRONT.jpg'), small)
    with pytest.raises(CalibrationError, match="'CAM_FRONT': image is 800x450"):
        load_nuscenes_calibration(str(copy / 'calibration.json'))
    assert len(load_nuscenes_calibration(str(copy / 'calibration.json'),
                                         check_images=False)) == 6


def test_kitti_loader_reproduces_P2(data_dir, tmp_path):
    path = data_dir / 'kitti_000008' / 'calibration.json'
    raw = json.loads(path.read_text())['camera']
    rig = load_kitti_calibration(str(path))
    cam = rig.cameras[0]
    assert (cam.width, cam.height) == (1242, 375)
    # K [R | t] equals P2 @ R0_rect @ Tr_velo_to_cam (the KITTI projection)
    P_ours = cam.K @ cam.T_cam_lidar[:3]
    P_kitti = (np.array(raw['P2']) @ np.array(raw['R0_rect']) @ np.array(raw['Tr_velo_to_cam']))
    np.testing.assert_allclose(P_ours, P_kitti[:3], rtol=1e-6, atol=1e-6)
    # the camera-0 rectified frame of the file differs from camera 2 by the stereo baseline
    baseline = cam.T_cam_lidar[:3, 3] - np.array(raw['T_cam_lidar'])[:3, 3]
    assert 0.05 < np.linalg.norm(baseline) < 0.07
    # a mismatching image size in the file is rejected
    bad = json.loads(path.read_text())
    bad['camera']['width'] = 1240
    (tmp_path / 'calibration.json').write_text(json.dumps(bad))
    with pytest.raises(CalibrationError, match='image is 1240x375'):
        load_kitti_calibration(str(tmp_path / 'calibration.json'),
                               image_path=str(data_dir / 'kitti_000008' / 'image_2.png'))


def test_camera_info_loader_options_and_errors():
    t = conversions.rosbags_types()
    msg = conversions.camera_info_from_calibration(camera(), 0, t)
    cam = calibration_from_camera_info(msg, np.eye(4), 'front', time_offset_ns=5)
    assert cam.distortion_model == 'plumb_bob' and cam.time_offset_ns == 5
    # 8 coefficients under plumb_bob are OpenCV's rational model
    msg.d = np.array([0.1, 0.0, 0.0, 0.0, 0.0, 0.2, 0.0, 0.0])
    assert calibration_from_camera_info(msg, np.eye(4), 'f').distortion_model == \
        'rational_polynomial'
    # image_rect: K from P, no distortion
    msg.p = np.array([450.0, 0, 300, 0, 0, 455, 230, 0, 0, 0, 1, 0])
    rect = calibration_from_camera_info(msg, np.eye(4), 'f', rectified=True)
    assert rect.distortion_model == 'none' and rect.K[0, 0] == 450 and rect.K[1, 2] == 230
    msg.distortion_model = 'kannala_brandt'
    with pytest.raises(CalibrationError, match="distortion_model 'kannala_brandt'"):
        calibration_from_camera_info(msg, np.eye(4), 'f')
    msg.distortion_model = 'plumb_bob'
    msg.binning_x = 2
    with pytest.raises(CalibrationError, match='binning'):
        calibration_from_camera_info(msg, np.eye(4), 'f')
    msg.binning_x = 0
    with pytest.raises(CalibrationError, match='rotation is not orthonormal'):
        calibration_from_camera_info(msg, np.diag([2.0, 1, 1, 1]), 'f')
    msg.k = np.array([0.0, 0, 300, 0, 455, 230, 0, 0, 1])
    with pytest.raises(CalibrationError, match='focal lengths must be positive'):
        calibration_from_camera_info(msg, np.eye(4), 'f')

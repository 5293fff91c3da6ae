"""Pose interpolation, trajectory constructors and motion-compensated correspondences."""
import numpy as np
import pytest

from cmkd_ros import conversions
from cmkd_ros.calibration import CameraCalibration, RigCalibration
from cmkd_ros.motion import (MotionError, PoseTrajectory, compensation_transforms,
                             constant_velocity, invert, matrix_to_rotvec, rotvec_to_matrix)
from cmkd_ros.projection import CorrespondenceConfig, compute_correspondences


def rot_z(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def pose(R, t):
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


def test_rotvec_roundtrip():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(200, 3))
    v *= (rng.uniform(0, np.pi - 1e-2, size=200) / np.linalg.norm(v, axis=1))[:, None]
    R = rotvec_to_matrix(v)
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.tile(np.eye(3), (200, 1, 1)),
                               atol=1e-12)
    np.testing.assert_allclose(matrix_to_rotvec(R), v, atol=1e-9)
    np.testing.assert_allclose(rotvec_to_matrix([0, 0, 0.3]), rot_z(0.3), atol=1e-12)
    near_pi = rotvec_to_matrix(np.array([[0.0, 0.6, 0.8]]) * (np.pi - 1e-5))
    np.testing.assert_allclose(rotvec_to_matrix(matrix_to_rotvec(near_pi)), near_pi, atol=1e-6)


def test_interpolation_slerp_and_linear():
    stamps = np.array([0, 100_000_000, 300_000_000], dtype=np.int64)
    poses = np.stack([pose(rot_z(0.0), [0, 0, 0]), pose(rot_z(0.2), [1, 0, 0]),
                      pose(rot_z(0.6), [1, 2, 0])])
    traj = PoseTrajectory(stamps, poses)
    np.testing.assert_allclose(traj.pose_at(stamps), poses, atol=1e-12)
    mid = traj.pose_at([50_000_000, 200_000_000])
    np.testing.assert_allclose(mid[0], pose(rot_z(0.1), [0.5, 0, 0]), atol=1e-12)
    np.testing.assert_allclose(mid[1], pose(rot_z(0.4), [1, 1, 0]), atol=1e-12)
    # extrapolation continues the end segment's motion
    np.testing.assert_allclose(traj.pose_at(350_000_000)[0], pose(rot_z(0.7), [1, 2.5, 0]),
                               atol=1e-12)
    with pytest.raises(MotionError, match='outside the trajectory'):
        traj.pose_at(300_000_000 + 200_000_000)
    single = PoseTrajectory(np.array([5]), poses[1:2])
    np.testing.assert_allclose(single.pose_at([0, 7]), poses[[1, 1]])


def test_trajectory_errors():
    poses = np.tile(np.eye(4), (2, 1, 1))
    with pytest.raises(MotionError, match='increase strictly'):
        PoseTrajectory(np.array([5, 5]), poses)
    with pytest.raises(MotionError, match='integer nanoseconds'):
        PoseTrajectory(np.array([0.0, 1.0]), poses)
    bad = poses.copy()
    bad[1, 0, 0] = 2.0
    with pytest.raises(MotionError, match=r'T_world_lidar\[1\] rotation is not orthonormal'):
        PoseTrajectory(np.array([0, 1]), bad)
    with pytest.raises(MotionError, match='2 stamps but 1 poses'):
        PoseTrajectory(np.array([0, 1]), poses[:1])
    with pytest.raises(MotionError, match='unit length'):
        PoseTrajectory.from_translations_quaternions([0], [[0, 0, 0]], [[0, 0, 0, 2.0]])


@pytest.mark.parametrize('kind', ['rclpy', 'rosbags'])
def test_from_odometry_messages(kind):
    if kind == 'rclpy':
        from nav_msgs.msg import Odometry

        def odom(stamp_ns, xyz, q):
            msg = Odometry()
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 10**9)
            p, o = msg.pose.pose.position, msg.pose.pose.orientation
            p.x, p.y, p.z = xyz
            o.x, o.y, o.z, o.w = q
            return msg
    else:
        store = conversions.rosbags_types().typestore
        T = store.types
        t = conversions.rosbags_types()

        def odom(stamp_ns, xyz, q):
            cov = np.zeros(36)
            pose_ = T['geometry_msgs/msg/Pose'](
                position=T['geometry_msgs/msg/Point'](x=xyz[0], y=xyz[1], z=xyz[2]),
                orientation=T['geometry_msgs/msg/Quaternion'](x=q[0], y=q[1], z=q[2], w=q[3]))
            vec = T['geometry_msgs/msg/Vector3'](x=0.0, y=0.0, z=0.0)
            return T['nav_msgs/msg/Odometry'](
                header=conversions.make_header(stamp_ns, 'odom', t), child_frame_id='base',
                pose=T['geometry_msgs/msg/PoseWithCovariance'](pose=pose_, covariance=cov),
                twist=T['geometry_msgs/msg/TwistWithCovariance'](
                    twist=T['geometry_msgs/msg/Twist'](linear=vec, angular=vec),
                    covariance=cov))
    half = np.sin(0.25), np.cos(0.25)             # rotation of 0.5 rad about z
    msgs = [odom(2_000_000_000, (2.0, 0.0, 0.0), (0, 0, half[0], half[1])),
            odom(1_000_000_000, (0.0, 0.0, 0.0), (0, 0, 0, 1.0))]     # out of order
    T_base_lidar = pose(np.eye(3), [0.5, 0.0, 1.8])
    traj = PoseTrajectory.from_odometry(msgs, T_body_lidar=T_base_lidar)
    np.testing.assert_array_equal(traj.stamps_ns, [1_000_000_000, 2_000_000_000])
    T_mid = traj.pose_at(1_500_000_000)[0]
    # the LiDAR pose is interpolated: half the rotation, the mean of the two LiDAR positions
    lidar_0 = T_base_lidar[:3, 3]
    lidar_1 = pose(rot_z(0.5), [2.0, 0, 0])[:3, :3] @ T_base_lidar[:3, 3] + [2.0, 0, 0]
    expected = pose(rot_z(0.25), (lidar_0 + lidar_1) / 2)
    np.testing.assert_allclose(T_mid, expected, atol=1e-9)


def test_dataset_pose_list_orders_agree():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(5, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    t = rng.normal(size=(5, 3))
    stamps = np.arange(5, dtype=np.int64) * 10**8
    a = PoseTrajectory.from_translations_quaternions(stamps, t, q, order='xyzw')
    wxyz = q[::-1][:, [3, 0, 1, 2]]
    b = PoseTrajectory.from_translations_quaternions(stamps[::-1], t[::-1], wxyz, order='wxyz')
    np.testing.assert_allclose(a.T_world_lidar, b.T_world_lidar, atol=1e-12)


def test_constant_velocity_matches_sampled_interpolation():
    T0 = pose(rot_z(0.3), [10, -4, 0.5])
    cv = constant_velocity(1_000, T0, [12.0, 0.5, 0.0], [0.0, 0.02, 0.4])
    # pure translation check: p(t) = p0 + R0 v t when w = 0
    straight = constant_velocity(0, T0, [12.0, 0.0, 0.0])
    np.testing.assert_allclose(straight.pose_at(500_000_000)[0][:3, 3],
                               T0[:3, 3] + T0[:3, :3] @ [6.0, 0, 0], atol=1e-12)
    # a densely sampled trajectory of the same motion interpolates to the same poses
    stamps = np.arange(0, 200_000_001, 5_000_000, dtype=np.int64) + 1_000
    sampled = PoseTrajectory(stamps, cv.pose_at(stamps))
    query = np.array([1_000 + 2_500_000, 1_000 + 123_456_789], dtype=np.int64)
    np.testing.assert_allclose(sampled.pose_at(query), cv.pose_at(query), atol=5e-5)
    # the screw motion returns to an integrated path: heading after 1 s is 0.3 + 0.4
    R1 = cv.pose_at(1_000 + 10**9)[0][:3, :3]
    assert np.degrees(np.arccos((np.trace(R1 @ T0[:3, :3].T) - 1) / 2)) == pytest.approx(
        np.degrees(np.hypot(0.02, 0.4)), rel=1e-9)


def forward_camera(t=(1.0, 0.0, -0.2)):
    T = np.eye(4)
    T[:3, :3] = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0.0]])      # x fwd, y left, z up
    T[:3, 3] = -T[:3, :3] @ np.asarray(t)
    return CameraCalibration(name='front', width=1280, height=720,
                             K=[[800, 0, 640], [0, 800, 360], [0, 0, 1]], T_cam_lidar=T,
                             distortion_model='plumb_bob', D=[-0.1, 0.02, 0.0, 0.0, 0.0],
                             time_offset_ns=-3_000_000)


def scanned_world(traj, t0, sweep_ns, n=6000, seed=2):
    """Static world points and their LiDAR-frame coordinates at each point's capture time."""
    rng = np.random.default_rng(seed)
    ahead = np.stack([rng.uniform(8, 40, n), rng.uniform(-10, 10, n), rng.uniform(-1.5, 3, n)],
                     1)
    T0 = traj.pose_at(t0)[0]
    world = ahead @ T0[:3, :3].T + T0[:3, 3]
    times = np.sort(rng.integers(t0, t0 + sweep_ns, n)).astype(np.int64)
    T_lidar_world = invert(traj.pose_at(times))
    local = np.einsum('nij,nj->ni', T_lidar_world[:, :3, :3], world) + T_lidar_world[:, :3, 3]
    return world, local.astype(np.float32), times


def true_pixels(cam, traj, world, capture_ns):
    """Pixels of static world points seen by ``cam`` at its capture time (OpenCV)."""
    import cv2
    T_cam_world = cam.T_cam_lidar @ invert(traj.pose_at(capture_ns)[0])
    rvec, _ = cv2.Rodrigues(T_cam_world[:3, :3])
    uv, _ = cv2.projectPoints(world.reshape(-1, 1, 3), rvec, T_cam_world[:3, 3], cam.K, cam.D)
    return uv.reshape(-1, 2)


def test_compensation_recovers_true_pixels():
    # ego drives at 15 m/s and yaws at 0.5 rad/s; a 100 ms sweep; camera 40 ms after sweep start
    traj = constant_velocity(0, pose(rot_z(0.1), [100.0, 50.0, 0.0]), [15.0, 0.0, 0.0],
                             [0.0, 0.0, 0.5])
    cam = forward_camera()
    rig = RigCalibration((cam,))
    world, local, times = scanned_world(traj, 0, 100_000_000)
    stamp = np.array([43_000_000])                  # header stamp; capture = stamp - 3 ms
    truth = true_pixels(cam, traj, world, 40_000_000)
    cfg = CorrespondenceConfig(occlusion=False, time_resolution_ns=10_000)
    comp = compute_correspondences(local, rig, point_time_ns=times, camera_stamp_ns=stamp,
                                   trajectory=traj, config=cfg)
    raw = compute_correspondences(local, rig, config=cfg)
    err_comp = np.linalg.norm(comp.uv - truth[comp.point], axis=1)
    err_raw = np.linalg.norm(raw.uv - truth[raw.point], axis=1)
    assert len(comp) > 1000
    assert err_comp.max() < 0.05                    # 10 us time rounding: < 0.15 mm of travel
    assert err_raw.mean() > 5.0
    # switching compensation off in the config gives the raw result
    off = compute_correspondences(local, rig, point_time_ns=times, camera_stamp_ns=stamp,
                                  trajectory=traj,
                                  config=CorrespondenceConfig(occlusion=False,
                                                              motion_compensation=False))
    np.testing.assert_array_equal(off.uv, raw.uv)


def test_compensation_with_interpolated_poses_and_scalar_time():
    cv_traj = constant_velocity(0, np.eye(4), [20.0, 1.0, 0.0], [0.0, 0.0, 0.3])
    stamps = np.arange(-100_000_000, 300_000_001, 10_000_000, dtype=np.int64)   # 100 Hz odom
    traj = PoseTrajectory(stamps, cv_traj.pose_at(stamps))
    cam = forward_camera()
    rig = RigCalibration((cam, CameraCalibration(
        name='right', width=1280, height=720, K=cam.K, T_cam_lidar=cam.T_cam_lidar @ pose(
            rot_z(np.pi / 2), [0, 0, 0]), time_offset_ns=0)))
    world, local, times = scanned_world(cv_traj, 0, 100_000_000, seed=3)
    stamps_cam = np.array([60_000_000, 20_000_000])
    corr = compute_correspondences(local, rig, point_time_ns=times, camera_stamp_ns=stamps_cam,
                                   trajectory=traj, config=CorrespondenceConfig(occlusion=False))
    front = corr.for_camera('front')
    truth = true_pixels(cam, cv_traj, world, 57_000_000)
    assert np.abs(front.uv - truth[front.point]).max() < 0.5      # interpolation + 50 us bins
    # one capture time for the whole sweep (a global-shutter LiDAR / no per-point time)
    xyz_ref, T = compensation_transforms(local[:10], 0, np.array([10**7, 2 * 10**7]), cv_traj)
    T_w0 = cv_traj.pose_at(0)[0]
    for c, t in enumerate([10**7, 2 * 10**7]):
        expect = invert(cv_traj.pose_at(t)[0]) @ T_w0
        got = T[c] @ np.vstack([xyz_ref.T, np.ones(10)])
        np.testing.assert_allclose(got[:3].T, (local[:10] @ expect[:3, :3].T + expect[:3, 3]),
                                   atol=1e-4)
    with pytest.raises(MotionError, match='entries for'):
        compensation_transforms(local, times[:5], np.array([0]), traj)

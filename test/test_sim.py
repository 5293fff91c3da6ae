"""Synthetic sensor world: determinism, geometric consistency, ground truth, config errors."""
import cv2
import numpy as np
import pytest

from cmkd_ros.config import ConfigError, build, to_dict
from cmkd_ros.pairs import PairReader, PairWriter
from cmkd_ros.sim import SimConfig, SimWorld
from cmkd_ros.sim.camera import distort_plumb_bob, undistort_plumb_bob

# Six nuScenes-like cameras at half resolution keep the module fast; the LiDAR is the default.
SMALL = {'cameras': {'width': 320, 'height': 180}}
TINY = {'lidar': {'beams': 16, 'horizontal_resolution_deg': 1.0},
        'cameras': {'count': 2, 'width': 96, 'height': 64}}


@pytest.fixture(scope='module')
def world():
    return SimWorld({'seed': 11, **SMALL})


@pytest.fixture(scope='module')
def frame(world):
    return world.frame(4)


def _frame_arrays(f):
    return [f.xyz, f.intensity, f.ring, f.point_time_ns, f.labels, f.camera_stamp_ns, f.gt_uv,
            f.gt_visible, f.gt_occluded, f.ego_poses, *f.images, *f.label_images, *f.depth_images]


def test_same_seed_and_config_give_identical_frames_in_any_order():
    a = SimWorld({'seed': 5, **TINY}, workers=1)
    b = SimWorld({'seed': 5, **TINY}, workers=2)
    b.frame(0)                                   # b renders another frame first
    fa, fb = a.frame(2), b.frame(2)
    assert len(fa.xyz) > 1000
    for x, y in zip(_frame_arrays(fa), _frame_arrays(fb)):
        assert np.array_equal(x, y)
    assert fa.calibration.to_dict() == fb.calibration.to_dict()


def test_different_seeds_give_different_layouts_and_textures():
    a, b = SimWorld({'seed': 1, **TINY}), SimWorld({'seed': 2, **TINY})
    pa, pb = a.scene.primitives(0, 120), b.scene.primitives(0, 120)
    assert len(pa) > 20 and len(pb) > 20
    assert len(pa) != len(pb) or not np.allclose(pa.center, pb.center)
    assert not np.allclose(a.scene.palette['asphalt'], b.scene.palette['asphalt'])
    fa, fb = a.frame(0), b.frame(0)
    hist_a = np.bincount(fa.labels, minlength=12) / len(fa.labels)
    hist_b = np.bincount(fb.labels, minlength=12) / len(fb.labels)
    assert np.abs(hist_a - hist_b).sum() > 0.05
    assert not np.array_equal(fa.images[0], fb.images[0])


def test_sweep_has_lidar_properties(world, frame):
    n = len(frame.xyz)
    assert 20_000 < n < 45_000                  # about 30k points for 32 beams
    assert frame.xyz.dtype == np.float32 and frame.xyz.shape == (n, 3)
    assert set(np.unique(frame.ring)) <= set(range(32)) and len(np.unique(frame.ring)) > 25
    assert frame.intensity.min() >= 0 and frame.intensity.max() <= 1
    assert frame.intensity.std() > 0.05
    dt = frame.point_time_ns - frame.lidar_stamp_ns
    assert dt.min() >= 0 and dt.max() < world.sweep_period_ns
    assert np.all(np.diff(dt) >= 0)             # firing order is time order
    rng_m = np.linalg.norm(frame.xyz, axis=1)
    cfg = world.config.lidar
    assert rng_m.min() >= cfg.min_range_m - 0.1 and rng_m.max() <= cfg.max_range_m + 0.1


def test_points_are_in_the_lidar_frame_at_their_own_capture_time(world, frame):
    poses = world.poses(frame.point_time_ns)
    local = np.einsum('nji,nj->ni', poses[:, :3, :3], frame.points_world - poses[:, :3, 3])
    assert np.abs(local - frame.xyz).max() < 1e-4
    # A single pose for the whole sweep would misplace points: the ego moves during the sweep.
    start = world.poses([frame.lidar_stamp_ns])[0]
    naive = (frame.points_world - start[:3, 3]) @ start[:3, :3]
    assert np.abs(naive - frame.xyz).max() > 0.3


@pytest.mark.slow
def test_scene_has_at_least_ten_classes(world):
    seen = set()
    for i in (0, 7):
        f = world.frame(i)
        seen |= set(np.unique(f.labels).tolist())
        for li in f.label_images:
            seen |= set(np.unique(li).tolist())
    seen.discard(255)
    assert len(seen) >= 10, [world.class_map.names[i] for i in sorted(seen)]


def test_label_image_agrees_with_point_labels_at_gt_pixels(frame):
    for c, name in enumerate(frame.camera_names):
        vis = frame.gt_visible[c]
        assert vis.sum() > 500, name
        uv = np.rint(frame.gt_uv[c][vis]).astype(int)
        agree = frame.label_images[c][uv[:, 1], uv[:, 0]] == frame.labels[vis]
        assert agree.mean() > 0.99, (name, agree.mean())


def test_gt_uv_matches_opencv_projection_at_camera_time(world, frame):
    for c, cam in enumerate(frame.calibration.cameras):
        assert cam.time_offset_ns == 0
        T_world_cam = world.poses([frame.camera_stamp_ns[c]])[0] @ np.linalg.inv(cam.T_cam_lidar)
        T_cam_world = np.linalg.inv(T_world_cam)
        rvec, _ = cv2.Rodrigues(T_cam_world[:3, :3])
        m = frame.gt_in_view[c]
        uv, _ = cv2.projectPoints(frame.points_world[m].reshape(-1, 1, 3), rvec,
                                  T_cam_world[:3, 3], cam.K, cam.D)
        assert np.abs(uv[:, 0] - frame.gt_uv[c][m]).max() < 1e-3
        W, H = cam.width, cam.height
        inside = frame.gt_uv[c][m]
        assert inside[:, 0].min() >= -0.5 and inside[:, 0].max() < W - 0.5
        assert inside[:, 1].min() >= -0.5 and inside[:, 1].max() < H - 0.5


def test_rendering_rays_follow_opencv_plumb_bob(world):
    for model in world.cameras:
        cam = model.calib
        assert cam.distortion_model == 'plumb_bob' and abs(cam.D[0]) > 0.01
        proj, _ = cv2.projectPoints(model.rays.astype(np.float64).reshape(-1, 1, 3),
                                    np.zeros(3), np.zeros(3), cam.K, cam.D)
        u, v = np.meshgrid(np.arange(cam.width), np.arange(cam.height))
        assert np.abs(proj[:, 0] - np.stack([u.ravel(), v.ravel()], 1)).max() < 1e-4


def test_undistort_inverts_distort_and_rejects_non_invertible():
    D = np.array([-0.3, 0.1, 0.001, -0.002, 0.01])
    xn, yn = np.meshgrid(np.linspace(-0.8, 0.8, 21), np.linspace(-0.5, 0.5, 11))
    xd, yd = distort_plumb_bob(xn.ravel(), yn.ravel(), D)
    bx, by = undistort_plumb_bob(xd, yd, D)
    assert np.abs(bx - xn.ravel()).max() < 1e-9 and np.abs(by - yn.ravel()).max() < 1e-9
    with pytest.raises(ValueError, match='cannot be inverted'):
        undistort_plumb_bob(np.array([3.0]), np.array([3.0]), np.array([-0.9, 0, 0, 0, 0]))


def test_cameras_capture_at_their_own_stamps_while_the_ego_moves(world, frame):
    offsets_ms = (frame.camera_stamp_ns - frame.lidar_stamp_ns) / 1e6
    assert len(np.unique(np.round(offsets_ms))) == len(offsets_ms)
    assert np.abs(offsets_ms).max() > 30 and np.abs(offsets_ms).max() < 110
    moved = np.linalg.norm(world.poses(frame.camera_stamp_ns)[:, :3, 3]
                           - world.poses([frame.lidar_stamp_ns])[0, :3, 3], axis=1)
    assert moved.max() > 0.3
    # Dense ego poses cover the sweep and every camera stamp.
    st = frame.ego_stamps_ns
    assert np.diff(st).max() <= 5_000_000
    assert st[0] <= min(frame.lidar_stamp_ns, frame.camera_stamp_ns.min())
    assert st[-1] >= max(frame.lidar_stamp_ns + world.sweep_period_ns, frame.camera_stamp_ns.max())
    assert np.allclose(frame.ego_poses, world.poses(st))
    mid = frame.lidar_stamp_ns + 1_234_567               # between two pose samples
    interpolated = np.asarray(frame.trajectory().pose_at(np.array([mid]))).reshape(-1, 4, 4)[0]
    assert np.allclose(interpolated, world.poses([mid])[0], atol=1e-4)
    # Cameras stand apart from the LiDAR.
    for cam in frame.calibration.cameras:
        dist = np.linalg.norm(np.linalg.inv(cam.T_cam_lidar)[:3, 3])
        assert 0.3 <= dist <= 1.5


def test_out_of_view_and_occluded_points_exist(world, frame):
    stats = frame.occlusion_stats()
    assert stats['out_of_view'] > 0.05 * stats['points']
    assert stats['occluded_in_some_camera'] > 0.005 * stats['in_view_any']
    # Occluded points are really behind something: the depth buffer is nearer there.
    for c, cam in enumerate(frame.calibration.cameras):
        occ = frame.gt_occluded[c]
        assert not (occ & frame.gt_visible[c]).any() and not (occ & ~frame.gt_in_view[c]).any()
        if occ.sum() < 20:
            continue
        T_world_cam = world.poses([frame.camera_stamp_ns[c]])[0] @ np.linalg.inv(cam.T_cam_lidar)
        T_cam_world = np.linalg.inv(T_world_cam)
        z = frame.points_world[occ] @ T_cam_world[2, :3] + T_cam_world[2, 3]
        uv = np.rint(frame.gt_uv[c][occ]).astype(int)
        buffer = frame.depth_images[c][uv[:, 1], uv[:, 0]]
        assert np.mean((buffer > 0) & (buffer < z - 0.05)) > 0.9, cam.name


def test_depth_image_matches_visible_point_depths(world, frame):
    c = 0
    vis = frame.gt_visible[c]
    cam = frame.calibration.cameras[c]
    T_world_cam = world.poses([frame.camera_stamp_ns[c]])[0] @ np.linalg.inv(cam.T_cam_lidar)
    T_cam_world = np.linalg.inv(T_world_cam)
    z = frame.points_world[vis] @ T_cam_world[2, :3] + T_cam_world[2, 3]
    uv = np.rint(frame.gt_uv[c][vis]).astype(int)
    d = frame.depth_images[c][uv[:, 1], uv[:, 0]]
    assert np.median(np.abs(d - z) / z) < 0.01
    sky = frame.label_images[c] == 255
    assert np.all(frame.depth_images[c][sky] == 0) and np.all(frame.depth_images[c][~sky] > 0)


def test_frame_to_pair_round_trips_through_the_pair_dataset(tmp_path, frame):
    writer = PairWriter(str(tmp_path / 'ds'), fsync=False)
    writer.write(frame.to_pair('png'))
    writer.write(frame.to_pair('jpeg'))
    reader = PairReader(str(tmp_path / 'ds'))
    png, jpg = reader[0], reader[1]
    assert np.array_equal(png.xyz, frame.xyz) and np.array_equal(png.labels, frame.labels)
    assert np.array_equal(png.point_time_ns, frame.point_time_ns)
    assert png.calibration.to_dict() == frame.calibration.to_dict()
    assert np.array_equal(png.ego_poses, frame.ego_poses)
    for c, name in enumerate(frame.camera_names):
        assert np.array_equal(png.image(name), frame.images[c])
        assert np.array_equal(png.label_image(name), frame.label_images[c])
        assert np.abs(png.depth_image(name) - np.minimum(frame.depth_images[c], 65.535)
                      ).max() <= 0.0006
        assert jpg.image_formats[name] == 'jpeg'
        assert np.abs(jpg.image(name).astype(int) - frame.images[c]).mean() < 6
    with pytest.raises(ValueError, match='image_format'):
        frame.to_pair('bmp')


@pytest.mark.parametrize('mapping, field', [
    ({'lidar': {'beams': 0}}, 'lidar.beams'),
    ({'lidar': {'elevation_min_deg': 5.0, 'elevation_max_deg': -5.0}}, 'lidar.elevation_max_deg'),
    ({'lidar': {'beams': 4, 'elevation_angles_deg': [1.0, 2.0]}}, 'lidar.elevation_angles_deg'),
    ({'lidar': {'dropout_probability': 1.0}}, 'lidar.dropout_probability'),
    ({'lidar': {'min_range_m': 9.0, 'max_range_m': 5.0}}, 'lidar.min_range_m'),
    ({'cameras': {'width': 'wide'}}, 'cameras.width'),
    ({'cameras': {'count': 2, 'yaw_deg': [0.0]}}, 'cameras.yaw_deg'),
    ({'cameras': {'distortion': [0.1, 0.0]}}, 'cameras.distortion'),
    ({'scene': {'pedestrians': -1}}, 'scene.pedestrians'),
    ({'ego': {'speed_min_mps': 12.0, 'speed_max_mps': 5.0}}, 'ego.speed_max_mps'),
    ({'ego': {'pose_step_ms': 10.0}}, 'ego.pose_step_ms'),
    ({'seed': -3}, 'seed'),
    ({'lidar': {'beems': 32}}, 'lidar.beems'),
    ({'lidar': {'preset': 'hdl-99'}}, 'lidar.preset'),
    ({'lidar': {'preset': 'hdl64e', 'beams': 32}}, 'lidar.elevation_angles_deg'),
])
def test_invalid_config_names_the_field(mapping, field):
    with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
        build(SimConfig, mapping)
    with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
        SimWorld(mapping)


@pytest.mark.parametrize('name,beams,fov,finest,coarsest,step', [
    ('default', 32, (-30.67, 10.67), 1.333, 1.334, 0.35),
    ('hdl32e', 32, (-30.67, 10.67), 1.333, 1.334, 0.16),
    ('vlp32c', 32, (-25.0, 15.0), 0.333, 9.361, 0.2),
    ('hdl64e', 64, (-24.333, 2.0), 0.333, 0.5, 0.17),
    ('pandar64', 64, (-24.897, 14.882), 0.166, 6.008, 0.2),
    ('os1-128', 128, (-22.5, 22.5), 0.354, 0.355, 0.3516),
])
def test_lidar_presets_follow_their_spec_sheets(name, beams, fov, finest, coarsest, step):
    from cmkd_ros.sim.lidar import LidarModel
    cfg = build(SimConfig, {'lidar': {'preset': name}}).lidar
    elev = np.sort(np.degrees(LidarModel(cfg).elevation))
    gaps = np.diff(elev)
    assert cfg.preset == name and len(elev) == beams
    np.testing.assert_allclose([elev[0], elev[-1]], fov, atol=1e-3)
    assert abs(gaps.min() - finest) < 2e-3 and abs(gaps.max() - coarsest) < 2e-3
    assert abs(cfg.horizontal_resolution_deg - step) < 1e-3
    # a setting given next to the preset wins; the preset survives a round trip
    assert build(SimConfig, {'lidar': {'preset': name, 'max_range_m': 50.0}}).lidar \
        .max_range_m == 50.0
    assert build(SimConfig, to_dict(build(SimConfig, {'lidar': {'preset': name}}))).lidar == cfg


def test_every_setting_has_help_text():
    from cmkd_ros.config import describe
    rows = describe(SimConfig)
    assert len(rows) > 40
    assert all(help_text for _, _, _, help_text in rows), [r[0] for r in rows if not r[3]]


def test_camera_layout_and_negative_frame_index():
    w = SimWorld({'seed': 0, 'cameras': {'count': 3, 'width': 64, 'height': 48,
                                         'yaw_deg': [0.0, 120.0, -120.0]}})
    assert w.calibration.names == ['cam0', 'cam1', 'cam2']
    with pytest.raises(ValueError, match='frame index'):
        w.frame(-1)
    with pytest.raises(ValueError, match='workers'):
        SimWorld({}, workers=0)


def test_culling_gives_the_same_hits_as_brute_force():
    world = SimWorld({'seed': 8, 'lidar': {'beams': 12, 'horizontal_resolution_deg': 1.0},
                      'cameras': {'width': 64, 'height': 40}})
    stamp = world.frame_stamp_ns(3)
    fast = world.lidar.sweep(world.scene, stamp, np.random.default_rng(1))
    slow = world.lidar.sweep(world.scene, stamp, np.random.default_rng(1), brute_force=True)
    assert len(fast.xyz) > 500
    assert np.array_equal(fast.xyz, slow.xyz) and np.array_equal(fast.labels, slow.labels)
    poses = world.poses(world.camera_stamps_ns(3))
    prims = world.camera_primitives(float(poses[0, 0, 3]))
    from cmkd_ros.sim.camera import camera_pose
    for cam, pose in zip(world.cameras, poses):
        T = camera_pose(pose, cam.calib)
        a, _, _ = cam.cast(prims, T)
        b, _, _ = cam.cast(prims, T, brute_force=True)
        assert np.array_equal(a.t, b.t) and np.array_equal(a.obj, b.obj)
        assert (a.obj >= 0).sum() > 100


def test_plumb_bob_jacobian_matches_finite_differences():
    from cmkd_ros.sim.camera import plumb_bob_jacobian
    D = np.array([-0.2, 0.05, 0.003, -0.002, 0.01])
    x, y = np.array([0.3, -0.6, 0.1]), np.array([-0.2, 0.4, 0.5])
    h = 1e-6
    ax, ay = distort_plumb_bob(x + h, y, D)
    bx, by = distort_plumb_bob(x - h, y, D)
    cx, cy = distort_plumb_bob(x, y + h, D)
    dx, dy = distort_plumb_bob(x, y - h, D)
    numeric = ((ax - bx) / 2 / h, (cx - dx) / 2 / h, (ay - by) / 2 / h, (cy - dy) / 2 / h)
    for got, want in zip(plumb_bob_jacobian(x, y, D), numeric):
        assert np.allclose(got, want, atol=1e-7)


def test_non_invertible_distortion_is_a_config_error():
    with pytest.raises(ConfigError, match='cameras.distortion'):
        SimWorld({'cameras': {'count': 1, 'width': 64, 'height': 48, 'horizontal_fov_deg': 150.0,
                              'distortion': [-0.6, 0.0, 0.0, 0.0, 0.0]}})


@pytest.mark.slow
def test_cameras_and_lidar_never_stand_inside_a_solid():
    from cmkd_ros.sim.world import contains
    for seed in range(6):
        world = SimWorld({'seed': seed, **TINY,
                          'scene': {'parked_cars': 25.0, 'trucks': 8.0, 'moving_lane_cars': 15.0}})
        for index in range(0, 400, 7):                    # 40 s of driving
            stamps = np.concatenate([[world.frame_stamp_ns(index)],
                                     world.camera_stamps_ns(index)])
            poses = world.poses(stamps)
            centers = [poses[0, :3, 3]] + [
                (pose @ np.linalg.inv(cam.T_cam_lidar))[:3, 3]
                for pose, cam in zip(poses[1:], world.calibration.cameras)]
            x = float(poses[0, 0, 3])
            prims = world.scene.primitives(x - 20, x + 20)
            assert not contains(prims, np.array(centers), margin=0.3).any(), (seed, index)

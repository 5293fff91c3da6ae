"""Multi-camera projection: OpenCV agreement, the distortion fold-back pitfall, real frames."""
import dataclasses
import json

import cv2
import numpy as np
import pytest

from cmkd_ros.calibration import (CameraCalibration, RigCalibration, load_kitti_calibration,
                                  load_nuscenes_calibration)
from cmkd_ros.config import ConfigError, build
from cmkd_ros.projection import (CorrespondenceConfig, ProjectionError, compute_correspondences,
                                 monotonic_limit, project_points)

MODELS = {
    'plumb_bob': [-0.28, 0.07, 8e-4, -6e-4, -0.008],
    'rational_polynomial': [1.2, -0.4, 5e-4, 3e-4, 0.02, 1.55, -0.25, 0.08],
    'equidistant': [0.05, -0.01, 0.003, -0.0008],
    'none': [],
}


def look(yaw_deg, pitch_deg=0.0, t=(0.0, 0.0, 0.0)):
    """T_cam_lidar of a camera looking along LiDAR yaw (x forward, y left, z up)."""
    yaw, pitch = np.radians(yaw_deg), np.radians(pitch_deg)
    forward = np.array([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch),
                        np.sin(pitch)])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    down = np.cross(forward, right)
    T = np.eye(4)
    T[:3, :3] = np.stack([right, down, forward])
    T[:3, 3] = -T[:3, :3] @ np.asarray(t)
    return T


def make_cam(name, model, yaw=0.0, f=400.0, size=(800, 600), t=(0.1, -0.2, 0.3)):
    return CameraCalibration(name=name, width=size[0], height=size[1],
                             K=[[f, 0, size[0] / 2 - 3.3], [0, f * 1.01, size[1] / 2 + 2.1],
                                [0, 0, 1]],
                             T_cam_lidar=look(yaw, 4.0, t), distortion_model=model,
                             D=MODELS[model])


def random_points(rng, n=20000):
    """Points all around the LiDAR, 0.5..60 m away, some far above/below."""
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    return (direction * rng.uniform(0.5, 60.0, size=(n, 1))).astype(np.float32)


def opencv_uv(cam, pts):
    """Independent OpenCV projection (float64) of LiDAR points into ``cam``."""
    rvec, _ = cv2.Rodrigues(cam.T_cam_lidar[:3, :3])
    tvec = cam.T_cam_lidar[:3, 3]
    obj = pts.astype(np.float64).reshape(-1, 1, 3)
    if cam.distortion_model == 'equidistant':
        out, _ = cv2.fisheye.projectPoints(obj, rvec, tvec, cam.K, cam.D)
    else:
        D = cam.D if cam.D.size else np.zeros(5)
        out, _ = cv2.projectPoints(obj, rvec, tvec, cam.K, D)
    return out.reshape(-1, 2)


def test_mixed_rig_matches_opencv_in_one_call():
    rng = np.random.default_rng(0)
    cams = [make_cam(m, m, yaw) for m, yaw in zip(MODELS, (0, 90, 180, 270))]
    cams.append(make_cam('wide_fisheye', 'equidistant', 45, f=250.0))
    rig = RigCalibration(tuple(cams))
    pts = random_points(rng)
    uv, depth, valid = project_points(pts, rig)
    assert uv.shape == (5, pts.shape[0], 2) and uv.dtype == np.float32
    assert depth.shape == valid.shape == (5, pts.shape[0])
    for c, cam in enumerate(cams):
        ref = opencv_uv(cam, pts)
        z = (pts @ cam.T_cam_lidar[:3, :3].T + cam.T_cam_lidar[:3, 3])[:, 2]
        np.testing.assert_allclose(depth[c], z, rtol=1e-5, atol=1e-4)
        sel = valid[c]
        assert sel.sum() > 300, cam.name
        err = np.abs(uv[c, sel] - ref[sel]).max()
        assert err < 0.01, (cam.name, err)
        # every point OpenCV puts inside the image in front of the camera within the monotonic
        # region is valid here too (nothing lost besides the fold-back region)
        r = np.linalg.norm((pts @ cam.T_cam_lidar[:3, :3].T + cam.T_cam_lidar[:3, 3])[:, :2],
                           axis=1) / np.where(z > 0, z, 1)
        inside = ((ref[:, 0] >= -0.5) & (ref[:, 0] < cam.width - 0.5) & (ref[:, 1] >= -0.5) &
                  (ref[:, 1] < cam.height - 0.5) & (z > 0.1))
        limit = monotonic_limit(cam)
        assert not (sel & ~(inside & (r < 1.0001 * limit))).any(), cam.name
        assert not ((inside & (r < 0.9999 * limit)) & ~sel).any(), cam.name


def test_monotonic_limit_closed_form():
    # r_d = r (1 + k1 r^2) turns at r = 1 / sqrt(-3 k1)
    cam = CameraCalibration(name='c', width=100, height=100, K=np.eye(3) * [50, 50, 1]
                            + [[0, 0, 50], [0, 0, 50], [0, 0, 0]], T_cam_lidar=np.eye(4),
                            distortion_model='plumb_bob', D=[-0.4, 0, 0, 0, 0])
    assert monotonic_limit(cam) == pytest.approx(1 / np.sqrt(1.2), rel=1e-4)
    # equidistant theta_d = theta (1 + k1 theta^2) turns at theta = 1 / sqrt(-3 k1)
    fish = dataclasses.replace(cam, distortion_model='equidistant', D=[-0.3, 0, 0, 0])
    assert np.arctan(monotonic_limit(fish)) == pytest.approx(1 / np.sqrt(0.9), rel=1e-4)
    # no distortion: only the ray-angle cap
    plain = dataclasses.replace(cam, distortion_model='none', D=[])
    assert monotonic_limit(plain, 60.0) == pytest.approx(np.tan(np.radians(60.0)))


@pytest.mark.parametrize('model,D', [('plumb_bob', [-0.4, 0.0, 0.0, 0.0, 0.0]),
                                     ('rational_polynomial', [-0.4, 0, 0, 0, 0, 0.05, 0, 0]),
                                     ('equidistant', [-0.3, 0.0, 0.0, 0.0])])
def test_far_off_axis_and_behind_points_never_wrap_into_image(model, D):
    cam = CameraCalibration(name='c', width=640, height=480,
                            K=[[300, 0, 320], [0, 300, 240], [0, 0, 1]], T_cam_lidar=np.eye(4),
                            distortion_model=model, D=D)
    rig = RigCalibration((cam,))
    # 1. points far outside the field of view, chosen where the polynomial has folded back
    r = np.linspace(monotonic_limit(cam) * 1.05, 12.0, 4000)
    ang = np.linspace(0, 40 * np.pi, 4000)
    off_axis = np.stack([r * np.cos(ang) * 5, r * np.sin(ang) * 5, np.full_like(r, 5)], 1)
    # 2. points behind the camera, mirrored images of in-view points
    behind = np.stack([np.linspace(-2, 2, 200), np.linspace(-1, 1, 200), np.full(200, -5.0)], 1)
    pts = np.concatenate([off_axis, behind]).astype(np.float32)
    ref = opencv_uv(cam, pts)
    cv_inside = ((ref[:, 0] >= 0) & (ref[:, 0] < 640) & (ref[:, 1] >= 0) & (ref[:, 1] < 480))
    assert cv_inside[:4000].sum() > 50          # OpenCV's raw model does wrap them inside
    assert cv_inside[4000:].sum() > 50
    _, _, valid = project_points(pts, rig)
    assert not valid.any()
    # points inside the monotonic region and the image are still valid
    near_axis = np.array([[0.1, 0.05, 4.0], [-0.3, 0.2, 2.0]], np.float32)
    assert project_points(near_axis, rig)[2].all()


def test_points_at_and_below_min_depth_and_nan():
    cam = make_cam('c', 'none', 0.0)
    rig = RigCalibration((cam,))
    base = np.linalg.inv(cam.T_cam_lidar)
    in_cam = np.array([[0, 0, 0.05], [0, 0, 0.2], [0, 0, 0.0], [0, 0, -1.0], [0, 0, 3.0]])
    pts = (in_cam @ base[:3, :3].T + base[:3, 3]).astype(np.float32)
    pts = np.concatenate([pts, [[np.nan, 0, 1]]]).astype(np.float32)
    uv, depth, valid = project_points(pts, rig, min_depth=0.1)
    assert valid[0].tolist() == [False, True, False, False, True, False]
    assert np.isnan(uv[0, [0, 2, 3, 5]]).all()


def test_nuscenes_sample_counts_and_opencv(data_dir):
    folder = data_dir / 'nuscenes_sample'
    rig = load_nuscenes_calibration(str(folder / 'calibration.json'))
    pts = np.fromfile(folder / 'LIDAR_TOP.bin', np.float32).reshape(-1, 5)[:, :3].copy()
    assert pts.shape[0] == 34688
    uv, depth, valid = project_points(pts, rig, min_depth=1e-6)
    # the README's figure counts 0 <= u < W (pixel edges at integers): 20,206 points
    with np.errstate(invalid='ignore'):
        edge_convention = ((depth > 0) & (uv[..., 0] >= 0) & (uv[..., 1] >= 0) &
                           (uv[..., 0] < rig.cameras[0].width) &
                           (uv[..., 1] < rig.cameras[0].height))
    assert edge_convention.any(axis=0).sum() == 20206
    any_cam_cv = np.zeros(pts.shape[0], bool)
    for c, cam in enumerate(rig.cameras):
        ref = opencv_uv(cam, pts)
        z = (pts.astype(np.float64) @ cam.T_cam_lidar[:3, :3].T + cam.T_cam_lidar[:3, 3])[:, 2]
        inside = ((z > 0) & (ref[:, 0] >= -0.5) & (ref[:, 0] < cam.width - 0.5) &
                  (ref[:, 1] >= -0.5) & (ref[:, 1] < cam.height - 0.5))
        assert np.array_equal(inside, valid[c]), cam.name
        assert 3000 <= inside.sum() <= 4900
        assert np.abs(uv[c, inside] - ref[inside]).max() < 0.01
        any_cam_cv |= inside
    # with pixel centres at integers (OpenCV) 8 points on the left/top half-pixel border drop
    assert valid.any(axis=0).sum() == any_cam_cv.sum() == 20198
    # the default min depth (0.1 m) changes nothing on this frame
    default = compute_correspondences(pts, rig, config=CorrespondenceConfig(occlusion=False))
    assert default.point_mask().sum() == 20198


def test_kitti_sample_matches_P2_formula(data_dir):
    folder = data_dir / 'kitti_000008'
    rig = load_kitti_calibration(str(folder / 'calibration.json'))
    cam = rig.cameras[0]
    assert (cam.width, cam.height) == (1242, 375)
    pts = np.fromfile(folder / 'velodyne.bin', np.float32).reshape(-1, 4)[:, :3].copy()
    raw = json.loads((folder / 'calibration.json').read_text())['camera']
    # independent: pixel = P2 @ R0_rect @ Tr_velo_to_cam @ [x y z 1]
    hom = np.hstack([pts.astype(np.float64), np.ones((pts.shape[0], 1))])
    proj = hom @ (np.array(raw['P2']) @ np.array(raw['R0_rect']) @
                  np.array(raw['Tr_velo_to_cam'])).T
    ref = proj[:, :2] / proj[:, 2:3]
    uv, depth, valid = project_points(pts, rig)
    inside = ((proj[:, 2] > 0.1) & (ref[:, 0] >= -0.5) & (ref[:, 0] < 1241.5) &
              (ref[:, 1] >= -0.5) & (ref[:, 1] < 374.5))
    assert inside.sum() > 15000                      # the scan is cropped to the camera view
    assert np.array_equal(valid[0], inside)
    assert np.abs(uv[0, inside] - ref[inside]).max() < 0.01
    np.testing.assert_allclose(depth[0], proj[:, 2], rtol=1e-5, atol=1e-3)
    # and OpenCV, from its own decomposition of the 3x4 KITTI projection matrix
    P = (np.array(raw['P2']) @ np.array(raw['R0_rect']) @ np.array(raw['Tr_velo_to_cam']))[:3]
    K, R, centre = cv2.decomposeProjectionMatrix(P)[:3]
    centre = centre[:3, 0] / centre[3, 0]
    rvec, _ = cv2.Rodrigues(R)
    cv_uv, _ = cv2.projectPoints(pts.astype(np.float64), rvec, -R @ centre, K / K[2, 2], None)
    assert np.abs(uv[0, inside] - cv_uv.reshape(-1, 2)[inside]).max() < 0.01


def _scan_grid(distance, width, height, centre_y, step):
    ys = np.arange(-width / 2, width / 2, step) + centre_y
    zs = np.arange(-height / 2, height / 2, step)
    yy, zz = np.meshgrid(ys, zs)
    return np.stack([np.full(yy.size, distance), yy.ravel(), zz.ravel()], 1)


def test_occlusion_hides_background_behind_a_near_wall():
    # camera 0.8 m left of the LiDAR: parallax makes the LiDAR see background points that the
    # camera sees only through a near wall
    cam = make_cam('c', 'none', 0.0, f=500.0, size=(800, 600), t=(0.0, 0.8, 0.0))
    rig = RigCalibration((cam,))
    near = _scan_grid(8.0, 2.0, 2.0, 0.0, 0.04)
    far = _scan_grid(20.0, 14.0, 4.0, 0.0, 0.1)
    pts = np.concatenate([near, far]).astype(np.float32)
    n_near = near.shape[0]
    # ground truth: a far point is hidden when its camera ray crosses the near wall's square
    c_pos = np.array([0.0, 0.8, 0.0])
    ray = far - c_pos
    s = (8.0 - c_pos[0]) / ray[:, 0]
    hit = c_pos + s[:, None] * ray
    hidden_true = (np.abs(hit[:, 1]) < 1.0) & (np.abs(hit[:, 2]) < 1.0)
    assert hidden_true.sum() > 100
    cfg = CorrespondenceConfig()
    with_occ = compute_correspondences(pts, rig, config=cfg)
    without = compute_correspondences(pts, rig, config=dataclasses.replace(cfg, occlusion=False))
    vis = with_occ.point_mask()
    assert without.point_mask()[n_near:][hidden_true].all()      # projected into the image
    assert vis[:n_near].all()                                    # the near wall stays
    # hidden points well inside the wall's shadow are removed; visible ones all stay
    far_vis = vis[n_near:]
    margin = (np.abs(hit[:, 1]) < 0.9) & (np.abs(hit[:, 2]) < 0.9)
    assert not far_vis[margin].any()
    clear = (np.abs(hit[:, 1]) > 1.1) | (np.abs(hit[:, 2]) > 1.1)
    in_image = without.point_mask()[n_near:]
    assert far_vis[clear & in_image].all()


def test_occlusion_keeps_a_scanned_ground_plane():
    # a 32-beam scan of flat ground seen by a camera 1.5 m above it: no self-occlusion
    cam = make_cam('c', 'plumb_bob', 0.0, f=600.0, size=(1200, 700), t=(0.5, 0.0, -0.3))
    rig = RigCalibration((cam,))
    elev = np.radians(np.linspace(-30.0, -1.5, 24))
    azim = np.radians(np.arange(-60.0, 60.0, 0.2))
    ee, aa = np.meshgrid(elev, azim)
    dist = 1.8 / np.tan(-ee)
    pts = np.stack([dist * np.cos(aa), dist * np.sin(aa), np.full_like(dist, -1.8)], -1)
    pts = pts.reshape(-1, 3).astype(np.float32)
    base = compute_correspondences(pts, rig, config=CorrespondenceConfig(occlusion=False))
    occ = compute_correspondences(pts, rig, config=CorrespondenceConfig())
    assert len(base) > 2000
    assert len(occ) >= 0.98 * len(base)


def test_correspondences_layout():
    rng = np.random.default_rng(3)
    rig = RigCalibration((make_cam('a', 'plumb_bob', 0.0), make_cam('b', 'none', 120.0)))
    pts = random_points(rng, 5000)
    pts[7] = np.nan
    corr = compute_correspondences(pts, rig, config=CorrespondenceConfig(occlusion=False))
    uv, depth, valid = project_points(pts, rig)
    assert corr.point.dtype == np.int64 and corr.camera.dtype == np.int64
    assert corr.uv.dtype == np.float32 and corr.depth.dtype == np.float32
    assert len(corr) == valid.sum() and 7 not in corr.point
    np.testing.assert_array_equal(corr.uv, uv[corr.camera, corr.point])
    np.testing.assert_array_equal(corr.depth, depth[corr.camera, corr.point])
    assert np.all(np.diff(corr.camera) >= 0)
    b = corr.for_camera('b')
    assert np.all(b.camera == 1) and len(b) == valid[1].sum()
    assert set(corr.to_arrays()) == {'corr_point', 'corr_camera', 'corr_uv', 'corr_depth'}


def test_config_and_input_errors():
    cfg = build(CorrespondenceConfig, {'min_depth': 0.5, 'occlusion': False})
    assert cfg.min_depth == 0.5 and not cfg.occlusion
    with pytest.raises(ConfigError, match='min_depth'):
        build(CorrespondenceConfig, {'min_depth': -1.0})
    with pytest.raises(ConfigError, match='occlusion_footprint'):
        build(CorrespondenceConfig, {'occlusion_footprint': 0.0})
    with pytest.raises(ConfigError, match='occlusion_beam_spacing_deg'):
        build(CorrespondenceConfig, {'occlusion_beam_spacing_deg': -1.0})
    with pytest.raises(ConfigError, match='unknown'):          # the per-sensor knob is gone
        build(CorrespondenceConfig, {'occlusion_splat_v_deg': 1.3})
    rig = RigCalibration((make_cam('a', 'none'),))
    with pytest.raises(ProjectionError, match=r'\(N, 3\)'):
        compute_correspondences(np.zeros((4, 2), np.float32), rig)
    with pytest.raises(ProjectionError, match='no cameras'):
        compute_correspondences(np.zeros((4, 3), np.float32), RigCalibration(()))
    empty = compute_correspondences(np.zeros((0, 3), np.float32), rig)
    assert len(empty) == 0 and empty.uv.shape == (0, 2) and empty.num_points == 0
    # a handful of points in view carry no scan pattern: say so, or take the experts' numbers
    few = np.array([[5.0, 0.1 * i, 0.0] for i in range(5)], np.float32)
    with pytest.raises(ProjectionError, match='occlusion test.*too few'):
        compute_correspondences(few, rig)
    fixed = build(CorrespondenceConfig, {'occlusion_azimuth_step_deg': 0.2,
                                         'occlusion_beam_spacing_deg': 1.0})
    fixed_corr = compute_correspondences(few, rig, config=fixed)
    assert len(fixed_corr) == 5 and fixed_corr.scan_pattern.describe() == (
        'fixed scan pattern from the configuration: beam spacing 1.00 deg, azimuth step 0.200 deg')
    with pytest.raises(ProjectionError, match='ring'):
        compute_correspondences(few, rig, ring=np.zeros(3), config=fixed)
    with pytest.raises(ProjectionError, match='point_time_ns'):
        from cmkd_ros.motion import constant_velocity
        compute_correspondences(np.zeros((4, 3), np.float32), rig,
                                trajectory=constant_velocity(0, np.eye(4), [1, 0, 0]))


def test_prepared_rig_cache_follows_content():
    from cmkd_ros.projection import prepare_rig
    cam = make_cam('a', 'plumb_bob')
    first = prepare_rig(RigCalibration((cam,)))
    assert prepare_rig(RigCalibration((make_cam('a', 'plumb_bob'),))) is first
    moved = dataclasses.replace(cam, T_cam_lidar=look(5.0, 4.0, (0.1, -0.2, 0.3)))
    other = prepare_rig(RigCalibration((moved,)))
    assert other is not first
    np.testing.assert_allclose(other.R[0], moved.T_cam_lidar[:3, :3])

"""The calibration health metric (cmkd_ros.calibration_check) on synthetic and real frames."""
import dataclasses
import json
import math

import numpy as np
import pytest

from cmkd_ros import calibration_check as cc
from cmkd_ros.tools.overlay import load_sample_folder

AXIS = np.array([0.3, -0.8, 0.5]) / np.linalg.norm([0.3, -0.8, 0.5])


@pytest.fixture(scope='module')
def sim_frames():
    """Three frames of one front camera, 7 sweeps apart (different scenes), 480x270."""
    from cmkd_ros.sim import SimWorld
    world = SimWorld({'seed': 5, 'cameras': {'count': 1, 'width': 480, 'height': 270}},
                     workers=1)
    return [world.frame(i * 7) for i in range(3)]


def camera_frames(frames, camera=None):
    cam = camera or frames[0].calibration.cameras[0]
    prepared = cc.CameraFrames(cam)
    for fr in frames:
        ref, T, found = cc.prepare_sweep(fr.xyz, ring=fr.ring, point_time_ns=fr.point_time_ns,
                                         capture_ns=fr.camera_stamp_ns,
                                         trajectory=fr.trajectory())
        prepared.add(ref, fr.images[0], ring=fr.ring, T_capture_sweep=T[0], found=found)
    return prepared


def off_by(cam, degrees, axis=AXIS):
    return cc.with_extrinsic(cam, cc.perturb(cam.T_cam_lidar, math.radians(degrees) * axis))


@pytest.mark.slow
def test_metric_orders_calibrations_by_error(sim_frames):
    true = camera_frames(sim_frames)
    cam = true.camera
    assert true.points_in_view() > 500
    scores, found, better = [], [], []
    for degrees in (0.0, 0.5, 1.0):
        frames = cc.CameraFrames(off_by(cam, degrees))
        frames.views = true.views
        scores.append([frames.score(frames.camera.T_cam_lidar, s) for s in (8.0, 4.0, 1.0)])
        report = cc.check_alignment(frames)
        found.append(report.misalignment_deg)
        better.append(report.better_neighbours)
        # the rotation found points back to the true calibration
        assert abs(report.misalignment_deg - degrees) < 0.3, (degrees, report.to_dict())
    scores = np.array(scores)
    assert (np.diff(scores, axis=0) < 0).all(), scores       # every scale, every step
    assert np.all(np.diff(found) > 0.2), found
    assert better[0] < cc.WARN_BETTER_NEIGHBOURS < min(better[1:]), better


def test_silhouettes_of_a_box_in_front_of_a_wall():
    """A 32-beam sweep of a wall 20 m ahead with a box 10 m ahead: the box outline is found
    (moved half a step outwards), the wall and the floor are not."""
    az = np.radians(np.arange(-30.0, 30.0, 0.2))
    el = np.radians(np.linspace(-10.0, 10.0, 32))
    A, E = np.meshgrid(az, el)
    ring = np.repeat(np.arange(32), az.size)
    x_wall = 20.0
    r = x_wall / (np.cos(E) * np.cos(A))
    box = (np.abs(np.degrees(A)) < 5.0) & (np.degrees(E) < 4.0)
    r = np.where(box, 10.0 / (np.cos(E) * np.cos(A)), r).ravel()
    xyz = np.stack([r * np.cos(E.ravel()) * np.cos(A.ravel()),
                    r * np.cos(E.ravel()) * np.sin(A.ravel()), r * np.sin(E.ravel())], 1)
    found = cc.silhouettes(xyz.astype(np.float32), ring)
    assert found.beams_from == 'ring field'
    assert abs(found.azimuth_step - math.radians(0.2)) < 1e-4
    # every point is on the box (10 m), none on the wall
    assert np.allclose(np.linalg.norm(found.points, axis=1)[:, None], 10.0 /
                       np.cos(np.arctan2(np.hypot(found.points[:, 1], found.points[:, 2]),
                                         found.points[:, 0]))[:, None], rtol=0.05)
    el_f = np.degrees(np.arcsin(found.points[:, 2] / np.linalg.norm(found.points, axis=1)))
    az_f = np.degrees(np.arctan2(found.points[:, 1], found.points[:, 0]))
    sides = np.abs(np.abs(az_f) - 5.0) < 0.15           # left and right sides, half a step out
    top = np.abs(el_f - 4.0) < 0.5                       # top: between the beams at 3.5 and 4.2
    assert sides.sum() >= 2 * 20 and top.sum() >= 20 and (sides | top).all()
    # tangents point away from the box: outwards in azimuth at the sides, up at the top
    assert np.all(np.sign(found.tangent[sides, 1]) == np.sign(az_f[sides]))
    assert np.all(found.tangent[top & ~sides, 2] > 0.9)


def _painted_road(scale=1.0, seed=0):
    """A 32-beam sweep of flat ground 1.8 m below the LiDAR with two lines of paint running
    ahead (16 cm wide, centred 1.5 m left and 2.0 m right), intensity 0.1 road / 0.75 paint
    with noise; and the lines' edges (y values)."""
    az = np.radians(np.arange(-60.0, 60.0, 0.2))
    el = np.radians(np.linspace(-25.0, -5.0, 32))
    A, E = np.meshgrid(az, el)
    ring = np.repeat(np.arange(32), az.size)
    r = (1.8 / np.sin(-E)).ravel()
    xyz = np.stack([r * np.cos(E.ravel()) * np.cos(A.ravel()),
                    r * np.cos(E.ravel()) * np.sin(A.ravel()), -1.8 * np.ones(r.size)], 1)
    edges = np.array([1.42, 1.58, -2.08, -1.92])
    paint = (np.abs(xyz[:, 1] - 1.5) < 0.08) | (np.abs(xyz[:, 1] + 2.0) < 0.08)
    noise = np.random.default_rng(seed).normal(0, 0.03, r.size)
    intensity = scale * np.clip(np.where(paint, 0.75, 0.1) + noise, 0, 1)
    return xyz.astype(np.float32), ring, intensity.astype(np.float32), edges


def test_reflectance_edges_of_painted_lines():
    """Paint on flat ground: no silhouette, but with the intensities every crossing of a
    line's edge is found, half way between the two returns (within half an azimuth step of
    the true edge), with no direction; the intensity's scale (0-1 or 0-255) does not matter
    and non-finite intensities are skipped."""
    xyz, ring, intensity, edges = _painted_road()
    assert len(cc.silhouettes(xyz, ring)) == 0
    found = cc.silhouettes(xyz, ring, intensity=intensity)
    y = found.points[:, 1].astype(np.float64)
    off = np.abs(y[:, None] - edges[None]).min(1)
    half_step = 0.5 * math.radians(0.2) * np.linalg.norm(found.points[:, :2], axis=1)
    # 32 beams x 4 edges crossed inside +-60 degrees, a few lost to the noise test
    assert len(found) >= 0.9 * 32 * 4, len(found)
    assert np.all(off <= 1.05 * half_step + 0.01), off.max()
    assert np.all(np.abs(found.points[:, 2] + 1.8) < 1e-3)
    assert not found.tangent.any() and np.all(found.weights == cc.INTENSITY_WEIGHT)
    scaled = cc.silhouettes(xyz, ring, intensity=255.0 * intensity)
    assert np.array_equal(scaled.index, found.index)
    broken = intensity.copy()
    broken[::13] = np.nan
    assert 0.5 * len(found) < len(cc.silhouettes(xyz, ring, intensity=broken)) < len(found)
    with pytest.raises(cc.AlignmentError, match='intensity'):
        cc.silhouettes(xyz, ring, intensity=intensity[:-1])


def test_painted_lines_fix_the_camera_height_and_side(sim_frames):
    """The reflectance edges of the synthetic drive (paint on the road) alone score best at
    the true extrinsic: 5 and 10 cm sideways, up or down lose score. These are the
    directions silhouettes constrain least (only through parallax)."""
    cam = sim_frames[0].calibration.cameras[0]
    paint = cc.CameraFrames(cam)
    for fr in sim_frames:
        ref, T, found = cc.prepare_sweep(fr.xyz, ring=fr.ring, intensity=fr.intensity,
                                         point_time_ns=fr.point_time_ns,
                                         capture_ns=fr.camera_stamp_ns,
                                         trajectory=fr.trajectory())
        keep = ~found.tangent.any(axis=1)
        only = dataclasses.replace(found, points=found.points[keep], tangent=found.tangent[keep],
                                   weights=found.weights[keep], blur=found.blur[keep],
                                   index=found.index[keep])
        assert paint.add(ref, fr.images[0], ring=fr.ring, T_capture_sweep=T[0], found=only) > 30
    at_truth = paint.score(cam.T_cam_lidar, 2.0)
    for axis in (0, 1):                                       # camera x (right), y (down)
        for metres, loss in ((-0.1, 0.08), (-0.05, 0.02), (0.05, 0.02), (0.1, 0.08)):
            move = np.zeros(6)
            move[3 + axis] = metres
            moved = paint.score(cc.perturb(cam.T_cam_lidar, move), 2.0)
            assert moved < at_truth - loss, (axis, metres, moved, at_truth)


def test_ring_order_of_the_kitti_scan(data_dir):
    """KITTI's .bin scan stores the beams one after the other: the beam of each point is read
    from the order (the elevations of a 64-beam scan are too uneven to round to beams)."""
    points = np.fromfile(data_dir / 'kitti_000008' / 'velodyne.bin', np.float32).reshape(-1, 4)
    ring = cc.ring_from_order(points[:, :3])
    assert ring is not None and ring.max() + 1 == 46        # the beams the camera crop kept
    el = np.degrees(np.arctan2(points[:, 2], np.hypot(points[:, 0], points[:, 1])))
    medians = np.array([np.median(el[ring == k]) for k in range(46)])
    assert np.all(np.diff(medians[:20]) < 0)                  # top beams, far from the crop
    shuffled = points[np.random.default_rng(0).permutation(len(points)), :3]
    assert cc.ring_from_order(shuffled) is None
    assert cc.silhouettes(points[:, :3]).beams_from == 'point order'


def test_real_nuscenes_motion_between_stamps_is_seen(data_dir):
    """The nuScenes sample's sweep is motion compensated to its end stamp, and its calibration
    carries the ego motion to each camera's stamp (0.4 m for CAM_FRONT_LEFT, 43 ms earlier):
    the metric prefers it to the same extrinsic without that motion."""
    folder = data_dir / 'nuscenes_sample'
    frame = load_sample_folder(str(folder))
    raw = json.loads((folder / 'calibration.json').read_text())
    T_ego_lidar = np.array(raw['lidar']['T_ego_lidar'])
    c = frame.rig.names.index('CAM_FRONT_LEFT')
    cam = frame.rig.cameras[c]
    naive = np.linalg.inv(np.array(raw['cameras']['CAM_FRONT_LEFT']['T_ego_cam'])) @ T_ego_lidar
    assert cc.extrinsic_error(naive, cam.T_cam_lidar)[1] > 0.3
    found = cc.silhouettes(frame.xyz, frame.ring)
    with_motion = cc.CameraFrames(cam)
    with_motion.add(frame.xyz, frame.images[c], found=found)
    without = cc.CameraFrames(cc.with_extrinsic(cam, naive))
    without.views = with_motion.views
    for scale in (8.0, 4.0):
        assert with_motion.score(cam.T_cam_lidar, scale) > without.score(naive, scale) + 0.02


def test_bad_inputs_raise_clear_errors(sim_frames):
    frame = sim_frames[0]
    cam = frame.calibration.cameras[0]
    with pytest.raises(cc.AlignmentError, match='too few'):
        cc.silhouettes(np.zeros((0, 3), np.float32))
    with pytest.raises(cc.AlignmentError, match='uniform image'):
        cc.edge_maps(np.full((270, 480, 3), 128, np.uint8))
    frames = cc.CameraFrames(cam)
    with pytest.raises(cc.AlignmentError, match='image is'):
        frames.add(frame.xyz, frame.images[0][:100], ring=frame.ring)
    # a camera 1 km behind every point: nothing to score, no verdict
    away = cc.CameraFrames(cc.with_extrinsic(cam, cc.perturb(cam.T_cam_lidar,
                                                               np.r_[0, 0, 0, 0, 0, -1000.0])))
    away.add(frame.xyz, frame.images[0], ring=frame.ring)
    report = cc.check_alignment(away)
    assert report.edge_points == 0 and not report.enough_structure and not report.misaligned
    result = cc.refine(away)
    assert not result.converged and 'too little structure' in result.reason


def test_health_monitor_verdicts(sim_frames):
    """The collect node's core: ok for the true rig, misaligned (and refusing, when asked)
    for a rig off by one degree, unknown until enough sets arrived."""
    from cmkd_ros.calibration import RigCalibration
    rig = sim_frames[0].calibration
    settings = cc.HealthSettings(sweep_stride=1, window=3, check_every=3, min_frames=3,
                                 refuse_misaligned=True)
    bad_rig = RigCalibration((off_by(rig.cameras[0], 1.0),))
    verdicts = []
    for r in (rig, bad_rig):
        monitor = cc.HealthMonitor(r, settings)
        name = r.names[0]
        assert monitor.health(name).status == 'unknown'
        results = []
        for fr in sim_frames:
            results.append(monitor.add(fr.xyz, {name: fr.images[0]}, ring=fr.ring,
                                       point_time_ns=fr.point_time_ns,
                                       capture_ns={name: int(fr.camera_stamp_ns[0])},
                                       trajectory=fr.trajectory()))
        assert results[:2] == [None, None] and results[2][name] is monitor.health(name)
        verdicts.append((monitor.health(name), monitor.refuses(name)))
    (good, good_refuses), (bad, bad_refuses) = verdicts
    assert good.status == 'ok' and not good_refuses, good.message
    assert bad.status == 'misaligned' and bad_refuses, bad.message
    assert 'fit better' in bad.message and bad.report.misalignment_deg > 0.6
    # too few sets: unknown, whatever the data says
    monitor = cc.HealthMonitor(rig, cc.HealthSettings(sweep_stride=1, check_every=1,
                                                      min_frames=2))
    fr = sim_frames[0]
    out = monitor.add(fr.xyz, {rig.names[0]: fr.images[0]}, ring=fr.ring)
    assert out[rig.names[0]].status == 'unknown' and '1 of 2 sets' in out[rig.names[0]].message
    # an unusable image is counted in the message, not raised
    out = monitor.add(fr.xyz, {rig.names[0]: np.zeros_like(fr.images[0])}, ring=fr.ring)
    assert 'unusable' in out[rig.names[0]].message


def test_health_monitor_waits_at_its_pause_between_steps(sim_frames):
    """The collect node runs the check between its pairs: the monitor calls ``pause`` before
    each sweep, each image and each score (where the node waits while pairs are made), the
    verdict is the one without it, and an exception from ``pause`` stops the check (shutdown)."""
    rig = sim_frames[0].calibration
    name = rig.names[0]
    settings = cc.HealthSettings(sweep_stride=1, window=3, check_every=3, min_frames=3)
    calls = []

    def run(pause):
        monitor = cc.HealthMonitor(rig, settings, pause=pause)
        out = None
        for fr in sim_frames:
            out = monitor.add(fr.xyz, {name: fr.images[0]}, ring=fr.ring)
        return out[name]

    paused = run(lambda: calls.append(1))
    plain = run(None)
    # 3 sweeps + 3 images, then the score at the calibration, at the probe scale and its 26
    # neighbours: every step of the check waits its turn
    assert len(calls) >= 3 + 3 + 28, len(calls)
    assert paused.status == plain.status == 'ok'
    assert paused.report.better_neighbours == plain.report.better_neighbours

    class Stop(Exception):
        pass

    def stop_at_the_check():
        calls.append(1)
        if len(calls) > 6:                              # the sets are in; the check starts
            raise Stop

    calls.clear()
    with pytest.raises(Stop):
        run(stop_at_the_check)


def offset_frames(frames, offset_ms, camera=None, intensity=False):
    """The frames' camera with its images stamped ``offset_ms`` before their capture (the
    driver's stamps), prepared with capture times and ego poses for a time offset search."""
    cam = camera or frames[0].calibration.cameras[0]
    prepared = cc.CameraFrames(cam)
    for fr in frames:
        stamps = fr.camera_stamp_ns - int(round(offset_ms * 1e6))
        traj = fr.trajectory()
        ref, T, found = cc.prepare_sweep(fr.xyz, ring=fr.ring, point_time_ns=fr.point_time_ns,
                                         capture_ns=stamps, trajectory=traj,
                                         intensity=fr.intensity if intensity else None)
        prepared.add(ref, fr.images[0], ring=fr.ring, T_capture_sweep=T[0], found=found,
                     capture_ns=int(stamps[0]), trajectory=traj)
    return prepared


def test_time_offset_is_recovered(sim_frames):
    """Images captured 30 ms after their stamps: the search finds the 30 ms (the ego drives
    5 to 15 m/s), both halves of the data agree, and the stamps as they are score worse."""
    frames = offset_frames(sim_frames, 30.0)
    result = cc.estimate_time_offset(frames)
    assert result.converged, result.reason
    assert abs(result.offset_ns * 1e-6 - 30.0) < 2.5, result.to_dict()
    assert result.spread_ms < 5.0 and result.ego_motion_m > 0.05
    assert result.score > result.initial_score + 0.02
    # the same frames with the right stamps: no offset left
    right = cc.estimate_time_offset(offset_frames(sim_frames, 0.0), verify=False)
    assert right.converged and abs(right.offset_ns) < 2_500_000, right.to_dict()
    # frames without capture times or ego poses cannot be searched
    bare = cc.CameraFrames(frames.camera)
    bare.views = [dataclasses.replace(v, trajectory=None) for v in frames.views]
    with pytest.raises(cc.AlignmentError, match='capture time and ego poses'):
        cc.estimate_time_offset(bare)


def test_time_offset_is_refused_when_the_car_stands():
    """A car that stands still: every offset shows the same picture, so the search refuses
    instead of writing an offset."""
    from cmkd_ros.sim import SimWorld
    world = SimWorld({'seed': 5, 'cameras': {'count': 1, 'width': 320, 'height': 180},
                      'ego': {'speed_min_mps': 0.0, 'speed_max_mps': 0.0}}, workers=1)
    frames = offset_frames([world.frame(0)], 30.0)
    result = cc.estimate_time_offset(frames)
    assert not result.converged and result.offset_ns == 0
    assert result.ego_motion_m < 1e-6 and 'does not move' in result.reason, result.reason


@pytest.mark.slow
def test_joint_search_recovers_rotation_and_time_offset(sim_frames):
    """A camera off by one degree whose images are stamped 25 ms before their capture: the
    joint search (rotation and time offset together) finds both from six frames (from three,
    the halves of the data disagree and it refuses)."""
    from cmkd_ros.sim import SimWorld
    world = SimWorld({'seed': 5, 'cameras': {'count': 1, 'width': 480, 'height': 270}},
                     workers=1)
    sweeps = sim_frames + [world.frame(i * 7) for i in range(3, 6)]
    true_cam = sweeps[0].calibration.cameras[0]
    frames = offset_frames(sweeps, 25.0, camera=off_by(true_cam, 1.0))
    result = cc.refine(frames, translation=False, time_offset=True)
    assert result.converged, result.to_dict()
    R = result.T_cam_lidar[:3, :3] @ true_cam.T_cam_lidar[:3, :3].T
    residual_deg = math.degrees(math.acos(np.clip((np.trace(R) - 1) / 2, -1, 1)))
    assert residual_deg < 0.3, result.to_dict()
    assert abs(result.time_offset_ns * 1e-6 - 25.0) < 5.0, result.to_dict()


def test_offset_and_travel_valley(sim_frames):
    """A capture time 20 ms later with the camera moved by the ego's travel in 20 ms
    (``_travel_per_ms``: the direction the joint search also steps along) hardly moves the
    points: the score drops much less than with the time alone, and much more with the camera
    moved the other way. Along this valley an offset and a translation trade."""
    cam = sim_frames[0].calibration.cameras[0]
    frames = offset_frames(sim_frames, 0.0, intensity=True)
    travel = cc._travel_per_ms(frames, cam.T_cam_lidar)                # camera axes, per ms
    assert 3.0 < 1000 * np.linalg.norm(travel) < 16.0 and travel[2] > 0  # forward, 3-16 m/s
    at_truth = frames.score(cam.T_cam_lidar, 2.0)
    for ms in (-20.0, 20.0):
        later = frames.shifted(int(ms * 1e6))
        alone = at_truth - later.score(cam.T_cam_lidar, 2.0)
        along = at_truth - later.score(cc.perturb(cam.T_cam_lidar, np.r_[np.zeros(3),
                                                                         ms * travel]), 2.0)
        against = at_truth - later.score(cc.perturb(cam.T_cam_lidar, np.r_[np.zeros(3),
                                                                           -ms * travel]), 2.0)
        assert alone > 0.02 and along < 0.4 * alone and against > 1.5 * alone, \
            (ms, alone, along, against)

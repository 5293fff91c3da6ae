"""The collect node's pipeline without ROS: sweep work, record decision, pair, overlay, queue.

Inputs are built as the node builds them from its messages: a synthetic frame (``cmkd_ros.sim``,
with ground truth for every point-pixel pair) as the PointCloud2 fields, raw images and
nav_msgs/Odometry messages (rosbags classes) a bag of it holds, and the real nuScenes sample
(six JPEG cameras, the ring field) from the shared data folder.
"""
import dataclasses
import json
import threading

import numpy as np
import pytest

from cmkd_ros.config import build
from cmkd_ros.pipelines.collect import (CameraSample, CollectNodeConfig, CollectPipeline,
                                        SyncedInputs)
from cmkd_ros.pipelines.intake import CountingReport
from cmkd_ros.pipelines.work_queue import IdleGate, WorkQueue
from cmkd_ros.projection import compute_correspondences

CONFIG = build(CollectNodeConfig, {'calibration_file': 'rig.yaml'})


@pytest.fixture(scope='module')
def frame():
    from cmkd_ros.sim import SimWorld
    return SimWorld({'seed': 3, 'cameras': {'count': 2, 'width': 320, 'height': 180},
                     'lidar': {'beams': 16, 'horizontal_resolution_deg': 1.0}}).frame(1)


def sim_inputs(frame, odometry=True) -> SyncedInputs:
    """The synchronized set a collect node decodes from the frame's messages."""
    from cmkd_ros.bag import odometry_msg, points_array
    from cmkd_ros.conversions import rosbags_types
    stamp = int(frame.lidar_stamp_ns)
    points = points_array(frame.xyz, frame.intensity, frame.ring, frame.point_time_ns, stamp)
    samples = {name: CameraSample(name, int(frame.camera_stamp_ns[c]), rgb=frame.images[c])
               for c, name in enumerate(frame.camera_names)}
    typestore = rosbags_types().typestore
    odom = [odometry_msg(typestore, int(s), pose, np.zeros(3), 0.0)
            for s, pose in zip(frame.ego_stamps_ns, frame.ego_poses)] if odometry else []
    return SyncedInputs(stamp, points, frame.calibration, samples, odom)


def _visibility(frame, corr):
    pred = np.zeros_like(frame.gt_visible)
    pred[corr.camera, corr.point] = True
    tp = (pred & frame.gt_visible).sum()
    return tp / pred.sum(), tp / frame.gt_visible.sum()


def _pixel_error(frame, corr):
    in_view = frame.gt_in_view[corr.camera, corr.point]
    return np.linalg.norm(corr.uv[in_view] - frame.gt_uv[corr.camera[in_view],
                                                         corr.point[in_view]], axis=1)


def test_sweep_of_a_synthetic_set_matches_its_ground_truth(frame):
    report = CountingReport()
    pipeline = CollectPipeline(CONFIG, report)
    sweep = pipeline.sweep(sim_inputs(frame))
    # per-point times from the float32 'time' field; ego poses from the odometry messages
    assert np.abs(sweep.point_time_ns - frame.point_time_ns).max() < 1000
    np.testing.assert_array_equal(sweep.trajectory.stamps_ns, frame.ego_stamps_ns)
    np.testing.assert_allclose(sweep.trajectory.T_world_lidar, frame.ego_poses, atol=1e-9)
    np.testing.assert_array_equal(sweep.camera_stamp_ns, frame.camera_stamp_ns)
    # correspondences: motion compensated to each camera stamp, hidden points removed
    corr = sweep.correspondences
    precision, recall = _visibility(frame, corr)
    assert len(corr) > 1000 and precision > 0.97 and recall > 0.95
    compensated = _pixel_error(frame, corr)
    assert compensated.mean() < 0.05
    still = CollectPipeline(CONFIG, CountingReport()).sweep(sim_inputs(frame, odometry=False))
    assert _pixel_error(frame, still.correspondences).mean() > 10 * compensated.mean()
    # the scan pattern is read once, from the ring field, and told once
    assert report.infos == ['occlusion test: scan pattern from the ring field: 16 beams over '
                            '-30.7..+10.7 deg, beam spacing 2.76..2.76 deg, azimuth step '
                            '1.000 deg; camera-LiDAR baselines front 1.25 m, front_left 0.92 m']
    pattern = pipeline.scan_pattern
    pipeline.sweep(sim_inputs(frame))
    assert pipeline.scan_pattern is pattern and len(report.infos) == 1
    assert report.warnings == [] and report.values['last_correspondences'] == len(corr)


def test_pair_holds_the_inputs_and_the_correspondences_training_recomputes(frame, tmp_path):
    from cmkd_ros.motion import PoseTrajectory
    from cmkd_ros.pairs import PairReader, PairWriter
    inputs = sim_inputs(frame)
    nan = inputs.points.copy()
    nan['y'][:7] = np.nan                                  # dropped, with a warning
    report = CountingReport()
    pipeline = CollectPipeline(CONFIG, report)
    sweep = pipeline.sweep(dataclasses.replace(inputs, points=nan))
    assert report.warnings == [('nan_points', f'7 of {len(nan)} points have non-finite '
                                              'coordinates (dropped)')]
    pair = pipeline.pair(sweep)
    assert pair.lidar_stamp_ns == frame.lidar_stamp_ns
    np.testing.assert_array_equal(pair.xyz, frame.xyz[7:])
    np.testing.assert_array_equal(pair.intensity, frame.intensity[7:])
    np.testing.assert_array_equal(pair.ring, frame.ring[7:])
    assert pair.camera_names == frame.camera_names
    for c, name in enumerate(frame.camera_names):
        assert pair.image_formats[name] == 'png'           # raw images: lossless
        np.testing.assert_array_equal(pair.image(name), frame.images[c])
    # written and read back, the stored correspondences are what training computes from the
    # stored inputs
    PairWriter(str(tmp_path / 'pairs'), fsync=False).write(pair)
    stored = PairReader(str(tmp_path / 'pairs'))[0]
    corr = compute_correspondences(
        stored.xyz, stored.calibration, point_time_ns=stored.point_time_ns,
        camera_stamp_ns=stored.camera_stamp_ns, ring=stored.ring,
        trajectory=PoseTrajectory(stored.ego_stamps_ns, stored.ego_poses))
    assert len(corr) > 1000
    for key in ('point', 'camera'):
        np.testing.assert_array_equal(stored.correspondences[key], getattr(corr, key))
    np.testing.assert_allclose(stored.correspondences['uv'], corr.uv, atol=1e-3)
    # without store_correspondences the pair has none
    lean = dataclasses.replace(CONFIG, record=dataclasses.replace(
        CONFIG.record, store_correspondences=False))
    assert CollectPipeline(lean, report).pair(sweep).correspondences is None


def test_stored_correspondences_carry_the_hash_of_their_settings(frame):
    from cmkd_ros.projection import correspondence_settings_hash
    pipeline = CollectPipeline(CONFIG, CountingReport())
    pair = pipeline.pair(pipeline.sweep(sim_inputs(frame)))
    assert pair.correspondence_settings == correspondence_settings_hash(CONFIG.correspondence)
    other = dataclasses.replace(CONFIG.correspondence, occlusion=False)
    assert pair.correspondence_settings != correspondence_settings_hash(other)


def test_record_decision_counts_few_correspondences_and_limits_the_rate(frame):
    report = CountingReport()
    config = dataclasses.replace(CONFIG, record=dataclasses.replace(CONFIG.record,
                                                                    min_interval_s=1.0))
    pipeline = CollectPipeline(config, report)
    sweep = pipeline.sweep(sim_inputs(frame))

    def at(offset_s):
        return dataclasses.replace(sweep, stamp_ns=sweep.stamp_ns + int(offset_s * 1e9))

    assert [pipeline.accept(at(s)) for s in (0, 0.5, 0.99, 1.0, 1.5, 2.0)] == [
        True, False, False, True, False, True]
    pipeline.restart()                                     # the stamps jumped back
    assert pipeline.accept(at(1.5))
    pipeline.configure(dataclasses.replace(config, record=dataclasses.replace(
        config.record, min_interval_s=0.0, min_correspondences=len(sweep.correspondences) + 1)))
    assert not pipeline.accept(at(10)) and not pipeline.accept(at(20))
    assert report.counters == {'skipped_few_correspondences': 2}
    pipeline.configure(dataclasses.replace(pipeline.config, record=dataclasses.replace(
        pipeline.config.record, min_correspondences=len(sweep.correspondences))))
    assert pipeline.accept(at(10)) and pipeline.accept(at(10))


def test_sets_that_cannot_make_a_pair_are_reported_and_skipped(frame):
    inputs = sim_inputs(frame)
    report = CountingReport()
    pipeline = CollectPipeline(CONFIG, report)
    assert pipeline.sweep(dataclasses.replace(inputs, points=inputs.points[:0])) is None
    all_nan = inputs.points[:20].copy()
    all_nan['x'] = np.nan
    assert pipeline.sweep(dataclasses.replace(inputs, points=all_nan)) is None
    # too few points to read the LiDAR's scan pattern: skipped, tried again on the next sweep
    assert pipeline.sweep(dataclasses.replace(inputs, points=inputs.points[:30])) is None
    assert pipeline.scan_pattern is None
    # odometry that cannot make a trajectory: the set is used without motion compensation
    broken = inputs.odometry[:3]
    broken[1].pose.pose.position.x = float('nan')
    sweep = pipeline.sweep(dataclasses.replace(inputs, odometry=broken))
    assert sweep is not None and sweep.trajectory is None and pipeline.scan_pattern is not None
    keys = [key for key, _ in report.warnings]
    assert keys == ['empty_cloud', 'nan_points', 'scan_pattern', 'bad_odometry'], keys
    assert report.warnings[2][1].endswith('(tried again on the next sweep)')
    assert len(report.infos) == 1


def test_overlay_draws_the_correspondences_of_one_camera(frame):
    pipeline = CollectPipeline(CONFIG, CountingReport())
    sweep = pipeline.sweep(sim_inputs(frame))
    img = pipeline.overlay(sweep, 'front')
    assert img.shape == (180, 320, 3) and img.dtype == np.uint8
    changed = (img != frame.images[0]).any(axis=2)
    points = (sweep.correspondences.camera == 0).sum()
    assert points <= changed.sum() <= 4 * points           # a 2x2 dot per point
    assert pipeline.overlay(sweep, 'rear') is None         # not in this set
    small = CollectPipeline(dataclasses.replace(CONFIG, overlay=dataclasses.replace(
        CONFIG.overlay, max_width=160)), CountingReport())
    assert small.overlay(sweep, 'front_left').shape == (90, 160, 3)


def test_nuscenes_frame_becomes_a_pair(data_dir):
    from cmkd_ros.calibration import load_nuscenes_calibration, nuscenes_stamps_ns
    folder = data_dir / 'nuscenes_sample'
    rig = load_nuscenes_calibration(str(folder / 'calibration.json'))
    files = {n: c['file'] for n, c in json.loads(
        (folder / 'calibration.json').read_text())['cameras'].items()}
    lidar_ns, camera_ns = nuscenes_stamps_ns(str(folder / 'calibration.json'))
    raw = np.fromfile(folder / 'LIDAR_TOP.bin', np.float32).reshape(-1, 5)
    points = np.zeros(len(raw), dtype=[('x', 'f4'), ('y', 'f4'), ('z', 'f4'),
                                       ('intensity', 'f4'), ('ring', 'u2')])
    for i, name in enumerate(('x', 'y', 'z', 'intensity')):
        points[name] = raw[:, i]
    points['ring'] = raw[:, 4]
    jpegs = {n: (folder / files[n]).read_bytes() for n in rig.names}
    samples = {n: CameraSample(n, camera_ns[n], encoded=jpegs[n], encoded_format='jpeg')
               for n in rig.names}
    report = CountingReport()
    pipeline = CollectPipeline(CONFIG, report)
    sweep = pipeline.sweep(SyncedInputs(lidar_ns, points, rig, samples))
    corr = sweep.correspondences
    # 20,198 points project into some image (test_projection); the occlusion test hides
    # between 2 and 7 % of them (test_occlusion)
    assert 0.93 * 20198 < corr.point_mask().sum() < 0.98 * 20198
    per_camera = np.bincount(corr.camera, minlength=6)
    assert per_camera.min() > 2500 and per_camera.max() < 4900, per_camera
    assert report.infos[0].startswith('occlusion test: scan pattern from the ring field: '
                                      '32 beams')
    assert pipeline.accept(sweep)
    pair = pipeline.pair(sweep)
    assert pair.xyz.shape == (34688, 3) and pair.camera_names == list(rig.names)
    assert pair.images == jpegs and set(pair.image_formats.values()) == {'jpeg'}
    np.testing.assert_array_equal(pair.ring, raw[:, 4].astype(np.uint16))
    assert pair.point_time_ns is None and pair.ego_poses is None     # no time field, no odom
    assert len(pair.to_arrays()['corr_point']) == len(corr)
    assert report.warnings == []


def test_bounded_fifo_drops_the_oldest_and_drains_on_close():
    queue = WorkQueue(3)
    assert [queue.put(i) for i in range(5)] == [False, False, False, True, True]
    assert queue.dropped == 2 and len(queue) == 3
    assert queue.take(0.1) == 2
    queue.put(5)
    queue.close()
    assert list(queue.items()) == [3, 4, 5] and queue.take(0.01) is None
    # a producer faster than the consumer: every item is taken in order or counted as dropped
    queue = WorkQueue(4)
    got = []
    consumer = threading.Thread(target=lambda: got.extend(queue.items(poll_s=0.05)))
    consumer.start()
    for i in range(2000):
        queue.put(i)
    queue.close()
    consumer.join(timeout=10)
    assert len(got) + queue.dropped == 2000 and got == sorted(got) and got[-1] == 1999
    with pytest.raises(ValueError, match='capacity'):
        WorkQueue(0)


def test_idle_gate_holds_background_steps_while_the_worker_is_busy():
    """The collect node's calibration health check steps only while its worker is idle and
    no set waits for it; closing the gate lets the background thread go (shutdown)."""
    queue = WorkQueue(4)
    gate = IdleGate(pending=queue.__len__, poll_s=0.005)
    assert gate.idle() and gate.wait_idle(timeout=0.01)
    passed = threading.Event()

    def background():
        gate.wait_idle()
        passed.set()

    with gate.busy():                                  # the worker makes a pair
        assert not gate.idle() and not gate.wait_idle(timeout=0.02)
        thread = threading.Thread(target=background)
        thread.start()
        queue.put('next set')                          # and another set is waiting
        assert not passed.wait(0.05)
    assert not passed.wait(0.05), 'a set still waits for the worker'
    with gate.busy():
        assert queue.take(0.1) == 'next set'
    assert passed.wait(2.0)
    thread.join(timeout=2.0)
    # shutdown: waiters are released even while the worker is busy
    released = threading.Event()
    with gate.busy():
        thread = threading.Thread(target=lambda: (gate.wait_idle(), released.set()))
        thread.start()
        assert not released.wait(0.05)
        gate.close()
        assert released.wait(2.0)
    thread.join(timeout=2.0)


@pytest.fixture(scope='module')
def drive():
    """Five consecutive synthetic sweeps (the frame fixture's world: 16 beams, 320x180)."""
    from cmkd_ros.sim import SimWorld
    world = SimWorld({'seed': 3, 'cameras': {'count': 2, 'width': 320, 'height': 180},
                      'lidar': {'beams': 16, 'horizontal_resolution_deg': 1.0}}, workers=1)
    return [world.frame(i) for i in range(5)]


def test_health_check_finds_the_misaligned_camera_and_refuse_drops_only_it(drive):
    """One camera's calibration turned by 1 degree: after enough sets the check calls it
    misaligned and the other ok; with refuse_misaligned its image and correspondences are left
    out of the pairs (counted), the other camera's kept as they were."""
    import math

    from cmkd_ros import calibration_check as cc
    from cmkd_ros.calibration import RigCalibration
    rig = drive[0].calibration
    axis = np.array([0.3, -0.8, 0.5]) / np.linalg.norm([0.3, -0.8, 0.5])
    turned = cc.with_extrinsic(rig.camera('front_left'), cc.perturb(
        rig.camera('front_left').T_cam_lidar, math.radians(1.0) * axis))
    bad_rig = RigCalibration((rig.camera('front'), turned), rig.lidar_frame)
    config = build(CollectNodeConfig, {
        'calibration_file': 'rig.yaml', 'correspondence': {'occlusion': False},
        'health': {'sweep_stride': 2, 'window': 4, 'check_every': 3, 'min_frames': 3}})
    report = CountingReport()
    pipeline = CollectPipeline(config, report)
    sweeps, due, checks = [], [], []
    for fr in drive:
        sweep = pipeline.sweep(dataclasses.replace(sim_inputs(fr), rig=bad_rig))
        sweeps.append(sweep)
        due.append(pipeline.health_due(sweep))
        if due[-1]:                              # sweeps 0, 2, 4 (nearby ones look alike)
            checks.append(pipeline.check_health(sweep))
    assert due == [True, False, True, False, True]
    # no verdict before check_every sets, then one per camera
    assert checks[:2] == [None, None] and set(checks[2]) == {'front', 'front_left'}
    front, left = pipeline.health['front'], pipeline.health['front_left']
    assert front.status == 'ok' and front.report.frames == 3, front.message
    # the cloud's intensity field reached the check: reflectance edges (no direction) scored
    views = pipeline.health_monitor._frames['front'].views
    assert sum(int(np.isnan(v.across).sum()) for v in views) > 10
    assert left.status == 'misaligned' and 'fit better' in left.message, left.message
    assert left.report.better_neighbours > config.health.warn_better_neighbours
    # refuse_misaligned off (the default): both cameras recorded
    sweep = sweeps[-1]
    assert pipeline.refused(sweep) == [] and pipeline.accept(sweep)
    assert pipeline.pair(sweep).camera_names == ['front', 'front_left']
    # on (a runtime setting): front_left is left out, counted per pair
    pipeline.configure(dataclasses.replace(config, health=dataclasses.replace(
        config.health, refuse_misaligned=True)))
    assert pipeline.refused(sweep) == ['front_left'] and pipeline.accept(sweep)
    pair = pipeline.pair(sweep)
    assert pair.camera_names == ['front'] and set(pair.images) == {'front'}
    assert pair.calibration.names == ['front'] and pair.camera_stamp_ns.tolist() == [
        sweep.camera_stamp_ns[0]]
    front_corr = sweep.correspondences.for_camera('front')
    assert len(front_corr) > 500
    np.testing.assert_array_equal(pair.correspondences['point'], front_corr.point)
    np.testing.assert_array_equal(pair.correspondences['camera'], 0)
    np.testing.assert_array_equal(pair.correspondences['uv'], front_corr.uv)
    assert report.counters.get('refused_misaligned_front_left') == 1
    assert 'refused_misaligned_front' not in report.counters
    # a set of the misaligned camera alone: no pair at all (counted)
    alone = pipeline.sweep(dataclasses.replace(
        sim_inputs(drive[-1]), rig=bad_rig.subset(['front_left']),
        samples={'front_left': sim_inputs(drive[-1]).samples['front_left']}))
    assert pipeline.refused(alone) == ['front_left'] and not pipeline.accept(alone)
    assert pipeline.pair(alone) is None
    assert report.counters['skipped_all_cameras_refused'] == 2
    assert report.counters['refused_misaligned_front_left'] == 3
    # health.enabled off: no refusal, no more checks
    pipeline.configure(dataclasses.replace(config, health=dataclasses.replace(
        config.health, refuse_misaligned=True, enabled=False)))
    assert pipeline.refused(sweep) == [] and not pipeline.health_due(sweep)
    assert pipeline.check_health(sweep) is None
    # a new calibration of a camera (a CameraInfo with other intrinsics) starts it over
    pipeline.configure(config)
    wider = dataclasses.replace(rig.camera('front'), K=rig.camera('front').K * [[1.01], [1.01],
                                                                             [1]])
    other = dataclasses.replace(sweeps[0], rig=RigCalibration((wider, turned)))
    assert pipeline.check_health(other) is None
    assert pipeline.health['front'].status == 'unknown'
    assert pipeline.health['front_left'].status == 'misaligned'


def test_the_sweep_before_adds_occluders_while_the_ego_poses_reach_it():
    # a 32-beam LiDAR with cameras 0.3 m from it on a moving car: the previous sweep sampled the
    # occluders' edges elsewhere; the pipeline keeps it and hands it to the occlusion test
    from cmkd_ros.sim import SimWorld
    world = SimWorld({'seed': 20, 'lidar': {'preset': 'default'},
                      'cameras': {'count': 4, 'width': 320, 'height': 180,
                                  'yaw_deg': [0, 90, 180, -90], 'mount_forward_m': 0.18,
                                  'mount_side_m': 0.18, 'mount_below_lidar_m': 0.15,
                                  'mount_right_m': 0.19}})
    before, frame = world.frame(1), world.frame(2)
    report = CountingReport()
    pipeline = CollectPipeline(CONFIG, report)
    assert pipeline.sweep(sim_inputs(before)).correspondences.previous_occluders == 0
    sweep = pipeline.sweep(sim_inputs(frame))
    assert sweep.correspondences.previous_occluders > 10_000
    assert report.values['last_previous_occluders'] == sweep.correspondences.previous_occluders
    alone = CollectPipeline(CONFIG, CountingReport()).sweep(sim_inputs(frame)).correspondences

    def scores(corr):
        keep = np.zeros_like(frame.gt_visible)
        keep[corr.camera, corr.point] = True
        valid = frame.gt_in_view
        occluded = valid & frame.gt_occluded
        return ((keep & frame.gt_visible).sum() / frame.gt_visible.sum(),
                (occluded & ~keep).sum() / occluded.sum(), occluded.sum())
    kept, removed, occluded = scores(sweep.correspondences)
    kept_alone, removed_alone, _ = scores(alone)
    assert occluded > 100
    assert removed > removed_alone + 0.02 and kept > kept_alone - 0.003, (
        removed, removed_alone, kept, kept_alone)
    # without ego poses, or after the stamps jumped back, no sweep comes before
    pipeline.restart()
    assert pipeline.sweep(sim_inputs(frame)).correspondences.previous_occluders == 0
    still = CollectPipeline(CONFIG, CountingReport())
    still.sweep(sim_inputs(before, odometry=False))
    assert still.sweep(sim_inputs(frame, odometry=False)).correspondences.previous_occluders == 0
    # a worker falling behind (sets waiting: hurry) leaves the sweep before out of that set,
    # which becomes the next set's sweep before all the same
    busy_report = CountingReport()
    busy = CollectPipeline(CONFIG, busy_report)
    busy.sweep(sim_inputs(before))
    hurried = busy.sweep(sim_inputs(frame), hurry=True).correspondences
    assert hurried.previous_occluders == 0
    assert busy_report.counters['previous_sweep_skipped_busy'] == 1
    assert np.array_equal(hurried.point, alone.point) and np.array_equal(hurried.camera,
                                                                         alone.camera)
    after = world.frame(3)
    assert busy.sweep(sim_inputs(after)).correspondences.previous_occluders > 10_000

"""Collect node as a real process, fed by the replay tool from a synthetic bag or by hand."""
import os
import sys
import time

import numpy as np
import pytest

from cmkd_ros.bag import deserialize, read_messages
from cmkd_ros.calibration import RigCalibration
from cmkd_ros.conversions import cloud_to_array, stamp_ns
from cmkd_ros.pairs import PairReader
from ros_utils import (RosClient, RosProcess, make_sim_bag, node_command, processes, ros_env,
                       unique_domain_id, wait_for)

pytestmark = pytest.mark.ros  # ROS-facing: runs on every tested distro (scripts/test.sh)

COLLECT = 'cmkd_ros.nodes.collect_node'
CAMERAS = ['front', 'front_left']


def _params(bag, out, **extra):
    params = {'calibration_file': str(bag / 'calibration.yaml'), 'cameras': CAMERAS,
              'record.enabled': True, 'record.output_dir': str(out)}
    params.update(extra)
    return params


def _replay(bag, domain, log, *extra):
    topics = ['/lidar/points'] + [f'/cameras/{c}/image_raw/compressed' for c in CAMERAS]
    return RosProcess([sys.executable, '-m', 'cmkd_ros.tools.cli', 'replay', str(bag),
                       '--wait-for', *topics, '--wait-timeout', '40', *extra],
                      ros_env(domain), log)


def _bag_contents(bag):
    """{topic: {header stamp: message}} of the bag (rosbags messages)."""
    out: dict = {}
    for topic, msgtype, _, raw in read_messages(bag):
        msg = deserialize(raw, msgtype)
        if hasattr(msg, 'header'):
            out.setdefault(topic, {})[stamp_ns(msg)] = msg
    return out


@pytest.fixture(scope='module')
def sim_bag(tmp_path_factory):
    return make_sim_bag(tmp_path_factory.mktemp('sim') / 'drive', frames=4)


def test_collect_node_writes_one_complete_pair_per_sweep(tmp_path, sim_bag):
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image

    from cmkd_ros.motion import PoseTrajectory
    from cmkd_ros.projection import (CorrespondenceConfig, PreviousSweep,
                                     compute_correspondences, correspondence_settings_hash)
    out_dir = tmp_path / 'pairs'
    domain = unique_domain_id()
    with RosClient(domain) as client, processes() as procs:
        overlays = client.collect(Image, '/collect_node/output/overlay')
        diags = client.collect(DiagnosticArray, '/diagnostics')
        procs.append(RosProcess(node_command(COLLECT, _params(sim_bag, out_dir,
                                                              use_odometry=True),
                                             {'~/input/pointcloud': '/lidar/points',
                                              '~/input/odom': '/odom'}),
                                ros_env(domain), tmp_path / 'node.log'))
        wait_for(lambda: client.node.count_publishers('/collect_node/output/overlay') > 0, 30,
                 'collect node', on_fail=procs[0].output)
        procs.append(_replay(sim_bag, domain, tmp_path / 'replay.log', '--rate', '0.5'))
        assert procs[1].wait(timeout=60) == 0, procs[1].output()
        wait_for(lambda: os.path.isdir(out_dir) and len(PairReader(str(out_dir))) >= 4, 30,
                 '4 pairs', on_fail=lambda: procs[0].output()[-3000:])
        wait_for(lambda: overlays, 5, 'an overlay image')
        time.sleep(1.2)                                  # one more diagnostics period
        # the LiDAR's scan pattern is read from the first sweep and logged once
        log = procs[0].output()
        assert log.count('occlusion test: scan pattern from the ring field: 16 beams') == 1, log
        assert 'camera-LiDAR baselines front 1.25 m, front_left' in log
    bag = _bag_contents(sim_bag)
    reader = PairReader(str(out_dir))
    assert len(reader) == 4
    lidar_stamps = sorted(bag['/lidar/points'])
    before = None
    for entry, pair in zip(reader.entries, reader):
        stamp = pair.lidar_stamp_ns
        assert stamp == lidar_stamps[reader.entries.index(entry)]
        points = cloud_to_array(bag['/lidar/points'][stamp])
        finite = np.isfinite(np.stack([points[c] for c in 'xyz'], 1)).all(1)
        np.testing.assert_array_equal(pair.xyz, np.stack([points[c] for c in 'xyz'], 1)[finite])
        np.testing.assert_array_equal(pair.intensity, points['intensity'][finite])
        np.testing.assert_array_equal(pair.ring, points['ring'][finite])
        np.testing.assert_array_equal(
            pair.point_time_ns,
            stamp + np.round(points['time'][finite].astype(np.float64) * 1e9).astype(np.int64))
        assert pair.camera_names == CAMERAS
        for c, name in enumerate(CAMERAS):
            cam_stamp = int(pair.camera_stamp_ns[c])
            jpeg = bag[f'/cameras/{name}/image_raw/compressed'][cam_stamp]
            assert pair.images[name] == bytes(jpeg.data)     # JPEG kept as received
            assert pair.image_formats[name] == 'jpeg'
            assert abs(cam_stamp - stamp) < 100_000_000
            info = bag[f'/cameras/{name}/camera_info'][cam_stamp]
            np.testing.assert_allclose(pair.calibration.camera(name).K.reshape(-1), info.k)
        # correspondences as stored = the library function on the stored inputs and the sweep
        # before (every sweep of the bag became a pair), with both pairs' ego poses
        assert pair.ego_poses is not None and len(pair.ego_stamps_ns) > 10
        trajectory = PoseTrajectory(pair.ego_stamps_ns, pair.ego_poses)
        previous = None
        if before is not None and stamp - before.lidar_stamp_ns <= 500_000_000:
            previous = PreviousSweep(before.xyz, before.point_time_ns, before.ring)
            trajectory = trajectory.merged(PoseTrajectory(before.ego_stamps_ns,
                                                          before.ego_poses))
        before = pair
        corr = compute_correspondences(pair.xyz, pair.calibration,
                                       point_time_ns=pair.point_time_ns,
                                       camera_stamp_ns=pair.camera_stamp_ns,
                                       trajectory=trajectory, ring=pair.ring,
                                       previous=previous)
        assert len(corr) > 100
        assert (corr.previous_occluders > 0) == (previous is not None)
        # stored with the hash of the settings, which training compares with its own
        assert pair.correspondence_settings == correspondence_settings_hash(
            CorrespondenceConfig())
        np.testing.assert_array_equal(pair.correspondences['point'], corr.point)
        np.testing.assert_array_equal(pair.correspondences['camera'], corr.camera)
        np.testing.assert_allclose(pair.correspondences['uv'], corr.uv, atol=1e-3)
    # overlay: the first camera with points drawn over it
    _, overlay = overlays[0]
    assert (overlay.width, overlay.height, overlay.encoding) == (320, 180, 'rgb8')
    values = {kv.key: kv.value for _, msg in diags for s in msg.status
              if 'collect_node' in s.name for kv in s.values}
    assert values.get('pairs_written') == '4'


def test_collect_node_publishes_each_cameras_calibration_health(tmp_path, sim_bag):
    """A calibration file with front_left turned by 1 degree: /diagnostics has one calibration
    status per camera, no verdict before the sets arrive, then after the bag's four sets WARN
    misaligned for front_left and OK for front (and a warning in the log)."""
    import math

    from diagnostic_msgs.msg import DiagnosticArray

    from cmkd_ros import calibration_check as cc
    rig = RigCalibration.load(str(sim_bag / 'calibration.yaml'))
    left = rig.camera('front_left')
    axis = np.array([0.3, -0.8, 0.5]) / np.linalg.norm([0.3, -0.8, 0.5])
    turned = cc.with_extrinsic(left, cc.perturb(left.T_cam_lidar, math.radians(1.0) * axis))
    RigCalibration((rig.camera('front'), turned), rig.lidar_frame).save(
        str(tmp_path / 'rig.yaml'))
    params = {'calibration_file': str(tmp_path / 'rig.yaml'), 'cameras': CAMERAS,
              'health.sweep_stride': 1, 'health.window': 4, 'health.check_every': 4}
    domain = unique_domain_id()
    with RosClient(domain) as client, processes() as procs:
        diags = client.collect(DiagnosticArray, '/diagnostics')

        def latest():
            out = {}
            for _, msg in list(diags):
                for s in msg.status:
                    if s.name.startswith('collect_node: calibration '):
                        out[s.name.rsplit(' ', 1)[1]] = s
            return out
        procs.append(RosProcess(node_command(COLLECT, params,
                                             {'~/input/pointcloud': '/lidar/points'}),
                                ros_env(domain), tmp_path / 'node.log'))
        wait_for(lambda: set(latest()) == set(CAMERAS), 30, 'a calibration status per camera',
                 on_fail=procs[0].output)
        before = latest()
        assert all(s.level == b'\x00' and s.message.startswith('unknown: ')
                   for s in before.values()), before
        procs.append(_replay(sim_bag, domain, tmp_path / 'replay.log', '--rate', '0.5'))
        assert procs[1].wait(timeout=60) == 0, procs[1].output()

        def checked():
            return all({kv.key: kv.value for kv in s.values}.get('sets') == '4'
                       for s in latest().values())
        wait_for(checked, 30, 'the check of the four sets',
                 on_fail=lambda: str(latest()) + procs[0].output()[-2000:])
        statuses = latest()
        log = procs[0].output()
    front, turned = statuses['front'], statuses['front_left']
    values = {kv.key: kv.value for kv in turned.values}
    assert turned.level == b'\x01' and turned.message.startswith('misaligned: '), turned
    assert float(values['better_neighbours']) > 0.2 and values['refusing'] == 'False'
    assert front.level == b'\x00' and front.message.startswith('ok: aligned'), front
    assert 'camera front_left: calibration misaligned' in log
    assert 'camera front: calibration misaligned' not in log


def test_kill_9_mid_run_leaves_every_completed_pair_readable(tmp_path):
    bag = make_sim_bag(tmp_path / 'drive', frames=12, seed=5)
    out_dir = tmp_path / 'pairs'
    domain = unique_domain_id()
    with RosClient(domain), processes() as procs:
        procs.append(RosProcess(node_command(COLLECT, _params(bag, out_dir),
                                             {'~/input/pointcloud': '/lidar/points'}),
                                ros_env(domain), tmp_path / 'node.log'))
        procs.append(_replay(bag, domain, tmp_path / 'replay.log', '--rate', '0.4'))
        wait_for(lambda: os.path.isdir(out_dir) and len(PairReader(str(out_dir))) >= 3, 40,
                 '3 pairs', on_fail=lambda: procs[0].output()[-3000:])
        procs[0].kill()                                  # SIGKILL mid-run
        assert procs[0].proc.wait(timeout=10) == -9
        procs[1].stop()
    # 1. every pair file that made it into place is complete and readable, indexed or not.
    reader = PairReader(str(out_dir), scan=True)
    assert 3 <= len(reader) < 12
    files = sorted(f for f in os.listdir(out_dir / 'pairs') if f.endswith('.npz')
                   and not f.startswith('.'))
    assert len(files) == len(reader)
    stamps = [pair.lidar_stamp_ns for pair in reader]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    for pair in reader:
        assert pair.xyz.shape[0] > 1000 and set(pair.images) == set(CAMERAS)
        assert pair.image(CAMERAS[0]).shape == (180, 320, 3)
    # 2. the dataset takes new pairs after the crash (a restarted node appends).
    from cmkd_ros.pairs import PairWriter
    writer = PairWriter(str(out_dir))
    assert writer.count == len(reader)


@pytest.mark.parametrize('setting,value,expected_stamps', [
    ('record.max_megabytes', 0.5, 2),           # about 0.22 MB per pair: the third exceeds it
    ('record.min_interval_s', 0.15, 2),         # sweeps at 0, 100, 200, 300 ms: 0 and 200 kept
])
def test_collect_node_quota_and_rate_limit(tmp_path, sim_bag, setting, value, expected_stamps):
    out_dir = tmp_path / 'pairs'
    domain = unique_domain_id()
    with RosClient(domain), processes() as procs:
        procs.append(RosProcess(node_command(COLLECT, _params(sim_bag, out_dir,
                                                              **{setting: value}),
                                             {'~/input/pointcloud': '/lidar/points'}),
                                ros_env(domain), tmp_path / 'node.log'))
        procs.append(_replay(sim_bag, domain, tmp_path / 'replay.log', '--rate', '0.5'))
        assert procs[1].wait(timeout=60) == 0, procs[1].output()
        time.sleep(2.0)                                  # let the worker finish
    reader = PairReader(str(out_dir))
    stamps = [e['lidar_stamp_ns'] - 1_700_000_000_000_000_000 for e in reader.entries]
    assert len(stamps) == expected_stamps
    if setting == 'record.min_interval_s':
        assert stamps == [0, 200_000_000]
    else:
        assert sum(e['bytes'] for e in reader.entries) <= 0.5e6
        assert 'quota' in procs[0].output()


def test_collect_node_pauses_recording_while_writes_fail_and_resumes(tmp_path, sim_bag):
    import resource

    from diagnostic_msgs.msg import DiagnosticArray
    out_dir = tmp_path / 'pairs'
    domain = unique_domain_id()
    with RosClient(domain) as client, processes() as procs:
        diags = client.collect(DiagnosticArray, '/diagnostics')
        procs.append(RosProcess(node_command(COLLECT, _params(sim_bag, out_dir),
                                             {'~/input/pointcloud': '/lidar/points'}),
                                ros_env(domain), tmp_path / 'node.log'))
        wait_for(lambda: client.node.count_publishers('/collect_node/output/overlay') > 0, 30,
                 'collect node', on_fail=procs[0].output)
        # The file system refuses pair files part-way, as a full disk does (here the node's
        # file size limit: 50 kB for pairs of about 220 kB; Python ignores SIGXFSZ).
        pid = procs[0].proc.pid
        hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (50_000, hard))

        def statuses():
            return [s for _, msg in diags for s in msg.status if 'collect_node' in s.name]
        replay = _replay(sim_bag, domain, tmp_path / 'replay1.log', '--rate', '0.5')
        assert replay.wait(timeout=60) == 0, replay.output()
        replay.stop()
        wait_for(lambda: any(s.level == b'\x02' and 'File too large' in s.message
                             for s in statuses()), 15, 'an ERROR status naming the cause',
                 on_fail=lambda: procs[0].output()[-2000:])
        assert os.listdir(out_dir / 'pairs') == []       # no partial or temporary files
        assert len(PairReader(str(out_dir))) == 0 and procs[0].returncode is None
        # Space is back: the next sets are written, the status returns to OK.
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
        replay = _replay(sim_bag, domain, tmp_path / 'replay2.log', '--rate', '0.5')
        assert replay.wait(timeout=60) == 0, replay.output()
        replay.stop()
        wait_for(lambda: len(PairReader(str(out_dir))) == 4, 20, '4 pairs after space is back',
                 on_fail=lambda: procs[0].output()[-2000:])
        errors = len(statuses())
        wait_for(lambda: len(statuses()) > errors and statuses()[-1].level == b'\x00', 15,
                 'an OK status')
    log = procs[0].output()
    assert 'recording paused: cannot write' in log and 'recording resumed in' in log
    assert sorted(os.listdir(out_dir / 'pairs')) == [f'{i:09d}.npz' for i in range(4)]


def _set_publishers(client):
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2
    return (client.node.create_publisher(PointCloud2, '/lidar/points', 10),
            client.node.create_publisher(Image, '/cameras/front/image_raw', 10),
            client.node.create_publisher(CameraInfo, '/cameras/front/camera_info', 10))


def _start_fed_node(client, procs, params, domain, log):
    """Start the collect node with ``params``; (cloud, front image, front CameraInfo)
    publishers once it subscribes to them."""
    pubs = _set_publishers(client)
    procs.append(RosProcess(node_command(COLLECT, params,
                                         {'~/input/pointcloud': '/lidar/points'}),
                            ros_env(domain), log))
    wait_for(lambda: all(p.get_subscription_count() for p in pubs), 30,
             'collect node subscriptions', on_fail=procs[0].output)
    time.sleep(1.0)                                  # discovery on the node's side too
    return pubs


def test_collect_node_survives_bad_input_and_reports_it(tmp_path, sim_bag):
    from diagnostic_msgs.msg import DiagnosticArray

    from cmkd_ros.bag import load_calibration
    from cmkd_ros.conversions import (array_to_cloud, array_to_image,
                                      camera_info_from_calibration, rclpy_types)
    t = rclpy_types()
    cam = load_calibration(sim_bag).camera('front')
    rng = np.random.default_rng(2)
    xyz = np.stack([rng.uniform(5, 20, 2000), rng.uniform(-4, 4, 2000),
                    rng.uniform(-1, 1, 2000)], 1).astype(np.float32)
    rgb = rng.integers(0, 255, (cam.height, cam.width, 3), dtype=np.uint8)

    def cloud(points, stamp, fields=('x', 'y', 'z')):
        arr = np.zeros(len(points), dtype=[(f, 'f4') for f in fields])
        for i, f in enumerate(fields):
            arr[f] = points[:, i]
        return array_to_cloud(arr, stamp, 'lidar', t)

    out_dir = tmp_path / 'pairs'
    domain = unique_domain_id()
    params = {'calibration_file': str(sim_bag / 'calibration.yaml'), 'cameras': ['front'],
              'image_transport': 'raw', 'image_topic': '/cameras/{camera}/image_raw',
              'lidar_sync_offset_ms': 0.0, 'point_time_field': '', 'max_points': 2000,
              'record.enabled': True, 'record.output_dir': str(out_dir)}
    with RosClient(domain) as client, processes() as procs:
        diags = client.collect(DiagnosticArray, '/diagnostics')
        pub_cloud, pub_image, pub_info = _start_fed_node(client, procs, params, domain,
                                                         tmp_path / 'node.log')
        pairs = lambda: len(PairReader(str(out_dir))) if out_dir.exists() else 0  # noqa: E731

        def send(stamp, points=xyz, image=None, info=None, fields=('x', 'y', 'z')):
            msg = cloud(points, stamp, fields) if isinstance(points, np.ndarray) else points
            pub_info.publish(info or camera_info_from_calibration(cam, stamp + 10_000_000, t))
            pub_image.publish(image or array_to_image(rgb, 'rgb8', stamp + 10_000_000,
                                                      cam.frame_id, t))
            pub_cloud.publish(msg)

        def good_set_after(stamp, count_before):
            send(stamp + 500_000_000)
            wait_for(lambda: pairs() > count_before, 15, f'a pair after the set at {stamp}',
                     on_fail=lambda: procs[0].output()[-2000:])
            return pairs()

        base = 3_000_000_000_000_000_000
        n = good_set_after(base - 500_000_000, 0)
        # a. CameraInfo with K all zero: rejected, the previous calibration stays
        bad_info = camera_info_from_calibration(cam, base + 10_000_000, t)
        bad_info.k = [0.0] * 9
        send(base, info=bad_info)
        n = good_set_after(base, n)
        # b. unknown encoding; c. image size disagreeing with CameraInfo
        base += 1_000_000_000
        yuv = array_to_image(rgb, 'rgb8', base + 10_000_000, cam.frame_id, t)
        yuv.encoding = 'yuv422_yuy2'
        send(base, image=yuv)
        n = good_set_after(base, n)
        base += 1_000_000_000
        send(base, image=array_to_image(rgb[::2, ::2].copy(), 'rgb8', base + 10_000_000,
                                        cam.frame_id, t))
        n = good_set_after(base, n)
        # d. no x/y/z; e. wrong point_step; f. NaNs (pair with finite points); g. empty
        base += 1_000_000_000
        pub_info.publish(camera_info_from_calibration(cam, base + 10_000_000, t))
        send(base, points=cloud(xyz, base, ('a', 'b', 'c')))
        n = good_set_after(base, n)
        base += 1_000_000_000
        bad_step = cloud(xyz, base)
        bad_step.point_step = 4
        send(base, points=bad_step)
        n = good_set_after(base, n)
        base += 1_000_000_000
        with_nan = xyz.copy()
        with_nan[:100] = np.nan
        send(base, points=cloud(with_nan, base))
        wait_for(lambda: pairs() > n, 15, 'the pair with NaNs dropped')
        n = pairs()
        base += 1_000_000_000
        send(base, points=cloud(xyz[:0], base))
        n = good_set_after(base, n)
        # i. more points than max_points: dropped unread, before the synchronizer
        base += 1_000_000_000
        send(base, points=np.concatenate([xyz, xyz[:1]]))
        n = good_set_after(base, n)
        # j. x with count 3 (skipped); k. uint8 coordinates (a pair, with a warning)
        base += 1_000_000_000
        wide = cloud(xyz, base)
        wide.fields[0].count = 3
        send(base, points=wide)
        n = good_set_after(base, n)
        base += 1_000_000_000
        uint8 = np.zeros(len(xyz), dtype=[(c, 'u1') for c in 'xyz'])
        for i, c in enumerate('xyz'):
            uint8[c] = np.clip(xyz[:, i] + 4, 0, 255)
        send(base, points=array_to_cloud(uint8, base, 'lidar', t))
        wait_for(lambda: pairs() > n, 15, 'the pair with uint8 coordinates')
        n = pairs()
        # h. stamps jump backwards (a bag loop): reset, and later sets pair again
        base -= 100_000_000_000
        n = good_set_after(base, n)
        keys = ('bad_camera_info', 'bad_encoding', 'image_size_mismatch', 'missing_xyz',
                'bad_layout', 'nan_points', 'empty_cloud', 'stamp_backwards', 'too_many_points',
                'integer_xyz')

        def diag_values():
            return {kv.key: kv.value for _, msg in diags for s in msg.status
                    if 'collect_node' in s.name for kv in s.values}
        wait_for(lambda: all(k in diag_values() for k in keys), 5, 'diagnostic counters',
                 on_fail=lambda: str(diag_values()))
        assert procs[0].returncode is None
    values = diag_values()
    assert all(values[k] == ('2' if k == 'bad_layout' else '1') for k in keys), values
    reader = PairReader(str(out_dir))
    # 10 good sets, the sets with a bad CameraInfo, with NaNs and with uint8 coordinates
    assert len(reader) == 13
    assert sorted(p.xyz.shape[0] for p in reader)[-1] == 2000       # none above max_points
    nan_pair = [p for p in reader if p.xyz.shape[0] == 1900]
    assert len(nan_pair) == 1 and np.isfinite(nan_pair[0].xyz).all()
    first = reader[0]                                   # raw images are stored as lossless PNG
    assert first.image_formats['front'] == 'png'
    np.testing.assert_array_equal(first.image('front'), rgb)
    log = procs[0].output()
    for text in ("'yuv422_yuy2' is not supported", 'image is 160x90 but the calibration says '
                 '320x180', "no field(s) ['x', 'y', 'z']", 'focal lengths must be positive',
                 'cloud of 2001 points (2001 x 1) skipped unread: more than max_points (2000)',
                 'coordinates are not floating point (x uint8, y uint8, z uint8)'):
        assert text in log, text


def test_collect_node_sends_out_the_last_sweep_once_every_stream_stops(tmp_path, sim_bag):
    """Partial sets on, the second camera silent: after the last sweep nothing arrives that
    could time it out, so the node's timer polls the synchronizer once every stream has been
    quiet for sync.partial_timeout_ms, and the sweep is written with the camera it has."""
    from cmkd_ros.bag import load_calibration
    from cmkd_ros.conversions import (array_to_cloud, array_to_image,
                                      camera_info_from_calibration, rclpy_types)
    t = rclpy_types()
    cam = load_calibration(sim_bag).camera('front')
    rng = np.random.default_rng(4)
    points = np.zeros(2000, dtype=[(c, 'f4') for c in 'xyz'])
    points['x'], points['y'], points['z'] = (rng.uniform(5, 20, 2000), rng.uniform(-4, 4, 2000),
                                             rng.uniform(-1, 1, 2000))
    out_dir = tmp_path / 'pairs'
    params = _params(sim_bag, out_dir, image_transport='raw',
                     image_topic='/cameras/{camera}/image_raw', lidar_sync_offset_ms=0.0,
                     point_time_field='', **{'sync.partial_timeout_ms': 300.0})
    domain = unique_domain_id()
    with RosClient(domain) as client, processes() as procs:
        pub_cloud, pub_image, pub_info = _start_fed_node(client, procs, params, domain,
                                                         tmp_path / 'node.log')
        stamp = 5_000_000_000_000
        pub_info.publish(camera_info_from_calibration(cam, stamp + 10_000_000, t))
        pub_image.publish(array_to_image(np.zeros((cam.height, cam.width, 3), np.uint8), 'rgb8',
                                         stamp + 10_000_000, cam.frame_id, t))
        time.sleep(0.2)
        pub_cloud.publish(array_to_cloud(points, stamp, 'lidar', t))
        wait_for(lambda: out_dir.exists() and len(PairReader(str(out_dir))) == 1, 20,
                 'the partial pair', on_fail=lambda: procs[0].output()[-3000:])
        assert procs[0].returncode is None
    pair = PairReader(str(out_dir))[0]
    assert pair.lidar_stamp_ns == stamp and pair.camera_names == ['front']
    assert pair.xyz.shape == (2000, 3)


def test_collect_pairs_from_bag_runs_the_node_over_a_bag(tmp_path, sim_bag, monkeypatch):
    from cmkd_ros.tools.evaluate_bag import collect_pairs_from_bag
    from ros_utils import BASE_ENV
    for key, value in ros_env(unique_domain_id()).items():
        if key in BASE_ENV or key == 'ROS_DOMAIN_ID':
            monkeypatch.setenv(key, value)
    monkeypatch.delenv('ROS_LOCALHOST_ONLY', raising=False)
    out_dir = tmp_path / 'pairs'
    count = collect_pairs_from_bag(str(sim_bag), str(out_dir), rate=0.5,
                                   log=str(tmp_path / 'node.log'))
    reader = PairReader(str(out_dir))
    assert count == len(reader) == 4
    assert all(pair.ego_poses is not None for pair in reader)     # odometry was used


@pytest.mark.parametrize('params,message', [
    ({'overlay.camera': 'back'}, "overlay.camera: 'back' is not one of ['front', 'front_left']"),
    ({'cameras': ['back']}, "no camera named 'back'"),
    ({'calibration_file': '', 'tf.bag': '/no/such/bag'}, '/no/such/bag is not a rosbag2 folder'),
    ({'calibration_file': ''}, 'calibration_file: a rig calibration YAML is required, unless '
                               'tf.bag names a bag'),
    ({'calibration_file': '', 'cameras': ['front'], 'use_camera_info': False},
     'calibration_file: a rig calibration YAML is required'),
    ({'tf.max_angle_deg': 0.0}, 'tf.max_angle_deg: 0.0 must be > 0.0'),
    ({'cameras': ['front'], 'sync.slop_ms': -3.0}, 'sync.slop_ms: -3.0 must be > 0.0'),
    ({'cameras': ['front'], 'record.enabled': True}, 'record.output_dir: required'),
])
def test_collect_node_rejects_invalid_parameters_at_startup(tmp_path, sim_bag, params, message):
    proc = RosProcess(node_command(COLLECT, {'calibration_file': str(sim_bag /
                                                                     'calibration.yaml'),
                                             **params}),
                      ros_env(unique_domain_id()), tmp_path / 'node.log')
    try:
        assert proc.wait(timeout=30) == 2
    finally:
        proc.stop()
    assert message in proc.output()


def test_collect_node_recording_switched_on_at_runtime(tmp_path, sim_bag):
    from ros_utils import set_parameters
    out_dir = tmp_path / 'pairs'
    domain = unique_domain_id()
    params = _params(sim_bag, out_dir)
    params['record.enabled'] = False
    with RosClient(domain) as client, processes() as procs:
        procs.append(RosProcess(node_command(COLLECT, params,
                                             {'~/input/pointcloud': '/lidar/points'}),
                                ros_env(domain), tmp_path / 'node.log'))
        replay = _replay(sim_bag, domain, tmp_path / 'replay1.log', '--rate', '0.5')
        assert replay.wait(timeout=60) == 0, replay.output()
        replay.stop()
        time.sleep(1.0)
        assert not out_dir.exists()                       # recording off: nothing written
        bad = set_parameters(client, '/collect_node', {'record.min_interval_s': -1.0})
        assert not bad[0].successful and 'record.min_interval_s' in bad[0].reason
        ok = set_parameters(client, '/collect_node', {'record.enabled': True})
        assert ok[0].successful
        replay = _replay(sim_bag, domain, tmp_path / 'replay2.log', '--rate', '0.5')
        assert replay.wait(timeout=60) == 0, replay.output()
        replay.stop()
        wait_for(lambda: out_dir.exists() and len(PairReader(str(out_dir))) == 4, 20,
                 '4 pairs after switching recording on', on_fail=procs[0].output)


def test_collect_node_takes_the_extrinsics_from_a_bag_tf(tmp_path, sim_bag):
    """No calibration file: the rig is the bag's /tf_static and CameraInfo (cameras: all)."""
    out_dir = tmp_path / 'pairs'
    domain = unique_domain_id()
    params = _params(sim_bag, out_dir, calibration_file='', **{'tf.bag': str(sim_bag)})
    del params['cameras']
    with RosClient(domain), processes() as procs:
        procs.append(RosProcess(node_command(COLLECT, params,
                                             {'~/input/pointcloud': '/lidar/points'}),
                                ros_env(domain), tmp_path / 'node.log'))
        procs.append(_replay(sim_bag, domain, tmp_path / 'replay.log', '--rate', '0.5'))
        assert procs[1].wait(timeout=60) == 0, procs[1].output()
        wait_for(lambda: out_dir.exists() and len(PairReader(str(out_dir))) == 4, 20, '4 pairs',
                 on_fail=procs[0].output)
    simulated = RigCalibration.load(str(sim_bag / 'calibration.yaml'))
    for pair in PairReader(str(out_dir)):
        assert pair.camera_names == CAMERAS
        for name in CAMERAS:
            cam, ref = pair.calibration.camera(name), simulated.camera(name)
            assert np.abs(cam.T_cam_lidar - ref.T_cam_lidar).max() < 1e-9
            assert cam.frame_id == ref.frame_id == f'{name}_camera_optical_frame'


def test_collect_node_warns_once_per_camera_when_file_and_tf_disagree(tmp_path, sim_bag):
    import dataclasses
    rig = RigCalibration.load(str(sim_bag / 'calibration.yaml'))
    moved = np.eye(4)                                     # 2 deg about the camera's y axis,
    moved[[0, 0, 2, 2], [0, 2, 0, 2]] = [np.cos(0.0349066), np.sin(0.0349066),
                                         -np.sin(0.0349066), np.cos(0.0349066)]
    moved[:3, 3] = [0.03, 0.0, 0.04]                      # 5 cm elsewhere
    front = rig.camera('front')
    shifted = dataclasses.replace(front, T_cam_lidar=moved @ front.T_cam_lidar)
    RigCalibration((shifted, rig.camera('front_left')), rig.lidar_frame).save(
        str(tmp_path / 'rig.yaml'))
    proc = RosProcess(node_command(COLLECT, {'calibration_file': str(tmp_path / 'rig.yaml'),
                                             'tf.bag': str(sim_bag)}),
                      ros_env(unique_domain_id()), tmp_path / 'node.log')
    try:
        wait_for(lambda: 'collecting 2 camera(s)' in proc.output(), 30, 'the node started',
                 on_fail=proc.output)
    finally:
        proc.stop()
    lines = [line for line in proc.output().splitlines() if 'disagree' in line]
    assert len(lines) == 1, proc.output()
    assert lines[0].startswith('[WARN]')
    assert (f"camera 'front': calibration_file and the TF of {sim_bag} disagree by 2.00 deg and "
            '5.0 cm (T_cam_lidar); using calibration_file') in lines[0]


def test_collect_node_without_file_or_bag_needs_tf2_ros_for_the_live_tf(tmp_path):
    """The live /tf_static path needs tf2_ros (not on PyPI): the node says so and exits."""
    import importlib.util
    proc = RosProcess(node_command(COLLECT, {'cameras': ['front']}),
                      ros_env(unique_domain_id()), tmp_path / 'node.log')
    try:
        if importlib.util.find_spec('tf2_ros') is None:
            assert proc.wait(timeout=30) == 2
            assert ('calibration_file and tf.bag are empty, so the extrinsics would come from '
                    'the live TF, but the live TF needs tf2_ros and tf2_msgs') in proc.output()
        else:                                             # a full ROS 2 install: it waits for TF
            wait_for(lambda: 'collecting 1 camera(s)' in proc.output(), 30, 'the node started')
    finally:
        proc.stop()

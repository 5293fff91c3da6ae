"""Segment node as a real process: fed by the replay tool, by hand-made bad input, parameters."""
import sys
import time

import numpy as np
import pytest

from cmkd_ros.classes import SYNTHETIC
from cmkd_ros.conversions import array_to_cloud, cloud_to_array, rclpy_types, stamp_ns
from cmkd_ros.pipelines.segment import unpack_rgb
from ros_utils import (RosClient, RosProcess, make_sim_bag, make_student_checkpoint, node_command,
                       predict_offline, processes, ros_env, set_parameters, unique_domain_id,
                       wait_for)

pytestmark = pytest.mark.ros  # ROS-facing: runs on every tested distro (scripts/test.sh)

SEGMENT = 'cmkd_ros.nodes.segment_node'
REMAPS = {'~/input/pointcloud': '/lidar/points', '~/output/pointcloud': '/labeled'}


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    return make_student_checkpoint(tmp_path_factory.mktemp('ckpt') / 'student.pt')


def _diag_values(diags, key):
    """Latest value of ``key`` in the segment node's /diagnostics statuses (None if absent)."""
    for _, msg in reversed(diags):
        for status in msg.status:
            if 'segment_node' in status.name:
                for kv in status.values:
                    if kv.key == key:
                        return kv.value
    return None


@pytest.mark.parametrize('pipeline,precision', [(True, 'float32'), (False, 'float32'),
                                                (True, 'bfloat16')],
                         ids=['pipelined', 'one_worker', 'bfloat16'])
def test_segment_node_labels_every_replayed_cloud(tmp_path, checkpoint, pipeline, precision):
    from sensor_msgs.msg import PointCloud2

    from cmkd_ros.bag import deserialize, read_messages
    from cmkd_ros.models.checkpoint import load_checkpoint
    bag = make_sim_bag(tmp_path / 'drive', frames=3)
    inputs = {}
    for topic, msgtype, _, raw in read_messages(bag, ['/lidar/points']):
        msg = deserialize(raw, msgtype)
        inputs[stamp_ns(msg)] = cloud_to_array(msg)
    domain = unique_domain_id()
    with RosClient(domain) as client, processes() as procs:
        out = client.collect(PointCloud2, '/labeled')
        procs.append(RosProcess(node_command(SEGMENT, {'checkpoint': str(checkpoint),
                                                       'pipeline': pipeline,
                                                       'precision': precision}, REMAPS),
                                ros_env(domain), tmp_path / 'node.log'))
        # the node skips inference while it sees no subscriber: let discovery finish first
        wait_for(lambda: client.node.count_publishers('/labeled') > 0, 40, 'segment node',
                 on_fail=procs[0].output)
        time.sleep(1.0)
        # 10x slower than recorded: one sweep per second, so even a loaded machine keeps up
        procs.append(RosProcess(
            [sys.executable, '-m', 'cmkd_ros.tools.cli', 'replay', str(bag), '--rate', '0.1',
             '--topics', '/lidar/points', '--wait-for', '/lidar/points', '--wait-timeout', '40'],
            ros_env(domain), tmp_path / 'replay.log'))
        assert procs[1].wait(timeout=60) == 0, procs[1].output()
        wait_for(lambda: len(out) >= 3, 10, '3 labeled clouds',
                 on_fail=lambda: procs[0].output()[-3000:])
    student, info = load_checkpoint(checkpoint)
    assert info['class_names'] == list(SYNTHETIC.names)
    by_stamp = {stamp_ns(m): m for _, m in out}
    assert sorted(by_stamp) == sorted(inputs)
    for stamp, arr in inputs.items():
        msg = by_stamp[stamp]
        assert msg.header.frame_id == 'lidar'
        labeled = cloud_to_array(msg)
        assert labeled.dtype.names == arr.dtype.names + ('class_id', 'probability', 'rgb')
        assert labeled.dtype['class_id'] == np.uint8 and labeled.dtype['rgb'] == np.float32
        assert labeled.shape == arr.shape and arr.shape[0] > 3000   # every point, same order
        for name in arr.dtype.names:
            np.testing.assert_array_equal(labeled[name], arr[name])
        ids = labeled['class_id'].astype(int)
        assert ids.max() < SYNTHETIC.num_classes            # all in range: nothing cropped
        assert np.all((labeled['probability'] > 0) & (labeled['probability'] <= 1))
        np.testing.assert_array_equal(unpack_rgb(labeled['rgb']), SYNTHETIC.colorize(ids))
        # the node's labels are the library's float32 prediction on the same points (bfloat16
        # rounds the activations: near-ties may flip, probabilities move by about 1e-3)
        pred, prob = predict_offline(student, arr)
        exact = precision == 'float32'
        assert np.mean(pred == ids) > (0.99 if exact else 0.97)
        np.testing.assert_allclose(prob, labeled['probability'], atol=1e-4 if exact else 0.03)


def _cloud(points, stamp, msg_types, fields=('x', 'y', 'z', 'intensity')):
    arr = np.zeros(points.shape[0], dtype=[(f, 'f4') for f in fields])
    for i, f in enumerate(fields):
        arr[f] = points[:, i]
    return array_to_cloud(arr, stamp, 'lidar', msg_types)


def test_segment_node_survives_bad_input_and_reports_it(tmp_path, checkpoint):
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import PointCloud2
    t = rclpy_types()
    rng = np.random.default_rng(1)
    good = rng.uniform(-10, 10, (200, 4)).astype(np.float32)
    domain = unique_domain_id()
    with RosClient(domain) as client, processes() as procs:
        out = client.collect(PointCloud2, '/labeled')
        diags = client.collect(DiagnosticArray, '/diagnostics')
        pub = client.node.create_publisher(PointCloud2, '/lidar/points', 10)
        procs.append(RosProcess(node_command(SEGMENT, {'checkpoint': str(checkpoint),
                                                       'max_points': 1000}, REMAPS),
                                ros_env(domain), tmp_path / 'node.log'))
        wait_for(lambda: pub.get_subscription_count() > 0 and
                 client.node.count_publishers('/labeled') > 0, 40, 'segment node',
                 on_fail=procs[0].output)
        time.sleep(0.5)

        def send_and_expect(msg, expect_output):
            stamp_good = stamp_ns(msg) + 1
            pub.publish(msg)
            time.sleep(0.3)
            pub.publish(_cloud(good, stamp_good, t))          # the node still answers
            wait_for(lambda: any(stamp_ns(m) == stamp_good for _, m in out), 20,
                     'output after bad input', on_fail=procs[0].output)
            got = [m for _, m in out if stamp_ns(m) == stamp_ns(msg)]
            assert bool(got) == expect_output
            return got

        base = 2_000_000_000_000_000_000
        no_xyz = _cloud(good[:, :3], base, t, fields=('a', 'b', 'c'))
        send_and_expect(no_xyz, False)
        bad_step = _cloud(good, base + 10, t)
        bad_step.point_step = 8                               # fields end past the point
        send_and_expect(bad_step, False)
        with_nan = good.copy()
        with_nan[:20, 0] = np.nan
        got = send_and_expect(_cloud(with_nan, base + 20, t), True)
        labeled = cloud_to_array(got[0])
        assert labeled.shape == (200,)
        assert np.all(labeled['class_id'][:20] == 255) and np.all(labeled['class_id'][20:] < 12)
        got = send_and_expect(_cloud(good[:0], base + 30, t), True)   # empty in, empty out
        assert got[0].width * got[0].height == 0
        send_and_expect(_cloud(good, base - 10_000_000_000, t), True)  # stamp backwards
        organized = array_to_cloud(cloud_to_array(_cloud(good, 0, t)).reshape(10, 20),
                                   base + 40, 'lidar', t)
        got = send_and_expect(organized, True)                # organized in, organized out
        assert (got[0].height, got[0].width) == (10, 20)
        # more points than max_points: skipped unread, the next cloud is labeled at once
        big = np.random.default_rng(4).uniform(-10, 10, (1001, 4)).astype(np.float32)
        send_and_expect(_cloud(big, base + 50, t), False)
        send_and_expect(_cloud(big[:1000], base + 60, t), True)         # the bound itself
        # x with count 3: skipped with a clear message (was a numpy broadcast error)
        wide = _cloud(good, base + 70, t)
        wide.fields[0].count = 3
        wide.fields = wide.fields[:3]
        send_and_expect(wide, False)
        # (bad_layout was logged for point_step 8 moments ago: the status message tells this one)
        count_3 = ("bad_layout: cloud skipped: field 'x' has count 3: x, y and z must each "
                   "have count 1")
        wait_for(lambda: any(s.message == count_3 for _, m in diags for s in m.status), 5,
                 'the status message of x with count 3')
        # integer coordinates: labeled, with a warning; 1e30 m: 255, no numpy overflow
        uint8 = np.zeros(200, dtype=[('x', 'u1'), ('y', 'u1'), ('z', 'u1')])
        for c in 'xyz':
            uint8[c] = np.random.default_rng(5).integers(0, 30, 200)
        got = send_and_expect(array_to_cloud(uint8, base + 80, 'lidar', t), True)
        assert np.all(cloud_to_array(got[0])['class_id'] < 12)
        huge = good.copy()
        huge[:10, 0] = 1e30
        got = send_and_expect(_cloud(huge, base + 90, t), True)
        labeled = cloud_to_array(got[0])
        assert np.all(labeled['class_id'][:10] == 255) and np.all(labeled['class_id'][10:] < 12)
        keys = ('missing_xyz', 'bad_layout', 'nan_points', 'empty_cloud', 'stamp_backwards',
                'too_many_points', 'integer_xyz')
        wait_for(lambda: all(_diag_values(diags, k) for k in keys), 5, 'diagnostics counters',
                 on_fail=lambda: str(diags[-1][1] if diags else None))
        assert [int(_diag_values(diags, k)) for k in keys] == [1, 2, 1, 1, 1, 1, 1]
        assert procs[0].returncode is None                    # still running
    log = procs[0].output()
    assert "no field(s) ['x', 'y', 'z']" in log and 'point_step 8' in log   # names the problem
    assert 'cloud of 1001 points (1001 x 1) skipped unread: more than max_points (1000)' in log
    assert 'x uint8, y uint8, z uint8' in log
    assert 'overflow' not in log and 'Traceback' not in log


def test_segment_node_parameters_are_validated(tmp_path, checkpoint):
    domain = unique_domain_id()
    # invalid at startup: exits with a message naming the parameter
    proc = RosProcess(node_command(SEGMENT, {'checkpoint': str(checkpoint), 'range_max': -1.0}),
                      ros_env(domain), tmp_path / 'bad.log')
    try:
        assert proc.wait(timeout=60) == 2
    finally:
        proc.stop()
    assert 'range_max' in proc.output()
    proc = RosProcess(node_command(SEGMENT, {'checkpoint': str(tmp_path / 'missing.pt')}),
                      ros_env(domain), tmp_path / 'missing.log')
    try:
        assert proc.wait(timeout=60) == 2
    finally:
        proc.stop()
    assert 'checkpoint not found' in proc.output()
    # at runtime: a valid change is taken, an invalid or read-only one refused with a reason
    from diagnostic_msgs.msg import DiagnosticArray
    from rcl_interfaces.srv import DescribeParameters
    from sensor_msgs.msg import PointCloud2
    with RosClient(domain) as client, processes() as procs:
        diags = client.collect(DiagnosticArray, '/diagnostics')
        pub = client.node.create_publisher(PointCloud2, '/segment_node/input/pointcloud', 10)
        procs.append(RosProcess(node_command(SEGMENT, {'checkpoint': str(checkpoint)}),
                                ros_env(domain), tmp_path / 'node.log'))
        ok = set_parameters(client, '/segment_node', {'range_max': 50.0}, timeout=40)
        assert ok[0].successful
        bad = set_parameters(client, '/segment_node', {'range_min': 60.0})
        assert not bad[0].successful and 'range_max' in bad[0].reason
        bad = set_parameters(client, '/segment_node', {'classes': ['car', 'dragon']})
        assert not bad[0].successful and 'dragon' in bad[0].reason
        ro = set_parameters(client, '/segment_node', {'checkpoint': 'other.pt'})
        assert not ro[0].successful
        # descriptions and bounds as `ros2 param describe` shows them
        cli = client.node.create_client(DescribeParameters, '/segment_node/describe_parameters')
        assert cli.wait_for_service(timeout_sec=10)
        future = cli.call_async(DescribeParameters.Request(names=['range_max', 'checkpoint']))
        wait_for(future.done, 10, 'describe_parameters')
        rng, ckpt = future.result().descriptors
        assert 'farther than this' in rng.description and rng.additional_constraints == '> 0.0'
        assert ckpt.read_only and not rng.read_only
        # nobody subscribes to the output: no inference, counted
        rng_pts = np.random.default_rng(3).uniform(-5, 5, (100, 4)).astype(np.float32)
        for i in range(3):
            pub.publish(_cloud(rng_pts, 10 + i, rclpy_types()))
            time.sleep(0.1)
        wait_for(lambda: _diag_values(diags, 'skipped_no_subscriber') == '3', 10,
                 'skipped_no_subscriber = 3')
        assert _diag_values(diags, 'processed') is None


def test_without_diagnostic_msgs_counters_are_logged(tmp_path, checkpoint):
    from sensor_msgs.msg import PointCloud2
    t = rclpy_types()
    # a Python where diagnostic_msgs cannot be imported (as on a minimal install)
    launcher = ("import sys; sys.modules['diagnostic_msgs'] = None; "
                "sys.modules['diagnostic_msgs.msg'] = None; "
                "from cmkd_ros.nodes.segment_node import main; main()")
    cmd = [sys.executable, '-c', launcher] + node_command(SEGMENT, {
        'checkpoint': str(checkpoint), 'always_process': True})[3:]
    domain = unique_domain_id()
    with RosClient(domain) as client, processes() as procs:
        pub = client.node.create_publisher(PointCloud2, '/segment_node/input/pointcloud', 10)
        procs.append(RosProcess(cmd, ros_env(domain), tmp_path / 'node.log'))
        wait_for(lambda: pub.get_subscription_count() > 0, 40, 'segment node',
                 on_fail=procs[0].output)
        time.sleep(1.0)                                  # discovery on the node's side too
        pub.publish(_cloud(np.zeros((10, 3), np.float32), 5, t, fields=('a', 'b', 'c')))
        wait_for(lambda: 'missing_xyz=1' in procs[0].output(), 15, 'logged counters',
                 on_fail=procs[0].output)
    assert 'diagnostic_msgs is not importable' in procs[0].output()


def test_points_at_1e30_m_are_cropped_without_numpy_warnings():
    import warnings

    from cmkd_ros.pipelines.segment import SegmentNodeConfig, select_points
    points = np.zeros(4, dtype=[(c, 'f4') for c in 'xyz'])
    points['x'] = [1.0, 1e30, -3e38, 2.0]
    with warnings.catch_warnings():
        warnings.simplefilter('error')                   # was: overflow in the float32 norm
        xyz, rows, intensity = select_points(points, SegmentNodeConfig(checkpoint='s.pt'))
    np.testing.assert_array_equal(rows, [0, 3])
    np.testing.assert_array_equal(intensity, [0, 0])


def test_precision_parameter_is_validated():
    from cmkd_ros.config import ConfigError, build
    from cmkd_ros.pipelines.segment import SegmentNodeConfig
    from cmkd_ros.models import PRECISIONS
    from cmkd_ros.config import PRECISION_CHOICES
    assert PRECISION_CHOICES == tuple(PRECISIONS) + ('auto',)  # the torch-free copy
    base = {'checkpoint': 'student.pt'}
    assert build(SegmentNodeConfig, {**base, 'precision': 'bfloat16'}).precision == 'bfloat16'
    assert build(SegmentNodeConfig, {**base, 'precision': 'float16',
                                     'device': 'cuda'}).precision == 'float16'
    with pytest.raises(ConfigError, match='float16 needs a CUDA device'):
        build(SegmentNodeConfig, {**base, 'precision': 'float16'})
    with pytest.raises(ConfigError, match='precision'):
        build(SegmentNodeConfig, {**base, 'precision': 'half'})


def test_precision_auto_takes_bfloat16_only_where_the_cpu_has_it(checkpoint, monkeypatch):
    import torch
    from cmkd_ros.config import build
    from cmkd_ros.models import fast_bfloat16
    from cmkd_ros.pipelines.segment import SegmentNodeConfig
    from cmkd_ros.pipelines.segment import load_predictor
    assert build(SegmentNodeConfig, {'checkpoint': 'student.pt'}).precision == 'auto'
    predictor, _ = load_predictor(str(checkpoint), 'cpu', precision='auto')
    assert predictor.precision == ('bfloat16' if fast_bfloat16('cpu') else 'float32')
    for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    predictor, _ = load_predictor(str(checkpoint), 'cpu', precision='auto')
    assert predictor.precision == 'float32'
    ids, prob = predictor(np.random.default_rng(0).uniform(-20, 20, (500, 3)).astype(np.float32),
                          np.zeros(500, np.float32))
    assert len(ids) == 500 and np.all((np.asarray(prob) > 0) & (np.asarray(prob) <= 1))


def test_network_threads_by_cores_and_precision(monkeypatch):
    import os
    from cmkd_ros.pipelines.segment import network_threads
    assert network_threads(3, True) == 3 and network_threads(3, False) == 3   # as asked
    assert network_threads(0, False) == 0                                      # torch's default
    cases = {  # cores: (float32, bfloat16) network threads
        1: (1, 1),
        2: (2, 1),   # float32 takes both of two cores, 16 bits leaves one to the preparing
        3: (2, 2),
        8: (7, 7)}
    for cores, expected in cases.items():
        monkeypatch.setattr(os, 'sched_getaffinity', lambda pid, n=cores: set(range(n)),
                            raising=False)
        assert (network_threads(0, True, 'float32'),
                network_threads(0, True, 'bfloat16')) == expected, cores

"""Fuzzed PointCloud2 layouts and values: the nodes' cloud handling never fails but cleanly.

Random fields (names, offsets, datatypes, counts, duplicates), sizes, steps, byte orders, data
lengths and values (NaN, inf, 1e30, integers) go (1) through the nodes' cloud intake and
pipelines (``cmkd_ros.pipelines``), which report what they cannot use and never raise, and (2)
to real segment and collect node processes, which must keep running and keep answering good
input. Budget: ``CMKD_FUZZ_CASES``
clouds for the library part (default 400) and a tenth of it per node (default 40).
"""
import os
import time
import warnings

import numpy as np
import pytest

from cmkd_ros.classes import SYNTHETIC
from cmkd_ros.conversions import (POINTFIELD_DTYPES, array_to_cloud, cloud_to_array,
                                  rclpy_types, stamp_ns)
from ros_utils import (RosClient, RosProcess, make_sim_bag, make_student_checkpoint,
                       node_command, processes, ros_env, unique_domain_id, wait_for)

CASES = int(os.environ.get('CMKD_FUZZ_CASES', '400'))
NODE_CASES = max(5, CASES // 10)
MAX_POINTS = 5000
NAMES = ('x', 'y', 'z', 'intensity', 'ring', 'time', 'rgb', 'class_id', '', 'a', 'x')
SPECIAL = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, 1e-40, 255.0], np.float64)


def random_cloud(rng, t, stamp):
    """A PointCloud2 with a random layout: consistent (decodable) about half of the time, else
    with a random flaw (datatype, count, offsets, steps, sizes, data length)."""
    sound = rng.random() < 0.5
    names = list(rng.choice(NAMES, size=rng.integers(0, 7), replace=not sound))
    if sound or rng.random() < 0.5:
        names = ['x', 'y', 'z'] + [n for n in names if n not in ('x', 'y', 'z', '')]
    fields, offset = [], 0
    for name in names:
        datatype = int(rng.choice([7, 7, 8, 1, 2, 3, 4, 5, 6] if sound else
                                  [7, 8, 2, 0, 9, 255]))
        count = int(rng.choice([1, 1, 1, 1, 2, 3] if sound else [1, 0, 3, 2 ** 31]))
        size = np.dtype(POINTFIELD_DTYPES.get(datatype, np.uint8)).itemsize * max(1, count)
        fields.append(t.PointField(name=str(name), offset=int(offset), datatype=datatype,
                                   count=count))
        offset += (size if size < 64 else 4) + int(rng.choice([0, 0, 1, 3]))
        if not sound and rng.random() < 0.2:
            offset = int(rng.integers(0, 40))                 # overlapping / unaligned
    point_step = offset + int(rng.choice([0, 0, 2, 8]))
    height = int(rng.choice([1, 1, 1, 2, 7]))
    width = int(rng.choice([0, 1, 13, 300, 600]))
    row_step = width * point_step + int(rng.choice([0, 0, 4]))
    if not sound:                                           # one or more flaws
        if rng.random() < 0.3:
            point_step = int(rng.integers(0, 64))
        if rng.random() < 0.3:
            height, width = int(rng.choice([0, 1, 3])), int(rng.choice(
                [MAX_POINTS + 1, 2 ** 31, 2 ** 32 - 1, 5]))
        if rng.random() < 0.3:
            row_step = max(0, width * point_step - int(rng.integers(1, 8)))
    need = max(0, (height - 1) * row_step + width * point_step)
    length = need if sound or rng.random() < 0.5 else int(rng.integers(0, need + 40))
    length = min(length, 2_000_000)
    data = rng.integers(0, 256, length, dtype=np.uint8)
    big = bool(rng.random() < 0.2)
    for f in fields:                                          # special float values
        itemsize = {7: 4, 8: 8}.get(f.datatype)
        if itemsize and f.count == 1 and rng.random() < 0.7:
            dt = np.dtype(f'{">" if big else "<"}f{itemsize}')
            n = min(width, 50)
            values = (rng.choice(SPECIAL, n) if rng.random() < 0.5 else
                      rng.uniform(-80, 80, n)).astype(dt)
            for i in range(n):
                start = int(f.offset) + i * point_step
                if start + itemsize <= length:
                    data[start:start + itemsize] = np.frombuffer(values[i:i + 1].tobytes(),
                                                                 np.uint8)
    msg = t.PointCloud2(height=height, width=width, fields=fields, is_bigendian=big,
                        point_step=point_step, row_step=row_step, data=data.tobytes(),
                        is_dense=bool(rng.random() < 0.5))
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp), 1_000_000_000)
    msg.header.frame_id = 'lidar'
    return msg


def test_fuzzed_clouds_decode_label_and_encode_or_fail_with_a_conversion_error():
    from cmkd_ros.calibration import CameraCalibration, RigCalibration
    from cmkd_ros.config import build
    from cmkd_ros.pipelines.collect import (CameraSample, CollectNodeConfig, CollectPipeline,
                                            SyncedInputs)
    from cmkd_ros.pipelines.intake import CountingReport, decode_cloud, oversized_cloud
    from cmkd_ros.pipelines.segment import SegmentNodeConfig, segment_array

    def predictor(xyz, intensity):
        assert xyz.shape == (intensity.shape[0], 3) and np.isfinite(xyz).all()
        return np.full(len(xyz), 3), np.full(len(xyz), 0.5)

    config = build(SegmentNodeConfig, {'checkpoint': 's.pt', 'max_points': MAX_POINTS})
    T_cam_lidar = np.array([[0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    RIG = RigCalibration((CameraCalibration('front', 64, 48, K=[[50, 0, 32], [0, 50, 24],
                                                                 [0, 0, 1]],
                                            T_cam_lidar=T_cam_lidar),))
    COLLECT = build(CollectNodeConfig, {'calibration_file': 'rig.yaml'})
    # the overrides a user would set for a scan pattern the sweep does not show
    EXPERT = build(CollectNodeConfig, {'calibration_file': 'rig.yaml', 'correspondence': {
        'occlusion_azimuth_step_deg': 0.2, 'occlusion_beam_spacing_deg': 1.0}})
    t = rclpy_types()
    rng = np.random.default_rng(int(os.environ.get('CMKD_FUZZ_SEED', '0')))
    outcomes = {'skipped_large': 0, 'rejected': 0, 'labeled': 0, 'paired': 0}
    for case in range(CASES):
        msg = random_cloud(rng, t, case)
        if oversized_cloud(msg, config.max_points):
            outcomes['skipped_large'] += 1
            continue
        report = CountingReport()
        with warnings.catch_warnings():
            warnings.simplefilter('error')                   # no numpy warnings either
            points = decode_cloud(msg, report, 'skipped')    # the nodes' intake
            if points is None:
                assert set(report.counters) <= {'missing_xyz', 'bad_layout'}, case
                outcomes['rejected'] += 1
                continue
            labeled = segment_array(points, predictor, SYNTHETIC, config)
            back = cloud_to_array(array_to_cloud(labeled, stamp_ns(msg), 'lidar', t))
            # what the collect node does with it: its pipeline's sweep and pair, in memory
            inputs = SyncedInputs(stamp_ns(msg), points, RIG, {'front': CameraSample(
                'front', stamp_ns(msg), encoded=b'png', encoded_format='png')})
            sweep = CollectPipeline(COLLECT, report).sweep(inputs)
            if sweep is None and 'scan_pattern' in report.counters:
                sweep = CollectPipeline(EXPERT, report).sweep(inputs)
            if sweep is not None:
                CollectPipeline(COLLECT, report).pair(sweep).to_arrays()
                outcomes['paired'] += 1
        assert back.shape == (msg.height * msg.width,), case
        assert set(np.unique(back['class_id'])) <= {3, 255}, case
        outcomes['labeled'] += 1
    assert all(count > CASES // 20 for count in outcomes.values()), outcomes


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    return make_student_checkpoint(tmp_path_factory.mktemp('ckpt') / 'student.pt')


def _good_cloud(t, stamp, n=300):
    arr = np.zeros(n, dtype=[('x', 'f4'), ('y', 'f4'), ('z', 'f4'), ('intensity', 'f4')])
    rng = np.random.default_rng(stamp % 1000)
    arr['x'], arr['y'], arr['z'] = (rng.uniform(5, 20, n), rng.uniform(-4, 4, n),
                                    rng.uniform(-1, 1, n))
    return array_to_cloud(arr, stamp, 'lidar', t)


@pytest.mark.process
def test_segment_node_neither_dies_nor_stalls_on_fuzzed_clouds(tmp_path, checkpoint):
    from sensor_msgs.msg import PointCloud2
    t = rclpy_types()
    rng = np.random.default_rng(7)
    domain = unique_domain_id()
    with RosClient(domain) as client, processes() as procs:
        out = client.collect(PointCloud2, '/labeled')
        pub = client.node.create_publisher(PointCloud2, '/points', 10)
        procs.append(RosProcess(node_command(
            'cmkd_ros.nodes.segment_node', {'checkpoint': str(checkpoint),
                                            'max_points': MAX_POINTS},
            {'~/input/pointcloud': '/points', '~/output/pointcloud': '/labeled'}),
            ros_env(domain), tmp_path / 'node.log'))
        wait_for(lambda: pub.get_subscription_count() > 0 and
                 client.node.count_publishers('/labeled') > 0, 40, 'segment node',
                 on_fail=procs[0].output)
        time.sleep(0.5)
        stamp = 1_000_000_000
        for case in range(NODE_CASES):
            stamp += 1_000_000
            pub.publish(random_cloud(rng, t, stamp))
            time.sleep(0.02)
            if case % 10 == 9 or case == NODE_CASES - 1:       # still answering?
                stamp += 1_000_000
                good = stamp
                time.sleep(0.3)
                pub.publish(_good_cloud(t, good))
                wait_for(lambda: any(stamp_ns(m) == good for _, m in out), 20,
                         f'a labeled cloud after fuzz case {case}',
                         on_fail=lambda: procs[0].output()[-3000:])
        assert procs[0].returncode is None
    log = procs[0].output()
    assert 'Traceback' not in log and 'inference_error' not in log, log[-3000:]


@pytest.mark.process
def test_collect_node_neither_dies_nor_stalls_on_fuzzed_clouds(tmp_path_factory, tmp_path):
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2

    from cmkd_ros.bag import load_calibration
    from cmkd_ros.conversions import array_to_image, camera_info_from_calibration
    from cmkd_ros.pairs import PairReader
    bag = make_sim_bag(tmp_path_factory.mktemp('sim') / 'drive', frames=1, cameras=1)
    cam = load_calibration(bag).camera('front')
    t = rclpy_types()
    rng = np.random.default_rng(8)
    rgb = rng.integers(0, 255, (cam.height, cam.width, 3), dtype=np.uint8)
    out_dir = tmp_path / 'pairs'
    params = {'calibration_file': str(bag / 'calibration.yaml'), 'cameras': ['front'],
              'image_transport': 'raw', 'image_topic': '/cameras/{camera}/image_raw',
              'lidar_sync_offset_ms': 0.0, 'max_points': MAX_POINTS,
              'record.enabled': True, 'record.output_dir': str(out_dir)}
    domain = unique_domain_id()
    with RosClient(domain) as client, processes() as procs:
        pubs = (client.node.create_publisher(PointCloud2, '/lidar/points', 10),
                client.node.create_publisher(Image, '/cameras/front/image_raw', 10),
                client.node.create_publisher(CameraInfo, '/cameras/front/camera_info', 10))
        procs.append(RosProcess(node_command('cmkd_ros.nodes.collect_node', params,
                                             {'~/input/pointcloud': '/lidar/points'}),
                                ros_env(domain), tmp_path / 'node.log'))
        wait_for(lambda: all(p.get_subscription_count() for p in pubs), 30, 'collect node',
                 on_fail=procs[0].output)
        time.sleep(1.0)

        def send(cloud, stamp):
            pubs[2].publish(camera_info_from_calibration(cam, stamp, t))
            pubs[1].publish(array_to_image(rgb, 'rgb8', stamp, cam.frame_id, t))
            pubs[0].publish(cloud)

        def pairs():
            return len(PairReader(str(out_dir))) if (out_dir / 'index.jsonl').exists() else 0

        stamp = 1_000_000_000_000
        for case in range(NODE_CASES):
            stamp += 500_000_000                            # one synchronized set each
            send(random_cloud(rng, t, stamp), stamp)
            time.sleep(0.05)
            if case % 10 == 9 or case == NODE_CASES - 1:
                stamp += 500_000_000
                before = pairs()
                send(_good_cloud(t, stamp, 2000), stamp)
                wait_for(lambda: pairs() > before, 20, f'a pair after fuzz case {case}',
                         on_fail=lambda: procs[0].output()[-3000:])
        assert procs[0].returncode is None
    log = procs[0].output()
    assert 'Traceback' not in log and 'processing_error' not in log, log[-3000:]

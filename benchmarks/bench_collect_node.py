"""Collect node under load: one LiDAR and six cameras at 10 Hz into the real node process.

Publishes the nuScenes sample (``LIDAR_TOP.bin`` and the six 1600x900 JPEGs as
CompressedImage, with CameraInfo) with fresh stamps every 100 ms for ``--seconds`` to
``collect_node`` running as its own process with recording on (fsync per pair, as deployed),
then counts the pairs on disk: pairs written per second and dropped sets (published sweeps
without a pair). Reference measured in the same run: the library work per pair that the node
does (:class:`cmkd_ros.pipelines.collect.CollectPipeline` + ``PairWriter.write``) timed in this
process; the printed ratio is the node's time budget per set (100 ms) over that reference.
Goal: 0 dropped pairs.

With ``--odometry SPEED`` it also publishes odometry (the LiDAR driving at SPEED m/s): the node
then uses the sweep before in its occlusion test, about twice the work per set.

Usage: ``python benchmarks/bench_collect_node.py [--seconds 60] [--odometry 10] [--keep]``.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_segment_node import (DATA, BackgroundNode, bench_env, nuscenes_scan,  # noqa: E402
                                paced, percentiles, start_node, stop_node, wait_until)


def odometry_msgs(stamp_ns: int, speed: float) -> list:
    """nav_msgs/Odometry (T_world_lidar) every 10 ms from 60 ms before to 40 ms after
    ``stamp_ns``: the LiDAR driving along x at ``speed`` m/s (from the last whole 1e18 ns,
    where each phase of the benchmark starts its stamps: positions stay small)."""
    origin_ns = stamp_ns - stamp_ns % 10 ** 18
    from nav_msgs.msg import Odometry
    out = []
    for k in range(-6, 5):
        t = stamp_ns + k * 10_000_000
        msg = Odometry()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(t, 1_000_000_000)
        msg.header.frame_id = 'odom'
        msg.pose.pose.position.x = speed * (t - origin_ns) / 1e9
        msg.pose.pose.orientation.w = 1.0
        out.append(msg)
    return out


def library_reference(scan, rig, jpegs, out_dir: str, repeats: int,
                      speed: float = 0.0) -> list[float]:
    """ms per pair of the node's pipeline (CollectPipeline: sweep + pair) and PairWriter.write
    (fsync) in this process; with ``speed`` > 0 odometry too (the sweep before is used)."""
    from cmkd_ros.config import build
    from cmkd_ros.pairs import PairWriter
    from cmkd_ros.pipelines.collect import (CameraSample, CollectNodeConfig, CollectPipeline,
                                            SyncedInputs)
    from cmkd_ros.pipelines.intake import CountingReport
    pipeline = CollectPipeline(build(CollectNodeConfig, {'calibration_file': 'rig.yaml',
                                                          'use_odometry': speed > 0}),
                               CountingReport())
    writer = PairWriter(out_dir)
    times = []
    for i in range(repeats + 1):                # the first reads the scan pattern: warm-up
        start = time.perf_counter()
        stamp = (i + 1) * 100_000_000
        samples = {name: CameraSample(name, stamp + (k + 1) * 3_000_000, encoded=data,
                                      encoded_format='jpeg')     # as the node gets them
                   for k, (name, data) in enumerate(jpegs.items())}
        odometry = odometry_msgs(stamp, speed) if speed > 0 else ()
        sweep = pipeline.sweep(SyncedInputs(stamp, scan, rig, samples, odometry))
        writer.write(pipeline.pair(sweep))
        if i:
            times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seconds', type=float, default=60.0, help='timed phase (default 60)')
    parser.add_argument('--rate', type=float, default=10.0, help='sweeps per second (10)')
    parser.add_argument('--data', default=str(DATA / 'nuscenes_sample'))
    parser.add_argument('--out', default=None, help='folder for the datasets (default: temp)')
    parser.add_argument('--keep', action='store_true', help='keep the written pairs')
    parser.add_argument('--reference-repeats', type=int, default=5)
    parser.add_argument('--odometry', type=float, default=0.0, metavar='SPEED',
                        help='also publish odometry, the LiDAR driving at SPEED m/s (the node '
                        'then motion compensates and the occlusion test uses the sweep before); '
                        '0: none')
    args = parser.parse_args()

    from cmkd_ros.calibration import load_nuscenes_calibration
    from cmkd_ros.conversions import (array_to_cloud, camera_info_from_calibration,
                                      rclpy_types)
    data = pathlib.Path(args.data)
    rig = load_nuscenes_calibration(str(data / 'calibration.json'))
    scan = nuscenes_scan(data / 'LIDAR_TOP.bin')
    jpegs = {c.name: (data / f'{c.name}.jpg').read_bytes() for c in rig.cameras}
    tmp = args.out or tempfile.mkdtemp(prefix='bench_collect_')
    os.makedirs(tmp, exist_ok=True)
    calibration_file = os.path.join(tmp, 'rig.yaml')
    rig.save(calibration_file)
    print(f'{len(rig)} cameras {rig.names}, {sum(map(len, jpegs.values())) / 1e6:.2f} MB of '
          f'JPEG and {scan.shape[0]} points per set, {args.rate} Hz for {args.seconds:.0f} s')
    # 1. reference: the node's library work per pair, in this process
    reference = library_reference(scan, rig, jpegs, os.path.join(tmp, 'reference_pairs'),
                                  args.reference_repeats, args.odometry)
    print(f'library pipeline+write  {percentiles(reference)}')
    # 2. the node process
    out_dir = os.path.join(tmp, 'pairs')
    domain = os.getpid() % 90 + 10
    env = bench_env(domain)
    log_path = os.path.join(tmp, 'collect_node.log')
    proc = start_node('cmkd_ros.nodes.collect_node', {
        'calibration_file': calibration_file, 'cameras': rig.names,
        'image_topic': '/bench/{camera}/compressed',
        'camera_info_topic': '/bench/{camera}/camera_info', 'lidar_sync_offset_ms': 0.0,
        'point_time_field': '', 'record.enabled': True, 'record.output_dir': out_dir,
        'use_odometry': args.odometry > 0},
        {'~/input/pointcloud': '/bench/points', '~/input/odom': '/bench/odom'}, env, log_path)
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CameraInfo, CompressedImage, PointCloud2
    client = BackgroundNode('bench_collect')
    t = rclpy_types()
    qos = qos_profile_sensor_data
    pub_cloud = client.node.create_publisher(PointCloud2, '/bench/points', qos)
    if args.odometry > 0:
        from nav_msgs.msg import Odometry
        pub_odom = client.node.create_publisher(Odometry, '/bench/odom', qos)
    pubs = {c.name: (client.node.create_publisher(CompressedImage,
                                                  f'/bench/{c.name}/compressed', qos),
                     client.node.create_publisher(CameraInfo, f'/bench/{c.name}/camera_info',
                                                  qos)) for c in rig.cameras}
    cloud = array_to_cloud(scan, 1, rig.lidar_frame, t)
    images = {n: CompressedImage(format='jpeg', data=jpegs[n]) for n in rig.names}
    infos = {c.name: camera_info_from_calibration(c, 1, t) for c in rig.cameras}

    def set_stamp(msg, stamp):
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)

    def publish_set(stamp):
        if args.odometry > 0:                     # the poses around the sweep, before it
            for msg in odometry_msgs(stamp, args.odometry):
                pub_odom.publish(msg)
        set_stamp(cloud, stamp)
        pub_cloud.publish(cloud)
        for i, name in enumerate(rig.names):
            cam_stamp = stamp + (i + 1) * 3_000_000          # cameras 3..18 ms after the sweep
            for msg in (infos[name], images[name]):
                set_stamp(msg, cam_stamp)
                msg.header.frame_id = name
            pubs[name][1].publish(infos[name])
            pubs[name][0].publish(images[name])

    from cmkd_ros.pairs import PairReader
    stop = threading.Event()
    published: list[int] = []
    try:
        wait_until(lambda: pub_cloud.get_subscription_count() > 0 and all(
            p.get_subscription_count() > 0 for pair in pubs.values() for p in pair), 120,
            'the node', proc)
        time.sleep(1.0)
        # warm-up: sets until the first pair is on disk, then a clean dataset for the timing
        stamp = 1_000_000_000_000_000_000
        for _ in range(50):
            stamp += 100_000_000
            publish_set(stamp)
            time.sleep(0.2)
            if os.path.isdir(out_dir) and len(PairReader(out_dir)) >= 2:
                break
        time.sleep(1.0)
        warm = len(PairReader(out_dir)) if os.path.isdir(out_dir) else 0
        start_stamp = 2_000_000_000_000_000_000
        t0 = time.monotonic()
        for i in paced(args.rate, args.seconds, stop):
            stamp = start_stamp + i * 100_000_000
            publish_set(stamp)
            published.append(stamp)
        sent_s = time.monotonic() - t0
        drain_deadline = time.monotonic() + 30
        while time.monotonic() < drain_deadline:      # wait for the worker to catch up
            before = len(PairReader(out_dir))
            time.sleep(1.0)
            if len(PairReader(out_dir)) == before:
                break
    finally:
        stop.set()
        client.close()
        stop_node(proc)
    reader = PairReader(out_dir)
    timed = [e for e in reader.entries if e['lidar_stamp_ns'] >= start_stamp]
    stamps = {e['lidar_stamp_ns'] for e in timed}
    dropped = len([s for s in published if s not in stamps])
    written_s = (max(os.path.getmtime(os.path.join(out_dir, e['file'])) for e in timed) -
                 min(os.path.getmtime(os.path.join(out_dir, e['file'])) for e in timed)
                 if len(timed) > 1 else float('nan'))
    size_mb = sum(e['bytes'] for e in timed) / 1e6
    print(f'published {len(published)} sets in {sent_s:.1f} s; {len(timed)} pairs written '
          f'({warm} during warm-up not counted), {size_mb:.0f} MB')
    print(f'pairs per second: {len(timed) / max(sent_s, 1e-9):.2f} over the publishing time, '
          f'{(len(timed) - 1) / written_s if len(timed) > 1 else float("nan"):.2f} between '
          'first and last write')
    print(f'dropped sets: {dropped} ({dropped / max(1, len(published)):.1%})')
    ref = float(np.median(reference))
    print(f'ratio set period {1000 / args.rate:.0f} ms / library p50 {ref:.1f} ms = '
          f'{1000 / args.rate / ref:.2f} (headroom of the node per set)')
    print(f'goal: 0 dropped pairs -> {"met" if dropped == 0 else "NOT met"}')
    print(f'node log: {log_path}')
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.rmtree(os.path.join(tmp, 'reference_pairs'), ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())

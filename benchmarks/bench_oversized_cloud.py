"""What one oversized cloud costs the segment node: time, memory, and the wait of the next scan.

Starts ``segment_node`` as its own process (random small student, as
``bench_segment_node.py``), labels a few nuScenes-size scans (34,688 points), then publishes one
cloud of ``--points`` points (the nuScenes scan tiled, each point moved by up to 0.5 m; x, y, z
only: 24 MB at 2,000,000 points, as a 36 MB sample did not get through Fast DDS with the
project's 64 MB shared-memory profile) and 100 ms later a normal scan. Prints the node's
processing time of each scan after the big one (its ``~/debug/processing_time_ms``: the big
cloud's labeled output may itself be too large to arrive), how long the normal scan waited for
its label, and the node's resident memory before, at its peak (``VmHWM`` after resetting it
through ``/proc/PID/clear_refs``, which needs the same user or root) and after. With the default
``max_points`` (300,000) a 2,000,000-point cloud is skipped unread (warning
``too_many_points``); ``--max-points 0`` removes the bound, as before it existed.

Usage: ``python benchmarks/bench_oversized_cloud.py [--points 2000000] [--max-points N]
[--timeout 180]``.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_segment_node import (DATA, BackgroundNode, bench_env, make_checkpoint,  # noqa: E402
                                nuscenes_scan, start_node, stop_node, wait_until)


def status_kb(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` memory value (kB), e.g. VmRSS or VmHWM."""
    with open(f'/proc/{pid}/status', encoding='ascii') as fh:
        for line in fh:
            if line.startswith(key + ':'):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak(pid: int) -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where not allowed."""
    try:
        with open(f'/proc/{pid}/clear_refs', 'w', encoding='ascii') as fh:
            fh.write('5')
        return True
    except OSError:
        return False


def tiled(scan: np.ndarray, points: int) -> np.ndarray:
    """``points`` points x, y, z: copies of ``scan`` moved by up to 0.5 m (uniform, seeded), so
    that nearly every point lies in a voxel of its own (the costliest case per point)."""
    copies = -(-points // scan.shape[0])
    out = np.zeros(points, dtype=[(c, 'f4') for c in 'xyz'])
    jitter = np.random.default_rng(0).uniform(-0.5, 0.5, (points, 3)).astype(np.float32)
    for i, c in enumerate('xyz'):
        out[c] = np.concatenate([scan[c]] * copies)[:points] + jitter[:, i]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--points', type=int, default=2_000_000)
    parser.add_argument('--max-points', type=int, default=None,
                        help="the node's max_points (default: the node's default)")
    parser.add_argument('--timeout', type=float, default=180.0,
                        help='seconds to wait for the scan after the big cloud (default 180)')
    parser.add_argument('--scan', default=str(DATA / 'nuscenes_sample' / 'LIDAR_TOP.bin'))
    args = parser.parse_args()

    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import PointCloud2
    from std_msgs.msg import Float64

    from cmkd_ros.conversions import array_to_cloud, rclpy_types, stamp_ns
    tmp = tempfile.mkdtemp(prefix='bench_oversized_')
    checkpoint = make_checkpoint(os.path.join(tmp, 'student_small.pt'))
    scan = nuscenes_scan(pathlib.Path(args.scan))
    big = tiled(scan, args.points)
    env = bench_env(os.getpid() % 90 + 10)
    params = {'checkpoint': checkpoint, 'always_process': True}
    if args.max_points is not None:
        params['max_points'] = args.max_points
    log_path = os.path.join(tmp, 'segment_node.log')
    proc = start_node('cmkd_ros.nodes.segment_node', params,
                      {'~/input/pointcloud': '/bench/points',
                       '~/output/pointcloud': '/bench/labeled'}, env, log_path)
    client = BackgroundNode('bench_oversized')
    received: dict[int, float] = {}
    lock = threading.Lock()

    def on_output(msg):
        with lock:
            received[stamp_ns(msg)] = time.monotonic()

    client.node.create_subscription(PointCloud2, '/bench/labeled', on_output,
                                    qos_profile_sensor_data)
    processing: list[tuple[float, float]] = []              # (arrival, ms)
    client.node.create_subscription(
        Float64, '/segment_node/debug/processing_time_ms',
        lambda m: processing.append((time.monotonic(), m.data)), 100)
    pub = client.node.create_publisher(PointCloud2, '/bench/points', qos_profile_sensor_data)
    t = rclpy_types()
    normal = array_to_cloud(scan, 1, 'LIDAR_TOP', t)

    def send(msg, stamp: int) -> float:
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
        pub.publish(msg)
        return time.monotonic()

    try:
        wait_until(lambda: pub.get_subscription_count() > 0 and
                   client.node.count_publishers('/bench/labeled') > 0, 120, 'the node', proc)
        stamp = 1_000_000_000_000_000_000
        for _ in range(50):                               # warm-up: three labeled scans
            stamp += 100_000_000
            send(normal, stamp)
            time.sleep(0.3)
            with lock:
                if len(received) >= 3:
                    break
        time.sleep(1.0)
        rss_before = status_kb(proc.pid, 'VmRSS')
        peak_reset = reset_peak(proc.pid)
        big_msg = array_to_cloud(big, 1, 'LIDAR_TOP', t)
        big_stamp, next_stamp = stamp + 100_000_000, stamp + 200_000_000
        sent_big = send(big_msg, big_stamp)
        del big_msg
        time.sleep(0.1)
        sent_next = send(normal, next_stamp)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and proc.poll() is None:
            with lock:
                if next_stamp in received:
                    break
            time.sleep(0.02)
        time.sleep(1.0)
        alive = proc.poll() is None
        rss_peak = status_kb(proc.pid, 'VmHWM') if alive else None
        rss_after = status_kb(proc.pid, 'VmRSS') if alive else None
    finally:
        client.close()
        stop_node(proc)
    with lock:
        big_done, next_done = received.get(big_stamp), received.get(next_stamp)
    after = [ms for arrival, ms in processing if arrival > sent_big]
    bound = 'default' if args.max_points is None else args.max_points
    print(f'segment_node, max_points {bound}; big cloud {args.points} points '
          f'({big.nbytes / 1e6:.1f} MB), then a {scan.shape[0]}-point scan 100 ms later')
    print(f'scans processed after the big cloud was sent: {len(after)}, node processing '
          f'{", ".join(f"{ms / 1e3:.2f} s" for ms in after) or "-"}; big cloud\'s output '
          f'received: {f"after {big_done - sent_big:.1f} s" if big_done else "no"}')
    print(f'next scan labeled: '
          f'{"after %.2f s" % (next_done - sent_next) if next_done else "no (timed out)"}')
    print(f'node RSS: before {rss_before / 1024:.0f} MB, peak '
          f'{"%.0f MB" % (rss_peak / 1024) if rss_peak and peak_reset else "n/a"}, after '
          f'{"%.0f MB" % (rss_after / 1024) if rss_after else "n/a (node exited)"}')
    print(f'node still running: {"yes" if alive else "NO"}; log: {log_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

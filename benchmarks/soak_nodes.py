"""Soak: segment_node and collect_node fed a replayed bag at 10 Hz for minutes on end.

Renders a synthetic drive (``cmkd_ros.sim``: 32-beam LiDAR of about 33,000 points, ``--cameras``
JPEG cameras, odometry) once, then runs both nodes as their own processes (isolated ROS
domain, the project's Fast DDS profile) while ``cmkd replay --loop`` publishes the bag at its
recorded rate (the LiDAR at 10 Hz; time jumps back at each loop, as with a looping bag) for
``--minutes``. The segment node uses a randomly initialised small student (as
``bench_segment_node.py``); the collect node records a pair every ``--record-interval`` s of
stamp time, with odometry. Every 10 s the resident memory (``VmRSS``), open file descriptors
and threads of both processes are sampled. Printed: those figures after 1 minute and at the
end (goal: memory within 5 %, file descriptors and threads unchanged), its anonymous part (the
heap; the rest is libraries and Fast DDS shared memory), the memory each minute (with the scans
the segment node had processed), the scans published, labeled and dropped, and the collect
node's counters (sets synchronized and dropped, pairs written, failed writes). A node that
dies ends the run with its exit code. ``bench_pipeline_memory.py`` follows the segment
pipeline's memory scan by scan, without ROS.

Usage: ``python benchmarks/soak_nodes.py [--minutes 10] [--cameras 3] [--frames 100]
[--record-interval 1.0] [--keep]``.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_segment_node import (BackgroundNode, bench_env, make_checkpoint,  # noqa: E402
                                start_node, stop_node, wait_until)


def proc_figures(pid: int) -> dict:
    """Resident memory (MB: all, and its anonymous part, the heap; the rest is mapped
    libraries and the Fast DDS shared-memory segments), open file descriptors and threads of
    process ``pid``."""
    out = {'fds': len(os.listdir(f'/proc/{pid}/fd'))}
    names = {'VmRSS': 'rss_mb', 'RssAnon': 'anon_mb'}
    with open(f'/proc/{pid}/status', encoding='ascii') as fh:
        for line in fh:
            key, _, value = line.partition(':')
            if key in names:
                out[names[key]] = int(value.split()[0]) / 1024
            elif key == 'Threads':
                out['threads'] = int(value)
    return out


def render_bag(path: str, frames: int, cameras: int) -> None:
    """A synthetic drive: default LiDAR, ``cameras`` 640x360 JPEG cameras, odometry."""
    from cmkd_ros.config import build
    from cmkd_ros.sim.config import SimConfig
    from cmkd_ros.sim.export import export_bag
    from cmkd_ros.sim.simulator import SimWorld
    export_bag(SimWorld(build(SimConfig, {'seed': 11, 'cameras': {'count': cameras}})), path,
               frames, 'mcap', 'compressed')


def diag_values(statuses: dict, node: str) -> dict:
    """The latest /diagnostics key-values of ``node``, over all its statuses (the collect node
    publishes one for its counters and one per camera's calibration health)."""
    return dict(statuses.get(node, {}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--minutes', type=float, default=10.0, help='soak time (default 10)')
    parser.add_argument('--cameras', type=int, default=3, help='cameras of the drive (3)')
    parser.add_argument('--frames', type=int, default=100,
                        help='sweeps in the bag, replayed in a loop (default 100: 10 s)')
    parser.add_argument('--record-interval', type=float, default=1.0,
                        help="the collect node's record.min_interval_s (default 1.0)")
    parser.add_argument('--out', default=None, help='work folder (default: a temporary one)')
    parser.add_argument('--keep', action='store_true', help='keep the bag, logs and pairs')
    args = parser.parse_args()

    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import PointCloud2

    from cmkd_ros.bag import camera_topics
    from cmkd_ros.calibration import RigCalibration
    from cmkd_ros.pairs import PairReader
    work = args.out or tempfile.mkdtemp(prefix='soak_nodes_')
    os.makedirs(work, exist_ok=True)
    bag = os.path.join(work, 'drive')
    if not os.path.isdir(bag):
        print(f'rendering {args.frames} sweeps with {args.cameras} cameras to {bag} ...',
              flush=True)
        render_bag(bag, args.frames, args.cameras)
    names = list(RigCalibration.load(os.path.join(bag, 'calibration.yaml')).names)
    checkpoint = make_checkpoint(os.path.join(work, 'student_small.pt'))
    pairs_dir = os.path.join(work, 'pairs')
    shutil.rmtree(pairs_dir, ignore_errors=True)          # this run's pairs only
    env = bench_env(os.getpid() % 90 + 10)
    procs = {
        'segment_node': start_node(
            'cmkd_ros.nodes.segment_node', {'checkpoint': checkpoint},
            {'~/input/pointcloud': '/lidar/points', '~/output/pointcloud': '/labeled'}, env,
            os.path.join(work, 'segment_node.log')),
        'collect_node': start_node(
            'cmkd_ros.nodes.collect_node', {
                'calibration_file': os.path.join(bag, 'calibration.yaml'), 'cameras': names,
                'image_topic': camera_topics('{camera}')['compressed'], 'use_odometry': True,
                'record.enabled': True, 'record.output_dir': pairs_dir,
                'record.min_interval_s': args.record_interval},
            {'~/input/pointcloud': '/lidar/points', '~/input/odom': '/odom'}, env,
            os.path.join(work, 'collect_node.log'))}
    client = BackgroundNode('soak_nodes')
    lock = threading.Lock()
    counts = {'inputs': 0, 'labeled': 0}                # stamps repeat with each loop
    statuses: dict = {}

    def on_input(msg):
        with lock:
            counts['inputs'] += 1

    def on_labeled(msg):
        with lock:
            counts['labeled'] += 1

    def on_diagnostics(msg):
        with lock:
            for status in msg.status:
                statuses.setdefault(status.name.split(':')[0], {}).update(
                    (kv.key, kv.value) for kv in status.values)

    from diagnostic_msgs.msg import DiagnosticArray
    client.node.create_subscription(PointCloud2, '/lidar/points', on_input,
                                    qos_profile_sensor_data)
    client.node.create_subscription(PointCloud2, '/labeled', on_labeled,
                                    qos_profile_sensor_data)
    client.node.create_subscription(DiagnosticArray, '/diagnostics', on_diagnostics, 50)
    samples: list[tuple[float, dict]] = []

    def sample(elapsed: float) -> tuple[float, dict]:
        figures = {n: proc_figures(p.pid) for n, p in procs.items()}
        with lock:
            figures['segment_node']['processed'] = int(
                diag_values(statuses, 'segment_node').get('processed', 0))
        return elapsed, figures
    replay = None
    died = None
    try:
        wait_until(lambda: client.node.count_publishers('/labeled') > 0 and
                   client.node.count_subscribers('/lidar/points') >= 2, 120, 'the nodes')
        topics = ['/lidar/points', '/odom'] + [camera_topics(n)[k] for n in names
                                               for k in ('compressed', 'info')]
        replay_log = open(os.path.join(work, 'replay.log'), 'wb')
        replay = subprocess.Popen(
            [sys.executable, '-m', 'cmkd_ros.tools.cli', 'replay', bag, '--loop',
             '--topics', *topics,
             '--wait-for', '/lidar/points', *[camera_topics(n)['compressed'] for n in names]],
            env=env, stdout=replay_log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: counts['inputs'] > 0, 60, 'the replay')
        start = time.monotonic()
        end = start + args.minutes * 60
        while time.monotonic() < end:
            died = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
            if died:
                break
            samples.append(sample(time.monotonic() - start))
            time.sleep(min(10.0, max(0.0, end - time.monotonic())))
        if not died:
            samples.append(sample(time.monotonic() - start))
    finally:
        if replay is not None:
            stop_node(replay)
        time.sleep(2.0)                                  # outputs in flight
        with lock:
            final = {n: diag_values(statuses, n) for n in procs}
        client.close()
        for proc in procs.values():
            stop_node(proc)
    with lock:
        published, answered = counts['inputs'], counts['labeled']
    pairs = len(PairReader(pairs_dir)) if os.path.isdir(pairs_dir) else 0
    leftovers = [n for n in os.listdir(os.path.join(pairs_dir, 'pairs')) if n.startswith('.')] \
        if os.path.isdir(os.path.join(pairs_dir, 'pairs')) else []
    minute = min(samples, key=lambda s: abs(s[0] - 60.0)) if samples else None
    last = samples[-1] if samples else None
    print(f'soak {args.minutes:g} min: {len(names)} cameras, bag of {args.frames} sweeps at '
          f'10 Hz replayed in a loop; work folder {work}; load average at the end '
          + ' '.join(f'{v:.1f}' for v in os.getloadavg()))
    if died:
        print(f'NODE DIED: {died} (see the logs in {work})')
    if minute and last:
        print(f'{"process":14s} {"RSS @%.0fs" % minute[0]:>11s} {"RSS @%.0fs" % last[0]:>11s} '
              f'{"change":>8s} {"anon (heap)":>15s} {"fds":>9s} {"threads":>9s}')
        for name in procs:
            a, b = minute[1][name], last[1][name]
            change = (b['rss_mb'] - a['rss_mb']) / a['rss_mb']
            print(f'{name:14s} {a["rss_mb"]:9.0f}MB {b["rss_mb"]:9.0f}MB {change:+8.1%} '
                  f'{a["anon_mb"]:6.0f}->{b["anon_mb"]:<6.0f}MB '
                  f'{a["fds"]:4d}->{b["fds"]:<4d} {a["threads"]:4d}->{b["threads"]:<4d}')
        peak = {n: max(s[1][n]['rss_mb'] for s in samples) for n in procs}
        print('RSS peak: ' + ', '.join(f'{n} {v:.0f} MB' for n, v in peak.items()))
        for name in procs:                             # one sample a minute
            series = [s[1][name] for s in samples if int(s[0]) % 60 < 10 and s[0] >= 50]
            print(f'{name} RSS each minute (MB): '
                  + ', '.join(f'{f["rss_mb"]:.0f}' + (f' ({f["processed"]} scans)'
                                                      if 'processed' in f else '')
                              for f in series))
        growth = max(abs(last[1][n]['rss_mb'] - minute[1][n]['rss_mb']) /
                     minute[1][n]['rss_mb'] for n in procs)
        fds_same = all(last[1][n]['fds'] == minute[1][n]['fds'] for n in procs)
        print(f'goal: RSS within 5 % from 1 min to the end -> '
              f'{"met" if growth <= 0.05 else "NOT met"} (largest change {growth:.1%}); '
              f'open files {"unchanged" if fds_same else "CHANGED"}')
    seg, col = final['segment_node'], final['collect_node']
    missing = published - answered
    print(f'segment_node: {published} scans published, {answered} labeled, {missing} without '
          f'output ({missing / max(1, published):.1%}); node counters: processed '
          f'{seg.get("processed", "?")}, dropped '
          f'{seg.get("dropped", 0)}, stamp_backwards {seg.get("stamp_backwards", 0)}')
    print(f'collect_node: synchronized {col.get("synchronized", "?")}, pairs written '
          f'{col.get("pairs_written", 0)} (on disk {pairs}, every {args.record_interval:g} s of '
          f'stamp time), dropped_sets {col.get("dropped_sets", 0)}, sync_evicted '
          f'{col.get("sync_evicted", 0)}, write_failed {col.get("write_failed", 0)}, '
          f'processing_error {col.get("processing_error", 0)}; temporary files left '
          f'{len(leftovers)}')
    if not args.keep and not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if died else 0


if __name__ == '__main__':
    sys.exit(main())

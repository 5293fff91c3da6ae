"""Segment node under load: the nuScenes-size scan published at 10 Hz to the real node process.

Starts ``segment_node`` as its own process (isolated ROS domain, localhost discovery, the
project's Fast DDS shared-memory profile), publishes ``LIDAR_TOP.bin`` (34,688 points) with a
fresh stamp every 100 ms for ``--seconds``, and measures per scan the end-to-end latency (publish
in this process -> labeled cloud received in this process), the node's own processing time
(its ``~/debug/processing_time_ms``) and drops (scans without an output: the node keeps only the
newest scan). Reference measured in the same run: the pipeline the node runs on each decoded
scan (:class:`cmkd_ros.pipelines.segment.SegmentPipeline`, its stages one after the other)
timed in this process, so the printed ratio shows what ROS transport, message conversion and
the threads add. Goal: 0 drops, p95 <= 100 ms on 2 cores, also with another process keeping
one core busy (``--busy 1``).

Without ``--checkpoint`` a randomly initialised CPU real-time student is used (``small``, teacher
features D = 64, DA width 32, 0.1 m voxels, 16 classes; ``--set`` changes its StudentConfig,
e.g. ``--set voxel_size=0.2`` as the demo trains it): timing does not depend on the weights.

Usage: ``python benchmarks/bench_segment_node.py [--seconds 60] [--checkpoint CKPT]
[--threads 0] [--device cpu] [--precision auto|float32|bfloat16] [--no-pipeline] [--busy N]``.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                                    # run from a checkout
from cmkd_ros.openmp import openmp_defaults  # noqa: E402
openmp_defaults()                                   # as the nodes do, before torch loads
DATA = pathlib.Path(os.environ.get('CMKD_DATA_DIR', ROOT.parent / 'shared' / 'data'))

from cmkd_ros.nodes.background_node import BackgroundNode  # noqa: E402
from cmkd_ros.config import PRECISION_CHOICES  # noqa: E402


# ----------------------------------------------------------------------------- shared helpers

def bench_env(domain_id: int) -> dict:
    """Environment for the node process: isolated domain, localhost, SHM profile, this repo."""
    from cmkd_ros.nodes.ros_io import ensure_fastdds_profile
    env = dict(os.environ)
    env.update(ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
               RMW_IMPLEMENTATION=env.get('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp'),
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')]),
               PYTHONUNBUFFERED='1')
    env.setdefault('AMENT_PREFIX_PATH', sys.prefix)
    ensure_fastdds_profile(env)
    for key in ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE', 'RMW_IMPLEMENTATION',
                'AMENT_PREFIX_PATH'):
        os.environ[key] = env[key]
    ensure_fastdds_profile()
    return env


def start_node(module: str, params: dict, remaps: dict, env: dict, log_path: str):
    """``python -m module --ros-args ...`` in its own session; output to ``log_path``."""
    cmd = [sys.executable, '-m', module, '--ros-args']
    for key, value in params.items():
        if isinstance(value, bool):
            value = 'true' if value else 'false'
        elif isinstance(value, (list, tuple)):
            value = '[' + ','.join(map(str, value)) + ']'
        elif value == '':
            value = "''"
        cmd += ['-p', f'{key}:={value}']
    for src, dst in remaps.items():
        cmd += ['-r', f'{src}:={dst}']
    log = open(log_path, 'wb')
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_node(proc) -> None:
    from cmkd_ros.tools.evaluate_bag import stop_process
    stop_process(proc, timeout=10.0)


def wait_until(predicate, timeout: float, what: str, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f'node exited ({proc.returncode}) while waiting for {what}')
        if time.monotonic() > deadline:
            raise SystemExit(f'timed out after {timeout} s waiting for {what}')
        time.sleep(0.05)


def percentiles(values) -> str:
    if not len(values):
        return 'n/a'
    v = np.asarray(values, dtype=np.float64)
    return (f'p50 {np.percentile(v, 50):7.1f}  p95 {np.percentile(v, 95):7.1f}  '
            f'p99 {np.percentile(v, 99):7.1f}  max {v.max():7.1f} ms')


def paced(rate_hz: float, seconds: float, stop: threading.Event):
    """Yield tick indices at ``rate_hz`` for ``seconds`` (absolute schedule, no drift)."""
    period = 1.0 / rate_hz
    start = time.monotonic()
    i = 0
    while not stop.is_set() and i * period < seconds:
        delay = start + i * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield i
        i += 1


# ----------------------------------------------------------------------------- segment bench

def nuscenes_scan(path: pathlib.Path) -> np.ndarray:
    """LIDAR_TOP.bin as a structured array x, y, z, intensity (float32), ring (uint16)."""
    raw = np.fromfile(path, dtype=np.float32).reshape(-1, 5)
    arr = np.zeros(raw.shape[0], dtype=[('x', 'f4'), ('y', 'f4'), ('z', 'f4'),
                                        ('intensity', 'f4'), ('ring', 'u2')])
    for i, name in enumerate(('x', 'y', 'z', 'intensity')):
        arr[name] = raw[:, i]
    arr['ring'] = raw[:, 4].astype(np.uint16)
    return arr


RANDOM_STUDENT = {'arch': 'small', 'feature_dim': 64, 'da_width': 32, 'voxel_size': 0.1}


def make_checkpoint(path: str, overrides: list[str] = ()) -> str:
    """A randomly initialised student (:data:`RANDOM_STUDENT`, 16 classes, then ``key=value``
    overrides)."""
    import torch

    from cmkd_ros.classes import NUSCENES_LIDARSEG16
    from cmkd_ros.config import build, merge, parse_overrides
    from cmkd_ros.models.checkpoint import save_checkpoint
    from cmkd_ros.models.student import StudentConfig, build_student
    torch.manual_seed(0)
    config = build(StudentConfig, merge(RANDOM_STUDENT, parse_overrides(list(overrides))))
    if config.num_classes != 16:
        raise SystemExit('the random student labels the 16 nuScenes classes: keep num_classes')
    student = build_student(config)
    save_checkpoint(path, student, class_names=NUSCENES_LIDARSEG16.names,
                    class_colors=NUSCENES_LIDARSEG16.colors)
    return path


def library_reference(checkpoint: str, device: str, num_threads: int, pipeline: bool,
                      scan: np.ndarray, repeats: int, precision: str = 'float32') -> list[float]:
    """ms per call of the node's pipeline (SegmentPipeline, stages in turn) in this process.

    Run in a worker thread with the node's torch thread count, as the node runs it.
    """
    from cmkd_ros.pipelines.intake import CountingReport
    from cmkd_ros.pipelines.segment import SegmentNodeConfig, SegmentPipeline
    config = SegmentNodeConfig(checkpoint=checkpoint, device=device, precision=precision,
                               num_threads=num_threads, pipeline=pipeline)
    segment = SegmentPipeline(config, CountingReport())
    times: list[float] = []

    def work() -> None:
        import torch
        if segment.threads > 0:
            torch.set_num_threads(segment.threads)
        for i in range(repeats + 2):
            start = time.perf_counter()
            segment(scan)
            if i >= 2:                                           # two warm-up calls
                times.append((time.perf_counter() - start) * 1e3)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seconds', type=float, default=60.0, help='timed phase (default 60)')
    parser.add_argument('--rate', type=float, default=10.0, help='scans per second (10)')
    parser.add_argument('--checkpoint', default=None, help='student checkpoint (default: a '
                        'random small student)')
    parser.add_argument('--set', dest='overrides', action='append', default=[],
                        metavar='KEY=VALUE', help='StudentConfig of the random student, e.g. '
                        'use_da=false or feature_dim=64 (without --checkpoint)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=0,
                        help="the node's network threads (parameter num_threads; 0: its auto)")
    parser.add_argument('--precision', default='auto', choices=PRECISION_CHOICES,
                        help="the node's inference arithmetic (parameter precision)")
    parser.add_argument('--no-pipeline', dest='pipeline', action='store_false',
                        help="the node's single-worker mode (parameter pipeline:=false)")
    parser.add_argument('--scan', default=str(DATA / 'nuscenes_sample' / 'LIDAR_TOP.bin'))
    parser.add_argument('--reference-repeats', type=int, default=5)
    parser.add_argument('--busy', type=int, default=0,
                        help='processes that each keep one core busy (a spinning loop) during '
                        'the run, as planning or drivers would')
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix='bench_segment_')
    checkpoint = args.checkpoint or make_checkpoint(os.path.join(tmp, 'student_small.pt'),
                                                    args.overrides)
    scan = nuscenes_scan(pathlib.Path(args.scan))
    from cmkd_ros.models import resolve_precision
    from cmkd_ros.models.checkpoint import load_checkpoint
    from cmkd_ros.pipelines.segment import network_threads
    precision = resolve_precision(args.precision, args.device)
    threads = network_threads(args.threads, args.pipeline, precision)  # what the node uses
    student_config = load_checkpoint(checkpoint)[1]['config']
    print(f'student {student_config.arch}, D {student_config.feature_dim}, DA width '
          f'{student_config.da_width or student_config.feature_dim}, voxel '
          f'{student_config.voxel_size} m')
    print(f'scan {args.scan}: {scan.shape[0]} points; checkpoint {checkpoint}'
          f'{"" if args.checkpoint else " (random weights: timing only)"}; device '
          f'{args.device}, {precision} (precision '
          f'{args.precision}), {threads or "default"} network threads (num_threads '
          f'{args.threads}), '
          f'{"pipelined (2 worker threads)" if args.pipeline else "one worker thread"}')
    from cmkd_ros.sparse import native
    print(f'compiled sparse kernels: {native.status()}; load average '
          f'{os.getloadavg()[0]:.1f}; busy processes {args.busy}')
    busy = [subprocess.Popen([sys.executable, '-c', 'while True: pass'])
            for _ in range(args.busy)]
    try:
        return run(args, checkpoint, scan, threads, tmp)
    finally:
        for p in busy:
            p.kill()
            p.wait()


def run(args, checkpoint, scan, threads, tmp) -> int:
    """The timed part of :func:`main`."""
    from cmkd_ros.conversions import array_to_cloud, rclpy_types, stamp_ns
    # 1. reference: the library step alone, in this process
    reference = library_reference(checkpoint, args.device, args.threads, args.pipeline, scan,
                                  args.reference_repeats, args.precision)
    print(f'library SegmentPipeline {percentiles(reference)}')
    # 2. the node process and this process's publisher/subscriber
    domain = os.getpid() % 90 + 10
    env = bench_env(domain)
    log_path = os.path.join(tmp, 'segment_node.log')
    proc = start_node('cmkd_ros.nodes.segment_node',
                      {'checkpoint': checkpoint, 'device': args.device,
                       'num_threads': args.threads, 'pipeline': args.pipeline,
                       'precision': args.precision},
                      {'~/input/pointcloud': '/bench/points',
                       '~/output/pointcloud': '/bench/labeled'}, env, log_path)
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import PointCloud2
    from std_msgs.msg import Float64
    client = BackgroundNode('bench_segment')
    published: dict[int, float] = {}
    received: dict[int, float] = {}
    processing: list[float] = []
    lock = threading.Lock()

    def on_output(msg):
        now = time.monotonic()
        with lock:
            received[stamp_ns(msg)] = now
        assert msg.width == scan.shape[0]

    client.node.create_subscription(PointCloud2, '/bench/labeled', on_output,
                                    qos_profile_sensor_data)
    client.node.create_subscription(Float64, '/segment_node/debug/processing_time_ms',
                                    lambda m: processing.append(m.data), 1000)
    pipeline: list[float] = []
    client.node.create_subscription(Float64, '/segment_node/debug/pipeline_latency_ms',
                                    lambda m: pipeline.append(m.data), 1000)
    pub = client.node.create_publisher(PointCloud2, '/bench/points', qos_profile_sensor_data)
    msg = array_to_cloud(scan, 1, 'LIDAR_TOP', rclpy_types())
    stop = threading.Event()
    try:
        wait_until(lambda: pub.get_subscription_count() > 0 and
                   client.node.count_publishers('/bench/labeled') > 0, 120, 'the node', proc)
        # warm-up: a few scans until outputs flow
        stamp = 1_000_000_000_000_000_000
        for _ in range(30):
            stamp += 100_000_000
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
            pub.publish(msg)
            time.sleep(0.3)
            with lock:
                if len(received) >= 3:
                    break
        with lock:
            received.clear()
            processing.clear()
            pipeline.clear()
        # timed phase
        start_stamp = 2_000_000_000_000_000_000
        for i in paced(args.rate, args.seconds, stop):
            stamp = start_stamp + i * 100_000_000
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
            t = time.monotonic()
            pub.publish(msg)
            with lock:
                published[stamp] = t
        time.sleep(2.0)                                          # outputs in flight
    finally:
        stop.set()
        client.close()
        stop_node(proc)
    with lock:
        latency = [(received[s] - t) * 1e3 for s, t in published.items() if s in received]
        drops = len([s for s in published if s not in received])
    processing = processing[-len(latency):] if latency else processing
    pipeline = pipeline[-len(latency):] if latency else pipeline
    node_p50 = float(np.percentile(latency, 50)) if latency else float('nan')
    ref_p50 = float(np.median(reference))
    p95 = float(np.percentile(latency, 95)) if latency else float('nan')
    print(f'published {len(published)} scans in {args.seconds:.0f} s at {args.rate} Hz; '
          f'labeled {len(latency)}; dropped {drops} ({drops / max(1, len(published)):.1%})')
    print(f'end-to-end latency      {percentiles(latency)}')
    print(f'node processing         {percentiles(processing)}')
    print(f'node receipt -> publish  {percentiles(pipeline)}')
    pipe_p50 = float(np.percentile(pipeline, 50)) if pipeline else float('nan')
    print(f'ratio node processing p50 / library p50 = '
          f'{np.percentile(processing, 50) / ref_p50 if processing else float("nan"):.2f}; '
          f'DDS transport both ways (latency p50 - node receipt->publish p50) = '
          f'{node_p50 - pipe_p50:.1f} ms')
    print(f'goal: 0 drops -> {"met" if drops == 0 else "NOT met"}; p95 <= 100 ms -> '
          f'{"met" if p95 <= 100 else "NOT met"} ({p95:.1f} ms); load average '
          f'{os.getloadavg()[0]:.1f}')
    print(f'node log: {log_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

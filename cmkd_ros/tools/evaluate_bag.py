"""``cmkd evaluate-bag BAG --checkpoint CKPT``: score the real segment node on a rosbag2.

Starts ``segment_node`` as its own process, replays the bag's LiDAR topic into it with the bag's
timing (:class:`cmkd_ros.tools.replay.Replayer`), collects the labeled clouds, matches them by header
stamp to the bag's ground truth (``/lidar/labels``: one uint8 ``label`` per point, same order)
and reports mIoU (:mod:`cmkd_ros.metrics`), end-to-end latency percentiles (publish of the input
to receipt of the output, both in this process) and drops (inputs without an output), as a
printed table and optionally JSON.

    cmkd evaluate-bag heldout.mcap --checkpoint student.pt --json report.json

:func:`collect_pairs_from_bag` does the same for the collect node: it replays a synthetic bag
into a real ``collect_node`` process and returns the pair dataset it wrote.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from cmkd_ros.config import PRECISION_CHOICES
from cmkd_ros.openmp import openmp_defaults
from cmkd_ros.tools.replay import ReplayError, open_bag

OUTPUT_TOPIC = '/cmkd_evaluate/labeled'
NODE_NAME = 'cmkd_evaluate_segment'    # when started as a process; launch files name their own
LAUNCHERS = ('auto', 'launch', 'process')


class EvaluationError(ValueError):
    """The bag or the node cannot be evaluated (no ground truth, node failed to start, ...)."""


def cdr_header_stamp_ns(raw: bytes) -> int:
    """Header stamp of a CDR-serialized message whose first field is ``std_msgs/Header``.

    CDR: 4 bytes of encapsulation (byte 1: 0 big endian, 1 little endian), then
    ``stamp.sec`` (int32) and ``stamp.nanosec`` (uint32).
    """
    order = 'little' if raw[1] & 1 else 'big'
    sec = int.from_bytes(raw[4:8], order, signed=True)
    nanosec = int.from_bytes(raw[8:12], order, signed=False)
    return sec * 1_000_000_000 + nanosec


def read_ground_truth(bag: str, points_topic: str, labels_topic: str,
                      label_field: str = 'label') -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """({stamp: (N,) uint8 labels}, {stamp: number of points}) of the bag's LiDAR frames."""
    from cmkd_ros.conversions import cloud_to_array, stamp_ns
    reader = open_bag(bag)
    try:
        topics = {c.topic: c for c in reader.connections}
        for topic in (points_topic, labels_topic):
            if topic not in topics:
                raise EvaluationError(f'{bag}: no topic {topic} (has {sorted(topics)})')
        labels: dict[int, np.ndarray] = {}
        points: dict[int, int] = {}
        conns = [c for c in reader.connections if c.topic in (points_topic, labels_topic)]
        for conn, _, raw in reader.messages(connections=conns):
            if conn.topic == points_topic:
                stamp = cdr_header_stamp_ns(raw)
                msg = reader.deserialize(raw, conn.msgtype)
                points[stamp] = int(msg.width) * int(msg.height)
                continue
            msg = reader.deserialize(raw, conn.msgtype)
            arr = cloud_to_array(msg)
            if label_field not in (arr.dtype.names or ()):
                raise EvaluationError(f'{labels_topic}: no field {label_field!r} '
                                      f'(fields {arr.dtype.names})')
            labels[stamp_ns(msg)] = arr[label_field].astype(np.uint8)
        return labels, points
    finally:
        reader.close()


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {k: None for k in ('min', 'p50', 'p90', 'p95', 'p99', 'max', 'mean')}
    arr = np.asarray(values, dtype=np.float64)
    out = {f'p{q}': float(np.percentile(arr, q)) for q in (50, 90, 95, 99)}
    out.update(min=float(arr.min()), max=float(arr.max()), mean=float(arr.mean()))
    return out


def ros_param_text(value: Any) -> str:
    """A parameter value as ``--ros-args -p name:=TEXT`` expects it (YAML scalars, lists)."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (list, tuple)):
        return '[' + ','.join(ros_param_text(v) for v in value) + ']'
    if isinstance(value, str) and value == '':
        return "''"
    return str(value)


def node_command(module: str, params: dict, remaps: dict) -> list[str]:
    """``python -m module --ros-args -p k:=v ... -r a:=b`` with this interpreter."""
    cmd = [sys.executable, '-m', module, '--ros-args']
    for key, value in params.items():
        cmd += ['-p', f'{key}:={ros_param_text(value)}']
    for src, dst in remaps.items():
        cmd += ['-r', f'{src}:={dst}']
    return cmd


def launch_system_available() -> bool:
    """True when ``ros2 launch cmkd_ros <file>`` can run here: the ros2 command, the launch
    packages and this package's launch files in the ament index."""
    import importlib.util
    if not shutil.which('ros2') or any(importlib.util.find_spec(m) is None
                                       for m in ('launch_ros', 'ros2launch')):
        return False
    try:
        from ament_index_python.packages import get_package_share_directory
        share = get_package_share_directory('cmkd_ros')
    except (ImportError, LookupError, ValueError):
        return False
    return os.path.isfile(os.path.join(share, 'launch', 'segment.launch.py'))


def use_launch(launcher: str) -> bool:
    """Whether nodes start through ``ros2 launch`` (``launcher``: auto, launch or process)."""
    if launcher == 'process':
        return False
    available = launch_system_available()
    if launcher == 'launch' and not available:
        raise EvaluationError('--launcher launch: ros2 launch or the cmkd_ros launch files are '
                              'not installed (see README, Installing)')
    return available


def merged_params_file(node: str, params: dict, out_dir: str, base: str | None = None) -> str:
    """A ros__parameters YAML in ``out_dir``: ``base`` (default: the package's
    config/<node>.param.yaml) with ``params`` (dotted names) set over it."""
    import yaml

    from cmkd_ros.nodes.ros_io import package_config_path
    base = base or package_config_path(f'{node}.param.yaml')
    with open(base, encoding='utf-8') as fh:
        data = yaml.safe_load(fh) or {}
    section = next(iter(data.values()), {}) if data else {}
    values = section.setdefault('ros__parameters', {})
    for name, value in params.items():
        *parents, leaf = name.split('.')
        level = values
        for part in parents:
            level = level.setdefault(part, {})
        level[leaf] = value
    path = os.path.join(out_dir, f'{node}.params.yaml')
    with open(path, 'w', encoding='utf-8') as fh:
        yaml.safe_dump(data or {'/**': section}, fh, sort_keys=False)
    return path


def launch_command(launch_file: str, arguments: dict) -> list[str]:
    """``ros2 launch cmkd_ros FILE name:=value ...``; empty values are left out (ros2 launch
    refuses ``name:=``), so the launch file's default applies."""
    return ['ros2', 'launch', 'cmkd_ros', launch_file] + [
        f'{name}:={value}' for name, value in arguments.items() if str(value) != '']


def _param_items(items: list[str]) -> dict:
    """``NAME:=VALUE`` words (``--param``) as a dict, values parsed as YAML like ROS does."""
    import yaml
    out = {}
    for item in items:
        name, sep, text = item.partition(':=')
        if not sep or not name:
            raise EvaluationError(f'--param {item!r}: expected NAME:=VALUE')
        out[name] = yaml.safe_load(text)
    return out


def _launch_segment_command(args: argparse.Namespace, workdir: str) -> list[str]:
    params_file = merged_params_file('segment_node', _param_items(args.param), workdir,
                                     args.params_file)
    return launch_command('segment.launch.py', {
        'checkpoint': os.path.abspath(args.checkpoint), 'params_file': params_file,
        'device': args.device or '', 'precision': args.precision or '',
        'input_pointcloud': args.points_topic, 'output_pointcloud': OUTPUT_TOPIC})


def _node_command(args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, '-m', 'cmkd_ros.nodes.segment_node', '--ros-args',
           '-r', f'__node:={NODE_NAME}']
    if args.params_file:
        cmd += ['--params-file', args.params_file]
    cmd += ['-p', f'checkpoint:={os.path.abspath(args.checkpoint)}']
    if args.device:
        cmd += ['-p', f'device:={args.device}']
    if args.precision:
        cmd += ['-p', f'precision:={args.precision}']
    for item in args.param:
        cmd += ['-p', item]
    cmd += ['-r', f'~/input/pointcloud:={args.points_topic}',
            '-r', f'~/output/pointcloud:={OUTPUT_TOPIC}']
    return cmd


class _Collector:
    """Labeled clouds and debug timings received from the node (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.outputs: dict[int, tuple[float, np.ndarray, np.ndarray]] = {}
        self.processing_ms: list[float] = []
        self.published: dict[int, float] = {}
        self.duplicates = 0

    def on_output(self, msg: Any) -> None:
        from cmkd_ros.conversions import cloud_to_array, stamp_ns
        now = time.monotonic()
        arr = cloud_to_array(msg)
        names = arr.dtype.names or ()
        class_id = arr['class_id'].copy() if 'class_id' in names else None
        prob = arr['probability'].copy() if 'probability' in names else None
        with self.lock:
            stamp = stamp_ns(msg)
            if stamp in self.outputs:
                self.duplicates += 1
            self.outputs[stamp] = (now, class_id, prob)

    def on_processing(self, msg: Any) -> None:
        with self.lock:
            self.processing_ms.append(float(msg.data))

    def on_publish(self, topic: str, bag_ns: int, raw: bytes, wall: float) -> None:
        with self.lock:
            self.published[cdr_header_stamp_ns(raw)] = wall


def score(collector: _Collector, labels: dict[int, np.ndarray], class_names: list[str]
          ) -> dict:
    """mIoU, coverage, latency and drops of the collected outputs against ``labels``."""
    from cmkd_ros.metrics import ConfusionMatrix
    num_classes = len(class_names)
    confusion = ConfusionMatrix(num_classes)
    latency_ms, mismatched, scored_frames = [], 0, 0
    gt_points = labeled_points = out_of_range = 0
    with collector.lock:
        published = dict(collector.published)
        outputs = dict(collector.outputs)
        processing = list(collector.processing_ms)
    for stamp, t_pub in sorted(published.items()):
        if stamp not in outputs:
            continue
        t_out, class_id, _ = outputs[stamp]
        latency_ms.append((t_out - t_pub) * 1e3)
        gt = labels.get(stamp)
        if gt is None or class_id is None:
            continue
        if gt.shape[0] != class_id.shape[0]:
            mismatched += 1
            continue
        scored_frames += 1
        # 1. points with ground truth; 2. of those, the ones the node labeled (not cropped).
        has_gt = gt < num_classes
        out_of_range += int(((gt >= num_classes) & (gt != 255)).sum())
        counted = has_gt & (class_id < num_classes)
        gt_points += int(has_gt.sum())
        labeled_points += int(counted.sum())
        confusion.update(gt[counted], class_id[counted])
    summary = confusion.summary(class_names)
    drops = sorted(set(published) - set(outputs))
    return {
        'frames_published': len(published),
        'frames_received': len(set(published) & set(outputs)),
        'frames_scored': scored_frames,
        'drops': len(drops),
        'drop_rate': len(drops) / len(published) if published else None,
        'duplicates': collector.duplicates,
        'point_count_mismatches': mismatched,
        'miou': summary['miou'],
        'accuracy': summary['accuracy'],
        'iou': summary.get('iou'),
        'points_scored': labeled_points,
        'coverage': labeled_points / gt_points if gt_points else None,
        'gt_labels_out_of_range': out_of_range,
        'latency_ms': _percentiles(latency_ms),
        'processing_ms': _percentiles(processing),
    }


def evaluate_bag(args: argparse.Namespace) -> dict:
    """Run the segment node over ``args.bag`` and return the report (see module docstring)."""
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import PointCloud2
    from std_msgs.msg import Float64

    from cmkd_ros.nodes.background_node import BackgroundNode
    from cmkd_ros.models.checkpoint import load_checkpoint
    from cmkd_ros.nodes.ros_io import ensure_fastdds_profile
    from cmkd_ros.tools.replay import Replayer

    _, info = load_checkpoint(args.checkpoint)          # clear error before starting anything
    class_names = list(info['class_names'])
    labels, point_counts = read_ground_truth(args.bag, args.points_topic, args.labels_topic)
    env = ensure_fastdds_profile(dict(os.environ))
    ensure_fastdds_profile()
    log = open(args.log, 'wb') if args.log else tempfile.TemporaryFile()
    workdir = tempfile.mkdtemp(prefix='cmkd_evaluate_bag_')
    launched = use_launch(args.launcher)
    node_name = 'segment_node' if launched else NODE_NAME
    command = _launch_segment_command(args, workdir) if launched else _node_command(args)
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    client = BackgroundNode('cmkd_evaluate_bag')
    node = client.node
    collector = _Collector()
    try:
        node.create_subscription(PointCloud2, OUTPUT_TOPIC, collector.on_output,
                                 qos_profile_sensor_data)
        node.create_subscription(Float64, f'/{node_name}/debug/processing_time_ms',
                                 collector.on_processing, 100)
        replayer = Replayer(node, args.bag, [args.points_topic], rate=args.rate,
                            on_publish=collector.on_publish)
        try:
            # 1. wait for the node: its input subscription and our output subscription matched.
            deadline = time.monotonic() + args.startup_timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise EvaluationError(f'segment node exited with {proc.returncode} '
                                          f'before the replay:\n{_tail(log)}')
                if (replayer.publishers[args.points_topic].get_subscription_count() > 0 and
                        node.count_publishers(OUTPUT_TOPIC) > 0):
                    break
                time.sleep(0.1)
            else:
                raise EvaluationError(f'segment node not ready after {args.startup_timeout} s:'
                                      f'\n{_tail(log)}')
            time.sleep(0.5)                        # let discovery settle both ways
            settings = node_parameters(node, node_name, ('device', 'precision'))
            # 2. replay, 3. wait for outputs still in flight.
            stats = replayer.play()
        finally:
            replayer.close()
        deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < deadline:
            with collector.lock:
                if set(collector.published) <= set(collector.outputs):
                    break
            time.sleep(0.05)
    finally:
        stop_process(proc)
        client.close()
        shutil.rmtree(workdir, ignore_errors=True)
    report = score(collector, labels, class_names)
    report.update(bag=os.path.abspath(args.bag), checkpoint=os.path.abspath(args.checkpoint),
                  device=settings.get('device', args.device),
                  precision=settings.get('precision', args.precision), rate=args.rate,
                  class_names=class_names, launcher='ros2 launch' if launched else 'process',
                  frames_in_bag=len(point_counts), replay_wall_s=stats.wall_s,
                  replay_max_lag_ms=stats.max_lag_ms)
    log.close()
    return report


def _tail(log: Any, n: int = 3000) -> str:
    try:
        log.flush()
        log.seek(0)
        return log.read().decode(errors='replace')[-n:]
    except (OSError, ValueError):
        return ''


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGINT a node started in its own session (so it finishes cleanly), SIGKILL after
    ``timeout`` seconds."""
    import signal
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)


def format_table(report: dict) -> str:
    """The printed summary: per-class IoU, mIoU, latency percentiles and drops."""
    def pct(v):
        return '   n/a' if v is None else f'{100 * v:6.1f}'

    def ms(v):
        return '    n/a' if v is None else f'{v:7.1f}'

    lines = [f'bag {report["bag"]}', f'checkpoint {report["checkpoint"]} '
             f'({report["device"]}, {report.get("precision")})',
             '', f'{"class":<20} {"IoU %":>6}']
    for name in report['class_names']:
        lines.append(f'{name:<20} {pct((report.get("iou") or {}).get(name))}')
    lines += [f'{"mIoU":<20} {pct(report["miou"])}',
              f'{"accuracy":<20} {pct(report["accuracy"])}',
              f'{"coverage":<20} {pct(report["coverage"])}', '',
              f'{"ms":<20} {"p50":>7} {"p90":>7} {"p95":>7} {"p99":>7} {"max":>7}']
    for key in ('latency_ms', 'processing_ms'):
        row = report[key]
        lines.append(f'{key[:-3]:<20} ' + ' '.join(ms(row[k]) for k in
                                                   ('p50', 'p90', 'p95', 'p99', 'max')))
    lines += ['', f'frames: {report["frames_published"]} published, '
              f'{report["frames_received"]} labeled, {report["drops"]} dropped, '
              f'{report["frames_scored"]} scored']
    return '\n'.join(lines)


def node_parameters(node, node_name: str, names, timeout: float = 5.0) -> dict:
    """Current values of parameters ``names`` of the running node ``node_name``, through its
    get_parameters service from ``node`` (spun elsewhere); {} if it does not answer in time."""
    from rcl_interfaces.msg import Parameter as ParameterMsg
    from rcl_interfaces.srv import GetParameters
    from rclpy.parameter import Parameter
    client = node.create_client(GetParameters, f'/{node_name}/get_parameters')
    try:
        if not client.wait_for_service(timeout_sec=timeout):
            return {}
        future = client.call_async(GetParameters.Request(names=list(names)))
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        if not done.wait(timeout) or future.result() is None:
            return {}
        return {name: Parameter.from_parameter_msg(ParameterMsg(name=name, value=value)).value
                for name, value in zip(names, future.result().values)}
    finally:
        node.destroy_client(client)


def _optional_precision(text: str) -> str | None:
    """--precision: one of PRECISION_CHOICES, or '' for the params file's value."""
    if not text.strip():
        return None
    if text not in PRECISION_CHOICES:
        raise argparse.ArgumentTypeError(f'{text!r} is not one of {", ".join(PRECISION_CHOICES)}')
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bag', help='rosbag2 folder or file with LiDAR and ground-truth labels')
    parser.add_argument('--checkpoint', required=True, help='student checkpoint (.pt)')
    parser.add_argument('--json', default=None, help='write the report here')
    parser.add_argument('--device', default=None, type=lambda text: text.strip() or None,
                        help="cpu, cuda or cuda:N (default or '': the params file's, else "
                             'cpu)')
    parser.add_argument('--precision', default=None, type=_optional_precision,
                        metavar='{' + ','.join(PRECISION_CHOICES) + '}',
                        help="the node's inference arithmetic (default or '': the params "
                             "file's, else auto: bfloat16 on CPUs that have it in hardware)")
    parser.add_argument('--rate', type=float, default=1.0, help='replay speed factor')
    parser.add_argument('--points-topic', default='/lidar/points')
    parser.add_argument('--labels-topic', default='/lidar/labels')
    parser.add_argument('--params-file', default=None,
                        help='segment node ros__parameters YAML (e.g. config/'
                             'segment_node.param.yaml)')
    parser.add_argument('--param', action='append', default=[], metavar='NAME:=VALUE',
                        help='extra segment node parameter (repeatable)')
    parser.add_argument('--startup-timeout', type=float, default=60.0,
                        help='seconds to wait for the node to come up (default 60)')
    parser.add_argument('--drain-timeout', type=float, default=5.0,
                        help='seconds to wait for outputs after the last input (default 5)')
    parser.add_argument('--log', default=None, help='write the node output to this file')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='auto',
                        help='start the node with ros2 launch (segment.launch.py) or as a '
                             'plain process (default auto: ros2 launch where it is installed)')


def run(args: argparse.Namespace) -> int:
    if args.rate <= 0:
        print('cmkd evaluate-bag: --rate must be > 0', file=sys.stderr)
        return 2
    try:
        report = evaluate_bag(args)
    except (EvaluationError, ReplayError, ValueError, FileNotFoundError) as exc:
        print(f'cmkd evaluate-bag: {exc}', file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as fh:
            json.dump(report, fh, indent=2)
        print(f'report written to {args.json}')
    return 0


def collect_pairs_from_bag(bag: str, out_dir: str, *, cameras: list[str] | None = None,
                           image_transport: str = 'compressed', rate: float = 1.0,
                           params: dict | None = None, startup_timeout: float = 60.0,
                           settle_s: float = 2.0, log: str | None = None,
                           launcher: str = 'auto') -> int:
    """Replay a synthetic bag (``cmkd sim`` layout) into a real collect node; returns the number
    of pairs in ``out_dir`` afterwards.

    The node records with odometry-based motion compensation; ``params`` adds or overrides
    collect node parameters (e.g. ``{'record.min_interval_s': 0.5}``). The node starts
    through ``ros2 launch cmkd_ros collect.launch.py`` where the launch system is installed
    (``launcher``: auto, launch or process). Blocks until the replay has finished and no new
    pair appeared for ``settle_s`` seconds.
    """
    import rclpy

    from cmkd_ros.bag import CALIBRATION_FILE, camera_topics
    from cmkd_ros.calibration import RigCalibration
    from cmkd_ros.nodes.ros_io import ensure_fastdds_profile
    from cmkd_ros.pairs import PairReader
    from cmkd_ros.tools.replay import Replayer
    bag_dir = bag if os.path.isdir(bag) else os.path.dirname(bag)
    calibration = os.path.join(bag_dir, CALIBRATION_FILE)
    names = list(cameras or RigCalibration.load(calibration).names)
    key = 'compressed' if image_transport == 'compressed' else 'image'
    image_topics = [camera_topics(n)[key] for n in names]
    node_params = {'calibration_file': os.path.abspath(calibration), 'cameras': names,
                   'image_transport': image_transport,
                   'image_topic': camera_topics('{camera}')[key], 'use_odometry': True,
                   'record.enabled': True, 'record.output_dir': os.path.abspath(out_dir)}
    node_params.update(params or {})
    env = ensure_fastdds_profile(dict(os.environ))
    openmp_defaults(env)
    ensure_fastdds_profile()
    log_file = open(log, 'wb') if log else tempfile.TemporaryFile()
    workdir = tempfile.mkdtemp(prefix='cmkd_collect_bag_')
    if use_launch(launcher):
        calibration_file = node_params.pop('calibration_file')
        command = launch_command('collect.launch.py', {
            'calibration_file': calibration_file,
            'params_file': merged_params_file('collect_node', node_params, workdir),
            'input_pointcloud': '/lidar/points', 'input_odom': '/odom'})
    else:
        command = node_command('cmkd_ros.nodes.collect_node', node_params,
                               {'~/input/pointcloud': '/lidar/points', '~/input/odom': '/odom'})
    proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node('cmkd_collect_bag', context=context)

    def count() -> int:
        return len(PairReader(out_dir)) if os.path.isdir(out_dir) else 0

    try:
        topics = ['/lidar/points', '/odom'] + image_topics + [camera_topics(n)['info']
                                                              for n in names]
        replayer = Replayer(node, bag, topics, rate=rate)
        try:
            deadline = time.monotonic() + startup_timeout
            while replayer.wait_for_subscribers(['/lidar/points'] + image_topics, 0.2):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise EvaluationError(f'collect node not ready (exit code {proc.poll()}):'
                                          f'\n{_tail(log_file)}')
            time.sleep(0.5)                        # let discovery settle both ways
            replayer.play()
        finally:
            replayer.close()
        last, last_change = count(), time.monotonic()
        while time.monotonic() - last_change < settle_s:
            time.sleep(0.2)
            now = count()
            if now != last:
                last, last_change = now, time.monotonic()
    finally:
        stop_process(proc)                      # SIGINT: the node finishes queued pairs
        shutil.rmtree(workdir, ignore_errors=True)
        node.destroy_node()
        context.try_shutdown()
        log_file.close()
    return count()

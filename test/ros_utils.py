"""Helpers for ROS 2 integration tests: isolated domains, node processes, bounded waits.

Every test gets its own ROS_DOMAIN_ID (pid + counter, 1..101) with localhost-only discovery and
the project's Fast DDS shared-memory profile, so tests running side by side never see each
other. Node processes run in their own session and are always stopped (SIGINT, then SIGKILL).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

from cmkd_ros.nodes.background_node import BackgroundNode
from cmkd_ros.nodes.launch_support import profile_variables
from cmkd_ros.openmp import OPENMP_DEFAULTS

REPO = pathlib.Path(__file__).resolve().parents[1]
PROFILE = REPO / 'config' / 'fastdds_shm.xml'
_counter = itertools.count()

BASE_ENV = {
    'RMW_IMPLEMENTATION': 'rmw_fastrtps_cpp',
    'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST',
    'ROS_LOCALHOST_ONLY': '',
    # the variable that the installed Fast DDS reads (2.x: FASTRTPS_..., 3: FASTDDS_...)
    profile_variables({**os.environ, 'AMENT_PREFIX_PATH': os.environ.get('AMENT_PREFIX_PATH')
                       or sys.prefix})[0]: str(PROFILE),
    'PYTHONUNBUFFERED': '1',
    **OPENMP_DEFAULTS,
}


def unique_domain_id() -> int:
    """A ROS domain id in 1..101 from this process id and a per-process counter."""
    return (os.getpid() * 17 + next(_counter) * 7) % 101 + 1


def ros_env(domain_id: int, extra: dict | None = None) -> dict:
    """Environment for a node process on ``domain_id`` (this interpreter's venv, this repo)."""
    env = dict(os.environ)
    env.update(BASE_ENV)
    env.pop('ROS_LOCALHOST_ONLY')
    env['ROS_DOMAIN_ID'] = str(domain_id)
    env.setdefault('AMENT_PREFIX_PATH', sys.prefix)
    env['PYTHONPATH'] = os.pathsep.join([str(REPO)] + [p for p in env.get(
        'PYTHONPATH', '').split(os.pathsep) if p])
    env.update(extra or {})
    return env


def setup_test_process_env() -> None:
    """Make this (pytest) process use the same discovery range and Fast DDS profile."""
    for key, value in BASE_ENV.items():
        if key == 'ROS_LOCALHOST_ONLY':
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    os.environ.setdefault('AMENT_PREFIX_PATH', sys.prefix)


class RosProcess:
    """A child process (node, replay tool) with its output captured to a log file."""

    def __init__(self, args: list[str], env: dict, log_path: pathlib.Path, name: str = ''):
        self.args = args
        self.name = name or pathlib.Path(args[2] if len(args) > 2 else args[0]).name
        self.log_path = log_path
        self._log = open(log_path, 'wb')
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=str(REPO), start_new_session=True)

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors='replace')

    def wait(self, timeout: float) -> int:
        """Wait for exit; on timeout the process is killed and AssertionError raised."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f'{self.name} did not exit within {timeout} s:\n'
                                 f'{self.output()[-3000:]}') from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGINT, then SIGKILL after ``timeout``; always reaps the process."""
        if self.proc.poll() is None:
            self.kill(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


def node_command(module: str, params: dict | None = None, remaps: dict | None = None,
                 params_file: str | None = None) -> list[str]:
    """``python -m module --ros-args -p k:=v ... -r a:=b`` for a node module."""
    cmd = [sys.executable, '-m', module, '--ros-args']
    if params_file:
        cmd += ['--params-file', str(params_file)]
    for key, value in (params or {}).items():
        cmd += ['-p', f'{key}:={_param_text(value)}']
    for src, dst in (remaps or {}).items():
        cmd += ['-r', f'{src}:={dst}']
    return cmd


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (list, tuple)):
        return '[' + ','.join(_param_text(v) for v in value) + ']'
    if isinstance(value, str):
        return f"'{value}'" if value == '' else value
    return repr(value)


@contextlib.contextmanager
def processes() -> Iterator[list[RosProcess]]:
    """A list to register processes in; every one is stopped when the block exits."""
    procs: list[RosProcess] = []
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05, on_fail: Callable[[], str] | None = None) -> Any:
    """Poll ``predicate`` until truthy; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = on_fail() if on_fail else ''
            raise AssertionError(f'timed out after {timeout} s waiting for {what}\n{extra}')
        time.sleep(interval)


class RosClient(BackgroundNode):
    """A :class:`BackgroundNode` on ``domain_id`` with this process's test environment."""

    def __init__(self, domain_id: int, name: str = 'test_client'):
        setup_test_process_env()
        super().__init__(name, domain_id)

    def collect(self, msg_type: Any, topic: str, qos: Any = None) -> list:
        """Subscribe ``topic``; returns the list the received messages are appended to."""
        from rclpy.qos import qos_profile_sensor_data
        received: list = []
        self.node.create_subscription(msg_type, topic,
                                      lambda m: received.append((time.monotonic(), m)),
                                      qos or qos_profile_sensor_data)
        return received


def write_cloud_bag(path: pathlib.Path, storage: str = 'mcap', frames: int = 10,
                    points: int = 500, period_ns: int = 100_000_000, seed: int = 0,
                    start_ns: int = 1_700_000_000_000_000_000) -> list:
    """A small rosbag2 with /lidar/points (x, y, z, intensity) and /lidar/labels at 10 Hz.

    Returns the written point arrays (one structured array per frame) for comparisons.
    """
    import numpy as np
    from rosbags.rosbag2 import StoragePlugin, Writer

    from cmkd_ros.conversions import array_to_cloud, rosbags_types
    t = rosbags_types()
    rng = np.random.default_rng(seed)
    plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
    written = []
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        pts_conn = writer.add_connection('/lidar/points', 'sensor_msgs/msg/PointCloud2',
                                         typestore=t.typestore)
        lab_conn = writer.add_connection('/lidar/labels', 'sensor_msgs/msg/PointCloud2',
                                         typestore=t.typestore)
        for i in range(frames):
            stamp = start_ns + i * period_ns
            arr = np.zeros(points, dtype=[('x', 'f4'), ('y', 'f4'), ('z', 'f4'),
                                          ('intensity', 'f4')])
            for c in 'xyz':
                arr[c] = rng.uniform(-20, 20, points)
            arr['intensity'] = rng.uniform(0, 1, points)
            labels = np.zeros(points, dtype=[('label', 'u1')])
            labels['label'] = rng.integers(0, 5, points)
            for conn, data in ((pts_conn, arr), (lab_conn, labels)):
                msg = array_to_cloud(data, stamp, 'lidar', t)
                writer.write(conn, stamp, t.typestore.serialize_cdr(
                    msg, 'sensor_msgs/msg/PointCloud2'))
            written.append(arr)
    return written


def make_student_checkpoint(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A small randomly initialised student with the synthetic class map, saved at ``path``."""
    import torch

    from cmkd_ros.classes import SYNTHETIC
    from cmkd_ros.models.checkpoint import save_checkpoint
    from cmkd_ros.models.student import StudentConfig, build_student
    torch.manual_seed(seed)
    student = build_student(StudentConfig(arch='small', num_classes=SYNTHETIC.num_classes,
                                          feature_dim=32, point_features='height'))
    save_checkpoint(path, student, class_names=SYNTHETIC.names, class_colors=SYNTHETIC.colors)
    return path


def set_parameters(client: 'RosClient', node_name: str, params: dict, timeout: float = 10.0):
    """Call ``node_name``'s set_parameters service; returns the list of SetParametersResult."""
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter
    cli = client.node.create_client(SetParameters, f'{node_name}/set_parameters')
    try:
        assert cli.wait_for_service(timeout_sec=timeout), f'{node_name}/set_parameters missing'
        request = SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg()
                                                    for k, v in params.items()])
        future = cli.call_async(request)
        wait_for(future.done, timeout, f'{node_name}/set_parameters response')
        return future.result().results
    finally:
        client.node.destroy_client(cli)


def make_sim_bag(path: pathlib.Path, frames: int = 4, storage: str = 'mcap',
                 images: str = 'compressed', cameras: int = 2, seed: int = 3) -> pathlib.Path:
    """A small synthetic drive (cmkd_ros.sim) as a rosbag2 with calibration.yaml beside it."""
    from cmkd_ros.config import build
    from cmkd_ros.sim.config import SimConfig
    from cmkd_ros.sim.export import export_bag
    from cmkd_ros.sim.simulator import SimWorld
    config = build(SimConfig, {
        'seed': seed, 'cameras': {'count': cameras, 'width': 320, 'height': 180},
        'lidar': {'beams': 16, 'horizontal_resolution_deg': 1.0}})
    export_bag(SimWorld(config), str(path), frames, storage, images)
    return path


def predict_offline(student, points) -> tuple:
    """The student's (class_id, probability) numpy arrays for a decoded cloud, one torch thread.

    One thread: this (pytest) process's OpenMP pool may spin against the node processes on a
    shared machine; the result does not depend on the thread count.
    """
    import numpy as np
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        xyz = np.stack([points['x'], points['y'], points['z']], 1).astype(np.float32)
        pred, prob = student.predict(xyz, np.ascontiguousarray(points['intensity']))
    finally:
        torch.set_num_threads(threads)
    return pred.numpy(), prob.numpy()

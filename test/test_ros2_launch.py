"""The launch files and nodes under the real ROS 2 command line, as a user runs them.

``ros2 launch cmkd_ros <file>`` runs as its own process (the launch system and ros2cli from
``../shared/wheels/ros2-cli``, installed by scripts/install.sh), on an isolated domain, with
data replayed by ``cmkd replay``; ``ros2 param|topic|node`` inspect it. Every supported way of
installing the package is checked to let ``ros2 launch`` find the launch files.
"""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from ros_utils import (REPO, RosClient, RosProcess, make_sim_bag, make_student_checkpoint,
                       processes, ros_env, unique_domain_id, wait_for, write_cloud_bag)

pytestmark = pytest.mark.ros  # ROS-facing: runs on every tested distro (scripts/test.sh)

LAUNCH_FILES = ('segment.launch.py', 'collect.launch.py', 'replay_evaluate.launch.py')


@pytest.fixture(scope='module')
def ros2() -> str:
    """The ros2 command; the launch system is part of the test install (no skip)."""
    path = shutil.which('ros2')
    if path is None or shutil.which('ros2', path=os.path.dirname(sys.executable)) is None:
        raise RuntimeError('ros2 (ros2cli + launch) is not installed in this venv: run '
                           'scripts/install.sh with CMKD_EXTRA_WHEELS=../shared/wheels/ros2-cli '
                           '(scripts/test.sh does)')
    return path


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> pathlib.Path:
    return make_student_checkpoint(tmp_path_factory.mktemp('ckpt') / 'student.pt')


def _launch(args, domain, log, extra_env=None) -> RosProcess:
    return RosProcess(['ros2', 'launch', 'cmkd_ros', *args], ros_env(domain, extra_env), log,
                      name=args[0])


def _ros2(domain, *args, timeout=30.0) -> subprocess.CompletedProcess:
    return subprocess.run(['ros2', *args], env=ros_env(domain), capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))


def _replay(bag, domain, log, *topics, rate='1.0') -> RosProcess:
    return RosProcess([sys.executable, '-m', 'cmkd_ros.tools.cli', 'replay', str(bag), '--rate', rate,
                       '--wait-for', *topics, '--wait-timeout', '60'], ros_env(domain), log)


def _assert_clean_failure(proc: RosProcess, *expected: str) -> None:
    assert proc.wait(timeout=60) == 1, proc.output()
    out = proc.output()
    assert 'Traceback' not in out, out
    for text in expected:
        assert text in out, out


def test_ros2_launch_finds_every_launch_file_of_the_test_install(ros2):
    """The quick-start (editable) venv: launch files found through the ament index."""
    for name in LAUNCH_FILES:
        res = _ros2(unique_domain_id(), 'launch', 'cmkd_ros', name, '--show-args')
        assert res.returncode == 0, res.stdout + res.stderr
        assert "'params_file'" in res.stdout and "'fastdds_profile'" in res.stdout


def _show_args_in_prefix(prefix: pathlib.Path, extra_paths: list[pathlib.Path]) -> None:
    env = ros_env(unique_domain_id())
    env['AMENT_PREFIX_PATH'] = os.pathsep.join([str(prefix), env['AMENT_PREFIX_PATH']])
    env['PYTHONPATH'] = os.pathsep.join([str(p) for p in extra_paths] + [env['PYTHONPATH']])
    for name in LAUNCH_FILES:
        res = subprocess.run(['ros2', 'launch', 'cmkd_ros', name, '--show-args'], env=env,
                             capture_output=True, text=True, timeout=60, cwd='/')
        assert res.returncode == 0, res.stdout + res.stderr
        assert "'params_file'" in res.stdout, res.stdout


def _copy_source(dst: pathlib.Path) -> pathlib.Path:
    files = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard'], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if rel.startswith(('package.xml', 'setup.', 'resource/', 'launch/', 'config/',
                           'cmkd_ros/', 'offline_training/')):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    return dst


def test_ros2_launch_finds_the_launch_files_after_pip_install(ros2, tmp_path):
    src = _copy_source(tmp_path / 'src')
    prefix = tmp_path / 'prefix'
    # --ignore-installed: never uninstall the editable install of the venv running the tests
    res = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps',
                          '--ignore-installed', '--no-build-isolation', '--prefix', str(prefix),
                          str(src)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    share = prefix / 'share' / 'cmkd_ros'
    assert sorted(p.name for p in (share / 'launch').glob('*.py')) == sorted(LAUNCH_FILES)
    site = next(prefix.glob('lib/python3*/site-packages'))
    _show_args_in_prefix(prefix, [site])


@pytest.mark.parametrize('symlink', [False, True], ids=['copy', 'symlink-install'])
def test_ros2_launch_finds_the_launch_files_after_colcon_build(ros2, tmp_path, symlink):
    src = _copy_source(tmp_path / 'ws' / 'src' / 'cmkd_ros')
    cmd = ['colcon', '--log-base', str(tmp_path / 'log'), 'build', '--base-paths',
           str(src.parent), '--build-base', str(tmp_path / 'build'), '--install-base',
           str(tmp_path / 'install')] + (['--symlink-install'] if symlink else [])
    env = dict(os.environ, PYTHONPATH='')
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                         cwd=str(tmp_path / 'ws'))
    assert res.returncode == 0, res.stdout + res.stderr
    prefix = tmp_path / 'install' / 'cmkd_ros'
    launch_dir = prefix / 'share' / 'cmkd_ros' / 'launch'
    assert sorted(p.name for p in launch_dir.glob('*.py')) == sorted(LAUNCH_FILES)
    site = next(prefix.glob('lib/python3*/site-packages'))
    _show_args_in_prefix(prefix, [site])
    if symlink:   # the symlink install runs the source itself
        assert (launch_dir / 'segment.launch.py').resolve().parent == src / 'launch'


def test_segment_launch_labels_clouds_and_answers_the_ros2_tools(ros2, tmp_path, checkpoint):
    bag = tmp_path / 'clouds'
    write_cloud_bag(bag, frames=20, points=2000)
    params = yaml.safe_load((REPO / 'config' / 'segment_node.param.yaml').read_text())
    params['/**']['ros__parameters'].update(precision='float32', range_max=150.0,
                                            always_process=True)
    params_file = tmp_path / 'segment.yaml'
    params_file.write_text(yaml.safe_dump(params))
    domain = unique_domain_id()
    from sensor_msgs.msg import PointCloud2

    from cmkd_ros.conversions import cloud_to_array
    with RosClient(domain) as client, processes() as procs:
        received = client.collect(PointCloud2, '/lidar/points_labeled')
        launch = _launch(['segment.launch.py', f'checkpoint:={checkpoint}',
                          f'params_file:={params_file}'], domain, tmp_path / 'launch.log')
        procs.append(launch)
        hz = RosProcess(['ros2', 'topic', 'hz', '/lidar/points_labeled'], ros_env(domain),
                        tmp_path / 'hz.log')
        procs.append(hz)
        # half rate: the node drops scans it cannot label in time (by design), and a busy
        # 2-core CI host must not turn that into a failure here
        replay = _replay(bag, domain, tmp_path / 'replay.log', '/lidar/points', rate='0.5')
        procs.append(replay)
        assert replay.wait(timeout=120) == 0, replay.output() + launch.output()
        wait_for(lambda: len(received) >= 8, 30, '8 of 20 labeled clouds',
                 on_fail=lambda: f'{len(received)} received\n' + launch.output())
        msg = received[-1][1]
        fields = {f.name: f.datatype for f in msg.fields}
        assert fields['class_id'] == 2 and fields['probability'] == 7 and fields['rgb'] == 7
        assert {'x', 'y', 'z', 'intensity'} <= set(fields)
        labeled = cloud_to_array(msg)
        assert len(labeled) == 2000 and np.all(labeled['probability'] > 0)
        # the params file's values, not the node's defaults
        for name, value in (('precision', 'float32'), ('range_max', '150.0')):
            res = _ros2(domain, 'param', 'get', '--no-daemon', '--timeout', '20',
                        '/segment_node', name)
            assert res.returncode == 0 and value in res.stdout, res.stdout + res.stderr
        # node names travel on their own discovery topic, later than the services above on a
        # loaded host: a user runs the command again, so does the test
        listed: list[str] = []

        def node_listed() -> bool:
            res = _ros2(domain, 'node', 'list', '--no-daemon', '--spin-time', '3')
            listed.append(res.stdout + res.stderr)
            return '/segment_node' in res.stdout

        wait_for(node_listed, 40, '/segment_node in ros2 node list', interval=1.0,
                 on_fail=lambda: '\n'.join(listed))
        res = _ros2(domain, 'topic', 'echo', '--no-daemon', '--once', '/diagnostics',
                    'diagnostic_msgs/msg/DiagnosticArray')
        assert res.returncode == 0 and 'segment_node' in res.stdout, res.stdout + res.stderr
        hz.stop()
        assert 'average rate' in hz.output(), hz.output()
        # Ctrl-C: the terminal sends SIGINT to the whole foreground process group
        start = time.monotonic()
        os.killpg(launch.proc.pid, signal.SIGINT)
        assert launch.wait(timeout=15) == 0, launch.output()
        assert time.monotonic() - start < 10
        out = launch.output()
        assert 'process has finished cleanly' in out and 'Traceback' not in out, out


def test_segment_launch_arguments_override_the_params_file_only_when_given(ros2, tmp_path,
                                                                          checkpoint):
    params = yaml.safe_load((REPO / 'config' / 'segment_node.param.yaml').read_text())
    params['/**']['ros__parameters'].update(precision='float32', device='cpu')
    params_file = tmp_path / 'segment.yaml'
    params_file.write_text(yaml.safe_dump(params))
    domain = unique_domain_id()
    with processes() as procs:
        procs.append(_launch(['segment.launch.py', f'checkpoint:={checkpoint}',
                              f'params_file:={params_file}', 'precision:=auto'], domain,
                             tmp_path / 'launch.log'))
        res = _ros2(domain, 'param', 'get', '--no-daemon', '--timeout', '30', '/segment_node',
                    'precision', timeout=60)
        assert res.returncode == 0 and 'auto' in res.stdout, res.stdout + procs[0].output()
        res = _ros2(domain, 'param', 'get', '--no-daemon', '--timeout', '20', '/segment_node',
                    'device')
        assert 'cpu' in res.stdout, res.stdout


def _pairs_cameras(out_dir) -> tuple[int, list[str]]:
    from cmkd_ros.pairs import PairReader
    reader = PairReader(str(out_dir))
    return len(reader), sorted(reader[0].camera_names) if len(reader) else []


@pytest.mark.parametrize('cameras,storage,rig', [(6, 'mcap', 'calibration_file'),
                                                 (3, 'sqlite3', 'calibration_file'),
                                                 (2, 'mcap', 'tf_bag')])
def test_collect_launch_records_every_camera_of_the_calibration(ros2, tmp_path, cameras,
                                                                storage, rig):
    """The rig from a calibration YAML, or from a bag's /tf_static and CameraInfo."""
    from cmkd_ros.calibration import RigCalibration
    bag = make_sim_bag(tmp_path / 'drive', frames=4, storage=storage, cameras=cameras)
    names = RigCalibration.load(str(bag / 'calibration.yaml')).names
    assert len(names) == cameras
    out_dir = tmp_path / 'pairs'
    domain = unique_domain_id()
    topics = ['/lidar/points'] + [f'/cameras/{n}/image_raw/compressed' for n in names]
    with processes() as procs:
        source = f'{bag}/calibration.yaml' if rig == 'calibration_file' else str(bag)
        launch = _launch(['collect.launch.py', f'{rig}:={source}', f'output_dir:={out_dir}'],
                         domain, tmp_path / 'launch.log')
        procs.append(launch)
        replay = _replay(bag, domain, tmp_path / 'replay.log', *topics, rate='0.5')
        procs.append(replay)
        assert replay.wait(timeout=120) == 0, replay.output() + launch.output()
        wait_for(lambda: out_dir.exists() and _pairs_cameras(out_dir)[0] == 4, 30,
                 '4 pairs', on_fail=launch.output)
    count, recorded = _pairs_cameras(out_dir)
    assert recorded == sorted(names)
    assert f'collecting {cameras} camera(s)' in launch.output()


def test_replay_evaluate_launch_writes_the_report(ros2, tmp_path, checkpoint):
    bag = tmp_path / 'clouds'
    write_cloud_bag(bag, frames=8, points=1000)
    report = tmp_path / 'report.json'
    proc = _launch(['replay_evaluate.launch.py', f'bag:={bag}', f'checkpoint:={checkpoint}',
                    'evaluate:=true', f'json:={report}', 'rate:=0.5'], unique_domain_id(),
                   tmp_path / 'launch.log')
    try:
        assert proc.wait(timeout=240) == 0, proc.output()
    finally:
        proc.stop()
    import json
    data = json.loads(report.read_text())
    assert data['frames_scored'] >= 6 and 0.0 <= data['miou'] <= 1.0, data
    assert data['latency_ms']['p95'] > 0 and data['launcher'] == 'ros2 launch', data


def test_wrong_use_gives_one_clear_line_and_a_failing_exit(ros2, tmp_path, checkpoint):
    bag = make_sim_bag(tmp_path / 'drive', frames=1, cameras=2)
    calibration = f'calibration_file:={bag}/calibration.yaml'
    cases = [
        (['segment.launch.py'], ["missing required argument 'checkpoint'"]),
        (['segment.launch.py', 'checkpoint:=/no/such/student.pt'],
         ['checkpoint not found: /no/such/student.pt', 'segment_node-1 exited with status 2']),
        (['segment.launch.py', f'checkpoint:={checkpoint}', 'precison:=float32'],
         ['unknown launch argument(s) precison']),
        (['collect.launch.py', 'calibration_file:=/no/such/rig.yaml'],
         ['/no/such/rig.yaml', 'collect_node-1 exited with status 2']),
        (['collect.launch.py', calibration, 'cameras:=front,rear'],
         ["no camera named 'rear'"]),
        (['replay_evaluate.launch.py', f'checkpoint:={checkpoint}', 'bag:=/no/such/bag',
          'evaluate:=true'], ['/no/such/bag']),
    ]
    for args, expected in cases:
        proc = _launch(args, unique_domain_id(), tmp_path / f'{len(args)}_{args[0]}.log')
        try:
            _assert_clean_failure(proc, *expected)
        finally:
            proc.stop()

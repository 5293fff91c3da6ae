"""`cmkd replay`: a real replay process publishing a rosbag2 to a subscriber in this process."""
import sys
import time

import numpy as np
import pytest

from cmkd_ros.conversions import cloud_to_array, stamp_ns
from ros_utils import (RosClient, RosProcess, processes, ros_env, unique_domain_id, wait_for,
                       write_cloud_bag)

pytestmark = pytest.mark.ros  # ROS-facing: runs on every tested distro (scripts/test.sh)


def _replay_cmd(bag, *extra):
    return [sys.executable, '-m', 'cmkd_ros.tools.cli', 'replay', str(bag), *extra]


@pytest.mark.parametrize('storage,rate', [('mcap', 1.0), ('sqlite3', 2.0)])
def test_replay_publishes_every_message_with_bag_timing_and_clock(tmp_path, storage, rate):
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import PointCloud2
    bag = tmp_path / f'bag_{storage}'
    written = write_cloud_bag(bag, storage, frames=10, points=300)
    domain = unique_domain_id()
    with RosClient(domain) as client, processes() as procs:
        clouds = client.collect(PointCloud2, '/lidar/points')
        clocks = client.collect(Clock, '/clock')
        procs.append(RosProcess(_replay_cmd(bag, '--rate', str(rate), '--clock', '--topics',
                                            '/lidar/points', '--wait-for', '/lidar/points'),
                                ros_env(domain), tmp_path / 'replay.log'))
        assert procs[0].wait(timeout=30) == 0, procs[0].output()
        wait_for(lambda: len(clouds) >= 10, 5, '10 clouds', on_fail=procs[0].output)
        time.sleep(0.3)
    assert len(clouds) == 10                      # reliable: nothing lost, nothing duplicated
    assert 'published 10 messages' in procs[0].output()
    # Payload and stamps arrive unchanged (raw CDR bytes republished).
    for (_, msg), arr in zip(clouds, written):
        np.testing.assert_array_equal(cloud_to_array(msg), arr)
    stamps = [stamp_ns(m) for _, m in clouds]
    assert stamps == sorted(stamps) and len(set(stamps)) == 10
    # Timing: 0.9 s of bag time take 0.9 / rate s of wall time (loose bounds: shared CPU).
    span = clouds[-1][0] - clouds[0][0]
    expected = 0.9 / rate
    assert 0.8 * expected <= span <= expected + 1.0, (span, expected)
    # /clock carries bag time, never backwards within one pass, inside the bag's span.
    clock_ns = [m.clock.sec * 1_000_000_000 + m.clock.nanosec for _, m in clocks]
    assert len(clock_ns) >= 10
    assert clock_ns == sorted(clock_ns)
    assert stamps[0] <= clock_ns[0] and clock_ns[-1] <= stamps[-1]


def test_replay_loop_restarts_and_time_jumps_back(tmp_path):
    from sensor_msgs.msg import PointCloud2
    bag = tmp_path / 'bag'
    write_cloud_bag(bag, 'mcap', frames=3, points=50, period_ns=50_000_000)
    domain = unique_domain_id()
    with RosClient(domain) as client, processes() as procs:
        clouds = client.collect(PointCloud2, '/lidar/points')
        procs.append(RosProcess(_replay_cmd(bag, '--loop', '--topics', '/lidar/points',
                                            '--wait-for', '/lidar/points'),
                                ros_env(domain), tmp_path / 'replay.log'))
        wait_for(lambda: len(clouds) >= 7, 20, 'three passes', on_fail=procs[0].output)
        procs[0].stop()
        assert procs[0].returncode == 0, procs[0].output()
    stamps = [stamp_ns(m) for _, m in clouds]
    assert stamps[:6] == stamps[:3] * 2           # the second pass repeats the first
    assert 'published' in procs[0].output() and 'pass(es)' in procs[0].output()


@pytest.mark.parametrize('args,message', [
    (['/nonexistent/bag'], 'bag not found'),
    (['{bag}', '--topics', '/nope'], "['/nope'] not in"),
    (['{bag}', '--rate', '0'], '--rate must be > 0'),
    (['{tmp}/empty'], 'not a rosbag2 bag (no metadata.yaml'),              # an empty folder
    (['{tmp}/pairs'], 'not a rosbag2 bag (no metadata.yaml'),              # a pair dataset
    (['{tmp}/lone/drive.db3'], 'not a rosbag2 bag (no metadata.yaml'),     # a lone .db3
    (['{tmp}/broken'], 'not a readable rosbag2 (Could not load YAML'),
])
def test_replay_rejects_bad_arguments_with_a_clear_message(tmp_path, args, message):
    bag = tmp_path / 'bag'
    write_cloud_bag(bag, 'mcap', frames=1, points=10)
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'pairs' / 'pairs').mkdir(parents=True)
    (tmp_path / 'pairs' / 'dataset.yaml').write_text('format_version: 1\n')
    (tmp_path / 'lone').mkdir()
    (tmp_path / 'lone' / 'drive.db3').write_bytes(b'SQLite format 3\x00')
    (tmp_path / 'broken').mkdir()
    (tmp_path / 'broken' / 'metadata.yaml').write_text('rosbag2_bagfile_information: [\n')
    domain = unique_domain_id()
    proc = RosProcess(_replay_cmd(*[a.format(bag=bag, tmp=tmp_path) for a in args]),
                      ros_env(domain), tmp_path / 'replay.log')
    try:
        assert proc.wait(timeout=30) == 2
    finally:
        proc.stop()
    lines = proc.output().strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines       # one line, no traceback


def test_replay_passes_ros_args_remaps(tmp_path):
    from sensor_msgs.msg import PointCloud2
    bag = tmp_path / 'bag'
    write_cloud_bag(bag, 'mcap', frames=2, points=20)
    domain = unique_domain_id()
    with RosClient(domain) as client, processes() as procs:
        clouds = client.collect(PointCloud2, '/points')
        procs.append(RosProcess(_replay_cmd(bag, '--topics', '/lidar/points', '--wait-for',
                                            '/lidar/points', '--ros-args', '-r',
                                            '/lidar/points:=/points'),
                                ros_env(domain), tmp_path / 'replay.log'))
        assert procs[0].wait(timeout=30) == 0, procs[0].output()
        wait_for(lambda: len(clouds) == 2, 5, 'two remapped clouds')

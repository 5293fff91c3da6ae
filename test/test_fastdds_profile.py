"""The Fast DDS profile reaches Fast DDS through the variable that the installed version reads.

Fast DDS 2.x (Humble, Iron, Jazzy) reads only FASTRTPS_DEFAULT_PROFILES_FILE, Fast DDS 3 (Kilted)
only FASTDDS_DEFAULT_PROFILES_FILE. Without the profile's larger shared-memory segment, large
best-effort messages are lost (measured on the Jazzy wheels: 53-62 of 100 clouds of 2 MB).
"""
import importlib.metadata
import os
import pathlib
import sys

import pytest

from cmkd_ros.nodes.launch_support import PROFILE_VARIABLES, fastdds_major_version, profile_variables
from ros_utils import RosProcess, processes, ros_env, unique_domain_id

PEER = pathlib.Path(__file__).with_name('large_message_peer.py')
FASTRTPS, FASTDDS = PROFILE_VARIABLES


@pytest.mark.parametrize('library, variable', [('libfastrtps.so.2.14.3', FASTRTPS),
                                               ('libfastdds.so.3.2.2', FASTDDS)])
def test_profile_variable_follows_the_installed_library(tmp_path, library, variable):
    (tmp_path / 'lib').mkdir()
    (tmp_path / 'lib' / library).touch()
    env = {'AMENT_PREFIX_PATH': f'/nonexistent{os.pathsep}{tmp_path}', 'ROS_DISTRO': 'kilted'}
    assert profile_variables(env) == (variable,)
    # no library under the prefixes: the distribution decides
    assert profile_variables({'ROS_DISTRO': 'jazzy'}) == (FASTRTPS,)
    assert profile_variables({'ROS_DISTRO': 'kilted'}) == profile_variables({}) == (FASTDDS,)


def _installed_distro() -> str:
    for name, distro in (('ros-jazzy-rclpy', 'jazzy'), ('ros-rclpy', 'kilted')):
        try:
            importlib.metadata.version(name)
            return distro
        except importlib.metadata.PackageNotFoundError:
            pass
    return os.environ.get('ROS_DISTRO', '')


@pytest.mark.ros
def test_this_environment_chooses_the_variable_of_its_fastdds():
    distro = _installed_distro()
    env = {'AMENT_PREFIX_PATH': os.environ.get('AMENT_PREFIX_PATH') or sys.prefix}
    expected = {'jazzy': (2, FASTRTPS), 'kilted': (3, FASTDDS)}[distro]
    assert (fastdds_major_version(env), profile_variables(env)[0]) == expected, distro


@pytest.mark.ros
def test_large_best_effort_clouds_arrive_with_the_profile_set_as_the_project_sets_it(tmp_path):
    """60 clouds of 2 MB at 10 Hz between two processes, best effort, with the profile given
    by ensure_fastdds_profile (what the nodes, cmkd replay and evaluate-bag do)."""
    from cmkd_ros.nodes.ros_io import ensure_fastdds_profile
    env = ros_env(unique_domain_id())
    for var in PROFILE_VARIABLES:
        env.pop(var, None)
    env = ensure_fastdds_profile(env)
    sent = 60
    with processes() as procs:
        sub = RosProcess([sys.executable, str(PEER), 'sub', '14'], env, tmp_path / 'sub.log')
        procs.append(sub)
        pub = RosProcess([sys.executable, str(PEER), 'pub', str(sent), '2.0'], env,
                         tmp_path / 'pub.log')
        procs.append(pub)
        assert pub.wait(timeout=60) == 0, pub.output()
        assert sub.wait(timeout=30) == 0, sub.output()
    received = int(sub.output().split('received ')[-1].split()[0])
    assert received >= 0.9 * sent, f'{received} of {sent} clouds of 2 MB arrived'

"""The test tiers of test/conftest.py: the unit marker and the guard of unit tests."""
import multiprocessing
import subprocess

import pytest
import rclpy


def test_a_test_without_tier_markers_is_a_unit_test(request):
    assert request.node.get_closest_marker('unit') is not None


def test_a_unit_test_cannot_start_a_process():
    with pytest.raises(RuntimeError, match='is a unit test but starts a process '
                       r'\(subprocess.Popen\): mark it process'):
        subprocess.run(['true'], check=True)
    with pytest.raises(RuntimeError, match=r'starts a process \(multiprocessing\)'):
        multiprocessing.get_context('spawn').Process(target=print).start()


def test_a_unit_test_cannot_start_ros():
    with pytest.raises(RuntimeError, match='is a unit test but calls rclpy.init: mark it ros'):
        rclpy.init()
    assert not rclpy.ok()


@pytest.mark.process
def test_a_process_test_is_not_unit_and_may_start_processes(request):
    assert request.node.get_closest_marker('unit') is None
    assert subprocess.run(['true']).returncode == 0


@pytest.mark.slow
def test_a_slow_test_is_not_unit(request):
    assert request.node.get_closest_marker('unit') is None

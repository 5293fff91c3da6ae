"""Shared pytest fixtures (the real sample data folder, devices) and the test tiers.

Tiers: a test is ``unit`` unless it is marked ``ros`` (rclpy, nodes, launch), ``process`` (it
starts processes: a node, a CLI, torchrun, a ``kill -9``) or ``slow`` (over about 1.5 s on 2
shared cores). The rule is applied at collection (``pytest -m unit`` runs the fast inner loop,
about a minute); a unit test that starts a process or calls ``rclpy.init`` fails with a message
naming the marker to add, and unit tests slower than ``UNIT_SLOW_S`` are listed at the end.
"""
import os
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = pathlib.Path(os.environ.get('CMKD_DATA_DIR', REPO.parent / 'shared' / 'data'))

NOT_UNIT = ('ros', 'process', 'slow')   # a test with none of these markers is a unit test
UNIT_SLOW_S = 3.0                       # unit tests slower than this are reported
# Audit events of process creation (subprocess, os.fork, os.system, ...); multiprocessing's
# spawn raises none, so the guard also replaces multiprocessing's Process.start.
PROCESS_EVENTS = frozenset({'subprocess.Popen', 'os.fork', 'os.forkpty', 'os.posix_spawn',
                            'os.system', 'os.exec', 'os.spawn'})
_unit_test_running: list[str] = []      # node id of the unit test running now, if any
_slow_unit_tests: list[tuple[float, str]] = []


def _refuse_processes_in_unit_tests(event: str, args: tuple) -> None:
    if _unit_test_running and event in PROCESS_EVENTS:
        raise RuntimeError(f'{_unit_test_running[0]} is a unit test but starts a process '
                           f'({event}): mark it process in its file')


sys.addaudithook(_refuse_processes_in_unit_tests)


@pytest.hookimpl(tryfirst=True)   # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(name) for name in NOT_UNIT):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _unit_test_guard(request, monkeypatch):
    """Unit tests start no process and no ROS context (see the module docstring)."""
    if request.node.get_closest_marker('unit') is None:
        yield
        return
    import multiprocessing.process

    def refuse(what, marker):
        def call(*args, **kwargs):
            raise RuntimeError(f'{request.node.nodeid} is a unit test but {what}: mark it '
                               f'{marker} in its file')
        return call
    monkeypatch.setattr(multiprocessing.process.BaseProcess, 'start',
                        refuse('starts a process (multiprocessing)', 'process'))
    if 'rclpy' in sys.modules:
        monkeypatch.setattr(sys.modules['rclpy'], 'init', refuse('calls rclpy.init', 'ros'))
    _unit_test_running.append(request.node.nodeid)
    try:
        yield
    finally:
        _unit_test_running.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    if call.when == 'call' and item.get_closest_marker('unit') and \
            call.duration > UNIT_SLOW_S:
        _slow_unit_tests.append((call.duration, item.nodeid))


def pytest_terminal_summary(terminalreporter):
    if _slow_unit_tests:
        terminalreporter.section(f'unit tests slower than {UNIT_SLOW_S:.0f} s (make them '
                                 'shorter or mark them slow)')
        for duration, nodeid in sorted(_slow_unit_tests, reverse=True):
            terminalreporter.line(f'{duration:6.1f} s  {nodeid}')


@pytest.fixture(scope='session')
def data_dir() -> pathlib.Path:
    """Folder with the real sample frames (nuscenes_sample/, kitti_000008/); set CMKD_DATA_DIR."""
    if not (DATA_DIR / 'nuscenes_sample' / 'calibration.json').exists():
        raise FileNotFoundError(f'sample data not found in {DATA_DIR}; set CMKD_DATA_DIR')
    return DATA_DIR


def _devices():
    """cpu, plus cuda where a GPU is visible: CI (no GPU) runs the CPU cases, a GPU both."""
    import torch
    return ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


@pytest.fixture(params=_devices())
def device(request) -> str:
    """Torch device the test runs on (the cuda case exists only where CUDA is available)."""
    return request.param


@pytest.fixture
def single_torch_thread():
    """Correctness tests run on one torch thread: robust timing on a shared, busy machine."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

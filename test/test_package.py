"""The package installs the ways users install ROS 2 packages: colcon, pip into a venv, scripts."""
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_FILES = ['package.xml', 'setup.py', 'setup.cfg', 'resource', 'cmkd_ros',
                 'offline_training', 'launch', 'config', 'README.md']
NODES = ['collect_node', 'segment_node']


def _copy_package(dest: pathlib.Path) -> None:
    dest.mkdir(parents=True)
    for name in PACKAGE_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns('__pycache__'))
        else:
            shutil.copy2(src, dest / name)


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f'{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}'
    return proc


@pytest.mark.process
def test_colcon_build_installs_an_ament_package(tmp_path):
    _copy_package(tmp_path / 'src' / 'cmkd_ros')
    colcon = shutil.which('colcon', path=os.path.dirname(sys.executable))
    assert colcon, 'colcon not installed (dev extra: colcon-common-extensions)'
    _run([colcon, 'build', '--base-paths', 'src'], cwd=tmp_path)
    prefix = tmp_path / 'install' / 'cmkd_ros'
    assert (prefix / 'share/ament_index/resource_index/packages/cmkd_ros').is_file()
    share = prefix / 'share' / 'cmkd_ros'
    assert (share / 'package.xml').read_text() == (REPO / 'package.xml').read_text()
    for folder in ('launch', 'config'):
        installed = sorted(p.name for p in (share / folder).iterdir())
        expected = sorted(p.name for p in (REPO / folder).iterdir()
                          if p.suffix in ('.py', '.yaml', '.xml'))
        assert installed == expected and installed, folder
    for exe in NODES + ['cmkd']:
        assert os.access(prefix / 'lib' / 'cmkd_ros' / exe, os.X_OK), exe
    # The installed tool starts from the workspace overlay, not from the source tree.
    proc = _run(['bash', '-c', 'source install/setup.bash && lib=install/cmkd_ros/lib/cmkd_ros '
                 '&& $lib/cmkd --help && $lib/segment_node --help && $lib/collect_node --help'],
                cwd=tmp_path, env={**os.environ, 'PYTHONPATH': ''})
    assert 'usage: cmkd' in proc.stdout
    assert 'segment_node' in proc.stdout and 'collect_node' in proc.stdout


@pytest.mark.process
def test_pip_install_into_a_venv_registers_the_package_with_ament(tmp_path):
    # A venv that sees this environment's packages (ROS 2 wheels, torch) through a .pth file, so
    # only the project itself is installed: as a wheel, with its data files.
    venv = tmp_path / 'venv'
    _run([sys.executable, '-m', 'venv', '--without-pip', str(venv)])
    site = next((venv / 'lib').glob('python3*/site-packages'))
    (site / 'parent_env.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    src = tmp_path / 'src'
    _copy_package(src)
    # The venv's own interpreter runs pip (found through the .pth), so scripts point at it.
    _run([str(venv / 'bin' / 'python'), '-m', 'pip', 'install', '--no-deps', '-q',
          '--no-build-isolation', '--ignore-installed', str(src)])
    env = {**os.environ, 'CMKD_VENV': str(venv), 'AMENT_PREFIX_PATH': '', 'PYTHONPATH': ''}
    script = (f'source {REPO}/scripts/env.sh && cd {tmp_path} && python -c "'
              'from ament_index_python.packages import get_package_share_directory as g;'
              'import cmkd_ros; print(g(\'cmkd_ros\')); print(cmkd_ros.__file__)"'
              ' && cmkd --help && ls $CMKD_VENV/lib/cmkd_ros')
    out = _run(['bash', '-c', script], env=env).stdout.splitlines()
    share = pathlib.Path(out[0])
    assert share == venv / 'share' / 'cmkd_ros'
    assert str(venv) in out[1], 'cmkd_ros must be imported from the venv, not the source tree'
    assert (share / 'launch' / 'segment.launch.py').is_file()
    assert (share / 'config' / 'fastdds_shm.xml').is_file()
    assert set(NODES) <= set(out[-2:] + out[-3:])


@pytest.mark.process
def test_install_script_is_idempotent_and_fast_on_a_second_run():
    venv = pathlib.Path(os.environ.get('CMKD_VENV', REPO / '.venv'))
    if not (venv / '.cmkd-install-stamp').exists():
        raise AssertionError(f'{venv} was not made by scripts/install.sh; run scripts/test.sh')
    start = time.monotonic()
    proc = _run(['bash', str(REPO / 'scripts' / 'install.sh')],
                env={**os.environ, 'CMKD_VENV': str(venv)})
    assert 'up to date' in proc.stdout
    assert time.monotonic() - start < 30


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    readme = (REPO / 'README.md').read_text()
    quick = readme.split('## Quick start', 1)[1].split('\n## ', 1)[0]
    commands = [line for line in quick.splitlines() if line.startswith(('./', 'bash '))]
    assert commands == ['./scripts/demo.sh', './scripts/test.sh'], commands
    assert 'scripts/test.sh' in (REPO / '.ci' / 'run').read_text()

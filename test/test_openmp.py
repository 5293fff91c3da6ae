"""The OpenMP settings the nodes and tools give the processes that run the student."""
import pathlib
import re

from cmkd_ros.openmp import OPENMP_DEFAULTS, openmp_defaults


def test_defaults_fill_an_environment_without_a_wait_policy():
    env = {'PATH': '/usr/bin'}
    assert openmp_defaults(env) is env
    assert env == {'PATH': '/usr/bin', 'OMP_WAIT_POLICY': 'PASSIVE', 'GOMP_SPINCOUNT': '10000'}
    assert OPENMP_DEFAULTS['OMP_WAIT_POLICY'] == 'PASSIVE'


def test_a_users_own_choice_is_left_alone():
    env = {'OMP_WAIT_POLICY': 'ACTIVE'}           # chose to spin: no spin count imposed
    assert openmp_defaults(env) == {'OMP_WAIT_POLICY': 'ACTIVE'}
    env = {'GOMP_SPINCOUNT': '0'}                  # chose to sleep at once: kept
    assert openmp_defaults(env) == {'GOMP_SPINCOUNT': '0', 'OMP_WAIT_POLICY': 'PASSIVE'}


def test_default_is_the_process_environment(monkeypatch):
    monkeypatch.delenv('OMP_WAIT_POLICY', raising=False)
    monkeypatch.delenv('GOMP_SPINCOUNT', raising=False)
    import os
    assert openmp_defaults() is os.environ
    assert os.environ['OMP_WAIT_POLICY'] == 'PASSIVE' and os.environ['GOMP_SPINCOUNT'] == '10000'


def test_the_shell_environment_sets_the_same():
    env_sh = (pathlib.Path(__file__).resolve().parents[1] / 'scripts' / 'env.sh').read_text()
    policy = re.search(r'OMP_WAIT_POLICY=(\w+)', env_sh).group(1)
    assert policy == OPENMP_DEFAULTS['OMP_WAIT_POLICY']
    assert (re.search(r'GOMP_SPINCOUNT:-(\d+)', env_sh).group(1)
            == OPENMP_DEFAULTS['GOMP_SPINCOUNT'])

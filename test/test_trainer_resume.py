"""Resume after kill -9: a run killed mid-way and resumed ends with the uninterrupted weights."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from offline_training import trainer as T
from offline_training.config import load_train_config
from offline_training.experiments import render_worlds

from test_trainer import TINY_SIM

pytestmark = pytest.mark.process
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20


def _settings(data, out):
    return [f'data.train={data}', f'out_dir={out}', f'steps={STEPS}', 'checkpoint_every=4',
            'student.arch=small', 'data.batch_size=2', 'progress=false', 'threads=1',
            'share_teacher_classifier=false', 'freeze_classifier=false', 'optim.lr=0.005']


def _cli(*args):
    return [sys.executable, '-m', 'cmkd_ros.tools.cli', 'train', 'supervised', *args]


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path):
    data = render_worlds(str(tmp_path / 'pairs'), (1,), 4, 3, TINY_SIM)
    env = {**os.environ, 'PYTHONPATH': REPO, 'OMP_NUM_THREADS': '1'}
    # 1. Reference: an uninterrupted run.
    reference = T.train(load_train_config('supervised', None, _settings(data, tmp_path / 'ref')))
    # 2. The same run in a subprocess, killed with SIGKILL once a mid-run checkpoint exists.
    out = tmp_path / 'killed'
    proc = subprocess.Popen(_cli(*_settings(data, out)), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            steps = [s for s, _ in T.list_checkpoints(str(out))]
            if steps and steps[-1] >= 8:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = T.list_checkpoints(str(out))[-1][0]
    assert 8 <= killed_at < STEPS
    assert not (out / 'student.pt').exists()
    # 3. Resume with the same command plus --resume; it must finish from the checkpoint.
    done = subprocess.run(_cli('--resume', *_settings(data, out)), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = torch.load(out / 'checkpoints' / f'step_{STEPS:08d}.pt', weights_only=True)
    expected = torch.load(reference['checkpoint'], weights_only=True)
    assert final['step'] == STEPS
    for name, value in expected['student'].items():
        torch.testing.assert_close(final['student'][name], value, rtol=1e-4, atol=1e-5)
    # The resumed run started from the killed run's last checkpoint, not from scratch.
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['start_step'] == killed_at

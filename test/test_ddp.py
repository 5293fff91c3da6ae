"""DistributedDataParallel on CPU: torchrun with 2 processes (gloo) ends with identical weights."""
import json
import os
import subprocess
import sys

import pytest
import torch

from offline_training.experiments import render_worlds

from test_trainer import TINY_SIM

pytestmark = pytest.mark.process
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = '''
import sys
import torch
import torch.distributed as dist
from offline_training.config import load_train_config
from offline_training.trainer import Trainer

trainer = Trainer(load_train_config('supervised', None, sys.argv[2:]))
assert trainer.distributed and dist.get_backend() == 'gloo'
trainer.fit()
torch.save(trainer.student.state_dict(), f'{sys.argv[1]}/rank{trainer.rank}.pt')
dist.destroy_process_group()
'''


def test_torchrun_two_processes_agree_and_learn(tmp_path):
    data = render_worlds(str(tmp_path / 'pairs'), (1,), 4, 3, TINY_SIM)
    worker = tmp_path / 'worker.py'
    worker.write_text(WORKER)
    out = tmp_path / 'run'
    env = {**os.environ, 'PYTHONPATH': REPO, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(worker), str(tmp_path), f'data.train={data}', f'out_dir={out}', 'steps=16',
           'checkpoint_every=8', 'log_every=1', 'student.arch=small', 'data.batch_size=1',
           'progress=false', 'threads=1', 'share_teacher_classifier=false',
           'freeze_classifier=false', 'optim.lr=0.01', 'data.augment=false']
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = torch.load(tmp_path / 'rank0.pt', weights_only=True)
    rank1 = torch.load(tmp_path / 'rank1.pt', weights_only=True)
    assert set(rank0) == set(rank1)
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name
    # Only rank 0 writes; its summary records both processes; the loss went down.
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['world_size'] == 2 and summary['steps'] == 16
    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows] == list(range(1, 17))
    first = sum(r['total'] for r in rows[:4]) / 4
    last = sum(r['total'] for r in rows[-4:]) / 4
    assert last < 0.8 * first, (first, last)

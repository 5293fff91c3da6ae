"""The demo's pieces: its training settings are the experiments', its labeled frames land on the
sweeps collect_node records, and its per-street renders join into one dataset."""
import numpy as np
import pytest

from cmkd_ros.config import to_dict
from cmkd_ros.pipelines.collect import RateLimiter
from cmkd_ros.tools import demo
from offline_training.config import load_teacher_config, load_train_config
from offline_training.experiments import ExperimentsConfig, _student_runs


def _picked(values: dict, reference: dict) -> dict:
    """The keys of ``reference`` (nested) read from ``values``."""
    return {k: _picked(values[k], v) if isinstance(v, dict) else values[k]
            for k, v in reference.items()}


@pytest.mark.parametrize('method', ['fskd', 'supervised'])
def test_demo_students_train_with_the_experiments_settings(method):
    runs = _student_runs(ExperimentsConfig(), 'train', 'val', 'teacher.pt')
    _, expected = runs[method]
    expected = {k: v for k, v in expected.items()
                if k not in ('seed', 'progress', 'checkpoint_every', 'log_every', 'steps')}
    expected['data'] = {k: v for k, v in expected['data'].items() if k not in ('train', 'val')}
    expected.pop('teacher', None)
    config = load_train_config(method, demo._config(f'demo_{method}.yaml'),
                               ['data.train=x', 'teacher.checkpoint=t.pt'])
    assert _picked(to_dict(config), expected) == expected


def test_demo_teacher_is_the_experiments_teacher():
    cfg = ExperimentsConfig()
    config = to_dict(load_teacher_config(demo._config('demo_teacher.yaml'), ['data.train=x']))
    assert (config['data']['batch_size'], config['optim']['lr'], config['precision'],
            config['threads']) == (cfg.teacher_batch_size, cfg.teacher_lr,
                                   cfg.teacher_precision, cfg.threads)
    assert config['model'] == dict(cfg.teacher_model)
    assert _picked(config, dict(cfg.teacher_options)) == dict(cfg.teacher_options)


@pytest.mark.parametrize('size', sorted(demo.SIZES))
def test_labeled_frames_are_the_sweeps_collect_node_records(size):
    spec = demo.SIZES[size]
    stamps = 1_700_000_000_000_000_000 + np.arange(spec.drive_sweeps) * 100_000_000
    limiter = RateLimiter(int(spec.pair_interval_s * 1e9))
    recorded = [k for k, stamp in enumerate(stamps) if limiter.accept(int(stamp))]
    stride = round(spec.pair_interval_s / demo.SWEEP_S)
    assert recorded == [k * stride for k in range(spec.pairs_per_street)]
    assert spec.pairs_per_street >= 8


def test_join_pairs_keeps_every_street_in_order(tmp_path):
    from cmkd_ros.pairs import PairReader
    from cmkd_ros.sim.export import export_pairs
    from cmkd_ros.sim.simulator import SimWorld
    small = {'lidar': {'beams': 4, 'horizontal_resolution_deg': 6.0},
             'cameras': {'count': 1, 'width': 32, 'height': 24}}
    parts = []
    for seed, frames in ((5, 2), (6, 3)):
        parts.append(str(tmp_path / str(seed)))
        export_pairs(SimWorld({**small, 'seed': seed}), parts[-1], frames, 'jpeg', stride=2)
    demo._join_pairs(parts, str(tmp_path / 'joined'))
    joined = PairReader(str(tmp_path / 'joined'))
    originals = [pair for part in parts for pair in PairReader(part)]
    assert len(joined) == 5
    for got, want in zip(joined, originals):
        assert np.array_equal(got.xyz, want.xyz)
        assert np.array_equal(got.labels, want.labels)
        assert got.images == want.images


@pytest.mark.process
def test_a_failed_job_raises_and_a_failing_demo_leaves_no_job_running(tmp_path, capsys):
    import subprocess
    with demo.Jobs() as jobs:
        bad = jobs.start('bad render', 'sim', '--frames', '0', '--out', str(tmp_path / 'bad'),
                         log=str(tmp_path / 'logs' / 'bad.log'))
        with pytest.raises(subprocess.CalledProcessError):
            bad.wait()
    # The job's own message reaches the demo's output (from its log file).
    assert '--frames and --stride must be >= 1' in capsys.readouterr().out
    with pytest.raises(RuntimeError):
        with demo.Jobs() as jobs:
            long = jobs.start('long render', 'sim', '--format', 'frames', '--frames', '1000',
                              '--out', str(tmp_path / 'long'), '--no-progress')
            raise RuntimeError('a later step failed')
    assert long.proc.returncode is not None and long.proc.returncode < 0

"""The experiments command on a tiny budget: every row is produced, a rerun skips finished work."""
import json
import time

import pytest

from offline_training.experiments import RUNS, ExperimentsConfig, results_table, run_experiments
from cmkd_ros.config import build

pytestmark = pytest.mark.slow

TINY = {'train_worlds': [1], 'test_worlds': [9], 'frames_per_world': 3, 'frame_stride': 3,
        'sim': {'lidar': {'beams': 8, 'horizontal_resolution_deg': 2.0},
                'cameras': {'count': 2, 'width': 64, 'height': 48}},
        'teacher_steps': 3, 'teacher_batch_size': 2, 'teacher_options': {'crop_size': [48, 64]},
        'teacher_model': {'arch': 'small', 'feature_dim': 16, 'width': 8},
        'student_steps': 3, 'finetune_steps': 2, 'label_fraction': 0.5, 'parallel': 2}


def test_tiny_experiments_produce_every_row_and_resume(tmp_path):
    config = build(ExperimentsConfig, {**TINY, 'out_dir': str(tmp_path)})
    summary = run_experiments(config)
    assert set(summary['students']) == set(RUNS) | {'udakd'}
    for name, run in summary['students'].items():
        assert 0.0 <= run['eval']['all']['miou'] <= 1.0, name
        assert run['eval']['num_scans'] == 3
    assert 0.0 <= summary['teacher']['eval']['miou'] <= 1.0
    assert 0.0 <= summary['teacher']['transfer']['seen']['miou'] <= 1.0
    # The ablations change exactly what they claim to change.
    from cmkd_ros.models.checkpoint import load_checkpoint
    _, no_da = load_checkpoint(tmp_path / 'runs' / 'fskd_no_da' / 'student.pt')
    _, fskd = load_checkpoint(tmp_path / 'runs' / 'fskd' / 'student.pt')
    _, no_occlusion = load_checkpoint(tmp_path / 'runs' / 'fskd_no_occlusion' / 'student.pt')
    assert fskd['config'].use_da and not no_da['config'].use_da
    assert fskd['extra']['train_config']['data']['occlusion']
    assert not no_occlusion['extra']['train_config']['data']['occlusion']
    finetuned = json.loads((tmp_path / 'runs' / 'udakd_finetune' / 'summary.json').read_text())
    assert finetuned['steps'] == 2
    _, info = load_checkpoint(tmp_path / 'runs' / 'udakd_finetune' / 'student.pt')
    assert info['extra']['train_config']['init_from'].endswith('udakd/student.pt')
    table = (tmp_path / 'results.md').read_text()
    assert table == results_table(summary)
    assert table.count('\n') == 2 + 2 + len(RUNS) + 1
    # Everything is cached: a second call only reads the summaries.
    begin = time.monotonic()
    again = run_experiments(config)
    assert time.monotonic() - begin < 10
    assert again['students']['fskd']['eval'] == summary['students']['fskd']['eval']


def test_repeats_train_every_run_per_seed_and_report_mean_and_std(tmp_path):
    config = build(ExperimentsConfig, {**TINY, 'out_dir': str(tmp_path), 'repeats': 2, 'seed': 3,
                                       'runs': ['udakd_finetune', 'supervised']})
    summary = run_experiments(config)
    from cmkd_ros.models.checkpoint import load_checkpoint
    for name in ('udakd', 'udakd_finetune', 'supervised'):
        assert sorted(summary['students'][name]['seeds']) == [3, 4]
        for seed, folder in ((3, name), (4, f'{name}_seed4')):
            _, info = load_checkpoint(tmp_path / 'runs' / folder / 'student.pt')
            assert info['extra']['train_config']['seed'] == seed
    # Each seed's fine-tuning starts from the UDAKD student of the same seed.
    _, info = load_checkpoint(tmp_path / 'runs' / 'udakd_finetune_seed4' / 'student.pt')
    assert info['extra']['train_config']['init_from'].endswith('udakd_seed4/student.pt')
    mious = [e['all']['miou'] for e in summary['students']['supervised']['seeds'].values()]
    mean = 100 * sum(mious) / 2
    row = next(r for r in results_table(summary).splitlines() if r.startswith('| supervised'))
    assert f'{mean:.1f} ± ' in row and '| 100% |' in row

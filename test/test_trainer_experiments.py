"""The experiments command on a tiny budget: every row is produced, a rerun skips finished work,
the test stage runs once."""
import json
import time

import pytest
import yaml

from offline_training.experiments import (RUNS, ExperimentsConfig, ExperimentsError,
                                          results_table, run_experiments)
from cmkd_ros.config import build
from cmkd_ros.pairs import PairReader

pytestmark = pytest.mark.slow

TINY = {'train_worlds': [1], 'val_worlds': [9], 'test_worlds': [10], 'frames_per_world': 3,
        'frame_stride': 3, 'probe_steps': 20,
        'sim': {'lidar': {'beams': 8, 'horizontal_resolution_deg': 2.0},
                'cameras': {'count': 2, 'width': 64, 'height': 48}},
        'teacher_steps': 3, 'teacher_batch_size': 2, 'teacher_options': {'crop_size': [48, 64]},
        'teacher_model': {'arch': 'small', 'feature_dim': 16, 'width': 8},
        'student_steps': 3, 'finetune_steps': 2, 'label_fraction': 0.5, 'parallel': 2}


def worlds_of(folder):
    return yaml.safe_load((folder / 'dataset.yaml').read_text())['worlds']


def test_tiny_experiments_produce_every_row_and_resume(tmp_path):
    config = build(ExperimentsConfig, {**TINY, 'out_dir': str(tmp_path)})
    summary = run_experiments(config)
    assert set(summary['students']) == set(RUNS) | {'udakd'}
    for name, run in summary['students'].items():
        assert 0.0 <= run['eval']['all']['miou'] <= 1.0, name
        assert run['eval']['num_scans'] == 3
    assert 0.0 <= summary['teacher']['eval']['miou'] <= 1.0
    transfer = summary['teacher']['transfer']
    assert 0.0 <= transfer['seen']['miou'] <= 1.0
    # the label images carried through the same correspondences: far above a 3-step teacher
    assert transfer['images']['miou'] > transfer['seen']['miou'] + 0.2
    assert transfer['train_images']['miou'] > transfer['train_teacher']['miou'] + 0.2
    assert 0.0 <= transfer['train_teacher']['miou'] <= 1.0
    # The ablations change exactly what they claim to change.
    from cmkd_ros.models.checkpoint import load_checkpoint
    _, no_da = load_checkpoint(tmp_path / 'runs' / 'fskd_no_da' / 'student.pt')
    _, fskd = load_checkpoint(tmp_path / 'runs' / 'fskd' / 'student.pt')
    _, no_occlusion = load_checkpoint(tmp_path / 'runs' / 'fskd_no_occlusion' / 'student.pt')
    assert fskd['config'].use_da and not no_da['config'].use_da
    _, paper = load_checkpoint(tmp_path / 'runs' / 'fskd_paper_da' / 'student.pt')
    assert (fskd['config'].da_pool, fskd['config'].da_residual) == (2, True)
    assert (paper['config'].da_pool, paper['config'].da_residual) == (4, False)
    assert paper['config'].use_da and paper['config'].da_layers == 3
    assert fskd['extra']['train_config']['data']['occlusion']
    _, labels = load_checkpoint(tmp_path / 'runs' / 'fskd_image_labels' / 'student.pt')
    assert fskd['extra']['train_config']['loss']['image_label_weight'] == 0.0
    assert labels['extra']['train_config']['loss']['image_label_weight'] == 3.0
    run_losses = json.loads((tmp_path / 'runs' / 'fskd_image_labels' / 'summary.json')
                            .read_text())['losses']
    assert run_losses['image_ce'] > 0.0
    assert not no_occlusion['extra']['train_config']['data']['occlusion']
    finetuned = json.loads((tmp_path / 'runs' / 'udakd_finetune' / 'summary.json').read_text())
    assert finetuned['steps'] == 2
    _, info = load_checkpoint(tmp_path / 'runs' / 'udakd_finetune' / 'student.pt')
    assert info['extra']['train_config']['init_from'].endswith('udakd/student.pt')
    # The probe scores the zero-shot students' frozen features; the pictures are drawn.
    for name in ('udakd', 'fskd', 'fskd_paper_da', 'fskd_no_da'):
        probe = summary['students'][name]['probe']
        assert 0.0 <= probe['eval']['all']['miou'] <= 1.0 and probe['eval']['num_scans'] == 3
        assert (tmp_path / 'runs' / name / 'probe.json').exists()
    assert 'probe' not in summary['students']['supervised']
    for picture in ('embedding.png', 'agreement.png'):
        assert (tmp_path / 'pictures' / picture).stat().st_size > 1000
    agreement = summary['pictures']['agreement']
    assert set(agreement['copied']) == {'fskd', 'fskd_paper_da', 'fskd_no_da', 'supervised'}
    # Scored on the validation world only.
    assert summary['protocol']['eval_worlds'] == [9]
    assert worlds_of(tmp_path / 'data' / 'val') == [9]
    assert not (tmp_path / 'data' / 'test').exists()
    table = (tmp_path / 'results.md').read_text()
    assert table == results_table(summary)
    assert table.startswith('Stage validation: trained on worlds 1, scored on the validation '
                            'worlds 9;')
    # protocol line, blank, header, rule, 3 reference rows, the runs, blank, targets line
    assert table.count('\n') == 2 + 2 + 3 + len(RUNS) + 1 + 2
    # Everything is cached: a second call only reads the summaries.
    begin = time.monotonic()
    again = run_experiments(config)
    assert time.monotonic() - begin < 10
    assert again['students']['fskd']['eval'] == summary['students']['fskd']['eval']
    with pytest.raises(ExperimentsError, match='another stage'):
        run_experiments(build(ExperimentsConfig, {**TINY, 'out_dir': str(tmp_path),
                                                  'stage': 'test'}))


def test_test_stage_on_the_second_rig_scores_the_test_worlds_once(tmp_path):
    second = {'lidar': {'preset': 'vlp32c', 'horizontal_resolution_deg': 2.0},
              'cameras': {'count': 1, 'width': 64, 'height': 48}}
    values = {**TINY, 'out_dir': str(tmp_path), 'stage': 'test', 'rig': 'second',
              'second_rig': second, 'runs': ['supervised'], 'pictures': False}
    summary = run_experiments(build(ExperimentsConfig, values))
    assert summary['protocol']['eval_worlds'] == [10]
    for part, worlds in (('train', [1]), ('test', [10])):
        assert worlds_of(tmp_path / 'data' / part) == worlds
        pair = PairReader(str(tmp_path / 'data' / part))[0]
        assert len(pair.camera_names) == 1              # the second rig's camera
        assert len(set(pair.ring.tolist())) > 8         # and its 32-beam LiDAR (TINY: 8)
    assert summary['students']['supervised']['eval']['num_scans'] == 3
    assert 'rig second' in (tmp_path / 'results.md').read_text()
    with pytest.raises(ExperimentsError, match='scored once'):
        run_experiments(build(ExperimentsConfig, values))


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


def test_teacher_worlds_add_images_for_the_teacher_only(tmp_path):
    values = {**TINY, 'out_dir': str(tmp_path), 'runs': ['fskd'], 'probe_steps': 0,
              'pictures': False, 'teacher_worlds': [11]}
    summary = run_experiments(build(ExperimentsConfig, values))
    assert worlds_of(tmp_path / 'data' / 'teacher') == [1, 11]
    assert worlds_of(tmp_path / 'data' / 'train') == [1]        # the student's scans
    teacher_data = summary['teacher']['config']['data']
    assert teacher_data['train'] == str(tmp_path / 'data' / 'teacher')
    assert teacher_data['val'] == str(tmp_path / 'data' / 'val')
    fskd = summary['students']['fskd']
    assert fskd['eval']['num_scans'] == 3                    # scored on world 9 alone
    assert summary['protocol']['teacher_worlds'] == [11]
    assert 'the teacher also on the images of worlds 11' in (tmp_path / 'results.md').read_text()
    from cmkd_ros.models.checkpoint import load_checkpoint

    def distilled_from(root):
        _, info = load_checkpoint(root / 'runs' / 'fskd' / 'student.pt')
        return info['extra']['train_config']['data']['train']
    assert distilled_from(tmp_path) == str(tmp_path / 'data' / 'train')
    # Distilling from the teacher worlds' pairs too (unlabeled); supervised keeps its labels.
    both = tmp_path / 'both'
    run_experiments(build(ExperimentsConfig, {**values, 'out_dir': str(both),
                                              'runs': ['fskd', 'supervised'],
                                              'distill_on_teacher_worlds': True}))
    assert distilled_from(both) == str(both / 'data' / 'teacher')
    _, info = load_checkpoint(both / 'runs' / 'supervised' / 'student.pt')
    assert info['extra']['train_config']['data']['train'] == str(both / 'data' / 'train')

"""`cmkd train` and `cmkd evaluate` on tiny nuScenes and SemanticKITTI folders laid out like the
real data sets: the official splits are used (train on the training split, score the
validation split) and the ready configs run."""
import json
import os

import pytest
import torch

from fixtures.real_layouts import build_nuscenes, build_semantickitti
from cmkd_ros.classes import NUSCENES_LIDARSEG16, SEMANTICKITTI19
from cmkd_ros.config import ConfigError
from cmkd_ros.models.checkpoint import load_checkpoint
from cmkd_ros.models.teacher import build_teacher, save_teacher
from cmkd_ros.tools.cli import main as cmkd
from offline_training.config import load_train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'config')
# a tiny student and a quick run: what the test needs from the shipped configs is the data part
QUICK = ['steps=2', 'student.arch=small', 'student.widths=[8,8,8,8,8,8,8,8,8]',
         'student.da_layers=1', 'data.batch_size=1', 'data.num_workers=0', 'threads=1',
         'progress=false', 'checkpoint_every=2', 'log_every=1']


def tiny_teacher(path, class_map):
    torch.manual_seed(0)
    save_teacher(build_teacher({'arch': 'small', 'feature_dim': 8, 'width': 8,
                                'num_classes': class_map.num_classes}, class_map), str(path))
    return str(path)


@pytest.fixture(scope='module')
def nuscenes(tmp_path_factory, data_dir):
    """v1.0-mini with one mini_train scene (scene-0061) and one mini_val scene (scene-0103),
    two keyframes each, a sweep after each keyframe, and a 16-class teacher."""
    root = tmp_path_factory.mktemp('nuscenes')
    build_nuscenes(root, data_dir, samples=2, scenes=('scene-0061', 'scene-0103'), sweeps=1,
                   points=6000)
    return {'root': str(root), 'teacher': tiny_teacher(root / 'teacher.pt',
                                                       NUSCENES_LIDARSEG16)}


@pytest.fixture(scope='module')
def kitti(tmp_path_factory, data_dir):
    """Sequences 00 (training) and 08 (validation) with image_2 and image_3, and a 19-class
    teacher."""
    root = tmp_path_factory.mktemp('semantickitti')
    build_semantickitti(root, data_dir, sequence='00', scans=2, image_3=True, points=6000)
    build_semantickitti(root, data_dir, sequence='08', scans=1, image_3=True, points=6000)
    return {'root': str(root), 'teacher': tiny_teacher(root / 'teacher.pt', SEMANTICKITTI19)}


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_nuscenes_fskd_trains_on_mini_train_and_scores_mini_val(nuscenes, tmp_path, capsys):
    out = tmp_path / 'fskd'
    code = cmkd(['train', 'fskd', '--config', os.path.join(CONFIG, 'nuscenes_fskd.yaml'),
                 f'data.train={nuscenes["root"]}', f'data.val={nuscenes["root"]}',
                 f'teacher.checkpoint={nuscenes["teacher"]}', f'out_dir={out}',
                 'data.image_scale=0.25', *QUICK])
    summary = last_json(capsys)
    assert code == 0
    assert summary['train_split'] == {'format': 'nuscenes', 'version': 'v1.0-mini',
                                      'split': 'mini_train', 'scenes': ['scene-0061'],
                                      'scans': 2}
    assert set(summary['losses']) == {'feature', 'semantic', 'total'}
    scored = json.loads((out / 'eval.json').read_text())
    assert scored['split']['split'] == 'mini_val' and scored['split']['scenes'] == ['scene-0103']
    assert scored['num_scans'] == 2
    student, info = load_checkpoint(out / 'student.pt')
    assert info['class_names'] == list(NUSCENES_LIDARSEG16.names)
    assert student.config.point_features == 'intensity_height'
    # cmkd evaluate: the official validation split by default, the version found in the root
    code = cmkd(['evaluate', '--format', 'nuscenes', '--data', nuscenes['root'],
                 '--checkpoint', str(out / 'student.pt'), '--out', str(tmp_path / 'eval')])
    printed = capsys.readouterr().out
    assert code == 0
    assert 'data: nuscenes v1.0-mini split mini_val, scenes scene-0103' in printed
    report = json.loads((tmp_path / 'eval' / 'eval.json').read_text())
    assert report['split']['scenes'] == ['scene-0103'] and report['num_scans'] == 2
    code = cmkd(['evaluate', '--format', 'nuscenes', '--data', nuscenes['root'], '--split',
                 'mini_train', '--checkpoint', str(out / 'student.pt')])
    assert code == 0 and 'split mini_train, scenes scene-0061' in capsys.readouterr().out
    code = cmkd(['evaluate', '--format', 'nuscenes', '--data', nuscenes['root'], '--split',
                 'val', '--checkpoint', str(out / 'student.pt')])
    assert code == 1 and 'belongs to v1.0-trainval' in capsys.readouterr().err


@pytest.mark.slow
def test_semantickitti_udakd_then_finetune_use_sequences_00_and_08(kitti, tmp_path, capsys):
    udakd = tmp_path / 'udakd'
    code = cmkd(['train', 'udakd', '--config', os.path.join(CONFIG, 'semantickitti_udakd.yaml'),
                 f'data.train={kitti["root"]}', f'data.val={kitti["root"]}',
                 f'teacher.checkpoint={kitti["teacher"]}', f'out_dir={udakd}', *QUICK])
    summary = last_json(capsys)
    assert code == 0
    assert summary['train_split'] == {'format': 'semantickitti', 'split': 'train',
                                      'sequences': ['00'], 'scans': 2}
    scored = json.loads((udakd / 'eval.json').read_text())
    assert scored['split']['sequences'] == ['08'] and scored['num_scans'] == 1
    # few-shot fine-tuning of the UDAKD student on the labeled scans (config/finetune.yaml)
    finetune = tmp_path / 'finetune'
    code = cmkd(['train', 'finetune', '--config', os.path.join(CONFIG, 'finetune.yaml'),
                 'data.format=semantickitti', 'class_map=semantickitti19',
                 'data.augment_scale_xy=[1,1]', f'data.train={kitti["root"]}',
                 f'data.val={kitti["root"]}', f'init_from={udakd / "student.pt"}',
                 'data.label_fraction=0.5', 'data.voxel_size=0.05', f'out_dir={finetune}',
                 *[q for q in QUICK if not q.startswith('student.')]])
    summary = last_json(capsys)
    assert code == 0 and set(summary['losses']) == {'ce', 'total'}
    assert summary['train_split']['sequences'] == ['00']
    code = cmkd(['evaluate', '--format', 'semantickitti', '--data', kitti['root'],
                 '--checkpoint', str(finetune / 'student.pt')])
    assert code == 0 and 'data: semantickitti split val, sequences 08' in capsys.readouterr().out


@pytest.mark.parametrize('name', ['nuscenes_fskd', 'nuscenes_udakd', 'semantickitti_fskd',
                                  'semantickitti_udakd'])
def test_real_data_configs_are_valid_and_not_synthetic(name):
    method = name.split('_')[1]
    config = load_train_config(method, os.path.join(CONFIG, f'{name}.yaml'),
                               ['data.train=x', 'teacher.checkpoint=t.pt'])
    assert config.data.format == name.split('_')[0]
    assert config.data.augment_scale_xy == (1.0, 1.0)      # cars keep their length
    assert config.data.train_split == () and config.data.val_split == ()   # official splits
    assert config.teacher.cache_mb == 0


def test_format_errors_are_clear(capsys, tmp_path):
    with pytest.raises(ConfigError, match="class_map: the nuscenes reader labels points with "
                                          "'nuscenes_lidarseg16'"):
        load_train_config('fskd', None, ['data.format=nuscenes', 'teacher.checkpoint=t.pt'])
    with pytest.raises(ConfigError, match='data.format'):
        load_train_config('fskd', None, ['data.format=kitti', 'teacher.checkpoint=t.pt'])
    code = cmkd(['train', 'supervised', 'data.format=pairs', f'data.train={tmp_path}',
                 'data.train_split=[train]', 'share_teacher_classifier=false',
                 'freeze_classifier=false', f'out_dir={tmp_path / "out"}'])
    assert code == 2 and 'only for the nuscenes and semantickitti' in capsys.readouterr().err
    code = cmkd(['train', 'supervised', 'data.format=nuscenes', 'class_map=nuscenes_lidarseg16',
                 f'data.train={tmp_path}', 'share_teacher_classifier=false',
                 'freeze_classifier=false', f'out_dir={tmp_path / "out"}'])
    assert code == 2 and 'no nuScenes version folder' in capsys.readouterr().err

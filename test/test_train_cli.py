"""`cmkd train`: config precedence, clear errors, and a teacher -> FSKD run end to end."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from cmkd_ros.tools import cli
from cmkd_ros.config import ConfigError
from cmkd_ros.models.checkpoint import load_checkpoint
from cmkd_ros.models.teacher import load_teacher
from offline_training.config import load_teacher_config, load_train_config
from offline_training.experiments import render_worlds

from test_trainer import TINY_SIM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'config')


def test_print_config_applies_defaults_yaml_then_cli(capsys):
    code = cli.main(['train', 'fskd', '--config', os.path.join(CONFIG, 'fskd.yaml'),
                     '--print-config', 'steps=7', 'data.train=somewhere',
                     'teacher.checkpoint=t.pt', 'loss.kl_temperature=2'])
    assert code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved['method'] == 'fskd'
    assert resolved['steps'] == 7                        # CLI over YAML (2000)
    assert resolved['optim']['lr'] == 0.004              # YAML over the default (0.001)
    assert resolved['loss']['infonce_samples'] == 4096   # default
    assert resolved['loss']['kl_temperature'] == 2.0
    assert resolved['data']['train'] == 'somewhere'


@pytest.mark.parametrize('name', ['fskd', 'udakd', 'finetune', 'supervised'])
def test_shipped_yaml_files_are_valid(name):
    config = load_train_config(name, os.path.join(CONFIG, f'{name}.yaml'),
                               ['data.train=x', 'teacher.checkpoint=t.pt'])
    assert config.method == name
    teacher = load_teacher_config(os.path.join(CONFIG, 'teacher.yaml'), ['train=x'])
    assert teacher.model['arch'] == 'small'


def test_errors_name_the_setting(capsys, tmp_path):
    code = cli.main(['train', 'fskd', '--config', os.path.join(CONFIG, 'fskd.yaml'),
                     'optim.lr=-1', 'teacher.checkpoint=t.pt'])
    assert code == 2
    assert 'optim.lr' in capsys.readouterr().err
    other = tmp_path / 'other.yaml'
    other.write_text('method: udakd\n')
    with pytest.raises(ConfigError, match='method'):
        load_train_config('fskd', str(other))
    code = cli.main(['train', 'supervised', 'data.train=' + str(tmp_path / 'missing'),
                     'share_teacher_classifier=false', 'freeze_classifier=false'])
    assert code == 2
    assert 'missing' in capsys.readouterr().err


@pytest.mark.process
def test_teacher_then_fskd_end_to_end(tmp_path):
    train = render_worlds(str(tmp_path / 'train'), (1,), 4, 3, TINY_SIM)
    val = render_worlds(str(tmp_path / 'val'), (2,), 2, 3, TINY_SIM)
    env = {**os.environ, 'PYTHONPATH': REPO, 'OMP_NUM_THREADS': '1'}
    run = [sys.executable, '-m', 'cmkd_ros.tools.cli', 'train']
    teacher = subprocess.run(
        run + ['teacher', '--config', os.path.join(CONFIG, 'teacher.yaml'), f'train={train}',
               f'val={val}', f'out_dir={tmp_path / "teacher"}', 'steps=3', 'batch_size=2',
               'threads=1', 'model.width=8', 'model.feature_dim=16',
               'options={crop_size: [48, 64]}', 'loss.class_balance=inverse_sqrt'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    teacher_path = tmp_path / 'teacher' / 'teacher.pt'
    assert 0.0 <= json.loads(teacher.stdout.splitlines()[-1])['miou'] <= 1.0
    weights = load_teacher(str(teacher_path)).class_weights       # inverse_sqrt: kept
    assert weights.shape == (12,) and bool((weights > 0).all())
    fskd = subprocess.run(
        run + ['fskd', '--config', os.path.join(CONFIG, 'fskd.yaml'), f'data.train={train}',
               f'data.val={val}', f'teacher.checkpoint={teacher_path}',
               f'out_dir={tmp_path / "fskd"}', 'steps=3', 'student.arch=small', 'threads=1',
               'progress=false'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert fskd.returncode == 0, fskd.stderr[-2000:]
    printed = json.loads(fskd.stdout.splitlines()[-1])
    assert printed['steps'] == 3 and set(printed['losses']) == {'feature', 'semantic', 'total'}
    assert printed['class_prior_shift'] == pytest.approx((-0.5 * weights.log()).tolist())
    result = json.loads((tmp_path / 'fskd' / 'eval.json').read_text())
    assert 0.0 <= result['all']['miou'] <= 1.0 and result['num_scans'] == 2
    student, info = load_checkpoint(tmp_path / 'fskd' / 'student.pt')
    assert student.config.feature_dim == 16
    assert info['extra']['train_config']['teacher']['checkpoint'] == str(teacher_path)


def test_old_teacher_keys_move_to_their_sections_with_a_warning(tmp_path, capsys):
    old = tmp_path / 'old_teacher.yaml'
    old.write_text('train: pairs/a\nbatch_size: 4\nlr: 0.002\n'
                   'options: {crop_size: [64, 96], class_weighting: inverse_sqrt}\n')
    with pytest.warns(FutureWarning, match='lr is now optim.lr'):
        config = load_teacher_config(str(old), ['data.train=pairs/b'])
    assert config.data.train == 'pairs/b'                     # the command line wins
    assert (config.data.batch_size, config.optim.lr) == (4, 0.002)
    assert config.data.crop_size == (64, 96) and config.loss.class_balance == 'inverse_sqrt'
    with pytest.warns(FutureWarning, match='train is now data.train'):   # new file, old CLI
        assert load_teacher_config(os.path.join(CONFIG, 'teacher.yaml'),
                                   ['train=b']).data.train == 'b'
    with pytest.raises(ConfigError, match='lr and optim.lr both given'):   # in one source
        load_teacher_config(None, ['lr=0.1', 'optim.lr=0.2'])
    with pytest.raises(ConfigError, match='options.crop: unknown teacher setting'):
        load_teacher_config(None, ['options.crop=[1, 2]'])
    code = cli.main(['train', 'teacher', '--config', os.path.join(CONFIG, 'teacher.yaml'),
                     '--print-config', 'data.train=x', 'loss.class_balance=inverse_sqrt'])
    assert code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert 'options' not in resolved and 'lr' not in resolved
    assert resolved['data']['crop_size'] == [192, 320] and resolved['optim']['lr'] == 0.001
    assert resolved['loss'] == {'class_balance': 'inverse_sqrt'}


def test_experiments_teacher_options_take_new_and_old_names():
    from cmkd_ros.config import build
    from offline_training.experiments import ExperimentsConfig
    assert build(ExperimentsConfig, {}).teacher_options == {
        'data': {'crop_size': [128, 224]}, 'loss': {'class_balance': 'inverse_sqrt'}}
    with pytest.warns(FutureWarning, match='crop_size is now data.crop_size'):
        old = build(ExperimentsConfig, {'teacher_options': {'crop_size': [48, 64]}})
    assert old.teacher_options == {'data': {'crop_size': [48, 64]},
                                   'loss': {'class_balance': 'inverse_sqrt'}}

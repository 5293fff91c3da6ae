"""Student checkpoints: round trip and clear errors for bad files."""
import dataclasses

import pytest
import torch

from cmkd_ros.config import build
from cmkd_ros.models import (CheckpointError, FORMAT_VERSION, StudentConfig, build_student,
                             load_checkpoint, save_checkpoint)

CONFIG = dict(arch='small', widths=[4, 4, 6, 8, 8, 8, 6, 4, 4], feature_dim=6, num_classes=3,
              voxel_size=0.25, point_features='intensity_height', backend='torch')
NAMES = ['road', 'car', 'vegetation']
COLORS = [[128, 64, 128], [0, 0, 142], [107, 142, 35]]


pytestmark = pytest.mark.usefixtures('single_torch_thread')


def random_scan(seed=0, n=3000):
    gen = torch.Generator().manual_seed(seed)
    xyz = (torch.rand(n, 3, generator=gen) - 0.5) * torch.tensor([20.0, 20.0, 3.0])
    return xyz, torch.rand(n, generator=gen) * 255


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    student = build_student(build(StudentConfig, CONFIG))
    student.load_classifier(torch.randn(3, 6), torch.randn(3))
    xyz, intensity = random_scan()
    student.train()
    for _ in range(2):  # move the batch-norm running statistics away from their defaults
        student.predict(xyz, intensity)
        student(*_voxels(student, xyz, intensity))
    path = tmp_path / 'student.pt'
    save_checkpoint(path, student, class_names=NAMES, class_colors=COLORS,
                    extra={'step': 7, 'miou': 0.5})
    return path, student


def _voxels(student, xyz, intensity):
    from cmkd_ros.models import point_features, voxelize
    coords, feats, _ = voxelize(xyz, point_features(xyz, intensity, 'intensity_height'),
                                student.voxel_size)
    return torch.cat([torch.zeros(coords.shape[0], 1, dtype=torch.int32), coords], 1), feats


def test_round_trip_restores_predictions_and_class_map(saved):
    path, student = saved
    loaded, info = load_checkpoint(path)
    assert info['class_names'] == NAMES and info['class_colors'] == COLORS
    assert info['voxel_size'] == 0.25 and info['format_version'] == FORMAT_VERSION
    assert info['extra'] == {'step': 7, 'miou': 0.5}
    assert info['config'] == dataclasses.replace(  # stored with the resolved stem kernel
        student.config, backend='auto', stem_kernel=student.backbone.stem_kernel)
    assert not loaded.training
    xyz, intensity = random_scan(1)
    student.eval()
    for key, value in student.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    cls_a, prob_a = student.predict(xyz, intensity)
    cls_b, prob_b = loaded.predict(xyz, intensity)
    assert torch.equal(cls_a, cls_b) and torch.equal(prob_a, prob_b)
    assert float(prob_a.std()) > 0  # a real, non-constant prediction


def test_weights_are_stored_in_the_backend_independent_layout(saved):
    path, student = saved
    payload = torch.load(path, weights_only=True)
    stem = payload['state_dict']['backbone.stem.0.weight']
    assert stem.shape == (27, 2 + 1, 4)  # (k^3, Cin, Cout), kernel 3 for 'small'
    assert payload['config']['backend'] == 'torch'


def test_missing_corrupt_and_truncated_files(tmp_path, saved):
    path, _ = saved
    with pytest.raises(CheckpointError, match='not found'):
        load_checkpoint(tmp_path / 'nope.pt')
    corrupt = tmp_path / 'corrupt.pt'
    corrupt.write_bytes(b'\x00garbage' * 100)
    with pytest.raises(CheckpointError, match='corrupt or truncated'):
        load_checkpoint(corrupt)
    data = path.read_bytes()
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='corrupt or truncated'):
        load_checkpoint(truncated)


def _rewrite(path, tmp_path, change):
    payload = torch.load(path, weights_only=True)
    change(payload)
    out = tmp_path / 'edited.pt'
    torch.save(payload, out)
    return out


def test_wrong_format_version_and_foreign_files(tmp_path, saved):
    path, _ = saved
    newer = _rewrite(path, tmp_path, lambda p: p.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match='format_version'):
        load_checkpoint(newer)
    foreign = tmp_path / 'foreign.pt'
    torch.save({'model': {}}, foreign)
    with pytest.raises(CheckpointError, match='not a cmkd_ros student checkpoint'):
        load_checkpoint(foreign)


def test_pickled_objects_are_refused(tmp_path):
    evil = tmp_path / 'evil.pt'
    torch.save({'format': 'cmkd_ros.student', 'hook': _Unsafe()}, evil)
    with pytest.raises(CheckpointError, match='corrupt or truncated'):
        load_checkpoint(evil)


class _Unsafe:
    pass


def test_config_and_weights_mismatch(tmp_path, saved):
    path, _ = saved
    bigger_stem = _rewrite(path, tmp_path, lambda p: p['config'].update(stem_kernel=5))
    with pytest.raises(CheckpointError, match=r'backbone.stem.0.weight has shape \(27, 3, 4\)'):
        load_checkpoint(bigger_stem)
    no_da = _rewrite(path, tmp_path, lambda p: p['config'].update(use_da=False))
    with pytest.raises(CheckpointError, match='do not match the saved config'):
        load_checkpoint(no_da)
    bad_config = _rewrite(path, tmp_path, lambda p: p['config'].update(arch='resnet'))
    with pytest.raises(CheckpointError, match='invalid student config: arch'):
        load_checkpoint(bad_config)
    fewer_names = _rewrite(path, tmp_path, lambda p: p.update(class_names=NAMES[:2]))
    with pytest.raises(CheckpointError, match='2 class names'):
        load_checkpoint(fewer_names)


def test_save_checks_the_class_map(tmp_path, saved):
    _, student = saved
    with pytest.raises(CheckpointError, match='color'):
        save_checkpoint(tmp_path / 'x.pt', student, class_names=NAMES,
                        class_colors=[[0, 0, 300]] * 3)
    assert not (tmp_path / 'x.pt').exists()


def test_checkpoint_files_get_the_umask_mode_and_leave_no_temporary_file(tmp_path, saved):
    import os
    _, student = saved
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / 'shared.pt', student, class_names=NAMES, class_colors=COLORS)
        os.umask(0o077)
        save_checkpoint(tmp_path / 'private.pt', student, class_names=NAMES,
                        class_colors=COLORS)
    finally:
        os.umask(old)
    assert (tmp_path / 'shared.pt').stat().st_mode & 0o777 == 0o644      # was 0o600
    assert (tmp_path / 'private.pt').stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == ['private.pt', 'shared.pt', 'student.pt']


def test_preset_checkpoints_store_their_resolved_widths(tmp_path, monkeypatch):
    from cmkd_ros.models import minkunet
    config = build(StudentConfig, {**CONFIG, 'widths': []})
    student = build_student(config)
    path = tmp_path / 'preset.pt'
    save_checkpoint(path, student, class_names=NAMES, class_colors=COLORS)
    preset = minkunet.ARCHS['small']
    # A later release changes the preset: the file still loads with the widths it was built with.
    monkeypatch.setitem(minkunet.ARCHS, 'small', dataclasses.replace(
        preset, widths=tuple(w * 2 for w in preset.widths), stem_kernel=5))
    loaded, _ = load_checkpoint(path)
    assert loaded.backbone.widths == preset.widths
    assert loaded.backbone.stem_kernel == preset.stem_kernel
    for key, value in student.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_checkpoints_from_before_da_mix_and_residual_load_as_the_first_da_module(tmp_path):
    """Files saved before ``da_mix`` and ``da_residual`` existed have no such keys: they hold the
    channel-halves DA module without shortcut and must load as one."""
    student = build_student(build(StudentConfig, {**CONFIG, 'da_mix': False,
                                                  'da_residual': False}))
    path = tmp_path / 'old.pt'
    save_checkpoint(path, student, class_names=NAMES, class_colors=COLORS)
    payload = torch.load(path, weights_only=True)
    del payload['config']['da_mix'], payload['config']['da_residual']
    torch.save(payload, path)
    loaded, info = load_checkpoint(path)
    assert info['config'].da_mix is False and info['config'].da_residual is False
    xyz, intensity = random_scan(1)
    student.eval()
    assert torch.equal(loaded.predict(xyz, intensity)[0], student.predict(xyz, intensity)[0])
    # A current file keeps its setting.
    mixed = tmp_path / 'new.pt'
    save_checkpoint(mixed, build_student(build(StudentConfig, CONFIG)), class_names=NAMES,
                    class_colors=COLORS)
    config = load_checkpoint(mixed)[1]['config']
    assert config.da_mix is True and config.da_residual is True
